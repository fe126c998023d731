"""Editable napari layers kept in sync with an annotation store (napari, no Qt).

An `AnnotationSession` owns the `AnnotationStore` of one image layer and two editable
layers over it: a Points layer (points) and a Shapes layer (lines, polylines, boxes,
polygons). Every edit a user makes on those layers becomes one undoable store operation
at once (the store commits it atomically), so a crash loses at most the edit in flight.

Coordinates
-----------
The store keeps geometry in continuous level-0 pixels ``(row, col)`` (pixel ``i`` spans
``[i, i + 1)``). The editable layers hold exactly those numbers as their data (plane
indices first for volumes), with ``scale`` = the image layer's level-0 scale (µm for
slides, mm for volumes) and ``translate`` = the image layer's translate shifted by half a
pixel, so world = ``(c - 0.5) · unit + t``: the same placement the model outputs get
(`napari_histo_ai._napari.results._object_placement`).

Events used (napari ≥ 0.5, checked on 0.9)
-------------------------------------------
``layer.events.data`` with ``action``:

* ``removing`` / ``removed`` (``Points.remove``, ``Shapes.remove``, the Delete key):
  the store ids of the rows named by ``data_indices`` are read at ``removing`` (the
  features are still there) and written at ``removed``;
* ``added`` (``Points.add``, a finished drawn shape): the new rows are the ones past the
  rows the session knows (Shapes reports ``data_indices == (-1,)`` whatever was added);
* ``changed`` (a point drag, emitted once on release; a shape moved or a vertex edited):
  the rows of ``data_indices`` whose vertices differ from what the session last wrote.

Labels: ``Labels.events.paint`` (one event per finished stroke, napari ≥ 0.5) marks the
window dirty; the window is written back to the label pyramid by `flush_labels`
(debounced by the widget through ``defer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..annotations.model import HUMAN, KINDS, REVIEW_STATES, Annotation, ImageRef
from ..errors import AnnotationError

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from ..annotations.store import Columns

__all__ = [
    "REVIEW_COLOURS",
    "SHAPES_LIMIT",
    "VIEW_LIMIT",
    "AnnotationSession",
    "Placement",
    "image_ref_of",
    "layer_to_annotations",
]

log = logging.getLogger(__name__)

#: most objects put in the editable layers at once (level of detail: zoom in for more)
VIEW_LIMIT = 5_000
#: at most this many lines / boxes / polygons of them (napari triangulates every shape it
#: is given: ~0.1 ms each with bermuda); an even subsample when more are in view
SHAPES_LIMIT = 1_000
#: largest side (level-0 px) of the label window painted at full resolution
LABEL_WINDOW = 2048
#: store metadata key listing the model outputs already made editable
IMPORTED_KEY = "imported_runs"
#: store metadata key of the ranked region queue (active learning) and its position
REGION_QUEUE_KEY = "region_queue"

#: RGBA by review state (rejected objects are not shown)
REVIEW_COLOURS: dict[str, tuple[float, float, float, float]] = {
    "unreviewed": (1.0, 0.85, 0.0, 1.0),  # yellow
    "accepted": (0.1, 0.8, 0.2, 1.0),  # green
    "corrected": (0.15, 0.4, 1.0, 1.0),  # blue
    "added": (0.0, 0.9, 0.9, 1.0),  # cyan
    "rejected": (0.9, 0.1, 0.1, 0.0),  # hidden
}

#: napari shape type of each store kind, and back
_SHAPE_OF_KIND = {"line": "line", "polyline": "path", "box": "rectangle", "polygon": "polygon"}
_KIND_OF_SHAPE = {"line": "line", "path": "polyline", "rectangle": "box", "polygon": "polygon"}

_FEATURES = ("annotation_id", "class", "review", "source", "confidence", "length_um", "length")
_REVIEW_NAMES = np.asarray(REVIEW_STATES, dtype=object)
_REVIEW_RGBA = np.asarray([REVIEW_COLOURS[r] for r in REVIEW_STATES], dtype=np.float64)
_POINT, _LINE, _POLYLINE = (KINDS.index(k) for k in ("point", "line", "polyline"))


# --------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """Where the store's level-0 pixels sit in the image layer's world.

    Parameters
    ----------
    plane_scale, plane_translate : tuple of float
        World scale and offset of the non-spatial (plane) axes, e.g. the z spacing (mm).
    unit : (float, float)
        World size of one level-0 pixel (row, col): µm/px for slides, mm for volumes,
        1 where unknown.
    origin : (float, float)
        World position of the centre of pixel (0, 0): the image layer's translate.
    units : tuple of str
        napari units of every axis (``"micrometer"``, ``"millimeter"``, ``"pixel"``).
    """

    plane_scale: tuple[float, ...]
    plane_translate: tuple[float, ...]
    unit: tuple[float, float]
    origin: tuple[float, float]
    units: tuple[str, ...]

    @classmethod
    def of(cls, image_layer: Layer) -> Placement:
        scale = tuple(float(s) for s in image_layer.scale)
        translate = tuple(float(t) for t in image_layer.translate)
        units = tuple(str(u) for u in getattr(image_layer, "units", ())) or ("pixel",) * len(scale)
        return cls(
            scale[:-2],
            translate[:-2],
            (scale[-2], scale[-1]),
            (translate[-2], translate[-1]),
            units,
        )

    @property
    def n_plane(self) -> int:
        return len(self.plane_scale)

    @property
    def scale(self) -> tuple[float, ...]:
        return (*self.plane_scale, *self.unit)

    @property
    def translate(self) -> tuple[float, ...]:
        return (
            *self.plane_translate,
            self.origin[0] - 0.5 * self.unit[0],
            self.origin[1] - 0.5 * self.unit[1],
        )

    def world_to_px(self, world: np.ndarray) -> np.ndarray:
        """World (…, plane..., y, x) → store (plane indices..., row, col) continuous px."""
        world = np.asarray(world, dtype=np.float64)
        out = np.empty_like(world)
        n = self.n_plane
        if n:
            ps, pt = np.asarray(self.plane_scale), np.asarray(self.plane_translate)
            out[..., :n] = np.rint((world[..., :n] - pt) / ps)
        out[..., n:] = (world[..., n:] - np.asarray(self.origin)) / np.asarray(self.unit) + 0.5
        return out

    def px_to_world(self, px: np.ndarray) -> np.ndarray:
        """Inverse of `world_to_px`."""
        px = np.asarray(px, dtype=np.float64)
        return px * np.asarray(self.scale) + np.asarray(self.translate)


def _layer_world(layer: Layer, data: np.ndarray, ndim: int) -> np.ndarray:
    """Layer data (N, D) → world (N, ndim) with the layer's scale and translate (the last
    ``ndim`` axes; a 2-D layer over a volume gets plane 0)."""
    data = np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1])
    world = data * np.asarray(layer.scale, dtype=np.float64) + np.asarray(
        layer.translate, dtype=np.float64
    )
    if world.shape[1] >= ndim:
        return world[:, world.shape[1] - ndim :]
    pad = np.zeros((len(world), ndim - world.shape[1]))
    return np.concatenate([pad, world], axis=1)


# --------------------------------------------------------------------------- image identity
def image_ref_of(image_layer: Layer) -> ImageRef:
    """The `ImageRef` of an image layer (path, content hash, level-0 shape, mpp/spacing).

    Layers opened by napari-histo-ai carry their Pyramid; other layers are described
    from their data and scale (no file: path ``"napari layer:<name>"``, no hash).
    """
    from .layers import pyramid_of
    from .run import layer_pyramid

    pyramid = pyramid_of(image_layer)
    if pyramid is not None and Path(str(pyramid.path)).exists():
        return ImageRef.from_pyramid(pyramid)
    pyramid = layer_pyramid(image_layer)
    return ImageRef(
        path=f"napari layer:{image_layer.name}",
        content_hash="",
        shape=tuple(int(v) for v in pyramid.spatial_shape(0)),
        axes=pyramid.spatial_axes,
        mpp=pyramid.mpp,
        spacing_mm=pyramid.spacing_mm,
    )


def _shows_mm(image: ImageRef) -> bool:
    """Lengths on this image read best in mm (volumes, MRI slices, mammograms)."""
    pixel = image.pixel_um
    return image.spacing_mm is not None or (pixel is not None and pixel[0] >= 20)


def _length_text(length_um: float | None, *, mm: bool) -> str:
    if length_um is None or not math.isfinite(length_um):
        return ""
    return f"{length_um / 1000:.1f} mm" if mm else f"{length_um:.1f} µm"


# --------------------------------------------------------------------------- layer → rows
def _model_of(layer: Layer) -> tuple[str, str | None]:
    """(model name, version) of a Run-model result layer: from its run folder's record,
    else from its name ``"<image> · <model> · <output>"``."""
    run = layer.metadata.get("run")
    if run:
        meta = Path(str(run)) / "zarr.json"
        try:
            record = json.loads(meta.read_text()).get("attributes", {}).get("napari_histo_ai", {})
            spec = record.get("spec", {})
            if spec.get("name"):
                version = spec.get("version")
                return str(spec["name"]), str(version) if version is not None else None
        except (OSError, ValueError, AttributeError):
            pass
    parts = layer.name.split(" · ")
    return (parts[1] if len(parts) >= 3 else layer.name), None


def _column(layer: Layer, name: str, n: int) -> list[Any] | None:
    features = getattr(layer, "features", None)
    if features is None or name not in features:
        return None
    values = list(features[name])
    return values if len(values) == n else None


def layer_to_annotations(
    layer: Layer,
    placement: Placement,
    *,
    source: str = HUMAN,
    model_version: str | None = None,
    review: str | None = None,
    default_class: str = "",
) -> list[Annotation]:
    """The objects of a Points or Shapes layer as annotations in level-0 pixels.

    Parameters
    ----------
    layer : napari.layers.Points or napari.layers.Shapes
        Any layer placed in the same world as the image (its own scale/translate are
        applied); features ``class`` and ``score`` become class and confidence,
        ``length_mm`` / other numeric features of model lines become measurements.
    placement : Placement
        The image layer's placement (`Placement.of`).
    source, model_version : str
        Provenance of the objects (a model's name and version, or ``"human"``).
    review : str, optional
        Review state; default ``"unreviewed"`` for model objects, ``"added"`` for human.
    default_class : str
        Class of objects without a ``class`` feature.
    """
    kind = layer._type_string
    ndim = 2 + placement.n_plane
    review = review or ("added" if source == HUMAN else "unreviewed")
    if kind == "points":
        data = np.asarray(layer.data, dtype=np.float64)
        n = len(data)
        vertices = [row[None, :] for row in data]
        kinds = ["point"] * n
    elif kind == "shapes":
        vertices = [np.asarray(v, dtype=np.float64) for v in layer.data]
        n = len(vertices)
        kinds = [_KIND_OF_SHAPE.get(t, "polygon") for t in layer.shape_type]
        vertices = [
            _ellipse_polygon(v) if t == "ellipse" else v
            for v, t in zip(vertices, layer.shape_type, strict=True)
        ]
    else:
        raise AnnotationError(
            layer.name,
            f"a {kind} layer cannot be made editable",
            "choose a Points or Shapes layer (model points, boxes or lines)",
        )
    classes = _column(layer, "class", n)
    scores = _column(layer, "score", n) or _column(layer, "confidence", n)
    numeric = {
        name: _column(layer, name, n)
        for name in getattr(layer, "features", {})
        if name not in ("class", "score", "confidence", "annotation_id", "length_um", "length")
        and np.issubdtype(np.asarray(layer.features[name]).dtype, np.number)
    }
    out = []
    for i in range(n):
        px = placement.world_to_px(_layer_world(layer, vertices[i], ndim))
        plane = tuple(int(v) for v in px[0, : placement.n_plane])
        coords = px[:, placement.n_plane :]
        k = kinds[i]
        if k == "box":
            coords = np.stack([coords.min(axis=0), coords.max(axis=0)])
        confidence = None
        if scores is not None and scores[i] is not None and math.isfinite(float(scores[i])):
            confidence = float(scores[i])
        measurements = {
            name: float(col[i])
            for name, col in numeric.items()
            if col is not None and math.isfinite(float(col[i]))
        }
        out.append(
            Annotation(
                kind=k,
                coords=coords,
                class_name=str(classes[i]) if classes is not None else default_class,
                plane=plane,
                source=source,
                model_version=model_version,
                confidence=confidence if source != HUMAN else None,
                review=review,
                measurements=measurements,
            )
        )
    return out


def _path_length_um(coords: np.ndarray, pixel: tuple[float, float]) -> float:
    """Length (µm) of an open path of level-0 (N, 2) vertices at ``pixel`` µm/px."""
    if len(coords) < 2:
        return 0.0
    steps = np.diff(coords, axis=0) * np.asarray(pixel, dtype=np.float64)
    return float(np.sum(np.hypot(steps[:, 0], steps[:, 1])))


def _ellipse_polygon(corners: np.ndarray, n: int = 32) -> np.ndarray:
    """napari ellipse (4 bounding corners, any leading plane coordinates) → polygon."""
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.repeat(centre[None, :], n, axis=0)
    ring[:, -2] += radius[-2] * np.sin(t)
    ring[:, -1] += radius[-1] * np.cos(t)
    return ring


def _shape_vertices(kind: str, coords: np.ndarray, plane: Sequence[float]) -> np.ndarray:
    """An object's level-0 (N, 2) coords as napari shape vertices (plane coordinates
    first; a box as its four corners)."""
    if kind == "box":
        (t, left), (b, r) = coords
        coords = np.array([[t, left], [t, r], [b, r], [b, left]], dtype=np.float64)
    if not len(plane):
        return coords.copy()
    lead = np.repeat(np.asarray(plane, dtype=np.float64)[None, :], len(coords), axis=0)
    return np.concatenate([lead, coords], axis=1)


# --------------------------------------------------------------------------- layer rows
class _Rows:
    """The objects of one editable layer, index-aligned with the layer's rows.

    A reload keeps the store's `Columns` (no `Annotation` per object: 5,000 of them cost
    more than the query). An `Annotation` is read from the store only for a row used as
    one (edited, selected, removed); from then on it *is* that row (edits change it in
    place) and wins over the columns. Rows drawn since the reload follow the columns.
    """

    def __init__(self, cols: Columns, store: Any) -> None:
        self.cols = cols
        self._store = store
        self._made: dict[int, Annotation] = {}
        self._tail: list[Annotation] = []

    def __len__(self) -> int:
        return len(self.cols) + len(self._tail)

    def __getitem__(self, i: int) -> Annotation:
        return self.many([i])[0]

    def many(self, indices: Iterable[int]) -> list[Annotation]:
        """The rows ``indices`` as Annotations (read from the store in one batch)."""
        index = [int(i) for i in indices]
        n = len(self.cols)
        todo = [i for i in dict.fromkeys(index) if i < n and i not in self._made]
        if todo:
            ids = self.cols.id[todo].tolist()
            got = self._store.get_many(ids)
            for i, id_ in zip(todo, ids, strict=True):
                self._made[i] = got.get(int(id_)) or self._from_columns(i)
        return [self._made[i] if i < n else self._tail[i - n] for i in index]

    def _from_columns(self, i: int) -> Annotation:
        """Row ``i`` from the columns (an object deleted in the store since the reload)."""
        c = self.cols
        classes = self._store.classes
        k = int(c.class_index[i])
        conf = float(c.confidence[i])
        return Annotation(
            kind=KINDS[int(c.kind[i])],
            coords=c.vertices(i).copy(),
            class_name=classes[k] if 0 <= k < len(classes) else "",
            source=str(c.source[i]),
            model_version=c.model_version[i],
            annotator=c.annotator[i],
            created=float(c.created[i]),
            modified=float(c.modified[i]),
            confidence=None if math.isnan(conf) else conf,
            review=REVIEW_STATES[int(c.review[i])],
            id=int(c.id[i]),
        )

    def overrides(self) -> list[tuple[int, Annotation]]:
        """(row, Annotation) of every row that is an Annotation (made or drawn)."""
        n = len(self.cols)
        return [*self._made.items(), *((n + k, a) for k, a in enumerate(self._tail))]

    def ids(self) -> np.ndarray:
        """Store id of every row (-1: not stored yet), shape (len,)."""
        tail = [a.id if a.id is not None else -1 for a in self._tail]
        return np.concatenate([self.cols.id, np.asarray(tail, dtype=np.int64)])

    def id_at(self, i: int) -> int | None:
        n = len(self.cols)
        return int(self.cols.id[i]) if i < n else self._tail[i - n].id

    def kind_at(self, i: int) -> str:
        return self.vertices(i)[0]

    def index_of(self, id_: int) -> int | None:
        hits = np.flatnonzero(self.ids() == int(id_))
        return int(hits[0]) if len(hits) else None

    def append(self, ann: Annotation) -> None:
        self._tail.append(ann)

    def extend(self, anns: Iterable[Annotation]) -> None:
        self._tail.extend(anns)

    def drop(self, indices: Iterable[int]) -> _Rows:
        """These rows without rows ``indices``."""
        gone = {int(i) for i in indices}
        n = len(self.cols)
        keep = np.ones(n, dtype=bool)
        keep[[i for i in gone if 0 <= i < n]] = False
        out = _Rows(self.cols.take(keep), self._store)
        new_index = np.cumsum(keep) - 1
        out._made = {int(new_index[i]): a for i, a in self._made.items() if keep[i]}
        out._tail = [a for k, a in enumerate(self._tail) if n + k not in gone]
        return out

    def vertices(self, i: int) -> tuple[str, np.ndarray]:
        """(kind, level-0 (N, 2) coords) of row ``i`` without making an Annotation."""
        n = len(self.cols)
        ann = self._tail[i - n] if i >= n else self._made.get(i)
        if ann is not None:
            return ann.kind, ann.coords
        return KINDS[int(self.cols.kind[i])], self.cols.vertices(i)


# --------------------------------------------------------------------------- the session
class AnnotationSession:
    """Editable Points / Shapes layers of one image, kept in sync with its store.

    Parameters
    ----------
    image_layer : napari.layers.Image
        The image the annotations belong to (its scale/translate place the layers).
    store : AnnotationStore
        The image's store (see `open` to find or create it).
    viewer : napari.components.ViewerModel, optional
        When given, the editable layers are added to it, the viewport decides what is
        shown (level of detail) and `next_unreviewed` moves the camera.
    limit : int
        Most objects shown at once (`VIEW_LIMIT`).
    shapes_limit : int
        Most lines / boxes / polygons among them (`SHAPES_LIMIT`): napari triangulates
        each shape, so a zoomed-out view shows an even subsample of them.
    defer : callable, optional
        ``defer(key, function)`` runs ``function`` later (the widget debounces with a
        Qt timer); default: at once. Used for label write-back.

    Attributes
    ----------
    points_layer, shapes_layer : napari.layers.Points, napari.layers.Shapes
        The editable layers; features ``annotation_id`` (store id), ``class``,
        ``review``, ``source``, ``confidence``, ``length_um`` and ``length`` (text).
    current_class : str
        Class given to newly drawn objects.
    shown, in_view, total : int
        Objects in the editable layers, objects in the loaded view box (more than
        ``shown`` when ``truncated``: the view limit cut them; then estimated from a
        sample, ``in_view_estimated``, unless the view is the whole 2-D image), and live
        (not rejected) objects in the store.
    """

    def __init__(
        self,
        image_layer: Layer,
        store: Any,
        *,
        viewer: napari.components.ViewerModel | None = None,
        limit: int = VIEW_LIMIT,
        shapes_limit: int = SHAPES_LIMIT,
        defer: Callable[[str, Callable[[], None]], None] | None = None,
    ) -> None:
        self.image_layer = image_layer
        self.store = store
        self.viewer = viewer
        self.limit = int(limit)
        self.shapes_limit = int(shapes_limit)
        self._defer = defer or (lambda _key, fn: fn())
        self.placement = Placement.of(image_layer)
        self._mm = _shows_mm(store.image)
        self.current_class = store.classes[0] if store.classes else ""
        self.plane: tuple[int, ...] = (0,) * self.placement.n_plane
        self.shown = 0
        self.in_view = 0
        #: whether ``in_view`` is an estimate (a truncated view not of the whole image)
        self.in_view_estimated = False
        self.truncated = False
        self.last_saved: float | None = None
        #: called with no argument after every write to the store (widget: counts, status)
        self.on_change: list[Callable[[], None]] = []
        #: called with the exception when an edit made on a layer could not be saved
        #: (the layers are reloaded from the store); without one, the error propagates
        self.on_error: list[Callable[[BaseException], None]] = []
        self._syncing = False
        self._cursor: tuple[tuple[int, ...], tuple[float, float]] | None = None
        from ..annotations.store import Columns

        self._rows: dict[str, _Rows] = {
            "points": _Rows(Columns.empty(), store),
            "shapes": _Rows(Columns.empty(), store),
        }
        self._removing: dict[str, list[Annotation]] = {"points": [], "shapes": []}
        self._box: tuple[float, float, float, float] | None = None
        self._shapes_plane: list[int] = []  # the plane the shapes layer shows
        self.points_layer = self._make_points()
        self.shapes_layer = self._make_shapes()
        self.points_layer.events.data.connect(self._on_points_data)
        self.shapes_layer.events.data.connect(self._on_shapes_data)
        if viewer is not None:
            viewer.layers.append(self.shapes_layer)
            viewer.layers.append(self.points_layer)
        # labels
        self.label_pyramid: Any = None
        self.labels_layer: Any = None
        self.label_window_layer: Any = None
        self._label_box: tuple[int, int, int, int] | None = None
        self._label_plane: tuple[int, ...] = ()
        self._label_dirty = False
        self.refresh()

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        image_layer: Layer,
        *,
        viewer: napari.components.ViewerModel | None = None,
        path: str | Path | None = None,
        classes: Sequence[str] = (),
        annotator: str | None = None,
        **kwargs: Any,
    ) -> AnnotationSession:
        """Open (or create) the store of ``image_layer`` and start a session on it.

        Parameters
        ----------
        path : str or Path, optional
            The store file; default `default_store_path` of the image file (beside it,
            or in the user folder when that folder is read-only).

        Raises
        ------
        AnnotationError
            The layer has no file and no ``path`` is given, or the store belongs to a
            different image (content hash).
        """
        from ..annotations.store import AnnotationStore

        image = image_ref_of(image_layer)
        if path is None:
            if image.path.startswith("napari layer:"):
                raise AnnotationError(
                    image_layer.name,
                    "this image layer was not opened from a file, so its annotations have "
                    "no default place",
                    "open the image with napari-histo-ai, or give a store path",
                )
            from ..annotations.store_paths import default_store_path

            path = default_store_path(image.path)
        store = AnnotationStore.open_or_create(
            Path(path), image, classes=tuple(classes), annotator=annotator
        )
        try:
            return cls(image_layer, store, viewer=viewer, **kwargs)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Write pending label edits, disconnect the layers and close the store."""
        with contextlib.suppress(Exception):
            self.flush_labels()
        for layer, handler in (
            (self.points_layer, self._on_points_data),
            (self.shapes_layer, self._on_shapes_data),
        ):
            with contextlib.suppress(Exception):
                layer.events.data.disconnect(handler)
        if self.label_window_layer is not None:
            with contextlib.suppress(Exception):
                self.label_window_layer.events.paint.disconnect(self._on_paint)
        self.store.close()

    # -- layers -----------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return self.image_layer.name

    def _meta(self) -> dict[str, Any]:
        image = self.store.image
        return {
            "annotation_store": str(self.store.path),
            "image": image.to_dict(),
            "mpp": list(image.mpp) if image.mpp else None,
            "kind": "review",
        }

    def _defaults(self) -> dict[str, Any]:
        return {
            "annotation_id": -1,
            "class": self.current_class,
            "review": "added",
            "source": HUMAN,
            "confidence": np.nan,
            "length_um": np.nan,
            "length": "",
        }

    def _point_size(self) -> float:
        pixel = self.store.image.pixel_um
        if pixel is None:
            return 12.0
        return float(max(3.0, 6.0 / pixel[0]))  # ~6 µm markers, at least 3 px

    def _make_points(self) -> Any:
        from napari.layers import Points

        p = self.placement
        layer = Points(
            np.zeros((0, 2 + p.n_plane)),
            ndim=2 + p.n_plane,
            name=f"{self._name} · review points",
            scale=p.scale,
            translate=p.translate,
            units=p.units,
            size=self._point_size(),
            border_width=0,
            opacity=0.75,  # the nucleus under a marker stays visible
            features=self._features(self._rows["points"]),
            metadata=self._meta(),
        )
        layer.feature_defaults = self._defaults()
        layer.current_face_color = REVIEW_COLOURS["added"]
        return layer

    def _make_shapes(self) -> Any:
        from napari.layers import Shapes

        p = self.placement
        layer = Shapes(
            ndim=2 + p.n_plane,
            name=f"{self._name} · review shapes",
            scale=p.scale,
            translate=p.translate,
            units=p.units,
            edge_width=2.0,
            face_color="transparent",
            features=self._features(self._rows["shapes"]),
            text={"string": "{length}", "size": 10, "color": "white"},
            metadata=self._meta(),
        )
        layer.feature_defaults = self._defaults()
        layer.current_edge_color = REVIEW_COLOURS["added"]
        layer.current_face_color = "transparent"
        return layer

    def _features(self, rows: _Rows) -> dict[str, np.ndarray]:
        """Feature columns of a layer's rows: vectorised over the columns, then the rows
        that are Annotations (edited or drawn) written over them."""
        pixel = self.store.image.pixel_um
        c = rows.cols
        n, extra = len(rows), len(rows) - len(rows.cols)
        classes = np.asarray([*self.store.classes, ""], dtype=object)  # index -1: ""
        out: dict[str, np.ndarray] = {
            "annotation_id": rows.ids(),
            "class": classes[np.concatenate([c.class_index, np.full(extra, -1, np.int64)])],
            "review": np.concatenate([_REVIEW_NAMES[c.review], np.full(extra, "", object)]),
            "source": np.concatenate([c.source, np.full(extra, "", object)]),
            "confidence": np.concatenate([c.confidence, np.full(extra, np.nan)]),
            "length_um": np.full(n, np.nan),
            "length": np.full(n, "", dtype=object),
        }
        if pixel is not None:
            for k in np.flatnonzero((c.kind == _LINE) | (c.kind == _POLYLINE)).tolist():
                out["length_um"][k] = _path_length_um(c.vertices(k), pixel)
        for i, a in rows.overrides():
            out["annotation_id"][i] = a.id if a.id is not None else -1
            out["class"][i] = a.class_name
            out["review"][i] = a.review
            out["source"][i] = a.source
            out["confidence"][i] = np.nan if a.confidence is None else a.confidence
            length = a.length_um(pixel) if a.kind in ("line", "polyline") else None
            out["length_um"][i] = np.nan if length is None else length
        for k in np.flatnonzero(np.isfinite(out["length_um"])).tolist():
            out["length"][k] = _length_text(float(out["length_um"][k]), mm=self._mm)
        return out

    def _colours(self, rows: _Rows) -> np.ndarray:
        colours = np.empty((len(rows), 4), dtype=np.float64)
        colours[: len(rows.cols)] = _REVIEW_RGBA[rows.cols.review]
        for i, a in rows.overrides():
            colours[i] = REVIEW_COLOURS[a.review]
        return colours

    def _restyle(self, which: str) -> None:
        """Features and colours of one layer from the session's rows (no data change;
        colours are set only where they changed: napari recolours every shape)."""
        rows = self._rows[which]
        layer = self.points_layer if which == "points" else self.shapes_layer
        with self._quiet():
            layer.features = self._features(rows)
            if len(rows):
                colours = self._colours(rows)
                name = "face_color" if which == "points" else "edge_color"
                now = np.asarray(getattr(layer, name), dtype=np.float64)
                if now.shape != colours.shape or not np.allclose(now, colours, atol=1e-6):
                    setattr(layer, name, colours)
            layer.feature_defaults = self._defaults()

    @contextlib.contextmanager
    def _quiet(self) -> Generator[None, None, None]:
        previous = self._syncing
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = previous

    # -- viewport (level of detail) ---------------------------------------------------
    def viewport(self) -> tuple[tuple[float, float, float, float] | None, tuple[int, ...]]:
        """The visible box ``(top, left, bottom, right)`` in level-0 px (None: the whole
        image) and the current plane indices."""
        shape = self.store.image.shape
        h, w = shape[-2:]
        viewer = self.viewer
        if viewer is None:
            return None, self.plane
        p = self.placement
        plane = self.plane
        if p.n_plane:
            point = np.asarray(viewer.dims.point, dtype=float)[-(2 + p.n_plane) : -2]
            idx = np.rint((point - np.asarray(p.plane_translate)) / np.asarray(p.plane_scale))
            plane = tuple(int(np.clip(v, 0, n - 1)) for v, n in zip(idx, shape[:-2], strict=True))
        if viewer.dims.ndisplay == 3:
            return None, plane
        from .layers import visible_world

        centre, half = visible_world(viewer)
        half = half * 1.1  # 10 % margin
        a = (centre - half - np.asarray(p.origin)) / np.asarray(p.unit) + 0.5
        b = (centre + half - np.asarray(p.origin)) / np.asarray(p.unit) + 0.5
        top, left = max(0.0, float(a[0])), max(0.0, float(a[1]))
        bottom, right = min(float(h), float(b[0])), min(float(w), float(b[1]))
        if bottom <= top or right <= left:
            return (0.0, 0.0, 0.0, 0.0), plane
        return (top, left, bottom, right), plane

    def refresh(self, *, force: bool = True) -> tuple[int, int]:
        """Reload the editable layers from the store for the viewport.

        Parameters
        ----------
        force : bool
            ``False`` (camera moves): skip the reload when the view is the one loaded,
            or lies inside a loaded area that held every object (nothing new to show).

        Returns
        -------
        (shown, in_view) : (int, int)
            Objects now in the layers and objects in the loaded box; ``truncated``
            says whether the view limit cut them (level of detail: zoom in for all).
        """
        if getattr(self.shapes_layer, "_is_creating", False):
            return self.shown, self.in_view  # never pull a shape from under the pen
        box, plane = self.viewport()
        shape = self.store.image.shape
        query_box = box if box is not None else (0.0, 0.0, float(shape[-2]), float(shape[-1]))
        if not force and plane == self.plane and self._box is not None:
            loaded = self._box
            inside = all(a >= b for a, b in zip(query_box[:2], loaded[:2], strict=True)) and all(
                a <= b for a, b in zip(query_box[2:], loaded[2:], strict=True)
            )
            if (inside and not self.truncated) or tuple(query_box) == tuple(loaded):
                return self.shown, self.in_view
        self.plane = plane
        found = self.store.query_columns(query_box, plane=plane, limit=self.limit + 1)
        self.truncated = len(found) > self.limit
        if self.truncated:
            found = found.take(np.arange(self.limit))
        is_point = found.kind == _POINT
        shape_rows = np.flatnonzero(~is_point)
        if len(shape_rows) > self.shapes_limit:  # an even subsample of the shapes
            self.truncated = True
            chosen = shape_rows[np.linspace(0, len(shape_rows) - 1, self.shapes_limit).astype(int)]
            found = found.take(np.sort(np.concatenate([np.flatnonzero(is_point), chosen])))
            is_point = found.kind == _POINT
        self._set_rows("points", _Rows(found.take(is_point), self.store))
        self._set_rows("shapes", _Rows(found.take(~is_point), self.store))
        self.shown = len(found)
        self.in_view = self._count_in(query_box, plane) if self.truncated else self.shown
        self.in_view_estimated = self.truncated and not self._whole(query_box, plane)
        self._box = tuple(query_box)  # type: ignore[assignment]
        return self.shown, self.in_view

    def _count_in(self, box: tuple[float, float, float, float], plane: tuple[int, ...]) -> int:
        """Objects in a truncated view: O(1) for the whole image (2-D), else estimated
        from a sample (an exact count visits every object: ~1 s at 10^6)."""
        if self._whole(box, plane):  # every vertex: the O(1) live counts
            h, w = self.store.image.shape[-2:]
            box = (-1.0, -1.0, float(h) + 1, float(w) + 1)
        return int(self.store.count_in(box, plane=plane, exact=False))

    def _whole(self, box: tuple[float, float, float, float], plane: tuple[int, ...]) -> bool:
        """Whether ``box`` covers the whole image of a 2-D store (counts are O(1))."""
        h, w = self.store.image.shape[-2:]
        top, left, bottom, right = box
        flat = len(self.store.image.shape) == 2
        return flat and top <= 0 and left <= 0 and bottom >= h and right >= w

    @property
    def total(self) -> int:
        """Live objects in the store that the layers can show (rejected ones are hidden)."""
        return int(self.store.count() - self.store.count(reviews=("rejected",)))

    def _set_rows(self, which: str, rows: _Rows) -> None:
        layer = self.points_layer if which == "points" else self.shapes_layer
        keep = np.asarray(self._selected_ids(which), dtype=np.int64)
        plane = list(self.plane)
        with self._quiet():
            if which == "points":
                c = rows.cols
                coords = np.empty((len(rows), 2), dtype=np.float64)
                coords[: len(c)] = c.coords[c.offsets[:-1]]
                for i, a in rows.overrides():
                    coords[i] = a.coords[0]
                lead = np.repeat(np.asarray(plane, dtype=np.float64)[None, :], len(rows), axis=0)
                data = np.concatenate([lead, coords], axis=1)
                layer.selected_data = set()
                layer.data = data
            else:
                layer.selected_data = set()
                rows = self._update_shapes(layer, rows, plane)
            self._rows[which] = rows
            self._restyle(which)
            if len(keep):
                layer.selected_data = set(np.flatnonzero(np.isin(rows.ids(), keep)).tolist())

    def _update_shapes(self, layer: Any, rows: _Rows, plane: list[int]) -> _Rows:
        """Make the Shapes layer show ``rows``; returns them in the layer's order.

        napari triangulates every shape it is given (~60 µs a polygon), so a reload
        after an edit or an undo, or a small pan, keeps the shapes already shown with
        unchanged geometry and only removes and adds the others."""
        old = self._rows["shapes"]
        reuse = (
            old is not rows
            and len(old) > 0
            and not rows.overrides()
            and len(layer.data) == len(old)
            and self._shapes_plane == plane
        )
        plan = _reuse_plan(old, rows) if reuse else None
        if plan is not None:
            remove, order, n_kept = plan
            ordered = _Rows(rows.cols.take(order), self.store)
            try:
                if remove:
                    layer.selected_data = set(remove)
                    layer.remove_selected()
                if len(ordered) > n_kept:
                    self._add_shapes(layer, ordered, plane, self._colours(ordered), start=n_kept)
                return ordered
            except RuntimeError:  # napari refused a shape: build the layer again
                log.debug("shapes reload: rebuilding the layer", exc_info=True)
        layer.data = []
        if len(rows):  # colours with the shapes: napari sets them once
            self._add_shapes(layer, rows, plane, self._colours(rows))
        self._shapes_plane = list(plane)
        return rows

    @staticmethod
    def _add_shapes(
        layer: Any, rows: _Rows, plane: list[int], colours: np.ndarray, *, start: int = 0
    ) -> None:
        """Add rows ``start:`` of ``rows`` to the layer (a self-crossing polygon napari
        cannot fill is shown as its closed outline); with ``start`` > 0 any refusal
        raises ``RuntimeError`` (the caller rebuilds)."""
        vertices, types = [], []
        for i in range(start, len(rows)):
            kind, coords = rows.vertices(i)
            vertices.append(_shape_vertices(kind, coords, plane))
            types.append(_SHAPE_OF_KIND[kind])
        colours = colours[start:]
        try:
            layer.add(vertices, shape_type=types, edge_color=colours)
            return
        except RuntimeError:  # napari could not triangulate a (self-crossing) polygon
            if start:
                raise
            layer.data = []
        for i, (v, t) in enumerate(zip(vertices, types, strict=True)):
            try:
                layer.add([v], shape_type=[t], edge_color=colours[i : i + 1])
            except RuntimeError:  # shown as its closed outline; still edited as a polygon
                log.warning("polygon %s crosses itself: shown as an outline", rows.id_at(i))
                layer.add(
                    [np.concatenate([v, v[:1]])], shape_type=["path"], edge_color=colours[i : i + 1]
                )

    # -- edits from the layers ----------------------------------------------------------
    def _on_points_data(self, event: Any) -> None:
        self._on_data("points", event)

    def _on_shapes_data(self, event: Any) -> None:
        self._on_data("shapes", event)

    def _on_data(self, which: str, event: Any) -> None:
        if self._syncing:
            return
        action = str(getattr(event, "action", ""))
        indices = [int(i) for i in getattr(event, "data_indices", ()) or ()]
        rows = self._rows[which]
        try:
            if action == "removing":
                self._removing[which] = rows.many(i for i in indices if 0 <= i < len(rows))
            elif action == "removed":
                self._removed(which, indices)
            elif action == "added":
                self._added(which)
            elif action == "changed":
                self._changed(which, indices)
        except Exception as exc:  # an edit the store refused: show the store's state again
            log.warning("edit not saved: %s", exc)
            self._removing[which] = []
            self.refresh()
            if not self.on_error:
                raise
            for callback in self.on_error:
                callback(exc)

    def _layer_vertices(self, which: str, index: int) -> tuple[str, np.ndarray, tuple[int, ...]]:
        """(kind, level-0 coords, plane) of row ``index`` as the layer now has it."""
        layer = self.points_layer if which == "points" else self.shapes_layer
        n = self.placement.n_plane
        if which == "points":
            row = np.asarray(layer.data[index], dtype=np.float64)
            return "point", row[None, n:], tuple(round(v) for v in row[:n])
        vertices = np.asarray(layer.data[index], dtype=np.float64)
        shape_type = layer.shape_type[index]
        if shape_type == "ellipse":
            vertices = _ellipse_polygon(vertices)
        kind = _KIND_OF_SHAPE.get(shape_type, "polygon")
        coords = vertices[:, n:]
        rows = self._rows[which]
        if kind == "polyline" and index < len(rows) and rows.kind_at(index) == "polygon":
            kind = "polygon"  # a self-crossing polygon shown as its closed outline
            if len(coords) > 3 and np.allclose(coords[0], coords[-1]):
                coords = coords[:-1]
        if kind == "box":
            if not _axis_aligned(coords):  # rotated: the outline is kept as a polygon
                kind = "polygon"
            else:
                coords = np.stack([coords.min(axis=0), coords.max(axis=0)])
        return kind, coords, tuple(round(v) for v in vertices[0, :n])

    def _added(self, which: str) -> None:
        layer = self.points_layer if which == "points" else self.shapes_layer
        rows = self._rows[which]
        first = len(rows)
        new = []
        for i in range(first, len(layer.data)):
            kind, coords, plane = self._layer_vertices(which, i)
            new.append(
                Annotation(
                    kind=kind,
                    coords=coords,
                    class_name=self.current_class,
                    plane=plane or self.plane,
                    source=HUMAN,
                    review="added",
                )
            )
        if not new:
            return
        ids = self.store.add(new, label=f"add {len(new)} {new[0].kind}")
        for ann, id_ in zip(new, ids, strict=True):
            ann.id = int(id_)
        rows.extend(new)
        self._restyle(which)
        self._saved()

    def save_new_rows(self, layer: Layer) -> None:
        """Store rows a layer gained without a data event (napari's paste)."""
        which = "points" if layer is self.points_layer else "shapes"
        self._added(which)

    def _removed(self, which: str, indices: list[int]) -> None:
        removed = self._removing.pop(which, [])
        self._removing[which] = []
        self._rows[which] = self._rows[which].drop(indices)
        model = [int(a.id) for a in removed if a.is_model and a.id is not None]
        human = [int(a.id) for a in removed if not a.is_model and a.id is not None]
        self._write_group(
            [(model, {"review": "rejected"}), (human, None)], _reject_label(model, human)
        )
        self._restyle(which)
        self._saved()

    def _changed(self, which: str, indices: Iterable[int]) -> None:
        layer = self.points_layer if which == "points" else self.shapes_layer
        rows = self._rows[which]
        if len(layer.data) != len(rows):  # the data were replaced from outside: resync
            self.refresh()
            return
        moved: list[tuple[Annotation, str, np.ndarray]] = []
        valid = [i for i in indices if 0 <= i < len(rows)]
        for i, ann in zip(valid, rows.many(valid), strict=True):
            kind, coords, _plane = self._layer_vertices(which, i)
            same = kind == ann.kind and ann.coords.shape == coords.shape
            if same and np.allclose(ann.coords, coords, atol=1e-3):  # float32 vertices
                continue
            moved.append((ann, kind, coords))
        if not moved:
            return
        groups: dict[tuple[str, bool], list[tuple[Annotation, np.ndarray]]] = {}
        reshaped = []
        for ann, kind, coords in moved:
            if kind != ann.kind:  # a box turned polygon (a vertex removed)
                reshaped.append((ann, kind, coords))
                continue
            groups.setdefault((ann.review, ann.is_model), []).append((ann, coords))
        label = f"move {len(moved)}" if not reshaped else f"as {reshaped[0][1]}"
        with self.store.group(label):  # one user action: one undo step
            for ann, kind, coords in reshaped:
                self._change_kind(ann, kind, coords)
            for (review, is_model), items in groups.items():
                ids = [a.id for a, _ in items]
                changes: dict[str, Any] = {"coords": [c for _, c in items]}
                if is_model and review in ("unreviewed", "accepted"):
                    changes["review"] = "corrected"
                self.store.update(ids, label=label, **changes)
                for ann, coords in items:
                    ann.coords = coords
                    if "review" in changes:
                        ann.review = "corrected"
        self._restyle(which)
        self._saved()

    def _change_kind(self, ann: Annotation, kind: str, coords: np.ndarray) -> None:
        """A shape that changed kind (a box that lost a corner) stays the same object:
        one update of kind and coords (review "corrected" for model objects)."""
        review = (
            "corrected" if ann.is_model and ann.review in ("unreviewed", "accepted") else ann.review
        )
        self.store.update(ann.id, label=f"as {kind}", kind=kind, coords=coords, review=review)
        ann.kind, ann.coords, ann.review = kind, coords, review

    def _write_group(
        self, parts: list[tuple[list[int], dict[str, Any] | None]], label: str
    ) -> None:
        """The store writes of one user action (updates, or deletes where changes is
        None) as one undoable operation."""
        with self.store.group(label):
            for ids, changes in parts:
                if not ids:
                    continue
                if changes is None:
                    self.store.delete(ids, label=label)
                else:
                    self.store.update(ids, label=label, **changes)

    def _saved(self) -> None:
        self.last_saved = time.time()
        self.shown = len(self._rows["points"]) + len(self._rows["shapes"])
        for callback in self.on_change:
            callback()

    # -- review actions -----------------------------------------------------------------
    def _selected_ids(self, which: str) -> list[int]:
        layer = self.points_layer if which == "points" else self.shapes_layer
        rows = self._rows[which]
        chosen = [i for i in sorted(layer.selected_data) if 0 <= i < len(rows)]
        return [int(v) for v in rows.ids()[chosen] if v >= 0] if chosen else []

    def selected(self) -> list[Annotation]:
        """The selected objects of both editable layers (as the session last wrote them)."""
        out = []
        for which in ("points", "shapes"):
            layer = self.points_layer if which == "points" else self.shapes_layer
            rows = self._rows[which]
            out += rows.many(i for i in sorted(layer.selected_data) if 0 <= i < len(rows))
        return out

    def _need_selection(self, action: str) -> list[Annotation]:
        chosen = self.selected()
        if not chosen:
            raise AnnotationError(
                self.store.path,
                f"nothing is selected to {action}",
                "select objects in the review layers, or press N for the next unreviewed",
            )
        return chosen

    def accept_selected(self) -> int:
        """Mark the selected unreviewed model objects accepted; returns how many changed."""
        chosen = [a for a in self._need_selection("accept") if a.review == "unreviewed"]
        ids = [a.id for a in chosen]
        if ids:
            self.store.update(ids, label=f"accept {len(ids)}", review="accepted")
            for a in chosen:
                a.review = "accepted"
            self._restyle("points")
            self._restyle("shapes")
            self._saved()
        return len(ids)

    def reject_selected(self) -> int:
        """Reject the selected model objects (kept, hidden) and delete selected human
        ones; returns how many."""
        chosen = self._need_selection("reject")
        model = [int(a.id) for a in chosen if a.is_model and a.id is not None]
        human = [int(a.id) for a in chosen if not a.is_model and a.id is not None]
        self._write_group(
            [(model, {"review": "rejected"}), (human, None)], _reject_label(model, human)
        )
        self.refresh()
        self._saved()
        return len(chosen)

    def set_class_selected(self, name: str) -> int:
        """Give the selected objects class ``name`` (model objects become "corrected")."""
        name = self.add_class(name)
        chosen = [a for a in self._need_selection("relabel") if a.class_name != name]
        model = [a for a in chosen if a.is_model]
        human = [a for a in chosen if not a.is_model]
        self._write_group(
            [
                (
                    [int(a.id) for a in model if a.id is not None],
                    {"class_name": name, "review": "corrected"},
                ),
                ([int(a.id) for a in human if a.id is not None], {"class_name": name}),
            ],
            f"class {name}",
        )
        for a in chosen:
            a.class_name = name
            if a.is_model:
                a.review = "corrected"
        self._restyle("points")
        self._restyle("shapes")
        if chosen:
            self._saved()
        return len(chosen)

    def add_class(self, name: str) -> str:
        """Add ``name`` to the store's vocabulary (no-op when known); returns it."""
        name = str(name).strip()
        if not name:
            raise AnnotationError(self.store.path, "a class needs a name", "type a class name")
        if name not in self.store.classes:
            self.store.add_class(name)
        return name

    def set_current_class(self, name: str) -> None:
        """The class newly drawn objects get."""
        self.current_class = self.add_class(name)
        for layer in (self.points_layer, self.shapes_layer):
            layer.feature_defaults = self._defaults()

    def class_by_number(self, number: int) -> str:
        """The ``number``-th class (1-based) of the vocabulary (keys 1–9)."""
        classes = list(self.store.classes)
        if not 1 <= number <= len(classes):
            raise AnnotationError(
                self.store.path,
                f"there is no class {number}: the classes are {classes or 'none yet'}",
                "add a class first",
            )
        return classes[number - 1]

    def counts(self) -> dict[str, int]:
        """Objects per review state in the whole store."""
        from ..annotations.model import REVIEW_STATES

        return {state: self.store.count(reviews=(state,)) for state in REVIEW_STATES}

    def next_unreviewed(self) -> Annotation | None:
        """The next unreviewed object in region order (wrapping round once); moves the
        camera to it and selects it. ``None`` when nothing is left to review."""
        if self._cursor is None:
            ann = self.store.next_unreviewed()
        else:
            ann = self.store.next_unreviewed(after=self._cursor[1], plane=self._cursor[0])
        if ann is None:
            return None
        lo, hi = ann.coords.min(axis=0), ann.coords.max(axis=0)
        centre = (lo + hi) / 2
        self._cursor = (ann.plane, (float(centre[0]), float(centre[1])))
        if self.viewer is not None:
            self._look_at(ann)
        else:
            self.plane = ann.plane
        self.refresh()
        which = "points" if ann.kind == "point" else "shapes"
        layer = self.points_layer if which == "points" else self.shapes_layer
        rows = self._rows[which]
        index = rows.index_of(int(ann.id)) if ann.id is not None else None
        if index is None:  # beyond the view limit: show it on its own
            rows.append(ann)
            self._set_rows(which, rows)
            index = len(rows) - 1
        other = self.shapes_layer if which == "points" else self.points_layer
        other.selected_data = set()
        layer.selected_data = {index}
        if self.viewer is not None:
            self.viewer.layers.selection.active = layer
        return ann

    def _look_at(self, ann: Annotation) -> None:
        viewer = self.viewer
        assert viewer is not None
        p = self.placement
        lo, hi = ann.coords.min(axis=0), ann.coords.max(axis=0)
        centre_px = np.asarray([*ann.plane, *((lo + hi) / 2)], dtype=float)
        world = p.px_to_world(centre_px)
        if p.n_plane:
            ndim = viewer.dims.ndim
            for k in range(p.n_plane):
                viewer.dims.set_point(ndim - 2 - p.n_plane + k, float(world[k]))
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        camera.center = (float(world[-2]), float(world[-1]))
        canvas = getattr(viewer, "canvas", None)
        size = float(min(getattr(canvas, "size", (600, 800))[-2:]))
        extent_px = max(float(np.max(hi - lo)) * 3, 256.0)
        camera.zoom = size / (extent_px * max(p.unit))

    # -- the region review queue (active learning) ----------------------------------------
    def set_region_queue(self, regions: Iterable[Any], *, source: str = "") -> int:
        """Replace the region queue (ranked `napari_histo_ai.inference.uncertainty.Region`
        objects or their `Region.to_dict` dicts); it is saved in the store's metadata
        (key ``"region_queue"``) with the current position, so it survives a reopen.
        Returns the number of regions."""
        mpp = self.store.image.pixel_um
        items = [r if isinstance(r, dict) else r.to_dict(mpp) for r in regions]
        self.store.metadata[REGION_QUEUE_KEY] = {"source": source, "index": -1, "regions": items}
        return len(items)

    @property
    def region_queue(self) -> list[Any]:
        """The saved queue, as `Region` objects in rank order ([] when none)."""
        from ..inference.uncertainty import Region

        saved = self.store.metadata.get(REGION_QUEUE_KEY) or {}
        return [Region.from_dict(d) for d in saved.get("regions", [])]

    @property
    def region_index(self) -> int:
        """Position in the queue of the region last shown (-1: none yet)."""
        saved = self.store.metadata.get(REGION_QUEUE_KEY) or {}
        return int(saved.get("index", -1))

    def next_region(self) -> Any:
        """Move the camera to the next region of the queue (zoomed to fit) and return it;
        ``None`` past the last one."""
        return self._go_to_region(self.region_index + 1)

    def previous_region(self) -> Any:
        """Move the camera to the previous region of the queue; ``None`` before the first."""
        return self._go_to_region(self.region_index - 1)

    def _go_to_region(self, index: int) -> Any:
        queue = self.region_queue
        if not queue or not 0 <= index < len(queue):
            return None
        saved = dict(self.store.metadata.get(REGION_QUEUE_KEY) or {})
        saved["index"] = index
        self.store.metadata[REGION_QUEUE_KEY] = saved
        region = queue[index]
        if self.viewer is not None:
            self._look_at_box(region)
        else:
            self.plane = tuple(region.plane)
        self.refresh()
        return region

    def _look_at_box(self, region: Any) -> None:
        viewer = self.viewer
        assert viewer is not None
        p = self.placement
        plane = tuple(region.plane)[: p.n_plane] + (0,) * max(0, p.n_plane - len(region.plane))
        centre_px = np.asarray([*plane, *region.centre], dtype=float)
        world = p.px_to_world(centre_px)
        if p.n_plane:
            ndim = viewer.dims.ndim
            for k in range(p.n_plane):
                viewer.dims.set_point(ndim - 2 - p.n_plane + k, float(world[k]))
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        camera.center = (float(world[-2]), float(world[-1]))
        canvas = getattr(viewer, "canvas", None)
        size = getattr(canvas, "size", (600, 800))[-2:]
        # zoom to fit the box (10 % margin): world units per screen pixel on each axis
        fit_h = float(size[0]) / (region.height * p.unit[0] * 1.1)
        fit_w = float(size[1]) / (region.width * p.unit[1] * 1.1)
        camera.zoom = min(fit_h, fit_w)

    # -- undo / redo --------------------------------------------------------------------
    def undo(self) -> str | None:
        """Undo the last store operation; returns its label (``None``: nothing to undo)."""
        label = self.store.undo()
        if label is not None:
            self.refresh()
            self._saved()
        return label

    def redo(self) -> str | None:
        """Redo the last undone store operation; returns its label."""
        label = self.store.redo()
        if label is not None:
            self.refresh()
            self._saved()
        return label

    # -- making model outputs editable ----------------------------------------------------
    def make_editable(self, source: Layer | str | Path) -> int:
        """Copy a model output (a Run-model result layer, a run folder or a GeoJSON file)
        into the store as unreviewed objects, once per run; returns how many were added.

        A layer without run metadata (a hand-made Points/Shapes layer) is copied as human
        objects ("added"). The source layer is hidden afterwards: the editable layers
        show its objects.
        """
        if isinstance(source, (str, Path)):
            return self._import_path(Path(source))
        layer = source
        if layer is self.points_layer or layer is self.shapes_layer:
            raise AnnotationError(
                layer.name, "this is already an editable review layer", "pick a model output"
            )
        meta = layer.metadata or {}
        is_model = "output" in meta and meta.get("kind") in ("points", "boxes", "lines")
        if is_model:
            model, version = _model_of(layer)
            key = f"{meta.get('run') or layer.name}#{meta.get('output')}"
        else:
            model, version = HUMAN, None
            key = f"layer:{layer.name}:{len(layer.data)}"
        if self._imported(key):
            raise AnnotationError(
                self.store.path,
                f"'{layer.name}' was already made editable (run {key})",
                "its objects are in the review layers; undo the import to take them out",
            )
        anns = layer_to_annotations(
            layer,
            self.placement,
            source=model,
            model_version=version,
            default_class=self.current_class,
        )
        for ann in anns:
            if ann.class_name:
                self.add_class(ann.class_name)
        if not self.current_class and self.store.classes:
            self.set_current_class(self.store.classes[0])
        if anns:
            with self.store.group(f"import {model}"):  # objects and record: one commit
                ids = self.store.add(anns, label=f"import {model}")
                self._remember(key, int(ids[0]))
        with contextlib.suppress(Exception):
            layer.visible = False
        self.refresh()
        self._saved()
        return len(anns)

    def _imported(self, key: str) -> bool:
        """Whether the run ``key`` was imported and its import is not undone (its first
        object is still live)."""
        done = dict(self.store.metadata.get(IMPORTED_KEY, {}))
        if key not in done:
            return False
        try:
            self.store.get(int(done[key]))
        except AnnotationError:  # the import was undone (or its objects deleted)
            return False
        return True

    def _remember(self, key: str, first_id: int) -> None:
        """Record an imported run (key -> first id) in the store's metadata (saved at once)."""
        done = dict(self.store.metadata.get(IMPORTED_KEY, {}))
        done[key] = first_id
        self.store.metadata[IMPORTED_KEY] = done

    def _import_path(self, path: Path) -> int:
        from ..annotations.formats import import_annotations

        files: list[tuple[Path, str, str | None]] = []
        if path.is_dir():  # a run folder: every object output of it
            fake = _RunLayerStub(path)
            model, version = _model_of(fake)  # type: ignore[arg-type]
            files = [(f, model, version) for f in sorted(path.glob("*.geojson"))]
            if not files:
                raise AnnotationError(
                    path, "this run folder has no object outputs (*.geojson)", "run a detector"
                )
        else:
            files = [(path, HUMAN, None)]
        total = 0
        for file, model, version in files:
            key = f"file:{file.resolve()}"
            if self._imported(key):
                continue
            kwargs: dict[str, Any] = {"classes": self.store.classes, "allow_new_classes": True}
            if model != HUMAN:
                kwargs.update(source=model, model_version=version)
            anns = import_annotations(file, image=self.store.image, **kwargs)
            for ann in anns:
                if ann.class_name:
                    self.add_class(ann.class_name)
            if anns:
                with self.store.group(f"import {file.name}"):
                    ids = self.store.add(list(anns), label=f"import {file.name}")
                    self._remember(key, int(ids[0]))
            total += len(anns)
        self.refresh()
        self._saved()
        return total

    # -- export -------------------------------------------------------------------------
    def export(self, path: str | Path, *, format: str | None = None) -> Path:
        """Write every annotation (rejected ones included: the formats mark them) to
        ``path`` (GeoJSON for QuPath, CSV, COCO: by ``format`` or the extension)."""
        from ..annotations.formats import export_annotations

        annotations = list(self.store.iter_all())
        result = export_annotations(
            annotations,
            Path(path),
            image=self.store.image,
            format=format,
            classes=self.store.classes,
        )
        return Path(result) if isinstance(result, (str, Path)) else Path(path)

    def training_set(
        self, out_dir: str | Path, *, mpp: float | None, **options: Any
    ) -> Generator[Any, None, Any]:
        """The training-set export generator (progress records; returns its result)."""
        from ..annotations.training_set import export_training_set
        from .run import layer_pyramid

        self.flush_labels()
        pyramid = layer_pyramid(self.image_layer)
        return export_training_set(
            self.store,
            pyramid,
            Path(out_dir),
            mpp=mpp,
            labels=self.label_pyramid,
            **options,
        )

    # -- labels -------------------------------------------------------------------------
    def default_labels_path(self) -> Path:
        """The label pyramid beside the store: ``<image>.labels.zarr``."""
        from ..annotations.store_paths import STORE_SUFFIX

        name = self.store.path.name
        stem = name[: -len(STORE_SUFFIX)] if name.endswith(STORE_SUFFIX) else self.store.path.stem
        return self.store.path.with_name(stem + ".labels.zarr")

    def open_labels(self, path: str | Path, *, create: bool = True) -> Any:
        """Open (or create, level-0 shape of the image) the label pyramid at ``path`` and
        show it whole as a read-only multiscale Labels layer."""
        from ..annotations import labels as label_module

        path = Path(path)
        if path.exists():
            pyramid = label_module.LabelPyramid.open(path, image=self.store.image)
        elif create:
            classes = {i + 1: name for i, name in enumerate(self.store.classes)}
            pyramid = label_module.LabelPyramid.create(
                path, image=self.store.image, classes=classes or None
            )
        else:
            raise AnnotationError(path, "no label pyramid here", "create one first")
        self.label_pyramid = pyramid
        self._show_label_pyramid()
        return pyramid

    def _show_label_pyramid(self) -> None:
        from napari.layers import Labels

        levels = list(self.label_pyramid.levels())
        p = self.placement
        name = f"{self._name} · labels"
        if self.labels_layer is not None:
            self.labels_layer.data = levels if len(levels) > 1 else levels[0]
            self.labels_layer.refresh()
            return
        # label pixels sit on image pixels: the image's own scale and translate
        layer = Labels(
            levels if len(levels) > 1 else levels[0],
            name=name,
            scale=p.scale,
            translate=(*p.plane_translate, *p.origin),
            units=p.units,
            opacity=0.4,
            metadata={
                **self._meta(),
                "kind": "labels",
                "label_pyramid": str(self.label_pyramid.path),
            },
        )
        layer.editable = False
        self.labels_layer = layer
        if self.viewer is not None:
            self.viewer.layers.append(layer)

    def edit_labels_here(self, *, size: int = LABEL_WINDOW) -> tuple[int, int, int, int]:
        """Read a level-0 window (at most ``size``² px) of the label pyramid around the
        viewport centre into an editable Labels layer; returns its box
        ``(top, left, bottom, right)`` in level-0 px."""
        from napari.layers import Labels

        if self.label_pyramid is None:
            raise AnnotationError(
                self.store.path, "no label pyramid is open", "open or create labels first"
            )
        self.flush_labels()
        size = int(min(size, LABEL_WINDOW))
        box, plane = self.viewport()
        h, w = self.store.image.shape[-2:]
        if box is None or box[2] <= box[0]:
            cr, cc = h / 2, w / 2
        else:
            cr, cc = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        top = int(np.clip(round(cr - size / 2), 0, max(0, h - size)))
        left = int(np.clip(round(cc - size / 2), 0, max(0, w - size)))
        window = (top, left, min(h, top + size), min(w, left + size))
        data = np.asarray(self.label_pyramid.read_window(window, plane=plane))
        p = self.placement
        # one slice of a volume stays a (1, h, w) stack placed at its plane
        data = data.reshape((1,) * p.n_plane + data.shape)
        translate = (
            *(t + z * sc for t, z, sc in zip(p.plane_translate, plane, p.plane_scale, strict=True)),
            p.origin[0] + top * p.unit[0],
            p.origin[1] + left * p.unit[1],
        )
        name = f"{self._name} · labels (edit window)"
        if self.label_window_layer is not None:
            with contextlib.suppress(Exception):
                self.label_window_layer.events.paint.disconnect(self._on_paint)
            if self.viewer is not None and self.label_window_layer in self.viewer.layers:
                self.viewer.layers.remove(self.label_window_layer)
        layer = Labels(
            data.copy(),
            name=name,
            scale=p.scale,
            translate=translate,
            units=p.units,
            metadata={**self._meta(), "kind": "label window", "box": list(window)},
        )
        layer.events.paint.connect(self._on_paint)
        self.label_window_layer = layer
        self._label_box = window
        self._label_plane = plane
        if self.viewer is not None:
            self.viewer.layers.append(layer)
        return window

    def _on_paint(self, event: Any = None) -> None:
        self._label_dirty = True
        self._defer("labels", self.flush_labels)

    def flush_labels(self) -> bool:
        """Write the edit window back to the label pyramid if it was painted (the lower
        levels are rebuilt only where it changed); returns whether it wrote."""
        if not self._label_dirty or self.label_window_layer is None or self._label_box is None:
            return False
        data = np.asarray(self.label_window_layer.data)
        data = data.reshape(data.shape[-2:])
        self.label_pyramid.write_window(self._label_box, data, plane=self._label_plane)
        self._label_dirty = False
        if self.labels_layer is not None:
            self.labels_layer.refresh()
        self._saved_labels()
        return True

    def _saved_labels(self) -> None:
        self.last_saved = time.time()
        for callback in self.on_change:
            callback()

    def undo_labels(self) -> str | None:
        """Undo the last label write (the window is read again)."""
        self.flush_labels()
        label = self.label_pyramid.undo() if self.label_pyramid is not None else None
        self._reload_window()
        return label

    def redo_labels(self) -> str | None:
        label = self.label_pyramid.redo() if self.label_pyramid is not None else None
        self._reload_window()
        return label

    def _reload_window(self) -> None:
        if self.label_window_layer is None or self._label_box is None:
            return
        data = np.asarray(self.label_pyramid.read_window(self._label_box, plane=self._label_plane))
        shape = self.label_window_layer.data.shape
        self.label_window_layer.data = data.reshape(shape).copy()
        if self.labels_layer is not None:
            self.labels_layer.refresh()


def _reuse_plan(old: _Rows, new: _Rows) -> tuple[list[int], np.ndarray, int] | None:
    """How to turn a Shapes layer showing ``old`` into one showing ``new``: the old
    rows to remove, the order of ``new`` in the layer afterwards (the kept rows, in
    their order, then the ones to add) and how many are kept; ``None`` when nothing
    can be kept. A row is kept when its id, kind and vertices are unchanged."""
    position = {int(id_): j for j, id_ in enumerate(new.ids().tolist())}
    kept_old, kept_new = [], []
    for i, id_ in enumerate(old.ids().tolist()):
        j = position.get(int(id_))
        if j is None:
            continue
        kind_old, v_old = old.vertices(i)
        kind_new, v_new = new.vertices(j)
        if kind_old == kind_new and v_old.shape == v_new.shape and np.array_equal(v_old, v_new):
            kept_old.append(i)
            kept_new.append(j)
    if not kept_new:
        return None
    keep = set(kept_old)
    remove = [i for i in range(len(old)) if i not in keep]
    taken = np.zeros(len(new), dtype=bool)
    taken[kept_new] = True
    order = np.concatenate([np.asarray(kept_new, dtype=np.int64), np.flatnonzero(~taken)])
    return remove, order, len(kept_new)


def _reject_label(model: Sequence[int], human: Sequence[int]) -> str:
    """Undo label of a Reject / Delete: model objects are rejected, human ones deleted."""
    parts = [f"reject {len(model)}"] if model else []
    parts += [f"delete {len(human)}"] if human or not model else []
    return ", ".join(parts)


class _RunLayerStub:
    """Enough of a layer for `_model_of` on a run folder path."""

    def __init__(self, path: Path) -> None:
        self.metadata = {"run": str(path)}
        self.name = path.name


def _axis_aligned(coords: np.ndarray) -> bool:
    if len(coords) != 4:
        return False
    rows = np.unique(np.round(coords[:, 0], 6))
    cols = np.unique(np.round(coords[:, 1], 6))
    return len(rows) <= 2 and len(cols) <= 2
