"""Read benchmark: open time, memory and random-region throughput of our readers.

``napari-histo-ai bench read [PATH ...] [--generate OUT.tif]`` (or
``benchmarks/bench_read.py``) measures, for every file, in a fresh subprocess each (so
one file's memory and caches do not pollute the next):

- ``open_s``: :func:`~napari_histo_ai.io.open_image` plus the first metadata
  (``Pyramid.info()``), imports excluded (reported as ``import_s``);
- ``rss_*_mb`` / ``peak_rss_*_mb``: current RSS (psutil) and peak RSS (the process's
  ``VmHWM``) after the imports, after opening and after the random reads through our
  reader; ``ru_maxrss_*_mb`` is ``getrusage(RUSAGE_SELF).ru_maxrss``, which Linux carries
  over ``exec`` from the parent (so it is at least the parent's RSS at the fork);
- ``mp_per_s``: megapixels per second of our region reader,
  ``Pyramid.read_region((y, x), (h, w))`` at level 0 (the analogue of OpenSlide's
  ``read_region``; the tifffile backend decodes tiles directly, with its decoded-tile
  cache on, as users get it), over ``n_reads`` random ``region``×``region`` regions;
  ``nocache_mp_per_s`` the same with the tile cache off (every tile decoded);
- ``dask_mp_per_s``: ``np.asarray(pyramid.levels[0][y:y+h, x:x+w])`` (the lazy array
  napari slices; cache off), and ``dask_noop_ms_per_region`` (the same slices of a dask
  array whose chunks cost nothing: dask's own share of the time);
- ``openslide_mp_per_s``: ``np.asarray(OpenSlide.read_region(...).convert("RGB"))`` on
  the same regions with OpenSlide's default tile cache (what users get), and
  ``openslide_nocache_mp_per_s`` with the cache off (decoding only: on small slides the
  random regions overlap and the cache dominates);
- ``raw_decode_mp_per_s``: single-threaded imagecodecs decoding of exactly the TIFF
  tiles covering each region (bytes read beforehand from the page's ``dataoffsets`` /
  ``databytecounts``, ``JPEGTables`` applied): the bare limit of any reader on one core;
- ratios like for like: ``ratio_vs_openslide`` = ``mp_per_s`` / ``openslide_mp_per_s``
  (both cached), ``ratio_vs_openslide_nocache`` (both uncached), ``ratio_vs_raw_decode``
  = ``nocache_mp_per_s`` / ``raw_decode_mp_per_s`` (both decode every tile) and
  ``dask_ratio_vs_raw_decode``;
- the ratios and whether the :data:`TARGETS` are met.

Two passes over the same regions: the first runs our reader alone (for its memory); the
second runs every method on each region in turn, so that drifts in machine speed (shared
or throttled CPUs) hit all methods alike, and gives all the throughputs and ratios.
Warm-up reads (other random regions) run before each pass and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TARGETS", "measure_file", "run_read_benchmark"]

#: what a good reader achieves (checked per file; RSS is meant for the 100k × 80k slide)
TARGETS: dict[str, float] = {
    "open_s_max": 0.5,
    "peak_rss_mb_max": 400.0,
    "ratio_vs_openslide_min": 1.5,
    "ratio_vs_raw_decode_min": 0.7,
}
#: warm-up reads per method, at regions other than the timed ones
N_WARMUP = 3
#: size of the generated slide (``generate=``)
GENERATED_SHAPE = (80_000, 100_000)
#: a subprocess that takes longer than this is reported as failed
SUBPROCESS_TIMEOUT_S = 1800


def run_read_benchmark(
    paths: Sequence[str | os.PathLike[str]],
    *,
    n_reads: int = 200,
    region: int = 512,
    seed: int = 0,
    generate: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Benchmark opening and random region reads of each file against OpenSlide.

    Parameters
    ----------
    paths : sequence of str or Path
        Slides to measure, each in its own subprocess.
    n_reads : int, keyword-only
        Timed random regions per file and method (the same regions for all methods).
    region : int, keyword-only
        Region edge in pixels (clipped to the level-0 size of small files).
    seed : int, keyword-only
        Seed of the random regions.
    generate : str or Path, optional, keyword-only
        Also measure a 100 000 × 80 000 synthetic slide at this path, first written
        with :func:`~napari_histo_ai.io.synthetic.make_slide` if it does not exist.
    source : str or Path, optional, keyword-only
        Source slide for ``generate``. Default: a ``CMU-1*`` file among ``paths``,
        else the first of ``paths``.

    Returns
    -------
    dict
        ``{"files": [one dict per file], "machine": {...}, "targets": TARGETS,
        "settings": {...}}``, JSON-serialisable. A file whose measurement failed has
        an ``"error"`` entry instead of numbers.
    """
    if n_reads < 1:
        raise ValueError(f"n_reads {n_reads!r} is invalid: expected at least 1")
    if region < 1:
        raise ValueError(f"region {region!r} is invalid: expected at least 1 pixel")
    files = [Path(p).expanduser() for p in paths]
    generated: dict[str, Any] = {}
    if generate is not None:
        target = Path(generate).expanduser()
        generated = {"path": str(target), "existed": target.exists()}
        if not target.exists():
            from ..io.synthetic import make_slide

            src = Path(source) if source is not None else _default_source(files)
            start = time.perf_counter()
            make_slide(target, width=GENERATED_SHAPE[1], height=GENERATED_SHAPE[0], source=src)
            generated["make_slide_s"] = round(time.perf_counter() - start, 3)
            generated["source"] = str(src)
        files.append(target)
    results = []
    for path in files:
        result = _measure_in_subprocess(path, n_reads=n_reads, region=region, seed=seed)
        if generate is not None and path == files[-1]:
            result["generated"] = generated
        results.append(result)
    return {
        "files": results,
        "machine": machine_info(),
        "targets": dict(TARGETS),
        "settings": {"n_reads": n_reads, "region": region, "seed": seed, "n_warmup": N_WARMUP},
    }


def _default_source(files: list[Path]) -> Path:
    """A CMU-1 slide among ``files``, else the packaged sample slide (real H&E pixels)."""
    from importlib.resources import files as package_files

    for f in files:
        if f.name.startswith("CMU-1"):
            return f
    return Path(str(package_files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")))


def _measure_in_subprocess(path: Path, *, n_reads: int, region: int, seed: int) -> dict[str, Any]:
    """Run :func:`measure_file` in a fresh interpreter; its JSON is the last stdout line."""
    cmd = [
        sys.executable,
        "-m",
        "napari_histo_ai.bench.read",
        "--one",
        str(path),
        "--reads",
        str(n_reads),
        "--region",
        str(region),
        "--seed",
        str(seed),
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return {"path": str(path), "error": f"timed out after {SUBPROCESS_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"path": str(path), "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ----------------------------------------------------------------------- one file
def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _ru_maxrss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB.

    Linux keeps it across ``exec``: in a subprocess it is at least the parent's RSS at
    the fork, so :func:`_peak_rss_mb` prefers the process's own high-water mark.
    """
    import resource

    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _peak_rss_mb() -> float:
    """Peak RSS of this process in MiB: ``VmHWM`` (Linux, reset by exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _ru_maxrss_mb()


def _regions(
    shape: tuple[int, int], n: int, edge: int, seed: int
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """``n`` random (row, column) corners of (h, w) regions inside ``shape``."""
    import numpy as np

    h, w = min(edge, shape[0]), min(edge, shape[1])
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, shape[0] - h + 1, size=n)
    xs = rng.integers(0, shape[1] - w + 1, size=n)
    return [(int(y), int(x)) for y, x in zip(ys, xs, strict=True)], (h, w)


def measure_file(
    path: str | os.PathLike[str], *, n_reads: int = 200, region: int = 512, seed: int = 0
) -> dict[str, Any]:
    """Measure one file in this process (meant for a fresh subprocess).

    Parameters
    ----------
    path : str or Path
        The slide.
    n_reads, region, seed : int, keyword-only
        As in :func:`run_read_benchmark`.

    Returns
    -------
    dict
        The per-file entry of :func:`run_read_benchmark`.
    """
    path = Path(path)
    out: dict[str, Any] = {"path": str(path), "file_mb": round(path.stat().st_size / 2**20, 3)}

    start = time.perf_counter()
    import dask.array  # noqa: F401 - imports are not part of the open time
    import numpy as np
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from ..io import open_image

    out["import_s"] = round(time.perf_counter() - start, 4)
    out["rss_baseline_mb"] = round(_rss_mb(), 1)

    start = time.perf_counter()
    pyramid = open_image(path)
    info = pyramid.info()
    out["open_s"] = round(time.perf_counter() - start, 4)
    out["rss_after_open_mb"] = round(_rss_mb(), 1)
    out["peak_rss_after_open_mb"] = round(_peak_rss_mb(), 1)
    out["ru_maxrss_after_open_mb"] = round(_ru_maxrss_mb(), 1)
    out.update(
        backend=info["backend"],
        format=info["format"],
        n_levels=len(info["levels"]),
        levels=info["levels"],
        mpp=info["mpp"],
    )
    level = pyramid.levels[0]
    out["chunks"] = [int(max(c)) for c in level.chunks]
    shape = (int(level.shape[0]), int(level.shape[1]))
    corners, (h, w) = _regions(shape, N_WARMUP + n_reads, region, seed)
    warmup, timed = corners[:N_WARMUP], corners[N_WARMUP:]
    out["region"] = [h, w]
    megapixels = len(timed) * h * w / 1e6

    ours = _fast_reader(pyramid, (h, w))

    # pass 1: our reader alone (decoded-tile cache on, as users get it), for its memory
    out["first_pass_read_s"] = _time_reads(ours, warmup, timed)
    out["rss_after_reads_mb"] = round(_rss_mb(), 1)
    out["peak_rss_after_reads_mb"] = round(_peak_rss_mb(), 1)
    out["ru_maxrss_after_reads_mb"] = round(_ru_maxrss_mb(), 1)

    # pass 2: every method on each region in turn, so that drifts in machine speed
    # (shared or throttled CPUs) hit all methods alike and the ratios stay fair.
    # Decode-only figures use a second pyramid with the tile cache off: its read_region
    # and its dask level decode every tile of every region, like raw decoding does.
    bare = open_image(path, tile_cache_bytes=0)
    bare_level = bare.levels[0]
    noop = _noop_like(level)
    methods: dict[str, Any] = {
        "ours": ours,
        "ours_nocache": _fast_reader(bare, (h, w)),
        "dask": lambda y, x: np.asarray(bare_level[y : y + h, x : x + w]),
        "dask_noop": lambda y, x: np.asarray(noop[y : y + h, x : x + w]),
    }
    closers: list[Any] = [pyramid.close, bare.close]
    try:
        for name, cache in (("openslide", None), ("openslide_nocache", 0)):
            try:
                read, close = _openslide_reader(path, (h, w), cache_bytes=cache)
            except Exception as exc:  # not readable by OpenSlide (or no wsi extra)
                out["openslide_error"] = f"{type(exc).__name__}: {exc}"
                break
            methods[name] = read
            closers.append(close)
        try:
            raw_read, raw_info = _raw_decoder(path, timed, (h, w))
        except Exception as exc:  # not a TIFF, or a compression we do not decode raw
            out["raw_decode_error"] = f"{type(exc).__name__}: {exc}"
        else:
            methods["raw_decode"] = raw_read
            out.update(raw_info)
        seconds = _time_interleaved(methods, warmup, timed, out)
    finally:
        for close in closers:
            close()

    def rate(name: str) -> float | None:
        return round(megapixels / seconds[name], 3) if name in seconds else None

    def ms(name: str) -> float | None:
        return round(seconds[name] / len(timed) * 1e3, 3) if name in seconds else None

    out["read_s"] = round(seconds["ours"], 5)
    out["mp_per_s"] = rate("ours")
    out["ms_per_region"] = ms("ours")
    out["nocache_mp_per_s"] = rate("ours_nocache")
    out["dask_mp_per_s"] = rate("dask")
    out["dask_ms_per_region"] = ms("dask")
    out["dask_noop_ms_per_region"] = ms("dask_noop")
    out["openslide_mp_per_s"] = rate("openslide")
    out["openslide_nocache_mp_per_s"] = rate("openslide_nocache")
    out["raw_decode_mp_per_s"] = rate("raw_decode")
    out["raw_decode_ms_per_region"] = ms("raw_decode")
    # like for like: both with their tile caches; both decoding every tile
    out["ratio_vs_openslide"] = _ratio(out["mp_per_s"], out["openslide_mp_per_s"])
    out["ratio_vs_openslide_nocache"] = _ratio(
        out["nocache_mp_per_s"], out["openslide_nocache_mp_per_s"]
    )
    out["ratio_vs_raw_decode"] = _ratio(out["nocache_mp_per_s"], out["raw_decode_mp_per_s"])
    out["dask_ratio_vs_raw_decode"] = _ratio(out["dask_mp_per_s"], out["raw_decode_mp_per_s"])
    out["targets_met"] = _targets_met(out)
    return out


def _time_interleaved(
    methods: dict[str, Any],
    warmup: list[tuple[int, int]],
    timed: list[tuple[int, int]],
    out: dict[str, Any],
) -> dict[str, float]:
    """Total seconds per method over ``timed``, running all methods on each region in turn.

    A method that fails is dropped (its error goes to ``out["<name>_error"]``).
    """
    for name, read in list(methods.items()):
        try:
            for y, x in warmup:
                read(y, x)
        except Exception as exc:  # e.g. a read_region API this benchmark does not know
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            del methods[name]
    totals = dict.fromkeys(methods, 0.0)
    clock = time.perf_counter
    for y, x in timed:
        for name, read in methods.items():
            start = clock()
            read(y, x)
            totals[name] += clock() - start
    return totals


def _fast_reader(pyramid: Any, size: tuple[int, int]) -> Any:
    """``Pyramid.read_region`` at level 0: (row, column) and (height, width) in pixels.

    Backends with a direct tile decoder (tifffile) bypass dask there; others slice the
    dask level, so the figure is always the best path a consumer (tiling) can take.
    """
    return lambda y, x: pyramid.read_region((y, x), size, level=0)


class _NoopChunks:
    """An array-like whose chunks cost (almost) nothing: isolates dask's overhead."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = shape
        self.dtype = dtype
        self.ndim = len(shape)

    def __getitem__(self, key: tuple[slice, ...]) -> Any:
        import numpy as np

        return np.empty(tuple(k.stop - k.start for k in key), dtype=self.dtype)


def _noop_like(level: Any) -> Any:
    import dask.array as da
    import numpy as np

    shape = tuple(int(s) for s in level.shape)
    return da.from_array(
        _NoopChunks(shape, level.dtype),
        chunks=level.chunks,
        asarray=False,
        fancy=False,
        lock=False,
        inline_array=True,
        meta=np.empty((0,) * len(shape), dtype=level.dtype),
        name="bench-noop-chunks",
    )


def _ratio(a: float, b: float | None) -> float | None:
    return None if not b else round(a / b, 3)


def _targets_met(out: dict[str, Any]) -> dict[str, bool | None]:
    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else bool(value >= bound)

    return {
        "open_s": bool(out["open_s"] < TARGETS["open_s_max"]),
        "peak_rss_mb": bool(out["peak_rss_after_reads_mb"] < TARGETS["peak_rss_mb_max"]),
        "ratio_vs_openslide": at_least(
            out["ratio_vs_openslide"], TARGETS["ratio_vs_openslide_min"]
        ),
        "ratio_vs_raw_decode": at_least(
            out["ratio_vs_raw_decode"], TARGETS["ratio_vs_raw_decode_min"]
        ),
    }


def _time_reads(read: Any, warmup: list[tuple[int, int]], timed: list[tuple[int, int]]) -> float:
    for y, x in warmup:
        read(y, x)
    start = time.perf_counter()
    for y, x in timed:
        read(y, x)
    return round(time.perf_counter() - start, 5)


def _openslide_reader(
    path: Path, size: tuple[int, int], *, cache_bytes: int | None = None
) -> tuple[Any, Any]:
    """``(read(y, x), close)`` over an OpenSlide handle (default cache or ``cache_bytes``)."""
    import numpy as np
    import openslide

    h, w = size
    slide = openslide.OpenSlide(str(path))
    if cache_bytes is not None:
        slide.set_cache(openslide.OpenSlideCache(cache_bytes))

    def read(y: int, x: int) -> np.ndarray:
        return np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))

    return read, slide.close


def _raw_decoder(
    path: Path, corners: list[tuple[int, int]], size: tuple[int, int]
) -> tuple[Any, dict[str, Any]]:
    """``read(y, x)`` decoding exactly the level-0 tiles covering the region, one thread.

    The tiles' bytes are read from the file here, beforehand (``raw_read_s``), so that
    ``read`` times imagecodecs alone. Warm-up corners outside ``corners`` are decoded
    from bytes read on the spot.
    """
    import math

    import imagecodecs
    import tifffile

    h, w = size
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        if not page.is_tiled:
            raise ValueError("level 0 is not tiled")
        th, tw = int(page.tilelength), int(page.tilewidth)
        cols = math.ceil(page.imagewidth / tw)
        offsets = [int(v) for v in page.dataoffsets]
        counts = [int(v) for v in page.databytecounts]
        decode = _tile_decoder(page, imagecodecs, tifffile)
        compression = str(getattr(page.compression, "name", page.compression))
    fd = os.open(path, os.O_RDONLY)
    try:

        def tiles(y: int, x: int) -> list[bytes]:
            return [
                os.pread(fd, counts[i], offsets[i])
                for r in range(y // th, (y + h - 1) // th + 1)
                for c in range(x // tw, (x + w - 1) // tw + 1)
                for i in (r * cols + c,)
            ]

        start = time.perf_counter()
        prepared = {corner: tiles(*corner) for corner in corners}
        read_s = time.perf_counter() - start
    finally:
        os.close(fd)

    def read(y: int, x: int) -> None:
        segments = prepared.get((y, x))
        if segments is None:  # a warm-up region
            with open(path, "rb") as fh:
                segments = []
                for r in range(y // th, (y + h - 1) // th + 1):
                    for c in range(x // tw, (x + w - 1) // tw + 1):
                        fh.seek(offsets[r * cols + c])
                        segments.append(fh.read(counts[r * cols + c]))
        for data in segments:
            decode(data)

    n_tiles = sum(len(v) for v in prepared.values())
    return read, {
        "raw_read_s": round(read_s, 5),
        "raw_tiles_per_region": round(n_tiles / max(1, len(prepared)), 2),
        "tile": [th, tw],
        "compression": compression,
    }


def _tile_decoder(page: Any, imagecodecs: Any, tifffile: Any) -> Any:
    """A one-argument decoder of the page's tiles, straight to imagecodecs when possible."""
    compression = int(page.compression)
    shape = (int(page.tilelength), int(page.tilewidth))
    if compression == 7:
        colorspace, outcolorspace = tifffile.tifffile.jpeg_decode_colorspace(
            page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
        )
        tables, header = page.jpegtables, page.jpegheader

        def jpeg(data: bytes) -> Any:
            return imagecodecs.jpeg_decode(
                data,
                tables=tables,
                header=header,
                colorspace=colorspace,
                outcolorspace=outcolorspace,
                shape=shape,
            )

        return jpeg
    if compression in (33003, 33004, 33005, 34712):
        return imagecodecs.jpeg2k_decode

    def generic(data: bytes) -> Any:
        return page.decode(data, 0, jpegtables=page.jpegtables)[0]

    return generic


# ----------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU, memory and library versions of this machine."""
    import psutil

    versions: dict[str, str | None] = {}
    for name in ("numpy", "dask", "zarr", "tifffile", "imagecodecs", "openslide"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except Exception:
            versions[name] = None
    try:
        import openslide

        versions["openslide_library"] = str(openslide.__library_version__)
    except Exception:
        versions["openslide_library"] = None
    return {
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
    }


# ------------------------------------------------------------- the per-file subprocess
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_histo_ai.bench.read --one PATH``: measure one file, print JSON.

    Internal: :func:`run_read_benchmark` runs it so each file starts in a fresh process.
    Users run ``napari-histo-ai bench read`` or ``benchmarks/bench_read.py``.
    """
    parser = argparse.ArgumentParser(prog="python -m napari_histo_ai.bench.read")
    parser.add_argument("--one", metavar="PATH", required=True)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--region", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = measure_file(args.one, n_reads=args.reads, region=args.region, seed=args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
