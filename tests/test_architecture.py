"""The core never imports Qt or napari; heavy libraries load lazily."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "napari_histo_ai",
    "napari_histo_ai.io",
    "napari_histo_ai.io.tiff",
    "napari_histo_ai.io.pyramid",
    "napari_histo_ai.errors",
    "napari_histo_ai.cli",
]


def _modules_after_import(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_core_imports_no_qt_no_napari():
    mods = _modules_after_import("; ".join(f"import {m}" for m in CORE))
    forbidden = {"qtpy", "PyQt6", "PyQt5", "PySide6", "napari", "magicgui", "vispy"}
    assert not forbidden & {m.split(".")[0] for m in mods}


def test_open_and_read_a_slide_without_qt():
    """Opening and reading a real slide works in a process where Qt cannot be imported."""
    from .conftest import real

    path = real("wsi/CMU-1-Small-Region.svs")
    code = (
        "import sys; sys.modules['PyQt6'] = None; sys.modules['qtpy'] = None;"
        "sys.modules['napari'] = None;"
        "from napari_histo_ai.io import open_image; import numpy as np;"
        f"p = open_image({str(path)!r}); print(np.asarray(p.levels[0][:10, :10]).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(10, 10, 3)"


def test_package_import_is_light():
    mods = _modules_after_import("import napari_histo_ai, napari_histo_ai.io")
    for heavy in ("torch", "dask.array", "nibabel", "openslide", "zarr", "tifffile"):
        assert heavy not in mods, heavy
