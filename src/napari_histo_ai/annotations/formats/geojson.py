"""QuPath-compatible GeoJSON, both directions, and the engine's run-folder GeoJSON.

Coordinates are level-0 pixels in GeoJSON's (x, y) = (column, row) order, continuous
(pixel ``i`` spans ``[i, i + 1)``), which is what QuPath reads and writes.

Export (`export_geojson`)
-------------------------
A ``FeatureCollection`` of QuPath features::

    {"type": "Feature", "id": "<uuid>",
     "geometry": {"type": "Point" | "LineString" | "Polygon", "coordinates": ...},
     "properties": {"objectType": "annotation" | "detection",
                    "classification": {"name": "mitosis", "color": [r, g, b]},
                    "isLocked": false,
                    "measurements": {"area_um2": ..., ...},
                    "histo_ai": {"kind", "source", "model_version", "annotator",
                                 "created", "modified", "confidence", "review",
                                 "plane", "id", "computed"}}}

* Coordinates are rounded to 1e-6 px (``decimals=6``).
* point → ``Point``; line / polyline → ``LineString``; box → a closed axis-aligned
  rectangle ``Polygon`` (``histo_ai.kind == "box"`` brings it back as a box); polygon →
  ``Polygon`` (ring closed by repeating the first vertex).
* ``objectType`` is ``"annotation"`` for human objects and for model objects a person
  accepted or corrected, and ``"detection"`` for model output nobody confirmed
  (``unreviewed``, ``rejected``): QuPath then lists confirmed objects as annotations
  and the rest as detections; the review state itself is in ``histo_ai``. Rejected
  objects are written (``include_rejected=True``, with ``histo_ai.review ==
  "rejected"``) so hard negatives survive a round trip; pass
  ``include_rejected=False`` to leave them out.
* ``classification.color`` is a stable colour per class (the same in every file).
* ``measurements`` holds the object's own measurements plus ``length_um`` (lines,
  polylines) or ``area_um2`` (boxes, polygons) when the image's µm/px is known
  (``length_px`` / ``area_px`` otherwise); ``histo_ai.computed`` lists those added keys so
  an import drops them again. Non-finite measurement values are written as ``null``.
* The collection's ``properties.histo_ai`` holds the file provenance (image path and
  content hash, mpp, models and annotators, time, package version); ``properties.units``
  and ``properties.mpp`` as in the engine's files.

Import (`import_geojson`)
-------------------------
Accepts a ``FeatureCollection``, a bare list of Features or a single Feature, as QuPath
0.2–0.5 write them: ``classification`` as ``{"name", "color"}``, the older
``{"name", "colorRGB"}``, ``{"names": [...]}`` (derived classes, joined with ``": "``)
or a plain string; ``measurements`` as a dict or the old list of ``{name, value}``
(non-finite and ``null`` values are dropped); ``objectType`` or the old feature ``id``
``"PathAnnotationObject"`` / ``"PathDetectionObject"``.

* ``Point`` → point; ``MultiPoint`` → one point per position; ``LineString`` of 2 → line,
  more → polyline; ``MultiLineString`` → one per part; ``Polygon`` → polygon (a box when
  our ``histo_ai.kind`` says so and the ring is an axis-aligned rectangle);
  ``MultiPolygon`` → one polygon per part, each with ``measurements["multipolygon_parts"]``
  = the number of parts; ``GeometryCollection`` → each member.
* **Holes are dropped**: the outer ring is kept and ``measurements["holes_dropped"]``
  records how many interior rings were removed (our model has no holes).
* Provenance: our ``histo_ai`` block when present; otherwise QuPath annotations are
  human objects (``source="human"``, review ``"added"``) and QuPath detections are
  ``source="qupath"``, review ``"unreviewed"``, unless ``source=`` / ``model_version=``
  are given. Feature ids are not kept (the store assigns ids).
* The engine's run-folder GeoJSON (`napari_histo_ai.inference.geojson`: properties
  ``class``, ``score``, ``plane`` and extra numbers) is recognised per feature and
  imported as model objects: ``source`` / ``model_version`` from the arguments, else
  from the run's ``summary.json`` beside the file, else ``"model"``; ``confidence`` =
  ``score``; review ``"unreviewed"``; rectangles are boxes; extra numeric properties
  become measurements.
* Planes: ``histo_ai.plane`` or the engine's ``plane`` list, or a QuPath-style
  ``plane`` object ``{"z": .., "t": ..}`` (mapped onto the image's plane axes); missing:
  plane 0 of every plane axis.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ...atomic import atomic_open, json_default
from ...errors import AnnotationError
from ..model import HUMAN, Annotation, ImageRef
from ._common import (
    HISTO_AI,
    Checker,
    apply_properties,
    check_exports,
    class_colour,
    computed_measurements_all,
    default_review,
    file_provenance,
    load_json,
    materialise,
    number,
    object_properties,
    plane_value,
    without_gc,
)

__all__ = ["export_geojson", "import_geojson"]

#: the namespace of the feature UUIDs derived from (image hash, object id)
_UUID_NAMESPACE = uuid.UUID("5b7c8f0e-6d1a-4f0b-9a57-2f1b7e6c4d21")
_OLD_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "detection",
    "PathTileObject": "detection",
    "PathRootObject": "annotation",
}


# --------------------------------------------------------------------------- export


@without_gc
def export_geojson(
    annotations: Iterable[Annotation],
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    provenance: dict[str, Any] | None = None,
    include_rejected: bool = True,
    indent: int | None = None,
    decimals: int | None = 6,
) -> Path:
    """Write annotations as a QuPath-readable GeoJSON FeatureCollection (atomically).

    Parameters
    ----------
    annotations : iterable of Annotation
        Level-0 pixel geometry, ``(row, col)``.
    path : str or Path
        The ``.geojson`` file; an existing file is replaced only once the new one is
        complete.
    image : ImageRef
        The image the objects belong to (identity and µm/px are recorded; objects
        outside it are refused).
    classes : sequence of str
        The store's class vocabulary, recorded in the file (order kept).
    provenance : dict, optional
        Extra file-level keys (e.g. the run folder), recorded under
        ``properties.histo_ai.extra``.
    include_rejected : bool
        Write rejected model objects too (as detections with review ``"rejected"``).
    indent : int, optional
        Pretty-print with this indent (larger file); default compact.
    decimals : int or None
        Coordinates are rounded to this many decimals of a pixel (6: within 1e-6 px,
        a quarter fewer bytes than every digit); ``None`` writes every digit.

    Returns
    -------
    Path

    Raises
    ------
    AnnotationError
        An object has invalid geometry or lies outside the image (nothing is written).
    """
    path = Path(path)
    anns = materialise(annotations)
    colours: dict[str, list[int]] = {}
    indices = [i for i, a in enumerate(anns) if include_rejected or a.review != "rejected"]
    n_rejected = len(anns) - len(indices)
    chosen = [anns[i] for i in indices]
    check_exports(chosen, indices, path=path, image=image)
    computed = computed_measurements_all(chosen, image)
    ids = _FeatureIds(image.content_hash)
    rings = _xy_coordinates(chosen, decimals)
    features = [
        _feature(ann, xy, extra, colours, ids)
        for ann, xy, extra in zip(chosen, rings, computed, strict=True)
    ]
    record = file_provenance(
        anns, image=image, fmt="geojson", provenance=provenance, skipped={"rejected": n_rejected}
    )
    record["classes"] = list(
        dict.fromkeys([*classes, *(a.class_name for a in anns if a.class_name)])
    )
    collection = {
        "type": "FeatureCollection",
        "properties": {
            "units": "level-0 pixels",
            "mpp": list(image.pixel_um) if image.pixel_um else None,
            HISTO_AI: record,
        },
        "features": features,
    }
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    data = orjson.dumps(collection, default=json_default, option=option)
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return path


def _xy_coordinates(anns: Sequence[Annotation], decimals: int | None) -> list[np.ndarray]:
    """Per object its GeoJSON vertices (x, y) as float64 arrays, rounded in one pass:
    a point (2,), otherwise (N, 2), polygon and box rings closed (first vertex repeated).
    Each is a C-contiguous slice of one array, which orjson writes without a copy."""
    if not anns:
        return []
    # every object's vertices (box: its four corners) in one array, then one gather that
    # repeats each ring's first vertex at its end and swaps (row, col) to (x, y)
    parts = [a.ring() if a.kind == "box" else a.coords for a in anns]
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    closed = np.fromiter((a.kind in ("box", "polygon") for a in anns), dtype=bool, count=len(anns))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out_lengths = lengths + closed
    out_starts = np.concatenate([[0], np.cumsum(out_lengths)[:-1]])
    # position inside its object of every output vertex; the closing one points at 0
    within = np.arange(int(out_lengths.sum())) - np.repeat(out_starts, out_lengths)
    within[within == np.repeat(lengths, out_lengths)] = 0
    every = np.concatenate(parts)[np.repeat(starts, out_lengths) + within][:, ::-1]
    if decimals is not None:
        every = np.round(every, decimals)
    every = np.ascontiguousarray(every) + 0.0  # no -0.0 in the file
    ends = (out_starts + out_lengths).tolist()
    return [
        every[a] if ann.kind == "point" else every[a:b]
        for ann, a, b in zip(anns, out_starts.tolist(), ends, strict=True)
    ]


class _FeatureIds:
    """Stable feature UUIDs: one UUID-5 of the image's content hash, its last 48 bits
    (the node field) replaced by the object's store id; random for unstored objects."""

    _NODE = (1 << 48) - 1

    def __init__(self, content_hash: str) -> None:
        self._base = uuid.uuid5(_UUID_NAMESPACE, content_hash).int & ~self._NODE
        # str(UUID) is 8-4-4-4-12 hex digits; the node field is the last 12
        self._prefix = str(uuid.UUID(int=self._base))[:-12]

    def __call__(self, ann_id: int | None) -> str:
        if ann_id is None:
            return str(uuid.uuid4())
        return f"{self._prefix}{int(ann_id) & self._NODE:012x}"


def _feature(
    ann: Annotation,
    xy: np.ndarray,
    extra: dict[str, float],
    colours: dict[str, list[int]],
    ids: _FeatureIds,
) -> dict[str, Any]:
    geometry: dict[str, Any]
    if ann.kind == "point":
        geometry = {"type": "Point", "coordinates": xy}
    elif ann.kind in ("line", "polyline"):
        geometry = {"type": "LineString", "coordinates": xy}
    else:
        geometry = {"type": "Polygon", "coordinates": [xy]}
    own = ann.measurements
    computed = [k for k in extra if k not in own]
    measurements: dict[str, float | None]
    if own:
        measurements = {k: (float(v) if _finite(v) else None) for k, v in own.items()}
        measurements.update((k, extra[k]) for k in computed)
    else:
        measurements = dict(extra)
    block = object_properties(ann)
    block["computed"] = computed
    confirmed = ann.source == HUMAN or ann.review in ("accepted", "corrected", "added")
    props: dict[str, Any] = {"objectType": "annotation" if confirmed else "detection"}
    if ann.class_name:
        colour = colours.get(ann.class_name)
        if colour is None:
            colour = colours[ann.class_name] = list(class_colour(ann.class_name))
        props["classification"] = {"name": ann.class_name, "color": colour}
    props["isLocked"] = False
    props["measurements"] = measurements
    props[HISTO_AI] = block
    return {"type": "Feature", "id": ids(ann.id), "geometry": geometry, "properties": props}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- import


@without_gc
def import_geojson(
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    allow_new_classes: bool = False,
    source: str | None = None,
    model_version: str | None = None,
    annotator: str | None = None,
) -> list[Annotation]:
    """Read QuPath GeoJSON (or the engine's run-folder GeoJSON) as annotations.

    Pure: nothing is stored. See the module docstring for the mapping.

    Parameters
    ----------
    path : str or Path
        A ``.geojson`` / ``.json`` file: FeatureCollection, list of Features or Feature.
    image : ImageRef
        The image the objects must fit (level-0 shape, planes).
    classes : sequence of str
        The allowed classes; with ``allow_new_classes=False`` (default) any other class
        is refused. Empty: every class is accepted.
    allow_new_classes : bool
        Accept classes outside ``classes``.
    source, model_version : str, optional
        Provenance of objects the file does not attribute (QuPath objects, engine
        output): e.g. the model's registry name and version for an engine file.
    annotator : str, optional
        Annotator of human objects that do not name one.

    Returns
    -------
    list of Annotation
        In file order (multi-part geometries expanded in place); ``id`` is ``None``.

    Raises
    ------
    AnnotationError
        Bad JSON, wrong types, missing keys, an unknown geometry type, NaN coordinates,
        an object outside the image, an invalid plane or an unknown class. The message
        names the file, the feature index and the value.
    """
    path = Path(path)
    checker = Checker(path, image=image, classes=classes, allow_new_classes=allow_new_classes)
    data = load_json(path)
    features: Any
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(
                path,
                f"'features' of the FeatureCollection is a {type(features).__name__}",
                "expected a list of GeoJSON Features",
            )
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        what = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise AnnotationError(
            path,
            f"top level is {what!r}, not a FeatureCollection, a list of Features or a Feature",
            "export the objects from QuPath (File > Export objects as GeoJSON)",
        )
    engine_source = _EngineSource(path, source, model_version)
    for index, feature in enumerate(features):
        where = f"feature {index}"
        _read_feature(feature, where, checker, engine_source, source, model_version, annotator)
    return checker.finish()


class _EngineSource:
    """The model of an engine run: the caller's, else the run's ``summary.json``."""

    def __init__(self, path: Path, source: str | None, model_version: str | None) -> None:
        self.path = path
        self._value: tuple[str, str | None] | None = (
            (source, model_version) if source is not None else None
        )

    def get(self) -> tuple[str, str | None]:
        if self._value is None:
            name, version = "model", None
            summary = self.path.parent / "summary.json"
            try:
                record = json.loads(summary.read_text(encoding="utf-8"))
                if isinstance(record, dict) and isinstance(record.get("model"), str):
                    name = record["model"]
                    v = record.get("model_version")
                    version = None if v is None else str(v)
            except (OSError, ValueError):
                pass  # no run summary beside the file: the generic "model"
            self._value = (name, version)
        return self._value


def _read_feature(
    feature: Any,
    where: str,
    checker: Checker,
    engine: _EngineSource,
    source: str | None,
    model_version: str | None,
    annotator: str | None,
) -> list[Annotation]:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        what = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
        raise checker.fail(
            where,
            f"is {what!r}, not a GeoJSON Feature",
            "expected {'type': 'Feature', 'geometry': ..., 'properties': ...}",
        )
    props = feature.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise checker.fail(where, f"'properties' is a {type(props).__name__}", "expected an object")
    geometry = feature.get("geometry")
    if geometry is None:
        raise checker.fail(where, "has no geometry", "every feature needs a geometry")
    block = props.get(HISTO_AI)
    is_engine = (
        block is None
        and not {"objectType", "classification"} & props.keys()
        and ("score" in props or "class" in props)
    )
    n_plane = checker.image.n_plane
    base: dict[str, Any] = {"plane": (0,) * n_plane}
    measurements: dict[str, float] = {}
    if is_engine:
        src, version = engine.get()
        base.update(source=src, model_version=version, review="unreviewed")
        if "class" in props:
            value = props["class"]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise checker.fail(
                    where,
                    f"class {value!r} is a {type(value).__name__}",
                    "expected the class name (text) or index",
                )
            base["class_name"] = str(value)
        if props.get("score") is not None:
            base["confidence"] = number(props["score"], "score", where, checker)
        if props.get("plane") is not None:
            base["plane"] = plane_value(props["plane"], where, checker)
        for key, value in props.items():
            if key not in ("class", "score", "plane") and _finite(value):
                measurements[key] = float(value)
    else:
        object_type = props.get("objectType")
        if object_type is None:
            object_type = _OLD_IDS.get(str(feature.get("id")), "annotation")
        if not isinstance(object_type, str):
            raise checker.fail(
                where,
                f"objectType {object_type!r} is not text",
                "expected 'annotation' or 'detection'",
            )
        if source is not None:
            src = source
        else:
            src = HUMAN if object_type in ("annotation", "cell_annotation") else "qupath"
        base.update(
            source=src,
            model_version=model_version if source is not None else None,
            review=default_review(src),
            class_name=_classification(props.get("classification"), where, checker),
            annotator=annotator if src == HUMAN else None,
        )
        measurements = _measurements(props.get("measurements"), where, checker)
        plane = props.get("plane")
        if isinstance(plane, dict) and n_plane:
            axes = checker.image.axes[:n_plane].lower()
            base["plane"] = tuple(
                int(number(plane.get(a, 0), f"plane.{a}", where, checker)) for a in axes
            )
        if block is not None:
            base = apply_properties(base, block, where, checker)
            computed = block.get("computed", [])
            if isinstance(computed, list):
                for key in computed:
                    measurements.pop(str(key), None)
    wanted_kind = base.pop("kind", None)
    parts = _geometries(geometry, where, checker)
    out = []
    for n, (kind, coords, holes, n_parts) in enumerate(parts):
        part_where = where if len(parts) == 1 else f"{where} part {n}"
        m = dict(measurements)
        if holes:
            m["holes_dropped"] = float(holes)
        if n_parts > 1:
            m["multipolygon_parts"] = float(n_parts)
        kind, coords = _refine_kind(kind, coords, wanted_kind, is_engine)
        ann = Annotation(kind=kind, coords=coords, measurements=m, **base)
        out.append(checker.check(ann, part_where))
    return out


def _classification(value: Any, where: str, checker: Checker) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        name = value.get("name")
        if isinstance(name, str):
            return name
        names = value.get("names")
        if isinstance(names, list) and all(isinstance(v, str) for v in names):
            return ": ".join(names)
    raise checker.fail(
        where,
        f"classification {value!r} has no name",
        "expected {'name': 'Tumor', 'color': [r, g, b]} or a class name",
    )


def _measurements(value: Any, where: str, checker: Checker) -> dict[str, float]:
    if value is None:
        return {}
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or "name" not in entry:
                raise checker.fail(
                    where,
                    f"measurement {i} is {entry!r}",
                    "expected {'name': ..., 'value': ...} entries",
                )
            items.append((entry["name"], entry.get("value")))
    else:
        raise checker.fail(
            where,
            f"measurements is a {type(value).__name__}",
            "expected a dict of name → number (or QuPath's list of {name, value})",
        )
    out: dict[str, float] = {}
    for name, v in items:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue  # QuPath writes NaN for "not measured"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise checker.fail(
                where,
                f"measurement {name!r} = {v!r} is not a number",
                "measurements must be numbers",
            )
        out[str(name)] = float(v)
    return out


def _positions(value: Any, where: str, checker: Checker, *, depth: int) -> np.ndarray:
    """(N, 2) (row, col) from a list of GeoJSON positions (x, y[, z])."""
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = np.asarray([], dtype=object)
    if arr.dtype.kind not in "iuf" or arr.ndim != depth or arr.shape[-1] < 2 or arr.size == 0:
        text = json.dumps(value)[:120] if _jsonable(value) else repr(value)[:120]
        raise checker.fail(
            where,
            f"coordinates {text} are not {'a position' if depth == 1 else 'positions'} [x, y]",
            "expected numbers in level-0 pixels, e.g. [120.5, 88.0]",
        )
    arr = arr.astype(np.float64).reshape(-1, arr.shape[-1])
    if not np.all(np.isfinite(arr[:, :2])):
        raise checker.fail(
            where,
            "coordinates contain NaN or infinity",
            "every coordinate must be a finite number; fix the file",
        )
    return arr[:, [1, 0]]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _geometries(
    geometry: Any, where: str, checker: Checker
) -> list[tuple[str, np.ndarray, int, int]]:
    """``(kind, (N, 2) row/col coords, holes dropped, parts)`` for each part."""
    if not isinstance(geometry, dict):
        raise checker.fail(
            where,
            f"geometry is a {type(geometry).__name__}",
            "expected {'type': ..., 'coordinates': ...}",
        )
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            raise checker.fail(
                where,
                "GeometryCollection without a 'geometries' list",
                "expected a list of geometries",
            )
        out = []
        for member in members:
            out.extend(_geometries(member, where, checker))
        return out
    if "coordinates" not in geometry:
        raise checker.fail(
            where, f"{kind} geometry has no 'coordinates'", "every geometry needs its coordinates"
        )
    coords = geometry["coordinates"]
    if kind == "Point":
        return [("point", _positions(coords, where, checker, depth=1), 0, 1)]
    if kind == "MultiPoint":
        pts = _positions(coords, where, checker, depth=2)
        return [("point", p[None], 0, 1) for p in pts]
    if kind == "LineString":
        line = _positions(coords, where, checker, depth=2)
        return [("line" if len(line) == 2 else "polyline", line, 0, 1)]
    if kind == "MultiLineString":
        if not isinstance(coords, list):
            raise checker.fail(
                where, "MultiLineString coordinates are not a list", "expected a list of lines"
            )
        lines = [_positions(c, where, checker, depth=2) for c in coords]
        return [("line" if len(v) == 2 else "polyline", v, 0, 1) for v in lines]
    if kind == "Polygon":
        ring, holes = _polygon(coords, where, checker)
        return [("polygon", ring, holes, 1)]
    if kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            raise checker.fail(
                where,
                "MultiPolygon coordinates are not a list of polygons",
                "expected [[[x, y], ...]], ...]",
            )
        polygons = [_polygon(c, where, checker) for c in coords]
        return [("polygon", ring, holes, len(polygons)) for ring, holes in polygons]
    raise checker.fail(
        where,
        f"unknown geometry type {kind!r}",
        "expected Point, MultiPoint, LineString, MultiLineString, Polygon, MultiPolygon "
        "or GeometryCollection",
    )


def _polygon(coords: Any, where: str, checker: Checker) -> tuple[np.ndarray, int]:
    if not isinstance(coords, list) or not coords:
        raise checker.fail(
            where,
            "Polygon coordinates are not a list of rings",
            "expected [[[x, y], ...]] (outer ring first)",
        )
    ring = _positions(coords[0], where, checker, depth=2)
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring, len(coords) - 1


def _refine_kind(
    kind: str, coords: np.ndarray, wanted: str | None, is_engine: bool
) -> tuple[str, np.ndarray]:
    """Our own kinds back from GeoJSON geometry: boxes from rectangles, 2-vertex
    polylines, lines edited into paths."""
    if kind == "polygon" and (wanted == "box" or is_engine) and _is_rectangle(coords):
        return "box", np.stack([coords.min(axis=0), coords.max(axis=0)])
    if kind in ("line", "polyline") and wanted == "polyline":
        return "polyline", coords
    return kind, coords


def _is_rectangle(ring: np.ndarray) -> bool:
    if len(ring) != 4:
        return False
    rows, cols = np.unique(ring[:, 0]), np.unique(ring[:, 1])
    if len(rows) != 2 or len(cols) != 2:
        return False
    corners = {(float(r), float(c)) for r, c in ring}
    if len(corners) != 4:
        return False
    following = np.roll(ring, -1, axis=0)  # every edge runs along a row or a column
    return bool(np.all((ring[:, 0] == following[:, 0]) | (ring[:, 1] == following[:, 1])))
