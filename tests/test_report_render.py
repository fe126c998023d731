"""The report as a reader sees it: the HTML page rendered by headless Chromium and the
PDF rasterised by pdftoppm both show the overlays (the heatmap's colours and the
detections' yellow rings), and a report without overlays shows neither.

Skipped, with the reason, when ``chromium`` or ``pdftoppm`` is not installed (the
Makefile installs Debian's ``chromium`` and ``poppler-utils``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_histo_ai.reports import ReportRequest, make_report

from .test_reports import _spec, point, write_run

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
)
PDFTOPPM = shutil.which("pdftoppm")


def _needs(binary: str | None, name: str) -> None:
    if binary is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {name})")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two reports of one slide: with a tumour heatmap and 40 detections, and without
    (only a magnification run: nothing to draw)."""
    from importlib.resources import files

    from napari_histo_ai.io.synthetic import make_slide

    sample = Path(str(files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")))
    folder = tmp_path_factory.mktemp("render")
    slide = make_slide(folder / "gamma.tif", width=768, height=640, source=sample)
    shape = (640, 768, 3)
    tiles = np.full((2, 10, 12), np.nan, np.float32)
    tiles[1, :5] = 0.5  # the top half: tumour probability 0.5 (turbo: light green)
    tiles[0, :5] = 0.5
    tumour = write_run(
        folder / "gamma.hand-idc.zarr",
        spec=_spec(
            {
                "name": "hand-idc",
                "task": "tumour tiles",
                "dense": False,
                "activation": "softmax",
                "outputs": [
                    {
                        "name": "tumour",
                        "kind": "class",
                        "channels": [0, 1],
                        "classes": ["not tumour", "tumour"],
                    }
                ],
            }
        ),
        image=slide,
        shape=shape,
        mpp=0.499,
        pixel=64.0,
        tiles=tiles,
    )
    rng = np.random.default_rng(0)
    pts = [point(float(r), float(c), 1.0) for r, c in rng.uniform(40, 600, (40, 2))]
    mitoses = write_run(
        folder / "gamma.hand-mitosis.zarr",
        spec=_spec(
            {
                "name": "hand-mitosis",
                "task": "mitosis detection",
                "outputs": [
                    {
                        "name": "mitoses",
                        "kind": "points",
                        "channels": [0],
                        "classes": ["mitosis"],
                        "colours": ["#ffe119"],
                    }
                ],
            }
        ),
        image=slide,
        shape=shape,
        mpp=0.499,
        objects={"mitoses": pts},
    )
    mag = write_run(
        folder / "gamma.hand-mag.zarr",
        spec=_spec(
            {
                "name": "hand-mag",
                "task": "magnification",
                "dense": False,
                "activation": "none",
                "outputs": [{"name": "magnification", "kind": "magnification", "channels": [0]}],
            }
        ),
        image=slide,
        shape=shape,
        mpp=0.499,
        pixel=64.0,
        tiles=np.full((1, 10, 12), 20.0, np.float32),
        aggregates={"magnification": {"method": "median", "value": 20.0, "n_tiles": 120}},
    )
    with_overlays = make_report(
        ReportRequest(images=(slide,), out_dir=folder / "with", runs=(tumour, mitoses))
    )
    without = make_report(ReportRequest(images=(slide,), out_dir=folder / "without", runs=(mag,)))
    return {"with": with_overlays, "without": without, "folder": folder}


def heat_pixels(rgb: np.ndarray) -> int:
    """Light-green pixels (the heatmap at p = 0.5 over H&E: H&E has no green)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((g > r + 25) & (g > b + 40)).sum())


def ring_pixels(rgb: np.ndarray) -> int:
    """Yellow pixels (the detections' rings: #ffe119; H&E has no yellow)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((r > 190) & (g > 160) & (b < 80) & (r - b > 150)).sum())


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def chromium_screenshot(html: Path, out: Path, tmp: Path) -> np.ndarray:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1200,2200",
        f"--screenshot={out}",
        html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.is_file(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"
    return _png(out)


def test_thumbnail_itself_shows_the_overlays(reports):
    with_rgb = _png(reports["with"].files["thumbnail"])
    without_rgb = _png(reports["without"].files["thumbnail"])
    assert heat_pixels(with_rgb) > 0.2 * with_rgb.shape[0] * with_rgb.shape[1]
    assert ring_pixels(with_rgb) > 200
    assert heat_pixels(without_rgb) < 50 and ring_pixels(without_rgb) < 20
    legend = reports["with"].report.slides[0].thumbnail_legend
    assert {item["kind"] for item in legend} >= {"heatmap", "points"}


def test_html_in_chromium_shows_the_overlays(reports, tmp_path):
    _needs(CHROMIUM, "chromium")
    shot = chromium_screenshot(reports["with"].files["html"], tmp_path / "with.png", tmp_path)
    bare = chromium_screenshot(reports["without"].files["html"], tmp_path / "without.png", tmp_path)
    assert heat_pixels(shot) > 20_000, heat_pixels(shot)
    assert ring_pixels(shot) > 100, ring_pixels(shot)
    assert heat_pixels(bare) < 200 and ring_pixels(bare) < 20
    # the page is more than a blank frame: text pixels (dark) are present in both
    assert (shot.sum(axis=-1) < 150).sum() > 1000 and (bare.sum(axis=-1) < 150).sum() > 1000


def test_pdf_through_pdftoppm_shows_the_overlays(reports, tmp_path):
    _needs(PDFTOPPM, "pdftoppm (poppler-utils)")
    pages: dict[str, list[np.ndarray]] = {}
    for key in ("with", "without"):
        prefix = tmp_path / key
        subprocess.run(
            [str(PDFTOPPM), "-png", "-r", "50", str(reports[key].files["pdf"]), str(prefix)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        pages[key] = [_png(p) for p in sorted(tmp_path.glob(f"{key}-*.png"))]
        assert pages[key], f"pdftoppm rendered no page of the {key} report"
    heat = sum(heat_pixels(p) for p in pages["with"])
    rings = sum(ring_pixels(p) for p in pages["with"])
    assert heat > 3_000, heat
    assert rings > 15, rings
    assert sum(heat_pixels(p) for p in pages["without"]) < 100
    assert sum(ring_pixels(p) for p in pages["without"]) < 10
