"""Training-set export: image patches at a chosen µm/px with their targets, and a manifest.

`export_training_set` turns what annotators reviewed into a training set for the
retraining loop (issue 6):

- **positives**: one patch centred on every reviewed object, ``accepted``,
  ``corrected`` or ``added`` (``added`` objects are the model's misses: ``added_miss=1``);
- **hard negatives**: one patch centred on every *rejected model object* (a removed false
  positive: ``hard_negative=1``). Rejected objects never appear in any target;
- **negatives**: ``round(negatives_per_positive × (positives + hard negatives))``
  patches at random
  positions whose whole patch meets no object (any review state, rejected included:
  the centre is at least half a patch from every object's bounds), and is not
  background (see below). For volumes, negatives are drawn from the planes that hold
  reviewed objects.

``unreviewed`` objects are never used as positives (nobody vouched for them); they are
counted in the manifest (``counts["unreviewed_skipped"]``), and negatives avoid them.

Background rule
---------------
A candidate negative is rejected as background when the image is 8-bit (RGB or grey)
and its grey level (mean over channels) has **standard deviation < 12** (of 255) and
**mean > 220** (empty glass of a slide: bright *and* flat) or **mean < 35** (the air
around a mammogram: dark and flat). Pale tissue (fat, loose stroma) is bright but
textured and is kept. For other images (16-bit, float, MRI) only perfectly flat patches
(standard deviation 0, e.g. outside a volume's field of view) are rejected.

Resolution
----------
Patches are read with `Pyramid.read_region` (volumes: the plane's slice) at the coarsest
level whose pixels are no larger than ``mpp`` and resampled to **exactly** ``mpp``: output
pixel ``(i, j)`` of a patch centred on level-0 point ``(cy, cx)`` is centred on level-0
``(cy + (i + 0.5 - P/2)·s, cx + (j + 0.5 - P/2)·s)``, ``s = mpp / level-0 µm/px``
(bilinear, after a Gaussian anti-alias filter of σ = (f − 1)/2 level pixels when the
level is downsampled by a factor f > 1; the same rule as ``skimage.transform.resize``).
Pixels outside the image are white (255) for RGB uint8 slides, 0 otherwise.

Targets (``targets=``)
----------------------
``mask``
    ``uint8`` (``uint16`` above 255 classes) label image of the patch: 0 background,
    ``k`` = the store's class ``k - 1`` (``mask_values`` in the manifest), painted from
    polygons and boxes (`skimage.draw.polygon`), lines and polylines (1 patch px wide)
    and points (disks of radius ``sigma_um``). With ``labels=`` (a `LabelPyramid`),
    the mask is the label pyramid's window at the same mpp (nearest neighbour), and the
    values are the label pyramid's.
``points``
    ``float32`` probability map, the maximum over reviewed objects of
    ``exp(-d² / (2 sigma_um²))`` (``d`` in µm from the object's centre; peak 1): the
    dense targets an FCN trains on (paper 001; paper 000's tiles are positive where the
    map exceeds a threshold). Always written as TIFF.
``boxes``
    JSON ``{"boxes": [{"box": [top, left, bottom, right], "class": ..., "object_id":
    ...}, ...]}`` in patch pixels (continuous coordinates), clipped to the patch; points
    and lines get a box padded by ``sigma_um``.
``auto``
    ``mask`` with ``labels=``; else ``points`` when every reviewed object is a point,
    ``boxes`` when every one is a box, ``mask`` otherwise.

Every target holds *all* reviewed objects (accepted, corrected, added) inside its
patch, not only the one the patch is centred on; unreviewed objects are left out of
targets (nobody vouched for them) and rejected ones never appear. A patch is centred on
the centre of its object's bounds; an object larger than a patch is cut to the patch.

Files and crash-safety
----------------------
``out_dir/images/<index>_<kind>.<png|tif>``, ``out_dir/targets/<index>.<png|tif|json>``,
``out_dir/manifest.csv`` and ``out_dir/manifest.json``. Every file is written
atomically; the two manifests are written **last**, so a cancelled or crashed export
has no manifest and is never taken for a complete one (`read_manifest` refuses it).
Re-running into the same folder first removes the previous manifests, then the
previous ``images/`` and ``targets/``. A non-empty folder that is not a training set is
refused.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shutil
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..atomic import atomic_open, write_atomic, write_json_atomic
from ..errors import AnnotationError
from .model import HUMAN, Annotation

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid
    from .store import AnnotationStore

__all__ = [
    "BACKGROUND_MEAN",
    "BACKGROUND_STD",
    "DARK_MEAN",
    "MANIFEST_CSV",
    "MANIFEST_JSON",
    "SCHEMA_VERSION",
    "ExportProgress",
    "Sample",
    "TrainingSetManifest",
    "export_training_set",
    "export_training_set_sync",
    "read_manifest",
]

Targets = Literal["mask", "points", "boxes", "auto"]
TARGETS: tuple[str, ...] = ("mask", "points", "boxes", "auto")
SAMPLE_KINDS: tuple[str, ...] = ("positive", "negative", "hard_negative")
#: review states whose objects are positives
POSITIVE_REVIEWS: tuple[str, ...] = ("accepted", "corrected", "added")
SCHEMA_VERSION = 1
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
#: written first, removed never: marks a folder as (possibly partial) training-set output
MARKER = ".napari-histo-ai-training-set"
#: near-white background: grey mean above this (of 255) ...
BACKGROUND_MEAN = 220.0
#: ... and grey standard deviation below this
BACKGROUND_STD = 12.0
#: ... or grey mean below this (the air around a mammogram or an X-ray) and that std
DARK_MEAN = 35.0
#: negative candidates tried per negative wanted before giving up
NEGATIVE_ATTEMPTS = 50
CSV_COLUMNS: tuple[str, ...] = (
    "image",
    "target",
    "kind",
    "x",
    "y",
    "plane",
    "class",
    "object_id",
    "source",
    "model_version",
    "review",
    "hard_negative",
    "added_miss",
)
JSON_KEYS: tuple[str, ...] = (
    "schema_version",
    "image",
    "mpp",
    "patch_size",
    "targets",
    "sigma_um",
    "store",
    "model_versions",
    "annotators",
    "counts",
    "created",
    "parameters",
    "samples",
)


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ExportProgress:
    """One progress record, yielded after every written sample.

    ``done`` of ``total`` samples written; ``kind`` of the last one.
    """

    done: int
    total: int
    kind: str
    elapsed_s: float
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class Sample:
    """One row of the manifest.

    Parameters
    ----------
    image, target : str
        Patch and target files, relative to the training-set folder.
    kind : {"positive", "negative", "hard_negative"}
    x, y : float
        Patch centre in level-0 pixels (x = column, y = row).
    plane : tuple of int
        The plane of a volume (``()`` in 2-D).
    class_name, source, model_version, review : str or None
        Of the object the patch is centred on (empty / ``None`` for negatives).
    object_id : int or None
        Store id of that object (``None`` for negatives).
    hard_negative : bool
        The patch is centred on a rejected model object (a removed false positive).
    added_miss : bool
        The patch is centred on a human-added object (a miss of the model).
    """

    image: str
    target: str
    kind: str
    x: float
    y: float
    plane: tuple[int, ...] = ()
    class_name: str = ""
    object_id: int | None = None
    source: str = ""
    model_version: str | None = None
    review: str = ""
    hard_negative: bool = False
    added_miss: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["plane"] = list(self.plane)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(
            image=str(data["image"]),
            target=str(data["target"]),
            kind=str(data["kind"]),
            x=float(data["x"]),
            y=float(data["y"]),
            plane=tuple(int(v) for v in data.get("plane") or ()),
            class_name=str(data.get("class_name") or ""),
            object_id=None if data.get("object_id") is None else int(data["object_id"]),
            source=str(data.get("source") or ""),
            model_version=data.get("model_version"),
            review=str(data.get("review") or ""),
            hard_negative=bool(data.get("hard_negative")),
            added_miss=bool(data.get("added_miss")),
        )

    def csv_row(self) -> list[str]:
        return [
            self.image,
            self.target,
            self.kind,
            f"{self.x:.3f}",
            f"{self.y:.3f}",
            ";".join(str(p) for p in self.plane),
            self.class_name,
            "" if self.object_id is None else str(self.object_id),
            self.source,
            self.model_version or "",
            self.review,
            str(int(self.hard_negative)),
            str(int(self.added_miss)),
        ]


@dataclass
class TrainingSetManifest:
    """What `export_training_set` wrote (``manifest.json``, read back by `read_manifest`).

    ``complete`` is ``False`` for a cancelled export (then nothing was written as a
    manifest and ``samples`` lists the patches written so far).
    """

    path: Path
    image: dict[str, Any]
    mpp: float
    patch_size: int
    targets: str
    sigma_um: float
    store: str
    model_versions: list[str]
    annotators: list[str]
    counts: dict[str, int]
    created: str
    parameters: dict[str, Any]
    samples: list[Sample]
    classes: list[str] = field(default_factory=list)
    mask_values: dict[str, str] = field(default_factory=dict)
    image_dtype: str = ""
    schema_version: int = SCHEMA_VERSION
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "image": self.image,
            "mpp": self.mpp,
            "patch_size": self.patch_size,
            "targets": self.targets,
            "sigma_um": self.sigma_um,
            "store": self.store,
            "model_versions": self.model_versions,
            "annotators": self.annotators,
            "classes": self.classes,
            "mask_values": self.mask_values,
            "image_dtype": self.image_dtype,
            "counts": self.counts,
            "created": self.created,
            "parameters": self.parameters,
            "samples": [s.to_dict() for s in self.samples],
        }

    def samples_of(self, kind: str) -> list[Sample]:
        return [s for s in self.samples if s.kind == kind]


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Grid:
    """How patches map onto the pyramid: the level read and the level-0 px per patch px."""

    level: int
    level_scale: tuple[float, float]  # level-0 px per level px (row, col)
    step: tuple[float, float]  # level-0 px per patch px (row, col)
    patch: int

    @property
    def half(self) -> tuple[float, float]:
        """Half the patch, level-0 px (row, col)."""
        return (self.patch * self.step[0] / 2, self.patch * self.step[1] / 2)


def _pixel_um(pyramid: Pyramid) -> tuple[float, float] | None:
    if pyramid.mpp is not None:
        return (float(pyramid.mpp[0]), float(pyramid.mpp[1]))
    if pyramid.spacing_mm is not None and len(pyramid.spacing_mm) >= 2:
        return (float(pyramid.spacing_mm[-2]) * 1000, float(pyramid.spacing_mm[-1]) * 1000)
    return None


def _grid(pyramid: Pyramid, mpp: float, patch: int) -> _Grid:
    um = _pixel_um(pyramid)
    if um is None:
        raise AnnotationError(
            pyramid.path,
            "the image has no pixel size (mpp), so patches cannot be cut at a given µm/px",
            "set the image's mpp (e.g. `napari-histo-ai training-set ... --image-mpp 0.25`)",
        )
    scales = pyramid.level_scales()
    level = 0
    for i, (fy, fx) in enumerate(scales):
        if max(um[0] * fy, um[1] * fx) <= mpp * 1.01:
            level = i
    fy, fx = scales[level]
    return _Grid(level, (float(fy), float(fx)), (mpp / um[0], mpp / um[1]), patch)


def _plane_index(pyramid: Pyramid, level: int, plane: tuple[int, ...]) -> list[Any]:
    """Index of the level's array selecting ``plane`` (Y, X, S left as slices)."""
    lv = pyramid.levels[level]
    lv0 = pyramid.levels[0]
    others = [i for i, a in enumerate(pyramid.axes) if a not in "YXS"]
    values = [0] * (len(others) - len(plane)) + list(plane)  # (t, z) given (z,): t = 0
    key: list[Any] = [slice(None)] * lv.ndim
    for axis, value in zip(others, values, strict=True):
        n0, n = int(lv0.shape[axis]), int(lv.shape[axis])
        key[axis] = min(n - 1, int(value * n / n0)) if n0 else 0
    return key


def _read_level_window(
    pyramid: Pyramid, level: int, plane: tuple[int, ...], top: int, left: int, h: int, w: int
) -> np.ndarray:
    """A (h, w[, C]) window of ``level`` (padded outside the image)."""
    fill = _fill_value(pyramid)
    if not set(pyramid.axes) - set("YXS"):
        out = pyramid.read_region((top, left), (h, w), level=level, fill_value=fill)
        if pyramid.axes == "XY":
            out = out.T
        return out
    lv = pyramid.levels[level]
    key = _plane_index(pyramid, level, plane)
    ly, lx = pyramid.axes.index("Y"), pyramid.axes.index("X")
    y0, y1 = max(0, top), min(int(lv.shape[ly]), top + h)
    x0, x1 = max(0, left), min(int(lv.shape[lx]), left + w)
    keep = [a for i, a in enumerate(pyramid.axes) if not isinstance(key[i], int)]
    shape = {"Y": h, "X": w}
    if "S" in keep:
        shape["S"] = int(lv.shape[pyramid.axes.index("S")])
    order = [a for a in "YXS" if a in keep]
    out = np.full([shape[a] for a in order], fill, dtype=lv.dtype)
    if y1 > y0 and x1 > x0:
        key[ly], key[lx] = slice(y0, y1), slice(x0, x1)
        inside = np.asarray(lv[tuple(key)])
        inside = np.transpose(inside, [keep.index(a) for a in order])
        out[y0 - top : y1 - top, x0 - left : x1 - left] = inside
    return out


def _fill_value(pyramid: Pyramid) -> float:
    rgb = pyramid.channel_axis is not None and pyramid.levels[0].shape[pyramid.channel_axis] >= 3
    return 255 if rgb and pyramid.dtype == np.uint8 and pyramid.kind != "volume" else 0


def _resample(
    read: Any,
    grid: _Grid,
    centre: tuple[float, float],
    *,
    order: int,
    dtype: np.dtype,
) -> np.ndarray:
    """Resample a (P, P[, C]) patch centred on level-0 ``centre`` at exactly ``grid.step``.

    ``read(top, left, h, w)`` returns a window of the grid's level.
    """
    from scipy import ndimage
    from skimage.transform import AffineTransform, warp

    p = grid.patch
    # level px per patch px, and the level (continuous) coordinate of patch px 0's centre
    s = (grid.step[0] / grid.level_scale[0], grid.step[1] / grid.level_scale[1])
    first = (
        (centre[0] - grid.half[0]) / grid.level_scale[0] + 0.5 * s[0],
        (centre[1] - grid.half[1]) / grid.level_scale[1] + 0.5 * s[1],
    )
    # level index (pixel centre at integer k) of patch px 0, and of the last one
    i0 = (first[0] - 0.5, first[1] - 0.5)
    exact = all(abs(v - 1) < 1e-9 for v in s) and all(abs(v - round(v)) < 1e-6 for v in i0)
    if exact:  # same pixel grid: a plain copy, no interpolation at all
        return np.asarray(read(round(i0[0]), round(i0[1]), p, p), dtype=dtype)
    pad = 2 + math.ceil(3 * max(0.0, (max(s) - 1) / 2))
    top = math.floor(i0[0]) - pad
    left = math.floor(i0[1]) - pad
    h = math.ceil(i0[0] + (p - 1) * s[0]) + pad + 1 - top
    w = math.ceil(i0[1] + (p - 1) * s[1]) + pad + 1 - left
    window = np.asarray(read(top, left, h, w))
    work = window.astype(np.float32)
    if order > 0 and max(s) > 1:  # anti-alias as skimage.transform.resize does
        sigma = [max(0.0, (s[0] - 1) / 2), max(0.0, (s[1] - 1) / 2)] + [0.0] * (work.ndim - 2)
        work = ndimage.gaussian_filter(work, sigma, mode="nearest")
    # skimage transforms are in (x, y) = (col, row)
    tform = AffineTransform(
        matrix=np.array(
            [[s[1], 0.0, i0[1] - left], [0.0, s[0], i0[0] - top], [0.0, 0.0, 1.0]],
        )
    )
    out = warp(
        work,
        tform,
        output_shape=(p, p),
        order=order,
        mode="edge",
        preserve_range=True,
    )
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)


# --------------------------------------------------------------------------- targets
def _centre(ann: Annotation) -> tuple[float, float]:
    if ann.kind == "point":
        return (float(ann.coords[0, 0]), float(ann.coords[0, 1]))
    top, left, bottom, right = ann.bounds()
    return ((top + bottom) / 2, (left + right) / 2)


def _to_patch(coords: np.ndarray, grid: _Grid, centre: tuple[float, float]) -> np.ndarray:
    """Level-0 (row, col) → continuous patch pixel coordinates."""
    origin = np.array([centre[0] - grid.half[0], centre[1] - grid.half[1]])
    return (np.asarray(coords, dtype=np.float64) - origin) / np.asarray(grid.step)


def _mask_target(
    objects: Sequence[Annotation],
    grid: _Grid,
    centre: tuple[float, float],
    class_value: dict[str, int],
    *,
    sigma_px: float,
) -> np.ndarray:
    from skimage.draw import disk, line, polygon

    p = grid.patch
    n = max(class_value.values(), default=0)
    mask = np.zeros((p, p), dtype=np.uint8 if n <= 255 else np.uint16)
    # big objects first so small ones painted later stay visible
    for ann in sorted(objects, key=lambda a: -a.area_px()):
        value = class_value.get(ann.class_name, 0)
        pts = _to_patch(ann.ring() if ann.kind == "box" else ann.coords, grid, centre)
        if ann.kind in ("box", "polygon"):
            # vertices are continuous coords; pixel (i, j) is inside when its centre is
            rr, cc = polygon(pts[:, 0] - 0.5, pts[:, 1] - 0.5, shape=(p, p))
        elif ann.kind == "point":
            rr, cc = disk((pts[0, 0] - 0.5, pts[0, 1] - 0.5), max(sigma_px, 0.5), shape=(p, p))
        else:
            pieces = []
            for a, b in itertools.pairwise(pts):
                r, c = line(
                    round(a[0] - 0.5),
                    round(a[1] - 0.5),
                    round(b[0] - 0.5),
                    round(b[1] - 0.5),
                )
                keep = (r >= 0) & (r < p) & (c >= 0) & (c < p)
                pieces.append((r[keep], c[keep]))
            rr = np.concatenate([r for r, _ in pieces]) if pieces else np.zeros(0, int)
            cc = np.concatenate([c for _, c in pieces]) if pieces else np.zeros(0, int)
        mask[rr, cc] = value
    return mask


def _points_target(
    objects: Sequence[Annotation],
    grid: _Grid,
    centre: tuple[float, float],
    *,
    mpp: float,
    sigma_um: float,
) -> np.ndarray:
    """max over objects of exp(-d² / 2σ²), d in µm from the object's centre (peak 1).

    A patch pixel is exactly ``mpp`` µm on both axes.
    """
    p = grid.patch
    out = np.zeros((p, p), dtype=np.float32)
    if not objects:
        return out
    centres = _to_patch(np.array([_centre(a) for a in objects]), grid, centre)
    pixel = np.arange(p) + 0.5
    for cr, cc in centres:
        d2 = ((pixel - cr)[:, None] ** 2 + (pixel - cc)[None, :] ** 2) * mpp**2
        np.maximum(out, np.exp(-d2 / (2 * sigma_um**2)).astype(np.float32), out=out)
    return out


def _boxes_target(
    objects: Sequence[Annotation],
    grid: _Grid,
    centre: tuple[float, float],
    *,
    sigma_px: float,
) -> dict[str, Any]:
    p = grid.patch
    boxes = []
    for ann in objects:
        pts = _to_patch(ann.coords, grid, centre)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if ann.kind in ("point", "line", "polyline"):
            lo, hi = lo - sigma_px, hi + sigma_px
        lo, hi = np.clip(lo, 0, p), np.clip(hi, 0, p)
        if hi[0] <= lo[0] or hi[1] <= lo[1]:
            continue
        boxes.append(
            {
                "box": [round(float(v), 3) for v in (lo[0], lo[1], hi[0], hi[1])],
                "class": ann.class_name,
                "object_id": ann.id,
                "kind": ann.kind,
            }
        )
    return {"patch_size": p, "order": "top, left, bottom, right (patch px)", "boxes": boxes}


# --------------------------------------------------------------------------- writing
def _write_image(path: Path, array: np.ndarray) -> None:
    if path.suffix == ".png":
        from ..io.image import write_png

        write_atomic(path, lambda tmp: write_png(tmp, array))
    else:
        from ..io.tiff import write_array

        write_atomic(path, lambda tmp: write_array(tmp, array))


def _is_background(patch: np.ndarray) -> bool:
    """Empty glass (8-bit: bright and flat), empty air (8-bit: dark and flat), or flat."""
    grey = patch.astype(np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=2)
    if patch.dtype == np.uint8:
        mean, std = float(grey.mean()), float(grey.std())
        return std < BACKGROUND_STD and (mean > BACKGROUND_MEAN or mean < DARK_MEAN)
    return bool(grey.std() == 0)


def _prepare_folder(out_dir: Path) -> None:
    """Make ``out_dir`` ready: refuse foreign folders, remove a previous export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AnnotationError(out_dir, "is a file, not a folder", "choose a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        ours = (out_dir / MARKER).exists() or (out_dir / MANIFEST_JSON).exists()
        if not ours:
            raise AnnotationError(
                out_dir,
                "is not empty and holds no training set",
                "choose an empty or new folder (an earlier training set there is replaced)",
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    # manifests first: from here on the folder is never taken for a complete export
    for name in (MANIFEST_JSON, MANIFEST_CSV):
        (out_dir / name).unlink(missing_ok=True)
    with atomic_open(out_dir / MARKER, "w", encoding="utf-8") as fh:
        fh.write("napari-histo-ai training set (manifest.json is written last)\n")
    for sub in ("images", "targets"):
        if (out_dir / sub).is_dir():
            shutil.rmtree(out_dir / sub)
        (out_dir / sub).mkdir()


# --------------------------------------------------------------------------- the export
@dataclass
class _Plan:
    kind: str
    centre: tuple[float, float]
    plane: tuple[int, ...]
    obj: Annotation | None = None


def _auto_targets(positives: Iterable[Annotation], labels: Any) -> str:
    if labels is not None:
        return "mask"
    kinds = {a.kind for a in positives}
    if kinds == {"point"}:
        return "points"
    if kinds == {"box"}:
        return "boxes"
    return "mask"


def _check_pyramid(store: AnnotationStore, pyramid: Pyramid) -> None:
    shape = tuple(int(v) for v in pyramid.spatial_shape(0))
    if tuple(store.image.shape) != shape:
        raise AnnotationError(
            store.path,
            f"the store's image has shape {tuple(store.image.shape)} but {pyramid.path} "
            f"has {shape}",
            "export with the image the store was made for",
        )


def export_training_set(
    store: AnnotationStore,
    pyramid: Pyramid,
    out_dir: str | Path,
    *,
    mpp: float | None,
    patch_size: int = 256,
    targets: Targets = "auto",
    sigma_um: float = 4.0,
    negatives_per_positive: float = 1.0,
    labels: Any = None,
    seed: int = 0,
    cancel: threading.Event | None = None,
    image_format: Literal["png", "tif"] = "png",
) -> Generator[ExportProgress, None, TrainingSetManifest]:
    """Write patches and targets around reviewed objects, then the manifests (last).

    Parameters
    ----------
    store : AnnotationStore
        The image's annotations (read only).
    pyramid : Pyramid
        The image the store annotates (same level-0 shape), with an mpp (slides) or a
        voxel spacing (volumes).
    out_dir : str or Path
        A new or empty folder, or an earlier training set (replaced).
    mpp : float or None, keyword-only
        µm per patch pixel; patches are resampled to exactly this. ``None``: the
        image's level-0 pixel size (the larger of row and column).
    patch_size : int, keyword-only
        Patch edge in patch pixels (``patch_size * mpp`` µm).
    targets : {"auto", "mask", "points", "boxes"}, keyword-only
        See the module docstring.
    sigma_um : float, keyword-only
        Gaussian σ (µm) of point targets; radius of points in masks; box padding of
        points and lines.
    negatives_per_positive : float, keyword-only
        Random negatives per reviewed sample, positive or hard negative (rounded); 0 for
        none. Counting the hard negatives too means a round of rejections alone (a
        model's false positives on a slide without any true object) still brings that
        slide's ordinary tissue as negatives: 50 rejected false mitoses on the CMU-1
        sample with no random negatives made the fine-tuned model place more points.
    labels : LabelPyramid, optional, keyword-only
        Mask targets are read from this label pyramid instead of drawn from objects.
    seed : int, keyword-only
        Seeds the negative positions.
    cancel : threading.Event, optional, keyword-only
        Set it to stop after the current sample; no manifest is written.
    image_format : {"png", "tif"}, keyword-only
        Patch file format (PNG needs 8- or 16-bit images; TIFF keeps any dtype).

    Yields
    ------
    ExportProgress
        After every sample.

    Returns
    -------
    TrainingSetManifest
        ``complete=False`` when cancelled.

    Raises
    ------
    AnnotationError
        No pixel size, a store for another image, a foreign non-empty ``out_dir``,
        nothing reviewed, or an option out of range.
    """
    out_dir = Path(out_dir).expanduser()
    if mpp is None:  # the image's own level-0 resolution
        um = _pixel_um(pyramid)
        if um is None:
            _grid(pyramid, 1.0, patch_size)  # raises: no pixel size
        mpp = max(um) if um is not None else 1.0
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise AnnotationError(out_dir, f"mpp {mpp!r} is invalid", "expected µm/px > 0, e.g. 0.5")
    if not (isinstance(patch_size, int) and 8 <= patch_size <= 8192):
        raise AnnotationError(out_dir, f"patch size {patch_size!r} is invalid", "use 8..8192")
    if targets not in TARGETS:
        raise AnnotationError(
            out_dir, f"unknown targets {targets!r}", f"expected one of {', '.join(TARGETS)}"
        )
    if not (math.isfinite(sigma_um) and sigma_um > 0):
        raise AnnotationError(out_dir, f"sigma_um {sigma_um!r} is invalid", "expected µm > 0")
    if not (math.isfinite(negatives_per_positive) and negatives_per_positive >= 0):
        raise AnnotationError(
            out_dir,
            f"negatives_per_positive {negatives_per_positive!r} is invalid",
            "expected a number >= 0",
        )
    if image_format not in ("png", "tif"):
        raise AnnotationError(out_dir, f"unknown image format {image_format!r}", "png or tif")
    if image_format == "png" and pyramid.dtype not in (np.uint8, np.uint16):
        raise AnnotationError(
            pyramid.path,
            f"{pyramid.dtype} pixels cannot be written as PNG",
            "use image_format='tif' (--image-format tif)",
        )
    _check_pyramid(store, pyramid)
    grid = _grid(pyramid, float(mpp), patch_size)
    parameters = {
        "mpp": float(mpp),
        "patch_size": patch_size,
        "targets": targets,
        "sigma_um": float(sigma_um),
        "negatives_per_positive": float(negatives_per_positive),
        "labels": str(getattr(labels, "path", "")) if labels is not None else None,
        "seed": seed,
        "image_format": image_format,
        "level": grid.level,
        "background_rule": f"uint8: grey std < {BACKGROUND_STD:g} and (mean > "
        f"{BACKGROUND_MEAN:g} or mean < {DARK_MEAN:g}); other dtypes: std == 0",
    }

    # -- what to export
    positives: list[Annotation] = []
    hard: list[Annotation] = []
    skipped_rejected_human = 0
    # reviewed objects only: a store of 10^6 unreviewed model objects is never loaded
    for ann in store.iter_all(reviews=[*POSITIVE_REVIEWS, "rejected"]):
        if ann.review in POSITIVE_REVIEWS:
            positives.append(ann)
        elif ann.source != HUMAN:
            hard.append(ann)
        else:
            skipped_rejected_human += 1
    unreviewed = store.count(reviews=["unreviewed"])
    if not positives and not hard:
        raise AnnotationError(
            store.path,
            f"nothing is reviewed: {unreviewed} unreviewed objects, no accepted, corrected, "
            "added or rejected ones",
            "review some objects first (unreviewed model output is never a training target)",
        )
    kind = _auto_targets(positives, labels) if targets == "auto" else targets
    classes = list(store.classes)
    for ann in positives:
        if ann.class_name and ann.class_name not in classes:
            classes.append(ann.class_name)
    class_value = {name: i + 1 for i, name in enumerate(classes)}
    if labels is not None:
        mask_values = {str(k): str(v) for k, v in dict(getattr(labels, "classes", {})).items()}
    else:
        mask_values = {str(v): k for k, v in class_value.items()}

    plans: list[_Plan] = [_Plan("positive", _centre(a), tuple(a.plane), a) for a in positives] + [
        _Plan("hard_negative", _centre(a), tuple(a.plane), a) for a in hard
    ]
    n_neg = round(negatives_per_positive * (len(positives) + len(hard)))
    planes = sorted({tuple(a.plane) for a in positives + hard})

    _prepare_folder(out_dir)
    start = time.monotonic()
    ext = image_format
    # PNG holds 8- and 16-bit masks; 32-bit label pyramids go to TIFF
    wide = labels is not None and np.dtype(getattr(labels, "dtype", np.uint16)).itemsize > 2
    mask_ext = "tif" if wide or len(class_value) > 65535 else ext
    sigma_px = float(sigma_um) / float(mpp)
    samples: list[Sample] = []
    rng = np.random.default_rng(seed)
    h0, w0 = (int(v) for v in pyramid.spatial_shape(0)[-2:])
    total = len(plans) + n_neg
    cancelled = False
    shortfall = 0

    def reader(plane: tuple[int, ...]) -> Any:
        def read(top: int, left: int, h: int, w: int) -> np.ndarray:
            return _read_level_window(pyramid, grid.level, plane, top, left, h, w)

        return read

    def patch_at(centre: tuple[float, float], plane: tuple[int, ...]) -> np.ndarray:
        return _resample(reader(plane), grid, centre, order=1, dtype=pyramid.dtype)

    def objects_in(centre: tuple[float, float], plane: tuple[int, ...]) -> list[Annotation]:
        hy, hx = grid.half
        box = (centre[0] - hy, centre[1] - hx, centre[0] + hy, centre[1] + hx)
        found = store.query(box, plane=plane, include_rejected=True)
        return [a for a in found if a.review in POSITIVE_REVIEWS]

    def label_mask(centre: tuple[float, float], plane: tuple[int, ...]) -> np.ndarray:
        # the label pyramid's own levels (2x each), nearest neighbour
        level = _label_level(labels, grid)
        mask_grid = _Grid(level, (2.0**level, 2.0**level), grid.step, grid.patch)
        return _resample(
            _label_reader(labels, plane, level),
            mask_grid,
            centre,
            order=0,
            dtype=np.dtype(getattr(labels, "dtype", np.uint16)),
        )

    def write(plan: _Plan, patch: np.ndarray) -> Sample:
        index = len(samples)
        image_rel = f"images/{index:06d}_{plan.kind}.{ext}"
        if kind == "points":
            target_rel = f"targets/{index:06d}.tif"
        elif kind == "boxes":
            target_rel = f"targets/{index:06d}.json"
        else:
            target_rel = f"targets/{index:06d}.{mask_ext}"
        _write_image(out_dir / image_rel, patch)
        if kind == "mask" and labels is not None:
            _write_image(out_dir / target_rel, label_mask(plan.centre, plan.plane))
        else:
            objs = objects_in(plan.centre, plan.plane)
            if kind == "points":
                _write_image(
                    out_dir / target_rel,
                    _points_target(
                        objs, grid, plan.centre, mpp=float(mpp), sigma_um=float(sigma_um)
                    ),
                )
            elif kind == "boxes":
                write_json_atomic(
                    out_dir / target_rel,
                    _boxes_target(objs, grid, plan.centre, sigma_px=sigma_px),
                    fsync=False,
                )
            else:
                _write_image(
                    out_dir / target_rel,
                    _mask_target(objs, grid, plan.centre, class_value, sigma_px=sigma_px),
                )
        a = plan.obj
        return Sample(
            image=image_rel,
            target=target_rel,
            kind=plan.kind,
            x=float(plan.centre[1]),
            y=float(plan.centre[0]),
            plane=plan.plane,
            class_name=a.class_name if a is not None else "",
            object_id=a.id if a is not None else None,
            source=a.source if a is not None else "",
            model_version=a.model_version if a is not None else None,
            review=a.review if a is not None else "",
            hard_negative=plan.kind == "hard_negative",
            added_miss=a is not None and a.review == "added",
        )

    for plan in plans:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        samples.append(write(plan, patch_at(plan.centre, plan.plane)))
        yield ExportProgress(
            len(samples), total, plan.kind, time.monotonic() - start, f"{plan.kind} patch"
        )
    # -- random negatives, away from every object and not background
    hy, hx = grid.half
    made = 0
    attempts = 0
    while not cancelled and made < n_neg and attempts < NEGATIVE_ATTEMPTS * n_neg:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        attempts += 1
        cy = rng.uniform(hy, h0 - hy) if h0 > 2 * hy else rng.uniform(0, h0)
        cx = rng.uniform(hx, w0 - hx) if w0 > 2 * hx else rng.uniform(0, w0)
        plane = planes[int(rng.integers(len(planes)))] if planes else ()
        box = (cy - hy, cx - hx, cy + hy, cx + hx)
        if store.query(box, plane=plane, include_rejected=True, limit=1):
            continue
        patch = patch_at((cy, cx), plane)
        if _is_background(patch):
            continue
        if labels is not None and np.any(label_mask((cy, cx), plane)):
            continue
        samples.append(write(_Plan("negative", (cy, cx), plane), patch))
        made += 1
        yield ExportProgress(
            len(samples), total, "negative", time.monotonic() - start, "negative patch"
        )
    shortfall = n_neg - made if not cancelled else 0

    counts = {k: sum(1 for s in samples if s.kind == k) for k in SAMPLE_KINDS}
    counts.update(
        {
            "hard_negative_flagged": sum(s.hard_negative for s in samples),
            "added_miss_flagged": sum(s.added_miss for s in samples),
            "unreviewed_skipped": unreviewed,
            "rejected_human_skipped": skipped_rejected_human,
            "negative_requested": n_neg,
            "negative_shortfall": shortfall,
        }
    )
    used = positives + hard
    model_versions = sorted(
        {f"{a.source}:{a.model_version or ''}".rstrip(":") for a in used if a.source != HUMAN}
    )
    annotators = sorted({a.annotator for a in used if a.annotator})
    image = store.image.to_dict()
    manifest = TrainingSetManifest(
        path=out_dir,
        image=image,
        mpp=float(mpp),
        patch_size=patch_size,
        targets=kind,
        sigma_um=float(sigma_um),
        store=str(Path(store.path).resolve()),
        model_versions=model_versions,
        annotators=annotators,
        counts=counts,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        parameters=parameters,
        samples=samples,
        classes=classes,
        mask_values=mask_values if kind == "mask" else {},
        image_dtype=str(pyramid.dtype),
        complete=not cancelled,
    )
    if cancelled:
        return manifest
    _write_manifests(manifest)
    return manifest


def _label_level(labels: Any, grid: _Grid) -> int:
    """The coarsest level of a label pyramid (level k = level 0 / 2**k) not coarser
    than the patches."""
    level = 0
    n = int(getattr(labels, "n_levels", 1))
    while level + 1 < n and 2 ** (level + 1) <= min(grid.step) * 1.01:
        level += 1
    return level


def _label_reader(labels: Any, plane: tuple[int, ...], level: int) -> Any:
    """``read(top, left, h, w)`` in pixels of ``level`` of a `LabelPyramid` (0 outside)."""
    f = 2**level

    def read(top: int, left: int, h: int, w: int) -> np.ndarray:
        box = (float(top * f), float(left * f), float((top + h) * f), float((left + w) * f))
        win = np.asarray(labels.read_window(box, plane=plane, level=level))
        out = np.zeros((h, w), dtype=win.dtype)
        # read_window clips to the image: its first pixel is max(0, top), max(0, left)
        r0, c0 = max(0, -top), max(0, -left)
        hh, ww = min(h - r0, win.shape[0]), min(w - c0, win.shape[1])
        if hh > 0 and ww > 0:
            out[r0 : r0 + hh, c0 : c0 + ww] = win[:hh, :ww]
        return out

    return read


def _write_manifests(manifest: TrainingSetManifest) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for sample in manifest.samples:
        writer.writerow(sample.csv_row())
    with atomic_open(manifest.path / MANIFEST_CSV, "w", encoding="utf-8", newline="") as fh:
        fh.write(text.getvalue())
    write_json_atomic(manifest.path / MANIFEST_JSON, manifest.to_dict())


def export_training_set_sync(
    store: AnnotationStore,
    pyramid: Pyramid,
    out_dir: str | Path,
    *,
    on_progress: Any = None,
    **kwargs: Any,
) -> TrainingSetManifest:
    """Drive `export_training_set` to the end in this thread (tests, CLI, scripts).

    ``on_progress(ExportProgress)`` is called after every sample; ``kwargs`` are
    `export_training_set`'s options.
    """
    gen = export_training_set(store, pyramid, out_dir, **kwargs)
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            result: TrainingSetManifest = stop.value
            return result
        if on_progress is not None:
            on_progress(progress)


# --------------------------------------------------------------------------- reading
def read_manifest(path: str | Path, *, check_files: bool = True) -> TrainingSetManifest:
    """Read and validate a training set's ``manifest.json`` (a folder or the file).

    Parameters
    ----------
    path : str or Path
        The training-set folder or its ``manifest.json``.
    check_files : bool, keyword-only
        Also check that every sample's image and target file exists.

    Raises
    ------
    AnnotationError
        Missing (an export that was cancelled or crashed), unreadable, another schema
        version, a missing key, a bad sample (its index and field named), a missing file,
        counts that do not match the samples, a ``manifest.csv`` that does not match.
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() or path.suffix != ".json" else path.parent
    file = folder / MANIFEST_JSON
    if not file.exists():
        hint = (
            "the export was cancelled or crashed before finishing; run it again"
            if (folder / MARKER).exists()
            else "give a folder written by `napari-histo-ai training-set`"
        )
        raise AnnotationError(file, "no training-set manifest here", hint)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(file, f"is not readable JSON: {exc}", "export again") from None
    if not isinstance(data, dict):
        raise AnnotationError(file, "is not a JSON object", "export again")
    missing = [k for k in JSON_KEYS if k not in data]
    if missing:
        raise AnnotationError(file, f"lacks the keys {missing}", "export again")
    if data["schema_version"] != SCHEMA_VERSION:
        raise AnnotationError(
            file,
            f"has schema version {data['schema_version']!r}, this version reads {SCHEMA_VERSION}",
            "export the training set again with this version",
        )
    if data["targets"] not in ("mask", "points", "boxes"):
        raise AnnotationError(file, f"unknown targets {data['targets']!r}", "export again")
    for key in ("mpp", "patch_size", "sigma_um"):
        value = data[key]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise AnnotationError(file, f"{key} {value!r} is invalid: expected > 0")
    if not isinstance(data["samples"], list):
        raise AnnotationError(file, "samples is not a list", "export again")
    samples = []
    for i, raw in enumerate(data["samples"]):
        try:
            sample = Sample.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise AnnotationError(file, f"sample {i} is malformed ({exc!r})") from None
        if sample.kind not in SAMPLE_KINDS:
            raise AnnotationError(
                file, f"sample {i} has kind {sample.kind!r}, expected one of {SAMPLE_KINDS}"
            )
        if check_files:
            for rel in (sample.image, sample.target):
                if not (folder / rel).is_file():
                    raise AnnotationError(
                        folder / rel,
                        f"is listed by sample {i} of {file} but does not exist",
                        "the training set is incomplete; export it again",
                    )
        samples.append(sample)
    table = folder / MANIFEST_CSV
    try:
        with open(table, newline="", encoding="utf-8") as fh:
            header, *body = list(csv.reader(fh))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AnnotationError(table, f"cannot be read ({exc})", "export again") from None
    if tuple(header) != CSV_COLUMNS or len(body) != len(samples):
        raise AnnotationError(
            table,
            f"has {len(body)} rows and columns {header}, but {file} lists {len(samples)} "
            f"samples with columns {list(CSV_COLUMNS)}",
            "the two manifests come from different exports; export again",
        )
    counts = data["counts"] if isinstance(data["counts"], dict) else {}
    for k in SAMPLE_KINDS:
        n = sum(1 for s in samples if s.kind == k)
        if counts.get(k) != n:
            raise AnnotationError(
                file, f"counts say {counts.get(k)!r} {k} samples but {n} are listed"
            )
    return TrainingSetManifest(
        path=folder,
        image=dict(data["image"]),
        mpp=float(data["mpp"]),
        patch_size=int(data["patch_size"]),
        targets=str(data["targets"]),
        sigma_um=float(data["sigma_um"]),
        store=str(data["store"]),
        model_versions=list(data["model_versions"]),
        annotators=list(data["annotators"]),
        counts=dict(counts),
        created=str(data["created"]),
        parameters=dict(data["parameters"]),
        samples=samples,
        classes=list(data.get("classes") or []),
        mask_values=dict(data.get("mask_values") or {}),
        image_dtype=str(data.get("image_dtype") or ""),
        schema_version=int(data["schema_version"]),
    )
