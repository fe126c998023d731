"""A run's outputs as napari layer data: kinds, names, placement, lazy masks (no viewer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_ai._napari.results import (
    dense_layers,
    describe_aggregates,
    object_layer,
    tile_layers,
)
from napari_histo_ai.inference.engine import RunConfig, run_model_sync
from napari_histo_ai.models.loading import TorchPredictor

from .test_inference_engine import BlobNet, blobs, make_pyramid, make_spec


def test_dense_outputs_become_image_labels_points_and_shapes(tmp_path: Path) -> None:
    centres = [(20, 20), (60, 90)]
    spec = make_spec(
        patch=40,
        halo=4,
        overlap=8,
        mpp=0.5,
        outputs=[
            {"name": "dark", "kind": "probability", "channels": [0], "colours": ["#ff0000"]},
            {"name": "dark mask", "kind": "mask", "channels": [0], "threshold": 0.5},
            {"name": "centres", "kind": "points", "channels": [0], "min_distance_um": 2},
            {"name": "boxes", "kind": "boxes", "channels": [0], "size_channels": [1, 2]},
        ],
    )
    pyramid = make_pyramid(blobs(centres, (100, 120)), mpp=0.25, n_levels=2)
    result = run_model_sync(
        pyramid,
        TorchPredictor(BlobNet(), spec, torch.device("cpu")),
        tmp_path / "r.zarr",
        config=RunConfig(tissue=False, fill_value=1.0),
    )
    layers = dense_layers(result.path, spec, result.geometry, image="img.tif")
    kinds = {kw["name"]: kind for _, kw, kind in layers}
    assert kinds == {
        "img.tif · test-net · dark": "image",
        "img.tif · test-net · dark mask": "labels",
    }
    prob_data, prob_kw, _ = layers[0]
    # model at 0.5 µm/px read from level 1 of a 0.25 µm/px image: output pixel = 0.5 µm
    assert prob_kw["scale"] == pytest.approx((0.5, 0.5))
    assert prob_kw["translate"] == pytest.approx((0.125, 0.125))
    assert prob_kw["units"] == ("um", "um")
    level0 = prob_data[0] if isinstance(prob_data, list) else prob_data
    p = np.asarray(level0)
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    mask_data = layers[1][0]
    m = np.asarray(mask_data[0] if isinstance(mask_data, list) else mask_data)
    np.testing.assert_array_equal(m, (p >= 128 / 255 - 1e-6).astype(np.uint8))
    pts_data, pts_kw, kind = object_layer(
        result.objects["centres"],
        spec,
        spec.outputs[2],
        result.geometry["centres"],
        image="img.tif",
    )
    assert kind == "points" and len(pts_data) == 2
    assert list(pts_kw["features"]["class"]) == ["centres", "centres"]
    # a point at level-0 pixel (20, 20) lands on world (20 * 0.25, 20 * 0.25) µm
    world = np.asarray(pts_data) * pts_kw["scale"] + pts_kw["translate"]
    assert sorted(map(tuple, np.round(world / 0.25).astype(int))) == [(20, 20), (60, 90)]
    box_data, box_kw, kind = object_layer(
        result.objects["boxes"], spec, spec.outputs[3], result.geometry["boxes"], image="img.tif"
    )
    assert kind == "shapes" and box_kw["shape_type"] == "rectangle" and len(box_data) == 2
    assert box_data[0].shape == (4, 2)


def test_tile_outputs_become_a_class_map_a_heatmap_and_a_magnification_map(tmp_path: Path) -> None:
    class Bright(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([(1 - m) * 10, m * 10, 20 + 20 * m], dim=1)

    img = np.zeros((64, 96, 3), np.float32)
    img[:, 64:] = 1.0
    spec = make_spec(
        patch=32,
        halo=0,
        overlap=0,
        dense=False,
        activation="none",
        outputs=[
            {"name": "kind", "kind": "class", "channels": [0, 1], "classes": ["dark", "bright"],
             "aggregate": "max"},
            {"name": "magnification", "kind": "magnification", "channels": [2],
             "aggregate": "median"},
        ],
    )  # fmt: skip
    result = run_model_sync(
        make_pyramid(img),
        TorchPredictor(Bright(), spec, torch.device("cpu")),
        tmp_path / "t.zarr",
        config=RunConfig(tissue=False),
    )
    layers = tile_layers(result.path, spec, result.geometry, result.aggregates, image="img")
    by_name = {kw["name"]: (data, kind) for data, kw, kind in layers}
    labels, kind = by_name["img · test-net · kind"]
    assert kind == "labels"
    np.testing.assert_array_equal(labels, [[1, 1, 2], [1, 1, 2]])
    heat, kind = by_name["img · test-net · kind · bright"]
    assert kind == "image" and heat.shape == (2, 3)
    mags, kind = by_name["img · test-net · magnification"]
    np.testing.assert_allclose(mags, [[20, 20, 40], [20, 20, 40]])
    assert result.aggregates["magnification"]["value"] == pytest.approx(20.0)
    text = describe_aggregates(result.aggregates)
    assert "kind: dark" in text and "magnification: 20×" in text


def test_a_cli_run_folder_opens_as_the_same_layers(tmp_path: Path) -> None:
    from napari_histo_ai._napari.reader import get_reader, read_runs

    spec = make_spec(
        patch=40,
        halo=4,
        overlap=8,
        outputs=[
            {"name": "dark", "kind": "probability", "channels": [0]},
            {"name": "centres", "kind": "points", "channels": [0], "min_distance_um": 2},
        ],
    )
    result = run_model_sync(
        make_pyramid(blobs([(20, 20), (60, 90)], (100, 120))),
        TorchPredictor(BlobNet(), spec, torch.device("cpu")),
        tmp_path / "img.test-net.zarr",
        config=RunConfig(tissue=False, fill_value=1.0),
    )
    assert get_reader(str(result.path)) is read_runs
    layers = read_runs(str(result.path))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("memory.tif · test-net · dark", "image"),
        ("memory.tif · test-net · centres", "points"),
    ]
    np.testing.assert_allclose(layers[1][0], result.objects["centres"].coords)
    assert get_reader(str(tmp_path)) is None  # a plain folder is not ours


def test_viewport_box_is_the_visible_part_in_level0_pixels() -> None:
    import napari

    from napari_histo_ai._napari.run import viewport_box

    viewer = napari.components.ViewerModel()
    pyramid = make_pyramid(np.zeros((1000, 2000, 3), np.uint8), mpp=0.5)
    layer = viewer.add_image(np.asarray(pyramid.levels[0]), rgb=True, scale=(0.5, 0.5))
    viewer.canvas.size = (100, 200)  # screen px (rows, columns)
    viewer.scene.camera.center = (100.0, 200.0)  # µm
    viewer.scene.camera.zoom = 2.0  # screen px per µm: 50 x 100 µm visible
    top, left, height, width = viewport_box(viewer, pyramid, layer)
    assert (top, left) == pytest.approx((150, 300), abs=1)
    assert (height, width) == pytest.approx((100, 200), abs=1)
    viewer.scene.camera.center = (5000.0, 5000.0)
    assert viewport_box(viewer, pyramid, layer) is None


def test_a_volume_run_folder_keeps_the_slice_spacing(tmp_path: Path) -> None:
    """Planes of an anisotropic volume land at its z spacing, not one unit apart."""
    import nibabel as nib

    from napari_histo_ai._napari.results import run_folder_layers
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.spec import ModelSpec

    rng = np.random.default_rng(0)
    volume = rng.normal(size=(24, 24, 4)).astype(np.float32)  # NIfTI (x, y, z)
    path = tmp_path / "aniso.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 3.0, 1.0])), path)
    pyramid = open_image(path)
    assert pyramid.spacing_mm == pytest.approx((3.0, 0.8, 0.8))
    spec = ModelSpec.from_dict(
        {
            "name": "tiny-volume",
            "task": "t",
            "version": "0",
            "format": "builtin",
            "architecture": "tiny_fcn",
            "kwargs": {"in_channels": 1, "out_channels": 1, "depth": 1},
            "io": {"patch_size": 24, "channels": 1, "normalisation": {"method": "zscore"}},
            "outputs": [{"name": "map", "kind": "probability"}],
        },
        source="test",
    )
    result = run_model_sync(
        pyramid, load_model(spec, device="cpu"), tmp_path / "run.zarr", config=RunConfig()
    )
    assert result.complete and result.planes == (4,)
    ((_, kwargs, kind),) = run_folder_layers(result.path)
    assert kind == "image"
    assert kwargs["scale"][0] == pytest.approx(3.0)
    assert kwargs["scale"][1:] == pytest.approx((0.8, 0.8))
