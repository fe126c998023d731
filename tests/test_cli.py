"""The ``napari-histo-ai`` command: info JSON, and one clear line with exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_histo_ai.cli import main

from .conftest import real

KEYS = {
    "format",
    "backend",
    "levels",
    "downsamples",
    "mpp",
    "objective_power",
    "spacing_mm",
    "dtype",
    "axes",
}


def test_info_svs(capsys):
    code = main(["info", str(real("wsi/CMU-1-Small-Region.svs"))])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= KEYS
    assert info["levels"] == [[2967, 2220, 3]]
    assert info["mpp"] == [0.499, 0.499]
    assert info["objective_power"] == 20.0
    assert info["backend"] == "tifffile" and info["format"] == "aperio-svs"


def test_info_ndpi_levels_and_downsamples(capsys):
    assert main(["info", str(real("wsi/test3-TRITC-2-560.ndpi"))]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["downsamples"] == [1.0, 2.0, 4.0, 8.0]
    assert info["mpp"][0] == pytest.approx(0.22818, rel=1e-4)


def test_info_missing_mpp_is_null(capsys):
    assert main(["info", str(real("wsi/TCGA-CR-7395-01A-01-TS1.svs"))]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] is None and info["objective_power"] is None


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not an image", b"II*\x00\x08\x00"])
def test_info_bad_input_one_line_exit_2(tmp_path, capsys, content):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(content)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ") and "bad.svs" in err


def test_info_missing_path(tmp_path, capsys):
    assert main(["info", str(tmp_path / "gone.ndpi")]) == 2
    assert "gone.ndpi" in capsys.readouterr().err


def test_console_script_runs():
    """The installed entry point works in a fresh interpreter (no traceback on bad input)."""
    proc = subprocess.run(
        [sys.executable, "-m", "napari_histo_ai.cli", "info", "/nonexistent.svs"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "/nonexistent.svs" in proc.stderr


def test_make_slide_and_bench_read_from_the_cli(tmp_path, capsys):
    """The two large-data commands run end to end on a small size."""
    out = tmp_path / "made.tif"
    src = real("wsi/CMU-1-Small-Region.svs")
    args = ["make-slide", str(out), "--width", "1500", "--height", "1200", "--source", str(src)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["levels"][0] == [1200, 1500, 3] and info["mpp"] == [0.499, 0.499]
    assert main(["bench", "read", str(out), "--reads", "3", "--region", "256"]) == 0
    result = json.loads(capsys.readouterr().out)
    (entry,) = result["files"]
    assert entry["mp_per_s"] > 0 and entry["raw_decode_mp_per_s"] > 0
    assert entry["openslide_mp_per_s"] > 0


def test_make_slide_bad_source(tmp_path, capsys):
    bad = tmp_path / "src.svs"
    bad.write_bytes(b"not a slide")
    assert main(["make-slide", str(tmp_path / "o.tif"), "--source", str(bad)]) == 2
    assert "src.svs" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()
