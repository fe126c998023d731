"""Read benchmark: open time, memory and region throughput vs OpenSlide and raw decoding.

The same as ``napari-histo-ai bench read``; prints JSON. Example::

    python benchmarks/bench_read.py ../shared/data/wsi/*.svs ../shared/data/wsi/*.ndpi \\
        --generate .bench/big.tif --reads 200 --region 512

See :mod:`napari_histo_ai.bench.read` for what each number means.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the benchmark, print its JSON."""
    from napari_histo_ai.bench.read import run_read_benchmark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", metavar="PATH")
    parser.add_argument("--reads", type=int, default=200, help="random regions per file")
    parser.add_argument("--region", type=int, default=512, help="region edge in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--generate",
        metavar="OUT.tif",
        default=None,
        help="also generate (if absent) and benchmark a 100k x 80k slide here",
    )
    parser.add_argument(
        "--source",
        metavar="PATH",
        default=None,
        help="source slide for --generate (default: a CMU-1* path given)",
    )
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
