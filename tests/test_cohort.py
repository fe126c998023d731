"""``napari-histo-ai batch`` / `run_cohort`: a report per slide and one cohort table.

Tiny user models on small synthetic slides (real H&E pixels at 0.499 µm/px) run through
the real `make_report`: the table's rows and columns, skipping done slides, --restart,
a failing slide among good ones, folder expansion, a patient table, Ctrl-C, exit codes,
one run on a local Dask cluster, and one on the real slides of ``../shared/data/wsi``.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import threading
from importlib.resources import files
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

from napari_histo_ai.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from napari_histo_ai.errors import HistoAIError
from napari_histo_ai.reports import job as job_module
from napari_histo_ai.reports.cohort import (
    FIXED_COLUMNS,
    STATUS_CANCELLED,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_SKIPPED,
    CohortProgress,
    CohortProgressBar,
    expand_slides,
    read_patient_table,
    run_cohort,
)

from .conftest import real

MODEL = "tiny-mitosis"
SAMPLE = Path(str(files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")))

MODEL_YAML = f"""
models:
  - name: {MODEL}
    task: mitosis detection (test)
    version: "1"
    format: safetensors
    architecture: tiny_fcn
    kwargs: {{in_channels: 3, out_channels: 1, depth: 2}}
    weights: tiny.safetensors
    activation: sigmoid
    io:
      mpp: 2.0
      patch_size: 64
      halo: 4
      overlap: 8
      normalisation: {{method: scale, scale: 255}}
    outputs:
      - {{name: mitosis, kind: probability, channels: [0], classes: [mitosis]}}
      - {{name: mitoses, kind: points, channels: [0], classes: [mitosis], threshold: 0.3,
         min_distance_um: 8}}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user model folder: a tiny FCN whose points are 'mitosis' (so: a mitotic count)."""
    from safetensors.torch import save_file

    from napari_histo_ai.models.architectures import build_architecture

    folder = tmp_path_factory.mktemp("models")
    net = build_architecture("tiny_fcn", in_channels=3, out_channels=1, depth=2, seed=3)
    save_file(net.state_dict(), str(folder / "tiny.safetensors"))
    (folder / "tiny.yaml").write_text(MODEL_YAML, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def user_models(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(model_dir))
    return model_dir


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three small pyramidal TIFFs of real H&E pixels, plus a note."""
    from napari_histo_ai.io.synthetic import make_slide

    folder = tmp_path_factory.mktemp("slides")
    make_slide(folder / "gamma.tif", width=512, height=512, source=SAMPLE)
    make_slide(folder / "alpha.tif", width=768, height=512, source=SAMPLE)
    make_slide(folder / "beta.tif", width=512, height=768, source=SAMPLE)
    (folder / "notes.txt").write_text("not a slide\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def slides(slide_dir: Path) -> list[Path]:
    return [slide_dir / f"{name}.tif" for name in ("alpha", "beta", "gamma")]


@pytest.fixture(scope="module")
def first_run(slide_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The cohort of the slide folder, made once here (in this process)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_HISTO_AI_MODELS", str(model_dir))
        out = tmp_path_factory.mktemp("cohort")
        result = run_cohort([slide_dir], out, models=[MODEL], local_cluster=0)
    return result, out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


class Counter:
    """Wraps the per-slide report functions and counts the slides they are called on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[Path] = []
        real_job = job_module.report_job

        def report_job(request, *, cancel=None):
            self.calls.extend(request.images)
            return real_job(request, cancel=cancel)

        monkeypatch.setattr(job_module, "report_job", report_job)


# -- inputs --------------------------------------------------------------------------------


def test_a_folder_expands_to_its_slides_sorted_and_says_what_it_skipped(slide_dir, tmp_path):
    run = tmp_path / f"alpha.{MODEL}.zarr"
    run.mkdir()
    (run / "summary.json").write_text("{}", encoding="utf-8")
    (tmp_path / "alpha.report.png").write_bytes(b"\x89PNG")
    (tmp_path / "P1.report.1.png").write_bytes(b"\x89PNG")
    (tmp_path / "one.svs").write_bytes((slide_dir / "alpha.tif").read_bytes())
    found = expand_slides([slide_dir, tmp_path])
    names = [p.name for p in found.slides]
    assert names == ["alpha.tif", "beta.tif", "gamma.tif", "one.svs"]
    why = {p.name: reason for p, reason in found.skipped}
    assert set(why) == {"notes.txt", run.name, "alpha.report.png", "P1.report.1.png"}
    assert "not an image" in why["notes.txt"] and "run folder" in why[run.name]
    assert all(p.is_absolute() for p in found.slides)


def test_no_slide_in_a_folder_is_an_error_and_a_missing_file_a_slide(tmp_path):
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(HistoAIError, match="holds no slide"):
        expand_slides([tmp_path])
    with pytest.raises(HistoAIError, match="no slides given"):
        expand_slides([])
    # kept: its task fails and its row says why (see the corrupt-slide test)
    assert expand_slides([tmp_path / "absent.svs"]).slides == (tmp_path / "absent.svs",)


def test_patient_table_reads_slide_and_patient_columns(tmp_path):
    table = tmp_path / "patients.csv"
    table.write_text("Slide,Patient,age\nalpha.tif,P1,60\nbeta,P1,60\n", encoding="utf-8")
    assert read_patient_table(table) == {"alpha.tif": "P1", "beta": "P1"}
    (tmp_path / "bad.csv").write_text("file,who\na,b\n", encoding="utf-8")
    with pytest.raises(HistoAIError, match="'slide' and 'patient'"):
        read_patient_table(tmp_path / "bad.csv")


# -- the cohort table ----------------------------------------------------------------------


def test_the_cohort_table_has_a_row_per_slide_with_numbers_and_units(first_run):
    import pandas as pd

    result, out = first_run
    columns, rows = read_csv(out / "cohort.csv")
    assert tuple(columns[: len(FIXED_COLUMNS)]) == FIXED_COLUMNS
    assert [r["slide"] for r in rows] == ["alpha.tif", "beta.tif", "gamma.tif"]
    assert all(r["status"] == STATUS_DONE and r["error"] == "" for r in rows)
    for key in ("mpp", "tissue_mm2", "mitoses", "mitoses_per_mm2", "mitoses_per_10hpf"):
        assert key in columns
    for row in rows:
        assert (out / row["report_html"]).is_file() and (out / row["report_pdf"]).is_file()
        assert not any(v.startswith(("{", "[")) for v in row.values())  # no JSON in cells
        assert "\n" not in "".join(row.values())

    frame = pd.read_csv(out / "cohort.csv")
    for key in ("mpp", "tissue_mm2", "mitoses", "mitoses_per_mm2", "mitoses_per_10hpf"):
        assert pd.api.types.is_numeric_dtype(frame[key]), key
    assert frame["mpp"].tolist() == pytest.approx([0.499] * 3)
    assert (frame["tissue_mm2"] > 0).all()
    # per-area numbers follow from the count and the slide's real µm/px
    per_mm2 = frame["mitoses"] / frame["tissue_mm2"]
    assert frame["mitoses_per_mm2"].tolist() == pytest.approx(per_mm2.tolist(), rel=0.02)

    data = json.loads((out / "cohort.json").read_text())
    assert data["columns"] == columns
    assert [s["slide"] for s in data["slides"]] == ["alpha.tif", "beta.tif", "gamma.tif"]
    assert data["settings"]["models"] == [MODEL] and data["settings"]["where"].startswith("here")
    assert [Path(s["path"]).name for s in data["settings"]["skipped_inputs"]] == ["notes.txt"]
    assert all("traceback" not in s for s in data["slides"])
    assert result.count(STATUS_DONE) == 3 and not result.failed and not result.cancelled
    assert [r["slide"] for r in result.rows] == [r["slide"] for r in rows]


def test_a_second_call_skips_done_slides_without_running_a_model(first_run, slide_dir, monkeypatch):
    result, out = first_run
    reports = sorted(out.glob("*.report.json"))
    assert len(reports) == 3
    before = {p: p.stat().st_mtime_ns for p in [*reports, *out.glob("*.zarr/summary.json")]}
    counter = Counter(monkeypatch)
    seen: list[CohortProgress] = []
    # the default (a local cluster sized to the slides to run) starts none: nothing to run
    again = run_cohort([slide_dir], out, models=[MODEL], on_progress=seen.append)
    assert counter.calls == []
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [r["status"] for r in again.rows] == [STATUS_SKIPPED] * 3
    assert all(p.finished and p.status == STATUS_SKIPPED for p in seen)
    # the numbers come from the reports' JSON: the same as the first time
    for old, new in zip(result.rows, again.rows, strict=True):
        assert {**old, "status": ""} == {**new, "status": ""}
    _, rows = read_csv(out / "cohort.csv")
    assert [r["status"] for r in rows] == [STATUS_SKIPPED] * 3
    assert json.loads((out / "cohort.json").read_text())["settings"]["where"].startswith("here")


def _restart_twice(slides, out, monkeypatch):
    run_cohort(slides[:1], out, models=[MODEL], local_cluster=0, formats=["html"])
    report, run = out / "alpha.report.json", out / f"alpha.{MODEL}.zarr" / "summary.json"
    before = report.stat().st_mtime_ns, run.stat().st_mtime_ns
    counter = Counter(monkeypatch)
    again = run_cohort(
        slides[:1], out, models=[MODEL], local_cluster=0, formats=["html"], restart=True
    )
    assert counter.calls == [slides[0]]
    assert [r["status"] for r in again.rows] == [STATUS_DONE]
    return before, (report.stat().st_mtime_ns, run.stat().st_mtime_ns)


def test_restart_redoes_every_slide(slides, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (report_before, _), (report_after, _) = _restart_twice(slides, out, monkeypatch)
    assert report_after > report_before  # the report was made again, not skipped
    settings = json.loads((out / "cohort.json").read_text())["settings"]
    assert settings["restart"] is True and settings["config"]["resume"] is False


def test_restart_also_recomputes_the_runs(slides, tmp_path, monkeypatch):
    (_, run_before), (_, run_after) = _restart_twice(slides, tmp_path / "out", monkeypatch)
    assert run_after > run_before


# -- failures ------------------------------------------------------------------------------


def test_a_corrupt_slide_is_a_failed_row_and_the_others_complete(slides, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    missing = tmp_path / "missing.svs"
    out = tmp_path / "out"
    inputs = [str(corrupt), str(slides[2]), str(missing)]
    code = main(["batch", *inputs, "--model", MODEL, "--out", str(out), "--local-cluster", "0"])
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and str(corrupt) in errors[0] and str(missing) in errors[1]
    assert "no such file" in errors[1]
    assert "[1/3] corrupt.tif: failed: " in captured.err
    assert "[2/3] gamma.tif: done in " in captured.err

    printed = json.loads(captured.out)
    assert printed["failed"] == 2 and printed[STATUS_DONE] == 1
    assert printed["cohort_csv"] == str(out / "cohort.csv")
    _, rows = read_csv(out / "cohort.csv")
    bad, good, _ = rows
    assert bad["status"] == STATUS_FAILED and str(corrupt) in bad["error"]
    assert "\n" not in bad["error"] and bad["report_html"] == "" and bad["mitoses"] == ""
    assert good["status"] == STATUS_DONE
    assert (out / good["report_html"]).is_file() and (out / good["report_pdf"]).is_file()
    data = json.loads((out / "cohort.json").read_text())
    assert "traceback" not in data["slides"][0]  # a bad input, not a crash


def test_a_crash_keeps_its_traceback_in_the_json_only(slides, tmp_path, monkeypatch):
    real_job = job_module.report_job

    def report_job(request, *, cancel=None):
        if request.images[0].name == "beta.tif":
            raise RuntimeError("boom in a model")
        return real_job(request, cancel=cancel)

    monkeypatch.setattr(job_module, "report_job", report_job)
    out = tmp_path / "out"
    result = run_cohort(slides[1:], out, models=[MODEL], local_cluster=0, formats=["html"])
    assert [r["status"] for r in result.rows] == [STATUS_FAILED, STATUS_DONE]
    assert result.rows[0]["error"] == "RuntimeError: boom in a model"
    data = json.loads((out / "cohort.json").read_text())
    assert "boom in a model" in data["slides"][0]["traceback"]
    assert "Traceback" not in (out / "cohort.csv").read_text()


def test_an_unknown_model_fails_once_before_anything_runs(slides, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(slides[0]), "--model", "no-such-net", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "no-such-net" in err[0] and MODEL in err[0]
    assert not (out / "cohort.csv").exists()


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--hpf-area", "0", "--hpf-area"), ("--format", "docx", "--format")],
)
def test_bad_options_are_one_line(slides, tmp_path, capsys, option, value, needle):
    args = ["batch", str(slides[0]), "--model", MODEL, "--out", str(tmp_path), option, value]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_ctrl_c_cancels_and_the_next_call_finishes(slides, tmp_path, monkeypatch, capsys):
    """SIGINT (a terminal's Ctrl-C) during the first slide: the run stops after its
    step, the slides are 'cancelled', exit 130; the same command then completes them."""
    real_job = job_module.report_job
    sent: list[bool] = []

    def report_job(request, *, cancel=None):
        job = real_job(request, cancel=cancel)
        first = next(job)
        if not sent:  # once, during the first slide's first step
            sent.append(True)
            signal.raise_signal(signal.SIGINT)
        yield first
        return (yield from job)

    monkeypatch.setattr(job_module, "report_job", report_job)
    out = tmp_path / "out"
    args = ["batch", str(slides[0]), str(slides[2]), "--model", MODEL, "--out", str(out)]
    code = main([*args, "--local-cluster", "0"])
    captured = capsys.readouterr()
    assert code == EXIT_INTERRUPTED, captured.err
    assert "stopping after the current" in captured.err
    _, rows = read_csv(out / "cohort.csv")
    assert [r["status"] for r in rows] == [STATUS_CANCELLED, STATUS_CANCELLED]

    monkeypatch.setattr(job_module, "report_job", real_job)
    assert main([*args, "--local-cluster", "0"]) == 0
    _, rows = read_csv(out / "cohort.csv")
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_DONE]


# -- patients ------------------------------------------------------------------------------


def test_a_patient_table_makes_one_report_of_a_patients_slides(slides, tmp_path, capsys):
    table = tmp_path / "patients.csv"
    table.write_text("slide,patient\nalpha.tif,P 1\nbeta.tif,P 1\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["batch", *map(str, slides), "--model", MODEL, "--out", str(out), "--format", "html"]
    assert main([*args, "--patient-csv", str(table), "--local-cluster", "0"]) == 0
    capsys.readouterr()
    _, rows = read_csv(out / "cohort.csv")
    assert [r["slide"] for r in rows] == ["alpha.tif", "beta.tif", "gamma.tif"]
    assert [r["patient"] for r in rows] == ["P 1", "P 1", ""]
    assert [r["report_html"] for r in rows] == [
        "P_1.report.html",
        "P_1.report.html",
        "gamma.report.html",
    ]
    data = json.loads((out / "P_1.report.json").read_text())
    assert len(data["slides"]) == 2


# -- progress ------------------------------------------------------------------------------


def test_progress_lines_without_a_terminal_and_a_bar_on_one():
    def records() -> list[CohortProgress]:
        return [
            CohortProgress("a.svs", 0, 2, step="run m", done=3, total=9),
            CohortProgress("a.svs", 0, 2, finished=True, status=STATUS_DONE, seconds=2.5),
            CohortProgress("b.svs", 1, 2, finished=True, status=STATUS_FAILED, error="bad"),
        ]

    log = StringIO()
    with CohortProgressBar(2, log, heartbeat_s=0.0) as bar:
        for p in records():
            bar(p)
    assert log.getvalue().splitlines() == [
        "[0/2] running: a.svs: run m 3/9 tiles",
        "[1/2] a.svs: done in 2.5 s",
        "[2/2] b.svs: failed: bad",
    ]
    term = StringIO()
    with CohortProgressBar(2, term, bar=True) as bar:
        for p in records():
            bar(p)
    text = term.getvalue()
    assert "[2/2] b.svs: failed: bad" in text and "1 failed" in text and "2/2" in text


# -- on a local Dask cluster ---------------------------------------------------------------


def test_a_local_cluster_gives_the_same_table(first_run, slide_dir, tmp_path, capsys):
    result, _ = first_run
    out = tmp_path / "dask"
    args = ["batch", str(slide_dir), "--model", MODEL, "--out", str(out), "--local-cluster", "2"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"skipped {slide_dir / 'notes.txt'}" in captured.err
    assert "[3/3]" in captured.err
    data = json.loads((out / "cohort.json").read_text())
    assert data["settings"]["where"] == "local Dask cluster of 2 worker processes"
    for here, there in zip(result.rows, data["slides"], strict=True):
        assert there["status"] == STATUS_DONE
        for key in ("slide", "mitoses", "mpp", "tissue_mm2", "report_html"):
            assert here[key] == there[key], key
        assert math.isclose(here["mitoses_per_mm2"] or 0, there["mitoses_per_mm2"] or 0)


def test_an_existing_scheduler_checks_the_models_on_its_workers(slides, tmp_path):
    import logging

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        address = cluster.scheduler_address
        with pytest.raises(HistoAIError, match="no-such-net"):
            run_cohort(slides[2:], tmp_path, models=["no-such-net"], scheduler=address)
        result = run_cohort(
            slides[2:], tmp_path, models=[MODEL], scheduler=address, formats=["html"]
        )
    assert [r["status"] for r in result.rows] == [STATUS_DONE]
    settings = json.loads(result.json.read_text())["settings"]
    assert settings["where"] == f"Dask scheduler {address}"


# -- real slides ---------------------------------------------------------------------------


def test_real_slides_one_row_each_and_missing_mpp_is_said(tmp_path):
    """The real slides with the magnification model (it works at any µm/px): the TCGA
    slide records no pixel size, so its row has no per-area numbers and says why."""
    paths = [
        real("wsi/CMU-1-Small-Region.svs"),
        real("wsi/TCGA-CR-7395-01A-01-TS1.svs"),
        real("wsi/test3-TRITC-2-560.ndpi"),  # fluorescence, not H&E
    ]
    out = tmp_path / "out"
    model = "magnification-shallownet"
    result = run_cohort(paths, out, models=[model], local_cluster=0, formats=["html"])
    assert [r["status"] for r in result.rows] == [STATUS_DONE] * 3, result.rows
    cmu, tcga, ndpi = result.rows
    assert cmu["mpp"] == pytest.approx(0.499) and cmu["tissue_mm2"] > 0
    assert cmu["magnification_metadata"] == 20.0 and cmu["magnification_verdict"] == "consistent"
    assert tcga["mpp"] is None and tcga["tissue_mm2"] is None
    assert tcga["mpp_source"] == "missing" and cmu["mpp_source"] == "file"
    assert tcga["magnification_metadata"] is None and tcga["magnification_estimate"] > 0
    assert "cannot be given because the file records no pixel size" in tcga["summary"]
    assert ndpi["mpp"] == pytest.approx(0.2282, abs=1e-4)
    assert all(r["models"] == f"{model}@1.0" for r in result.rows)
    _, rows = read_csv(out / "cohort.csv")
    assert [r["slide"] for r in rows] == [p.name for p in paths]
    assert rows[1]["mpp"] == "" and rows[1]["tissue_mm2"] == ""
    assert float(rows[0]["tissue_mm2"]) == pytest.approx(cmu["tissue_mm2"])


def test_a_slide_without_pixel_size_fails_a_model_that_needs_one_unless_given(tmp_path, capsys):
    """A PNG records no µm/px: the µm/px model cannot run on it and the row says so; with
    --missing-mpp it runs at that size (a slide with a pixel size keeps its own)."""
    from PIL import Image

    from napari_histo_ai.io import open_image

    pyramid = open_image(SAMPLE)
    try:
        pixels = np.asarray(pyramid.levels[0][1000:1384, 800:1184, :])
    finally:
        pyramid.close()
    field_png = tmp_path / "field.png"
    Image.fromarray(pixels).save(field_png)
    out = tmp_path / "out"
    args = ["batch", str(field_png), "--model", MODEL, "--out", str(out), "--local-cluster", "0"]
    assert main([*args, "--format", "html"]) == EXIT_BAD_INPUT
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert "field.png" in error and "no pixel size" in error
    assert main([*args, "--format", "html", "--missing-mpp", "0.5"]) == 0
    capsys.readouterr()
    _, rows = read_csv(out / "cohort.csv")
    assert rows[0]["status"] == STATUS_DONE and float(rows[0]["mpp"]) == 0.5
    assert rows[0]["mpp_source"].startswith("given")
    assert float(rows[0]["tissue_mm2"]) > 0


def test_cancel_event_before_start_cancels_every_slide(slides, tmp_path):
    cancel = threading.Event()
    cancel.set()
    result = run_cohort(slides, tmp_path, models=[MODEL], local_cluster=0, cancel=cancel)
    assert result.cancelled and result.count(STATUS_CANCELLED) == 3
    assert not list(tmp_path.glob("*.report.json"))
