"""The annotation benchmark runs end to end at a tiny size (no timing thresholds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_histo_ai.bench import annotations as bench
from napari_histo_ai.cli import main

VIEW_KEYS = ("query_ms", "query_p90_ms", "bare_ms", "ratio_vs_bare", "count_in_ms")
EDIT_KEYS = (
    "edit_ms",
    "undo_ms",
    "bare_update_ms",
    "edit_ratio_vs_bare",
    "undo_ratio_vs_bare",
    "len_ms",
    "next_unreviewed_ms",
)


def _positive(entry: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = entry[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        assert value >= 0, (key, value)


def _check_store(entry: dict[str, Any], n: int, *, layer: bool) -> None:
    assert entry["n_objects"] == n
    assert entry["build_s"] > 0 and entry["file_mb"] > 0
    assert entry["integrity_check"] == "ok"
    assert set(entry["viewports"]) == {"level0", "level2", "whole_slide"}
    for name, view in entry["viewports"].items():
        _positive(view, VIEW_KEYS)
        assert view["count_in_first_box"] >= 0
        if name == "whole_slide":
            # the whole slide holds everything; at this size no subsampling
            assert view["count_in_first_box"] == n
            assert view["median_objects"] == min(n, view["limit"])
        assert ("query_plus_layer_ms" in view) == layer
        if layer:
            assert view["query_plus_layer_ms"] >= view["query_ms"]
    _positive(entry, EDIT_KEYS)


def test_core_benchmark_tiny(tmp_path: Path):
    calls: dict[str, int] = {"points": 0, "shapes": 0}

    def layer_update(kind: str, result: Any) -> None:
        calls[kind] += 1
        if kind == "points":
            ids, coords, cls, rev = result
            assert coords.shape == (len(ids), 2) and len(cls) == len(rev) == len(ids)
        else:
            assert all(a.kind == "polygon" for a in result)

    out = bench.run_annotation_benchmark(
        sizes=(1000,), n_polygons=500, repeats=3, work_dir=tmp_path, layer_update=layer_update
    )
    json.dumps(out)  # plain JSON
    assert [e["n_objects"] for e in out["points"]] == [1000]
    _check_store(out["points"][0], 1000, layer=True)
    _check_store(out["polygons"], 500, layer=True)
    # level0 + level2 (3 each) + whole slide (3) per store
    assert calls == {"points": 9, "shapes": 9}
    export = out["polygons"]["export"]
    if "skipped" not in export:
        assert export["n_features"] == 500
        _positive(export, ("export_s", "export_geojson_s", "bare_json_dump_s", "ratio_vs_bare"))
        assert out["targets_met"]["export_geojson_s"] in (True, False)
    assert set(out["targets_met"]) == {
        "query_plus_layer_ms",
        "polygons_query_plus_layer_ms",
        "edit_ms",
        "undo_ms",
        "export_geojson_s",
    }
    assert out["settings"]["sizes"] == [1000] and out["settings"]["layer_update"] is True
    assert list(tmp_path.iterdir()) == []  # temporary stores removed


def test_synthetic_objects_fit_the_slide():
    pts = bench.synthetic_points(200, seed=3)
    polys = bench.synthetic_polygons(50, seed=3)
    assert [a.coords.tolist() for a in pts] == [
        a.coords.tolist() for a in bench.synthetic_points(200, seed=3)
    ]
    h, w = bench.SLIDE_SHAPE
    for a in [*pts, *polys]:
        a.validate()
        assert np.all(a.coords >= 0) and np.all(a.coords <= [h, w])


def test_cli_bench_annotations_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    target = tmp_path / "bench.json"
    code = main(
        ["bench", "annotations", "--sizes", "300", "--polygons", "0", "--repeats", "2",
         "--json-out", str(target), "--work-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(target.read_text())
    assert printed["settings"] == written["settings"]
    assert "polygons" not in written and written["targets_met"]["export_geojson_s"] is None
    assert "polygons_query_plus_layer_ms" not in written["targets_met"]
    _check_store(written["points"][0], 300, layer=False)
    assert main(["bench", "annotations", "--sizes", "0"]) != 0
