"""The report benchmark: how long a report takes once the model runs exist.

``napari-histo-ai bench report`` (or ``benchmarks/bench_report.py``) makes the model
runs of a slide once (the bundled CMU-1 sample and the default H&E panel unless told
otherwise), then builds the report from those runs ``repeats`` times and reports, in
seconds (median over the repeats):

* ``report_s``: the whole `make_report` from existing runs (reused, not recomputed), and
  its steps ``measure_s``, ``thumbnail_s``, ``html_s``, ``pdf_s``, ``json_s``;
* the bare limits measured in the same run: ``read_thumbnail_s`` (reading the pyramid
  level the thumbnail is drawn from, raw), ``tissue_mask_s`` (the engine's tissue
  detector alone) and ``runs_wall_s`` (the model runs' own wall time, from their
  ``summary.json``);
* ratios: ``report_vs_runs`` (what the report adds on top of computing the runs),
  ``report_vs_bare_reads`` (report time / the two bare reads it cannot avoid).

Also: the sizes of the files written (bytes) and the report's key figures (mitoses per
10 HPF, tumour fraction, malignant score, magnification verdict), so a figure in
``docs/benchmarks.md`` can be traced to its numbers.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_report_benchmark"]


def _sample() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"


def run_report_benchmark(
    path: str | Path | None = None,
    *,
    models: Sequence[str] = (),
    repeats: int = 3,
    device: str = "cpu",
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Time a report built from existing runs against its bare limits.

    Parameters
    ----------
    path : str or Path, optional
        The slide (default: the bundled CMU-1 sample).
    models : sequence of str
        Models of the report (default: the panel for the image kind).
    repeats : int
        Report builds timed (the median is reported).
    device : str
        Device of the one-off model runs.
    work_dir : str or Path, optional
        Keep the runs and reports here (default: a temporary folder, removed).

    Returns
    -------
    dict
        See the module docstring.
    """
    from ..inference.tissue import tissue_mask
    from ..io import open_image
    from ..reports.content import ReportOptions
    from ..reports.job import ReportRequest, make_report
    from ..reports.measures import open_run
    from ..reports.thumbnail import read_overview

    slide = Path(path) if path is not None else _sample()
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench-report-")
        out = Path(tmp)
    else:
        out = Path(work_dir)
        out.mkdir(parents=True, exist_ok=True)
    try:
        options = ReportOptions()
        request = ReportRequest(images=(slide,), out_dir=out, models=tuple(models), device=device)
        t0 = time.perf_counter()
        first = make_report(request)
        first_s = time.perf_counter() - t0
        runs = first.runs
        runs_wall = sum(float((open_run(r).summary or {}).get("wall_s") or 0.0) for r in runs)
        from_runs = ReportRequest(images=(slide,), out_dir=out, runs=runs, device=device)
        totals: list[float] = []
        steps: dict[str, list[float]] = {}
        for _ in range(max(1, repeats)):
            marks: list[tuple[str, float]] = []

            def mark(p: Any, marks: list[tuple[str, float]] = marks) -> None:
                marks.append((p.step, time.perf_counter()))

            t0 = time.perf_counter()
            make_report(from_runs, on_progress=mark)
            end = time.perf_counter()
            totals.append(end - t0)
            for (step, t), nxt in zip(marks, [m[1] for m in marks[1:]] + [end], strict=True):
                steps.setdefault(step, []).append(nxt - t)
        bare_read: list[float] = []
        bare_tissue: list[float] = []
        for _ in range(max(1, repeats)):
            pyramid = open_image(slide)
            try:
                t0 = time.perf_counter()
                read_overview(pyramid, options.thumbnail_px)
                bare_read.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tissue_mask(pyramid)
                bare_tissue.append(time.perf_counter() - t0)
            finally:
                pyramid.close()
        report_s = statistics.median(totals)
        read_s = statistics.median(bare_read)
        tissue_s = statistics.median(bare_tissue)
        sizes = {k: Path(v).stat().st_size for k, v in first.files.items()}
        key: dict[str, Any] = {}
        rows = first.report.rows()
        if rows:
            row = rows[0]
            for name in (
                "tissue_mm2",
                "mitoses",
                "mitoses_per_mm2",
                f"mitoses_per_{options.hpf_count}hpf",
                "mitosis_hotspot",
                "tumour_fraction",
                "malignant_score",
                "malignant_mean_prob",
                "magnification_verdict",
            ):
                key[name] = row.get(name)
        result: dict[str, Any] = {
            "benchmark": "report",
            "slide": str(slide),
            "models": [open_run(r).model for r in runs],
            "repeats": max(1, repeats),
            "first_report_s": round(first_s, 3),
            "report_s": round(report_s, 3),
            **{
                f"{k}_s": round(statistics.median(v), 3)
                for k, v in steps.items()
                if k in ("measure", "thumbnail", "html", "pdf", "json")
            },
            "read_thumbnail_s": round(read_s, 4),
            "tissue_mask_s": round(tissue_s, 4),
            "runs_wall_s": round(runs_wall, 3),
            "report_vs_runs": round(report_s / runs_wall, 3) if runs_wall > 0 else None,
            "report_vs_bare_reads": round(report_s / (read_s + tissue_s), 2)
            if read_s + tissue_s > 0
            else None,
            "file_bytes": sizes,
            "figures": key,
            "summary": list(first.report.summary),
        }
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
