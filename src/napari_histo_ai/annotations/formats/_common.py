"""What every annotation format shares: file-level provenance, per-object checks on
import and export, class colours, and the ``histo_ai`` per-object property block.

Private to `napari_histo_ai.annotations.formats`; the format modules import it.
"""

from __future__ import annotations

import colorsys
import datetime as _dt
import functools
import gc
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from ...errors import AnnotationError
from ..model import HUMAN, KINDS, REVIEW_STATES, Annotation, ImageRef

#: the key of our own per-object (and file-level) property block in JSON formats
HISTO_AI = "histo_ai"
P = ParamSpec("P")
R = TypeVar("R")
SOFTWARE = "napari-histo-ai"


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building or parsing ~10^5 small
    containers (features, dicts, lists): each collection walks every live container, so
    without this a 10^5-polygon GeoJSON export spends most of its time in the collector
    (measured 5.6 s → 0.8 s to build the features). Nothing built here forms cycles;
    the previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def without_gc(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` inside `no_gc` (for the bulk import / export functions)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with no_gc():
            return fn(*args, **kwargs)

    return wrapper


def package_version() -> str | None:
    """``napari_histo_ai.__version__`` (``None`` if the attribute is missing)."""
    import napari_histo_ai

    return getattr(napari_histo_ai, "__version__", None)


def iso_time(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC (``2026-12-02T03:35:09.123456Z``)."""
    stamp = _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def materialise(annotations: Iterable[Annotation]) -> list[Annotation]:
    """The annotations as a list (an iterator is consumed once)."""
    return list(annotations)


def file_provenance(
    annotations: Sequence[Annotation],
    *,
    image: ImageRef,
    fmt: str,
    provenance: dict[str, Any] | None = None,
    skipped: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The file-level record every export writes.

    Returns
    -------
    dict
        ``format``, ``software``, ``version`` (our package version), ``exported`` (ISO UTC
        time), ``image`` (``path``, ``content_hash``, ``shape``, ``axes``), ``mpp``
        ((row, col) µm/px or ``None``), ``spacing_mm``, ``models`` (distinct
        ``{"source", "model_version"}`` of the model objects), ``annotators`` (sorted
        distinct names), ``count`` (objects written), ``skipped`` (kind → objects the
        format cannot hold), and the caller's ``provenance`` under ``extra``.
    """
    models: dict[tuple[str, str | None], None] = {}
    annotators: set[str] = set()
    for ann in annotations:
        if ann.is_model:
            models[(ann.source, ann.model_version)] = None
        if ann.annotator:
            annotators.add(ann.annotator)
    skipped = {k: v for k, v in (skipped or {}).items() if v}
    return {
        "format": fmt,
        "software": SOFTWARE,
        "version": package_version(),
        "exported": iso_time(_dt.datetime.now(tz=_dt.UTC).timestamp()),
        "image": {
            "path": image.path,
            "content_hash": image.content_hash,
            "shape": list(image.shape),
            "axes": image.axes,
        },
        "mpp": list(image.mpp) if image.mpp else None,
        "spacing_mm": list(image.spacing_mm) if image.spacing_mm else None,
        "models": [{"source": s, "model_version": v} for s, v in models],
        "annotators": sorted(annotators),
        "count": len(annotations) - sum(skipped.values()),
        "skipped": skipped,
        "extra": dict(provenance or {}),
    }


def object_properties(ann: Annotation) -> dict[str, Any]:
    """Our per-object block: kind and full provenance (timestamps as epoch seconds)."""
    return {
        "kind": ann.kind,
        "source": ann.source,
        "model_version": ann.model_version,
        "annotator": ann.annotator,
        "created": ann.created,
        "modified": ann.modified,
        "confidence": ann.confidence,
        "review": ann.review,
        "plane": list(ann.plane),
        "id": ann.id,
    }


#: vertices each kind needs: (at least, at most or None)
_VERTICES = {
    "point": (1, 1),
    "line": (2, 2),
    "polyline": (2, None),
    "box": (2, 2),
    "polygon": (3, None),
}
_REVIEWS = frozenset(REVIEW_STATES)


def _quick_ok(ann: Annotation, n_plane: int, planes: tuple[int, ...]) -> bool:
    """The per-object checks that need no numpy: kind, vertex count, review, plane."""
    need = _VERTICES.get(ann.kind)
    if need is None:
        return False
    n = len(ann.coords)
    if n < need[0] or (need[1] is not None and n > need[1]) or ann.review not in _REVIEWS:
        return False
    if len(ann.plane) != n_plane:
        return False
    return all(0 <= p < s for p, s in zip(ann.plane, planes, strict=True))


def _outside_vertices(coords: list[np.ndarray], image: ImageRef) -> np.ndarray:
    """Per object: whether any vertex is non-finite or outside the image ± 1 px
    (`ImageRef.contains`), computed over all vertices at once."""
    if not coords:
        return np.zeros(0, dtype=bool)
    lengths = np.fromiter((len(c) for c in coords), dtype=np.int64, count=len(coords))
    every = np.concatenate(coords)
    h, w = image.shape[-2:]
    with np.errstate(invalid="ignore"):
        bad = ~(
            (every[:, 0] >= -1.0)
            & (every[:, 0] <= h + 1.0)
            & (every[:, 1] >= -1.0)
            & (every[:, 1] <= w + 1.0)
        )  # NaN compares False: bad
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    return np.add.reduceat(bad.astype(np.int64), starts) > 0 if len(every) else lengths < 0


def check_exports(
    annotations: Sequence[Annotation],
    indices: Sequence[int],
    *,
    path: Path,
    image: ImageRef,
) -> None:
    """`check_export` for many objects at once (vectorised over their vertices);
    ``indices`` are their positions in the caller's list, for the message."""
    n_plane = image.n_plane
    planes = tuple(image.shape[:n_plane])
    for ann, index in zip(annotations, indices, strict=True):
        if not _quick_ok(ann, n_plane, planes):
            check_export(ann, index, path=path, image=image)
    outside = _outside_vertices([a.coords for a in annotations], image)
    for k in np.flatnonzero(outside)[:1]:
        check_export(annotations[k], indices[k], path=path, image=image)


def check_export(ann: Annotation, index: int, *, path: Path, image: ImageRef) -> None:
    """Refuse an object that could not be read back: bad geometry, outside the image."""
    try:
        ann.validate()
    except ValueError as exc:
        raise AnnotationError(
            path, f"object {index} (id {ann.id}): {exc}", "fix or delete it, then export again"
        ) from None
    if not image.contains(ann):
        raise AnnotationError(
            path,
            f"object {index} (id {ann.id}, {ann.kind}, plane {ann.plane}) lies outside the "
            f"image {tuple(image.shape)} ({_bounds_text(ann)})",
            "move it inside the image or delete it, then export again",
        )


def bounds_all(annotations: Sequence[Annotation]) -> np.ndarray:
    """(N, 4) ``(top, left, bottom, right)`` of every object's vertices, vectorised."""
    if not annotations:
        return np.zeros((0, 4))
    coords = [a.coords for a in annotations]
    lengths = np.fromiter((len(c) for c in coords), dtype=np.int64, count=len(coords))
    every = np.concatenate(coords)
    starts = np.cumsum(lengths) - lengths
    return np.hstack([np.minimum.reduceat(every, starts), np.maximum.reduceat(every, starts)])


def _bounds_text(ann: Annotation) -> str:
    t, left, b, r = ann.bounds()
    return f"rows {t:g}..{b:g}, cols {left:g}..{r:g}"


class Checker:
    """Checks every imported object and names the file and the item when one is wrong.

    `check` runs the cheap per-object checks at once and queues the vertex checks;
    `finish` runs those over all queued objects together (numpy) and returns them.

    Parameters
    ----------
    path : Path
        The file being read.
    image : ImageRef
        The image the objects must fit (vertices inside ``shape`` ± 1 px, plane valid).
    classes : sequence of str
        The allowed classes; empty: any class.
    allow_new_classes : bool
        Accept classes not in ``classes``. Unclassified objects (``""``, QuPath's
        unclassified annotations) are always accepted.
    """

    def __init__(
        self,
        path: Path,
        *,
        image: ImageRef,
        classes: Sequence[str] = (),
        allow_new_classes: bool = False,
    ) -> None:
        self.path = path
        self.image = image
        self.classes = frozenset(classes)
        self._listed = list(dict.fromkeys(classes))
        self.allow_new_classes = allow_new_classes or not self.classes
        self._n_plane = image.n_plane
        self._planes = tuple(image.shape[: image.n_plane])
        self._pending: list[Annotation] = []
        self._where: list[str] = []

    def fail(self, where: str, problem: str, hint: str) -> AnnotationError:
        return AnnotationError(self.path, f"{where}: {problem}", hint)

    def check(self, ann: Annotation, where: str) -> Annotation:
        """Check ``ann`` (vertices: at `finish`) and queue it; raise `AnnotationError`."""
        if not _quick_ok(ann, self._n_plane, self._planes):
            self._check_one(ann, where)
        if ann.class_name and not self.allow_new_classes and ann.class_name not in self.classes:
            raise self.fail(
                where,
                f"unknown class {ann.class_name!r}; expected one of {self._listed}",
                "add the class to the store or pass allow_new_classes=True",
            )
        self._pending.append(ann)
        self._where.append(where)
        return ann

    def finish(self) -> list[Annotation]:
        """The queued objects, once all their vertices are known to be finite and inside
        the image (else `AnnotationError` naming the first bad one)."""
        outside = _outside_vertices([a.coords for a in self._pending], self.image)
        for k in np.flatnonzero(outside)[:1]:
            self._check_one(self._pending[k], self._where[k])
        out, self._pending, self._where = self._pending, [], []
        return out

    def _check_one(self, ann: Annotation, where: str) -> None:
        if not np.all(np.isfinite(ann.coords)):
            raise self.fail(
                where,
                f"non-finite coordinate (NaN or infinity) in {ann.kind} {ann.coords.tolist()}",
                "every coordinate must be a finite number of level-0 pixels; fix the file",
            )
        try:
            ann.validate()
        except ValueError as exc:
            raise self.fail(where, str(exc), "fix the geometry in the file") from None
        n_plane = self._n_plane
        if len(ann.plane) != n_plane or any(
            not 0 <= p < n for p, n in zip(ann.plane, self._planes, strict=False)
        ):
            raise self.fail(
                where,
                f"plane {list(ann.plane)} is not a valid plane of an image of shape "
                f"{tuple(self.image.shape)} (axes {self.image.axes}); expected {n_plane} "
                f"index(es) below {list(self._planes)}",
                "check that the file belongs to this image",
            )
        if not self.image.contains(ann):
            h, w = self.image.shape[-2:]
            raise self.fail(
                where,
                f"{ann.kind} at {_bounds_text(ann)} lies outside the {h} × {w} px image",
                "check that the file belongs to this image and is in level-0 pixels",
            )


def number(value: Any, what: str, where: str, checker: Checker) -> float:
    """A finite float from a JSON value, else `AnnotationError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise checker.fail(
            where, f"{what} {value!r} is a {type(value).__name__}", f"expected a number as {what}"
        )
    if not math.isfinite(value):
        raise checker.fail(where, f"{what} is {value!r}", f"expected a finite number as {what}")
    return float(value)


def optional_number(value: Any, what: str, where: str, checker: Checker) -> float | None:
    return None if value is None else number(value, what, where, checker)


def text(value: Any, what: str, where: str, checker: Checker) -> str:
    if not isinstance(value, str):
        raise checker.fail(
            where, f"{what} {value!r} is a {type(value).__name__}", f"expected text as {what}"
        )
    return value


def apply_properties(
    base: dict[str, Any], block: Any, where: str, checker: Checker
) -> dict[str, Any]:
    """Our ``histo_ai`` block (if any) checked and merged into the Annotation kwargs."""
    if block is None:
        return base
    if not isinstance(block, dict):
        raise checker.fail(
            where,
            f"'{HISTO_AI}' is a {type(block).__name__}",
            f"expected an object with kind, source, review... as written by {SOFTWARE}",
        )
    out = dict(base)
    if "kind" in block:
        kind = text(block["kind"], "kind", where, checker)
        if kind not in KINDS:
            raise checker.fail(where, f"unknown kind {kind!r}", f"expected one of {KINDS}")
        out["kind"] = kind
    for key in ("source", "review"):
        if block.get(key) is not None:
            out[key] = text(block[key], key, where, checker)
    for key in ("model_version", "annotator"):
        if key in block:
            out[key] = None if block[key] is None else text(block[key], key, where, checker)
    for key in ("created", "modified"):
        if block.get(key) is not None:
            out[key] = number(block[key], key, where, checker)
    if "confidence" in block:
        out["confidence"] = optional_number(block["confidence"], "confidence", where, checker)
    if block.get("plane") is not None:
        out["plane"] = plane_value(block["plane"], where, checker)
    if out.get("review") not in REVIEW_STATES:
        raise checker.fail(
            where, f"unknown review state {out.get('review')!r}", f"expected one of {REVIEW_STATES}"
        )
    return out


def plane_value(value: Any, where: str, checker: Checker) -> tuple[int, ...]:
    """A plane as a tuple of ints from a JSON list (or a single int)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise checker.fail(
                where, f"plane {value!r} is not a list of integers", "expected e.g. [3] or []"
            )
        out.append(int(v))
    return tuple(out)


def default_review(source: str) -> str:
    return "added" if source == HUMAN else "unreviewed"


def class_colour(name: str) -> tuple[int, int, int]:
    """A stable RGB colour for a class: the same name gives the same colour in every
    file and session (hue from a hash of the name; saturated and bright)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return (round(r * 255), round(g * 255), round(b * 255))


def computed_measurements(ann: Annotation, image: ImageRef) -> dict[str, float]:
    """Length (lines, polylines) in µm and area (boxes, polygons) in µm² when the image's
    µm/px is known, else in px / px²."""
    return computed_measurements_all([ann], image)[0]


def computed_measurements_all(
    annotations: Sequence[Annotation], image: ImageRef, *, physical: bool = True
) -> list[dict[str, float]]:
    """`computed_measurements` of many objects, vectorised over their vertices
    (``physical=False``: always px / px²)."""
    um = image.pixel_um if physical else None
    scale = np.asarray(um if um is not None else (1.0, 1.0), dtype=np.float64)
    length_key, area_key = ("length_um", "area_um2") if um is not None else ("length_px", "area_px")
    out: list[dict[str, float]] = [{} for _ in annotations]
    paths = [i for i, a in enumerate(annotations) if a.kind in ("line", "polyline")]
    rings = [i for i, a in enumerate(annotations) if a.kind in ("box", "polygon")]
    if paths:
        coords = [annotations[i].coords for i in paths]
        lengths = np.fromiter((len(c) for c in coords), dtype=np.int64, count=len(coords))
        every = np.concatenate(coords) * scale
        seg = np.r_[np.hypot(*np.diff(every, axis=0).T), 0.0]
        ends = np.cumsum(lengths)
        seg[ends - 1] = 0.0  # no segment from one path's end to the next path's start
        total = np.add.reduceat(seg, ends - lengths)
        for i, value in zip(paths, total.tolist(), strict=True):
            out[i][length_key] = value
    if rings:
        coords = [annotations[i].ring() for i in rings]
        lengths = np.fromiter((len(c) for c in coords), dtype=np.int64, count=len(coords))
        every = np.concatenate(coords)
        starts = np.cumsum(lengths) - lengths
        following = np.arange(len(every)) + 1
        following[starts + lengths - 1] = starts  # close each ring
        r, c = every[:, 0], every[:, 1]
        cross = r * c[following] - c * r[following]
        area = np.abs(np.add.reduceat(cross, starts)) / 2 * scale[0] * scale[1]
        for i, value in zip(rings, area.tolist(), strict=True):
            out[i][area_key] = value
    return out


def load_json(path: Path) -> Any:
    """Parse a JSON file, with the line and column of a syntax error in the message."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(path, f"cannot be read ({exc})", "check the path") from exc
    try:
        return json.loads(raw.decode("utf-8-sig"), parse_constant=_keep_constant)
    except UnicodeDecodeError as exc:
        raise AnnotationError(
            path, f"is not UTF-8 text (byte {exc.start})", "expected a JSON file"
        ) from None
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            path,
            f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            "the file may be truncated or not JSON; export it again",
        ) from None


def _keep_constant(name: str) -> float:
    # NaN / Infinity are not JSON, but QuPath writes NaN measurements: read them as floats
    # (coordinates are then refused as non-finite, measurements dropped)
    return float(name.lower().replace("infinity", "inf"))
