"""Magnification of an H&E image from its own pixels (paper 004, Otálora et al. 2018).

Two estimators share this module:

* **classical, no training** (`nucleus_areas`, `estimate_magnification`): hematoxylin
  channel by colour deconvolution (scikit-image ``rgb2hed``), Otsu threshold over the
  tissue pixels, 4-connected blobs, blobs under 20 px and blobs touching the border
  dropped (the paper's rules for its segmentation baseline), mean blob area in px →
  magnification. A true nucleus area in pixels grows with the square of the
  magnification, but this pipeline's blobs do not (split nuclei at 40×, merged ones and
  the 20 px floor at 5×), so the conversion ``m = m_ref · (area / area_ref)^(1/e)`` uses a
  reference (`REFERENCE_AREA_PX` at `REFERENCE_MAGNIFICATION`) and an exponent
  (`AREA_EXPONENT`) both calibrated with this very pipeline on MICCAI 2015 tiles of known
  objective (see the constants).
* **the fusion of the two learnt regressors** (`fuse`, `area_to_magnification`): the
  paper's ``α · m_area + (1 − α) · m_direct`` with ``α = 0.2`` (α weights the magnification
  read from the regressed *area*; the direct regression gets ``1 − α``).

Every continuous estimate is snapped to the paper's set `MAGNIFICATIONS` (5, 8, 10, 15,
20, 30, 40×) by the nearest value on a log scale (the set is roughly geometric).

Objective power and pixel size are related by the convention **µm/px = 10 / objective**
(`mpp_from_magnification`): 20× ↔ 0.5 µm/px, 40× ↔ 0.25 µm/px, the usual values of
Aperio / Hamamatsu scanners (real scanners differ by up to ~10 %: MIDOG's 40× is
0.23 µm/px).

`estimate_slide_magnification` runs the classical estimator on a few tissue regions of
a lazy `Pyramid` (level 0, the image's own pixels) and compares the result with the
file's objective power / pixel size. No Qt, no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import HistoAIError

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid

__all__ = [
    "ALPHA",
    "AREA_EXPONENT",
    "MAGNIFICATIONS",
    "MIN_AREA_PX",
    "REFERENCE_AREA_PX",
    "REFERENCE_MAGNIFICATION",
    "MagnificationEstimate",
    "NucleusAreas",
    "RegionEstimate",
    "area_to_magnification",
    "class_areas",
    "estimate_magnification",
    "estimate_slide_magnification",
    "fuse",
    "hematoxylin",
    "magnification_from_area",
    "magnification_from_mpp",
    "mpp_from_magnification",
    "nearest_magnification",
    "nucleus_areas",
    "steps_apart",
]

#: the paper's magnification classes (objective power)
MAGNIFICATIONS: tuple[int, ...] = (5, 8, 10, 15, 20, 30, 40)
#: weight of the area-derived magnification in the fusion (paper: α = 0.2)
ALPHA = 0.2
#: blobs below this many pixels are not nuclei (paper: the smallest true nucleus at 5× is 24 px)
MIN_AREA_PX = 20
#: magnification at which `REFERENCE_AREA_PX` was measured
REFERENCE_MAGNIFICATION = 40.0
#: Calibration of the classical pipeline, area = REFERENCE_AREA_PX · (m / 40)^AREA_EXPONENT:
#: a least-squares line of log(mean blob area) on log(magnification) over the six MICCAI
#: 2015 tiles (TCGA brain tumours; image01-03 at 20×, image08/09/11 at 40×), each block-
#: averaged to every class of `MAGNIFICATIONS` its resolution allows (36 tile ×
#: magnification pairs; `napari_histo_ai.training.magnification.calibrate_classical`).
#: The measured exponent is ≈ 1, not the geometric 2: at 30-40× Otsu splits textured
#: nuclei into pieces, at 5-10× touching nuclei merge and the 20 px floor removes the
#: smallest ones. With the exponent fixed at 2 (and the reference fitted) only 28 % of
#: those pairs get the right class, with the fitted law 50 % (92 % within one class;
#: leaving each tile out of the fit in turn: 44 %, 92 % within one).
REFERENCE_AREA_PX = 225.0
AREA_EXPONENT = 0.98
#: µm/px · objective power (µm/px = 10 / objective)
MPP_TIMES_MAGNIFICATION = 10.0


# --------------------------------------------------------------------------- conversions


def nearest_magnification(value: float | np.ndarray) -> float | np.ndarray:
    """The paper's class nearest to ``value`` on a log scale (NaN stays NaN).

    Parameters
    ----------
    value : float or numpy.ndarray
        Continuous magnification(s), objective power (> 0).

    Returns
    -------
    float or numpy.ndarray
        Elements of `MAGNIFICATIONS` (same shape as ``value``).
    """
    v = np.asarray(value, dtype=np.float64)
    table = np.log(np.asarray(MAGNIFICATIONS, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.where(v > 0, v, np.nan))
    idx = np.abs(np.nan_to_num(logs, nan=0.0)[..., None] - table).argmin(axis=-1)
    out = np.where(np.isnan(logs), np.nan, np.asarray(MAGNIFICATIONS, dtype=np.float64)[idx])
    return float(out) if out.ndim == 0 else out


def steps_apart(a: float, b: float) -> int:
    """How many classes of `MAGNIFICATIONS` lie between ``a`` and ``b`` (after snapping)."""
    ia = MAGNIFICATIONS.index(int(nearest_magnification(a)))
    ib = MAGNIFICATIONS.index(int(nearest_magnification(b)))
    return abs(ia - ib)


def mpp_from_magnification(magnification: float) -> float:
    """Pixel size for an objective power: ``10 / magnification`` µm/px (20× → 0.5)."""
    if not magnification > 0:
        raise HistoAIError(f"magnification must be positive, got {magnification}")
    return MPP_TIMES_MAGNIFICATION / float(magnification)


def magnification_from_mpp(mpp: float) -> float:
    """Objective power for a pixel size: ``10 / mpp`` (0.25 µm/px → 40×)."""
    if not mpp > 0:
        raise HistoAIError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    return MPP_TIMES_MAGNIFICATION / float(mpp)


def magnification_from_area(
    area_px: float | np.ndarray,
    *,
    reference_area_px: float = REFERENCE_AREA_PX,
    reference_magnification: float = REFERENCE_MAGNIFICATION,
    exponent: float = 2.0,
) -> float | np.ndarray:
    """Continuous magnification from a mean nucleus area: ``m_ref · (area / area_ref)^(1/e)``.

    ``exponent = 2`` is geometry (true nucleus areas scale with m²); the classical
    pipeline's measured areas scale with `AREA_EXPONENT` instead.

    Parameters
    ----------
    area_px : float or numpy.ndarray
        Mean nucleus area, pixels² (NaN or ≤ 0 → NaN).
    reference_area_px : float
        Mean area, px², at ``reference_magnification``.
    reference_magnification : float
    exponent : float
        Area ∝ magnification^exponent.

    Returns
    -------
    float or numpy.ndarray
    """
    a = np.asarray(area_px, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ratio = np.where(a > 0, a, np.nan) / reference_area_px
        out = reference_magnification * ratio ** (1.0 / exponent)
    return float(out) if out.ndim == 0 else out


def class_areas(
    reference_area_px: float, reference_magnification: float = REFERENCE_MAGNIFICATION
) -> np.ndarray:
    """Mean nucleus area (px²) of every class of `MAGNIFICATIONS`, scaling with m²."""
    m = np.asarray(MAGNIFICATIONS, dtype=np.float64)
    return np.asarray(reference_area_px * (m / reference_magnification) ** 2)


def area_to_magnification(area_px: np.ndarray, areas_by_class: Sequence[float]) -> np.ndarray:
    """The paper's area → magnification rule: the class whose mean area is closest.

    Parameters
    ----------
    area_px : numpy.ndarray
        Predicted mean nucleus areas, px², any shape.
    areas_by_class : sequence of float
        Mean area of each class of `MAGNIFICATIONS` (e.g. the training set's).

    Returns
    -------
    numpy.ndarray
        Magnifications (elements of `MAGNIFICATIONS`), the shape of ``area_px``.
    """
    table = np.asarray(areas_by_class, dtype=np.float64)
    if table.shape != (len(MAGNIFICATIONS),):
        raise HistoAIError(
            f"areas_by_class has {table.size} values; expected one per class {MAGNIFICATIONS}"
        )
    a = np.asarray(area_px, dtype=np.float64)
    idx = np.abs(a[..., None] - table).argmin(axis=-1)
    return np.asarray(MAGNIFICATIONS, dtype=np.float64)[idx]


def fuse(
    area_magnification: np.ndarray | float,
    direct_magnification: np.ndarray | float,
    *,
    alpha: float = ALPHA,
) -> np.ndarray:
    """The paper's linear fusion ``α · m_area + (1 − α) · m_direct`` (α = 0.2)."""
    if not 0.0 <= alpha <= 1.0:
        raise HistoAIError(f"alpha must be in [0, 1], got {alpha}")
    return np.asarray(
        alpha * np.asarray(area_magnification, dtype=np.float64)
        + (1.0 - alpha) * np.asarray(direct_magnification, dtype=np.float64)
    )


# --------------------------------------------------------------------------- classical


@dataclass(frozen=True)
class NucleusAreas:
    """Nucleus candidates of one image found by the classical pipeline.

    Attributes
    ----------
    areas_px : numpy.ndarray
        (n,) int areas (px²) of the kept blobs.
    threshold : float
        Otsu threshold on the hematoxylin channel (``rgb2hed`` units).
    tissue_fraction : float
        Fraction of pixels counted as tissue.
    """

    areas_px: np.ndarray
    threshold: float
    tissue_fraction: float

    @property
    def mean_area_px(self) -> float:
        """Mean blob area in px², NaN without blobs."""
        return float(self.areas_px.mean()) if self.areas_px.size else math.nan


def _rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise HistoAIError(f"{name}: expected an (H, W, 3) RGB array, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    return a


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: not glass (grey < 215 and saturation ≥ 0.05, 0..1 HSV units)."""
    f = rgb.astype(np.float32)
    top, bottom = f.max(axis=2), f.min(axis=2)
    saturation = (top - bottom) / np.maximum(top, 1.0)
    return np.asarray((f.mean(axis=2) < 215) & (saturation >= 0.05))


def hematoxylin(image: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of an RGB image (``(H, W)`` float, ``rgb2hed[..., 0]``)."""
    from skimage.color import rgb2hed

    return np.asarray(rgb2hed(_rgb(image))[..., 0], dtype=np.float32)


def nucleus_areas(image: np.ndarray, *, min_area_px: int = MIN_AREA_PX) -> NucleusAreas:
    """Nucleus blobs of an H&E image: hematoxylin, Otsu, 20 px floor, no border blobs.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` RGB (uint8, or float 0..1), any magnification.
    min_area_px : int
        Blobs smaller than this (px²) are dropped.

    Returns
    -------
    NucleusAreas
        Empty ``areas_px`` when the image has too little tissue (< 2 % or < 64 px).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rgb = _rgb(image)
    tissue = tissue_pixels(rgb)
    fraction = float(tissue.mean()) if tissue.size else 0.0
    if tissue.sum() < 64 or fraction < 0.02:
        return NucleusAreas(np.zeros(0, np.int64), math.nan, fraction)
    h = hematoxylin(rgb)
    # clipped to the 0.5-99.5 percentiles: a few saturated (black) pixels have huge
    # optical densities and would drag Otsu's threshold above every nucleus
    low, high = np.percentile(h[tissue], [0.5, 99.5])
    values = np.clip(h[tissue], low, high)
    if float(high - low) < 1e-6:
        return NucleusAreas(np.zeros(0, np.int64), math.nan, fraction)
    threshold = float(threshold_otsu(values))
    nuclei = ndimage.binary_fill_holes((h > threshold) & tissue)
    labels, n = ndimage.label(nuclei)
    if n == 0:
        return NucleusAreas(np.zeros(0, np.int64), threshold, fraction)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = areas >= min_area_px
    keep[0] = False
    keep[border] = False
    return NucleusAreas(areas[keep].astype(np.int64), threshold, fraction)


def estimate_magnification(
    image: np.ndarray,
    *,
    reference_area_px: float = REFERENCE_AREA_PX,
    reference_magnification: float = REFERENCE_MAGNIFICATION,
    exponent: float = AREA_EXPONENT,
    min_nuclei: int = 3,
) -> tuple[float, float, int]:
    """Classical magnification estimate of one H&E patch or region.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` RGB at its own resolution.
    reference_area_px, reference_magnification, exponent : float
        Calibration: mean blob area (px²) of this pipeline at that magnification, and
        how it scales (area ∝ m^exponent).
    min_nuclei : int
        Fewer kept blobs than this give NaN (the paper kept patches with ≥ 3 nuclei).

    Returns
    -------
    (magnification, mean_area_px, n_nuclei) : (float, float, int)
        Continuous magnification (NaN when undetermined), mean blob area in px², blobs
        counted. Snap with `nearest_magnification`.
    """
    found = nucleus_areas(image)
    n = int(found.areas_px.size)
    if n < min_nuclei:
        return math.nan, found.mean_area_px, n
    area = found.mean_area_px
    value = magnification_from_area(
        area,
        reference_area_px=reference_area_px,
        reference_magnification=reference_magnification,
        exponent=exponent,
    )
    return float(value), area, n


# --------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class RegionEstimate:
    """The classical estimate on one region of a slide (level-0 pixels)."""

    top: int
    left: int
    size: int
    magnification: float
    mean_area_px: float
    n_nuclei: int


@dataclass(frozen=True)
class MagnificationEstimate:
    """Image-level magnification estimated from a slide's own pixels.

    Attributes
    ----------
    magnification : float or None
        The estimate snapped to `MAGNIFICATIONS` (``None`` when no region had nuclei).
    continuous : float or None
        Median of the regions' continuous estimates.
    mpp : float or None
        Pixel size implied by the estimate, µm/px (``10 / magnification``).
    regions : tuple of RegionEstimate
        Every region read, with its own value (NaN where it had < 3 nuclei).
    metadata_magnification : float or None
        What the file says: its objective power, else ``10 / mpp`` of its pixel size.
    metadata_source : str
        ``"objective"``, ``"mpp"`` or ``"none"``.
    steps : int or None
        Classes between the estimate and the metadata (``None`` without either).
    warning : str
        A sentence when metadata and estimate disagree by more than one class, or the
        estimate is missing; else ``""``.
    method : str
        How the value was computed (for records).
    """

    magnification: float | None
    continuous: float | None
    mpp: float | None
    regions: tuple[RegionEstimate, ...]
    metadata_magnification: float | None
    metadata_source: str
    steps: int | None
    warning: str
    method: str = field(default="")

    @property
    def disagrees(self) -> bool:
        """Metadata and estimate are more than one class apart."""
        return self.steps is not None and self.steps > 1

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (NaN region values become ``None``)."""

        def number(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 3)

        return {
            "magnification": self.magnification,
            "continuous": None if self.continuous is None else round(self.continuous, 3),
            "mpp": None if self.mpp is None else round(self.mpp, 4),
            "mpp_convention": "10 µm/px ÷ magnification",
            "metadata_magnification": self.metadata_magnification,
            "metadata_source": self.metadata_source,
            "steps_apart": self.steps,
            "warning": self.warning,
            "method": self.method,
            "regions": [
                {
                    "top": r.top,
                    "left": r.left,
                    "size_px": r.size,
                    "magnification": number(r.magnification),
                    "mean_area_px": number(r.mean_area_px),
                    "n_nuclei": r.n_nuclei,
                }
                for r in self.regions
            ],
        }

    def describe(self) -> str:
        """One or two lines for a status bar or a CLI."""
        used = sum(1 for r in self.regions if not math.isnan(r.magnification))
        if self.magnification is None or self.continuous is None or self.mpp is None:
            text = f"magnification: not determined ({len(self.regions)} regions, no nuclei)"
        else:
            text = (
                f"estimated magnification {self.magnification:g}× "
                f"(continuous {self.continuous:.1f}×, {used}/{len(self.regions)} regions) "
                f"→ {self.mpp:.3g} µm/px at 10 µm/px ÷ magnification"
            )
        if self.metadata_magnification is not None:
            text += f"; file: {self.metadata_magnification:.3g}× ({self.metadata_source})"
        else:
            text += "; the file records no magnification / pixel size"
        if self.warning:
            text += f"\n{self.warning}"
        return text


def _metadata_magnification(pyramid: Pyramid) -> tuple[float | None, str]:
    if pyramid.objective_power:
        return float(pyramid.objective_power), "objective"
    if pyramid.mpp is not None and pyramid.mpp_source == "file":
        return magnification_from_mpp(float(np.mean(pyramid.mpp))), "mpp"
    return None, "none"


def _overview(pyramid: Pyramid, max_pixels: int) -> tuple[np.ndarray, float] | None:
    """An RGB overview of the whole slide and its level-0 px per overview px."""
    h0 = pyramid.spatial_shape(0)[-2]
    for level in range(len(pyramid.levels) - 1, -1, -1):
        h, w = pyramid.spatial_shape(level)[-2:]
        if h * w <= max_pixels:
            rgb = pyramid.read_region((0, 0), (h, w), level=level, fill_value=255)
            return _rgb(rgb, pyramid.path), h0 / h
    thumb = pyramid.associated.get("thumbnail")
    if thumb is not None:
        rgb = np.asarray(thumb())
        if rgb.ndim == 3:
            return _rgb(rgb, pyramid.path), h0 / rgb.shape[0]
    return None


def _pick_regions(
    pyramid: Pyramid, n_regions: int, region_px: int, overview_pixels: int
) -> list[tuple[int, int]]:
    """Top-left corners (level 0) of ``n_regions`` tissue-rich regions, spread out."""
    h0, w0 = pyramid.spatial_shape(0)[-2:]
    rows, cols = max(1, h0 // region_px), max(1, w0 // region_px)
    off_r, off_c = (h0 - rows * region_px) // 2, (w0 - cols * region_px) // 2
    corners = [
        (off_r + r * region_px, off_c + c * region_px) for r in range(rows) for c in range(cols)
    ]
    score = np.ones(len(corners))
    ov = _overview(pyramid, overview_pixels)
    if ov is not None:
        rgb, ds = ov
        tissue = tissue_pixels(rgb)
        for i, (top, left) in enumerate(corners):
            r0, c0 = int(top / ds), int(left / ds)
            r1, c1 = (
                max(r0 + 1, int((top + region_px) / ds)),
                max(c0 + 1, int((left + region_px) / ds)),
            )
            patch = tissue[r0:r1, c0:c1]
            score[i] = float(patch.mean()) if patch.size else 0.0
    order = np.argsort(-score, kind="stable")
    good = [i for i in order if score[i] >= 0.5] or [int(i) for i in order[: max(1, n_regions)]]
    if len(good) <= n_regions:
        chosen = good
    else:
        # spread: the tissue-rich candidates in raster order, taken at even intervals
        ranked = sorted(good)
        picks = np.linspace(0, len(ranked) - 1, n_regions).round().astype(int)
        chosen = [ranked[p] for p in picks]
    return [corners[i] for i in chosen]


def estimate_slide_magnification(
    pyramid: Pyramid,
    *,
    n_regions: int = 6,
    region_px: int = 512,
    reference_area_px: float = REFERENCE_AREA_PX,
    reference_magnification: float = REFERENCE_MAGNIFICATION,
    exponent: float = AREA_EXPONENT,
    overview_pixels: int = 16_000_000,
) -> MagnificationEstimate:
    """Estimate a slide's level-0 magnification from nuclei in a few tissue regions.

    Parameters
    ----------
    pyramid : Pyramid
        An opened 2D RGB slide or image (H&E); only ``n_regions`` regions of level 0
        and one overview (the coarsest level under ``overview_pixels``, else the
        associated thumbnail) are read.
    n_regions : int
        Regions to read, chosen among the tissue-rich ones (≥ 50 % tissue in the
        overview), spread over the slide in raster order.
    region_px : int, level-0 pixels
        Side of each square region. In pixels, not µm: the pixel size is what is being
        estimated (512 px is 128 µm at 40×, 1 mm at 5×).
    reference_area_px, reference_magnification, exponent : float
        Calibration of the classical estimator (see `REFERENCE_AREA_PX`).
    overview_pixels : int
        Largest overview read to find tissue, pixels.

    Returns
    -------
    MagnificationEstimate
        Median of the regions' continuous estimates, snapped to `MAGNIFICATIONS`, with
        the per-region values and the comparison with the file's metadata.

    Raises
    ------
    HistoAIError
        The image is not a 2D RGB image, or ``n_regions`` / ``region_px`` are not positive.
    """
    if n_regions < 1 or region_px < 16:
        raise HistoAIError(
            f"n_regions must be ≥ 1 and region_px ≥ 16, got {n_regions} and {region_px}"
        )
    if pyramid.axes != "YXS" or pyramid.levels[0].shape[-1] < 3:
        raise HistoAIError(
            f"{pyramid.path}: magnification is estimated on 2D RGB (H&E) images; this one "
            f"has axes {pyramid.axes!r}, shape {tuple(pyramid.levels[0].shape)}"
        )
    regions = []
    for top, left in _pick_regions(pyramid, n_regions, region_px, overview_pixels):
        rgb = pyramid.read_region((top, left), (region_px, region_px), level=0, fill_value=255)
        value, area, n = estimate_magnification(
            rgb,
            reference_area_px=reference_area_px,
            reference_magnification=reference_magnification,
            exponent=exponent,
        )
        regions.append(RegionEstimate(top, left, region_px, value, area, n))
    values = np.array([r.magnification for r in regions], dtype=np.float64)
    values = values[~np.isnan(values)]
    meta, source = _metadata_magnification(pyramid)
    if values.size == 0:
        return MagnificationEstimate(
            None,
            None,
            None,
            tuple(regions),
            meta,
            source,
            None,
            "no nuclei found in the regions read: the magnification cannot be estimated "
            "(is this H&E tissue?)",
            "classical",
        )
    continuous = float(np.median(values))
    snapped = float(nearest_magnification(continuous))
    steps = steps_apart(snapped, meta) if meta is not None else None
    warning = ""
    if steps is not None and steps > 1:
        warning = (
            f"the file says {meta:.3g}× ({source}) but the nuclei look like {snapped:g}× "
            f"({steps} classes apart): check the pixel size before running models"
        )
    return MagnificationEstimate(
        snapped,
        continuous,
        mpp_from_magnification(snapped),
        tuple(regions),
        meta,
        source,
        steps,
        warning,
        f"classical nucleus area, reference {reference_area_px:g} px² at "
        f"{reference_magnification:g}×, area ∝ m^{exponent:g}",
    )
