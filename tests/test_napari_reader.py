"""The npe2 reader contract and Pyramid -> layer data tuples."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from napari_histo_ai._napari.layers import (
    PYRAMID_KEY,
    contrast_limits,
    pyramid_to_layer_data,
)
from napari_histo_ai._napari.reader import get_reader, read_paths
from napari_histo_ai._napari.sample import cmu1_small_region, sample_path
from napari_histo_ai.errors import ImageReadError
from napari_histo_ai.io import Pyramid

from .conftest import real

SAMPLE = sample_path()


def _never_computed(shape, chunks, dtype="uint16"):
    """A dask array that fails the test if any of its chunks is read."""

    def boom(block):
        raise AssertionError("level 0 was read")

    return da.zeros(shape, chunks=chunks, dtype=dtype).map_blocks(boom, dtype=dtype)


# -- get_reader: cheap, never raises ----------------------------------------------------
@pytest.fixture
def garbage(tmp_path: Path) -> dict[str, Path]:
    files = {
        "junk.svs": b"this is not a slide at all" * 10,
        "junk.png": b"\x00\x01\x02 not a png",
        "empty.tif": b"",
        "notes.nii.gz": b"gzip? no",
    }
    out = {}
    for name, content in files.items():
        p = tmp_path / name
        p.write_bytes(content)
        out[name] = p
    (tmp_path / "plain.zarr").mkdir()
    out["plain.zarr"] = tmp_path / "plain.zarr"
    return out


@pytest.mark.parametrize(
    "name", ["junk.svs", "junk.png", "empty.tif", "notes.nii.gz", "plain.zarr"]
)
def test_get_reader_declines_garbage(garbage, name):
    assert get_reader(str(garbage[name])) is None


@pytest.mark.parametrize(
    "path",
    [
        "/no/such/file.svs",
        "",
        [],
        None,
        42,
        ["/no/such/file.svs"],
        [str(SAMPLE), "/no/such/file.svs"],
        "\x00bad",
    ],
)
def test_get_reader_returns_none_never_raises(path):
    assert get_reader(path) is None


def test_get_reader_accepts_the_sample():
    assert callable(get_reader(str(SAMPLE)))
    assert callable(get_reader([str(SAMPLE)]))
    assert callable(get_reader(SAMPLE))


def test_reader_function_raises_our_error(tmp_path):
    gone = tmp_path / "gone.svs"
    with pytest.raises(ImageReadError, match=r"gone\.svs"):
        read_paths(str(gone))


# -- layer data tuples ------------------------------------------------------------------
def test_sample_layer_data():
    (data, kwargs, layer_type) = cmu1_small_region()[0]
    assert layer_type == "image"
    assert isinstance(data, da.Array), "the level stays lazy"
    assert data.shape == (2967, 2220, 3)
    assert kwargs["rgb"] is True
    assert kwargs["multiscale"] is False  # one level only
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["units"] == ("um", "um")
    assert kwargs["name"] == "CMU-1-Small-Region.svs"
    assert "contrast_limits" not in kwargs  # uint8 RGB needs none
    meta = kwargs["metadata"]
    assert meta["path"] == str(SAMPLE)
    assert meta["backend"] == "tifffile"
    assert meta["format"] == "aperio-svs"
    assert meta["mpp"] == pytest.approx([0.499, 0.499])
    assert meta["mpp_source"] == "file"
    assert meta["objective_power"] == 20
    assert meta["spacing_mm"] is None
    assert isinstance(meta[PYRAMID_KEY], Pyramid)


def test_multilevel_slide_without_mpp_is_multiscale_in_pixels():
    (data, kwargs, _) = read_paths(real("wsi/TCGA-CR-7395-01A-01-TS1.svs"))[0]
    assert kwargs["multiscale"] is True
    assert [lv.shape for lv in data] == [(3567, 4443, 3), (1783, 2221, 3)]
    assert kwargs["scale"] == (1.0, 1.0)
    assert kwargs["units"] == ("pixel", "pixel")
    assert kwargs["metadata"]["mpp_source"] == "missing"


def test_ndpi_four_levels():
    (data, kwargs, _) = read_paths(real("wsi/test3-TRITC-2-560.ndpi"))[0]
    assert kwargs["multiscale"] is True and len(data) == 4
    assert kwargs["scale"] == pytest.approx((0.22817, 0.22817), rel=1e-4)


def test_multichannel_pyramid_is_split_and_contrast_comes_from_the_smallest_level():
    small = da.from_array(np.arange(2 * 8 * 8, dtype="uint16").reshape(2, 8, 8), chunks=4)
    big = _never_computed((2, 64, 64), chunks=(1, 32, 32))
    pyr = Pyramid(
        [big, small],
        axes="SYX",
        kind="image",
        path="/x/two.tif",
        format="tiff",
        backend="tifffile",
        mpp=(0.5, 0.5),
    )
    out = pyramid_to_layer_data(pyr)
    assert [kw["name"] for _, kw, _ in out] == ["two.tif [0]", "two.tif [1]"]
    assert [kw["colormap"] for _, kw, _ in out] == ["magenta", "green"]
    assert out[0][1]["contrast_limits"] == (0.0, 63.0)
    assert out[1][1]["contrast_limits"] == (64.0, 127.0)
    for data, kw, _ in out:
        assert [lv.shape for lv in data] == [(64, 64), (8, 8)]
        assert kw["scale"] == (0.5, 0.5) and kw["rgb"] is False
        assert kw["metadata"][PYRAMID_KEY] is pyr


def test_volume_scale_in_mm():
    vol = da.from_array(np.linspace(-1, 3, 4 * 6 * 5, dtype="float32").reshape(4, 6, 5))
    pyr = Pyramid(
        [vol],
        axes="ZYX",
        kind="volume",
        path="/x/brain.nii.gz",
        format="nifti",
        backend="nibabel",
        spacing_mm=(2.0, 1.0, 0.5),
        orientation="SPL",
    )
    ((_, kwargs, _),) = pyramid_to_layer_data(pyr)
    assert kwargs["scale"] == (2.0, 1.0, 0.5)
    assert kwargs["units"] == ("mm", "mm", "mm")
    assert kwargs["contrast_limits"] == pytest.approx((-1.0, 3.0))
    assert kwargs["metadata"]["orientation"] == "SPL"
    assert kwargs["name"] == "brain.nii.gz"


def test_contrast_of_a_huge_single_level_reads_a_crop_only():
    calls = []

    def block(block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.full(block_info[None]["chunk-shape"], 7, dtype="uint16")

    level = da.map_blocks(block, chunks=((1024,) * 16, (1024,) * 16), dtype="uint16")
    pyr = Pyramid(
        [level], axes="YX", kind="image", path="/x/big.tif", format="tiff", backend="tifffile"
    )
    assert contrast_limits(pyr) == (7.0, 8.0)
    assert len(calls) <= 9  # a 2048² central crop touches at most 3×3 chunks of 1024²


# -- through napari -----------------------------------------------------------------------
@pytest.mark.gui
def test_viewer_open_with_plugin(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(str(SAMPLE), plugin="napari-histo-ai")
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert isinstance(layer.metadata[PYRAMID_KEY], Pyramid)


@pytest.mark.gui
def test_sample_data_command(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-histo-ai", "cmu1_small_region")
    assert len(viewer.layers) == 1
    assert tuple(viewer.layers[0].scale) == pytest.approx((0.499, 0.499))


@pytest.mark.gui
def test_a_ten_gigapixel_pyramid_opens_without_reading_level_0(make_napari_viewer):
    from collections import Counter

    from napari_histo_ai._napari.layers import add_layer_data, scale_bar

    reads: Counter[int] = Counter()

    def level(side: int, index: int) -> da.Array:
        def block(block_info=None):
            reads[index] += 1
            return np.full(block_info[None]["chunk-shape"], 200, dtype="uint8")

        n = side // 512
        return da.map_blocks(block, chunks=((512,) * n, (512,) * n, (3,)), dtype="uint8")

    levels = [level(100_352 >> k, k) for k in range(7)]  # 100k² RGB down to 1.5k²
    pyr = Pyramid(
        levels,
        axes="YXS",
        kind="slide",
        path="/x/huge.svs",
        format="aperio-svs",
        backend="tifffile",
        mpp=(0.25, 0.25),
    )
    viewer = make_napari_viewer()
    (layer,) = add_layer_data(viewer, pyramid_to_layer_data(pyr))
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == (0.25, 0.25)
    assert scale_bar(viewer).visible
    assert reads[0] <= 4, f"{reads[0]} level-0 tiles read at open"


@pytest.mark.gui
def test_volume_and_channels_through_the_viewer(make_napari_viewer):
    from napari_histo_ai._napari.layers import add_layer_data

    vol = da.from_array(np.arange(4 * 6 * 5, dtype="int16").reshape(4, 6, 5))
    volume = Pyramid(
        [vol],
        axes="ZYX",
        kind="volume",
        path="/x/t1.nii.gz",
        format="nifti",
        backend="nibabel",
        spacing_mm=(3.0, 1.0, 1.0),
    )
    stack = da.from_array(np.ones((3, 16, 16), dtype="uint16"))
    channels = Pyramid(
        [stack],
        axes="SYX",
        kind="image",
        path="/x/c.ome.tif",
        format="ome-tiff",
        backend="tifffile",
        mpp=(0.65, 0.65),
    )
    viewer = make_napari_viewer()
    (vlayer,) = add_layer_data(viewer, pyramid_to_layer_data(volume))
    assert vlayer.ndim == 3 and tuple(vlayer.scale) == (3.0, 1.0, 1.0)
    assert [str(u) for u in vlayer.units] == ["millimeter"] * 3
    clayers = add_layer_data(viewer, pyramid_to_layer_data(channels))
    assert [lyr.name for lyr in clayers] == ["c.ome.tif [0]", "c.ome.tif [1]", "c.ome.tif [2]"]
    assert all(lyr.ndim == 2 and tuple(lyr.scale) == (0.65, 0.65) for lyr in clayers)


@pytest.mark.gui
def test_ome_zarr_folder_opens_as_named_channels(make_napari_viewer, tmp_path):
    import json

    from .test_io_ome_zarr import write_ngff

    root = tmp_path / "fluo.ome.zarr"
    data = np.arange(2 * 64 * 96, dtype="uint16").reshape(2, 64, 96)
    axes = [("c", "channel", None), ("y", "space", "micrometer"), ("x", "space", "micrometer")]
    write_ngff(root, data, axes, version="0.5", n_levels=2, scale0=[1.0, 0.325, 0.325])
    attrs = json.loads((root / "zarr.json").read_text())
    attrs["attributes"]["ome"]["omero"] = {"channels": [{"label": "DAPI"}, {"label": "CD8"}]}
    (root / "zarr.json").write_text(json.dumps(attrs))

    assert callable(get_reader(str(root)))
    viewer = make_napari_viewer()
    layers = viewer.open(str(root), plugin="napari-histo-ai")
    assert [lyr.name for lyr in layers] == ["fluo.ome.zarr [DAPI]", "fluo.ome.zarr [CD8]"]
    for lyr in layers:
        assert lyr.multiscale and not lyr.rgb
        assert tuple(lyr.scale) == pytest.approx((0.325, 0.325))
