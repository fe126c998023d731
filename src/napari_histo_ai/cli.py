"""The ``napari-histo-ai`` command: a thin layer over the core, like the widgets.

Every subcommand prints JSON (or a path) on success. On bad input it prints one line,
``error: <file>: <what is wrong> (<what to do>)``, to standard error and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .errors import HistoAIError

EXIT_BAD_INPUT = 2


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import open_image

    out = []
    for path in args.paths:
        pyramid = open_image(path, backend=args.backend)
        try:
            info = pyramid.info()
        finally:
            pyramid.close()
        out.append(info)
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return 0


def _cmd_make_slide(args: argparse.Namespace) -> int:
    from .io.synthetic import make_slide

    path = make_slide(
        args.out,
        width=args.width,
        height=args.height,
        source=args.source,
        tile_size=args.tile_size,
        quality=args.quality,
        mpp=args.mpp,
    )
    print(path)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "read":
        from .bench.read import run_read_benchmark

        result = run_read_benchmark(
            args.paths,
            n_reads=args.reads,
            region=args.region,
            seed=args.seed,
            generate=args.generate,
            source=args.source,
        )
        print(json.dumps(result, indent=2))
        return 0
    raise HistoAIError(f"unknown benchmark {args.what!r}: expected one of: read")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-histo-ai",
        description="Whole-slide, volume and image analysis for napari (command line).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print an image's metadata as JSON")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--backend",
        default="auto",
        help="auto (default), tifffile, openslide, ome-zarr, nibabel or pillow",
    )
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "make-slide",
        help="write a large pyramidal JPEG-tiled TIFF by tiling real pixels of a source slide",
    )
    p.add_argument("out", metavar="OUT.tif")
    p.add_argument("--width", type=int, default=100_000, help="level-0 width in pixels")
    p.add_argument("--height", type=int, default=80_000, help="level-0 height in pixels")
    p.add_argument("--source", required=True, metavar="PATH", help="a real slide to tile from")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--quality", type=int, default=80, help="JPEG quality 1-100")
    p.add_argument(
        "--mpp", type=float, default=None, help="µm/px to record (default: the source's mpp)"
    )
    p.set_defaults(func=_cmd_make_slide)

    p = sub.add_parser("bench", help="run a benchmark and print JSON")
    p.add_argument("what", choices=["read"])
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--reads", type=int, default=200, help="random regions per file")
    p.add_argument("--region", type=int, default=512, help="region edge in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--generate",
        metavar="OUT.tif",
        default=None,
        help="also generate (if absent) and benchmark a 100k x 80k slide here",
    )
    p.add_argument(
        "--source",
        metavar="PATH",
        default=None,
        help="real slide to tile --generate from (default: the bundled sample slide)",
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except HistoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
