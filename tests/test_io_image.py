"""Pillow backend (``io/image.py``): real mammograms and H&E PNGs, synthetic files, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_histo_ai.errors import CorruptFileError, ImageReadError, UnsupportedFormatError
from napari_histo_ai.io import detect_backend, image, open_image

from .conftest import real
from .reader_contract import ReaderContract

MIAS_PGM = "mini_mias/mdb001.pgm"
MIAS_PNG = "mini_mias/mdb006.png"
BREAKHIS = "breakhis_resized/benign/100X/SOB_B_A-14-22549CD-100-023.png"
MICCAI_RGBA = "miccai_nuclei_seg/image01.png"


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB texture (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.sin(yy / 7.0) * np.cos(xx / 9.0) + rng.normal(0, 0.1, (h, w))
    img = np.stack([150 + 60 * base, 100 + 50 * base, 170 + 40 * base], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


# -- conformance on real files ------------------------------------------------------------
class _RealImage(ReaderContract):
    backend = "pillow"
    kind = "image"
    n_levels = 1
    relative = ""

    @pytest.fixture
    def path(self) -> Path:
        return real(self.relative)


class TestMiniMiasPgm(_RealImage):
    relative = MIAS_PGM
    shape0 = (1024, 1024)


class TestMiniMiasPng(_RealImage):
    relative = MIAS_PNG
    shape0 = (1024, 1024)


class TestBreakHisPng(_RealImage):
    relative = BREAKHIS
    shape0 = (328, 500, 3)


class TestMiccaiRgbaPng(_RealImage):
    relative = MICCAI_RGBA
    shape0 = (488, 643, 4)


@pytest.mark.parametrize(
    ("relative", "axes", "fmt"),
    [
        (MIAS_PGM, "YX", "pgm"),
        (MIAS_PNG, "YX", "png"),
        (BREAKHIS, "YXS", "png"),
        (MICCAI_RGBA, "YXS", "png"),
    ],
)
def test_real_pixels_equal_pillow(relative, axes, fmt):
    path = real(relative)
    pyr = open_image(path)
    assert pyr.axes == axes
    assert pyr.format == fmt
    assert pyr.mpp is None and pyr.mpp_source == "missing"
    assert pyr.levels[0].numblocks == (1,) * len(axes)
    with Image.open(path) as img:
        expected = np.asarray(img)
    got = pyr.levels[0].compute()
    assert got.dtype == expected.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


# -- synthetic files ---------------------------------------------------------------------------
def test_jpeg(tmp_path):
    path = tmp_path / "patch.jpg"
    Image.fromarray(_rgb()).save(path, quality=90)
    assert detect_backend(path) == "pillow"
    pyr = open_image(path)
    assert (pyr.format, pyr.axes, pyr.shape, pyr.mpp) == ("jpeg", "YXS", (48, 64, 3), None)
    with Image.open(path) as img:
        np.testing.assert_array_equal(pyr.levels[0].compute(), np.asarray(img))


def test_grey_jpeg_named_like_png_is_read_by_content(tmp_path, caplog):
    path = tmp_path / "odd.png"
    Image.fromarray(_rgb()[..., 0]).save(path, format="JPEG")
    pyr = open_image(path)
    assert (pyr.format, pyr.axes) == ("jpeg", "YX")


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "png"), (".pgm", "pgm")])
def test_16_bit_grey_is_uint16(tmp_path, suffix, fmt):
    data = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 50).astype(np.uint16)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(data).save(path)
    pyr = open_image(path)
    assert (pyr.format, pyr.axes, pyr.dtype) == (fmt, "YX", np.dtype("uint16"))
    np.testing.assert_array_equal(pyr.levels[0].compute(), data)


def test_ppm_and_bmp_rgb(tmp_path):
    data = _rgb()
    for suffix, fmt in ((".ppm", "ppm"), (".bmp", "bmp")):
        path = tmp_path / f"c{suffix}"
        Image.fromarray(data).save(path)
        pyr = open_image(path)
        assert (pyr.format, pyr.axes) == (fmt, "YXS")
        assert pyr.mpp is None  # BMP's default 96 dpi says nothing
        np.testing.assert_array_equal(pyr.levels[0].compute(), data)


def test_palette_la_and_bilevel_conversions(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    pyr = open_image(tmp_path / "p.png")
    assert (pyr.axes, pyr.shape) == ("YXS", (48, 64, 3))
    with Image.open(tmp_path / "p.png") as img:
        np.testing.assert_array_equal(pyr.levels[0].compute(), np.asarray(img.convert("RGB")))

    grey = rgb[..., 0]
    Image.fromarray(np.stack([grey, np.full_like(grey, 200)], -1), "LA").save(tmp_path / "la.png")
    pyr = open_image(tmp_path / "la.png")
    assert (pyr.axes, pyr.metadata["alpha_dropped"]) == ("YX", True)
    np.testing.assert_array_equal(pyr.levels[0].compute(), grey)

    Image.fromarray(grey > 128).save(tmp_path / "b.pbm")
    pyr = open_image(tmp_path / "b.pbm")
    assert (pyr.format, pyr.axes, pyr.dtype) == ("pbm", "YX", np.dtype("uint8"))
    np.testing.assert_array_equal(pyr.levels[0].compute(), np.where(grey > 128, 255, 0))


@pytest.mark.parametrize(
    ("fmt", "kwargs", "mpp"),
    [
        ("PNG", {"dpi": (254, 508)}, (50.0, 100.0)),  # pHYs in pixels per metre
        ("PNG", {"dpi": (72, 72)}, None),  # a default, not a measurement
        ("PNG", {"dpi": (96, 96)}, None),
        ("JPEG", {"dpi": (127, 127)}, (200.0, 200.0)),  # JFIF dots per inch
        ("JPEG", {"dpi": (72, 72)}, None),
        ("JPEG", {}, None),  # JFIF without units
    ],
)
def test_mpp_only_from_physical_resolution(tmp_path, fmt, kwargs, mpp):
    path = tmp_path / f"r.{fmt.lower()}"
    Image.fromarray(_rgb()).save(path, format=fmt, **kwargs)
    pyr = open_image(path)
    if mpp is None:
        assert pyr.mpp is None and pyr.mpp_source == "missing"
    else:
        assert pyr.mpp == pytest.approx(mpp, rel=1e-3)
        assert pyr.mpp_source == "file"


def test_jpeg_density_in_dots_per_cm():
    mpp = image._mpp_from_info("jpeg", {"jfif_unit": 2, "jfif_density": (50, 100)})
    assert mpp == pytest.approx((100.0, 200.0))  # 100 /cm = 100 µm; 50 /cm = 200 µm


def test_open_is_lazy(tmp_path, monkeypatch):
    path = tmp_path / "lazy.png"
    Image.fromarray(_rgb()).save(path)
    calls = []
    original = image._read_pixels
    monkeypatch.setattr(image, "_read_pixels", lambda *a: calls.append(a) or original(*a))
    pyr = open_image(path)
    assert calls == []
    pyr.levels[0][:4, :4].compute()
    assert len(calls) == 1


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_png_is_refused_at_open(tmp_path, keep):
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(128, 128)).save(good)
    blob = good.read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(CorruptFileError, match=r"cut\.png: cannot be decoded .*truncated"):
        open_image(bad)


def test_truncated_jpeg_is_refused_at_open(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_rgb(128, 128)).save(good)
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(good.read_bytes()[:-600])
    with pytest.raises(CorruptFileError, match=r"cut\.jpg: cannot be decoded"):
        open_image(bad)


def test_truncated_pgm_is_refused_at_open(tmp_path):
    good = real(MIAS_PGM)
    bad = tmp_path / "cut.pgm"
    bad.write_bytes(good.read_bytes()[:300_000])
    with pytest.raises(CorruptFileError, match=r"cut\.pgm: is truncated: 1024×1024 pixels"):
        open_image(bad)


def test_damage_after_open_fails_in_the_task_with_the_file_name(tmp_path):
    path = tmp_path / "later.png"
    Image.fromarray(_rgb(64, 64)).save(path)
    pyr = open_image(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=r"later\.png: cannot be decoded"):
        pyr.levels[0].compute()


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(_rgb(64, 64)).save(path)  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match=r"big\.png: is too large .*MAX_IMAGE_PIXELS"):
        open_image(path)


def test_between_one_and_two_times_the_limit_opens_without_warning(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    data = _rgb(64, 64)
    Image.fromarray(data).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # warnings are errors in pytest
    np.testing.assert_array_equal(open_image(path).levels[0].compute(), data)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 10)
    assert not image.sniff(path)
    with pytest.raises(UnsupportedFormatError, match=r"notes\.png: .*not a format"):
        open_image(path)
    with pytest.raises(UnsupportedFormatError, match="magic bytes"):
        image.open_pyramid(path)
