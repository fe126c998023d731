"""MRI tumour segmentation (paper 003): slice U-Net, losses, training, engine, lesion lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_ai.errors import HistoAIError, ModelInputError, ModelSpecError
from napari_histo_ai.inference.lesions import (
    lesion_objects,
    longest_diameter,
    measure_lesions,
)
from napari_histo_ai.models.architectures.mri import SliceUNet
from napari_histo_ai.models.architectures.unet import UNet
from napari_histo_ai.training import mri

from .conftest import real

BRATS = "brats2015_mri"
VAL_CASE = f"{BRATS}/validation/brats_2013_pat0003_1"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- network


def test_slice_unet_keeps_the_input_size_and_pools_inside():
    torch.manual_seed(0)
    net = SliceUNet(in_channels=1, out_channels=1, base=4, depth=2, downsample=2).eval()
    x = torch.randn(2, 1, 32, 48)
    assert net.size_multiple == 8
    with torch.no_grad():
        y = net(x)
        inner = net.unet(torch.nn.functional.avg_pool2d(x, 2))
    assert y.shape == (2, 1, 32, 48)
    # the U-Net ran on the 2×-pooled slice; its logits come back bilinearly upsampled
    upsampled = torch.nn.functional.interpolate(inner, scale_factor=2, mode="bilinear")
    assert torch.allclose(y, upsampled, atol=1e-6)
    # a change inside one 2 × 2 block that keeps its mean changes nothing
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1.0
    x2[0, 0, 1, 1] -= 1.0
    with torch.no_grad():
        assert torch.allclose(net(x2), y, atol=1e-6)


def test_slice_unet_without_downsampling_is_the_unet():
    torch.manual_seed(0)
    net = SliceUNet(in_channels=1, base=4, depth=2, downsample=1).eval()
    plain = UNet(in_channels=1, out_channels=1, base=4, depth=2).eval()
    plain.load_state_dict({k.removeprefix("unet."): v for k, v in net.state_dict().items()})
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


def test_slice_unet_refuses_sizes_off_its_multiple():
    net = SliceUNet(base=4, depth=2, downsample=2)
    with pytest.raises(ModelInputError, match="multiples of 8"):
        net(torch.zeros(1, 1, 20, 16))
    with pytest.raises(ValueError, match="downsample"):
        SliceUNet(downsample=0)


# --------------------------------------------------------------------------- preprocessing


def test_zscore_is_per_slice_and_is_the_engines_normalisation():
    from napari_histo_ai.models.preprocessing import normalise
    from napari_histo_ai.models.registry import load_registry

    rng = np.random.default_rng(0)
    volume = (rng.normal(size=(3, 16, 16)) * [[[1.0]], [[5.0]], [[0.1]]] + 7).astype(np.float32)
    volume[1] = 4.0  # a constant slice becomes zeros, not NaN
    x = mri.zscore_slices(volume)
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    for z in (0, 2):
        assert abs(float(x[z].mean())) < 1e-5 and abs(float(x[z].std()) - 1) < 1e-4
    assert not x[1].any()
    spec = load_registry().get("mri-unet")
    assert spec.io.normalisation.method == "zscore"
    engine_input = normalise(volume[..., None], spec.io.normalisation)  # one tile per slice
    np.testing.assert_array_equal(x, engine_input)


def test_border_weights_peak_at_the_tumour_border():
    mask = np.zeros((2, 40, 40), bool)
    mask[0, 10:30, 10:30] = True
    w = mri.border_weights(mask, pos_weight=3.0, w0=5.0, sigma_px=2.0)
    border = 3.0 + 5.0 * np.exp(-(0.5**2) / 8)
    assert w[0, 10, 20] == pytest.approx(border, rel=1e-5)  # first tumour row
    assert w[0, 20, 20] == pytest.approx(3.0, abs=1e-4)  # centre of the tumour
    assert w[0, 0, 0] == pytest.approx(1.0, abs=1e-4)  # far background
    assert w[0, 9, 20] == pytest.approx(1.0 + 5.0 * np.exp(-(0.5**2) / 8), rel=1e-5)
    np.testing.assert_array_equal(w[1], 1.0)  # a slice without tumour


@pytest.mark.parametrize("name", mri.LOSSES)
def test_each_loss_is_small_when_right_and_pulls_towards_the_target(name):
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    weight = torch.from_numpy(mri.border_weights(target.numpy() > 0))
    right = (target * 2 - 1) * 12
    wrong = -right
    w = weight if name == "wbce" else None
    assert float(mri.loss_value(name, right, target, w)) < 0.01
    assert float(mri.loss_value(name, wrong, target, w)) > 0.9
    logits = torch.zeros(1, 1, 16, 16, requires_grad=True)
    mri.loss_value(name, logits, target, w).backward()
    assert logits.grad is not None
    grad = logits.grad[0, 0]
    assert (grad[target[0, 0] > 0] < 0).all()  # raise the tumour logits
    if name == "wbce":
        assert (grad[target[0, 0] == 0] > 0).all()  # lower the background ones
        # border pixels weigh more than the tumour's centre
        assert abs(float(grad[4, 8])) > abs(float(grad[8, 8]))


def test_unknown_loss_is_refused():
    with pytest.raises(HistoAIError, match="unknown loss 'focal'"):
        mri.loss_value("focal", torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_volume_scores():
    truth = np.zeros((2, 4, 4), bool)
    truth[0, :2] = True  # 8 voxels
    predicted = np.zeros_like(truth)
    predicted[0, 1:3] = True  # 4 right, 4 wrong
    s = mri.volume_scores(predicted, truth)
    assert s["precision"] == s["recall"] == s["f1"] == s["dice"] == pytest.approx(0.5)
    assert s["jaccard"] == pytest.approx(1 / 3)
    assert s["accuracy"] == pytest.approx(24 / 32)


# --------------------------------------------------------------------------- training


def _write_case(folder: Path, rng: np.random.Generator, shape=(6, 32, 32)) -> None:
    import nibabel as nib

    folder.mkdir(parents=True)
    z, y, x = np.indices(shape)
    labels = (((y - 16) / 6) ** 2 + ((x - 14) / 8) ** 2 <= 1) & (z >= 2)
    flair = rng.normal(size=shape).astype(np.float32) + 3 * labels
    for name, data in ((mri.FLAIR, flair), (mri.LABELS, labels.astype(np.float32) * 2)):
        # file order X, Y, Z
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), np.eye(4)),
                 str(folder / name))  # fmt: skip


@pytest.fixture
def tiny_brats(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "brats"
    _write_case(root / "train" / "case_a", rng)
    _write_case(root / "validation" / "case_b", rng)
    return root


@pytest.mark.parametrize("loss", mri.LOSSES)
def test_training_writes_weights_record_and_per_case_metrics(tiny_brats, tmp_path, loss):
    out = tmp_path / "w" / "mri-tiny.safetensors"
    steps = []
    record = mri.train_mri_sync(
        tiny_brats,
        out,
        progress=steps.append,
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        base=4,
        depth=2,
        loss=loss,
        tumour_fraction=0.5,
    )
    assert [s["step"] for s in steps] == [1, 2]
    assert record["split"] == {
        "train": ["case_a"],
        "validation": ["case_b"],
        "kind": "case-disjoint",
    }
    scores = record["metrics"]["per_case"]["case_b"]
    assert set(scores) >= {"dice", "precision", "recall", "f1", "accuracy"}
    assert scores["true_voxels"] == float(
        np.count_nonzero(mri.load_case(tiny_brats / "validation" / "case_b").tumour)
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["loss"] == loss and saved["kwargs"]["downsample"] == 2
    from safetensors.torch import load_file

    net = SliceUNet(**saved["kwargs"])
    net.load_state_dict(load_file(str(out)), strict=False)
    assert all(v.dtype == torch.float32 for v in load_file(str(out)).values())


def test_training_refuses_a_folder_without_cases(tmp_path):
    with pytest.raises(HistoAIError, match="no case folders"):
        mri.train_mri_sync(tmp_path, tmp_path / "w.safetensors", epochs=1, steps_per_epoch=1)


def test_main_reports_a_bad_folder_as_exit_status_2(tmp_path, capsys):
    assert mri.main(["--data", str(tmp_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "no case folders" in capsys.readouterr().err


# --------------------------------------------------------------------------- lesions


def _ellipsoid(shape, spacing, centre_mm, semi_axes_mm):
    grids = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij"
    )
    return (
        sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre_mm, semi_axes_mm, strict=True)) <= 1
    )


def test_longest_diameter_of_an_anisotropic_ellipsoid():
    # 0.5 mm rows, 1 mm columns: in voxels the row axis is longer (60 vs 40), in mm the
    # column axis is (40 mm vs 30 mm), so the spacing must be applied before measuring
    spacing = (2.0, 0.5, 1.0)
    mask = _ellipsoid((40, 120, 80), spacing, (40.0, 30.0, 40.0), (8.0, 15.0, 20.0))
    mask |= _ellipsoid((40, 120, 80), spacing, (10.0, 50.0, 70.0), (1.5, 1.5, 1.5))  # ~14 mm³
    lesions = measure_lesions(mask, spacing, min_volume_mm3=30.0)
    assert len(lesions) == 1  # the small blob is dropped
    (lesion,) = lesions
    assert lesion.slice == 20  # the ellipsoid's centre plane, z = 40 mm
    assert lesion.length_mm == pytest.approx(40.0, abs=2 * 1.0)
    assert lesion.start[1] == lesion.end[1] == 60  # along the columns, through the centre
    assert lesion.volume_mm3 == pytest.approx(4 / 3 * np.pi * 8 * 15 * 20, rel=0.03)
    assert lesion.area_mm2 == pytest.approx(np.pi * 15 * 20, rel=0.03)
    assert measure_lesions(mask, spacing, min_volume_mm3=0.0)[1].volume_mm3 < 30
    assert measure_lesions(np.zeros((3, 4, 4), bool), (1, 1, 1)) == []


def test_longest_diameter_edge_cases_and_oracle():
    assert longest_diameter(np.array([[3, 4]])) == (0, 0, 0.0)
    i, j, d = longest_diameter(np.array([[0, 0], [0, 1], [0, 2], [0, 7]]), (1.0, 2.0))
    assert {i, j} == {0, 3} and d == pytest.approx(14.0)  # collinear: no hull
    rng = np.random.default_rng(1)
    points = rng.integers(0, 50, size=(300, 2))
    i, j, d = longest_diameter(points, (0.7, 1.3))
    mm = points * [0.7, 1.3]
    brute = np.sqrt(((mm[:, None] - mm[None]) ** 2).sum(-1)).max()
    assert d == pytest.approx(brute) and np.linalg.norm(mm[i] - mm[j]) == pytest.approx(brute)
    with pytest.raises(ModelInputError, match="spacing_mm"):
        measure_lesions(np.ones((2, 2, 2)), (1.0, 0.0, 1.0))


def test_lesion_objects_are_lines_in_level0_pixels_with_features():
    probability = np.zeros((5, 20, 30), np.uint8)
    probability[2, 5:8, 4:25] = 200
    probability[1:4, 6, 10:12] = 160
    spacing = (3.0, 1.0, 1.0)
    assert len(lesion_objects(probability, 0.5, pixel=(1.0, 1.0), spacing_mm=spacing)) == 0
    lines = lesion_objects(  # 201 mm³: below the default minimum of 500 mm³, above 100
        probability, 0.5, pixel=(1.0, 1.0), spacing_mm=spacing, classes=("tumour",),
        min_volume_mm3=100.0,
    )  # fmt: skip
    assert lines.kind == "lines" and len(lines) == 1
    z, r0, c0, r1, c1 = lines.coords[0]
    assert z == 2 and {c0, c1} == {4.5, 24.5}  # voxel centres, continuous pixels
    assert lines.features["length_mm"][0] == pytest.approx(np.hypot(r1 - r0, 20))
    assert lines.features["volume_mm3"][0] == pytest.approx((3 * 21 + 4) * 3.0)
    assert 160 / 255 < lines.scores[0] < 200 / 255
    assert len(lesion_objects(probability, 0.9, pixel=(1.0, 1.0), spacing_mm=spacing)) == 0
    # no physical size: voxel counts, no millimetres
    unknown = lesion_objects(probability, 0.5, pixel=(2.0, 2.0), spacing_mm=None, min_volume_mm3=0)
    assert unknown.features["n_voxels"][0] == 67 and np.isnan(unknown.features["length_mm"][0])
    assert unknown.coords[0, 2] in (9.0, 49.0)  # column 4 or 24 of 2-px output pixels


def test_lines_round_trip_through_geojson(tmp_path):
    from napari_histo_ai.inference.geojson import read_objects, write_objects

    probability = np.zeros((3, 16, 16), np.uint8)
    probability[1, 2:9, 3:12] = 255
    lines = lesion_objects(
        probability, 0.5, pixel=(1.0, 1.0), spacing_mm=(2.0, 1.0, 0.5), min_volume_mm3=10.0
    )
    path = write_objects(tmp_path / "d.geojson", lines)
    data = json.loads(path.read_text())
    assert data["features"][0]["geometry"]["type"] == "LineString"
    back = read_objects(path, kind="lines", classes=("tumour",), n_plane=1)
    np.testing.assert_allclose(back.coords, lines.coords)
    assert back.features["length_mm"][0] == pytest.approx(lines.features["length_mm"][0])


def test_lines_output_is_dense_only():
    from napari_histo_ai.models.spec import ModelSpec

    entry = {
        "name": "x",
        "task": "t",
        "version": "1",
        "format": "builtin",
        "architecture": "tiny_classifier",
        "dense": False,
        "io": {"patch_size": 32},
        "outputs": [{"name": "d", "kind": "lines"}],
    }
    with pytest.raises(ModelSpecError, match="does not fit a tile model"):
        ModelSpec.from_dict(entry)


def test_lesions_of_the_real_validation_labels():
    from napari_histo_ai.io import open_image

    pyramid = open_image(real(f"{VAL_CASE}/{mri.LABELS}"))
    tumour = np.asarray(pyramid.levels[0]) > 0
    lesions = measure_lesions(tumour, pyramid.spacing_mm)
    assert lesions and lesions[0].volume_mm3 > 0.9 * tumour.sum()  # one large glioma
    big = lesions[0]
    z = big.slice
    rows, cols = np.nonzero(tumour[z])  # the lesion is the slice's only large component
    assert tumour[z].sum() == pytest.approx(big.area_mm2, rel=0.01)
    pts = np.column_stack([rows, cols]).astype(float)
    hull_oracle = longest_diameter(pts)[2]
    assert big.length_mm == pytest.approx(hull_oracle, rel=0.01)
    assert 30 < big.length_mm < 150  # a brain-sized tumour, in mm


# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def crop_of_the_validation_case(tmp_path_factory):
    """Slices 80..87 of the held-out FLAIR volume as a small NIfTI file."""
    import nibabel as nib

    source = real(f"{VAL_CASE}/{mri.FLAIR}")
    img = nib.load(str(source))
    data = np.asarray(img.dataobj)[:, :, 80:88]
    path = tmp_path_factory.mktemp("mri") / "flair_crop.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    return path


def test_predict_runs_plane_by_plane_and_gives_3d_labels_and_lines(
    crop_of_the_validation_case, tmp_path, capsys
):
    from napari_histo_ai._napari.results import run_folder_layers
    from napari_histo_ai.cli import main
    from napari_histo_ai.inference.engine import RunConfig, run_model_sync
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    spec = load_registry().get("mri-unet")
    assert spec.io.mpp is None and spec.io.channels == 1
    pyramid = open_image(crop_of_the_validation_case)
    assert pyramid.axes == "ZYX" and pyramid.mpp is None
    reported = []
    result = run_model_sync(
        pyramid,
        load_model(spec, device="cpu"),
        tmp_path / "run.zarr",
        config=RunConfig(batch_size=4),
        on_progress=reported.append,
    )
    # the widget adds object layers from the progress records: the lines come last
    assert "tumour diameters" in reported[-1].new_objects
    assert result.complete and result.planes == (8,) and result.tiles_total == 8  # 1 tile / slice
    import zarr

    stored = np.asarray(zarr.open_group(str(result.path), mode="r")["probability"]["0"])
    assert stored.shape == (1, 8, 240, 240)
    # the engine's map is the training / evaluate forward pass (same z-score, one tile)
    predictor = load_model(spec, device="cpu")
    volume = np.asarray(pyramid.levels[0], dtype=np.float32)
    direct = mri.predict_volume(predictor, volume)
    assert np.abs(stored[0].astype(float) - direct * 255).max() <= 1.0
    lines = result.objects["tumour diameters"]
    assert len(lines) >= 1 and np.isfinite(lines.features["length_mm"]).all()

    layers = {
        kwargs["name"].split(" · ")[-1]: (data, kwargs, kind)
        for data, kwargs, kind in run_folder_layers(result.path)
    }
    data, _, kind = layers["tumour mask"]
    assert kind == "labels" and data.ndim == 3 and data.shape == (8, 240, 240)
    assert np.array_equal(np.asarray(data), stored[0] >= 128)
    shapes, skw, skind = layers["tumour diameters"]
    assert skind == "shapes" and skw["shape_type"] == "line" and skw["ndim"] == 3
    assert len(shapes) == len(lines)
    np.testing.assert_allclose(skw["features"]["length_mm"], lines.features["length_mm"])
    import napari.layers

    labels_layer = napari.layers.Labels(data, **layers["tumour mask"][1])
    lines_layer = napari.layers.Shapes(shapes, **skw)
    assert labels_layer.ndim == 3 and set(lines_layer.shape_type) == {"line"}
    assert list(lines_layer.text.values[:1]) == [f"{lines.features['length_mm'][0]:.1f} mm"]
    # the CLI gives the same folder content
    out = tmp_path / "cli"
    assert (
        main(
            [
                "predict",
                str(crop_of_the_validation_case),
                "--model",
                "mri-unet",
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    geojson = next(out.rglob("tumour diameters.geojson"))
    features = json.loads(geojson.read_text())["features"]
    assert [f["properties"]["length_mm"] for f in features] == pytest.approx(
        list(lines.features["length_mm"])
    )


def test_evaluate_scores_the_held_out_case_as_the_record_says(data_dir):
    result = mri.evaluate(real(BRATS), model="mri-unet")
    scores = result["per_case"]["brats_2013_pat0003_1"]
    record = json.loads(
        (Path(mri.__file__).parents[1] / "models" / "weights" / "mri-unet-v1.json").read_text()
    )
    for key in ("dice", "precision", "recall", "f1"):
        assert scores[key] == pytest.approx(
            record["metrics"]["per_case"]["brats_2013_pat0003_1"][key], abs=2e-3
        )
    assert scores["dice"] > 0.3  # far above chance (tumour is 1.9 % of the volume)
