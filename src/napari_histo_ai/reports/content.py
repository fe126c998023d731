"""What a report says, as plain data: no rendering, no file IO.

A `Report` holds one `SlideSection` per image (one slide, or several slides of one
patient) and, with several slides, a patient-level call. Each section is a list of
`Measure` records (mitosis count, tumour fraction, benign / malignant call, ...), each
with plain-language sentences and a table. `napari_histo_ai.reports.measures` fills them
from run folders; `napari_histo_ai.reports.html` and `napari_histo_ai.reports.pdf`
render the same content.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DISCLAIMER",
    "EXPLAINER",
    "Measure",
    "ModelEntry",
    "Report",
    "ReportOptions",
    "SlideSection",
    "fmt_number",
]

#: what "automated analysis" means, for readers who do not work with models
EXPLAINER = (
    "'Automated analysis' means computer programs (machine-learning models) that were "
    "trained on example images to mark mitoses, tumour areas or suspicious regions; each is "
    "listed under 'Models used' with its version, what it is meant for and its known "
    "limits. Its marks are suggestions, drawn on the picture so that they can be checked."
)
#: the statement every report carries
DISCLAIMER = (
    "Research use only, not a diagnosis. These numbers were computed by machine-learning "
    "models and must be checked by a pathologist before any clinical use."
)


@dataclass(frozen=True)
class ReportOptions:
    """How a report measures and draws.

    Parameters
    ----------
    hpf_area_mm2 : float
        Area of one high-power field, mm² (0.237 mm²: field number 22 at 40×, Ø 0.55 mm).
    hpf_count : int
        Mitoses are given "per ``hpf_count`` HPF" (10 by convention).
    thumbnail_px : int
        Longest side of the thumbnail, pixels.
    title : str, optional
        The report's title; default "Slide report" / "Patient report".
    patient : str, optional
        Patient identifier shown in the header (several slides make one report).
    """

    hpf_area_mm2: float = 0.237
    hpf_count: int = 10
    thumbnail_px: int = 1024
    title: str | None = None
    patient: str | None = None


@dataclass
class Measure:
    """One measured result of a slide (a section of the report).

    Parameters
    ----------
    kind : str
        ``tissue``, ``mitosis``, ``tumour``, ``malignancy``, ``magnification``,
        ``boxes``, ``lesions`` or ``generic``.
    title : str
        Section heading, plain language ("Mitotic count").
    model : str or None
        The model the numbers come from (``None`` for the tissue area).
    sentences : list of str
        What it means, in words; the first one goes into the slide's summary.
    values : dict
        The numbers (JSON-able, units in the key names: ``area_mm2``, ``per_mm2``...).
    table : list of list of str
        Rows of a two-or-more column table; the first row is the header.
    notes : list of str
        Caveats and methods (how it was computed, what cannot be computed and why).
    """

    kind: str
    title: str
    model: str | None
    sentences: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    table: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelEntry:
    """One model used by a report (its version, lineage, weights, run and card)."""

    name: str
    version: str
    task: str
    run: str
    parent: str = ""
    weights: str = ""
    weights_sha256: str = ""
    run_date: str = ""
    device: str = ""
    wall_s: float | None = None
    tiles: str = ""
    intended_use: str = ""
    limitations: str = ""
    complete: bool = True


@dataclass
class SlideSection:
    """Everything the report says about one image."""

    image: str
    name: str
    kind: str
    shape: list[int]
    mpp: list[float] | None
    mpp_source: str
    objective_power: float | None
    vendor: str | None
    measures: list[Measure] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    thumbnail_legend: list[dict[str, Any]] = field(default_factory=list)
    thumbnail_caption: str = ""

    def measure(self, kind: str) -> Measure | None:
        """The first measure of ``kind``, or ``None``."""
        return next((m for m in self.measures if m.kind == kind), None)


@dataclass
class Report:
    """A slide or patient report: sections per slide plus, for several, a patient call.

    Parameters
    ----------
    title : str
    created : str
        ISO 8601 date and time (UTC) the report was made.
    options : ReportOptions
    slides : list of SlideSection
    patient : list of Measure
        Patient-level results (only with several slides).
    summary : list of str
        The plain-language summary (3-6 sentences) shown first.
    request : dict
        What made the report (models, versions, options, image sizes / mtimes), used by
        `napari_histo_ai.reports.job.up_to_date`.
    """

    title: str
    created: str
    options: ReportOptions
    slides: list[SlideSection]
    patient: list[Measure] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able content (written as ``<stem>.report.json``)."""
        return {
            "title": self.title,
            "created": self.created,
            "options": asdict(self.options),
            "summary": list(self.summary),
            "slides": [_clean(asdict(s)) for s in self.slides],
            "patient": [_clean(asdict(m)) for m in self.patient],
            "request": self.request,
            "disclaimer": DISCLAIMER,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per slide for a cohort CSV (str / float / int / None values).

        Columns: ``image``, ``name``, ``patient``, ``mpp``, ``tissue_mm2``,
        ``mitoses``, ``mitoses_per_mm2``, ``mitoses_per_10hpf`` (the name follows
        ``hpf_count``), ``mitosis_hotspot``, ``tumour_fraction``, ``tumour_mm2``,
        ``malignant_score``, ``malignant_method``, ``malignant_mean_prob``,
        ``magnification_metadata``, ``magnification_estimate``,
        ``magnification_verdict``, ``boxes``, ``lesions``, ``models``, ``summary``.
        """
        hpf = f"per_{self.options.hpf_count}hpf"
        out = []
        for s in self.slides:
            row: dict[str, Any] = {
                "image": s.image,
                "name": s.name,
                "patient": self.options.patient,
                "mpp": round(float(sum(s.mpp) / 2), 6) if s.mpp else None,
            }
            tissue = s.measure("tissue")
            row["tissue_mm2"] = _num(tissue.values.get("area_mm2")) if tissue else None
            mit = s.measure("mitosis")
            row["mitoses"] = mit.values.get("count") if mit else None
            row["mitoses_per_mm2"] = _num(mit.values.get("per_mm2")) if mit else None
            row[f"mitoses_{hpf}"] = _num(mit.values.get("per_hpf")) if mit else None
            row["mitosis_hotspot"] = mit.values.get("hotspot_count") if mit else None
            tum = s.measure("tumour")
            row["tumour_fraction"] = _num(tum.values.get("fraction")) if tum else None
            row["tumour_mm2"] = _num(tum.values.get("tumour_mm2")) if tum else None
            mal = s.measure("malignancy")
            row["malignant_score"] = _num(mal.values.get("malignant_score")) if mal else None
            row["malignant_method"] = mal.values.get("method") if mal else None
            row["malignant_mean_prob"] = _num(mal.values.get("mean_probability")) if mal else None
            mag = s.measure("magnification")
            row["magnification_metadata"] = _num(mag.values.get("metadata")) if mag else None
            row["magnification_estimate"] = _num(mag.values.get("estimate")) if mag else None
            row["magnification_verdict"] = mag.values.get("verdict") if mag else None
            box = s.measure("boxes")
            row["boxes"] = box.values.get("count") if box else None
            les = s.measure("lesions")
            row["lesions"] = les.values.get("count") if les else None
            row["models"] = ";".join(f"{m.name}@{m.version}" for m in s.models)
            row["summary"] = " ".join(s.summary)
            out.append(row)
        return out


def _num(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def _clean(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def fmt_number(value: float | None) -> str:
    """A readable number, 3 significant figures: ``1,224``, ``57.8``, ``2.37``, ``0.465``;
    ``n/a`` for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    v = float(value)
    if abs(v) >= 100 or (v == int(v) and abs(v) < 1e15):
        return f"{round(v):,}"
    return f"{v:.3g}"
