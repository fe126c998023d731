"""The read benchmark runs end to end on a tiny generated slide (no timing thresholds)."""

from __future__ import annotations

import json
import math

import pytest

from napari_histo_ai.bench import read as bench

from .conftest import real

POSITIVE = (
    "open_s",
    "read_s",
    "mp_per_s",
    "openslide_mp_per_s",
    "raw_decode_mp_per_s",
    "ms_per_region",
    "dask_noop_ms_per_region",
    "raw_decode_ms_per_region",
    "ratio_vs_openslide",
    "ratio_vs_raw_decode",
    "rss_after_open_mb",
    "peak_rss_after_open_mb",
    "rss_after_reads_mb",
    "peak_rss_after_reads_mb",
    "ru_maxrss_after_reads_mb",
    "openslide_nocache_mp_per_s",
)


def _check_file_entry(entry: dict) -> None:
    assert "error" not in entry, entry.get("error")
    for key in POSITIVE:
        value = entry[key]
        assert isinstance(value, (int, float)), (key, value)
        assert math.isfinite(value), (key, value)
        assert value > 0, (key, value)
    assert entry["backend"] == "tifffile"
    assert entry["n_levels"] == len(entry["levels"]) >= 1
    assert set(entry["targets_met"]) == {
        "open_s",
        "peak_rss_mb",
        "ratio_vs_openslide",
        "ratio_vs_raw_decode",
    }
    assert all(isinstance(v, bool) for v in entry["targets_met"].values())


def test_run_with_generated_slide(tmp_path, monkeypatch):
    """``generate`` writes the slide from the source, then measures it in a subprocess."""
    monkeypatch.setattr(bench, "GENERATED_SHAPE", (768, 1024))
    out = tmp_path / "big.tif"
    result = bench.run_read_benchmark(
        [],
        n_reads=5,
        region=200,
        seed=1,
        generate=out,
        source=real("wsi/CMU-1-Small-Region.svs"),
    )
    json.dumps(result)
    assert out.exists()
    assert set(result) == {"files", "machine", "targets", "settings"}
    assert result["machine"]["cpu_count"] >= 1
    assert result["targets"] == bench.TARGETS
    (entry,) = result["files"]
    _check_file_entry(entry)
    assert entry["levels"][0] == [768, 1024, 3]
    assert entry["region"] == [200, 200]
    assert entry["generated"]["existed"] is False
    assert entry["raw_tiles_per_region"] >= 1


def test_measure_file_clips_region_and_times_read_region(tmp_path):
    from napari_histo_ai.io.synthetic import make_slide

    slide = make_slide(
        tmp_path / "s.tif",
        width=256,
        height=256,
        tile_size=128,
        source=real("wsi/CMU-1-Small-Region.svs"),
    )
    entry = bench.measure_file(slide, n_reads=3, region=512)
    _check_file_entry(entry)
    assert entry["region"] == [256, 256]
    assert entry["raw_tiles_per_region"] == 4
    assert entry["nocache_mp_per_s"] > 0 and entry["dask_mp_per_s"] > 0
    assert entry["ratio_vs_raw_decode"] > 0 and entry["dask_ratio_vs_raw_decode"] > 0


def test_failed_file_is_reported_not_raised(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00garbage")
    result = bench.run_read_benchmark([junk], n_reads=1)
    (entry,) = result["files"]
    assert entry["path"] == str(junk)
    assert "error" in entry


@pytest.mark.parametrize("kwargs", [{"n_reads": 0}, {"region": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="invalid"):
        bench.run_read_benchmark([], **kwargs)


def test_generate_defaults_to_the_packaged_sample(tmp_path):
    src = bench._default_source([tmp_path / "other.svs"])
    assert src.name == "CMU-1-Small-Region.svs" and src.is_file()
    assert bench._default_source([tmp_path / "CMU-1.svs"]) == tmp_path / "CMU-1.svs"
