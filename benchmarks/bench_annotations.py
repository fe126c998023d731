"""Annotation benchmark with the napari layer update: viewport query + layer update.

Runs :func:`napari_histo_ai.bench.annotations.run_annotation_benchmark` (stores of 10^5
and 10^6 points and 10^5 polygons on a synthetic 100k × 100k slide) and, after each
viewport query, sets the data of a napari ``Points`` layer (points) or ``Shapes`` layer
(polygons) created without a viewer, so ``query_plus_layer_ms`` is what a pan or zoom
costs before drawing. Prints JSON; ``--json-out`` also writes it. Example::

    python benchmarks/bench_annotations.py --json-out docs/bench_annotations.json

Without napari the figures are the store's alone (as ``napari-histo-ai bench
annotations``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from napari_histo_ai.atomic import write_json_atomic
from napari_histo_ai.bench.annotations import run_annotation_benchmark

MPP = (0.25, 0.25)


def make_layer_update() -> tuple[Any, dict[str, Any]]:
    """A ``layer_update(kind, result)`` that sets napari layers' data (no viewer)."""
    import napari

    points = napari.layers.Points(
        np.zeros((0, 2)), scale=MPP, name="mitosis", features={"annotation_id": np.zeros(0, int)}
    )
    shapes = napari.layers.Shapes(scale=MPP, name="tumour")
    info: dict[str, Any] = {"napari": napari.__version__, "shapes_calls": 0}

    def update(kind: str, result: Any) -> None:
        if kind == "points":
            ids, coords, class_index, review_index = result
            points.data = coords
            points.features = {
                "annotation_id": ids,
                "class_index": class_index,
                "review_index": review_index,
            }
            assert len(points.data) == len(ids)
        else:
            rings = [a.coords for a in result]
            shapes.data = []
            if rings:
                shapes.add_polygons(rings)
                shapes.features = {"annotation_id": np.array([a.id for a in result])}
            info["shapes_calls"] += 1
            assert shapes.nshapes == len(rings)

    return update, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--polygons", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--no-napari", action="store_true", help="store timings only")
    args = parser.parse_args(argv)
    layer_update = None
    info: dict[str, Any] = {}
    if not args.no_napari:
        try:
            layer_update, info = make_layer_update()
        except ImportError as exc:
            info = {"napari": f"not available ({exc})"}
    start = time.perf_counter()
    result = run_annotation_benchmark(
        sizes=args.sizes,
        n_polygons=args.polygons,
        repeats=args.repeats,
        seed=args.seed,
        layer_update=layer_update,
    )
    result["layer_update"] = {
        "napari": info.get("napari"),
        "points": "napari.layers.Points.data + features from query_points",
        "shapes": "napari.layers.Shapes cleared, add_polygons(rings) + features from query",
    }
    result["total_s"] = round(time.perf_counter() - start, 1)
    if args.json_out:
        write_json_atomic(args.json_out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
