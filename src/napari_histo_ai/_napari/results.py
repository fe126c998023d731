"""A run's outputs as napari layer data tuples, placed over the source image (no Qt).

Dense outputs are lazy dask views of the run's OME-Zarr pyramid, so the layers fill
in when the widget calls ``layer.refresh()`` while the run writes cells. Objects
(points, boxes) are appended as the engine reports them.

Layer names are traceable: ``"<image> · <model> · <output>"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..inference.engine import Geometry
from ..inference.objects import Objects, tile_magnification
from ..inference.smoothing import sigma_pixels, smooth_probabilities, smoothed_levels
from ..models.spec import ModelSpec, OutputSpec

LayerDataTuple = tuple[Any, dict[str, Any], str]


def layer_name(image: str, spec: ModelSpec, output: OutputSpec, suffix: str = "") -> str:
    name = f"{image} · {spec.name} · {output.name}"
    return f"{name} · {suffix}" if suffix else name


def _rgba(colour: str, alpha: float = 1.0) -> list[float]:
    c = colour.lstrip("#")
    rgb = [int(c[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    return [*rgb, alpha]


def _colormap(colour: str, name: str) -> Any:
    from napari.utils.colormaps import Colormap

    return Colormap(colors=[_rgba(colour, 0.0), _rgba(colour, 1.0)], name=name, display_name=name)


def _labels_colormap(colours: Sequence[str]) -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    mapping: dict[int | None, Any] = {None: [0, 0, 0, 0], 0: [0, 0, 0, 0]}
    for i, c in enumerate(colours):
        mapping[i + 1] = _rgba(c)
    return DirectLabelColormap(color_dict=mapping)


def _units(geometry: Geometry, plane_units: Sequence[str]) -> tuple[str, ...]:
    return (*plane_units, geometry.unit, geometry.unit)


def _placement(
    geometry: Geometry, plane_scale: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    lead = tuple(float(s) for s in plane_scale)
    return (*lead, *geometry.scale), (*(0.0 for _ in lead), *geometry.translate)


def _object_placement(
    geometry: Geometry, plane_scale: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Objects are stored in continuous level-0 pixels: world = (c - 0.5) * unit."""
    unit = (geometry.scale[0] / geometry.pixel[0], geometry.scale[1] / geometry.pixel[1])
    lead = tuple(float(s) for s in plane_scale)
    return (*lead, *unit), (*(0.0 for _ in lead), -0.5 * unit[0], -0.5 * unit[1])


def _mask_block(block: np.ndarray, threshold: int, multi: bool) -> np.ndarray:
    """uint8 probabilities (K, ...) -> labels (...): argmax + 1 where max >= threshold."""
    if not multi:
        return (block[0] >= threshold).astype(np.uint8)
    best = block.max(axis=0)
    return np.where(best >= threshold, block.argmax(axis=0) + 1, 0).astype(np.uint8)


def dense_layers(
    run: str | Path,
    spec: ModelSpec,
    geometry: dict[str, Geometry],
    *,
    image: str,
    plane_scale: Sequence[float] = (),
    plane_units: Sequence[str] = (),
    threshold: float | None = None,
) -> list[LayerDataTuple]:
    """Image / Labels layers of a dense model's ``probability`` pyramid (lazy)."""
    import dask.array as da
    import zarr

    group = zarr.open_group(str(run), mode="r")
    record = group.attrs["napari_histo_ai"]
    index = {c: i for i, c in enumerate(record["prob_channels"])}
    prob = group["probability"]
    levels = [da.from_zarr(prob[k]) for k in sorted(prob.array_keys(), key=int)]
    layers: list[LayerDataTuple] = []
    for out in spec.outputs:
        geo = geometry[out.name]
        scale, translate = _placement(geo, plane_scale)
        chans = [index[c] for c in out.channels]
        if out.kind == "probability":
            for n, c in enumerate(chans):
                suffix = out.classes[n] if len(chans) > 1 else ""
                data = [(lv[c].astype(np.float32) / 255.0) for lv in levels]
                name = layer_name(image, spec, out, suffix)
                layers.append(
                    (
                        data if len(data) > 1 else data[0],
                        {
                            "name": name,
                            "scale": scale,
                            "translate": translate,
                            "units": _units(geo, plane_units),
                            "colormap": _colormap(out.colours[n], name),
                            "contrast_limits": (0.0, 1.0),
                            "opacity": 0.7,
                            "blending": "translucent",
                            "metadata": {"run": str(run), "output": out.name, "kind": out.kind},
                        },
                        "image",
                    )
                )
        elif out.kind == "mask":
            t = threshold if threshold is not None else out.threshold
            t8 = int(np.clip(np.ceil(t * 255 - 1e-6), 1, 255))
            multi = len(chans) > 1
            stacks = [lv[chans] for lv in levels]
            if out.smoothing_um > 0:  # Gaussian σ (µm) on the probabilities first
                sigma = sigma_pixels(out.smoothing_um, geo.scale[-1])
                stacks = smoothed_levels(stacks, sigma_px=sigma)
            data = [
                da.map_blocks(_mask_block, st, t8, multi, drop_axis=0, dtype=np.uint8)
                for st in stacks
            ]
            layers.append(
                (
                    data if len(data) > 1 else data[0],
                    {
                        "name": layer_name(image, spec, out),
                        "scale": scale,
                        "translate": translate,
                        "units": _units(geo, plane_units),
                        "colormap": _labels_colormap(out.colours),
                        "opacity": 0.5,
                        "metadata": {
                            "run": str(run),
                            "output": out.name,
                            "kind": out.kind,
                            "classes": list(out.classes),
                            "threshold": t,
                        },
                    },
                    "labels",
                )
            )
    return layers


def object_layer(
    objects: Objects,
    spec: ModelSpec,
    output: OutputSpec,
    geometry: Geometry,
    *,
    image: str,
    plane_scale: Sequence[float] = (),
    plane_units: Sequence[str] = (),
    run: str | Path | None = None,
) -> LayerDataTuple:
    """A Points (peaks) or Shapes (rectangles, lines) layer with ``class`` and ``score``
    features (plus the objects' own, e.g. ``length_mm`` of lesion lines)."""
    scale, translate = _object_placement(geometry, plane_scale)
    features = object_features(objects)
    colours = [_rgba(output.colours[int(label)]) for label in objects.labels]
    meta = {"run": str(run) if run else None, "output": output.name, "kind": output.kind}
    name = layer_name(image, spec, output)
    size_px = max(2.0, output.min_distance_um / max(geometry.scale[0], 1e-9) * geometry.pixel[0])
    if output.kind == "points":
        kwargs: dict[str, Any] = {
            "name": name,
            "scale": scale,
            "translate": translate,
            "units": _units(geometry, plane_units),
            "features": features,
            "size": size_px * scale[-1],
            "face_color": np.asarray(colours).reshape(-1, 4) if colours else "transparent",
            "border_width": 0,
            "metadata": meta,
            "ndim": 2 + len(plane_scale),
        }
        return objects.coords, kwargs, "points"
    if output.kind == "lines":
        text = {"string": "{length_mm:.1f} mm", "size": 10, "color": output.colours[0]}
        return (
            objects_to_lines(objects),
            {
                "name": name,
                "scale": scale,
                "translate": translate,
                "units": _units(geometry, plane_units),
                "shape_type": "line",
                "features": features,
                "edge_color": np.asarray(colours).reshape(-1, 4) if colours else "yellow",
                "edge_width": 2 * scale[-1],
                "text": text if len(objects) and "length_mm" in features else None,
                "metadata": meta,
                "ndim": 2 + len(plane_scale),
            },
            "shapes",
        )
    return (
        boxes_to_rectangles(objects),
        {
            "name": name,
            "scale": scale,
            "translate": translate,
            "units": _units(geometry, plane_units),
            "shape_type": "rectangle",
            "features": features,
            "edge_color": np.asarray(colours).reshape(-1, 4) if colours else "yellow",
            "face_color": "transparent",
            "edge_width": 2 * scale[-1],
            "metadata": meta,
            "ndim": 2 + len(plane_scale),
        },
        "shapes",
    )


def object_features(objects: Objects) -> dict[str, np.ndarray]:
    classes = objects.classes or tuple(
        str(i) for i in range(int(objects.labels.max(initial=0)) + 1)
    )
    return {
        "class": np.asarray([classes[int(label)] for label in objects.labels], dtype=object),
        "score": np.asarray(objects.scores, dtype=np.float64),
        **{key: np.asarray(values) for key, values in objects.features.items()},
    }


def objects_to_lines(objects: Objects) -> list[np.ndarray]:
    """(N, p + 4) lines -> napari lines (2 ends, plane coordinates first)."""
    n_plane = objects.coords.shape[1] - 4
    out = []
    for row in objects.coords:
        plane = list(row[:n_plane])
        r0, c0, r1, c1 = row[n_plane:]
        out.append(np.array([[*plane, r0, c0], [*plane, r1, c1]]))
    return out


def boxes_to_rectangles(objects: Objects) -> list[np.ndarray]:
    """(N, p + 4) boxes -> napari rectangles (4 corners, plane coordinates first)."""
    out = []
    n_plane = objects.coords.shape[1] - 4
    for row in objects.coords:
        plane = list(row[:n_plane])
        t, left, b, r = row[n_plane:]
        out.append(np.array([[*plane, t, left], [*plane, t, r], [*plane, b, r], [*plane, b, left]]))
    return out


def tile_layers(
    run: str | Path,
    spec: ModelSpec,
    geometry: dict[str, Geometry],
    aggregates: dict[str, dict[str, Any]] | None = None,
    *,
    image: str,
    plane_scale: Sequence[float] = (),
    plane_units: Sequence[str] = (),
) -> list[LayerDataTuple]:
    """Per-tile layers of a tile model: class map (Labels) + heatmap, magnification map."""
    import zarr

    tiles = np.asarray(zarr.open_group(str(run), mode="r")["tiles"]["0"])
    layers: list[LayerDataTuple] = []
    for out in spec.outputs:
        geo = geometry[out.name]
        scale, translate = _placement(geo, plane_scale)
        v = tiles[list(out.channels)]
        meta: dict[str, Any] = {
            "run": str(run),
            "output": out.name,
            "kind": out.kind,
            "aggregate": (aggregates or {}).get(out.name),
        }
        if out.kind == "class":
            if out.smoothing_um > 0:  # Gaussian σ (µm) over the tile map first
                sigma = sigma_pixels(out.smoothing_um, geo.scale[-1])
                v = smooth_probabilities(v, sigma_px=sigma)
            missing = np.isnan(v).any(axis=0)
            labels = np.where(missing, 0, np.nan_to_num(v, nan=-1).argmax(axis=0) + 1)
            layers.append(
                (
                    labels.astype(np.uint8),
                    {
                        "name": layer_name(image, spec, out),
                        "scale": scale,
                        "translate": translate,
                        "units": _units(geo, plane_units),
                        "colormap": _labels_colormap(out.colours),
                        "opacity": 0.4,
                        "metadata": {**meta, "classes": list(out.classes)},
                    },
                    "labels",
                )
            )
            k = len(out.channels) - 1  # heatmap of the last ("positive") class
            name = layer_name(image, spec, out, out.classes[k])
            layers.append(
                (
                    np.nan_to_num(v[k], nan=0.0).astype(np.float32),
                    {
                        "name": name,
                        "scale": scale,
                        "translate": translate,
                        "units": _units(geo, plane_units),
                        "colormap": _colormap(out.colours[k], name),
                        "contrast_limits": (0.0, 1.0),
                        "opacity": 0.6,
                        "blending": "translucent",
                        "metadata": meta,
                    },
                    "image",
                )
            )
        else:  # magnification
            mags = tile_magnification(np.moveaxis(v, 0, -1), out).astype(np.float32)
            finite = mags[np.isfinite(mags)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if hi <= lo:
                hi = lo + 1.0
            layers.append(
                (
                    np.nan_to_num(mags, nan=0.0),
                    {
                        "name": layer_name(image, spec, out),
                        "scale": scale,
                        "translate": translate,
                        "units": _units(geo, plane_units),
                        "colormap": "viridis",
                        "contrast_limits": (lo, hi),
                        "opacity": 0.6,
                        "metadata": meta,
                    },
                    "image",
                )
            )
    return layers


def describe_aggregates(aggregates: dict[str, dict[str, Any]]) -> str:
    """One readable line per tile output: ``tumour: malignant (0.83, vote over 120 tiles)``."""
    lines = []
    for name, agg in aggregates.items():
        n = agg.get("n_tiles", 0)
        if "value" in agg:
            value = agg["value"]
            text = f"{value:g}×" if value is not None else "no tiles"
        else:
            cls = agg.get("class")
            score = agg.get("scores", {}).get(cls) if cls else None
            text = f"{cls} ({score:.2f})" if cls is not None and score is not None else "no tiles"
        lines.append(f"{name}: {text}, {agg.get('method')} over {n} tiles")
    return "\n".join(lines)


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a run folder written by the engine (cheap: reads one JSON)."""
    import json

    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return isinstance(attrs, dict) and "napari_histo_ai" in attrs


def run_folder_layers(path: str | Path) -> list[LayerDataTuple]:
    """All layers of a finished (or partial) run folder, as the widget shows them.

    This is how CLI results (``napari-histo-ai predict``) open in napari: open the slide,
    then the ``.zarr`` run folder, and the layers land over it.
    """
    import zarr

    from ..inference.engine import run_geometry
    from ..inference.geojson import read_objects

    group = zarr.open_group(str(path), mode="r")
    record = dict(group.attrs["napari_histo_ai"])
    spec = ModelSpec.from_dict(record["spec"], source=str(path))
    geo = run_geometry(record)
    geometry = {o.name: geo for o in spec.outputs}
    image = Path(str(record["image"])).name
    n_plane = len(record.get("planes", []))
    saved_scale = record.get("plane_scale") or ()
    # runs written before plane_scale was recorded: planes one unit apart
    plane_scale = (
        tuple(float(v) for v in saved_scale) if len(saved_scale) == n_plane else (1.0,) * n_plane
    )
    # napari wants one unit per axis: the last plane axis is Z (the image's unit, as
    # layer_units gives it), others (T) are plain indices
    plane_units = (*("pixel",) * (n_plane - 1), geo.unit) if n_plane else ()
    layers: list[LayerDataTuple] = []
    if spec.dense:
        layers += dense_layers(
            path, spec, geometry, image=image, plane_scale=plane_scale, plane_units=plane_units
        )
        for out in spec.outputs:
            file = Path(path) / f"{out.name}.geojson"
            if out.kind in ("points", "boxes", "lines") and file.is_file():
                objs = read_objects(file, kind=out.kind, classes=out.classes, n_plane=n_plane)
                layers.append(
                    object_layer(
                        objs,
                        spec,
                        out,
                        geo,
                        image=image,
                        plane_scale=plane_scale,
                        plane_units=plane_units,
                        run=path,
                    )
                )
    else:
        import json

        summary = Path(path) / "summary.json"
        aggregates = (
            json.loads(summary.read_text()).get("aggregates") if summary.is_file() else None
        )
        layers += tile_layers(
            path,
            spec,
            geometry,
            aggregates,
            image=image,
            plane_scale=plane_scale,
            plane_units=plane_units,
        )
    return layers
