"""Make a slide / patient report: run the models, measure, draw, write the files.

`report_job` is the generator the "Generate report" widget drives in a worker, and
`make_report` the synchronous path of ``napari-histo-ai report`` and the cohort task.
For each image it runs each requested model with the engine into
``out_dir/<stem>.<model>.zarr`` (a complete run of the same model version on the same
image is reused, a partial one resumed), then measures the runs and the slide, draws
the thumbnail and writes, atomically::

    out_dir/<stem>.report.html     self-contained page (inline CSS, data-URI images)
    out_dir/<stem>.report.pdf      the same content (reportlab)
    out_dir/<stem>.report.png      the thumbnail with overlays
    out_dir/<stem>.report.json     the content, written last: "complete": true

With neither models nor runs the default panel for the image kind is used
(``panels.yaml``: H&E slide, mammogram, MRI volume). Setting ``cancel`` stops after
the current batch of the current model; runs stay resumable and no report file is
replaced.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HistoAIError
from ..inference.engine import RunConfig
from .content import Measure, Report, ReportOptions, SlideSection, fmt_number
from .measures import (
    RunData,
    SlideContext,
    check_run_image,
    measure_magnification,
    measure_run,
    measure_tissue,
    model_entry,
    open_run,
    slide_context,
)

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid
    from ..models.loading import Predictor

__all__ = [
    "FORMATS",
    "REPORT_VERSION",
    "ReportProgress",
    "ReportRequest",
    "ReportResult",
    "default_panel",
    "image_kind",
    "make_report",
    "panel_for",
    "report_job",
    "report_paths",
    "up_to_date",
]

#: bump when the report's content changes for the same inputs (up_to_date then redoes it)
REPORT_VERSION = 2
#: formats a request may ask for (the JSON and the thumbnail are always written)
FORMATS = ("html", "pdf")
#: measure order in a slide section and in the summary
_ORDER = (
    "mitosis",
    "tumour",
    "malignancy",
    "magnification",
    "boxes",
    "lesions",
    "tissue",
    "generic",
)


@dataclass(frozen=True)
class ReportRequest:
    """Everything one report needs.

    Parameters
    ----------
    images : tuple of Path
        One slide, or several slides of one patient.
    out_dir : Path
        Runs and report files go here (created).
    models : tuple of str
        Registered models to run (complete runs in ``out_dir`` reused, partial resumed,
        missing computed). Empty and no ``runs``: the default panel for the image kind.
    runs : tuple of Path
        Existing run folders (``*.zarr``) to include as they are; each must belong to one
        of the images.
    annotations : Path, optional
        An annotation store: its reviewed objects replace the model's points (accepted,
        corrected and added are counted, rejected and unreviewed are not). One image only.
    options : ReportOptions
    config : RunConfig
        Engine options for the runs (``mpp`` and ``tissue`` are also used by the measures).
    device : str
    formats : tuple of str
        Any of `FORMATS`.
    stem : str, optional
        File stem; default the (first) image's stem.
    """

    images: tuple[Path, ...]
    out_dir: Path
    models: tuple[str, ...] = ()
    runs: tuple[Path, ...] = ()
    annotations: Path | None = None
    options: ReportOptions = field(default_factory=ReportOptions)
    config: RunConfig = field(default_factory=RunConfig)
    device: str = "auto"
    formats: tuple[str, ...] = ("html", "pdf")
    stem: str | None = None


@dataclass(frozen=True)
class ReportProgress:
    """One progress record of `report_job`.

    Parameters
    ----------
    step : str
        ``"run <model>"``, ``"measure"``, ``"thumbnail"``, ``"html"``, ``"pdf"``, ``"json"``.
    index, n_steps : int
        0-based step number and the number of steps.
    done, total : int
        Tiles done / to do in the current model run (0 for other steps).
    message : str
        One human line.
    """

    step: str
    index: int
    n_steps: int
    done: int
    total: int
    message: str

    @property
    def fraction(self) -> float:
        """Overall progress in [0, 1] (a model run's tiles count within its step)."""
        inner = self.done / self.total if self.total else 0.0
        return min(1.0, (self.index + inner) / self.n_steps) if self.n_steps else 1.0


@dataclass(frozen=True)
class ReportResult:
    """What `report_job` made.

    Parameters
    ----------
    report : Report
    files : dict of str to Path
        ``{"html", "pdf", "json", "thumbnail"}`` (those written); empty when cancelled.
    runs : tuple of Path
        The run folders used.
    cancelled : bool
        Stopped by ``cancel`` before the files were written (runs are resumable).
    """

    report: Report
    files: dict[str, Path]
    runs: tuple[Path, ...]
    cancelled: bool = False


# ----------------------------------------------------------------------------- panels
def image_kind(pyramid: Pyramid) -> str:
    """``volume`` (3D), ``mammogram`` (2D greyscale) or ``slide`` (2D colour)."""
    if pyramid.kind == "volume" or any(a in pyramid.axes for a in "Z"):
        return "volume"
    channels = int(pyramid.levels[0].shape[pyramid.axes.index("S")]) if "S" in pyramid.axes else 1
    return "mammogram" if channels == 1 else "slide"


def _panel_entries(kind: str) -> list[dict[str, Any]]:
    import yaml

    text = (Path(__file__).with_name("panels.yaml")).read_text(encoding="utf-8")
    panels = yaml.safe_load(text) or {}
    entries = panels.get(kind)
    if not entries:
        raise HistoAIError(
            f"no default models for a {kind} image; give the models to run with --model NAME"
        )
    return [e if isinstance(e, dict) else {"model": str(e)} for e in entries]


def default_panel(kind: str) -> tuple[str, ...]:
    """Every model of the default panel of an image kind (``reports/panels.yaml``)."""
    return tuple(str(e["model"]) for e in _panel_entries(kind))


def panel_for(pyramid: Pyramid) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The default models for this image, and why any of the panel's were left out.

    A panel entry may carry ``max_megapixels``: a model that reads an image at its own
    pixels (no µm/px, e.g. breakhis-resnet for microscope fields) would classify
    millions of crops on a whole slide, so it is left out of larger images' default
    reports with a sentence saying how to run it on a region instead.

    Returns
    -------
    (models, notes) : (tuple of str, tuple of str)
    """
    h, w = (int(v) for v in pyramid.spatial_shape(0)[-2:])
    megapixels = h * w / 1e6
    models: list[str] = []
    notes: list[str] = []
    for entry in _panel_entries(image_kind(pyramid)):
        limit = entry.get("max_megapixels")
        if limit is not None and megapixels > float(limit):
            why = entry.get("reason") or "it is meant for smaller images"
            notes.append(
                f"{entry['model']} was not run: {why} — this image has {megapixels:,.0f} "
                f"megapixels (the default report runs it up to {float(limit):g}). Run it on "
                "a region (Run model ▸ Shape) and include that run, or name it with --model "
                "to run it on the whole image."
            )
            continue
        models.append(str(entry["model"]))
    return tuple(models), tuple(notes)


def report_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """Where the report files of ``stem`` go in ``out_dir``."""
    base = Path(out_dir)
    return {
        "html": base / f"{stem}.report.html",
        "pdf": base / f"{stem}.report.pdf",
        "thumbnail": base / f"{stem}.report.png",
        "json": base / f"{stem}.report.json",
    }


def _stem(request: ReportRequest) -> str:
    from ..inference.batch import image_stem

    if request.stem:
        return request.stem
    if not request.images:
        raise HistoAIError("no image given: a report needs at least one image")
    return image_stem(request.images[0])


def _check_formats(formats: tuple[str, ...]) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise HistoAIError(
            f"unknown report format {', '.join(bad)}: expected any of {', '.join(FORMATS)}"
        )


# ----------------------------------------------------------------------------- planning
@dataclass
class _Image:
    path: Path
    pyramid: Pyramid
    kind: str
    models: list[str]
    runs: list[Path] = field(default_factory=list)
    notes: tuple[str, ...] = ()


def _open(path: Path) -> Pyramid:
    from ..io import open_image

    return open_image(path)


def _image_key(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path), "size": None, "mtime": None}
    return {"path": str(path), "size": st.st_size, "mtime": int(st.st_mtime)}


def _plan(request: ReportRequest) -> list[_Image]:
    """Open the images, resolve the models (or default panel), assign the given runs."""
    if not request.images:
        raise HistoAIError("no image given: a report needs at least one image")
    images: list[_Image] = []
    try:
        for p in request.images:
            path = Path(p).expanduser().absolute()
            pyramid = _open(path)
            kind = image_kind(pyramid)
            models = list(request.models)
            notes: tuple[str, ...] = ()
            if not models and not request.runs:
                chosen, notes = panel_for(pyramid)
                models = list(chosen)
            images.append(_Image(path, pyramid, kind, models, notes=notes))
        for r in request.runs:
            run = open_run(r)
            owner = None
            problems = []
            for im in images:
                try:
                    check_run_image(run, im.path, tuple(im.pyramid.levels[0].shape))
                except HistoAIError as exc:
                    problems.append(str(exc))
                    continue
                owner = im
                break
            if owner is None:
                raise HistoAIError(
                    problems[0]
                    if len(problems) == 1
                    else (
                        f"run folder {run.path} was made on {run.record.get('image')} "
                        f"(shape {run.image_shape}), which is none of the images given "
                        f"({', '.join(str(i.path) for i in images)})"
                    )
                )
            owner.runs.append(run.path)
    except BaseException:
        for im in images:
            im.pyramid.close()
        raise
    if request.annotations is not None and len(images) > 1:
        for im in images:
            im.pyramid.close()
        raise HistoAIError(
            "--annotations belongs to one image; make one report per slide to use corrections"
        )
    return images


def _reusable(run_dir: Path, spec: Any, image: _Image, config: RunConfig) -> bool:
    """A complete whole-image run of this model version (same fingerprint) on this image,
    made with the same pixel size, tissue detection and threshold."""
    if not (run_dir / "summary.json").is_file():
        return False
    try:
        run = open_run(run_dir)
        check_run_image(run, image.path, tuple(image.pyramid.levels[0].shape))
    except HistoAIError:
        return False
    summary = run.summary or {}
    mpp = summary.get("image_mpp")
    same_mpp = config.mpp is None or (
        mpp is not None and all(abs(float(v) - config.mpp) < 1e-9 for v in mpp)
    )
    tissue_off = summary.get("tissue") == "off"
    same_tissue = tissue_off == (not config.tissue) or bool(run.record.get("planes"))
    return bool(
        config.resume  # --restart: every run is computed again
        and run.complete
        and run.record.get("fingerprint") == spec.fingerprint()
        and run.record.get("model_version") == spec.version
        and summary.get("roi") is None
        and same_mpp
        and same_tissue
        and config.threshold is None
        and config.polygon is None
    )


def _request_key(request: ReportRequest, images: list[_Image]) -> dict[str, Any]:
    """What decides whether an existing report is still right (see `up_to_date`)."""
    from ..models.registry import load_registry

    registry = None
    models = []
    for im in images:
        for name in im.models:
            if registry is None:
                registry = load_registry()
            spec = registry.get(name)
            models.append(
                {"name": name, "version": spec.version, "fingerprint": spec.fingerprint()}
            )
    runs = []
    for im in images:
        for r in im.runs:
            stamp = r / "summary.json"
            runs.append(
                {"path": str(r), "mtime": int(stamp.stat().st_mtime) if stamp.is_file() else None}
            )
    ann = None
    if request.annotations is not None:
        ann = _image_key(Path(request.annotations))
        wal = Path(str(request.annotations) + "-wal")
        if wal.is_file():
            ann["wal_mtime"] = int(wal.stat().st_mtime)
    c = request.config
    return {
        "report_version": REPORT_VERSION,
        "images": [_image_key(im.path) for im in images],
        "models": models,
        "runs": runs,
        "annotations": ann,
        "options": asdict(request.options),
        "config": {
            "mpp": c.mpp,
            "tissue": c.tissue,
            "tissue_threshold": c.tissue_threshold,
            "threshold": c.threshold,
        },
        "formats": sorted(request.formats),
    }


def up_to_date(request: ReportRequest) -> dict[str, Any] | None:
    """The existing ``<stem>.report.json`` when the same request made it, else ``None``.

    Same request: the same images (path, size, mtime), models and their versions, run
    folders, annotations, options and formats, and every report file still present.
    Used to skip slides that are done.
    """
    stem = _stem(request)
    paths = report_paths(Path(request.out_dir).expanduser().absolute(), stem)
    try:
        data = json.loads(paths["json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("complete"):
        return None
    try:
        images = _plan(request)
    except HistoAIError:
        return None
    try:
        key = _request_key(request, images)
    except HistoAIError:
        return None
    finally:
        for im in images:
            im.pyramid.close()
    if data.get("request") != json.loads(json.dumps(key, default=str)):
        return None
    for name, path in (data.get("files") or {}).items():
        if not Path(path).is_file():
            return None
        if name not in ("json",) and name not in paths and not name.startswith("thumbnail"):
            return None
    return data


# ----------------------------------------------------------------------------- corrections
def _read_annotations(
    path: Path, image: _Image
) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Point annotations per class: ``counted`` (accepted / corrected / added),
    ``rejected`` and ``unreviewed``, each as (row, col, confidence)."""
    from ..annotations.store import AnnotationStore

    path = Path(path).expanduser().absolute()
    if path.is_dir():
        found = sorted(path.glob("*.sqlite"))
        if len(found) != 1:
            raise HistoAIError(
                f"{path} holds {len(found)} annotation stores (*.sqlite); give the store file"
            )
        path = found[0]
    if not path.is_file():
        raise HistoAIError(f"annotation store {path} does not exist; give a *.sqlite store")
    try:
        store = AnnotationStore.open(path)
    except Exception as exc:  # not a store, locked, another schema
        raise HistoAIError(f"cannot open annotation store {path}: {exc}") from None
    try:
        shape = tuple(int(v) for v in image.pyramid.spatial_shape(0)[-2:])
        if tuple(store.image.shape[-2:]) != shape:
            raise HistoAIError(
                f"annotation store {path} belongs to {store.image.path} (shape "
                f"{list(store.image.shape)}), not to {image.path} (shape {list(shape)})"
            )
        out: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
        for ann in store.iter_all(kinds=("point",)):
            r, c = (float(v) for v in ann.coords[0])
            conf = 1.0 if ann.confidence is None else float(ann.confidence)
            bucket = (
                "counted"
                if ann.review in ("accepted", "corrected", "added")
                else ("rejected" if ann.review == "rejected" else "unreviewed")
            )
            entry = out.setdefault(
                ann.class_name, {"counted": [], "rejected": [], "unreviewed": []}
            )
            entry[bucket].append((r, c, conf))
    finally:
        store.close()
    return out


# ----------------------------------------------------------------------------- content
def _section(
    image: _Image,
    runs: list[RunData],
    ctx: SlideContext,
) -> SlideSection:
    p = image.pyramid
    section = SlideSection(
        image=str(image.path),
        name=image.path.name,
        kind=image.kind,
        shape=[int(v) for v in p.spatial_shape(0)],
        mpp=list(ctx.mpp) if ctx.mpp else None,
        mpp_source=ctx.mpp_source,
        objective_power=p.objective_power,
        vendor=p.vendor,
    )
    section.warnings.extend(image.notes)
    if "dark background" in ctx.tissue.method:
        section.warnings.append(
            "This image has a dark background, as fluorescence or dark-field images do; the "
            "models here were trained on bright-field H&E, so their numbers on it are not "
            "meaningful."
        )
    measures: list[Measure] = []
    if image.kind != "volume":
        measures.append(measure_tissue(ctx))
    for run in runs:
        measures += measure_run(run, p, ctx)
        section.models.append(model_entry(run))
        if not run.complete:
            section.warnings.append(
                f"The {run.model} run is incomplete ({(run.summary or {}).get('tiles_done', 0)} "
                f"of {(run.summary or {}).get('tiles_total', '?')} tiles): its numbers cover only "
                "part of the slide."
            )
        for w in (run.summary or {}).get("warnings") or []:
            section.warnings.append(f"{run.model}: {w}")
    if (
        ctx.annotations
        and "mitosis" in ctx.annotations
        and not any(m.kind == "mitosis" for m in measures)
    ):  # reviewed mitoses without a mitosis run in the report: count them on their own
        from .measures import measure_mitosis

        measures.append(measure_mitosis(None, None, ctx))
    if image.kind == "slide" and not any(m.kind == "magnification" for m in measures):
        measures.append(measure_magnification(None, p, ctx))
    rank = {k: i for i, k in enumerate(_ORDER)}
    measures.sort(key=lambda m: rank.get(m.kind, len(_ORDER)))
    section.measures = measures
    section.summary = _slide_summary(measures)
    return section


def _slide_summary(measures: list[Measure]) -> list[str]:
    out: list[str] = []
    for kind in ("mitosis", "tumour", "malignancy", "boxes", "lesions", "magnification"):
        for m in measures:
            if m.kind == kind and m.sentences:
                out.append(m.sentences[0])
    if len(out) < 3:
        out += [m.sentences[0] for m in measures if m.kind == "tissue" and m.sentences]
    return out[:6]


def _measures_of(sections: list[SlideSection], kind: str) -> list[tuple[SlideSection, Measure]]:
    out = []
    for s in sections:
        m = s.measure(kind)
        if m is not None:
            out.append((s, m))
    return out


def _patient_measures(sections: list[SlideSection], options: ReportOptions) -> list[Measure]:
    """How several slides of one patient combine: total mitoses over total tissue, total
    tumour area over total tissue, mean malignant score and "any slide malignant"."""
    out: list[Measure] = []
    mit = _measures_of(sections, "mitosis")
    if mit:
        count = sum(int(m.values["count"]) for _, m in mit)
        areas = [m.values.get("tissue_mm2") for _, m in mit]
        table = [["Slide", "Mitoses", "Tissue mm²"]] + [
            [s.name, f"{m.values['count']:,}", fmt_number(m.values.get("tissue_mm2"))]
            for s, m in mit
        ]
        values: dict[str, Any] = {"count": count, "tissue_mm2": None, "per_hpf": None}
        known = [float(a) for a in areas if a is not None]
        if len(known) == len(areas) and sum(known) > 0:
            total = sum(known)
            per_hpf = count / total * options.hpf_count * options.hpf_area_mm2
            text = (
                f"Across {len(mit)} slides: {count:,} mitoses in {fmt_number(total)} mm² of "
                f"tissue ({fmt_number(per_hpf)} per {options.hpf_count} HPF of "
                f"{options.hpf_area_mm2:g} mm²)."
            )
            values.update(tissue_mm2=total, per_hpf=per_hpf)
        else:
            text = (
                f"Across {len(mit)} slides: {count:,} mitoses (no rate: a slide lacks its "
                "pixel size)."
            )
        out.append(
            Measure(
                "mitosis",
                "Mitoses, all slides",
                None,
                [text],
                values,
                table,
                ["Combined as the total count over the total tissue area of the slides."],
            )
        )
    tum = _measures_of(sections, "tumour")
    tum_areas = [(m.values.get("tumour_mm2"), m.values.get("tissue_mm2")) for _, m in tum]
    if tum and all(a is not None and b is not None for a, b in tum_areas):
        tumour = sum(float(a) for a, _ in tum_areas if a is not None)
        tissue = sum(float(b) for _, b in tum_areas if b is not None)
        frac = tumour / tissue if tissue > 0 else float("nan")
        text = (
            f"Across {len(tum)} slides about {frac:.0%} of the tissue looks like tumour "
            f"({fmt_number(tumour)} of {fmt_number(tissue)} mm²)."
            if tissue > 0
            else "No tissue was analysed for tumour."
        )
        table = [["Slide", "Tumour fraction", "Tumour mm²"]] + [
            [s.name, f"{m.values['fraction']:.1%}", fmt_number(m.values.get("tumour_mm2"))]
            for s, m in tum
        ]
        out.append(
            Measure(
                "tumour",
                "Tumour area, all slides",
                None,
                [text],
                {"fraction": frac, "tumour_mm2": tumour, "tissue_mm2": tissue},
                table,
                ["Combined as the total tumour area over the total tissue area."],
            )
        )
    mal = [(s, m) for s, m in _measures_of(sections, "malignancy")]
    mal = [(s, m) for s, m in mal if m.values.get("malignant_score") is not None]
    if mal:
        scores = [float(m.values["malignant_score"]) for _, m in mal]
        mean = sum(scores) / len(scores)
        any_mal = [s.name for s, m in mal if m.values.get("call") == "malignant"]
        text = f"Across {len(mal)} slides the mean malignant score is {mean:.2f}; " + (
            f"{len(any_mal)} slide{'s' if len(any_mal) > 1 else ''} called malignant "
            f"({', '.join(any_mal)}), so the patient is called malignant (any slide malignant)."
            if any_mal
            else "no slide is called malignant."
        )
        table = [["Slide", "Call", "Malignant score", "Method"]] + [
            [
                s.name,
                str(m.values.get("call")),
                f"{m.values['malignant_score']:.2f}",
                str(m.values.get("method")),
            ]
            for s, m in mal
        ]
        out.append(
            Measure(
                "malignancy",
                "Benign or malignant, patient level",
                None,
                [text],
                {"mean_score": mean, "any_malignant": bool(any_mal), "malignant_slides": any_mal},
                table,
                [
                    "Slides are combined two ways: the mean of the slides' malignant scores, and "
                    "'any slide malignant' (the patient is malignant if one slide is)."
                ],
            )
        )
    return out


def _report_summary(
    sections: list[SlideSection], patient: list[Measure], options: ReportOptions
) -> list[str]:
    if len(sections) == 1:
        s = sections[0]
        return list(s.summary) or ["No model result to summarise."]
    out = [
        f"{len(sections)} slides"
        + (f" of patient {options.patient}" if options.patient else "")
        + "."
    ]
    out += [m.sentences[0] for m in patient if m.sentences]
    return out[:6]


# ----------------------------------------------------------------------------- the job
def report_job(
    request: ReportRequest, *, cancel: threading.Event | None = None
) -> Generator[ReportProgress, None, ReportResult]:
    """Make a report; yields `ReportProgress`, returns `ReportResult`.

    Raises
    ------
    HistoAIError
        An unreadable image, an unknown model or format, a run folder of another image, an
        annotation store of another image, an image that does not fit a model.
    """
    from ..inference.batch import run_folder
    from ..models.registry import load_registry

    _check_formats(tuple(request.formats))
    out_dir = Path(request.out_dir).expanduser().absolute()
    stem = _stem(request)
    images = _plan(request)
    try:
        registry = load_registry() if any(im.models for im in images) else None
        specs = (
            {name: registry.get(name) for im in images for name in im.models} if registry else {}
        )
        jobs = [(im, name) for im in images for name in im.models]
        tail = ["measure", "thumbnail", *[f for f in FORMATS if f in request.formats], "json"]
        n_steps = len(jobs) + len(tail)
        out_dir.mkdir(parents=True, exist_ok=True)
        predictors: dict[str, Predictor] = {}
        used: dict[Path, list[Path]] = {im.path: list(im.runs) for im in images}
        # ---- runs
        for index, (im, name) in enumerate(jobs):
            spec = specs[name]
            run_dir = run_folder(out_dir, im.path, name)
            step = f"run {name}"
            if run_dir in used[im.path]:
                continue
            if _reusable(run_dir, spec, im, request.config):
                used[im.path].append(run_dir)
                yield ReportProgress(
                    step,
                    index,
                    n_steps,
                    0,
                    0,
                    f"{name} on {im.path.name}: reusing the complete run",
                )
                continue
            if cancel is not None and cancel.is_set():
                return _cancelled(request, images, used)
            if name not in predictors:
                from ..models.loading import load_model

                yield ReportProgress(step, index, n_steps, 0, 0, f"loading {name}")
                predictors[name] = load_model(spec, device=request.device)
            from ..inference.engine import run_model

            gen = run_model(
                im.pyramid, predictors[name], run_dir, config=request.config, cancel=cancel
            )
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                eta = f", {p.eta_s:.0f} s left" if p.eta_s else ""
                yield ReportProgress(
                    step,
                    index,
                    n_steps,
                    p.done,
                    p.total,
                    f"{name} on {im.path.name}: {p.done}/{p.total} tiles{eta}",
                )
            used[im.path].append(run_dir)
            if result.cancelled or (cancel is not None and cancel.is_set()):
                return _cancelled(request, images, used)
        if cancel is not None and cancel.is_set():
            return _cancelled(request, images, used)
        # ---- measures
        i = len(jobs)
        yield ReportProgress("measure", i, n_steps, 0, 0, "measuring")
        sections: list[SlideSection] = []
        run_data: list[list[RunData]] = []
        contexts: list[SlideContext] = []
        for im in images:
            runs = [open_run(r) for r in used[im.path]]
            for run in runs:
                check_run_image(run, im.path, tuple(im.pyramid.levels[0].shape))
            ctx = slide_context(
                im.pyramid,
                request.options,
                mpp=request.config.mpp,
                tissue=request.config.tissue,
                tissue_threshold=request.config.tissue_threshold,
            )
            if request.annotations is not None:
                ctx.annotations = _read_annotations(Path(request.annotations), im)
                ctx.annotations_path = str(request.annotations)
            sections.append(_section(im, runs, ctx))
            run_data.append(runs)
            contexts.append(ctx)
        patient = _patient_measures(sections, request.options) if len(sections) > 1 else []
        title = request.options.title or ("Patient report" if len(images) > 1 else "Slide report")
        report = Report(
            title=title,
            created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            options=request.options,
            slides=sections,
            patient=patient,
            summary=_report_summary(sections, patient, request.options),
            request=json.loads(json.dumps(_request_key(request, images), default=str)),
        )
        # ---- thumbnail
        i += 1
        yield ReportProgress("thumbnail", i, n_steps, 0, 0, "drawing the thumbnail")
        thumbs = {
            k: _thumbnail(im, runs, ctx, sec, request.options)
            for k, (im, runs, ctx, sec) in enumerate(
                zip(images, run_data, contexts, sections, strict=True)
            )
        }
        paths = report_paths(out_dir, stem)
        files: dict[str, Path] = {}
        from ..atomic import atomic_open

        for k, png in thumbs.items():
            target = paths["thumbnail"] if k == 0 else out_dir / f"{stem}.report.{k}.png"
            with atomic_open(target, "wb") as fh:
                fh.write(png)
            files["thumbnail" if k == 0 else f"thumbnail_{k}"] = _readable(target)
        # ---- html / pdf
        if "html" in request.formats:
            i += 1
            yield ReportProgress("html", i, n_steps, 0, 0, "writing the HTML page")
            from .html import render_html

            with atomic_open(paths["html"], "w", encoding="utf-8") as fh:
                fh.write(render_html(report, thumbs))
            files["html"] = _readable(paths["html"])
        if "pdf" in request.formats:
            i += 1
            yield ReportProgress("pdf", i, n_steps, 0, 0, "writing the PDF")
            from .pdf import write_pdf

            files["pdf"] = _readable(write_pdf(report, thumbs, paths["pdf"]))
        # ---- json, last
        i += 1
        yield ReportProgress("json", i, n_steps, 0, 0, "writing the report record")
        files["json"] = paths["json"]
        from ..atomic import write_json_atomic

        data = report.to_dict()
        data["files"] = {k: str(v) for k, v in files.items()}
        data["runs"] = [str(r) for im in images for r in used[im.path]]
        data["complete"] = True
        _readable(write_json_atomic(paths["json"], data))
        all_runs = tuple(r for im in images for r in used[im.path])
        return ReportResult(report, files, all_runs)
    finally:
        for im in images:
            im.pyramid.close()


def _readable(path: Path) -> Path:
    """Let others read a written report file (temporary files are created 0600)."""
    import contextlib

    with contextlib.suppress(OSError):
        Path(path).chmod(0o644)
    return path


def _cancelled(
    request: ReportRequest, images: list[_Image], used: dict[Path, list[Path]]
) -> ReportResult:
    report = Report(
        title=request.options.title or "Slide report",
        created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        options=request.options,
        slides=[],
        summary=["Stopped before the report was finished; run it again to resume the models."],
    )
    return ReportResult(
        report, {}, tuple(r for im in images for r in used[im.path]), cancelled=True
    )


def _thumbnail(
    image: _Image,
    runs: list[RunData],
    ctx: SlideContext,
    section: SlideSection,
    options: ReportOptions,
) -> bytes:
    from .thumbnail import draw_thumbnail, overlays_of

    mit = section.measure("mitosis")
    hot = mit.values.get("hotspot_box") if mit else None
    plane: tuple[int, ...] | None = None
    les = section.measure("lesions")
    if image.kind == "volume":
        best = max(
            (x for x in (les.values.get("lesions") if les else []) or []),
            key=lambda x: x["length_mm"] if x["length_mm"] == x["length_mm"] else -1,
            default=None,
        )
        plane = (int(best["slice"]),) if best else (int(image.pyramid.spatial_shape(0)[0]) // 2,)
    overlays = overlays_of(
        runs,
        hotspot=tuple(hot) if hot else None,
        annotations=ctx.annotations,
        plane=plane,
        hotspot_label=f"mitosis hotspot ({options.hpf_count} HPF window)",
        shape=ctx.shape,
    )
    thumb = draw_thumbnail(
        image.pyramid, overlays, max_px=options.thumbnail_px, mpp=ctx.mpp, plane=plane or ()
    )
    section.thumbnail_legend = thumb.legend
    caption = [f"{image.path.name}"]
    if plane is not None:
        caption.append(f"slice {plane[0]} (largest lesion)")
    if thumb.scale_bar:
        caption.append(f"scale bar {thumb.scale_bar}")
    else:
        caption.append("no scale bar: the pixel size is missing")
    caption.append("rings: detections (larger and more opaque = more confident)")
    section.thumbnail_caption = "; ".join(caption) + "."
    return thumb.png


def make_report(
    request: ReportRequest,
    *,
    cancel: threading.Event | None = None,
    on_progress: Callable[[ReportProgress], None] | None = None,
) -> ReportResult:
    """Drive `report_job` to the end in this thread (CLI, cohort tasks, tests)."""
    gen = report_job(request, cancel=cancel)
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            result: ReportResult = stop.value
            return result
        if on_progress is not None:
            on_progress(progress)
