"""npe2 writers: Points and Shapes layers to QuPath GeoJSON and CSV points (no Qt).

napari calls a single-layer writer as ``writer(path, data, meta)`` with the layer's data
and its state (``scale``, ``translate``, ``features``, ``metadata``, ``shape_type``,
``name``...) and expects the list of files written (empty: "not mine").

Coordinates written are level-0 pixels of the source image: the layer's data are put in
the world with its ``scale`` / ``translate`` and brought back to the image's pixels with
the image's pixel size, taken from the layer's metadata (``metadata["image"]``, an
`ImageRef` dict, which the review layers and model result layers of this plugin carry).
A layer with no image reference is taken to hold pixel coordinates already; its file
records ``mpp: null`` and a warning says so.

A review layer (``metadata["annotation_store"]``) shows only the objects of the current
view (level of detail): its writer exports **every** object of the store of the layer's
kinds (points, or the shapes), rejected ones included and marked, from the store itself.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..annotations.model import HUMAN, Annotation, ImageRef
from ..errors import AnnotationError
from .annotations import Placement, layer_to_annotations

__all__ = ["write_points_csv", "write_points_geojson", "write_shapes_geojson"]

log = logging.getLogger(__name__)


def write_points_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Points layer as QuPath GeoJSON (``.geojson``)."""
    return _write(path, data, meta, layer_type="points", fmt="geojson", suffix=".geojson")


def write_shapes_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Shapes layer (lines, paths, rectangles, polygons) as QuPath GeoJSON."""
    return _write(path, data, meta, layer_type="shapes", fmt="geojson", suffix=".geojson")


def write_points_csv(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Points layer as CSV points (``x, y, class, ...`` + ``<file>.json``)."""
    return _write(path, data, meta, layer_type="points", fmt="csv", suffix=".csv")


def _write(
    path: str, data: Any, meta: dict[str, Any], *, layer_type: str, fmt: str, suffix: str
) -> list[str]:
    from ..annotations.formats import export_annotations

    out = Path(path)
    if not out.suffix:
        out = out.with_suffix(suffix)
    metadata = dict(meta.get("metadata") or {})
    store_path = metadata.get("annotation_store")
    if store_path and Path(str(store_path)).is_file():
        annotations, image = _from_store(Path(str(store_path)), layer_type)
    else:
        image, placement = _image_of(data, meta, layer_type)
        layer = _as_layer(data, meta, layer_type)
        annotations = _with_features(layer, placement)
        if image.mpp is None and image.spacing_mm is None:
            _warn(
                f"'{meta.get('name', out.stem)}' has no image reference: its coordinates are "
                f"written as they are (pixels) and {out.name} records mpp: null"
            )
    written = export_annotations(annotations, out, image=image, format=fmt)
    files = [str(written if isinstance(written, (str, Path)) else out)]
    sidecar = Path(files[0] + ".json")
    if fmt == "csv" and sidecar.is_file():
        files.append(str(sidecar))
    return files


def _from_store(path: Path, layer_type: str) -> tuple[list[Annotation], ImageRef]:
    from ..annotations.store import AnnotationStore

    kinds = ["point"] if layer_type == "points" else ["line", "polyline", "box", "polygon"]
    with AnnotationStore.open(path) as store:
        return list(store.iter_all(kinds=kinds)), store.image


def _image_of(data: Any, meta: dict[str, Any], layer_type: str) -> tuple[ImageRef, Placement]:
    """The image the layer's objects belong to, and where its pixels sit in the world."""
    scale = tuple(float(s) for s in meta.get("scale", ()))
    translate = tuple(float(t) for t in meta.get("translate", ()))
    units = tuple(str(u) for u in meta.get("units", ()) or ())
    ndim = len(scale) or _ndim(data, layer_type)
    scale = scale or (1.0,) * ndim
    translate = translate or (0.0,) * ndim
    units = units or ("pixel",) * ndim
    raw = (meta.get("metadata") or {}).get("image")
    if isinstance(raw, dict):
        try:
            image = ImageRef.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise AnnotationError(
                str(meta.get("name", "layer")),
                f"its metadata['image'] is not an image reference ({exc})",
                "remove it, or make the layer again from the Review & correct widget",
            ) from exc
        if image.spacing_mm is not None:
            unit = (float(image.spacing_mm[-2]), float(image.spacing_mm[-1]))
        elif image.mpp is not None:
            unit = (float(image.mpp[0]), float(image.mpp[1]))
        else:
            unit = (scale[-2], scale[-1])
        placement = Placement(scale[:-2], translate[:-2], unit, (0.0, 0.0), units)
        return image, placement
    # no image: the data are pixels (world -> data with the layer's own placement)
    unit = (scale[-2], scale[-1])
    origin = (translate[-2] + 0.5 * unit[0], translate[-1] + 0.5 * unit[1])
    placement = Placement(scale[:-2], translate[:-2], unit, origin, units)
    extent = _extent(data, layer_type, ndim)
    image = ImageRef(
        path=str(meta.get("name", "")),
        content_hash="",
        shape=extent,
        axes="YX" if ndim == 2 else ("ZYX" if ndim == 3 else "TZYX"[-ndim:]),
    )
    return image, placement


def _ndim(data: Any, layer_type: str) -> int:
    if layer_type == "points":
        return int(np.asarray(data).shape[-1]) if np.size(data) else 2
    return int(np.asarray(data[0]).shape[-1]) if len(data) else 2


def _extent(data: Any, layer_type: str, ndim: int) -> tuple[int, ...]:
    """A level-0 shape that holds every vertex (the image's own is unknown)."""
    if layer_type == "points":
        arr = np.asarray(data, dtype=float).reshape(-1, ndim)
    else:
        arr = np.concatenate(
            [np.asarray(v, dtype=float).reshape(-1, ndim) for v in data] or [np.zeros((0, ndim))]
        )
    if not len(arr):
        return (1,) * ndim
    return tuple(math.ceil(max(v, 0.0)) + 1 for v in arr.max(axis=0))


def _as_layer(data: Any, meta: dict[str, Any], layer_type: str) -> Any:
    """Enough of a napari layer for `layer_to_annotations`."""
    ndim = _ndim(data, layer_type)
    features = meta.get("features")
    if features is None:
        features = meta.get("properties") or {}
    return SimpleNamespace(
        _type_string=layer_type,
        data=data,
        name=str(meta.get("name", "layer")),
        scale=np.asarray(meta.get("scale", (1.0,) * ndim), dtype=float),
        translate=np.asarray(meta.get("translate", (0.0,) * ndim), dtype=float),
        shape_type=list(meta.get("shape_type", ["polygon"] * len(data)))
        if layer_type == "shapes"
        else None,
        features=features,
        metadata=meta.get("metadata") or {},
    )


def _with_features(layer: Any, placement: Placement) -> list[Annotation]:
    """Objects of the layer; a model result layer keeps its model as the source, and
    per-object ``source`` / ``review`` features are kept."""
    from .annotations import _model_of

    meta = layer.metadata
    is_model = "output" in meta and meta.get("kind") in ("points", "boxes", "lines")
    source, version = _model_of(layer) if is_model else (HUMAN, None)
    anns = layer_to_annotations(layer, placement, source=source, model_version=version)
    n = len(anns)
    features = layer.features
    for column, attribute in (("source", "source"), ("review", "review")):
        if column in features and len(features[column]) == n:
            for ann, value in zip(anns, list(features[column]), strict=True):
                if isinstance(value, str) and value:
                    setattr(ann, attribute, value)
    for ann in anns:
        if ann.source == HUMAN:
            ann.confidence = None
    return anns


def _warn(message: str) -> None:
    log.warning(message)
    try:
        from napari.utils.notifications import show_warning

        show_warning(message)
    except Exception:  # no napari notification manager (scripts): the log has it
        pass
