"""NIfTI backend (``io/nifti.py``): real BraTS FLAIR, synthetic volumes, damaged files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_histo_ai.errors import CorruptFileError, ImageReadError, UnsupportedFormatError
from napari_histo_ai.io import detect_backend, nifti, open_image

from .conftest import real
from .reader_contract import ReaderContract

FLAIR = "brats2015_mri/train/brats_2013_pat0005_1/Flair_subtrMeanDivStd.nii.gz"
FLAIR_VALIDATION = "brats2015_mri/validation/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"


def _save(
    path: Path,
    data: np.ndarray,
    *,
    zooms: tuple[float, ...] | None = None,
    units: str = "mm",
    slope: float | None = None,
    inter: float | None = None,
) -> Path:
    img = nib.Nifti1Image(data, np.eye(4))
    if zooms is not None:
        img.header.set_zooms(zooms)
    img.header.set_xyzt_units(xyz=units, t="sec")
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def _volume(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(100, 20, size=shape).astype(dtype)


@pytest.fixture(scope="module")
def series_4d(tmp_path_factory) -> Path:
    """A (X, Y, Z, T) = (20, 16, 12, 5) float32 series, zooms (1.25, 1.5, 2.5) mm, 3 s."""
    out = tmp_path_factory.mktemp("nifti4d") / "series.nii.gz"
    return _save(out, _volume((20, 16, 12, 5)), zooms=(1.25, 1.5, 2.5, 3.0))


# -- conformance ---------------------------------------------------------------------------
class TestRealFlair(ReaderContract):
    backend = "nibabel"
    kind = "volume"
    n_levels = 1
    shape0 = (155, 240, 240)
    spacing_mm = (1.0, 1.0, 1.0)

    @pytest.fixture
    def path(self) -> Path:
        return real(FLAIR)


class TestSynthetic4D(ReaderContract):
    backend = "nibabel"
    kind = "volume"
    n_levels = 1
    shape0 = (5, 12, 16, 20)
    spacing_mm = (2.5, 1.5, 1.25)

    @pytest.fixture
    def path(self, series_4d) -> Path:
        return series_4d


# -- real data -----------------------------------------------------------------------------
@pytest.mark.parametrize("relative", [FLAIR, FLAIR_VALIDATION])
def test_real_orientation_and_voxels_match_nibabel(relative):
    path = real(relative)
    pyr = open_image(path)
    assert pyr.axes == "ZYX"
    assert pyr.orientation == "SPL"  # file axes L, P, S reversed to (Z, Y, X)
    assert pyr.mpp is None
    img = nib.load(path)
    np.testing.assert_array_equal(pyr.affine, img.affine)
    expected = img.get_fdata()  # (X, Y, Z)
    level = pyr.levels[0]
    for z, y, x in [(77, 120, 120), (0, 0, 0), (154, 239, 239), (60, 100, 140), (90, 30, 200)]:
        assert float(level[z, y, x].compute()) == expected[x, y, z]
    np.testing.assert_array_equal(level[77].compute(), expected[:, :, 77].T)


def test_real_volume_is_chunked_in_z_slabs():
    pyr = open_image(real(FLAIR))
    chunks = pyr.levels[0].chunks
    assert chunks[1:] == ((240,), (240,))  # whole slices
    assert sum(chunks[0]) == 155 and len(chunks[0]) >= 2


# -- synthetic volumes -----------------------------------------------------------------------
def test_4d_series_values_and_axes(tmp_path):
    data = _volume((6, 5, 4, 3))
    pyr = open_image(_save(tmp_path / "s.nii.gz", data, zooms=(1.0, 1.0, 1.0, 2.0)))
    assert pyr.axes == "TZYX"
    assert pyr.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(pyr.levels[0].compute(), data.transpose(3, 2, 1, 0))
    assert pyr.metadata["time_step"] == 2.0
    assert pyr.layer_scale() == (1.0, 1.0, 1.0, 1.0)


def test_anisotropic_spacing_is_zyx(tmp_path):
    pyr = open_image(_save(tmp_path / "a.nii", _volume((10, 8, 6)), zooms=(0.5, 0.7, 3.0)))
    assert pyr.spacing_mm == pytest.approx((3.0, 0.7, 0.5))
    assert pyr.layer_scale() == pytest.approx((3.0, 0.7, 0.5))
    assert pyr.units == "mm"
    assert pyr.shape == (6, 8, 10)


@pytest.mark.parametrize(("units", "factor"), [("micron", 1e-3), ("meter", 1e3), ("mm", 1.0)])
def test_spacing_units_converted_to_mm(tmp_path, units, factor):
    path = _save(tmp_path / "u.nii", _volume((4, 4, 4)), zooms=(2.0, 4.0, 8.0), units=units)
    pyr = open_image(path)
    assert pyr.spacing_mm == pytest.approx((8.0 * factor, 4.0 * factor, 2.0 * factor))


def test_scaling_applied_as_nibabel_does(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _save(tmp_path / "scaled.nii", raw, slope=2.0, inter=-5.0)
    pyr = open_image(path)
    expected = np.asarray(nib.load(path).dataobj)
    assert pyr.dtype == expected.dtype
    assert pyr.dtype.kind == "f"
    np.testing.assert_array_equal(pyr.levels[0].compute(), expected.transpose(2, 1, 0))
    # array (z, y, x) = (0, 0, 1) is file voxel (1, 0, 0), stored as raw[1, 0, 0] = 30
    assert pyr.levels[0][0, 0, 1].compute() == pytest.approx(2.0 * 30 - 5.0)


def test_trailing_singleton_dimension_is_dropped(tmp_path):
    data = _volume((6, 5, 4, 1))
    pyr = open_image(_save(tmp_path / "t1.nii", data))
    assert pyr.axes == "ZYX"
    np.testing.assert_array_equal(pyr.levels[0].compute(), data[..., 0].T)


def test_uncompressed_chunks_are_small_slabs():
    assert nifti._slab_chunks((512, 512, 300), 4, 4 * 2**20) == (512, 512, 4)
    # 4D: whole volumes grouped while they fit
    assert nifti._slab_chunks((64, 64, 30, 200), 2, 32 * 2**20) == (64, 64, 30, 100)
    # balanced blocks instead of one big chunk and a sliver
    assert nifti._slab_chunks((240, 240, 155), 4, 32 * 2**20) == (240, 240, 78)


def test_middle_slice_nan_but_data_elsewhere_is_accepted(tmp_path):
    data = _volume((8, 8, 9))
    data[:, :, 4] = np.nan
    pyr = open_image(_save(tmp_path / "partial.nii", data))
    assert np.isnan(pyr.levels[0][4].compute()).all()


def test_sniff_reads_only_the_header(tmp_path):
    path = _save(tmp_path / "v.nii.gz", _volume((4, 4, 4)))
    assert nifti.sniff(path)
    assert detect_backend(path) == "nibabel"
    other = tmp_path / "notes.gz"
    with gzip.open(other, "wb") as fh:
        fh.write(b"hello " * 200)
    assert not nifti.sniff(other)
    assert not nifti.sniff(tmp_path)
    assert not nifti.sniff(tmp_path / "missing.nii")


# -- bad input -------------------------------------------------------------------------------
def test_2d_nifti_is_refused(tmp_path):
    path = _save(tmp_path / "flat.nii", _volume((32, 24)))
    with pytest.raises(ImageReadError, match=r"expected a 3D or 4D volume, found shape \(32, 24\)"):
        open_image(path)
    with pytest.raises(ImageReadError, match=r"flat\.nii"):
        open_image(path)


def test_nan_filled_volume_is_refused(tmp_path):
    path = _save(tmp_path / "nan.nii.gz", np.full((16, 16, 8), np.nan, dtype=np.float32))
    with pytest.raises(CorruptFileError, match="every sampled voxel is NaN") as info:
        open_image(path)
    assert "nan.nii.gz" in str(info.value)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.999])
def test_truncated_nii_gz_is_refused_at_open(tmp_path, keep):
    good = _save(tmp_path / "good.nii.gz", _volume((32, 32, 20)))
    blob = good.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz: .*(truncated|damaged)"):
        open_image(bad)


def test_truncated_nii_is_refused_at_open(tmp_path):
    good = _save(tmp_path / "good.nii", _volume((32, 32, 20)))
    bad = tmp_path / "cut.nii"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError, match=r"cut\.nii: is truncated"):
        open_image(bad)


def test_wrong_magic(tmp_path):
    good = _save(tmp_path / "good.nii", _volume((4, 4, 4)))
    blob = bytearray(good.read_bytes())
    blob[344:348] = b"xxxx"
    bad = tmp_path / "bad.nii"
    bad.write_bytes(bytes(blob))
    assert not nifti.sniff(bad)
    with pytest.raises(UnsupportedFormatError, match=r"bad\.nii: .*name ends like a NIfTI"):
        open_image(bad)
    with pytest.raises(UnsupportedFormatError, match="n\\+1"):
        nifti.open_pyramid(bad)


def test_read_error_in_a_chunk_names_the_file(tmp_path):
    class Failing:
        shape = (4, 4, 4)

        def __getitem__(self, key):
            raise EOFError("Compressed file ended before the end-of-stream marker")

    slabs = nifti._ProxySlabs(Failing(), tmp_path / "x.nii.gz", np.dtype("float32"))
    with pytest.raises(CorruptFileError, match=r"x\.nii\.gz: voxel data could not be read"):
        slabs[0:1]
