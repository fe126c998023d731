"""The ``napari-histo-ai`` command: a thin layer over the core, like the widgets.

Every subcommand prints JSON (or a path) on success. On bad input it prints one line,
``error: <file>: <what is wrong> (<what to do>)``, to standard error and exits with 2.

Usage::

    napari-histo-ai info PATH... [--backend NAME] [--estimate-magnification]
    napari-histo-ai make-slide OUT.tif --source PATH [--width W] [--height H] ...
    napari-histo-ai models [--json]
    napari-histo-ai predict PATH... --model NAME --out DIR [--roi X,Y,W,H]... [--device D]
        [--batch-size N] [--threshold T] [--mpp M] [--no-tissue] [--restart]
        [--local-cluster N | --scheduler tcp://HOST:PORT]
    napari-histo-ai batch SLIDES... --out DIR [--model NAME]... [--restart] [--patient-csv F]
        [--hpf-area MM2] [--format html,pdf] [--device D] [--mpp M | --missing-mpp M]
        [--local-cluster N | --scheduler A]
    napari-histo-ai train-default TASK --data DIR --out FILE [--seed N] [--epochs N]
    napari-histo-ai evaluate --model NAME --data DIR [--weights FILE] [--json-out FILE]
        [--plots DIR] [--with-curves]
    napari-histo-ai bench read [PATH...] [--reads N] [--region PX] [--generate OUT.tif]
    napari-histo-ai bench infer PATH [--model NAME] [--generate] [--tiles N] [--device D]
    napari-histo-ai bench annotations [--sizes N...] [--polygons N] [--json-out F]
    napari-histo-ai bench retrain [--data DIR...] [--corrections N] [--epochs N]
        [--batch-size N] [--json-out FILE]
    napari-histo-ai bench cohort [SLIDE...] [--copies N] [--size PX] [--model NAME]...
        [--default-panel] [--workers N] [--json-out FILE]
    napari-histo-ai import FILE --image IMG [--store STORE] [--format F] [--source S]
        [--model-version V] [--classes A,B]
    napari-histo-ai export [--store STORE] [--image IMG] --format geojson|csv|coco|mias|
        ome-zarr|nifti --out PATH [--labels LABELS]
    napari-histo-ai training-set --image IMG [--store STORE] --out DIR --mpp M
        [--patch-size N] [--targets auto|mask|points|boxes] [--labels LABELS]
    napari-histo-ai annotations STORE
    napari-histo-ai uncertainty RUN.zarr [--top N] [--region-um UM] [--json-out F]
        [--geojson F]
    napari-histo-ai train MODEL [DATA...] [--image IMG [--store S]] [--epochs N] [--lr R]
        [--batch-size N] [--loss L] [--patience N] [--run DIR | --resume DIR] [--threads N] ...
    napari-histo-ai versions MODEL [--json-out F]
    napari-histo-ai compare MODEL... --data DATA... [--plots DIR] [--split val|train|all]

Without ``--store`` the store is ``<image>.annotations.sqlite`` beside the image (or
``~/.napari-histo-ai/annotations/<hash>.sqlite`` when that folder is read-only; see
`napari_histo_ai.annotations.store_paths`).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .errors import HistoAIError

if TYPE_CHECKING:
    from .inference.batch import BatchProgress

EXIT_BAD_INPUT = 2
#: exit status of a run stopped with Ctrl-C (128 + SIGINT), resumable
EXIT_INTERRUPTED = 130
#: seconds between two progress lines of ``predict``
PROGRESS_INTERVAL_S = 2.0


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import open_image

    out = []
    for path in args.paths:
        pyramid = open_image(path, backend=args.backend)
        try:
            info = pyramid.info()
            if getattr(args, "estimate_magnification", False):
                from .models.magnification import estimate_slide_magnification

                info["magnification_estimate"] = estimate_slide_magnification(pyramid).to_dict()
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


def _cmd_models(args: argparse.Namespace) -> int:
    from .models.registry import format_card, load_registry, spec_summary, user_models_dir

    registry = load_registry()
    if args.json:
        data = {"models": [spec_summary(s) for s in registry], "problems": registry.problems}
        print(json.dumps(data, indent=2, default=str))
        return 0
    if len(registry):
        print("\n\n".join(format_card(spec) for spec in registry))
    else:
        print(f"no models registered; add model YAML files to {user_models_dir()}")
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def _parse_roi(text: str) -> tuple[float, float, float, float]:
    """``X,Y,W,H`` (level-0 pixels, x = column) → the engine's (top, left, height, width)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        values = []
    if not values or values[0] < 0 or values[1] < 0 or values[2] <= 0 or values[3] <= 0:
        raise HistoAIError(
            f"--roi {text!r} is invalid: expected X,Y,W,H in level-0 pixels (x = column), "
            "X, Y >= 0 and W, H > 0, e.g. --roi 1000,2000,512,512"
        )
    x, y, w, h = values
    return (y, x, h, w)


def _check_positive(option: str, value: float | None, *, upper: float | None = None) -> None:
    if value is None:
        return
    if not (math.isfinite(value) and value > 0) or (upper is not None and value > upper):
        expected = f"a number in (0, {upper:g}]" if upper is not None else "a positive number"
        raise HistoAIError(f"{option} {value:g} is invalid: expected {expected}")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class _ProgressLines:
    """Progress of ``predict`` on a stream: one line per ``interval`` seconds, one per end.

    Lines read ``[k/n done] NAME: done/total tiles, R tiles/s, ETA T`` (tasks running in
    parallel on a cluster are summed: ``[k/n done] 3 running: ...``).
    """

    def __init__(self, stream: TextIO, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.stream = stream
        self.interval = interval
        self.running: dict[int, BatchProgress] = {}
        self.ended = 0
        self.last = time.monotonic()

    def __call__(self, p: BatchProgress) -> None:
        if p.finished:
            self.running.pop(p.index, None)
            self.ended += 1
            if p.error:
                status = f"failed: {p.error}"
            elif p.stopped and p.done == 0:
                status = "not started (stopped)"
            elif p.stopped:
                status = f"stopped at {p.done}/{p.total} tiles"
            else:
                status = f"finished, {p.done}/{p.total} tiles"
            self._print(f"[{self.ended}/{p.n_tasks} done] {p.label}: {status}")
            return
        self.running[p.index] = p
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        tasks = list(self.running.values())
        done, total = sum(t.done for t in tasks), sum(t.total for t in tasks)
        rate = sum(t.tiles_per_s for t in tasks)
        etas = [t.eta_s for t in tasks]
        eta = None if any(e is None for e in etas) else max(e for e in etas if e is not None)
        head = tasks[0].label if len(tasks) == 1 else f"{len(tasks)} running"
        self._print(
            f"[{self.ended}/{p.n_tasks} done] {head}: {done}/{total} tiles, "
            f"{rate:.1f} tiles/s, ETA {_duration(eta)}"
        )

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


class _StopOnInterrupt:
    """First Ctrl-C sets ``event`` (runs stop after their batch); the second aborts."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print(
            "stopping after the current batch (Ctrl-C again to abort); run the same "
            "command again to resume",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference.batch import predict_paths
    from .inference.engine import RunConfig

    rois = [_parse_roi(text) for text in args.roi] if args.roi else None
    _check_positive("--batch-size", args.batch_size)
    _check_positive("--threshold", args.threshold, upper=1.0)
    _check_positive("--mpp", args.mpp)
    if args.local_cluster is not None and args.local_cluster < 1:
        raise HistoAIError(
            f"--local-cluster {args.local_cluster} is invalid: expected at least 1 worker"
        )
    config = RunConfig(
        batch_size=args.batch_size,
        tissue=not args.no_tissue,
        threshold=args.threshold,
        mpp=args.mpp,
        resume=not args.restart,
    )
    cancel = threading.Event()
    with _StopOnInterrupt(cancel):
        entries = predict_paths(
            args.paths,
            args.model,
            args.out,
            config=config,
            device=args.device,
            rois=rois,
            scheduler=args.scheduler,
            local_cluster=args.local_cluster,
            cancel=cancel,
            on_progress=_ProgressLines(sys.stderr),
        )
    print(json.dumps({"runs": entries}, indent=2, default=str))
    failed = [e for e in entries if e.get("error")]
    for entry in failed:
        if entry.get("traceback"):
            print(entry["traceback"].rstrip(), file=sys.stderr)
        error = str(entry["error"])
        where = "" if entry["input"] in error else f"{entry['input']}: "
        print(f"error: {where}{error}", file=sys.stderr)
    if failed:
        return EXIT_BAD_INPUT
    if cancel.is_set() or any(e.get("cancelled") for e in entries):
        return EXIT_INTERRUPTED
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from .inference.engine import RunConfig
    from .reports.cohort import (
        STATUS_CANCELLED,
        STATUS_DONE,
        STATUS_FAILED,
        STATUS_SKIPPED,
        CohortProgressBar,
        expand_slides,
        read_patient_table,
        run_cohort,
    )
    from .reports.content import ReportOptions

    _check_positive("--hpf-area", args.hpf_area)
    _check_positive("--batch-size", args.batch_size)
    _check_positive("--mpp", args.mpp)
    _check_positive("--missing-mpp", args.missing_mpp)
    formats = tuple(f.strip().lower() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in ("html", "pdf")]
    if unknown:
        raise HistoAIError(
            f"--format {args.format!r} is invalid: expected html, pdf or html,pdf "
            f"(unknown: {', '.join(unknown)})"
        )
    if args.local_cluster is not None and args.local_cluster < 0:
        raise HistoAIError(
            f"--local-cluster {args.local_cluster} is invalid: expected 0 (run here) or more"
        )
    patients = read_patient_table(args.patient_csv) if args.patient_csv else None
    options = ReportOptions()
    if args.hpf_area is not None:
        options = ReportOptions(hpf_area_mm2=args.hpf_area)
    config = RunConfig(batch_size=args.batch_size, mpp=args.mpp)
    found = expand_slides(args.slides)
    for path, why in found.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    cancel = threading.Event()
    with _StopOnInterrupt(cancel), CohortProgressBar(len(found.slides), sys.stderr) as bar:
        result = run_cohort(
            found.slides,
            args.out,
            models=tuple(args.model or ()),
            options=options,
            config=config,
            device=args.device,
            formats=formats,
            patients=patients,
            missing_mpp=args.missing_mpp,
            scheduler=args.scheduler,
            local_cluster=args.local_cluster,
            restart=args.restart,
            cancel=cancel,
            on_progress=bar,
        )
    counts = {s: result.count(s) for s in (STATUS_DONE, STATUS_SKIPPED, STATUS_FAILED)}
    counts[STATUS_CANCELLED] = result.count(STATUS_CANCELLED)
    summary = {"cohort_csv": str(result.csv), "cohort_json": str(result.json)}
    print(json.dumps({**summary, "slides": len(result.rows), **counts}, indent=2))
    for row in result.failed:
        error = str(row["error"])
        where = "" if row["slide"] in error else f"{row['slide']}: "
        print(f"error: {where}{error}", file=sys.stderr)
    if result.failed:
        print(f"{len(result.failed)} slide(s) failed; details in {result.json}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if cancel.is_set() or result.cancelled:
        return EXIT_INTERRUPTED
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .inference.engine import RunConfig
    from .reports.content import ReportOptions
    from .reports.job import ReportProgress, ReportRequest, make_report

    _check_positive("--hpf-area", args.hpf_area)
    _check_positive("--mpp", args.mpp)
    _check_positive("--batch-size", args.batch_size)
    formats = tuple(f.strip().lower() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in ("html", "pdf")]
    if unknown or not formats:
        raise HistoAIError(f"--format {args.format!r} is invalid: expected html, pdf or html,pdf")
    for path in [*args.paths, *(args.run or [])]:
        if not Path(path).exists():
            raise HistoAIError(f"{path} does not exist; check the path")
    options = ReportOptions(patient=args.patient, title=args.title)
    if args.hpf_area is not None:
        options = ReportOptions(hpf_area_mm2=args.hpf_area, patient=args.patient, title=args.title)
    request = ReportRequest(
        images=tuple(Path(p) for p in args.paths),
        out_dir=Path(args.out),
        models=tuple(args.model or ()),
        runs=tuple(Path(r) for r in args.run or ()),
        annotations=Path(args.annotations) if args.annotations else None,
        options=options,
        config=RunConfig(batch_size=args.batch_size, tissue=not args.no_tissue, mpp=args.mpp),
        device=args.device,
        formats=formats,
    )
    last_time, last_step = [0.0], [""]

    def progress(p: ReportProgress) -> None:
        now = time.monotonic()
        if p.step != last_step[0] or now - last_time[0] >= PROGRESS_INTERVAL_S:
            last_time[0], last_step[0] = now, p.step
            print(f"[{p.index + 1}/{p.n_steps}] {p.message}", file=sys.stderr, flush=True)

    cancel = threading.Event()
    with _StopOnInterrupt(cancel):
        result = make_report(request, cancel=cancel, on_progress=progress)
    if result.cancelled:
        print("stopped: no report written; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        json.dumps(
            {
                "files": {k: str(v) for k, v in result.files.items()},
                "runs": [str(r) for r in result.runs],
                "summary": result.report.summary,
            },
            indent=2,
        )
    )
    for sentence in result.report.summary:
        print(sentence, file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "infer":
        from .bench.infer import run_infer_benchmark
        from .inference.store import write_json_atomic

        _check_positive("--tiles", args.tiles)
        _check_positive("--batch-size", args.batch_size)
        result = run_infer_benchmark(
            args.path,
            model=args.model,
            generate=args.generate,
            n_tiles=args.tiles,
            device=args.device,
            batch_size=args.batch_size,
            bench_dir=args.bench_dir,
            source=args.source,
        )
        if args.json_out:
            from pathlib import Path

            write_json_atomic(Path(args.json_out), result)
        print(json.dumps(result, indent=2))
        return 0
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
    if args.what == "annotations":
        from .atomic import write_json_atomic as write_json
        from .bench.annotations import run_annotation_benchmark

        for n in args.sizes:
            _check_positive("--sizes", n)
        _check_positive("--repeats", args.repeats)
        result = run_annotation_benchmark(
            sizes=args.sizes,
            n_polygons=args.polygons,
            repeats=args.repeats,
            seed=args.seed,
            work_dir=args.work_dir,
        )
        if args.json_out:
            write_json(args.json_out, result)
        print(json.dumps(result, indent=2))
        return 0
    if args.what == "retrain":
        from .atomic import write_json_atomic as write_json
        from .bench.retrain import run_retrain_benchmark

        result = run_retrain_benchmark(
            model=args.model,
            data=args.data,
            corrections=args.corrections,
            epochs=args.epochs,
            learning_rate=args.lr,
            threads=args.threads,
            device=args.device,
            work_dir=args.work_dir,
        )
        if args.json_out:
            write_json(args.json_out, result)
        print(json.dumps(result, indent=2))
        return 0
    if args.what == "cohort":
        from .atomic import write_json_atomic as write_json
        from .bench.cohort import run_cohort_benchmark

        result = run_cohort_benchmark(
            args.paths,
            copies=args.copies,
            size=args.size,
            models=() if args.default_panel else tuple(args.model or ("mitosis-fcn",)),
            workers=args.workers,
            device=args.device,
            work_dir=args.work_dir,
        )
        if args.json_out:
            write_json(args.json_out, result)
        print(json.dumps(result, indent=2))
        return 0
    if args.what == "report":
        from .atomic import write_json_atomic as write_json
        from .bench.report import run_report_benchmark

        _check_positive("--repeats", args.repeats)
        result = run_report_benchmark(
            args.path,
            models=tuple(args.model or ()),
            repeats=args.repeats,
            device=args.device,
            work_dir=args.work_dir,
        )
        if args.json_out:
            write_json(args.json_out, result)
        print(json.dumps(result, indent=2))
        return 0
    raise HistoAIError(
        f"unknown benchmark {args.what!r}: expected one of: read, infer, annotations, retrain, "
        "cohort, report"
    )


def _cmd_train_default(args: argparse.Namespace) -> int:
    from .training.defaults import train_default

    argv = ["--data", str(args.data), "--out", str(args.out), "--seed", str(args.seed)]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    return train_default(args.task, argv)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .models.registry import load_registry
    from .training.defaults import evaluate_model

    load_registry().get(args.model)  # an unknown name fails here, listing the known ones
    weights = Path(args.weights) if args.weights else None
    result = evaluate_model(args.model, args.data, weights=weights)
    # the curves' per-sample labels and scores (up to 200k each) are for the plots
    shown = result if args.with_curves else {k: v for k, v in result.items() if k != "curves"}
    text = json.dumps(shown, indent=2, default=float)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    print(text)
    if args.plots:
        from .plots import evaluation_plots

        for path in evaluation_plots(result, args.plots, stem=args.model):
            print(f"wrote {path}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- annotations
def _open_image_ref(image: str, *, mpp: float | None = None) -> Any:
    """The `ImageRef` of ``image`` (opened once for its shape, µm/px and content hash)."""
    from .annotations.model import ImageRef
    from .io import open_image

    pyramid = open_image(image)
    try:
        if mpp is not None:
            pyramid.set_mpp(mpp)
        return ImageRef.from_pyramid(pyramid)
    finally:
        pyramid.close()


def _store_path(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from .annotations.store_paths import default_store_path

    if args.store:
        return Path(args.store)
    if not args.image:
        raise HistoAIError("give --store STORE, or --image IMG to use the store beside the image")
    return default_store_path(args.image)


def _open_store(args: argparse.Namespace) -> Any:
    """Open ``--store`` (or the image's default store), checked against ``--image``."""
    from .annotations.store import AnnotationStore

    ref = _open_image_ref(args.image) if args.image else None
    return AnnotationStore.open(_store_path(args), image=ref)


def _write_json_out(args: argparse.Namespace, result: Any) -> None:
    if getattr(args, "json_out", None):
        from pathlib import Path

        from .atomic import write_json_atomic

        write_json_atomic(Path(args.json_out), result)


def _store_summary(store: Any) -> dict[str, Any]:
    from collections import Counter

    from .annotations.model import KINDS, REVIEW_STATES

    classes: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for ann in store.iter_all():
        classes[ann.class_name] += 1
        sources[f"{ann.source}:{ann.model_version}" if ann.model_version else ann.source] += 1
    return {
        "store": str(store.path),
        "image": store.image.to_dict(),
        "classes": list(store.classes),
        "total": len(store),
        "by_kind": {k: n for k in KINDS if (n := store.count(kinds=[k]))},
        "by_review": {r: n for r in REVIEW_STATES if (n := store.count(reviews=[r]))},
        "by_class": dict(sorted(classes.items())),
        "by_source": dict(sorted(sources.items())),
        "can_undo": bool(store.can_undo),
        "metadata": dict(store.metadata),
    }


def _split_classes(text: str | None) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else []


def _cmd_import(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from .annotations.formats import import_annotations
    from .annotations.store import AnnotationStore

    file = Path(args.file)
    if not file.exists():
        raise HistoAIError(f"{file}: no such file to import")
    ref = _open_image_ref(args.image, mpp=args.image_mpp)
    classes = _split_classes(args.classes)
    store_path = _store_path(args)
    # read the file first: a file that fails leaves no new store behind
    store = AnnotationStore.open(store_path, image=ref) if store_path.exists() else None
    try:
        vocab = list(store.classes) if store is not None else []
        vocab += [c for c in classes if c not in vocab]
        kwargs: dict[str, Any] = {"classes": vocab, "allow_new_classes": not classes}
        if args.source is not None:
            kwargs["source"] = args.source
        if args.model_version is not None:
            kwargs["model_version"] = args.model_version
        image = store.image if store is not None else ref
        annotations = import_annotations(file, image=image, format=args.format, **kwargs)
        if store is None:
            store = AnnotationStore.create(store_path, ref, classes=classes)
        else:
            for name in classes:
                store.add_class(name)
        ids = store.add(annotations, label=f"import {file.name}", allow_new_classes=not classes)
        result = {
            "file": str(file),
            "store": str(store.path),
            "imported": len(ids),
            "by_kind": dict(Counter(a.kind for a in annotations)),
            "by_class": dict(Counter(a.class_name for a in annotations)),
            "by_review": dict(Counter(a.review for a in annotations)),
            "total": len(store),
        }
    finally:
        if store is not None:
            store.close()
    _write_json_out(args, result)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    store = _open_store(args)
    try:
        if args.format in ("ome-zarr", "nifti"):
            from .annotations.label_formats import export_nifti_labels, export_ome_zarr_labels
            from .annotations.labels import LabelPyramid
            from .annotations.store_paths import default_labels_path

            labels_path = args.labels or default_labels_path(store.path)
            if not args.labels and not labels_path.exists():
                raise HistoAIError(
                    f"--format {args.format} exports a label mask, and {store.path} has no "
                    f"label pyramid beside it ({labels_path.name}): give --labels LABELS"
                )
            labels = LabelPyramid.open(labels_path, image=store.image)
            writer = export_ome_zarr_labels if args.format == "ome-zarr" else export_nifti_labels
            path = writer(labels, out)
            count = None
        else:
            from .annotations.formats import export_annotations

            annotations = list(store.iter_all())
            path = export_annotations(
                annotations, out, image=store.image, format=args.format, classes=store.classes
            )
            count = len(annotations)
        result = {
            "store": str(store.path),
            "format": args.format,
            "out": str(path),
            "objects": count,
        }
    finally:
        store.close()
    _write_json_out(args, result)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_annotations(args: argparse.Namespace) -> int:
    from .annotations.store import AnnotationStore

    store = AnnotationStore.open(args.store)
    try:
        result = _store_summary(store)
    finally:
        store.close()
    _write_json_out(args, result)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_uncertainty(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from .inference.uncertainty import Ranking, iter_rank_regions, uncertainty_map

    umap = uncertainty_map(args.run)
    gen = iter_rank_regions(
        umap,
        region_um=args.region_um,
        top_k=args.top,
        quantile=None if args.mean else args.quantile,
        min_tissue=args.min_tissue,
    )
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            ranking: Ranking = stop.value
            break
    mpp = ranking.mpp
    result: dict[str, Any] = {
        "run": str(umap.run),
        "model": umap.model,
        "image": umap.image,
        "method": umap.method,
        "statistic": ranking.statistic,
        "level": ranking.level,
        "region_px": [round(v, 3) for v in ranking.region_px],
        "region_um": args.region_um if mpp is not None else None,
        "mpp": list(mpp) if mpp is not None else None,
        "regions_scored": ranking.n_scored,
        "regions": [r.to_dict(mpp) for r in ranking.regions],
    }
    if args.geojson:
        from .annotations.formats.geojson import export_geojson
        from .annotations.model import Annotation, ImageRef

        image_path = Path(umap.image)
        if image_path.exists():
            ref = _open_image_ref(str(image_path))
        else:  # the image moved: its identity from the run record (no content hash)
            n_plane = len(umap.planes)
            ref = ImageRef(
                path=umap.image,
                content_hash="",
                shape=(*umap.planes, *umap.image_shape),
                axes=("TZ"[2 - n_plane :] if n_plane else "") + "YX",
                mpp=mpp,
            )
        boxes = [
            Annotation(
                kind="box",
                coords=np.asarray(
                    [[r.top, r.left], [r.top + r.height, r.left + r.width]], dtype=np.float64
                ),
                class_name="review region",
                plane=r.plane,
                source=f"uncertainty:{umap.model}",
                confidence=float(r.score),
                review="unreviewed",
                measurements={"rank": float(r.rank), "uncertainty": float(r.score)},
            )
            for r in ranking.regions
        ]
        export_geojson(boxes, args.geojson, image=ref, provenance={"run": str(umap.run)})
        result["geojson"] = str(args.geojson)
    _write_json_out(args, result)
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- retraining
def _finetune_config(args: argparse.Namespace) -> Any:
    from .training.finetune import FinetuneConfig

    return FinetuneConfig(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        flips=not args.no_flips,
        rotations=not args.no_rotations,
        noise_sigma=args.noise,
        stain_jitter=args.stain_jitter,
        balanced=not args.no_balance,
        positive_fraction=args.positive_fraction,
        negative_feed=not args.no_negative_feed,
        hard_negative_weight=args.hard_negative_weight,
        loss=args.loss,
        pos_weight=args.pos_weight,
        freeze_batchnorm=not args.train_batchnorm,
        freeze_fraction=args.freeze_fraction,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .models.registry import load_registry
    from .training.finetune import finetune
    from .training.retrain import RetrainRequest, retrain

    spec = load_registry().get(args.model)
    config = _finetune_config(args)
    run_dir = Path(args.resume or args.run) if (args.resume or args.run) else None
    cancel = threading.Event()
    if args.image:
        if args.no_register:
            raise HistoAIError("--no-register works on training-set folders, not with --image")
        generator: Any = retrain(
            RetrainRequest(
                spec,
                image=args.image,
                store=args.store,
                sources=args.data,
                config=config,
                run_dir=run_dir,
                resume=bool(args.resume),
                models_dir=Path(args.models_dir) if args.models_dir else None,
            ),
            cancel,
        )
    elif not args.data:
        raise HistoAIError("give training-set folders (DATA) or --image IMG to train on")
    else:
        generator = finetune(
            spec,
            args.data,
            config=config,
            run_dir=run_dir,
            resume=bool(args.resume),
            register=not args.no_register,
            models_dir=args.models_dir,
            cancel=cancel,
        )
    last = 0.0
    with _StopOnInterrupt(cancel):
        while True:
            try:
                progress = next(generator)
            except StopIteration as stop:
                result = stop.value
                break
            now = time.monotonic()
            if progress.phase in ("prepare", "epoch", "register") or now - last > 2.0:
                last = now
                loss = "" if progress.loss is None else f"  loss {progress.loss:.4f}"
                step = f"  step {progress.step}/{progress.steps}" if progress.steps else ""
                text = progress.message or progress.phase
                print(
                    f"epoch {progress.epoch}/{progress.epochs}{step}{loss}  {text}",
                    file=sys.stderr,
                    flush=True,
                )
    if result is None:  # stopped during the export of the corrections
        print("error: stopped while exporting the corrections; run it again", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = result.summary()
    _write_json_out(args, summary)
    print(json.dumps(summary, indent=2, default=str))
    if result.cancelled:
        print(
            f"error: stopped after epoch {len(result.history)}; continue with "
            f"`napari-histo-ai train {args.model} {' '.join(map(str, args.data))} "
            + (f"--image {args.image} " if args.image else "")
            + f"--resume {result.run_dir}`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not result.improved and not args.no_register:
        print(
            "note: no epoch beat the parent on the validation items; no version registered",
            file=sys.stderr,
        )
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    from .models.registry import load_registry
    from .training.versions import versions_of

    registry = load_registry()
    rows = []
    for spec in versions_of(registry, args.model):
        training = dict(spec.card.training)
        rows.append(
            {
                "name": spec.name,
                "version": spec.version,
                "parent": f"{spec.card.parent} {spec.card.parent_version}".strip() or None,
                "weights": str(spec.weights) if spec.weights else None,
                "metrics": dict(spec.card.metrics),
                "before": training.get("before"),
                "run_dir": training.get("run_dir"),
                "sources": training.get("sources"),
            }
        )
    _write_json_out(args, rows)
    print(json.dumps(rows, indent=2, default=str))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .models.registry import load_registry
    from .training.finetune import evaluate_version

    registry = load_registry()
    specs = [registry.get(name) for name in args.models]
    result = evaluate_version(
        specs, args.data, val_fraction=args.val_fraction, device=args.device, split=args.split
    )
    shown = {k: v for k, v in result.items() if k != "curves"}
    _write_json_out(args, shown)
    print(json.dumps(shown, indent=2, default=str))
    if args.plots:
        from pathlib import Path

        from . import plots
        from .training.finetune import PLOTTED_METRICS

        out = Path(args.plots)
        written = plots.evaluation_plots(result, out, stem="compare")
        rates = {
            name: {k: v for k, v in m.items() if k in PLOTTED_METRICS}
            for name, m in result["metrics"].items()
        }
        curves = {k: (v["y_true"], v["scores"]) for k, v in result["curves"].items()}
        figure = plots.comparison_figure(rates, curves=curves, title=f"{args.split} items")
        written.append(plots.save_figure(figure, out / "compare_metrics.png"))
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_training_set(args: argparse.Namespace) -> int:
    from .annotations.model import ImageRef
    from .annotations.store import AnnotationStore
    from .annotations.training_set import ExportProgress, export_training_set_sync
    from .io import open_image

    _check_positive("--mpp", args.mpp)
    _check_positive("--patch-size", args.patch_size)
    _check_positive("--sigma-um", args.sigma_um)
    pyramid = open_image(args.image)
    try:
        if args.image_mpp is not None:
            pyramid.set_mpp(args.image_mpp)
        ref = ImageRef.from_pyramid(pyramid)
        store = AnnotationStore.open(_store_path(args), image=ref)
        labels = None
        try:
            if args.labels:
                from .annotations.labels import LabelPyramid

                labels = LabelPyramid.open(args.labels, image=store.image)
            last = [time.monotonic()]

            def report(p: ExportProgress) -> None:
                now = time.monotonic()
                if now - last[0] >= PROGRESS_INTERVAL_S or p.done == p.total:
                    last[0] = now
                    print(f"{p.done}/{p.total} samples", file=sys.stderr, flush=True)

            cancel = threading.Event()
            with _StopOnInterrupt(cancel):
                manifest = export_training_set_sync(
                    store,
                    pyramid,
                    args.out,
                    on_progress=report,
                    mpp=args.mpp,
                    patch_size=args.patch_size,
                    targets=args.targets,
                    sigma_um=args.sigma_um,
                    negatives_per_positive=args.negatives_per_positive,
                    labels=labels,
                    seed=args.seed,
                    cancel=cancel,
                    image_format=args.image_format,
                )
        finally:
            store.close()
    finally:
        pyramid.close()
    result = {
        "out": str(manifest.path),
        "complete": manifest.complete,
        "manifest": str(manifest.path / "manifest.json") if manifest.complete else None,
        "targets": manifest.targets,
        "mpp": manifest.mpp,
        "patch_size": manifest.patch_size,
        "counts": manifest.counts,
        "model_versions": manifest.model_versions,
        "annotators": manifest.annotators,
    }
    _write_json_out(args, result)
    print(json.dumps(result, indent=2))
    if not manifest.complete:
        print(
            f"error: {manifest.path}: stopped before the end, no manifest written "
            "(run the same command again)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


def _default_tasks() -> dict[str, str]:
    from .training.defaults import TASKS

    def data(folder: str) -> str:
        return "the whole data folder" if folder == "." else folder

    return {name: f"{t.summary} (data: {data(t.data)})" for name, t in TASKS.items()}


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
    p.add_argument(
        "--estimate-magnification",
        action="store_true",
        help="also estimate the objective from nucleus sizes in a few tissue regions (H&E)",
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

    p = sub.add_parser("models", help="list the registered models with their cards")
    p.add_argument("--json", action="store_true", help="print JSON (models and registry problems)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "train-default",
        help="reproduce a shipped weights file from the real data (seeded)",
    )
    p.add_argument(
        "task",
        choices=list(_default_tasks()),
        help="; ".join(f"{k}: {v}" for k, v in _default_tasks().items()),
    )
    p.add_argument("--data", required=True, help="the training data folder")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: as shipped")
    p.set_defaults(func=_cmd_train_default)

    p = sub.add_parser(
        "evaluate",
        help="print a model's metrics on a labelled folder (its held-out split) as JSON",
    )
    p.add_argument("--model", required=True, metavar="NAME", help="see `napari-histo-ai models`")
    p.add_argument("--data", required=True, metavar="DIR", help="the labelled data folder")
    p.add_argument(
        "--weights", default=None, metavar="FILE", help="score this weights file instead"
    )
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument(
        "--plots",
        default=None,
        metavar="DIR",
        help="write PNGs here: NAME_pr_roc.png (PR and ROC curves), NAME_confusion_*.png",
    )
    p.add_argument(
        "--with-curves",
        action="store_true",
        help="keep the curves' per-sample labels and scores in the JSON (large)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="run a model over images; one run folder per image, DIR/summary.json",
        description="Run a registered model over whole images or regions. Writes "
        "DIR/<image>.<model>.zarr per input (OME-Zarr outputs, GeoJSON objects, "
        "summary.json) and DIR/summary.json; prints the summaries as JSON. Runs "
        "already in DIR resume. Ctrl-C stops after the current batch (exit 130).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--model", required=True, metavar="NAME", help="see `napari-histo-ai models`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument(
        "--roi",
        action="append",
        metavar="X,Y,W,H",
        help="only this region, level-0 pixels (x = column); repeat for several regions "
        "(each gets its own run folder, DIR/<image>.<model>.roi-X-Y-W-H.zarr)",
    )
    p.add_argument(
        "--device", default="auto", metavar="D", help="auto (default), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="override the outputs' thresholds",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="M",
        help="µm/px of the images (overrides metadata)",
    )
    p.add_argument("--no-tissue", action="store_true", help="run every tile, background included")
    p.add_argument(
        "--restart", action="store_true", help="recompute runs found in DIR (default: resume)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--local-cluster",
        type=int,
        default=None,
        metavar="N",
        help="run one task per image (or region) on a local Dask cluster of N processes",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run the tasks on this Dask cluster (shared file system, same models)",
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "batch",
        help="a report per slide over many slides (on Dask) and DIR/cohort.csv",
        description="Run the report's models over every slide (files, or the slide / image "
        "files of folders) and write DIR/<slide>.report.{html,pdf,json,png} per slide and "
        "the cohort table DIR/cohort.csv (+ cohort.json), one row per slide, rewritten after "
        "each slide. One Dask task per slide, on a local cluster by default. Slides whose "
        "report is up to date are skipped; unfinished runs resume. A failing slide is a "
        "'failed' row and the others go on (exit 2). Ctrl-C stops after the current step "
        "(exit 130); run the same command again to resume.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDES", help="slide files and folders")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="registered model to run (repeat for several; default: the reports' panel "
        "for the image kind); see `napari-histo-ai models`",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument(
        "--restart", action="store_true", help="redo every slide (default: skip done ones)"
    )
    p.add_argument(
        "--patient-csv",
        default=None,
        metavar="FILE",
        help="CSV with 'slide' and 'patient' columns: a patient's slides make one report",
    )
    p.add_argument(
        "--hpf-area",
        type=float,
        default=None,
        metavar="MM2",
        help="area of one high-power field, mm² (default 0.237: field number 22 at 40x)",
    )
    p.add_argument(
        "--format", default="html,pdf", metavar="F", help="html, pdf or html,pdf (default)"
    )
    p.add_argument(
        "--device", default="auto", metavar="D", help="auto (default), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass"
    )
    mpp = p.add_mutually_exclusive_group()
    mpp.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="M",
        help="µm/px of every slide, overriding their metadata (for slides without one: "
        "--missing-mpp)",
    )
    mpp.add_argument(
        "--missing-mpp",
        type=float,
        default=None,
        metavar="M",
        help="µm/px of the slides whose file records none (the others keep theirs)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--local-cluster",
        type=int,
        default=None,
        metavar="N",
        help="workers of the local Dask cluster (default: min(CPU cores, slides)); 0: run "
        "here, one slide after the other, without Dask",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run on this Dask cluster instead: its workers must see the slides and DIR at "
        "the same paths (shared file system) and have the same models registered",
    )
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser(
        "report",
        help="a slide / patient report (HTML, PDF, thumbnail, JSON) from models or runs",
        description="Run the report's models on the image(s) (default: the panel for the "
        "image kind; complete runs in DIR are reused, partial ones resumed), measure them "
        "(mitoses per mm² and per 10 HPF, tumour fraction, benign / malignant call, "
        "magnification check...) and write DIR/<image>.report.{html,pdf,png,json}. Several "
        "images make one patient report. Prints the files as JSON and the summary "
        "sentences. Ctrl-C stops after the current batch (exit 130).",
    )
    p.add_argument("paths", nargs="+", metavar="IMAGE")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="registered model to run (repeat for several); see `napari-histo-ai models`",
    )
    p.add_argument(
        "--run",
        action="append",
        default=None,
        metavar="RUN.zarr",
        help="existing run folder to include (repeat); must be a run of one of the images",
    )
    p.add_argument(
        "--annotations",
        default=None,
        metavar="STORE",
        help="annotation store (*.sqlite): count reviewed objects instead of the model's",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--patient", default=None, metavar="ID", help="patient identifier")
    p.add_argument("--title", default=None, metavar="TEXT", help="the report's title")
    p.add_argument(
        "--hpf-area",
        type=float,
        default=None,
        metavar="MM2",
        help="area of one high-power field, mm² (default 0.237: field number 22 at 40x)",
    )
    p.add_argument(
        "--format", default="html,pdf", metavar="F", help="html, pdf or html,pdf (default)"
    )
    p.add_argument(
        "--device", default="auto", metavar="D", help="auto (default), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass"
    )
    p.add_argument("--no-tissue", action="store_true", help="run every tile, background included")
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="M",
        help="µm/px of the images (overrides metadata)",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="run a benchmark and print JSON")
    p.set_defaults(func=_cmd_bench)
    benches = p.add_subparsers(dest="what", required=True)

    p = benches.add_parser(
        "infer",
        help="engine throughput vs the bare model, peak memory, GUI responsiveness",
    )
    p.add_argument("path", metavar="PATH", help="slide whose centre region is timed")
    p.add_argument(
        "--model", default=None, metavar="NAME", help="registered model (default: nuclei-unet)"
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="generate the 10k x 10k and 100k x 100k memory slides in --bench-dir if absent",
    )
    p.add_argument("--tiles", type=int, default=256, metavar="N", help="tiles in the timed region")
    p.add_argument(
        "--device", default="auto", metavar="D", help="auto (default), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="tiles per forward pass"
    )
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument(
        "--bench-dir", default=".bench", metavar="DIR", help="where the memory slides live"
    )
    p.add_argument(
        "--source",
        metavar="PATH",
        default=None,
        help="real slide to tile the memory slides from (default: the bundled sample slide)",
    )
    p.set_defaults(func=_cmd_bench)

    p = benches.add_parser("read", help="open time, memory and region reads vs OpenSlide")
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

    p = benches.add_parser(
        "annotations",
        help="annotation store at 10^5-10^6 objects: build, viewport query, edit, undo, export",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        metavar="N",
        help="point counts, one store each (default: 100000 1000000)",
    )
    p.add_argument("--polygons", type=int, default=100_000, metavar="N", help="polygons (0: skip)")
    p.add_argument("--repeats", type=int, default=20, metavar="N", help="timed repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="where the temporary stores go")
    p.set_defaults(func=_cmd_bench)

    p = benches.add_parser(
        "retrain",
        help="the HITL loop on the sample slide: 50 corrections -> retrain -> re-run 2k x 2k",
    )
    p.add_argument("--model", default="mitosis-fcn", metavar="NAME")
    p.add_argument(
        "--data", nargs="*", default=[], metavar="DIR", help="rehearsal data (AMi-Br crops)"
    )
    p.add_argument("--corrections", type=int, default=50, metavar="N")
    p.add_argument("--epochs", type=int, default=4, metavar="N")
    p.add_argument("--lr", type=float, default=3e-4, metavar="R", help="Adam learning rate")
    p.add_argument("--threads", type=int, default=1, metavar="N")
    p.add_argument("--device", default="auto", metavar="D")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="keep the runs here")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_bench)

    p = benches.add_parser(
        "cohort",
        help="batch on a local Dask cluster of 2 workers vs the same reports one by one",
    )
    p.add_argument("paths", nargs="*", metavar="SLIDE", help="slides (default: --copies copies)")
    p.add_argument("--copies", type=int, default=4, metavar="N", help="synthetic slides")
    p.add_argument("--size", type=int, default=1024, metavar="PX", help="their side, px")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="model of the reports (repeat; default: mitosis-fcn)",
    )
    p.add_argument("--default-panel", action="store_true", help="the reports' default panel")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="local cluster size")
    p.add_argument("--device", default="cpu", metavar="D")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="keep slides and outputs")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_bench)

    p = benches.add_parser(
        "report",
        help="a report from existing runs vs reading its thumbnail level and the runs' time",
    )
    p.add_argument("path", nargs="?", default=None, metavar="SLIDE", help="default: the sample")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="model of the report (repeat; default: the panel for the image kind)",
    )
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="timed report builds")
    p.add_argument("--device", default="cpu", metavar="D", help="device of the one-off runs")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="keep the runs and reports")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "import",
        help="add the objects of an annotation file to an image's store (one undoable step)",
        description="Read GeoJSON (QuPath), CSV points, COCO JSON or a mini-MIAS Info.txt "
        "and add its objects to the image's annotation store (created if absent; default: "
        "<image>.annotations.sqlite beside the image). Prints the counts as JSON.",
    )
    p.add_argument("file", metavar="FILE", help="the annotation file to import")
    p.add_argument("--image", required=True, metavar="IMG", help="the image annotated")
    p.add_argument("--store", default=None, metavar="STORE", help="the store (.sqlite)")
    p.add_argument(
        "--format", default=None, metavar="F", help="geojson, csv, coco or mias (default: sniffed)"
    )
    p.add_argument("--source", default=None, metavar="S", help="source: 'human' or a model name")
    p.add_argument("--model-version", default=None, metavar="V", help="the model's version")
    p.add_argument(
        "--classes",
        default=None,
        metavar="A,B,...",
        help="allowed classes (added to the store's); objects of other classes are refused. "
        "Default: any class, new ones join the store's vocabulary",
    )
    p.add_argument(
        "--image-mpp", type=float, default=None, metavar="M", help="µm/px of the image (override)"
    )
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser(
        "export",
        help="write a store's objects (or a label pyramid) as GeoJSON, CSV, COCO, MIAS, "
        "OME-Zarr or NIfTI labels",
    )
    p.add_argument("--store", default=None, metavar="STORE", help="default: beside --image")
    p.add_argument("--image", default=None, metavar="IMG", help="the image (identity checked)")
    p.add_argument(
        "--format",
        required=True,
        choices=["geojson", "csv", "coco", "mias", "ome-zarr", "nifti"],
    )
    p.add_argument("--out", required=True, metavar="PATH", help="the file (or folder) to write")
    p.add_argument(
        "--labels",
        default=None,
        metavar="LABELS",
        help="label pyramid for ome-zarr / nifti (default: <image>.labels.zarr beside the store)",
    )
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "training-set",
        help="export patches + targets around reviewed objects, with a manifest",
        description="Cut patches at exactly --mpp µm/px around reviewed objects "
        "(accepted, corrected, added), rejected model objects (hard negatives) and random "
        "negatives, with mask / point-map / box targets; DIR/manifest.csv and "
        "DIR/manifest.json are written last. Ctrl-C stops (exit 130, no manifest).",
    )
    p.add_argument("--store", default=None, metavar="STORE", help="default: beside --image")
    p.add_argument("--image", required=True, metavar="IMG", help="the image annotated")
    p.add_argument("--out", required=True, metavar="DIR", help="new, empty or earlier set")
    p.add_argument("--mpp", required=True, type=float, metavar="M", help="µm per patch pixel")
    p.add_argument("--patch-size", type=int, default=256, metavar="N", help="patch edge, px")
    p.add_argument("--targets", default="auto", choices=["auto", "mask", "points", "boxes"])
    p.add_argument(
        "--sigma-um", type=float, default=4.0, metavar="S", help="σ of point targets, µm"
    )
    p.add_argument(
        "--negatives-per-positive", type=float, default=1.0, metavar="R", help="default 1"
    )
    p.add_argument("--labels", default=None, metavar="LABELS", help="mask targets from here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-format", default="png", choices=["png", "tif"])
    p.add_argument(
        "--image-mpp", type=float, default=None, metavar="M", help="µm/px of the image (override)"
    )
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_training_set)

    p = sub.add_parser(
        "annotations", help="print a store's summary (counts per kind, review, class) as JSON"
    )
    p.add_argument("store", metavar="STORE", help="an *.annotations.sqlite store")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_annotations)

    p = sub.add_parser(
        "uncertainty",
        help="rank the regions of a run by uncertainty (entropy or MC-dropout) as JSON",
        description="Map a run's predictive entropy (or its MC-dropout uncertainty), cut "
        "the image into squares of --region-um and print the most uncertain ones (µm and "
        "level-0 px). --geojson writes them as QuPath rectangles that `import` loads as "
        "review boxes.",
    )
    p.add_argument("run", metavar="RUN.zarr", help="a run folder (predict / Run model)")
    p.add_argument("--top", type=int, default=20, metavar="N", help="regions to list")
    p.add_argument(
        "--region-um", type=float, default=256.0, metavar="UM", help="side, µm (px without mpp)"
    )
    p.add_argument("--quantile", type=float, default=0.9, metavar="Q", help="score = this quantile")
    p.add_argument("--mean", action="store_true", help="score regions by their mean instead")
    p.add_argument(
        "--min-tissue", type=float, default=0.25, metavar="F", help="skip regions below this"
    )
    p.add_argument("--geojson", default=None, metavar="FILE", help="write the regions here")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_uncertainty)

    p = sub.add_parser(
        "train",
        help="fine-tune a registered model on training sets; registers a new version",
        description="Fine-tune MODEL on training-set folders (`training-set`, or the Review "
        "widget's export) and folders of real data (the AMi-Br mitosis crops), with a fixed "
        "validation split, balanced batches, the negative feed and hard negatives, early "
        "stopping and a checkpoint per epoch. The result is registered as MODEL-vN in the "
        "user model folder with its card (parent, data, config, metrics before/after); "
        "curves and comparison PNGs go to the run folder. Ctrl-C stops after the current "
        "batch (exit 130); --resume continues.",
    )
    p.add_argument("model", metavar="MODEL", help="see `napari-histo-ai models`")
    p.add_argument("data", nargs="*", metavar="DATA", help="training-set or data folders")
    p.add_argument(
        "--image",
        default=None,
        metavar="IMG",
        help="first export this image's reviewed corrections (its store) as a training set",
    )
    p.add_argument("--store", default=None, metavar="STORE", help="with --image: the store")
    p.add_argument("--epochs", type=int, default=6, metavar="N")
    p.add_argument("--lr", type=float, default=3e-4, metavar="R", help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="N")
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--no-rotations", action="store_true")
    p.add_argument("--noise", type=float, default=0.02, metavar="S", help="Gaussian noise σ")
    p.add_argument("--stain-jitter", type=float, default=0.05, metavar="S", help="OD jitter σ")
    p.add_argument("--no-balance", action="store_true", help="no positive/negative balancing")
    p.add_argument("--positive-fraction", type=float, default=1 / 3, metavar="F")
    p.add_argument("--no-negative-feed", action="store_true")
    p.add_argument("--hard-negative-weight", type=float, default=2.0, metavar="W")
    p.add_argument(
        "--loss", default="auto", choices=["auto", "wbce", "bce_dice", "ce", "rare_hinge"]
    )
    p.add_argument("--pos-weight", type=float, default=5.0, metavar="W", help="wbce weight")
    p.add_argument("--train-batchnorm", action="store_true", help="re-estimate BN statistics")
    p.add_argument(
        "--freeze-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="keep this share of the parameter tensors (the first layers) as the parent's",
    )
    p.add_argument("--patience", type=int, default=3, metavar="N", help="0: no early stop")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", metavar="D")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--run", default=None, metavar="DIR", help="run folder (default: new)")
    runs.add_argument("--resume", default=None, metavar="DIR", help="continue this run")
    p.add_argument("--no-register", action="store_true", help="do not register a version")
    p.add_argument("--models-dir", default=None, metavar="DIR", help="register versions here")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "versions", help="list a model's versions (lineage) with parents and metrics as JSON"
    )
    p.add_argument("model", metavar="MODEL", help="any version of the lineage")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_versions)

    p = sub.add_parser(
        "compare",
        help="score model versions side by side on the same validation items",
        description="Score each MODEL on the same fixed validation items of DATA (the split "
        "`train` holds out) and print the metrics side by side; --plots writes PR / ROC, "
        "confusion and comparison PNGs.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--data", nargs="+", required=True, metavar="DATA")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F")
    p.add_argument("--device", default="auto", metavar="D")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNGs here")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=_cmd_compare)
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
    except KeyboardInterrupt:
        print("error: interrupted (runs resume when the command is run again)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
