"""Batch prediction: one model over many images (or regions), here or on a Dask cluster.

`predict_paths` runs the engine (`run_model_sync`) once per *task*: one task per input
image, or one per (image, region) when several regions are given. Each task writes its
own run folder::

    OUT/<image-stem>.<model>.zarr                      one task per image
    OUT/<image-stem>.<model>.roi-X-Y-W-H.zarr          several regions: one per region

(the engine's OME-Zarr outputs, GeoJSON objects and ``summary.json``; see
`napari_histo_ai.inference.store`), and at the end ``OUT/summary.json`` lists the
summary of every run in ``OUT``. A task whose run folder already holds a run of the
same model on the same image resumes it: only unfinished tiles are computed.

Where the tasks run:

* here (default): one after the other in this process, the model loaded once;
* ``local_cluster=N``: a `distributed.LocalCluster` of N single-threaded worker
  processes on the loopback interface, started and stopped here;
* ``scheduler="tcp://host:port"``: an existing Dask cluster. Its workers must see the
  input files and ``OUT`` at the same paths (a shared file system) and find the model
  by name in their own registry (their ``$NAPARI_HISTO_AI_MODELS``).

On a cluster each task opens its image and loads the model on its worker. A task that
fails (unreadable image, region outside the image, a worker that died) becomes an entry
with an ``"error"`` and the others still complete. Progress comes back from workers as
Dask events; setting ``cancel`` stops every task after its current batch, leaving runs
that a later call resumes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HistoAIError
from .engine import Progress, RunConfig, run_model_sync
from .store import write_json_atomic

if TYPE_CHECKING:
    from ..models.loading import Predictor
    from ..models.spec import ModelSpec

__all__ = [
    "BatchProgress",
    "Task",
    "WorkerChannel",
    "cluster_names",
    "dask_client",
    "error_line",
    "image_stem",
    "is_input_error",
    "plan_tasks",
    "predict_paths",
    "run_folder",
    "sigint_ignored",
    "watch_futures",
]

#: a worker reports progress (and looks for a stop request) at most this often, seconds
WORKER_REPORT_INTERVAL_S = 1.0
#: suffixes stripped, whole, from an input's name to make its run folder's name
_MULTI_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".nii.gz")
#: errors that describe a bad input (reported in one line, without a traceback)
_INPUT_ERRORS = (HistoAIError, OSError, ValueError)

Region = tuple[float, float, float, float]


@dataclass(frozen=True)
class Task:
    """One engine run of a batch.

    Parameters
    ----------
    index : int
        Position in the batch (results come back in this order).
    path : Path
        The input image, absolute.
    roi : (top, left, height, width) or None
        Region in level-0 pixels, or the whole image.
    run : Path
        The run folder (``*.zarr``), absolute.
    label : str
        How progress lines name it: the file name, plus the region when there are
        several.
    """

    index: int
    path: Path
    roi: Region | None
    run: Path
    label: str


@dataclass(frozen=True)
class BatchProgress:
    """Progress of one task of a batch (sent to ``on_progress``).

    Parameters
    ----------
    label : str
        The task's `Task.label`.
    index, n_tasks : int
        The task's position and the number of tasks.
    done, total : int
        Tiles done (including those of an earlier, resumed run) and to do.
    tiles_per_s : float
        Recent rate.
    eta_s : float or None
        Seconds left for this task, when the rate is known.
    finished : bool
        The task has ended (complete, stopped or failed).
    stopped : bool
        It ended because ``cancel`` was set (``done == 0``: it never started).
    error : str or None
        The failure, one line.
    """

    label: str
    index: int
    n_tasks: int
    done: int
    total: int
    tiles_per_s: float
    eta_s: float | None
    finished: bool = False
    stopped: bool = False
    error: str | None = None


ProgressCallback = Callable[[BatchProgress], None]


# ----------------------------------------------------------------------------- naming
def image_stem(path: str | Path) -> str:
    """An input's name without its format suffix (``a.ome.tif`` → ``a``, ``b.svs`` → ``b``)."""
    name = Path(path).name.rstrip("/")
    lower = name.lower()
    for suffix in _MULTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _roi_tag(roi: Region) -> str:
    """``X-Y-W-H`` (level-0 pixels, x = column) of a (top, left, height, width) region."""
    top, left, height, width = roi
    return "-".join(f"{v:g}" for v in (left, top, width, height))


def run_folder(
    out_dir: str | Path, path: str | Path, model: str, roi: Region | None = None
) -> Path:
    """The run folder of ``model`` on ``path`` (and ``roi``) inside ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        The batch's output folder.
    path : str or Path
        The input image.
    model : str
        The model's name.
    roi : (top, left, height, width), optional
        Level-0 pixels; named in the folder as ``roi-X-Y-W-H`` (x = column). Pass it only
        when a batch has several regions per image.

    Returns
    -------
    Path
        ``out_dir / "<stem>.<model>.zarr"`` or ``out_dir / "<stem>.<model>.roi-X-Y-W-H.zarr"``.
    """
    parts = [image_stem(path), model]
    if roi is not None:
        parts.append(f"roi-{_roi_tag(roi)}")
    return Path(out_dir) / (".".join(parts) + ".zarr")


def plan_tasks(
    paths: Sequence[str | Path],
    model: str,
    out_dir: str | Path,
    *,
    rois: Sequence[Region] | None = None,
) -> list[Task]:
    """One task per input, or per (input, region) when ``rois`` has several regions.

    Parameters
    ----------
    paths : sequence of str or Path
        Input images.
    model : str
        The model's name (part of the run folders' names).
    out_dir : str or Path
        The batch's output folder.
    rois : sequence of (top, left, height, width), optional, keyword-only
        Regions in level-0 pixels, each run on every input. One region: the run folder
        keeps the plain name (a later whole-image run resumes it); several: each gets
        its own folder, so that they can run in parallel.

    Returns
    -------
    list of Task

    Raises
    ------
    HistoAIError
        No input, or two tasks would write to the same run folder (the same file given
        twice, or two files with the same name in different folders).
    """
    if not paths:
        raise HistoAIError("no input images given: expected at least one PATH")
    out_dir = Path(out_dir).expanduser().absolute()
    regions: list[Region | None] = list(rois) if rois else [None]
    several = len(regions) > 1
    tasks: list[Task] = []
    owner: dict[Path, Path] = {}
    for p in paths:
        path = Path(p).expanduser().absolute()
        for roi in regions:
            run = run_folder(out_dir, path, model, roi if several else None)
            if run in owner:
                raise HistoAIError(
                    f"{path} and {owner[run]} would both write to {run} (same file name, "
                    "or a region given twice); give each input a unique name or run them "
                    "into different --out folders"
                )
            owner[run] = path
            label = path.name if not several or roi is None else f"{path.name} [{_roi_tag(roi)}]"
            tasks.append(Task(len(tasks), path, roi, run, label))
    return tasks


# ----------------------------------------------------------------------------- one task
def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` describes a bad input (reported in one line, without a traceback)
    rather than a bug or a crash (whose traceback is kept)."""
    return isinstance(exc, _INPUT_ERRORS)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: the message of a bad input, ``Type: message`` of a crash."""
    text = " ".join(str(exc).split())
    if is_input_error(exc):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_error_line = error_line


def _failed(task: Task, model: str, exc: BaseException) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "input": str(task.path),
        "run": str(task.run),
        "model": model,
        "roi": list(task.roi) if task.roi is not None else None,
        "error": _error_line(exc),
    }
    if not isinstance(exc, _INPUT_ERRORS):  # a bug or a crash: keep the whole story
        entry["traceback"] = "".join(traceback.format_exception(exc))
    return entry


def _run_task(
    task: Task,
    predictor: Predictor,
    config: RunConfig,
    *,
    cancel: threading.Event | None,
    on_progress: Callable[[Progress], None] | None,
) -> dict[str, Any]:
    """Open the image, run the engine into the task's folder; the run's summary entry."""
    from ..io import open_image

    pyramid = open_image(task.path)
    try:
        result = run_model_sync(
            pyramid,
            predictor,
            task.run,
            config=replace(config, roi=task.roi) if task.roi is not None else config,
            cancel=cancel,
            on_progress=on_progress,
        )
    finally:
        pyramid.close()
    return {"input": str(task.path), "run": str(task.run), "error": None, **result.summary}


def _progress_of(task: Task, n_tasks: int, p: Progress) -> BatchProgress:
    return BatchProgress(task.label, task.index, n_tasks, p.done, p.total, p.tiles_per_s, p.eta_s)


def _finished(task: Task, n_tasks: int, entry: dict[str, Any]) -> BatchProgress:
    return BatchProgress(
        task.label,
        task.index,
        n_tasks,
        int(entry.get("tiles_done", 0)),
        int(entry.get("tiles_total", 0)),
        0.0,
        0.0,
        finished=True,
        stopped=bool(entry.get("cancelled")),
        error=entry.get("error"),
    )


# ----------------------------------------------------------------------------- here
def _run_here(
    tasks: list[Task],
    spec: ModelSpec,
    *,
    config: RunConfig,
    device: str,
    cancel: threading.Event | None,
    on_progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    from ..models.loading import load_model

    predictor = load_model(spec, device=device)
    entries: list[dict[str, Any]] = []
    n = len(tasks)
    for task in tasks:
        if cancel is not None and cancel.is_set():
            entries.append(_not_started(task, spec.name))
            continue

        def report(p: Progress, task: Task = task) -> None:
            if on_progress is not None:
                on_progress(_progress_of(task, n, p))

        try:
            entry = _run_task(task, predictor, config, cancel=cancel, on_progress=report)
        except Exception as exc:  # reported per input; the other inputs go on
            entry = _failed(task, spec.name, exc)
        entries.append(entry)
        if on_progress is not None:
            on_progress(_finished(task, n, entry))
    return entries


def _not_started(task: Task, model: str) -> dict[str, Any]:
    return {
        "input": str(task.path),
        "run": str(task.run),
        "model": model,
        "roi": list(task.roi) if task.roi is not None else None,
        "error": None,
        "complete": False,
        "cancelled": True,
        "tiles_done": 0,
    }


# ----------------------------------------------------------------------------- cluster
def _check_model_on_worker(model: str, device: str) -> str | None:
    """Runs on a worker: find ``model`` in the worker's registry and load it once.

    Returns
    -------
    str or None
        The error (the registry's, listing the worker's models, or the loader's), so
        that a bad name, weights file or device fails the batch once, not per input.
        Returned as text: our exceptions do not survive pickling.
    """
    from ..models.loading import load_model
    from ..models.registry import load_registry

    try:
        load_model(load_registry().get(model), device=device)
    except HistoAIError as exc:
        return str(exc)
    return None


class WorkerChannel:
    """Runs on a worker: throttled progress events to the client, and its stop request.

    Create it at the start of a task (inside the worker process). Dask arrays computed
    inside the task (the image's lazy levels, e.g. for the tissue mask) would go to the
    cluster through the worker's client, which cannot ship an open file: this worker
    process computes them with local threads instead. The worker's client makes itself
    dask's default scheduler when it is created, so it is created first; the setting is
    for the process, not per task, so that concurrent tasks on one worker agree.

    Parameters
    ----------
    topic : str
        The event topic the client listens to (`cluster_names`).
    stop_name : str
        The name of the cluster-wide `distributed.Event` that asks every task to stop.
    interval : float
        Seconds between two events (and two looks at the stop request).

    Attributes
    ----------
    cancel : threading.Event
        Set once the stop request has been seen: pass it to the work as ``cancel``.
    """

    def __init__(
        self, topic: str, stop_name: str, *, interval: float = WORKER_REPORT_INTERVAL_S
    ) -> None:
        import dask
        from distributed import Event, get_client, get_worker

        self.worker = get_worker()
        client = get_client()
        dask.config.set({"scheduler": "threads"})
        self.topic = topic
        self.interval = interval
        self.stop = Event(stop_name, client=client)
        self.cancel = threading.Event()
        self.last = 0.0

    def stopped(self) -> bool:
        """Look at the stop request now (sets `cancel` when it is there)."""
        with contextlib.suppress(Exception):  # the stop request is best effort
            if self.stop.is_set():
                self.cancel.set()
        return self.cancel.is_set()

    def send(self, message: dict[str, Any]) -> None:
        """Send ``message`` to the client unless one went less than ``interval`` ago;
        then look at the stop request."""
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        with contextlib.suppress(Exception):  # progress is best effort
            self.worker.log_event(self.topic, message)
        self.stopped()


def _task_on_worker(
    task: Task,
    model: str,
    device: str,
    config: RunConfig,
    n_tasks: int,
    topic: str,
    stop_name: str,
) -> dict[str, Any]:
    """Runs on a worker: one task, with throttled progress events and stop checks."""
    from ..models.loading import load_model
    from ..models.registry import load_registry

    channel = WorkerChannel(topic, stop_name)

    def report(p: Progress) -> None:
        channel.send(_as_message(_progress_of(task, n_tasks, p)))

    try:
        if channel.stopped():  # stopped before this task began
            return _not_started(task, model)
        predictor = load_model(load_registry().get(model), device=device)
        return _run_task(task, predictor, config, cancel=channel.cancel, on_progress=report)
    except Exception as exc:  # reported per input; the other tasks go on
        return _failed(task, model, exc)


def _as_message(p: BatchProgress) -> dict[str, Any]:
    return {key: getattr(p, key) for key in _MESSAGE_KEYS}


def _from_message(msg: dict[str, Any]) -> BatchProgress:
    """The `BatchProgress` of a worker's event (events carry extra keys, e.g. worker)."""
    return BatchProgress(**{key: msg[key] for key in _MESSAGE_KEYS})


_MESSAGE_KEYS = ("label", "index", "n_tasks", "done", "total", "tiles_per_s", "eta_s")


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT (in the main thread) while inside; processes started meanwhile keep
    ignoring it, so that a terminal's Ctrl-C stops the batch cleanly through ``cancel``
    instead of killing the local cluster's workers mid-task."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_sigint_ignored = sigint_ignored


@contextlib.contextmanager
def dask_client(scheduler: str | None, local_cluster: int | None) -> Iterator[Any]:
    """A `distributed.Client` of an existing scheduler, or of a local cluster made here.

    Parameters
    ----------
    scheduler : str or None
        ``tcp://host:port`` of a running scheduler (used when ``local_cluster`` is None).
    local_cluster : int or None
        Start a `distributed.LocalCluster` of this many single-threaded worker processes
        on the loopback interface, without a dashboard; they ignore SIGINT (Ctrl-C
        reaches only this process) and are stopped when the block ends. The cluster's
        log messages below errors are silenced.

    Raises
    ------
    HistoAIError
        The scheduler cannot be reached.
    """
    import logging

    from distributed import Client, LocalCluster

    if local_cluster is not None:
        with sigint_ignored():  # the worker processes inherit it: Ctrl-C reaches only us
            cluster = LocalCluster(
                n_workers=local_cluster,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # the cluster's own chatter (e.g. a slow worker shutdown) is not the user's
                silence_logs=logging.ERROR,
            )
        with cluster, Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise HistoAIError(
                f"cannot connect to the Dask scheduler at {scheduler}: {exc} (start one with "
                "`dask scheduler` and `dask worker ADDRESS`, or use --local-cluster N)"
            ) from None
        with client:
            yield client


_client = dask_client


def cluster_names() -> tuple[str, str]:
    """A fresh (event topic, stop event name) pair for one batch on a cluster."""
    name = f"napari-histo-ai-{uuid.uuid4().hex}"
    return f"{name}-progress", f"{name}-stop"


def watch_futures(
    client: Any,
    futures: Sequence[Any],
    *,
    topic: str,
    stop_name: str,
    cancel: threading.Event | None,
    poll_s: float = 0.5,
) -> Iterator[tuple[str, Any]]:
    """Follow submitted tasks: their progress events, their ends, and ``cancel``.

    Parameters
    ----------
    client : distributed.Client
    futures : sequence of distributed.Future
        The tasks, in order; each sends events (dicts with an ``"index"``: its position)
        on ``topic`` through a `WorkerChannel`.
    topic, stop_name : str
        From `cluster_names`.
    cancel : threading.Event or None
        When set, the stop event is set: every task stops after its current step.
    poll_s : float
        Seconds between two looks at the futures and at ``cancel``.

    Yields
    ------
    ("progress", dict) or ("finished", int)
        A worker's event (late events of a task already finished are dropped), or the
        index of a task that has just ended (its future is done). In this thread.
    """
    from distributed import Event
    from distributed import wait as wait_futures

    messages: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    finished: set[int] = set()
    stop = Event(stop_name, client=client)
    client.subscribe_topic(topic, lambda event: messages.put(event[1]))
    try:
        pending = dict(enumerate(futures))
        while pending:
            with contextlib.suppress(TimeoutError):
                wait_futures(list(pending.values()), timeout=poll_s, return_when="FIRST_COMPLETED")
            if cancel is not None and cancel.is_set() and not stop.is_set():
                stop.set()
            while True:
                try:
                    msg = messages.get_nowait()
                except queue.Empty:
                    break
                if msg.get("index") not in finished:
                    yield "progress", msg
            for index, future in list(pending.items()):
                if future.done():
                    del pending[index]
                    finished.add(index)
                    yield "finished", index
    finally:
        client.unsubscribe_topic(topic)


def _run_on_cluster(
    tasks: list[Task],
    model: str,
    *,
    config: RunConfig,
    device: str,
    scheduler: str | None,
    local_cluster: int | None,
    cancel: threading.Event | None,
    on_progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    n = len(tasks)
    topic, stop_name = cluster_names()
    with dask_client(scheduler, local_cluster) as client:
        # a bad model name or device fails once, with the worker's list of models
        problem = client.submit(_check_model_on_worker, model, device, pure=False).result()
        if problem is not None:
            raise HistoAIError(problem)
        futures = [
            client.submit(
                _task_on_worker, task, model, device, config, n, topic, stop_name, pure=False
            )
            for task in tasks
        ]
        events = watch_futures(client, futures, topic=topic, stop_name=stop_name, cancel=cancel)
        for kind, value in events:
            if on_progress is None:
                continue
            if kind == "progress":
                on_progress(_from_message(value))
            else:
                on_progress(
                    _finished(tasks[value], n, _entry_of(futures[value], tasks[value], model))
                )
        entries = [_entry_of(f, t, model) for f, t in zip(futures, tasks, strict=True)]
    return entries


def _entry_of(future: Any, task: Task, model: str) -> dict[str, Any]:
    """A finished future's entry; a task that raised (worker died, ...) is an error entry."""
    try:
        entry: dict[str, Any] = future.result()
    except Exception as exc:
        return _failed(task, model, exc)
    return entry


# ----------------------------------------------------------------------------- batch
def predict_paths(
    paths: Sequence[str | Path],
    model: str,
    out_dir: str | Path,
    *,
    config: RunConfig | None = None,
    device: str = "auto",
    rois: Sequence[Region] | None = None,
    scheduler: str | None = None,
    local_cluster: int | None = None,
    cancel: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Run a registered model over several images; one run folder per image (or region).

    Parameters
    ----------
    paths : sequence of str or Path
        Input images (anything `napari_histo_ai.io.open_image` reads).
    model : str
        A registered model's name (`napari_histo_ai.models.registry.load_registry`).
    out_dir : str or Path
        Output folder (created): run folders and ``summary.json`` go here.
    config : RunConfig, optional, keyword-only
        Engine options; ``config.roi`` is replaced by each task's region when ``rois``
        is given.
    device : str, keyword-only
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; on a cluster,
        resolved on each worker.
    rois : sequence of (top, left, height, width), optional, keyword-only
        Level-0 pixel regions, each run on every input (see `plan_tasks`).
    scheduler : str, optional, keyword-only
        Address of a Dask scheduler (``tcp://host:port``) to run the tasks on.
    local_cluster : int, optional, keyword-only
        Start a local Dask cluster of this many single-threaded worker processes.
    cancel : threading.Event, optional, keyword-only
        Set it to stop every task after its current batch; tasks not yet started are
        entered as cancelled. A later call resumes them all.
    on_progress : callable, optional, keyword-only
        Called with a `BatchProgress` after every batch here (at most once a second
        per task on a cluster) and once when a task ends, always in this thread.

    Returns
    -------
    list of dict
        One entry per task, in order: ``{"input", "run", "error": None, **summary}``
        (the engine's ``summary.json``), or ``{"input", "run", "model", "roi",
        "error": "..."}`` for a failed task (plus ``"traceback"`` when it was not a
        bad input but a crash).

    Raises
    ------
    HistoAIError
        No input, colliding run folders, both ``scheduler`` and ``local_cluster``, an
        unknown model name (the message lists the available models) or device, or an
        unreachable scheduler. Failures of single inputs are not raised: they are in
        the entries.
    """
    from ..models.registry import load_registry

    if scheduler is not None and local_cluster is not None:
        raise HistoAIError("give either a scheduler address or a local cluster size, not both")
    if local_cluster is not None and local_cluster < 1:
        raise HistoAIError(
            f"local cluster size {local_cluster} is invalid: expected at least 1 worker"
        )
    config = config or RunConfig()
    out = Path(out_dir).expanduser().absolute()
    tasks = plan_tasks(paths, model, out, rois=rois)
    out.mkdir(parents=True, exist_ok=True)
    if scheduler is None and local_cluster is None:
        spec = load_registry().get(model)
        entries = _run_here(
            tasks, spec, config=config, device=device, cancel=cancel, on_progress=on_progress
        )
    else:
        if scheduler is None:  # workers inherit this environment: check the name here first
            load_registry().get(model)
        entries = _run_on_cluster(
            tasks,
            model,
            config=config,
            device=device,
            scheduler=scheduler,
            local_cluster=local_cluster,
            cancel=cancel,
            on_progress=on_progress,
        )
    write_batch_summary(out, entries)
    return entries


def write_batch_summary(out_dir: str | Path, entries: Sequence[dict[str, Any]]) -> Path:
    """Write ``out_dir/summary.json``: ``{"runs": [...]}``, every run in the folder.

    ``entries`` replace earlier entries of the same run folder; earlier entries whose
    run folder still exists are kept (a folder filled by several calls lists them all).
    The file is replaced atomically.

    Returns
    -------
    Path
        The summary file.
    """
    import json

    out = Path(out_dir)
    path = out / "summary.json"
    runs: dict[str, dict[str, Any]] = {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        for entry in old.get("runs", []):
            if isinstance(entry, dict) and Path(str(entry.get("run", ""))).is_dir():
                runs[str(entry["run"])] = entry
    except (OSError, ValueError, AttributeError):
        pass  # absent or not ours: start afresh
    for entry in entries:
        runs[str(entry["run"])] = dict(entry)
    write_json_atomic(path, {"runs": list(runs.values())})
    return path
