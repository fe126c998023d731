"""Cohort runs: a report per slide over many slides, on a Dask cluster, and one table.

`cohort_job` (a generator) and `run_cohort` (its synchronous wrapper) take slides (files,
or folders expanded by `expand_slides`) and run one *task* per slide: the slide's
`ReportRequest` through `napari_histo_ai.reports.job.report_job`, which runs the models
into ``OUT`` (complete runs reused, partial ones resumed) and writes
``OUT/<stem>.report.{html,pdf,json,png}``. With a patient table (``patients``) the slides
of one patient make one task and one patient report. Then::

    OUT/cohort.csv    one row per slide: slide, status, error, report_html, report_pdf,
                      then the report's numbers (`Report.rows`: mpp, mitoses_per_mm2,
                      mitoses_per_10hpf, tumour_fraction, malignant_score, ...) with
                      mpp_source (file / given / missing) and warnings
    OUT/cohort.json   the same rows plus the run's settings and, for crashes, tracebacks

Both are rewritten atomically after every finished task (a crash keeps what was done;
slides still to do read ``pending``) and at the end. A slide's status is one of
``done``, ``skipped (up to date)`` (its report JSON was made by the same request:
`up_to_date`; it is not run again unless ``restart``), ``failed`` (one line in
``error``; the other slides go on) or ``cancelled`` (``cancel`` was set: run the cohort
again to resume).

Where the tasks run:

* ``local_cluster=None`` (default): a `distributed.LocalCluster` of
  min(CPU cores, slides to run) single-threaded worker processes on the loopback
  interface, without a dashboard, started and stopped here;
* ``local_cluster=N``: the same with N workers; ``local_cluster=0``: here, in this
  process, one slide after the other (no Dask);
* ``scheduler="tcp://host:port"``: an existing Dask cluster. Its workers must see the
  slides and ``OUT`` at the same paths (a shared file system) and find the models by
  name in their own registry (their ``$NAPARI_HISTO_AI_MODELS``).

Progress comes back from workers as Dask events (at most one per second per task,
`napari_histo_ai.inference.batch.WorkerChannel`), in the caller's thread;
`CohortProgressBar` shows it on a terminal (a tqdm bar) or in a log (a line per slide).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..atomic import atomic_open, write_json_atomic
from ..errors import HistoAIError
from ..inference.batch import error_line, image_stem, is_input_error
from ..inference.engine import RunConfig
from . import job as _job
from .content import ReportOptions
from .job import ReportRequest

if TYPE_CHECKING:
    from .content import Report
    from .job import ReportProgress, ReportResult

__all__ = [
    "COHORT_CSV",
    "COHORT_JSON",
    "FIXED_COLUMNS",
    "STATUS_CANCELLED",
    "STATUS_DONE",
    "STATUS_FAILED",
    "STATUS_PENDING",
    "STATUS_SKIPPED",
    "CohortProgress",
    "CohortProgressBar",
    "CohortResult",
    "CohortTask",
    "SlideList",
    "cohort_job",
    "expand_slides",
    "plan_cohort",
    "read_patient_table",
    "run_cohort",
    "write_cohort_table",
]

COHORT_CSV = "cohort.csv"
COHORT_JSON = "cohort.json"
STATUS_DONE = "done"
STATUS_SKIPPED = "skipped (up to date)"
STATUS_FAILED = "failed"
STATUS_CANCELLED = "cancelled"
#: a slide not finished yet (only in the tables written while the cohort runs)
STATUS_PENDING = "pending"
#: the first columns of the cohort table; the report's numbers follow
FIXED_COLUMNS = ("slide", "status", "error", "report_html", "report_pdf")
#: columns of `Report.rows` that the fixed ones already say
_DROPPED = frozenset(FIXED_COLUMNS)
#: seconds between two redraws of the progress bar's postfix
REFRESH_S = 0.5
#: files a report writes (``<stem>.report.png``, ``<stem>.report.1.png``...): not slides
_OUR_FILES = re.compile(r".+\.report(\.\d+)?\.(png|html|pdf|json)$")

ProgressCallback = Callable[["CohortProgress"], None]


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class SlideList:
    """The slides found in the inputs, and what was passed over.

    Parameters
    ----------
    slides : tuple of Path
        Absolute paths, in the inputs' order (a folder's files sorted by name).
    skipped : tuple of (Path, str)
        Files or folders inside input folders that are not slides, and why.
    """

    slides: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...] = ()


def _is_run_folder(path: Path) -> bool:
    """A ``*.zarr`` folder written by the engine (a run), not an OME-Zarr image."""
    return any((path / name).exists() for name in ("progress.npz", "summary.json", "run.json"))


def expand_slides(paths: Sequence[str | Path]) -> SlideList:
    """Files as given; folders replaced by the images they hold (not recursive).

    A folder that is itself an image (OME-Zarr) is one slide. In another folder, the
    files and ``*.zarr`` folders whose name ends with an extension that
    `napari_histo_ai.io` reads (``.svs``, ``.ndpi``, ``.tif``, ``.mrxs``, ``.png``...)
    are taken, sorted by name; hidden files, report files (``*.report.png``...), run
    folders (``*.<model>.zarr``) and other files are passed over and listed in
    `SlideList.skipped`.

    Parameters
    ----------
    paths : sequence of str or Path
        Slides and folders of slides.

    Returns
    -------
    SlideList

    Raises
    ------
    HistoAIError
        No path given, or a folder without slides. A path that does not exist is kept
        (as a slide whose task fails, saying so).
    """
    from ..io import backend_for_extension, detect_backend

    if not paths:
        raise HistoAIError("no slides given: expected at least one SLIDE file or folder")
    slides: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for given in paths:
        path = Path(os.path.normpath(Path(given).expanduser().absolute()))
        # a missing file is a slide that fails (its row says so), not the cohort's end
        if not path.is_dir() or detect_backend(path) == "ome-zarr":
            slides.append(path)
            continue
        found = 0
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            name = child.name.lower()
            if child.name.startswith("."):
                continue
            if _OUR_FILES.match(name) or name in (COHORT_CSV, COHORT_JSON):
                skipped.append((child, "a file written by a report or cohort run"))
            elif backend_for_extension(child) is None:
                skipped.append((child, "not an image file (unknown extension)"))
            elif child.is_dir() and _is_run_folder(child):
                skipped.append((child, "a model's run folder"))
            elif child.is_dir() != (backend_for_extension(child) == "ome-zarr"):
                skipped.append((child, "a folder" if child.is_dir() else "not a folder"))
            else:
                slides.append(child)
                found += 1
        if not found:
            raise HistoAIError(
                f"{path}: the folder holds no slide or image file that napari-histo-ai "
                "reads (.svs, .ndpi, .tif, .mrxs, .ome.zarr, .png, ...); give the files "
                "or another folder"
            )
    return SlideList(tuple(slides), tuple(skipped))


def read_patient_table(path: str | Path) -> dict[str, str]:
    """Read a CSV that maps slides to patients.

    Parameters
    ----------
    path : str or Path
        A CSV with a header holding a ``slide`` column (file name, stem or path of the
        slide) and a ``patient`` column; other columns are ignored.

    Returns
    -------
    dict
        slide (as written) -> patient id.

    Raises
    ------
    HistoAIError
        Missing file, no ``slide`` / ``patient`` column, or a slide given twice with two
        patients.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise HistoAIError(f"{path}: cannot read the patient table ({exc.strerror})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
    if "slide" not in columns or "patient" not in columns:
        raise HistoAIError(
            f"{path}: the patient table needs a header with 'slide' and 'patient' columns "
            f"(found: {', '.join(reader.fieldnames or []) or 'none'})"
        )
    table: dict[str, str] = {}
    for line in reader:
        slide = (line.get(columns["slide"]) or "").strip()
        patient = (line.get(columns["patient"]) or "").strip()
        if not slide or not patient:
            continue
        if table.get(slide, patient) != patient:
            raise HistoAIError(
                f"{path}: slide {slide!r} is given to two patients ({table[slide]!r} and "
                f"{patient!r}); give each slide one patient"
            )
        table[slide] = patient
    return table


def _patient_of(slide: Path, table: Mapping[str, str]) -> str | None:
    for key in (str(slide), slide.name, image_stem(slide)):
        if key in table:
            return table[key]
    return None


def _safe_stem(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip())
    return keep.strip("._") or "patient"


def _has_mpp(path: Path) -> bool:
    """Whether the slide's file records its µm/px (an unreadable one counts as having it:
    its task fails and says why)."""
    from ..io import open_image

    try:
        pyramid = open_image(path)
    except Exception:
        return True
    try:
        return pyramid.mpp is not None
    finally:
        pyramid.close()


@dataclass(frozen=True)
class CohortTask:
    """One task of a cohort: one slide, or the slides of one patient.

    Parameters
    ----------
    index : int
        Position in the cohort (rows come back in this order).
    request : ReportRequest
        What the task makes (its ``out_dir`` is the cohort's).
    label : str
        How progress lines name it: the file name, or ``patient P (n slides)``.
    slides : tuple of Path
        The slides it covers (``request.images``).
    """

    index: int
    request: ReportRequest
    label: str
    slides: tuple[Path, ...]


def plan_cohort(
    slides: Sequence[Path],
    out_dir: str | Path,
    *,
    models: Sequence[str] = (),
    options: ReportOptions | None = None,
    config: RunConfig | None = None,
    device: str = "auto",
    formats: Sequence[str] = ("html", "pdf"),
    patients: Mapping[str, str] | None = None,
    missing_mpp: float | None = None,
) -> list[CohortTask]:
    """One task per slide, or per patient when ``patients`` maps slides to patients.

    Parameters
    ----------
    slides : sequence of Path
        Absolute slide paths (`expand_slides`).
    out_dir : str or Path
        The cohort's folder.
    models, options, config, device, formats : keyword-only
        As in `ReportRequest`.
    patients : mapping, optional, keyword-only
        Slide (path, file name or stem) -> patient id (`read_patient_table`). A
        patient's slides make one report ``<patient>.report.*``; slides not in it get
        their own.
    missing_mpp : float, optional, keyword-only
        µm/px for the slides whose file records none (each is opened to see; slides
        with a pixel size keep theirs; a patient's slides get it only when none has
        one). Without it such slides fail on models that work at a set µm/px, saying
        so, and their reports give no per-area numbers.

    Returns
    -------
    list of CohortTask

    Raises
    ------
    HistoAIError
        A slide given twice, or two slides (or patients) whose reports would have the
        same file name.
    """
    out = Path(out_dir).expanduser().absolute()
    options = options or ReportOptions()
    config = config or RunConfig()
    groups: dict[str, list[Path]] = {}
    group_patient: dict[str, str | None] = {}
    seen: dict[Path, None] = {}
    for slide in slides:
        if slide in seen:
            raise HistoAIError(f"{slide} is given twice: give each slide once")
        seen[slide] = None
        patient = _patient_of(slide, patients) if patients else None
        key = f"patient:{patient}" if patient is not None else f"slide:{slide}"
        groups.setdefault(key, []).append(slide)
        group_patient[key] = patient
    tasks: list[CohortTask] = []
    owner: dict[str, Path] = {}
    stems: set[str] = set()
    for key, members in groups.items():
        patient = group_patient[key]
        stem = _safe_stem(patient) if patient is not None else image_stem(members[0])
        for slide in members:  # two images of the same stem would share run folders
            other = owner.setdefault(image_stem(slide), slide)
            if other != slide:
                raise HistoAIError(
                    f"{slide} and {other} have the same name: their runs and reports "
                    "would overwrite each other in the output folder; rename one or run "
                    "them into different --out folders"
                )
        if stem in stems:
            raise HistoAIError(
                f"two reports would be written as {out / (stem + '.report.html')} "
                f"(patient {patient!r} and a slide of the same name); rename one"
            )
        stems.add(stem)
        slide_config = config
        if missing_mpp is not None and config.mpp is None and not any(map(_has_mpp, members)):
            slide_config = replace(config, mpp=missing_mpp)
        request = ReportRequest(
            images=tuple(members),
            out_dir=out,
            models=tuple(models),
            options=replace(options, patient=patient) if patient is not None else options,
            config=slide_config,
            device=device,
            formats=tuple(formats),
            stem=stem if patient is not None else None,
        )
        label = (
            members[0].name
            if patient is None
            else f"patient {patient} ({len(members)} slide{'s' * (len(members) > 1)})"
        )
        tasks.append(CohortTask(len(tasks), request, label, tuple(members)))
    return tasks


# ----------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class CohortProgress:
    """Progress of one task of a cohort (yielded by `cohort_job`).

    Parameters
    ----------
    label : str
        The task's `CohortTask.label`.
    index, n_tasks : int
        The task's position and the number of tasks.
    slides : int
        Slides the task covers (1 unless it is a patient's).
    step : str
        The report's current step (``run mitosis-fcn``, ``thumbnail``, ``pdf``...).
    done, total : int
        Tiles done and to do in the current model run (0 for other steps).
    message : str
        One human line about the step.
    finished : bool
        The task has ended; ``status`` says how.
    status : str or None
        ``done``, ``skipped (up to date)``, ``failed`` or ``cancelled`` when finished.
    error : str or None
        The failure, one line.
    seconds : float or None
        Wall time of a finished task.
    """

    label: str
    index: int
    n_tasks: int
    slides: int = 1
    step: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    finished: bool = False
    status: str | None = None
    error: str | None = None
    seconds: float | None = None


_MESSAGE_KEYS = ("label", "index", "n_tasks", "slides", "step", "done", "total", "message")


def _running(task: CohortTask, n_tasks: int, p: ReportProgress) -> CohortProgress:
    return CohortProgress(
        task.label, task.index, n_tasks, len(task.slides), p.step, p.done, p.total, p.message
    )


def _ended(task: CohortTask, n_tasks: int, entry: Mapping[str, Any]) -> CohortProgress:
    return CohortProgress(
        task.label,
        task.index,
        n_tasks,
        len(task.slides),
        finished=True,
        status=str(entry["status"]),
        error=entry.get("error"),
        seconds=entry.get("seconds"),
    )


# ----------------------------------------------------------------------------- one task
def _entry_done(result: ReportResult, seconds: float) -> dict[str, Any]:
    if result.cancelled:  # stopped before its files were written; the runs resume
        return {"status": STATUS_CANCELLED, "error": None, "seconds": round(seconds, 3)}
    report = result.report
    return {
        "status": STATUS_DONE,
        "error": None,
        "seconds": round(seconds, 3),
        "files": {kind: str(path) for kind, path in result.files.items()},
        "rows": _report_rows(report),
        "runs": [str(run) for run in result.runs],
    }


def _entry_failed(
    exc: BaseException, cancel: threading.Event | None, seconds: float
) -> dict[str, Any]:
    if cancel is not None and cancel.is_set():
        return {"status": STATUS_CANCELLED, "error": None, "seconds": round(seconds, 3)}
    entry: dict[str, Any] = {
        "status": STATUS_FAILED,
        "error": error_line(exc),
        "seconds": round(seconds, 3),
    }
    if not is_input_error(exc):  # a bug or a crash: keep the whole story
        entry["traceback"] = "".join(traceback.format_exception(exc))
    return entry


def _entry_cancelled() -> dict[str, Any]:
    return {"status": STATUS_CANCELLED, "error": None, "seconds": None}


def _report_rows(report: Report) -> list[dict[str, Any]]:
    """`Report.rows` plus, per slide, where its µm/px came from (``mpp_source``: ``file``,
    ``given (--mpp)`` or ``missing``; after ``mpp``) and its warnings (what could not be
    computed, and why)."""
    rows = []
    for row, section in zip(report.rows(), report.slides, strict=False):
        out: dict[str, Any] = {}
        for key, value in row.items():
            out[key] = value
            if key == "mpp":
                out["mpp_source"] = section.mpp_source
        out["warnings"] = " ".join(" ".join(w.split()) for w in section.warnings) or None
        rows.append(out)
    return rows


def _report_from_dict(data: Mapping[str, Any]) -> Report:
    """The `Report` of a ``<stem>.report.json`` (`Report.to_dict`)."""
    from .content import Measure, ModelEntry, Report, SlideSection

    from_dict = getattr(Report, "from_dict", None)
    if callable(from_dict):
        report: Report = from_dict(data)
        return report

    def section(s: Mapping[str, Any]) -> SlideSection:
        values = {k: v for k, v in s.items() if k not in ("measures", "models")}
        return SlideSection(
            **values,
            measures=[Measure(**m) for m in s.get("measures", [])],
            models=[ModelEntry(**m) for m in s.get("models", [])],
        )

    return Report(
        title=data["title"],
        created=data["created"],
        options=ReportOptions(**data["options"]),
        slides=[section(s) for s in data["slides"]],
        patient=[Measure(**m) for m in data.get("patient", [])],
        summary=list(data.get("summary", [])),
        request=dict(data.get("request", {})),
    )


def _report_files(request: ReportRequest, data: Mapping[str, Any]) -> dict[str, str]:
    """The report files of an up-to-date report (its JSON's ``files``)."""
    files = data.get("files")
    if isinstance(files, Mapping):
        return {str(kind): str(path) for kind, path in files.items()}
    stem = request.stem or image_stem(request.images[0])
    paths = _job.report_paths(Path(request.out_dir), stem)
    return {kind: str(path) for kind, path in paths.items() if path.is_file()}


def _entry_up_to_date(task: CohortTask, restart: bool) -> dict[str, Any] | None:
    """The entry of a task whose report is up to date (not run again), else ``None``."""
    if restart:
        return None
    try:
        data = _job.up_to_date(task.request)
        if data is None:
            return None
        rows = _report_rows(_report_from_dict(data))
    except Exception:  # an unreadable slide or report: the task runs and says why
        return None
    return {
        "status": STATUS_SKIPPED,
        "error": None,
        "seconds": 0.0,
        "files": _report_files(task.request, data),
        "rows": rows,
    }


def _run_here(
    tasks: Sequence[CohortTask], n_tasks: int, cancel: threading.Event | None
) -> Generator[CohortProgress | tuple[int, dict[str, Any]], None, None]:
    """The tasks one after the other in this process; yields progress, then
    ``(index, entry)`` when a task ends."""
    for task in tasks:
        if cancel is not None and cancel.is_set():
            yield task.index, _entry_cancelled()
            continue
        start = time.perf_counter()
        try:
            job = _job.report_job(task.request, cancel=cancel)
            while True:
                yield _running(task, n_tasks, next(job))
        except StopIteration as stop:
            entry = _entry_done(stop.value, time.perf_counter() - start)
        except Exception as exc:  # reported per slide; the others go on
            entry = _entry_failed(exc, cancel, time.perf_counter() - start)
        yield task.index, entry


def _task_on_worker(
    task: CohortTask, n_tasks: int, topic: str, stop_name: str, threads: int | None
) -> dict[str, Any]:
    """Runs on a worker: one task's report, with throttled progress events."""
    from ..inference.batch import WorkerChannel

    channel = WorkerChannel(topic, stop_name)
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:  # Dask starts workers with 1 (OMP_NUM_THREADS)
            torch.set_num_threads(threads)
    if channel.stopped():  # stopped before this task began
        return _entry_cancelled()

    def report(p: ReportProgress) -> None:
        channel.send(_as_message(_running(task, n_tasks, p)))

    start = time.perf_counter()
    try:
        result = _job.make_report(task.request, cancel=channel.cancel, on_progress=report)
    except Exception as exc:  # reported per slide; the other tasks go on
        return _entry_failed(exc, channel.cancel, time.perf_counter() - start)
    return _entry_done(result, time.perf_counter() - start)


def _as_message(p: CohortProgress) -> dict[str, Any]:
    return {key: getattr(p, key) for key in _MESSAGE_KEYS}


def _from_message(msg: Mapping[str, Any]) -> CohortProgress:
    return CohortProgress(**{key: msg[key] for key in _MESSAGE_KEYS})


def _check_models_on_worker(models: Sequence[str]) -> str | None:
    """Runs on a worker: the registry's error for an unknown model name, as text."""
    from ..models.registry import load_registry

    try:
        registry = load_registry()
        for name in models:
            registry.get(name)
    except HistoAIError as exc:
        return str(exc)
    return None


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_on_cluster(
    tasks: Sequence[CohortTask],
    n_tasks: int,
    *,
    models: Sequence[str],
    scheduler: str | None,
    workers: int | None,
    cancel: threading.Event | None,
) -> Generator[CohortProgress | tuple[int, dict[str, Any]], None, None]:
    from ..inference.batch import cluster_names, dask_client, watch_futures

    topic, stop_name = cluster_names()
    # torch in each local worker process: its share of the cores (Dask sets 1 thread)
    threads = max(1, _cpu_cores() // workers) if workers else None
    with dask_client(scheduler, workers) as client:
        if scheduler is not None and models:  # their registry, not ours
            problem = client.submit(_check_models_on_worker, list(models), pure=False).result()
            if problem is not None:
                raise HistoAIError(problem)
        futures = [
            client.submit(_task_on_worker, task, n_tasks, topic, stop_name, threads, pure=False)
            for task in tasks
        ]
        events = watch_futures(client, futures, topic=topic, stop_name=stop_name, cancel=cancel)
        for kind, value in events:
            if kind == "progress":
                yield _from_message(value)
                continue
            try:
                entry: dict[str, Any] = futures[value].result()
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except BaseException as exc:  # the worker died, the task was cancelled / lost
                entry = _entry_failed(exc, None, 0.0)
                if type(exc).__name__ == "KilledWorker":
                    entry["error"] = (
                        f"the worker running it died ({error_line(exc)}): out of memory, "
                        "or a crash in a native library; see cohort.json"
                    )
            yield tasks[value].index, entry


# ----------------------------------------------------------------------------- table
def _plain(value: Any) -> Any:
    """A CSV-friendly cell value: numbers as numbers, text as one line, None empty."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()  # numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return "; ".join(str(_plain(v)) for v in value if v is not None) or None
    if isinstance(value, str):
        return " ".join(value.split())
    return value


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``key_subkey`` columns (no JSON in cells)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}_"))
        else:
            out[name] = _plain(value)
    return out


def _relative(path: str | None, folder: Path) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def _slide_rows(task: CohortTask, entry: Mapping[str, Any], out_dir: Path) -> list[dict]:
    """The cohort rows of one task (one per slide): fixed columns, then the numbers."""
    files = entry.get("files") or {}
    metrics = list(entry.get("rows") or [])
    rows = []
    for k, slide in enumerate(task.slides):
        row: dict[str, Any] = {
            "slide": slide.name,
            "status": entry["status"],
            "error": entry.get("error"),
            "report_html": _relative(files.get("html"), out_dir),
            "report_pdf": _relative(files.get("pdf"), out_dir),
        }
        if k < len(metrics):
            row.update({key: v for key, v in _flatten(metrics[k]).items() if key not in _DROPPED})
        rows.append(row)
    return rows


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The fixed columns, then every other key in the order first seen."""
    columns = dict.fromkeys(FIXED_COLUMNS)
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def write_cohort_table(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    settings: Mapping[str, Any] | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``cohort.csv`` and ``cohort.json`` in ``out_dir``, each atomically.

    Parameters
    ----------
    out_dir : str or Path
    rows : sequence of dict
        One per slide: `FIXED_COLUMNS`, then the report's numbers (str / int / float /
        None; None and NaN are written as empty cells).
    settings : dict, optional, keyword-only
        The run's settings (models, options, device, where it ran...), in the JSON.
    details : sequence of dict, optional, keyword-only
        Per row, extra JSON-only fields (path, seconds, traceback of a crash).

    Returns
    -------
    (Path, Path)
        The CSV and the JSON.
    """
    out = Path(out_dir)
    columns = _columns(rows)
    csv_path, json_path = out / COHORT_CSV, out / COHORT_JSON
    with atomic_open(csv_path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    slides = []
    for k, row in enumerate(rows):
        extra = dict(details[k]) if details is not None and k < len(details) else {}
        slides.append({**{c: row.get(c) for c in columns}, **extra})
    data = {"settings": dict(settings or {}), "columns": columns, "slides": slides}
    write_json_atomic(json_path, data)
    return csv_path, json_path


@dataclass
class _Table:
    """The cohort's rows as tasks end, written after each."""

    out_dir: Path
    tasks: Sequence[CohortTask]
    settings: dict[str, Any]
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows: list[dict[str, Any]] = []
        details: list[dict[str, Any]] = []
        for task in self.tasks:
            entry = self.entries.get(task.index, {"status": STATUS_PENDING, "error": None})
            for slide, row in zip(task.slides, _slide_rows(task, entry, self.out_dir), strict=True):
                rows.append(row)
                detail: dict[str, Any] = {"path": str(slide), "seconds": entry.get("seconds")}
                if len(task.slides) > 1:
                    detail["report_stem"] = task.request.stem
                if entry.get("traceback"):
                    detail["traceback"] = entry["traceback"]
                details.append(detail)
        return rows, details

    def write(self) -> tuple[Path, Path]:
        rows, details = self.rows()
        return write_cohort_table(self.out_dir, rows, settings=self.settings, details=details)


@dataclass(frozen=True)
class CohortResult:
    """What a cohort run made.

    Parameters
    ----------
    rows : tuple of dict
        The cohort table, one row per slide (as in ``cohort.csv``).
    csv, json : Path
        ``OUT/cohort.csv`` and ``OUT/cohort.json``.
    skipped_inputs : tuple of (Path, str)
        Files in input folders that were not slides, and why.
    """

    rows: tuple[dict[str, Any], ...]
    csv: Path
    json: Path
    skipped_inputs: tuple[tuple[Path, str], ...] = ()

    def count(self, status: str) -> int:
        """Rows (slides) of this status."""
        return sum(1 for row in self.rows if row["status"] == status)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The rows of failed slides."""
        return [row for row in self.rows if row["status"] == STATUS_FAILED]

    @property
    def cancelled(self) -> bool:
        """Some slides were not finished because the run was cancelled."""
        return self.count(STATUS_CANCELLED) > 0


# ----------------------------------------------------------------------------- cohort
def _settings(
    tasks: Sequence[CohortTask],
    slides: SlideList,
    *,
    models: Sequence[str],
    options: ReportOptions,
    config: RunConfig,
    device: str,
    formats: Sequence[str],
    where: str,
    restart: bool,
    missing_mpp: float | None,
) -> dict[str, Any]:
    from .. import __version__

    return {
        "napari_histo_ai": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": list(models) or "default panel for each image kind",
        "options": asdict(options),
        "config": asdict(config),
        "device": device,
        "formats": list(formats),
        "where": where,
        "restart": restart,
        "missing_mpp": missing_mpp,
        "slides": sum(len(t.slides) for t in tasks),
        "reports": len(tasks),
        "skipped_inputs": [{"path": str(p), "why": why} for p, why in slides.skipped],
    }


def cohort_job(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    models: Sequence[str] = (),
    options: ReportOptions | None = None,
    config: RunConfig | None = None,
    device: str = "auto",
    formats: Sequence[str] = ("html", "pdf"),
    patients: Mapping[str, str] | None = None,
    missing_mpp: float | None = None,
    scheduler: str | None = None,
    local_cluster: int | None = None,
    restart: bool = False,
    cancel: threading.Event | None = None,
) -> Generator[CohortProgress, None, CohortResult]:
    """Make a report per slide (or patient) and the cohort table; yields progress.

    Parameters
    ----------
    paths : sequence of str or Path
        Slides and folders of slides (`expand_slides`).
    out_dir : str or Path
        Output folder (created): run folders, reports, ``cohort.csv``, ``cohort.json``.
    models : sequence of str, keyword-only
        Registered models to run on every slide; empty: the reports' default panel for
        each image kind.
    options : ReportOptions, optional, keyword-only
        HPF area and count, thumbnail size, title.
    config : RunConfig, optional, keyword-only
        Engine options of the model runs.
    device : str, keyword-only
        ``"auto"``, ``"cpu"``, ``"cuda"``...; on a cluster, resolved on each worker.
    formats : sequence of str, keyword-only
        Report formats (``html``, ``pdf``); the JSON and thumbnail are always written.
    patients : mapping, optional, keyword-only
        Slide -> patient id (`read_patient_table`): one report per patient.
    missing_mpp : float, optional, keyword-only
        µm/px for slides whose file records none (`plan_cohort`); ``config.mpp``
        instead overrides every slide's.
    scheduler : str, optional, keyword-only
        ``tcp://host:port`` of a Dask scheduler whose workers see the same paths.
    local_cluster : int, optional, keyword-only
        Workers of the local cluster; ``None``: min(CPU cores, slides to run); ``0``:
        run here, in this process, without Dask.
    restart : bool, keyword-only
        Make every report and run again (else up-to-date reports are kept and partial
        runs resumed).
    cancel : threading.Event, optional, keyword-only
        Set it to stop: running slides stop after their current step (their runs resume
        next time), the others are not started; they are all ``cancelled``.

    Yields
    ------
    CohortProgress
        Steps and tile counts of running tasks (at most once a second per task from a
        cluster), and one record with ``finished=True`` per task, in this thread.

    Returns
    -------
    CohortResult

    Raises
    ------
    HistoAIError
        No slide, a missing path, clashing names, both ``scheduler`` and
        ``local_cluster``, an unknown model name (the message lists the available ones)
        or an unreachable scheduler. Failures of single slides are not raised: they are
        ``failed`` rows.
    """
    from ..models.registry import load_registry

    if scheduler is not None and local_cluster is not None:
        raise HistoAIError("give either a scheduler address or a local cluster size, not both")
    if local_cluster is not None and local_cluster < 0:
        raise HistoAIError(
            f"local cluster size {local_cluster} is invalid: expected 0 (run here) or more"
        )
    found = expand_slides(paths)
    out = Path(out_dir).expanduser().absolute()
    options = options or ReportOptions()
    config = config or RunConfig()
    if restart:
        config = replace(config, resume=False)
    tasks = plan_cohort(
        found.slides,
        out,
        models=models,
        options=options,
        config=config,
        device=device,
        formats=formats,
        patients=patients,
        missing_mpp=missing_mpp,
    )
    if scheduler is None:  # local workers inherit this environment: check the names here
        registry = load_registry()
        for name in models:
            registry.get(name)
    out.mkdir(parents=True, exist_ok=True)
    n = len(tasks)

    todo: list[CohortTask] = []
    skipped: dict[int, dict[str, Any]] = {}
    for task in tasks:
        entry = _entry_up_to_date(task, restart)
        if entry is None:
            todo.append(task)
        else:
            skipped[task.index] = entry
    if scheduler is not None:
        where = f"Dask scheduler {scheduler}"
        workers = None
    elif local_cluster == 0 or not todo:
        where, workers = "here (in process)", 0
    else:
        workers = local_cluster or max(1, min(_cpu_cores(), len(todo)))
        where = f"local Dask cluster of {workers} worker processes"
    settings = _settings(
        tasks,
        found,
        models=models,
        options=options,
        config=config,
        device=device,
        formats=formats,
        where=where,
        restart=restart,
        missing_mpp=missing_mpp,
    )
    table = _Table(out, tasks, settings)
    for index, entry in skipped.items():
        table.entries[index] = entry
        yield _ended(tasks[index], n, entry)
    table.write()

    if todo:
        events: Iterator[CohortProgress | tuple[int, dict[str, Any]]]
        if workers == 0:
            events = _run_here(todo, n, cancel)
        else:
            events = _run_on_cluster(
                todo, n, models=models, scheduler=scheduler, workers=workers, cancel=cancel
            )
        for event in events:
            if isinstance(event, CohortProgress):
                yield event
                continue
            index, entry = event
            table.entries[index] = entry
            table.write()
            yield _ended(tasks[index], n, entry)
    settings["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    csv_path, json_path = table.write()
    rows, _ = table.rows()
    return CohortResult(tuple(rows), csv_path, json_path, found.skipped)


def run_cohort(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    on_progress: ProgressCallback | None = None,
    **kwargs: Any,
) -> CohortResult:
    """`cohort_job` run to its end; ``on_progress`` gets every `CohortProgress`.

    Parameters
    ----------
    paths, out_dir
        As in `cohort_job`.
    on_progress : callable, optional, keyword-only
        Called with each progress record, in this thread.
    **kwargs
        The keyword-only options of `cohort_job` (``models``, ``options``, ``config``,
        ``device``, ``formats``, ``patients``, ``missing_mpp``, ``scheduler``,
        ``local_cluster``,
        ``restart``, ``cancel``).

    Returns
    -------
    CohortResult
    """
    job = cohort_job(paths, out_dir, **kwargs)
    while True:
        try:
            p = next(job)
        except StopIteration as stop:
            result: CohortResult = stop.value
            return result
        if on_progress is not None:
            on_progress(p)


# ----------------------------------------------------------------------------- display
def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class CohortProgressBar:
    """Shows a cohort's progress on a stream (the CLI's standard error).

    On a terminal: a tqdm bar over the slides whose postfix names the running slides,
    their step and tiles, and the failures so far; one line per finished slide above
    it. Elsewhere (a CI log, a pipe): no bar, one line per finished slide
    (``[k/n] a.svs: done in 12.3 s`` / ``failed: reason``) and, at most every
    ``heartbeat_s``, one line on the running slides.

    Parameters
    ----------
    total : int
        Slides in the cohort.
    stream : text stream, optional
        Default: ``sys.stderr``.
    bar : bool, optional
        Force the bar on or off (default: on when ``stream`` is a terminal).
    heartbeat_s : float
        Seconds between two lines on running slides without a bar.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        bar: bool | None = None,
        heartbeat_s: float = 30.0,
    ) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.ended = 0
        self.failures = 0
        self.heartbeat_s = heartbeat_s
        self.last = time.monotonic()
        self.running: dict[int, CohortProgress] = {}
        isatty = getattr(self.stream, "isatty", None)
        use_bar = bar if bar is not None else bool(isatty and isatty())
        self.bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, file=self.stream, unit="slide", mininterval=0.5, dynamic_ncols=True
            )

    def __enter__(self) -> CohortProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (if any)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _running_text(self) -> str:
        parts = []
        for p in self.running.values():
            tiles = f" {p.done}/{p.total} tiles" if p.total else ""
            parts.append(f"{p.label}: {p.step}{tiles}")
        return "; ".join(parts)

    def __call__(self, p: CohortProgress) -> None:
        if p.finished:
            self.running.pop(p.index, None)
            self.ended += p.slides
            if p.status == STATUS_FAILED:
                self.failures += p.slides
                what = f"failed: {p.error}"
            elif p.status == STATUS_DONE:
                what = f"done in {_duration(p.seconds)}"
            else:
                what = str(p.status)
            self._line(f"[{self.ended}/{self.total}] {p.label}: {what}")
            if self.bar is not None:
                self._postfix(draw=False)
                self.bar.update(p.slides)  # draws
            return
        self.running[p.index] = p
        if self.bar is not None:
            self._postfix()
            return
        now = time.monotonic()
        if now - self.last >= self.heartbeat_s:
            self.last = now
            self._line(f"[{self.ended}/{self.total}] running: {self._running_text()}")

    def _postfix(self, *, draw: bool = True) -> None:
        text = self._running_text()
        if self.failures:
            text = f"{text} | {self.failures} failed" if text else f"{self.failures} failed"
        self.bar.set_postfix_str(text, refresh=False)
        now = time.monotonic()
        if draw and now - self.last >= REFRESH_S:  # at most twice a second
            self.last = now
            self.bar.refresh()
