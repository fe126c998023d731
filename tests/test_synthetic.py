"""make_slide: a pyramidal JPEG-tiled BigTIFF of real pixels that tifffile and OpenSlide read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_histo_ai.io import open_image
from napari_histo_ai.io.synthetic import make_slide

from .conftest import real

WIDTH, HEIGHT = 3000, 2000


@pytest.fixture(scope="module")
def source():
    return real("wsi/CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def slide(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("synthetic") / "small.tif"
    assert make_slide(out, width=WIDTH, height=HEIGHT, source=source) == out
    return out


def _expected_mosaic(source, description: dict) -> np.ndarray:
    """The mirrored source crop repeated over the level-0 size (tifffile directly)."""
    y, x, h, w = description["source_region"]
    with tifffile.TiffFile(source) as tf:
        crop = tf.series[0].levels[0].asarray()[y : y + h, x : x + w]
    top = np.concatenate([crop, crop[:, ::-1]], axis=1)
    period = np.concatenate([top, top[::-1]], axis=0)
    reps = (-(-HEIGHT // period.shape[0]), -(-WIDTH // period.shape[1]), 1)
    return np.tile(period, reps)[:HEIGHT, :WIDTH]


def test_tifffile_reads_the_pyramid(slide, source):
    with tifffile.TiffFile(slide) as tf:
        assert tf.is_bigtiff
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(2000, 3000, 3), (1000, 1500, 3), (500, 750, 3)]
        page = tf.pages.first
        assert page.is_tiled
        assert (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert all(p.subfiletype == 1 for p in tf.pages[1:])
        description = json.loads(page.description)
    assert description["mpp"] == pytest.approx(0.499)
    assert description["source"] == str(source)


def test_our_reader_recovers_shape_and_mpp(slide):
    pyr = open_image(slide)
    try:
        assert pyr.backend == "tifffile"
        assert len(pyr.levels) == 3
        assert pyr.mpp == pytest.approx((0.499, 0.499))
        assert pyr.downsamples == [1.0, 2.0, 4.0]
    finally:
        pyr.close()


def test_openslide_reads_the_pyramid(slide):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(slide)) as osr:
        assert openslide.OpenSlide.detect_format(str(slide)) == "generic-tiff"
        assert osr.level_dimensions == ((3000, 2000), (1500, 1000), (750, 500))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.499)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.499)
        region = np.asarray(osr.read_region((1000, 500), 1, (300, 200)).convert("RGB"))
    with tifffile.TiffFile(slide) as tf:
        level1 = tf.series[0].levels[1].asarray()
    np.testing.assert_array_equal(region, level1[250:450, 500:800])


def test_pixels_are_the_mirrored_mosaic(slide, source):
    with tifffile.TiffFile(slide) as tf:
        description = json.loads(tf.pages.first.description)
        level0 = tf.series[0].levels[0].asarray()
        level1 = tf.series[0].levels[1].asarray()
    # compare brightness (chroma is 4:2:0 subsampled), and make sure a one-pixel
    # misalignment would be caught: its error is about three times larger
    expected = _expected_mosaic(source, description).astype(np.float32).mean(axis=-1)
    gray0 = level0.astype(np.float32).mean(axis=-1)
    error = np.abs(gray0 - expected).mean()
    assert error < 3.0  # JPEG q80 of an already JPEG-compressed source
    assert error < 0.5 * np.abs(gray0[1:] - expected[:-1]).mean()
    assert error < 0.5 * np.abs(gray0[:, 1:] - expected[:, :-1]).mean()
    halved = expected.reshape(HEIGHT // 2, 2, WIDTH // 2, 2).mean(axis=(1, 3))
    assert np.abs(level1.astype(np.float32).mean(axis=-1) - halved).mean() < 3.0
    # the mirror makes the mosaic seamless: no jump where the crop meets its reflection
    w = description["source_region"][3]
    seam = np.abs(gray0[:, w - 1] - gray0[:, w]).mean()
    inside = np.abs(gray0[:, w // 2] - gray0[:, w // 2 + 1]).mean()
    assert seam < 2 * inside + 2


def test_no_temporary_file_left(slide):
    assert sorted(p.name for p in slide.parent.iterdir()) == ["small.tif"]


def test_mpp_override_and_failure_leaves_nothing(tmp_path, source):
    out = make_slide(
        tmp_path / "x.tif",
        width=256,
        height=512,
        source=source,
        mpp=0.25,
        tile_size=128,
        quality=50,
    )
    with tifffile.TiffFile(out) as tf:
        assert [lv.shape for lv in tf.series[0].levels] == [(512, 256, 3)]
        assert json.loads(tf.pages.first.description)["mpp"] == 0.25
        assert "objective_power" not in json.loads(tf.pages.first.description)
        xres = tf.pages.first.tags["XResolution"].value
        assert 1e4 / (xres[0] / xres[1]) == pytest.approx(0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 100}, "width 100 is too small"),
        ({"height": 0}, "height 0 is too small"),
        ({"quality": 0}, "quality 0 is out of range"),
        ({"quality": 101}, "quality 101 is out of range"),
        ({"mpp": -1.0}, "mpp -1.0 is invalid"),
        ({"mpp": float("nan")}, "mpp nan is invalid"),
        ({"tile_size": 100}, "tile_size 100 is invalid"),
    ],
)
def test_bad_arguments(tmp_path, source, kwargs, match):
    args = {"width": 1024, "height": 1024, "source": source, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_slide(tmp_path / "bad.tif", **args)
    assert not list(tmp_path.iterdir())


def test_unreadable_source(tmp_path):
    from napari_histo_ai.errors import ImageReadError

    with pytest.raises(ImageReadError, match="no such file"):
        make_slide(tmp_path / "o.tif", width=512, height=512, source=tmp_path / "missing.svs")
    with pytest.raises(ValueError, match="does not exist"):
        make_slide(tmp_path / "no" / "o.tif", width=512, height=512, source=tmp_path)
