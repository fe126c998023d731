"""The cohort benchmark: a report per slide on a local Dask cluster vs one after another.

``napari-histo-ai bench cohort`` (or ``benchmarks/bench_cohort.py``) makes the same
reports twice, into two fresh folders:

1. **sequential** (the bare limit): `make_report` on each slide in this process, one
   after the other (torch uses every core);
2. **cohort**: `run_cohort` with a `distributed.LocalCluster` of ``workers``
   single-threaded processes (torch gets cores / workers threads each), cluster start
   and stop included.

Slides: the given files (e.g. the real slides of ``../shared/data/wsi``), or ``copies``
copies of a ``size`` × ``size`` px pyramidal TIFF tiled from the bundled CMU-1 sample
(real H&E at 0.499 µm/px). Reported (JSON): both wall times, per-slide times of the
sequential pass and of the cohort's tasks on their workers (``cohort_per_slide_s``:
model loading and, for a worker's first task, importing torch included), the cluster's
start-up alone (``cluster_start_s``: processes up, nothing imported yet), ``speedup``
(sequential / cohort), ``ratio_vs_sequential`` (its inverse), ``overhead_s`` (cohort
minus the ideal sequential / workers) and ``skip_s``: a second cohort call on the same
folder, where every slide is up to date and nothing runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .infer import _sample_slide
from .read import machine_info

__all__ = ["run_cohort_benchmark"]


def _copies(folder: Path, n: int, side: int) -> list[Path]:
    from ..io.synthetic import make_slide

    folder.mkdir(parents=True, exist_ok=True)
    first = make_slide(folder / "copy-01.tif", width=side, height=side, source=_sample_slide())
    slides = [first]
    for k in range(2, n + 1):
        slides.append(Path(shutil.copy(first, folder / f"copy-{k:02d}.tif")))
    return slides


def _cluster_start_s(workers: int) -> float:
    from ..inference.batch import dask_client

    start = time.perf_counter()
    with dask_client(None, workers) as client:
        client.wait_for_workers(workers)
    return time.perf_counter() - start


def run_cohort_benchmark(
    paths: Sequence[str | Path] = (),
    *,
    copies: int = 4,
    size: int = 1024,
    models: Sequence[str] = ("mitosis-fcn",),
    workers: int = 2,
    device: str = "cpu",
    formats: Sequence[str] = ("html", "pdf"),
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Time a cohort on a local cluster against the same reports made one by one.

    Parameters
    ----------
    paths : sequence of str or Path
        Slides to use; empty: ``copies`` synthetic copies.
    copies : int, keyword-only
        Synthetic slides made when ``paths`` is empty.
    size : int, keyword-only
        Their side, pixels (0.499 µm/px).
    models : sequence of str, keyword-only
        Models of every report (empty: the default panel).
    workers : int, keyword-only
        Workers of the local cluster.
    device : str, keyword-only
    formats : sequence of str, keyword-only
        Report formats written by both passes.
    work_dir : str or Path, optional, keyword-only
        Keep slides and outputs here (default: a temporary folder, removed).

    Returns
    -------
    dict
        JSON-able figures (see the module docstring).
    """
    from ..errors import HistoAIError
    from ..reports.cohort import STATUS_DONE, STATUS_SKIPPED, run_cohort
    from ..reports.job import ReportRequest, make_report

    if workers < 1 or copies < 1 or size < 256:
        raise HistoAIError(
            f"bench cohort: workers {workers}, copies {copies}, size {size} px are invalid "
            "(expected workers >= 1, copies >= 1, size >= 256)"
        )
    own = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="bench-cohort-")) if own else Path(str(work_dir))
    try:
        root.mkdir(parents=True, exist_ok=True)
        if paths:
            slides = [Path(p).expanduser().absolute() for p in paths]
        else:
            slides = _copies(root / "slides", copies, size)
        for folder in ("sequential", "cohort"):
            shutil.rmtree(root / folder, ignore_errors=True)

        per_slide = []
        start = time.perf_counter()
        for slide in slides:
            t0 = time.perf_counter()
            make_report(
                ReportRequest(
                    images=(slide,),
                    out_dir=root / "sequential",
                    models=tuple(models),
                    device=device,
                    formats=tuple(formats),
                )
            )
            per_slide.append(round(time.perf_counter() - t0, 2))
        sequential_s = time.perf_counter() - start

        options: dict[str, Any] = {
            "models": tuple(models),
            "device": device,
            "formats": tuple(formats),
        }
        start = time.perf_counter()
        result = run_cohort(slides, root / "cohort", local_cluster=workers, **options)
        cohort_s = time.perf_counter() - start
        table = json.loads(result.json.read_text(encoding="utf-8"))
        cohort_per_slide = [row.get("seconds") for row in table["slides"]]
        start = time.perf_counter()
        again = run_cohort(slides, root / "cohort", local_cluster=workers, **options)
        skip_s = time.perf_counter() - start
        start_s = _cluster_start_s(workers)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "cohort",
        "machine": machine_info(),
        "slides": [s.name for s in slides],
        "slide_px": None if paths else [size, size],
        "models": list(models) or "default panel",
        "device": device,
        "formats": list(formats),
        "workers": workers,
        "sequential_s": round(sequential_s, 2),
        "sequential_per_slide_s": per_slide,
        "cohort_s": round(cohort_s, 2),
        "cohort_per_slide_s": cohort_per_slide,
        "cluster_start_s": round(start_s, 2),
        "speedup": round(sequential_s / cohort_s, 3),
        "ratio_vs_sequential": round(cohort_s / sequential_s, 3),
        "overhead_s": round(cohort_s - sequential_s / workers, 2),
        "skip_s": round(skip_s, 2),
        "cohort_done": result.count(STATUS_DONE),
        "second_call_skipped": again.count(STATUS_SKIPPED),
        "failed": [f"{row['slide']}: {row['error']}" for row in result.failed],
    }
