"""Annotation benchmark: the SQLite store at slide scale, against bare limits.

``napari-histo-ai bench annotations [--sizes 100000 1000000] [--polygons 100000]`` (or
``benchmarks/bench_annotations.py``, which adds the napari layer update) builds, in a
temporary folder, stores of synthetic objects on a 100k × 100k slide at 0.25 µm/px
(seeded, uniform positions) and measures:

- ``build_s``: `AnnotationStore.add` of every object (one transaction, validation, the
  R-tree and history included); ``make_annotations_s`` (building the `Annotation`
  objects in Python, the caller's cost) is reported apart; ``file_mb`` the store's size;
- ``viewports``: for a 2048 × 1024 screen at pyramid level 0 and level 2 (4× downsample:
  a 8192 × 4096 px box) and for the whole slide (zoomed out, at most `LOD_LIMIT`
  points or `SHAPES_LOD_LIMIT` polygons: level of detail), the median over ``repeats``
  random viewports of `AnnotationStore.query_points` (points) or `AnnotationStore.query` (polygons);
  ``bare_ms`` is a numpy boolean mask over in-memory coordinate arrays (points) or
  bounds (polygons) for the same boxes: what an in-memory layer would cost, and
  ``ratio_vs_bare``; with a ``layer_update`` callback (the napari script passes one),
  ``query_plus_layer_ms`` is the median of query + callback;
- ``edit_ms`` / ``undo_ms``: medians of `AnnotationStore.update` of one object's coords
  and of the `AnnotationStore.undo` that follows (each one durable transaction), and
  ``bare_update_ms``: a raw SQLite ``UPDATE`` of the same row and its R-tree entry in
  one transaction, without history (``edit_ratio_vs_bare``);
- ``len_ms`` (`len` of the store: a count of live objects) and ``next_unreviewed_ms``
  (the review queue's next object, every object unreviewed);
- ``export`` (polygons, when `napari_histo_ai.annotations.formats.geojson` is present):
  ``export_s`` = ``iter_all`` + ``export_geojson`` of every polygon, and
  ``bare_json_dump_s``, ``json.dumps`` (C encoder) + write of the same features prebuilt
  as plain dicts;
- ``targets_met`` against :data:`TARGETS` (from the issue: viewport query + layer update
  < 100 ms at 10^6 objects, edit and undo < 50 ms, GeoJSON export of 10^5 polygons
  < 2 s). Without a layer callback the query alone is checked.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..annotations.model import Annotation, ImageRef
from ..annotations.store import AnnotationStore

__all__ = ["SLIDE_SHAPE", "TARGETS", "run_annotation_benchmark"]

#: the synthetic slide: (rows, cols) level-0 px and µm/px
SLIDE_SHAPE = (100_000, 100_000)
SLIDE_MPP = 0.25
#: screen (rows, cols) in display pixels
SCREEN = (1024, 2048)
#: most points / polygons a zoomed-out view shows (level of detail)
LOD_LIMIT = 5000
SHAPES_LOD_LIMIT = 1000
#: whole-slide views timed at most this many times (napari Shapes take seconds there)
WHOLE_SLIDE_REPEATS = 5
TARGETS: dict[str, float] = {
    "query_plus_layer_ms_max": 100.0,  # at 10^6 objects
    "edit_ms_max": 50.0,
    "undo_ms_max": 50.0,
    "export_geojson_s_max": 2.0,  # 10^5 polygons
}

#: ``layer_update(kind, result)``: kind "points" gets query_points' tuple, "shapes" a
#: list of Annotation
LayerUpdate = Callable[[str, Any], None]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _random_boxes(
    rng: np.random.Generator, size: tuple[float, float], n: int
) -> list[tuple[float, float, float, float]]:
    h, w = SLIDE_SHAPE
    tops = rng.uniform(0, h - size[0], n)
    lefts = rng.uniform(0, w - size[1], n)
    return [(t, lf, t + size[0], lf + size[1]) for t, lf in zip(tops, lefts, strict=True)]


def synthetic_points(n: int, *, seed: int = 0) -> list[Annotation]:
    """``n`` model points (mitoses) uniform over the slide, with confidences."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform((0, 0), SLIDE_SHAPE, (n, 2))
    conf = rng.uniform(0, 1, n)
    t = time.time()
    return [
        Annotation(
            "point",
            p[None],
            "mitosis",
            source="mitosis-unet",
            model_version="1.0",
            confidence=float(c),
            review="unreviewed",
            created=t,
            modified=t,
        )
        for p, c in zip(pts, conf, strict=True)
    ]


def synthetic_polygons(n: int, *, seed: int = 0, vertices: int = 12) -> list[Annotation]:
    """``n`` star-shaped nucleus-like polygons (radius 5–40 px) uniform over the slide."""
    rng = np.random.default_rng(seed + 1)
    centres = rng.uniform((50, 50), (SLIDE_SHAPE[0] - 50, SLIDE_SHAPE[1] - 50), (n, 2))
    radius = rng.uniform(5, 40, (n, 1)) * rng.uniform(0.7, 1.0, (n, vertices))
    angle = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    rings = centres[:, None, :] + radius[..., None] * np.stack(
        [np.sin(angle), np.cos(angle)], axis=-1
    )
    t = time.time()
    return [
        Annotation(
            "polygon",
            ring,
            "tumour",
            source="nuclei-unet",
            model_version="1.0",
            confidence=0.8,
            review="unreviewed",
            created=t,
            modified=t,
            measurements={"area_um2": 1.0},
        )
        for ring in rings
    ]


def _image_ref(path: Path) -> ImageRef:
    return ImageRef(str(path), "sha256:bench", SLIDE_SHAPE, axes="YX", mpp=(SLIDE_MPP, SLIDE_MPP))


def _bench_viewports(
    store: AnnotationStore,
    *,
    kind: str,
    coords: np.ndarray,
    repeats: int,
    seed: int,
    layer_update: LayerUpdate | None,
) -> dict[str, Any]:
    """Median query times for level-0, level-2 and whole-slide views."""
    rng = np.random.default_rng(seed + 7)
    if kind == "points":
        lo = hi = coords
    else:
        lo, hi = coords[:, :2], coords[:, 2:]
    views: dict[str, Any] = {}
    for name, size, limit in (
        ("level0", (SCREEN[0], SCREEN[1]), None),
        ("level2", (SCREEN[0] * 4, SCREEN[1] * 4), None),
        ("whole_slide", SLIDE_SHAPE, LOD_LIMIT if kind == "points" else SHAPES_LOD_LIMIT),
    ):
        if name == "whole_slide":
            whole = (0.0, 0.0, float(SLIDE_SHAPE[0]), float(SLIDE_SHAPE[1]))
            boxes = [whole] * min(repeats, WHOLE_SLIDE_REPEATS)
        else:
            boxes = _random_boxes(rng, size, repeats)
        q_times, ql_times, bare_times, counts = [], [], [], []
        # warm-up (page cache), not counted
        if kind == "points":
            store.query_points(boxes[0], limit=limit)
        else:
            store.query(boxes[0], limit=limit)
        for box in boxes:
            start = time.perf_counter()
            result: Any
            if kind == "points":
                result = store.query_points(box, limit=limit)
                n = len(result[0])
            else:
                result = store.query(box, limit=limit)
                n = len(result)
            q_times.append(time.perf_counter() - start)
            if layer_update is not None:
                layer_update(kind, result)
                ql_times.append(time.perf_counter() - start)
            counts.append(n)
            start = time.perf_counter()
            top, left, bottom, right = box
            mask = (hi[:, 0] >= top) & (lo[:, 0] <= bottom) & (hi[:, 1] >= left)
            mask &= lo[:, 1] <= right
            sel = np.flatnonzero(mask)
            if limit is not None and len(sel) > limit:
                sel = sel[:: max(1, len(sel) // limit)][:limit]
            _ = coords[sel]
            bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        total = store.count_in(boxes[0], kinds=["point" if kind == "points" else "polygon"])
        count_s = time.perf_counter() - start
        start = time.perf_counter()
        estimate = store.count_in(
            boxes[0], kinds=["point" if kind == "points" else "polygon"], exact=False
        )
        estimate_s = time.perf_counter() - start
        entry: dict[str, Any] = {
            "box_px": [round(size[0]), round(size[1])],
            "limit": limit,
            "median_objects": _median(counts),
            "query_ms": _ms(_median(q_times)),
            "query_p90_ms": _ms(float(np.percentile(q_times, 90))),
            "bare_ms": _ms(_median(bare_times)),
            "ratio_vs_bare": round(_median(q_times) / max(_median(bare_times), 1e-9), 2),
            "count_in_first_box": total,
            "count_in_ms": _ms(count_s),
            "count_estimate_first_box": estimate,
            "count_estimate_ms": _ms(estimate_s),
        }
        if ql_times:
            entry["query_plus_layer_ms"] = _ms(_median(ql_times))
            entry["layer_ms"] = _ms(_median(ql_times) - _median(q_times))
        views[name] = entry
    return views


def _bench_edits(
    store: AnnotationStore, ids: list[int], *, repeats: int, seed: int
) -> dict[str, Any]:
    """Medians of one coords update, the undo after it, and a raw SQLite UPDATE."""
    rng = np.random.default_rng(seed + 11)
    picks = rng.choice(len(ids), size=repeats, replace=False)
    edit, undo, bare = [], [], []
    for k in picks:
        oid = ids[int(k)]
        ann = store.get(oid)
        moved = ann.coords + rng.uniform(-3, 3, 2)
        start = time.perf_counter()
        store.update(oid, coords=moved, review="corrected")
        edit.append(time.perf_counter() - start)
        start = time.perf_counter()
        store.undo()
        undo.append(time.perf_counter() - start)
        conn = store.conn
        lo, hi = moved.min(axis=0), moved.max(axis=0)
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            'UPDATE objects SET coords = ?, top = ?, "left" = ?, bottom = ?, "right" = ? '
            "WHERE id = ?",
            (moved.astype("<f8").tobytes(), lo[0], lo[1], hi[0], hi[1], oid),
        )
        conn.execute(
            "UPDATE objects_index SET r0 = ?, r1 = ?, c0 = ?, c1 = ? WHERE id = ?",
            (lo[0], hi[0], lo[1], hi[1], oid),
        )
        conn.execute("COMMIT")
        bare.append(time.perf_counter() - start)
        # put the row back as it was (raw, outside the timing)
        lo, hi = ann.coords.min(axis=0), ann.coords.max(axis=0)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            'UPDATE objects SET coords = ?, top = ?, "left" = ?, bottom = ?, "right" = ? '
            "WHERE id = ?",
            (ann.coords.astype("<f8").tobytes(), lo[0], lo[1], hi[0], hi[1], oid),
        )
        conn.execute(
            "UPDATE objects_index SET r0 = ?, r1 = ?, c0 = ?, c1 = ? WHERE id = ?",
            (lo[0], hi[0], lo[1], hi[1], oid),
        )
        conn.execute("COMMIT")
    return {
        "edit_ms": _ms(_median(edit)),
        "edit_p90_ms": _ms(float(np.percentile(edit, 90))),
        "undo_ms": _ms(_median(undo)),
        "undo_p90_ms": _ms(float(np.percentile(undo, 90))),
        "bare_update_ms": _ms(_median(bare)),
        "edit_ratio_vs_bare": round(_median(edit) / max(_median(bare), 1e-9), 2),
        "undo_ratio_vs_bare": round(_median(undo) / max(_median(bare), 1e-9), 2),
    }


def _bench_review_queue(store: AnnotationStore, *, repeats: int) -> dict[str, Any]:
    """Medians of ``len(store)`` and of `AnnotationStore.next_unreviewed` (every object
    is unreviewed model output here: the worst case, a full scan)."""
    len_s, next_s = [], []
    after: tuple[float, float] | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        len(store)
        len_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ann = store.next_unreviewed(after=after)
        next_s.append(time.perf_counter() - start)
        after = (float(ann.coords[0, 0]), float(ann.coords[0, 1])) if ann is not None else None
    return {"len_ms": _ms(_median(len_s)), "next_unreviewed_ms": _ms(_median(next_s))}


def _bench_export(store: AnnotationStore, folder: Path) -> dict[str, Any]:
    try:
        from ..annotations.formats.geojson import export_geojson
    except ImportError as exc:  # the formats module is optional for this benchmark
        return {"skipped": f"GeoJSON export not available ({exc})"}
    start = time.perf_counter()
    anns = list(store.iter_all(kinds=["polygon"]))
    read_s = time.perf_counter() - start
    out = folder / "export.geojson"
    start = time.perf_counter()
    export_geojson(anns, out, image=store.image, classes=store.classes)
    export_only_s = time.perf_counter() - start
    size_mb = out.stat().st_size / 2**20
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[c, r] for r, c in [*a.coords.tolist(), a.coords[0].tolist()]]],
            },
            "properties": {
                "objectType": "detection",
                "classification": {"name": a.class_name},
                "measurements": dict(a.measurements),
            },
        }
        for a in anns
    ]
    bare = folder / "bare.geojson"
    start = time.perf_counter()
    with open(bare, "w", encoding="utf-8") as fh:  # json.dumps: the C encoder
        fh.write(json.dumps({"type": "FeatureCollection", "features": features}))
    bare_s = time.perf_counter() - start
    return {
        "n_features": len(anns),
        "iter_all_s": round(read_s, 3),
        "export_geojson_s": round(export_only_s, 3),
        "export_s": round(read_s + export_only_s, 3),
        "file_mb": round(size_mb, 2),
        "bare_json_dump_s": round(bare_s, 3),
        "ratio_vs_bare": round(export_only_s / max(bare_s, 1e-9), 2),
    }


def _bench_store(
    folder: Path,
    anns: list[Annotation],
    *,
    kind: str,
    repeats: int,
    seed: int,
    layer_update: LayerUpdate | None,
    export: bool,
) -> dict[str, Any]:
    path = folder / f"{kind}-{len(anns)}.sqlite"
    store = AnnotationStore.create(path, _image_ref(folder / "slide.tif"), annotator="bench")
    try:
        start = time.perf_counter()
        ids = store.add(anns, label="import")
        build_s = time.perf_counter() - start
        if kind == "points":
            coords = np.concatenate([a.coords for a in anns])
        else:
            coords = np.array([a.bounds() for a in anns])
        result: dict[str, Any] = {
            "n_objects": len(anns),
            "build_s": round(build_s, 3),
            "build_objects_per_s": round(len(anns) / build_s),
            "file_mb": round(path.stat().st_size / 2**20, 2),
            "viewports": _bench_viewports(
                store,
                kind=kind,
                coords=coords,
                repeats=repeats,
                seed=seed,
                layer_update=layer_update,
            ),
        }
        result.update(_bench_edits(store, ids, repeats=min(repeats, len(ids)), seed=seed))
        result.update(_bench_review_queue(store, repeats=min(repeats, 5)))
        if export:
            result["export"] = _bench_export(store, folder)
        result["integrity_check"] = store.integrity_check()
        return result
    finally:
        store.close()


def run_annotation_benchmark(
    *,
    sizes: Sequence[int] = (100_000, 1_000_000),
    n_polygons: int = 100_000,
    repeats: int = 20,
    seed: int = 0,
    work_dir: str | Path | None = None,
    layer_update: LayerUpdate | None = None,
) -> dict[str, Any]:
    """Build stores of ``sizes`` points and ``n_polygons`` polygons and time them.

    Parameters
    ----------
    sizes : sequence of int
        Point counts, one store each.
    n_polygons : int
        Polygons in the polygon store (0: skip it).
    repeats : int
        Random viewports, edits and undos per store (medians reported).
    seed : int
    work_dir : str or Path, optional
        Where the temporary stores go (default: the system temp folder); removed after.
    layer_update : callable, optional
        ``layer_update(kind, result)`` run after each viewport query ("points": the
        `AnnotationStore.query_points` tuple, "shapes": a list of `Annotation`);
        ``benchmarks/bench_annotations.py`` passes one that sets napari layers' data.

    Returns
    -------
    dict
        ``{"points": [one dict per size], "polygons": {...}, "targets": TARGETS,
        "targets_met": {...}, "machine": {...}, "settings": {...}}`` (see the module
        docstring for the fields).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out: dict[str, Any] = {"points": []}
    with tempfile.TemporaryDirectory(prefix="histo-ai-bench-", dir=work_dir) as tmp:
        folder = Path(tmp)
        for n in sizes:
            start = time.perf_counter()
            anns = synthetic_points(int(n), seed=seed)
            make_s = time.perf_counter() - start
            entry = _bench_store(
                folder,
                anns,
                kind="points",
                repeats=repeats,
                seed=seed,
                layer_update=layer_update,
                export=False,
            )
            entry["make_annotations_s"] = round(make_s, 3)
            out["points"].append(entry)
            del anns
        if n_polygons:
            start = time.perf_counter()
            polys = synthetic_polygons(int(n_polygons), seed=seed)
            make_s = time.perf_counter() - start
            out["polygons"] = _bench_store(
                folder,
                polys,
                kind="shapes",
                repeats=repeats,
                seed=seed,
                layer_update=layer_update,
                export=True,
            )
            out["polygons"]["make_annotations_s"] = round(make_s, 3)
    out["targets"] = dict(TARGETS)
    out["targets_met"] = _targets_met(out)
    out["machine"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    out["settings"] = {
        "sizes": [int(n) for n in sizes],
        "n_polygons": int(n_polygons),
        "repeats": repeats,
        "seed": seed,
        "slide_shape": list(SLIDE_SHAPE),
        "mpp": SLIDE_MPP,
        "screen": list(SCREEN),
        "lod_limit": LOD_LIMIT,
        "shapes_lod_limit": SHAPES_LOD_LIMIT,
        "whole_slide_repeats": min(repeats, WHOLE_SLIDE_REPEATS),
        "layer_update": layer_update is not None,
    }
    return out


def _targets_met(out: dict[str, Any]) -> dict[str, bool | None]:
    """Check the targets on the largest point store (and the polygon store)."""
    met: dict[str, bool | None] = {}
    if out["points"]:
        big = max(out["points"], key=lambda e: e["n_objects"])
        worst = max(v.get("query_plus_layer_ms", v["query_ms"]) for v in big["viewports"].values())
        met["query_plus_layer_ms"] = worst < TARGETS["query_plus_layer_ms_max"]
        met["edit_ms"] = big["edit_ms"] < TARGETS["edit_ms_max"]
        met["undo_ms"] = big["undo_ms"] < TARGETS["undo_ms_max"]
    if "polygons" in out:  # the target is for points; polygons reported alike
        worst = max(
            v.get("query_plus_layer_ms", v["query_ms"])
            for v in out["polygons"]["viewports"].values()
        )
        met["polygons_query_plus_layer_ms"] = worst < TARGETS["query_plus_layer_ms_max"]
    export = out.get("polygons", {}).get("export", {})
    met["export_geojson_s"] = (
        export["export_s"] < TARGETS["export_geojson_s_max"] if "export_s" in export else None
    )
    return met
