"""tifffile backend: the reader contract on real slides and generated pyramids, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_histo_ai.errors import CorruptFileError, ImageReadError, UnsupportedFormatError
from napari_histo_ai.io import open_image

from .conftest import real
from .reader_contract import ReaderContract

# --------------------------------------------------------------------- synthetic data


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, H&E-coloured RGB texture (compresses like tissue, unlike white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.sin(yy / 17.0) * np.cos(xx / 23.0) + rng.normal(0, 0.2, (h, w))
    img = np.stack([200 + 40 * base, 120 + 60 * base, 180 + 40 * base], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _levels(img: np.ndarray, n: int) -> list[np.ndarray]:
    out = [img]
    for _ in range(n - 1):
        out.append(out[-1][::2, ::2])
    return out


MPP = 0.25
RES = (1e4 / MPP, 1e4 / MPP)


def write_page_pyramid(path: Path, *, compression: str = "jpeg") -> Path:
    """Levels as separate pages, reduced ones marked ``subfiletype=1`` (OpenSlide's layout)."""
    levels = _levels(_texture(1000, 1300), 3)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, lv in enumerate(levels):
            tw.write(
                lv,
                tile=(128, 128),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if i else 0,
                resolution=(RES[0] / 2**i, RES[1] / 2**i),
                resolutionunit="CENTIMETER",
            )
    return path


def write_subifd_pyramid(path: Path) -> Path:
    levels = _levels(_texture(900, 1200, 1), 3)
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0],
            tile=(128, 128),
            compression="zlib",
            photometric="rgb",
            subifds=len(levels) - 1,
            resolution=RES,
            resolutionunit="CENTIMETER",
        )
        for i, lv in enumerate(levels[1:], 1):
            tw.write(
                lv,
                tile=(128, 128),
                compression="zlib",
                photometric="rgb",
                subfiletype=1,
                resolution=(RES[0] / 2**i, RES[1] / 2**i),
                resolutionunit="CENTIMETER",
            )
    return path


def write_ome_pyramid(path: Path) -> Path:
    levels = _levels(_texture(800, 1000, 2), 3)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0],
            tile=(128, 128),
            compression="zlib",
            photometric="rgb",
            subifds=2,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": 0.5,
                "PhysicalSizeY": 0.5,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm",
            },
        )
        for lv in levels[1:]:
            tw.write(lv, tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1)
    return path


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiff")


# ----------------------------------------------------------------------- the contract


class TestCMU1(ReaderContract):
    backend, kind, n_levels = "tifffile", "slide", 1
    shape0 = (2967, 2220, 3)
    mpp, objective_power = (0.499, 0.499), 20.0

    @pytest.fixture
    def path(self):
        return real("wsi/CMU-1-Small-Region.svs")

    def test_svs_metadata(self, pyramid):
        assert pyramid.format == "aperio-svs"
        assert pyramid.vendor == "aperio"
        assert set(pyramid.associated) == {"label", "macro", "thumbnail"}
        assert pyramid.associated["label"]().shape == (463, 387, 3)

    def test_pixels_equal_full_decode(self, pyramid, path):
        full = tifffile.imread(path)
        np.testing.assert_array_equal(
            np.asarray(pyramid.levels[0][300:900, 250:1000]), full[300:900, 250:1000]
        )

    def test_chunks_are_native_tiles(self, pyramid):
        assert pyramid.levels[0].chunksize == (240, 240, 3)


class TestTCGAJpeg2000NoMpp(ReaderContract):
    backend, kind, n_levels = "tifffile", "slide", 2
    shape0 = (3567, 4443, 3)
    mpp, objective_power = None, None

    @pytest.fixture
    def path(self):
        return real("wsi/TCGA-CR-7395-01A-01-TS1.svs")

    def test_missing_mpp_is_reported_not_invented(self, pyramid):
        assert pyramid.mpp is None
        assert pyramid.info()["mpp"] is None
        assert pyramid.units == "pixel"
        assert pyramid.layer_scale() == (1.0, 1.0)

    def test_user_sets_mpp(self, pyramid):
        pyramid.set_mpp(0.5)
        assert pyramid.mpp_source == "user"
        assert pyramid.layer_scale() == (0.5, 0.5)
        assert pyramid.level_mpp(1)[1] == pytest.approx(0.5 * 4443 / 2221)


class TestNDPI(ReaderContract):
    backend, kind, n_levels = "tifffile", "slide", 4
    shape0 = (4864, 3968, 3)
    mpp, objective_power = (0.22817, 0.22817), 40.0

    @pytest.fixture
    def path(self):
        return real("wsi/test3-TRITC-2-560.ndpi")

    def test_mcu_strips_are_merged_for_dask(self, pyramid):
        rows = pyramid.levels[0].chunksize[0]
        assert rows >= 256 and rows % 8 == 0
        assert pyramid.vendor == "hamamatsu"
        assert "macro" in pyramid.associated


class TestPagePyramid(ReaderContract):
    backend, kind, n_levels = "tifffile", "slide", 3
    shape0 = (1000, 1300, 3)
    mpp = (MPP, MPP)

    @pytest.fixture
    def path(self, synth_dir):
        p = synth_dir / "pages.tif"
        return p if p.exists() else write_page_pyramid(p)


class TestSubIFDPyramid(ReaderContract):
    backend, kind, n_levels = "tifffile", "slide", 3
    shape0 = (900, 1200, 3)
    mpp = (MPP, MPP)

    @pytest.fixture
    def path(self, synth_dir):
        p = synth_dir / "subifds.tif"
        return p if p.exists() else write_subifd_pyramid(p)

    def test_lossless_pixels(self, pyramid, path):
        with tifffile.TiffFile(path) as tf:
            lvl1 = tf.series[0].levels[1].asarray()
        np.testing.assert_array_equal(np.asarray(pyramid.levels[1]), lvl1)


class TestOmeTiffPyramid(ReaderContract):
    backend, kind, n_levels = "tifffile", "slide", 3
    shape0 = (800, 1000, 3)
    mpp = (0.5, 0.5)

    @pytest.fixture
    def path(self, synth_dir):
        p = synth_dir / "pyr.ome.tif"
        return p if p.exists() else write_ome_pyramid(p)

    def test_format(self, pyramid):
        assert pyramid.format == "ome-tiff"


# ------------------------------------------------------------------------- behaviour


def test_plain_strip_tiff_is_an_image(tmp_path):
    p = tmp_path / "patch.tif"
    img = _texture(50, 50)
    tifffile.imwrite(p, img, photometric="rgb")
    pyr = open_image(p)
    assert pyr.kind == "image" and pyr.mpp is None
    np.testing.assert_array_equal(np.asarray(pyr.levels[0]), img)


def test_grayscale_tiff_has_no_channel_axis(tmp_path):
    p = tmp_path / "gray.tif"
    tifffile.imwrite(p, np.arange(64 * 80, dtype=np.uint16).reshape(64, 80), tile=(32, 32))
    pyr = open_image(p)
    assert pyr.axes == "YX" and pyr.channel_axis is None
    assert pyr.info()["levels"] == [[64, 80, 1]]


def test_default_72_dpi_is_not_an_mpp(tmp_path):
    p = tmp_path / "dpi.tif"
    tifffile.imwrite(
        p, _texture(64, 64), photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    assert open_image(p).mpp is None


def test_level_for_mpp(synth_dir):
    p = synth_dir / "pages.tif"
    if not p.exists():
        write_page_pyramid(p)
    pyr = open_image(p)
    assert pyr.best_level_for_mpp(0.25) == 0
    assert pyr.best_level_for_mpp(0.5) == 1
    assert pyr.best_level_for_mpp(0.9) == 1
    assert pyr.best_level_for_mpp(4.0) == 2


# ------------------------------------------------------------------------- bad input


def test_truncated_tiff_is_a_clean_error(tmp_path, synth_dir):
    src = synth_dir / "pages.tif"
    if not src.exists():
        write_page_pyramid(src)
    data = src.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        open_image(bad)
    assert str(bad) in str(err.value)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_truncated_real_svs(tmp_path):
    data = real("wsi/CMU-1-Small-Region.svs").read_bytes()
    bad = tmp_path / "cmu-truncated.svs"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageReadError, match=r"cmu-truncated\.svs"):
        open_image(bad)


def test_tiff_with_no_tiles(tmp_path, synth_dir):
    """Tile offsets and byte counts all zero: the writer never wrote the pixels."""
    src = synth_dir / "subifds.tif"
    if not src.exists():
        write_subifd_pyramid(src)
    bad = tmp_path / "notiles.tif"
    bad.write_bytes(src.read_bytes())
    with tifffile.TiffFile(bad, mode="r+b") as tf:
        page = tf.pages.first
        n = len(page.dataoffsets)
        page.tags["TileOffsets"].overwrite([0] * n)
        page.tags["TileByteCounts"].overwrite([0] * n)
    with pytest.raises(CorruptFileError, match="no image data"):
        open_image(bad)


def test_corrupt_tile_is_a_clean_error_at_read(tmp_path, synth_dir):
    src = synth_dir / "subifds.tif"
    if not src.exists():
        write_subifd_pyramid(src)
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        off, cnt = tf.pages.first.dataoffsets[0], tf.pages.first.databytecounts[0]
    data[off : off + cnt] = b"\xff" * cnt
    bad = tmp_path / "badtile.tif"
    bad.write_bytes(bytes(data))
    pyr = open_image(bad)
    with pytest.raises(CorruptFileError, match="could not be decoded"):
        np.asarray(pyr.levels[0][:64, :64])
    # the rest of the slide stays readable
    assert np.asarray(pyr.levels[0][512:600, 512:600]).shape == (88, 88, 3)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        open_image(p)


def test_missing_path(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        open_image(tmp_path / "nowhere.svs")


def test_wrong_extension_unknown_content(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    with pytest.raises(UnsupportedFormatError) as err:
        open_image(p)
    assert "notes.svs" in str(err.value) and "TIFF/SVS/NDPI" in str(err.value)


def test_wrong_extension_known_content_opens_by_content(tmp_path, caplog):
    p = tmp_path / "really-a-tiff.png"
    tifffile.imwrite(p, _texture(40, 40), photometric="rgb")
    with caplog.at_level(logging.WARNING):
        pyr = open_image(p)
    assert pyr.backend == "tifffile"
    assert "name suggests a PNG/JPEG/PGM file" in caplog.text


def test_folder_that_is_not_ome_zarr(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UnsupportedFormatError, match="not an OME-Zarr"):
        open_image(tmp_path)


def test_unknown_backend():
    with pytest.raises(UnsupportedFormatError, match="unknown backend"):
        open_image(real("wsi/CMU-1-Small-Region.svs"), backend="magic")


def test_damaged_samples_per_pixel_is_refused_not_allocated(tmp_path):
    """Found by the fuzzer: an NDPI whose SamplesPerPixel reads 16705 would need 17 GB
    chunks; it is refused at open instead of exhausting memory at the first read."""
    bad = tmp_path / "spp.ndpi"
    bad.write_bytes(real("wsi/test3-TRITC-2-560.ndpi").read_bytes())
    with tifffile.TiffFile(bad, mode="r+b") as tf:
        tf.pages.first.tags["SamplesPerPixel"].overwrite(16705)
    with pytest.raises(CorruptFileError, match=r"pieces of .* GiB"):
        open_image(bad)


def test_zarr_path_for_a_z_stack(tmp_path):
    """Multi-page stacks go through tifffile's zarr store; pixels match tifffile."""
    stack = np.stack([_texture(96, 128, z)[..., 0] for z in range(4)])
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, stack, tile=(32, 32), compression="zlib", photometric="minisblack")
    pyr = open_image(p)
    assert pyr.axes == "ZYX" and pyr._read_region is None
    np.testing.assert_array_equal(np.asarray(pyr.levels[0]), stack)


@pytest.mark.parametrize(
    "name", ["CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs", "test3-TRITC-2-560.ndpi"]
)
def test_direct_decoder_equals_tifffile_zarr_store(name):
    """The direct tile decoder gives exactly the pixels of tifffile's own zarr store."""
    import zarr

    path = real(f"wsi/{name}")
    pyr = open_image(path)
    with tifffile.TiffFile(path) as tf:
        for level in range(len(pyr.levels)):
            ref = zarr.open_array(tf.series[0].aszarr(level=level), mode="r")
            h, w = ref.shape[:2]
            for top, left in [(0, 0), (h // 3, w // 2), (max(0, h - 300), max(0, w - 300))]:
                expected = ref[top : top + 300, left : left + 300]
                got = pyr.read_region((top, left), expected.shape[:2], level=level)
                np.testing.assert_array_equal(got, expected)
                np.testing.assert_array_equal(
                    np.asarray(pyr.levels[level][top : top + 300, left : left + 300]), expected
                )


def test_read_region_pads_outside_the_image():
    pyr = open_image(real("wsi/CMU-1-Small-Region.svs"))
    h = pyr.spatial_shape(0)[0]
    region = pyr.read_region((h - 100, -50), (200, 150), fill_value=255)
    assert region.shape == (200, 150, 3)
    assert (region[100:] == 255).all() and (region[:, :50] == 255).all()
    np.testing.assert_array_equal(region[:100, 50:], np.asarray(pyr.levels[0][h - 100 :, :100]))
    assert (pyr.read_region((-500, -500), (10, 10)) == 0).all()
    with pytest.raises(ValueError, match="level 3 does not exist"):
        pyr.read_region((0, 0), (10, 10), level=3)


def test_tile_cache_is_bounded():
    from napari_histo_ai.io.tiff import TileCache

    cache = TileCache(max_bytes=4000)
    for i in range(10):
        cache.put((0, i), np.zeros(1000, np.uint8))
    assert cache.bytes <= 4000
    assert cache.get((0, 9)) is not None and cache.get((0, 0)) is None


def test_file_descriptor_closes_with_the_last_reader(tmp_path):
    """Layers never call close(): no descriptor on the file survives its last reader."""
    import gc

    def open_on(path: Path) -> int:
        links = [fd.resolve() for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink()]
        return sum(link == path.resolve() for link in links)

    p = tmp_path / "fd.tif"
    tifffile.imwrite(p, _texture(256, 256), tile=(128, 128), photometric="rgb")
    pyr = open_image(p)
    np.asarray(pyr.levels[0][:10, :10])
    assert open_on(p) >= 1
    pyr._close = None  # as if nobody ever calls close()
    del pyr
    gc.collect()
    assert open_on(p) == 0
