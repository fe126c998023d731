"""OME-Zarr backend (``io/ome_zarr.py``): NGFF 0.4 (zarr v2) and 0.5 (zarr v3) written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from napari_histo_ai.errors import CorruptFileError, UnsupportedFormatError
from napari_histo_ai.io import detect_backend, ome_zarr, open_image

from .reader_contract import ReaderContract

# -- writing NGFF ------------------------------------------------------------------------------
Axis = tuple[str, str, str | None]  # name, type, unit
UM = "micrometer"


def _texture(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, size=shape)
    ramp = np.indices(shape).sum(axis=0) % 37
    data = 100 + 3 * ramp + 10 * noise
    return np.clip(data, 0, np.iinfo(dtype).max).astype(dtype)


def write_ngff(
    root: Path,
    data: np.ndarray,
    axes: list[Axis],
    *,
    version: str,
    n_levels: int = 3,
    scale0: list[float] | None = None,
    chunks: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """Write ``data`` and ``n_levels - 1`` 2× downsamples (in y and x) as OME-Zarr.

    NGFF 0.4 is written as zarr v2 (``.zattrs``), 0.5 as zarr v3 (``zarr.json`` with
    ``attributes["ome"]``). Returns the level arrays as written.
    """
    fmt = 3 if version == "0.5" else 2
    group = zarr.open_group(str(root), mode="w", zarr_format=fmt)
    names = [a[0] for a in axes]
    yx = [names.index("y"), names.index("x")]
    scale0 = scale0 or [1.0] * data.ndim
    levels, datasets = [], []
    for i in range(n_levels):
        index = tuple(slice(None, None, 2**i) if d in yx else slice(None) for d in range(data.ndim))
        level = np.ascontiguousarray(data[index])
        kwargs: dict[str, Any] = {"chunks": chunks or tuple(min(32, s) for s in level.shape)}
        if shards is not None:
            kwargs["shards"] = shards if i == 0 else None
        if fmt == 3:
            kwargs["dimension_names"] = names
        group.create_array(str(i), shape=level.shape, dtype=level.dtype, **kwargs)[:] = level
        levels.append(level)
        scale = [s * (2**i if d in yx else 1) for d, s in enumerate(scale0)]
        translation = [(2**i - 1) / 2 * s if d in yx else 0.0 for d, s in enumerate(scale0)]
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    axes_json = []
    for name, kind, unit in axes:
        entry = {"name": name, "type": kind}
        if unit:
            entry["unit"] = unit
        axes_json.append(entry)
    multiscale = {"name": root.stem, "axes": axes_json, "datasets": datasets}
    multiscale.update(extra or {})
    if fmt == 3:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    else:
        group.attrs["multiscales"] = [{"version": version, **multiscale}]
    return levels


YXC = [("y", "space", UM), ("x", "space", UM), ("c", "channel", None)]
ZYX = [("z", "space", UM), ("y", "space", UM), ("x", "space", UM)]


@pytest.fixture(scope="module")
def rgb_04(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """NGFF 0.4 RGB slide, axes y, x, c: (256, 320, 3) uint8, 0.5 µm/px, 3 levels."""
    root = tmp_path_factory.mktemp("ngff") / "rgb.ome.zarr"
    data = _texture((256, 320, 3), "uint8")
    return root, write_ngff(root, data, YXC, version="0.4", scale0=[0.5, 0.5, 1.0])


@pytest.fixture(scope="module")
def volume_05(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """NGFF 0.5 volume, axes z, y, x: (16, 96, 128) uint16, 2 × 0.5 × 0.5 µm, 3 levels."""
    root = tmp_path_factory.mktemp("ngff") / "volume.ome.zarr"
    data = _texture((16, 96, 128), "uint16", seed=1)
    return root, write_ngff(root, data, ZYX, version="0.5", scale0=[2.0, 0.5, 0.5])


# -- conformance -----------------------------------------------------------------------------
class TestRgbNgff04(ReaderContract):
    backend = "ome-zarr"
    kind = "slide"
    n_levels = 3
    shape0 = (256, 320, 3)
    mpp = (0.5, 0.5)

    @pytest.fixture
    def path(self, rgb_04) -> Path:
        return rgb_04[0]


class TestVolumeNgff05(ReaderContract):
    backend = "ome-zarr"
    kind = "volume"
    n_levels = 3
    shape0 = (16, 96, 128)
    mpp = (0.5, 0.5)
    spacing_mm = (0.002, 0.0005, 0.0005)

    @pytest.fixture
    def path(self, volume_05) -> Path:
        return volume_05[0]


# -- values, axes, scale ---------------------------------------------------------------------
def test_rgb_levels_equal_what_was_written(rgb_04):
    root, written = rgb_04
    pyr = open_image(root)
    assert (pyr.axes, pyr.format, pyr.metadata["ngff_version"]) == ("YXS", "ome-zarr", "0.4")
    for level, expected in zip(pyr.levels, written, strict=True):
        np.testing.assert_array_equal(level.compute(), expected)
    assert pyr.level_mpp(2) == pytest.approx((2.0, 2.0))
    assert pyr.metadata["scale"][1] == [1.0, 1.0, 1.0]
    assert pyr.metadata["translation"][1] == [0.25, 0.25, 0.0]


def test_volume_levels_and_native_chunks(volume_05):
    root, written = volume_05
    pyr = open_image(root)
    assert (pyr.axes, pyr.metadata["zarr_format"], pyr.metadata["ngff_version"]) == (
        "ZYX",
        3,
        "0.5",
    )
    for level, expected in zip(pyr.levels, written, strict=True):
        np.testing.assert_array_equal(level.compute(), expected)
    assert pyr.levels[0].chunksize == (16, 32, 32)
    assert pyr.layer_scale() == pytest.approx((0.002, 0.0005, 0.0005))


def test_channel_first_fluorescence_without_units(tmp_path):
    """CYX uint16 with 2 channels stays channel-first; no units → no mpp, kind image."""
    root = tmp_path / "fluo.zarr"
    data = _texture((2, 64, 96), "uint16")
    axes = [("c", "channel", None), ("y", "space", None), ("x", "space", None)]
    write_ngff(root, data, axes, version="0.5", n_levels=2)
    attrs = json.loads((root / "zarr.json").read_text())
    attrs["attributes"]["ome"]["omero"] = {"channels": [{"label": "DAPI"}, {"label": "CD8"}]}
    (root / "zarr.json").write_text(json.dumps(attrs))
    pyr = open_image(root)
    assert (pyr.axes, pyr.kind, pyr.mpp, pyr.spacing_mm) == ("SYX", "image", None, None)
    assert pyr.channel_axis == 0
    assert pyr.metadata["channel_names"] == ["DAPI", "CD8"]
    np.testing.assert_array_equal(pyr.levels[1].compute(), data[:, ::2, ::2])


def test_bioformats2raw_5d_rgb_becomes_yxs(tmp_path):
    """bioformats2raw writes RGB as tczyx (1, 3, 1, y, x) under series 0."""
    root = tmp_path / "converted.zarr"
    zarr.open_group(str(root), mode="w", zarr_format=2).attrs["bioformats2raw.layout"] = 3
    data = _texture((1, 3, 1, 64, 80), "uint8")
    axes = [
        ("t", "time", None),
        ("c", "channel", None),
        ("z", "space", UM),
        ("y", "space", UM),
        ("x", "space", UM),
    ]
    write_ngff(root / "0", data, axes, version="0.4", n_levels=2, scale0=[1, 1, 1, 0.25, 0.25])
    assert detect_backend(root) == "ome-zarr"
    pyr = open_image(root)
    assert (pyr.axes, pyr.kind, pyr.mpp) == ("YXS", "slide", (0.25, 0.25))
    assert pyr.metadata["dropped_singleton_axes"] == "TZ"
    assert pyr.levels[0].chunks[-1] == (3,)  # colour channels read together
    np.testing.assert_array_equal(
        pyr.levels[1].compute(), np.moveaxis(data[0, :, 0, ::2, ::2], 0, -1)
    )


def test_units_and_global_scale(tmp_path):
    root = tmp_path / "mm.zarr"
    axes = [("y", "space", "millimeter"), ("x", "space", "millimeter")]
    write_ngff(
        root,
        _texture((64, 64), "uint8"),
        axes,
        version="0.4",
        n_levels=2,
        scale0=[0.1, 0.2],
        extra={"coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0]}]},
    )
    pyr = open_image(root)
    assert (pyr.axes, pyr.kind) == ("YX", "slide")
    assert pyr.mpp == pytest.approx((200.0, 400.0))


def test_sharded_v3_uses_shards_as_chunks(tmp_path):
    root = tmp_path / "sharded.zarr"
    axes = [("y", "space", UM), ("x", "space", UM)]
    write_ngff(
        root,
        _texture((128, 128), "uint8"),
        axes,
        version="0.5",
        n_levels=1,
        chunks=(16, 16),
        shards=(64, 64),
    )
    pyr = open_image(root)
    assert pyr.levels[0].chunks == ((64, 64), (64, 64))


def test_picking_the_metadata_file_opens_the_folder(rgb_04):
    meta = rgb_04[0] / ".zattrs"
    assert ome_zarr.sniff(meta)
    assert open_image(meta).shape == (256, 320, 3)


# -- bad input -------------------------------------------------------------------------------
def test_folder_that_is_not_ome_zarr(tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3).create_array(
        "data", shape=(8, 8), dtype="uint8"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (plain, empty):
        assert not ome_zarr.sniff(folder)
        assert detect_backend(folder) is None
        with pytest.raises(UnsupportedFormatError, match="folder but not an OME-Zarr"):
            open_image(folder)
    with pytest.raises(UnsupportedFormatError, match="not an OME-Zarr image"):
        ome_zarr.open_pyramid(plain)


def test_invalid_json_names_file_and_line(tmp_path):
    root = tmp_path / "broken.zarr"
    write_ngff(root, _texture((32, 32), "uint8"), YXC[:2], version="0.4", n_levels=1)
    text = (root / ".zattrs").read_text()
    (root / ".zattrs").write_text(text.replace('"datasets"', '"datasets" oops'))
    assert detect_backend(root) == "ome-zarr"
    with pytest.raises(CorruptFileError, match=r"broken\.zarr: its \.zattrs is not valid JSON"):
        open_image(root)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ms: ms.pop("datasets"), "'datasets' must be a non-empty list"),
        (lambda ms: ms["axes"].pop(), "1 axes are listed but dataset 0 has 2 dimensions"),
        (lambda ms: ms["datasets"][0].update(path="9"), "dataset '9' listed in multiscales"),
        (
            lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=[1]),
            r"scale \[1\] is not 2 finite numbers",
        ),
        (lambda ms: ms["axes"][0].update(name="x"), "repeat a dimension"),
    ],
)
def test_malformed_multiscales(tmp_path, edit, message):
    root = tmp_path / "bad.zarr"
    write_ngff(root, _texture((32, 32), "uint8"), YXC[:2], version="0.5", n_levels=1)
    doc = json.loads((root / "zarr.json").read_text())
    edit(doc["attributes"]["ome"]["multiscales"][0])
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptFileError, match=message) as info:
        open_image(root)
    assert "bad.zarr" in str(info.value)


def test_unknown_axis_is_unsupported(tmp_path):
    root = tmp_path / "angle.zarr"
    axes = [("angle", "space", None), ("y", "space", UM), ("x", "space", UM)]
    write_ngff(root, _texture((2, 32, 32), "uint8"), axes, version="0.4", n_levels=1)
    with pytest.raises(UnsupportedFormatError, match="axis 'angle'"):
        open_image(root)


def test_datasets_listed_smallest_first_are_sorted(tmp_path):
    root = tmp_path / "reversed.zarr"
    axes = [("y", "space", UM), ("x", "space", UM)]
    written = write_ngff(root, _texture((64, 64), "uint8"), axes, version="0.5", scale0=[0.5, 0.5])
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["ome"]["multiscales"][0]["datasets"].reverse()
    (root / "zarr.json").write_text(json.dumps(doc))
    pyr = open_image(root)
    assert [lv.shape for lv in pyr.levels] == [w.shape for w in written]
    assert pyr.mpp == (0.5, 0.5)
    assert pyr.metadata["datasets"] == ["0", "1", "2"]
