"""napari.yaml is valid, discoverable through the entry point, and every python_name imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import npe2
import pytest

import napari_histo_ai

MANIFEST = Path(napari_histo_ai.__file__).parent / "napari.yaml"
READER_PATTERNS = {
    "*.svs", "*.ndpi", "*.tif", "*.tiff", "*.ome.tif", "*.ome.tiff", "*.btf", "*.mrxs",
    "*.vms", "*.vmu", "*.scn", "*.bif", "*.nii", "*.nii.gz", "*.zarr", "*.png", "*.jpg",
    "*.jpeg", "*.pgm", "*.ppm", "*.bmp",
}  # fmt: skip


@pytest.fixture(scope="module")
def manifest() -> npe2.PluginManifest:
    return npe2.PluginManifest.from_file(MANIFEST)


def test_manifest_is_the_installed_one(manifest):
    installed = npe2.PluginManifest.from_distribution("napari-histo-ai")
    assert installed.name == manifest.name == "napari-histo-ai"
    assert manifest.display_name == "napari-histo-ai"
    assert installed.contributions == manifest.contributions


def test_npe2_validate_cli():
    npe2_cli = Path(sys.executable).with_name("npe2")
    if not npe2_cli.exists():
        pytest.skip(f"npe2 command not beside {sys.executable}")
    result = subprocess.run(
        [str(npe2_cli), "validate", "napari-histo-ai", "--imports"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_every_python_name_imports(manifest):
    manifest.validate_imports()
    commands = manifest.contributions.commands or []
    assert commands
    for command in commands:
        module_name, _, attribute = command.python_name.partition(":")
        obj = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        assert callable(obj), command.python_name


def test_contributions(manifest):
    contributions = manifest.contributions
    (reader,) = contributions.readers or []
    assert set(reader.filename_patterns) == READER_PATTERNS
    assert reader.accepts_directories
    (sample,) = contributions.sample_data or []
    assert sample.display_name == "CMU-1 small region (Aperio SVS, 0.499 µm/px)"
    assert [w.display_name for w in contributions.widgets or []] == [
        "Open slide / volume",
        "Run model",
        "Review & correct",
        "Retrain",
        "Generate report",
    ]
    writers = {(w.command, tuple(w.layer_types), tuple(w.filename_extensions))
               for w in contributions.writers or []}  # fmt: skip
    assert writers == {
        ("napari-histo-ai.write_points_geojson", ("points",), (".geojson",)),
        ("napari-histo-ai.write_shapes_geojson", ("shapes",), (".geojson",)),
        ("napari-histo-ai.write_points_csv", ("points",), (".csv",)),
    }
    command_ids = {c.id for c in contributions.commands or []}
    assert {reader.command, sample.command} | {w.command for w in contributions.widgets} | {
        w.command for w in contributions.writers or []
    } <= command_ids


def test_sample_file_is_packaged():
    data = Path(napari_histo_ai.__file__).parent / "data"
    assert (data / "CMU-1-Small-Region.svs").stat().st_size > 1_000_000
    assert "OpenSlide" in (data / "README.md").read_text(encoding="utf-8")
