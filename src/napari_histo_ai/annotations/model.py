"""The annotation model: what an annotator edits, with where it came from.

Geometry is in **level-0 pixels** of the image, ``(row, col)`` order, continuous
coordinates (pixel ``i`` spans ``[i, i + 1)``, so the centre of pixel (0, 0) is
(0.5, 0.5)), exactly as the engine writes its objects. The image's µm/px (or voxel
spacing in mm) travels with the store (`ImageRef`), so every length can be shown in µm
or mm. Volumes and stacks put their non-spatial axes in ``plane`` (e.g. ``(z,)`` for a
ZYX volume, ``(t, z)`` for TZYX); 2-D images have ``plane == ()``.

Kinds and their ``coords`` (float64, shape (N, 2)):

=========== ====== ==========================================================
kind        N      meaning
=========== ====== ==========================================================
``point``   1      a centre (mitosis, nucleus)
``line``    2      two ends (a lesion's longest diameter)
``polyline`` >= 2  an open path
``box``     2      ``[[top, left], [bottom, right]]``, top < bottom, left < right
``polygon`` >= 3   an open ring (the first vertex is not repeated)
=========== ====== ==========================================================

Label masks are not rows of this model; they live in a label pyramid on disk
(`napari_histo_ai.annotations.labels`) with the same provenance fields.

Review states
-------------
``unreviewed``  made by a model, nobody has looked at it yet
``accepted``    a human confirmed it as it is
``corrected``   a human changed its geometry or class (a model object stays a model
                object; its ``source`` is kept, ``review`` says it was fixed)
``rejected``    a human said it is wrong (a model false positive). Rejected objects are
                kept, hidden from the editable layers, and exported as hard negatives
``added``       drawn by a human (``source == "human"``): a miss of the model
"""

from __future__ import annotations

import getpass
import hashlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

Kind = Literal["point", "line", "polyline", "box", "polygon"]
KINDS: tuple[str, ...] = ("point", "line", "polyline", "box", "polygon")
Review = Literal["unreviewed", "accepted", "corrected", "rejected", "added"]
REVIEW_STATES: tuple[str, ...] = ("unreviewed", "accepted", "corrected", "rejected", "added")
#: the source of everything a person drew
HUMAN = "human"


def default_annotator() -> str:
    """The login name of whoever runs the program (``HISTO_AI_ANNOTATOR`` overrides it)."""
    name = os.environ.get("HISTO_AI_ANNOTATOR")
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers): still attributable to "unknown"
        return "unknown"


def now() -> float:
    """Seconds since the epoch (UTC), the timestamp unit of every annotation."""
    return time.time()


@dataclass
class Annotation:
    """One object an annotator can edit.

    Parameters
    ----------
    kind : {"point", "line", "polyline", "box", "polygon"}
    coords : numpy.ndarray of float64, shape (N, 2)
        Vertices ``(row, col)`` in level-0 pixels (see the module docstring for N).
    class_name : str
        The object's class (``"mitosis"``, ``"mass"``, ``"tumour"``...). Free text; a
        store keeps the ordered vocabulary of its classes.
    plane : tuple of int
        Indices of the non-spatial axes (``(z,)`` for a volume slice), ``()`` in 2-D.
    source : str
        ``"human"`` or the model's registry name.
    model_version : str or None
        The model's version when ``source`` is a model.
    annotator : str or None
        Who made the last change (login name), ``None`` for untouched model output.
    created, modified : float
        Seconds since the epoch (UTC).
    confidence : float or None
        The model's score in [0, 1]; ``None`` for human objects.
    review : str
        One of `REVIEW_STATES`.
    measurements : dict of str to float
        Numbers shown and exported with the object (``length_mm``, ``area_um2``...).
    id : int or None
        Assigned by the store; ``None`` until stored.
    """

    kind: str
    coords: np.ndarray
    class_name: str = ""
    plane: tuple[int, ...] = ()
    source: str = HUMAN
    model_version: str | None = None
    annotator: str | None = None
    created: float = field(default_factory=now)
    modified: float = field(default_factory=now)
    confidence: float | None = None
    review: str = "added"
    measurements: dict[str, float] = field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float64).reshape(-1, 2)
        self.plane = tuple(int(v) for v in self.plane)
        if self.kind == "box" and len(self.coords) == 2:
            lo = self.coords.min(axis=0)
            hi = self.coords.max(axis=0)
            self.coords = np.stack([lo, hi])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem if the geometry does not fit its kind."""
        n = len(self.coords)
        need = {"point": (1, 1), "line": (2, 2), "polyline": (2, None), "box": (2, 2)}
        low, high = need.get(self.kind, (3, None))
        if self.kind not in KINDS:
            raise ValueError(f"unknown annotation kind {self.kind!r}; expected one of {KINDS}")
        if n < low or (high is not None and n > high):
            want = f"{low}" if low == high else f"at least {low}"
            raise ValueError(f"a {self.kind} needs {want} vertices, got {n}")
        if not np.all(np.isfinite(self.coords)):
            raise ValueError(f"a {self.kind} has non-finite coordinates")
        if self.review not in REVIEW_STATES:
            raise ValueError(
                f"unknown review state {self.review!r}; expected one of {REVIEW_STATES}"
            )

    @property
    def is_model(self) -> bool:
        return self.source != HUMAN

    def bounds(self) -> tuple[float, float, float, float]:
        """``(top, left, bottom, right)`` of the vertices in level-0 pixels."""
        lo = self.coords.min(axis=0)
        hi = self.coords.max(axis=0)
        return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))

    def length_px(self) -> float:
        """Length of a line / polyline (perimeter of a box / polygon) in level-0 pixels."""
        return _path_length(self.ring() if self.kind in ("box", "polygon") else self.coords)

    def length_um(self, mpp: tuple[float, float] | None) -> float | None:
        """Physical length in µm using the image's (row, col) µm/px; ``None`` without mpp."""
        if mpp is None:
            return None
        pts = self.ring() if self.kind in ("box", "polygon") else self.coords
        return _path_length(pts * np.asarray(mpp, dtype=np.float64))

    def ring(self) -> np.ndarray:
        """The outline as an open ring (box: its four corners, clockwise from top-left)."""
        if self.kind == "box":
            (t, left), (b, r) = self.coords
            return np.array([[t, left], [t, r], [b, r], [b, left]], dtype=np.float64)
        return self.coords

    def area_px(self) -> float:
        """Area of a box / polygon in level-0 pixels² (shoelace), 0 for other kinds."""
        if self.kind not in ("box", "polygon"):
            return 0.0
        r, c = self.ring().T
        return float(abs(np.dot(r, np.roll(c, -1)) - np.dot(c, np.roll(r, -1))) / 2)

    def copy(self, **changes: Any) -> Annotation:
        """A copy with ``changes`` applied (coords and measurements copied, not shared)."""
        out = replace(self, coords=self.coords.copy(), measurements=dict(self.measurements))
        for key, value in changes.items():
            setattr(out, key, value)
        out.__post_init__()
        return out


def _path_length(points: np.ndarray) -> float:
    if len(points) < 2:
        return 0.0
    closed = points
    return float(np.sum(np.hypot(*np.diff(closed, axis=0).T)))


# --------------------------------------------------------------------------- image identity
#: bytes hashed from each end of a file for `content_hash` (whole files below 2x this)
HASH_CHUNK = 8 * 2**20


def content_hash(path: str | Path) -> str:
    """A content hash that identifies a (possibly 10 GB) image file in well under a second.

    ``"sha256-ends:"`` + SHA-256 over the file size and its first and last 8 MiB; files
    up to 16 MiB are hashed whole (``"sha256:"``). For a folder (OME-Zarr), the sorted
    relative names and sizes of its files plus the bytes of its metadata files. A
    ``labels/`` group inside the folder (OME-Zarr labels, which our exports may add) is
    left out, so exporting labels into an image does not change its identity.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            if rel.split("/", 1)[0] == "labels":
                continue
            h.update(f"{rel}\0{f.stat().st_size}\n".encode())
            if f.name in (".zattrs", ".zgroup", ".zarray", "zarr.json"):
                h.update(f.read_bytes())
        return "sha256-tree:" + h.hexdigest()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= 2 * HASH_CHUNK:
            h.update(fh.read())
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(fh.read(HASH_CHUNK))
        fh.seek(size - HASH_CHUNK)
        h.update(fh.read(HASH_CHUNK))
    return "sha256-ends:" + h.hexdigest()


@dataclass
class ImageRef:
    """Which image a set of annotations belongs to, and its physical scale.

    Parameters
    ----------
    path : str
        The image file or folder as opened (absolute).
    content_hash : str
        `content_hash` of the file; a store refuses to pair with a different file.
    shape : tuple of int
        Level-0 spatial shape, axes as in ``axes`` without ``S`` (e.g. (H, W) or (Z, H, W)).
    axes : str
        Spatial axes letters of ``shape``: ``"YX"``, ``"ZYX"``, ``"TZYX"``.
    mpp : tuple of float or None
        Level-0 (row, col) µm/px; ``None`` when unknown.
    spacing_mm : tuple of float or None
        Voxel spacing in mm, one per axis of ``axes`` (volumes).
    affine : list of list of float or None
        4×4 voxel-to-world affine (mm) of a volume, for NIfTI export.
    """

    path: str
    content_hash: str
    shape: tuple[int, ...]
    axes: str = "YX"
    mpp: tuple[float, float] | None = None
    spacing_mm: tuple[float, ...] | None = None
    affine: list[list[float]] | None = None

    @property
    def n_plane(self) -> int:
        """How many leading non-spatial-plane axes (``len(shape) - 2``)."""
        return len(self.shape) - 2

    @property
    def pixel_um(self) -> tuple[float, float] | None:
        """(row, col) size of a level-0 pixel in µm, from ``mpp`` or the in-plane spacing."""
        if self.mpp is not None:
            return (float(self.mpp[0]), float(self.mpp[1]))
        if self.spacing_mm is not None and len(self.spacing_mm) >= 2:
            return (float(self.spacing_mm[-2]) * 1000, float(self.spacing_mm[-1]) * 1000)
        return None

    def contains(self, ann: Annotation, *, tolerance: float = 1.0) -> bool:
        """Whether every vertex lies inside the image (± ``tolerance`` pixels) and the
        plane indices are valid."""
        h, w = self.shape[-2:]
        planes = self.shape[:-2]
        if len(ann.plane) != len(planes):
            return False
        if any(not 0 <= p < n for p, n in zip(ann.plane, planes, strict=True)):
            return False
        r, c = ann.coords[:, 0], ann.coords[:, 1]
        return bool(
            np.all(r >= -tolerance)
            and np.all(r <= h + tolerance)
            and np.all(c >= -tolerance)
            and np.all(c <= w + tolerance)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "content_hash": self.content_hash,
            "shape": list(self.shape),
            "axes": self.axes,
            "mpp": list(self.mpp) if self.mpp else None,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm else None,
            "affine": self.affine,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRef:
        mpp = data.get("mpp")
        spacing = data.get("spacing_mm")
        return cls(
            path=str(data["path"]),
            content_hash=str(data.get("content_hash", "")),
            shape=tuple(int(v) for v in data["shape"]),
            axes=str(data.get("axes", "YX")),
            mpp=(float(mpp[0]), float(mpp[1])) if mpp else None,
            spacing_mm=tuple(float(v) for v in spacing) if spacing else None,
            affine=data.get("affine"),
        )

    @classmethod
    def from_pyramid(cls, pyramid: Any, *, hash_content: bool = True) -> ImageRef:
        """The reference of an opened `napari_histo_ai.io.Pyramid`."""
        path = Path(pyramid.path).resolve()
        affine = pyramid.affine
        return cls(
            path=str(path),
            content_hash=content_hash(path) if hash_content and path.exists() else "",
            shape=tuple(int(v) for v in pyramid.spatial_shape(0)),
            axes=pyramid.spatial_axes,
            mpp=tuple(float(v) for v in pyramid.mpp) if pyramid.mpp else None,  # type: ignore[arg-type]
            spacing_mm=tuple(float(v) for v in pyramid.spacing_mm) if pyramid.spacing_mm else None,
            affine=np.asarray(affine, dtype=float).tolist() if affine is not None else None,
        )


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
