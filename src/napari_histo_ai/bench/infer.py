"""Inference benchmark: engine throughput against the bare model, memory, GUI stalls.

``napari-histo-ai bench infer PATH [--model NAME] [--generate]`` (or
``benchmarks/bench_infer.py``) measures, in one run:

- ``bare_tiles_per_s``: the network alone (``predictor(batch)``) on batches that were
  read, resampled and normalised beforehand and already sit on the device: the limit
  of any engine on this device, at the same batch size, on the same tiles (recorded
  from a warm-up engine run over the region below);
- ``engine_tiles_per_s``: `run_model_sync` over a region at the centre of ``PATH``
  covering about ``n_tiles`` tiles (``RunConfig(roi=..., tissue=False)``), into a
  temporary folder, from a freshly opened image (cold tile cache), wall-clock
  including the run's setup and its writes; ``engine_mp_per_s``: level-0 megapixels
  of that region per second; ``ratio_vs_bare`` = engine / bare. Engine and bare runs
  alternate ``repeats`` times (so drifts of a shared machine hit both) and the best
  of each counts;
- ``peak_rss_mb_small`` / ``peak_rss_mb_large``: peak RSS (``VmHWM``) of a fresh
  process running the engine (``tissue=False``) over the whole of a generated
  10 000 × 10 000 slide, then over a 100 000 × 100 000 slide (made with
  `napari_histo_ai.io.synthetic.make_slide` in ``bench_dir`` when ``generate`` is
  set, reused when present). The large run stops (``cancel``) after
  ``LARGE_TILES_FACTOR`` × the small run's tiles, reported as ``large_tiles_run``:
  the engine's memory is meant to plateau, and what would still grow with the slide
  (per-tile bookkeeping, the output arrays' metadata) is set up for the whole slide
  before the first tile. ``rss_ratio_large_vs_small`` = large / small;
- ``max_gui_stall_ms``: the longest gap, minus the timer interval, between ticks of a
  5 ms ``QTimer`` while `run_model` runs in a napari thread worker over the same
  region (`napari_histo_ai.widgets._stall`, in a subprocess with
  ``QT_QPA_PLATFORM=offscreen``; ``null`` with ``gui_stall_error`` when Qt is
  unavailable);
- ``device`` (plus ``gpu`` with its name and memory on CUDA), ``model``,
  ``batch_size``, ``tiles``, and ``targets_met`` against `TARGETS`.

The default model is the packaged ``nuclei-unet``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFoundError
from ..models.loading import Predictor
from .read import _peak_rss_mb, machine_info

if TYPE_CHECKING:
    import torch

    from ..io.pyramid import Pyramid
    from ..models.spec import ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "TARGETS",
    "measure_rss",
    "region_for_tiles",
    "run_infer_benchmark",
]

#: the model benchmarked unless another is named
DEFAULT_MODEL = "nuclei-unet"
#: what a good engine achieves
TARGETS: dict[str, float] = {
    "ratio_vs_bare_min_cpu": 0.8,
    "ratio_vs_bare_min_gpu": 0.9,
    "rss_ratio_large_vs_small_max": 1.10,
    "max_gui_stall_ms_max": 100.0,
}
#: level-0 sides of the generated memory slides (small, large), pixels
SLIDE_SIZES = (10_000, 100_000)
#: the large memory run stops after this many times the small run's tiles
LARGE_TILES_FACTOR = 2
#: interval of the GUI timer, ms
STALL_INTERVAL_MS = 5
#: a subprocess that takes longer than this is reported as failed
SUBPROCESS_TIMEOUT_S = 3600


def run_infer_benchmark(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    generate: bool = False,
    n_tiles: int = 256,
    device: str = "auto",
    batch_size: int | None = None,
    repeats: int = 3,
    bench_dir: str | os.PathLike[str] = ".bench",
    source: str | os.PathLike[str] | None = None,
    slide_sizes: tuple[int, int] = SLIDE_SIZES,
    gui: bool = True,
) -> dict[str, Any]:
    """Benchmark the inference engine against the bare model; memory; GUI stalls.

    Parameters
    ----------
    path : str or Path
        Slide whose centre region is timed.
    model : str, optional, keyword-only
        A registered model; default `DEFAULT_MODEL`.
    generate : bool, keyword-only
        Write the memory slides into ``bench_dir`` if absent (else memory figures are
        ``null`` with ``rss_error`` when they are missing).
    n_tiles : int, keyword-only
        About how many tiles the timed region covers (the count run is ``tiles``).
    device : str, keyword-only
        ``"auto"``, ``"cpu"``, ``"cuda"``, ... (see
        `napari_histo_ai.models.loading.resolve_device`).
    batch_size : int, optional, keyword-only
        Tiles per forward pass; default: the engine's choice for the device.
    repeats : int, keyword-only
        Alternating engine / bare timings; the best of each counts.
    bench_dir : str or Path, keyword-only
        Folder of the memory slides ``infer-<side>.tif``.
    source : str or Path, optional, keyword-only
        Real slide the memory slides are tiled from; default the bundled sample.
    slide_sizes : (int, int), keyword-only
        Sides of the small and large memory slides, level-0 pixels.
    gui : bool, keyword-only
        Measure the GUI stall (needs Qt); else it is ``null``.

    Returns
    -------
    dict
        JSON-serialisable; see the module docstring for the keys.

    Raises
    ------
    ModelNotFoundError
        The model is not registered (the message lists the available ones).
    ValueError
        ``n_tiles`` or ``repeats`` below 1.
    """
    import torch

    from ..inference.engine import RunConfig, run_model_sync
    from ..io import open_image
    from ..models.loading import load_model

    if n_tiles < 1:
        raise ValueError(f"n_tiles {n_tiles!r} is invalid: expected at least 1")
    if repeats < 1:
        raise ValueError(f"repeats {repeats!r} is invalid: expected at least 1")
    path = Path(path).expanduser()
    spec = _bench_spec(model)
    predictor = load_model(spec, device=device)
    pyramid = open_image(path)
    try:
        roi = region_for_tiles(pyramid, spec, n_tiles)
        h0, w0 = pyramid.spatial_shape(0)[-2:]
    finally:
        pyramid.close()
    clipped = (min(h0, roi[0] + roi[2]) - roi[0]) * (min(w0, roi[1] + roi[3]) - roi[1])
    megapixels = clipped / 1e6

    out: dict[str, Any] = {
        "path": str(path),
        "model": spec.name,
        "model_version": spec.version,
        "device": str(predictor.device),
        "gpu": _gpu_info(predictor.device),
        "torch_threads": torch.get_num_threads(),
        "roi": list(roi),
    }
    with tempfile.TemporaryDirectory(prefix="histo-bench-infer-") as tmp:
        work = Path(tmp)
        # warm-up engine run: records the normalised batches for the bare timings
        recorder = _Recorder(predictor)
        config = RunConfig(roi=roi, tissue=False, batch_size=batch_size, resume=False)
        pyramid = open_image(path)
        try:
            warm = run_model_sync(pyramid, recorder, work / "warmup.zarr", config=config)
        finally:
            pyramid.close()
        batch_size = int(warm.summary["batch_size"])
        tiles = warm.tiles_done
        config = RunConfig(roi=roi, tissue=False, batch_size=batch_size, resume=False)
        batches = recorder.batches
        _time_bare(predictor, batches[:1])  # warm-up
        engine_s: list[float] = []
        bare_s: list[float] = []
        stages: dict[str, Any] = {}
        for k in range(repeats):
            pyramid = open_image(path)  # cold tile cache, as a user's first pass
            try:
                start = time.perf_counter()
                result = run_model_sync(pyramid, predictor, work / f"run{k}.zarr", config=config)
                engine_s.append(time.perf_counter() - start)
            finally:
                pyramid.close()
            if engine_s[-1] == min(engine_s):
                stages = {key: result.summary[key] for key in ("read_s", "model_s", "write_s")}
            bare_s.append(_time_bare(predictor, batches))
        recorded = sum(int(b.shape[0]) for b in batches)

    engine_rate = tiles / min(engine_s) if min(engine_s) > 0 else None
    bare_rate = recorded / min(bare_s) if min(bare_s) > 0 else None
    out.update(
        batch_size=batch_size,
        tiles=tiles,
        repeats=repeats,
        engine_s=[round(v, 4) for v in engine_s],
        bare_s=[round(v, 4) for v in bare_s],
        engine_stages_s=stages,
        engine_tiles_per_s=_round(engine_rate),
        engine_mp_per_s=_round(megapixels / min(engine_s) if min(engine_s) > 0 else None),
        bare_tiles_per_s=_round(bare_rate),
        ratio_vs_bare=_ratio(engine_rate, bare_rate),
    )
    del batches, recorder

    out.update(
        _memory_runs(
            spec.name,
            device=device,
            batch_size=batch_size,
            generate=generate,
            bench_dir=Path(bench_dir).expanduser(),
            source=source,
            sizes=slide_sizes,
        )
    )
    if gui:
        out.update(
            _gui_stall(path, spec.name, n_tiles=n_tiles, device=device, batch_size=batch_size)
        )
    else:
        out.update(max_gui_stall_ms=None, gui_stall_error="not measured (gui=False)")
    out["targets"] = dict(TARGETS)
    out["targets_met"] = _targets_met(out, gpu=predictor.device.type == "cuda")
    out["machine"] = machine_info()
    return out


# ----------------------------------------------------------------------------- model
def _bench_spec(model: str | None) -> ModelSpec:
    from ..models.registry import load_registry

    registry = load_registry()
    if model is not None:
        return registry.get(model)
    if DEFAULT_MODEL not in registry:
        available = ", ".join(registry.names()) or "none"
        raise ModelNotFoundError(
            f"the inference benchmark's default model '{DEFAULT_MODEL}' is not registered; "
            f"available: {available}. Pass --model NAME (see `napari-histo-ai models`)"
        )
    return registry.get(DEFAULT_MODEL)


class _Recorder(Predictor):
    """A predictor that keeps (a copy of) every batch it is given, then runs the model."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.device = inner.device
        self.batches: list[torch.Tensor] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.detach().to(self.device).clone())
        return self.inner(batch)

    def check(self) -> None:
        self.inner.check()


def _time_bare(predictor: Predictor, batches: Sequence[torch.Tensor]) -> float:
    """Seconds of ``predictor(batch)`` over ``batches`` (already on the device)."""
    import torch

    cuda = predictor.device.type == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize(predictor.device)
        start = time.perf_counter()
        for batch in batches:
            predictor(batch)
        if cuda:
            torch.cuda.synchronize(predictor.device)
    return time.perf_counter() - start


def region_for_tiles(
    pyramid: Pyramid, spec: ModelSpec, n_tiles: int
) -> tuple[float, float, float, float]:
    """A region at the image's centre that the engine covers with about ``n_tiles`` tiles.

    Parameters
    ----------
    pyramid : Pyramid
        The image.
    spec : ModelSpec
        The model (its patch, halo, overlap and µm/px set the tile stride).
    n_tiles : int
        Wanted tiles, laid out as ``ceil(sqrt(n))`` rows.

    Returns
    -------
    (top, left, height, width)
        Level-0 pixels, on the engine's tile grid so that exactly ``rows × columns``
        tiles meet it when it lies inside the image (fewer when the image is smaller).
    """
    # the engine's own choice of level and resampling (one source of truth)
    from ..inference.engine import RunConfig, _plan

    io = spec.io
    plan = _plan(pyramid, spec, RunConfig())
    to0 = (  # level-0 px per model px
        plan.factor[0] * plan.level_downsample[0],
        plan.factor[1] * plan.level_downsample[1],
    )
    if spec.dense:
        stride = io.patch_size - 2 * io.halo - io.overlap
        overlap = io.overlap
    else:
        stride = max(1, io.patch_size - io.overlap)
        overlap = 0
    rows = math.ceil(math.sqrt(n_tiles))
    cols = math.ceil(n_tiles / rows)
    h0, w0 = pyramid.spatial_shape(0)[-2:]
    box: list[float] = []
    for side, k, scale in ((h0, rows, to0[0]), (w0, cols, to0[1])):
        centre = side / scale / 2  # model px
        first = max(0, round(centre / stride - k / 2))
        # tile `first + k` starts keeping at (first + k) * stride - overlap: stop before it
        length = max(1.0, k * stride - overlap - 1)
        box += [first * stride * scale, length * scale]
    return (box[0], box[2], box[1], box[3])


def _gpu_info(device: torch.device) -> dict[str, Any] | None:
    import torch

    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "torch_cuda": torch.version.cuda,
        "bf16_autocast": bool(torch.cuda.is_bf16_supported()),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


# ----------------------------------------------------------------------------- memory
def _sample_slide() -> Path:
    from importlib.resources import files

    return Path(str(files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")))


def _memory_slide(
    bench_dir: Path, side: int, *, generate: bool, source: str | os.PathLike[str] | None
) -> tuple[Path, str | None]:
    """The memory slide of this side (generated when asked), or an error line."""
    target = bench_dir / f"infer-{side}.tif"
    if target.is_file():
        return target, None
    if not generate:
        return target, f"{target} does not exist; run with --generate to make it"
    from ..io.synthetic import make_slide

    bench_dir.mkdir(parents=True, exist_ok=True)
    make_slide(
        target,
        width=side,
        height=side,
        source=Path(source) if source is not None else _sample_slide(),
    )
    return target, None


def _memory_runs(
    model: str,
    *,
    device: str,
    batch_size: int,
    generate: bool,
    bench_dir: Path,
    source: str | os.PathLike[str] | None,
    sizes: tuple[int, int],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "peak_rss_mb_small": None,
        "peak_rss_mb_large": None,
        "rss_ratio_large_vs_small": None,
        "small_slide": None,
        "large_slide": None,
        "small_tiles_run": None,
        "large_tiles_run": None,
    }
    errors = []
    max_tiles: int | None = None
    for name, side in zip(("small", "large"), sizes, strict=True):
        slide, error = _memory_slide(bench_dir, side, generate=generate, source=source)
        out[f"{name}_slide"] = {"path": str(slide), "side": side}
        if error is None:
            with tempfile.TemporaryDirectory(prefix="histo-bench-rss-") as tmp:
                result = _in_subprocess(
                    "napari_histo_ai.bench.infer",
                    [
                        "--rss",
                        str(slide),
                        "--model",
                        model,
                        "--device",
                        device,
                        "--batch-size",
                        str(batch_size),
                        "--out",
                        str(Path(tmp) / "run.zarr"),
                        *(["--max-tiles", str(max_tiles)] if max_tiles else []),
                    ],
                )
            error = result.get("error")
        if error is not None:
            errors.append(f"{name}: {error}")
            break
        out[f"{name}_slide"].update(result)
        out[f"peak_rss_mb_{name}"] = result["peak_rss_mb"]
        out[f"{name}_tiles_run"] = result["tiles_run"]
        max_tiles = LARGE_TILES_FACTOR * int(result["tiles_run"])
    out["rss_ratio_large_vs_small"] = _ratio(out["peak_rss_mb_large"], out["peak_rss_mb_small"])
    if errors:
        out["rss_error"] = "; ".join(errors)
    return out


def measure_rss(
    path: str | os.PathLike[str],
    model: str,
    *,
    out: str | os.PathLike[str],
    device: str = "auto",
    batch_size: int | None = None,
    max_tiles: int | None = None,
) -> dict[str, Any]:
    """Run the engine over a whole slide in this process; its peak RSS.

    Meant for a fresh process (``python -m napari_histo_ai.bench.infer --rss PATH``),
    so that the peak is this run's alone.

    Parameters
    ----------
    path : str or Path
        The slide.
    model : str
        A registered model.
    out : str or Path, keyword-only
        The run folder to write.
    device : str, keyword-only
    batch_size : int, optional, keyword-only
    max_tiles : int, optional, keyword-only
        Stop (``cancel``) once this many tiles are done.

    Returns
    -------
    dict
        ``peak_rss_mb`` (``VmHWM``, MiB), ``peak_rss_before_run_mb`` (after imports,
        model and image loading), ``tiles_total``, ``tiles_run``, ``complete``,
        ``wall_s``, ``image_shape``.
    """
    from ..inference.engine import Progress, RunConfig, run_model_sync
    from ..io import open_image
    from ..models.loading import load_model
    from ..models.registry import load_registry

    predictor = load_model(load_registry().get(model), device=device)
    pyramid = open_image(Path(path))
    before = _peak_rss_mb()
    cancel = threading.Event()

    def stop_after(p: Progress) -> None:
        if max_tiles is not None and p.done >= max_tiles:
            cancel.set()

    start = time.perf_counter()
    try:
        result = run_model_sync(
            pyramid,
            predictor,
            Path(out),
            config=RunConfig(tissue=False, batch_size=batch_size, resume=False),
            cancel=cancel,
            on_progress=stop_after,
        )
    finally:
        pyramid.close()
    return {
        "image_shape": result.summary["image_shape"],
        "tiles_total": result.tiles_total,
        "tiles_run": result.tiles_done,
        "complete": result.complete,
        "wall_s": round(time.perf_counter() - start, 3),
        "peak_rss_before_run_mb": round(before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


# ----------------------------------------------------------------------------- GUI
def _gui_stall(
    path: Path, model: str, *, n_tiles: int, device: str, batch_size: int
) -> dict[str, Any]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = _in_subprocess(
        "napari_histo_ai.widgets._stall",
        [
            str(path),
            "--model",
            model,
            "--tiles",
            str(n_tiles),
            "--device",
            device,
            "--batch-size",
            str(batch_size),
            "--interval-ms",
            str(STALL_INTERVAL_MS),
        ],
        env=env,
    )
    error = result.pop("error", None)
    if error is not None or result.get("max_gui_stall_ms") is None:
        return {"max_gui_stall_ms": None, "gui_stall_error": error or "no figure returned"}
    return {"max_gui_stall_ms": result["max_gui_stall_ms"], "gui_stall": result}


# ----------------------------------------------------------------------------- helpers
def _in_subprocess(
    module: str, args: list[str], *, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module args``; its JSON is the last stdout line (else an error)."""
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {SUBPROCESS_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except ValueError:
        return {"error": f"no JSON on the last line: {lines[-1][:200]}"}
    return result


def _targets_met(out: dict[str, Any], *, gpu: bool) -> dict[str, bool | None]:
    ratio_min = TARGETS["ratio_vs_bare_min_gpu" if gpu else "ratio_vs_bare_min_cpu"]

    def check(value: float | None, ok: Any) -> bool | None:
        return None if value is None else bool(ok(value))

    return {
        "ratio_vs_bare": check(out["ratio_vs_bare"], lambda v: v >= ratio_min),
        "rss_ratio_large_vs_small": check(
            out["rss_ratio_large_vs_small"],
            lambda v: v <= TARGETS["rss_ratio_large_vs_small_max"],
        ),
        "max_gui_stall_ms": check(
            out["max_gui_stall_ms"], lambda v: v < TARGETS["max_gui_stall_ms_max"]
        ),
    }


# ----------------------------------------------------------------------------- subprocess
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_histo_ai.bench.infer --rss PATH --model NAME --out RUN.zarr``.

    Internal: `run_infer_benchmark` runs it so each memory run starts in a fresh
    process. Users run ``napari-histo-ai bench infer`` or ``benchmarks/bench_infer.py``.
    """
    parser = argparse.ArgumentParser(prog="python -m napari_histo_ai.bench.infer")
    parser.add_argument("--rss", metavar="PATH", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-tiles", type=int, default=None)
    args = parser.parse_args(argv)
    result = measure_rss(
        args.rss,
        args.model,
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
        max_tiles=args.max_tiles,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
