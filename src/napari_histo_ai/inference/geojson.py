"""Objects found by a run as GeoJSON (level-0 pixel coordinates, x then y)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .objects import Objects
from .store import write_json_atomic


def objects_to_geojson(
    objects: Objects, *, pixel_size: tuple[float, float] | None = None
) -> dict[str, Any]:
    """A FeatureCollection: points as ``Point``, boxes as closed ``Polygon`` rectangles,
    lines as two-point ``LineString``.

    Coordinates are level-0 pixels (continuous: pixel i spans [i, i + 1)), in GeoJSON's
    (x, y) order, as QuPath and most slide tools expect. Properties carry ``class``,
    ``score``, the objects' extra ``features`` and, for stacks, ``plane``.
    ``pixel_size`` (µm/px row, column) is recorded in the collection's properties when
    known.
    """
    n_plane = objects.coords.shape[1] - (2 if objects.kind == "points" else 4)
    features = []
    for n, (coords, score, label) in enumerate(
        zip(objects.coords, objects.scores, objects.labels, strict=True)
    ):
        plane = [int(v) for v in coords[:n_plane]]
        c = coords[n_plane:]
        if objects.kind == "points":
            geometry: dict[str, Any] = {"type": "Point", "coordinates": [float(c[1]), float(c[0])]}
        elif objects.kind == "lines":
            line = [[float(c[1]), float(c[0])], [float(c[3]), float(c[2])]]
            geometry = {"type": "LineString", "coordinates": line}
        else:
            top, left, bottom, right = (float(v) for v in c)
            ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
            geometry = {"type": "Polygon", "coordinates": [ring]}
        props: dict[str, Any] = {
            "class": objects.classes[int(label)] if objects.classes else int(label),
            "score": round(float(score), 5),
        }
        for key, values in objects.features.items():
            value = values[n].item()
            props[key] = None if isinstance(value, float) and value != value else value
        if plane:
            props["plane"] = plane
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    collection["properties"] = {
        "units": "level-0 pixels",
        "mpp": list(pixel_size) if pixel_size else None,
    }
    return collection


def write_objects(
    path: Path, objects: Objects, *, pixel_size: tuple[float, float] | None = None
) -> Path:
    """Write `objects_to_geojson` to ``path`` atomically."""
    write_json_atomic(Path(path), objects_to_geojson(objects, pixel_size=pixel_size))
    return Path(path)


def read_objects(path: Path, *, kind: str, classes: tuple[str, ...], n_plane: int = 0) -> Objects:
    """Read a GeoJSON written by `write_objects` back into `Objects` (level-0 pixels).

    Raises
    ------
    ValueError
        The file is not a FeatureCollection of the expected geometry.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection")
    rows, scores, labels = [], [], []
    extra: dict[str, list[float]] = {}
    index = {c: i for i, c in enumerate(classes)}
    for feature in data.get("features", []):
        geometry = feature.get("geometry") or {}
        props = feature.get("properties") or {}
        plane = [float(v) for v in props.get("plane", [])][:n_plane]
        plane += [0.0] * (n_plane - len(plane))
        if kind == "points":
            x, y = geometry["coordinates"][:2]
            rows.append([*plane, float(y), float(x)])
        elif kind == "lines":
            (x0, y0), (x1, y1) = (p[:2] for p in geometry["coordinates"][:2])
            rows.append([*plane, float(y0), float(x0), float(y1), float(x1)])
        else:
            ring = np.asarray(geometry["coordinates"][0], dtype=float)
            rows.append(
                [*plane, ring[:, 1].min(), ring[:, 0].min(), ring[:, 1].max(), ring[:, 0].max()]
            )
        scores.append(float(props.get("score", 1.0)))
        labels.append(index.get(str(props.get("class")), 0))
        for key, value in props.items():
            if key not in ("class", "score", "plane") and (
                value is None or isinstance(value, int | float)
            ):
                extra.setdefault(key, [math.nan] * (len(rows) - 1)).append(
                    math.nan if value is None else float(value)
                )
        for values in extra.values():
            values += [math.nan] * (len(rows) - len(values))
    width = n_plane + (2 if kind == "points" else 4)
    return Objects(
        kind,
        np.asarray(rows, dtype=float).reshape(-1, width),
        np.asarray(scores, dtype=float),
        np.asarray(labels, dtype=np.int64),
        classes,
        features={k: np.asarray(v, dtype=float) for k, v in extra.items()},
    )
