"""The OpenSlide backend: the reader contract on real slides, pixels, the missing extra."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from napari_histo_ai.errors import MissingDependencyError
from napari_histo_ai.io import open_image
from napari_histo_ai.io import openslide as backend

from .conftest import real
from .reader_contract import ReaderContract

openslide = pytest.importorskip("openslide", reason="needs the wsi extra (openslide-python)")


class OpenSlideContract(ReaderContract):
    """The contract with the backend forced to OpenSlide (tifffile claims these files)."""

    backend = "openslide"
    relative = ""

    @pytest.fixture
    def path(self):
        return real(self.relative)

    @pytest.fixture
    def pyramid(self, path):
        pyr = open_image(path, backend="openslide")
        yield pyr
        pyr.close()

    def test_detected(self, path):
        # auto-detection prefers tifffile for these files; OpenSlide must still claim them
        assert backend.sniff(path)


class TestCMUSmallRegion(OpenSlideContract):
    relative = "wsi/CMU-1-Small-Region.svs"
    n_levels = 1
    shape0 = (2967, 2220, 3)
    mpp = (0.499, 0.499)
    objective_power = 20.0


class TestTCGAJpeg2000(OpenSlideContract):
    relative = "wsi/TCGA-CR-7395-01A-01-TS1.svs"
    n_levels = 2
    shape0 = (3567, 4443, 3)
    mpp = None
    objective_power = None


class TestNDPI(OpenSlideContract):
    relative = "wsi/test3-TRITC-2-560.ndpi"
    n_levels = 7
    shape0 = (4864, 3968, 3)
    mpp = (0.2281750559028887, 0.2281750559028887)
    objective_power = 40.0


@contextmanager
def _opened(path) -> Iterator:
    pyr = open_image(path, backend="openslide")
    try:
        yield pyr
    finally:
        pyr.close()


def _reference(path, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """OpenSlide's own read_region of a level region, composited on white."""
    with openslide.OpenSlide(str(path)) as slide:
        ds = slide.level_downsamples[level]
        rgba = np.asarray(slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
    assert rgba[..., 3].min() == 255  # these regions are inside the scanned area
    return rgba[..., :3]


@pytest.mark.parametrize(
    ("relative", "level", "region"),
    [
        ("wsi/CMU-1-Small-Region.svs", 0, (1000, 700, 600, 500)),  # across 480px chunks
        ("wsi/test3-TRITC-2-560.ndpi", 0, (2000, 1500, 300, 700)),
        ("wsi/test3-TRITC-2-560.ndpi", 2, (300, 200, 500, 400)),  # integer downsample 4
    ],
)
def test_pixels_equal_openslide_read_region(relative, level, region):
    path = real(relative)
    y, x, h, w = region
    with _opened(path) as pyr:
        ours = np.asarray(pyr.levels[level][y : y + h, x : x + w])
    np.testing.assert_array_equal(ours, _reference(path, level, y, x, h, w))


def test_non_integer_downsample_chunk_matches_read_region():
    """Aperio level 1 (downsample 2.0005): each chunk is read_region at its own origin."""
    path = real("wsi/TCGA-CR-7395-01A-01-TS1.svs")
    with _opened(path) as pyr:
        lv = pyr.levels[1]
        t = lv.chunksize[0]
        h, w = t - 50, t - 10  # inside chunk (1, 2)
        ours = np.asarray(lv[t : t + h, 2 * t : 2 * t + w])
    np.testing.assert_array_equal(ours, _reference(path, 1, t, 2 * t, h, w))


def test_edge_chunk_is_padded_and_cropped():
    path = real("wsi/CMU-1-Small-Region.svs")
    with _opened(path) as pyr:
        lv = pyr.levels[0]
        corner = np.asarray(lv[-50:, -70:])
    np.testing.assert_array_equal(corner, _reference(path, 0, 2967 - 50, 2220 - 70, 50, 70))


def test_store_serves_zarr_v3_documents():
    import zarr

    path = real("wsi/test3-TRITC-2-560.ndpi")
    with openslide.OpenSlide(str(path)) as slide:
        store = backend.OpenSlideStore(slide, chunk_size=256)
        group = zarr.open_group(store, mode="r")
        assert sorted(group.array_keys(), key=int) == [str(i) for i in range(7)]
        arr = group["3"]
        assert arr.shape == (608, 496, 3)
        assert arr.chunks == (256, 256, 3)
        assert arr.dtype == np.uint8
        assert not store.supports_writes
        with pytest.raises(PermissionError):
            arr[:1, :1] = 0
        np.testing.assert_array_equal(arr[100:120, 30:60], _reference(path, 3, 100, 30, 20, 30))


def test_metadata_and_associated_images():
    path = real("wsi/CMU-1-Small-Region.svs")
    with _opened(path) as pyr:
        assert pyr.vendor == "aperio"
        assert pyr.format == "aperio"
        assert pyr.metadata["properties"]["openslide.vendor"] == "aperio"
        assert set(pyr.associated) == {"label", "macro", "thumbnail"}
        label = pyr.associated["label"]()
        assert label.dtype == np.uint8
        assert label.shape == (463, 387, 3)
        assert pyr.levels[0].chunksize == (240, 240, 3)  # the native tile


def test_rgba_composited_on_background():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 128]]], np.uint8)
    rgb = backend._to_rgb(rgba, (255, 255, 255))
    assert rgb.tolist() == [[[10, 20, 30], [255, 255, 255], [227, 177, 127]]]


def test_sniff_never_raises(tmp_path):
    assert not backend.sniff(tmp_path)  # a folder
    assert not backend.sniff(tmp_path / "missing.mrxs")
    junk = tmp_path / "junk.mrxs"
    junk.write_bytes(b"not a slide")
    assert not backend.sniff(junk)


def test_missing_extra(monkeypatch, tmp_path):
    path = real("wsi/CMU-1-Small-Region.svs")
    monkeypatch.setitem(sys.modules, "openslide", None)  # "import openslide" -> ImportError
    assert not backend.sniff(path)
    with pytest.raises(MissingDependencyError) as info:
        open_image(path, backend="openslide")
    message = str(info.value)
    assert "Reading CMU-1-Small-Region.svs with OpenSlide" in message
    assert "pip install 'napari-histo-ai[wsi]'" in message
    assert info.value.extra == "wsi"
