"""Tumour tissue: TissueFCN / PatchClassifier, IDC loading and split, training loops,
probability smoothing, the shipped idc-tumour weights and their run through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_ai.errors import HistoAIError, ImageReadError, ModelSpecError
from napari_histo_ai.models.architectures import build_architecture
from napari_histo_ai.models.architectures.tissue import PatchClassifier, TissueFCN
from napari_histo_ai.training import tissue as ts

from .conftest import real

WEIGHTS = (
    Path(__file__).resolve().parents[1]
    / "src/napari_histo_ai/models/weights/idc-tumour-v1.safetensors"
)


# --------------------------------------------------------------------------- networks


def test_tissue_fcn_returns_full_size_class_logits() -> None:
    net = TissueFCN(3, 3, widths=(4, 8, 8), convs=(1, 2, 1))
    assert net.size_multiple == 4
    y = net(torch.rand(2, 3, 24, 32))
    assert y.shape == (2, 3, 24, 32)
    # VGG16 to before its 3rd pool: 2 + 2 + 3 convolutions, 2 transpose convolutions
    vgg = TissueFCN()
    convs = [m for m in vgg.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    ups = [m for m in vgg.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256]
    assert [(u.kernel_size, u.stride) for u in ups] == [((2, 2), (2, 2))] * 2


def test_patch_classifier_gives_one_vector_per_patch_of_any_size() -> None:
    net = PatchClassifier(widths=(4, 8)).eval()
    assert net(torch.rand(3, 3, 50, 50)).shape == (3, 2)
    assert net(torch.rand(1, 3, 42, 50)).shape == (1, 2)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("patch_classifier", {"widths": []}),
        ("patch_classifier", {"dropout": 1.5}),
        ("tissue_fcn", {"widths": [4, 8], "convs": [1]}),
        ("tissue_fcn", {"n_classes": 0}),
    ],
)
def test_bad_kwargs_are_reported_by_the_registry_builder(name: str, kwargs: dict) -> None:
    with pytest.raises(ModelSpecError, match=name):
        build_architecture(name, **kwargs)


# --------------------------------------------------------------------------- tissue FCN training


def _stripes(seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Purple 'cancer' (0), pink 'stroma' (1), white 'background' (2) blocks with noise."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 3, size=(size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
    colours = np.array([(100, 50, 140), (230, 150, 190), (245, 245, 245)], np.float32)
    image = colours[mask] + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.int64)


def test_tissue_fcn_training_lowers_the_loss_and_learns_a_synthetic_pattern() -> None:
    torch.set_num_threads(1)
    pairs = [_stripes(s) for s in range(4)]
    records = []
    gen = ts.train_tissue_fcn(
        pairs,
        widths=(8, 8),
        convs=(1, 1),
        epochs=20,
        steps_per_epoch=10,
        batch_size=4,
        patch=16,
        learning_rate=1e-2,
        seed=0,
    )
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            net = stop.value
            break
    assert len(records) == 200 and records[-1]["step"] == 200
    first, last = (
        np.mean([r["loss"] for r in records[:5]]),
        np.mean([r["loss"] for r in records[-5:]]),
    )
    assert last < 0.5 * first
    # learning rate decays by 0.96 per epoch
    assert records[-1]["learning_rate"] == pytest.approx(1e-2 * 0.96**19)
    image, mask = _stripes(99)
    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy()).float() / 255
        predicted = net(x)[0].argmax(0).numpy()
    assert np.mean(predicted == mask) > 0.9


def test_tissue_fcn_training_ignores_unlabelled_pixels_and_checks_masks() -> None:
    image, mask = _stripes(0)
    partial = mask.copy()
    partial[:, 16:] = 255  # unlabelled half
    gen = ts.train_tissue_fcn(
        [(image, partial)], widths=(4, 4), epochs=1, steps_per_epoch=2, patch=16, seed=0
    )
    assert all(np.isfinite(r["loss"]) for r in gen)
    with pytest.raises(HistoAIError, match=r"mask values \[7\]"):
        next(ts.train_tissue_fcn([(image, np.full_like(mask, 7))], widths=(4, 4), patch=16))
    with pytest.raises(HistoAIError, match="multiple of 2"):
        next(ts.train_tissue_fcn([(image, mask)], widths=(4, 4), patch=15))


# --------------------------------------------------------------------------- IDC data


def _write_idc(folder: Path, patient: str, label: int, n: int, *, seed: int) -> None:
    """``n`` synthetic patches: tumour = dark purple noise, not tumour = pale pink."""
    rng = np.random.default_rng(seed)
    out = folder / "patients" / patient
    out.mkdir(parents=True, exist_ok=True)
    base = (90, 40, 130) if label else (235, 180, 210)
    for i in range(n):
        rgb = np.clip(np.array(base) + rng.normal(0, 20, (50, 50, 3)), 0, 255).astype(np.uint8)
        if i == 0:
            rgb = rgb[:42]  # an edge patch
        Image.fromarray(rgb).save(
            out / f"{patient}_idx5_x{50 * i}_y{(1000 if label else 100) + i}_class{label}.png"
        )


@pytest.fixture
def idc(tmp_path: Path) -> Path:
    folder = tmp_path / "idc"
    plan = {
        "8863": (6, 6),
        "8864": (6, 6),
        "8867": (6, 3),
        "8975": (3, 6),
        "9022": (0, 3),
        "9023": (0, 2),
    }
    for n, (patient, (neg, pos)) in enumerate(plan.items()):
        if neg:
            _write_idc(folder, patient, 0, neg, seed=2 * n)
        if pos:
            _write_idc(folder, patient, 1, pos, seed=2 * n + 1)
    return folder


def test_load_idc_patches_pads_edge_patches_with_white(idc: Path) -> None:
    patches = ts.load_idc_patches(idc)
    assert patches.images.shape == (47, 50, 50, 3) and patches.images.dtype == np.uint8
    edge = [i for i, name in enumerate(patches.names) if "_x0_" in name]
    assert edge and all((patches.images[i, 42:] == 255).all() for i in edge)
    assert patches.counts()["8975"] == {"class0": 3, "class1": 6}
    assert set(patches.labels.tolist()) == {0, 1}
    assert tuple(patches.positions[patches.names.index("8863_idx5_x50_y101_class0.png")]) == (
        50,
        101,
    )


def test_patient_split_is_patient_disjoint_and_keeps_both_classes(idc: Path) -> None:
    patches = ts.load_idc_patches(idc)
    train, val = ts.patient_split(patches, ("8867", "8975", "9022"))
    assert set(train.patients) == {"8863", "8864", "9023"}
    assert set(val.patients) == {"8867", "8975", "9022"}
    assert not set(train.names) & set(val.names)
    with pytest.raises(HistoAIError, match="only class"):
        ts.patient_split(patches, ("9022",))
    with pytest.raises(HistoAIError, match="not in the data"):
        ts.patient_split(patches, ("1234",))


def test_load_idc_patches_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(HistoAIError, match="not found"):
        ts.load_idc_patches(tmp_path / "missing")
    with pytest.raises(HistoAIError, match="no PNG named"):
        ts.load_idc_patches(tmp_path)
    (tmp_path / "1_idx5_x0_y0_class1.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"1_idx5_x0_y0_class1\.png"):
        ts.load_idc_patches(tmp_path)


def test_tumour_scores_use_the_shared_metrics() -> None:
    scores = ts.tumour_scores(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(0.8)
    assert scores["auc"] == pytest.approx(1.0)


def test_train_idc_writes_weights_record_and_evaluates(idc: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "w" / "idc.safetensors"
    steps = []
    record = ts.train_idc_sync(idc, out, epochs=12, batch_size=8, progress=steps.append)
    assert steps and steps[-1]["step"] == steps[-1]["steps"]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["split"]["validation"]["8975"] == {"class0": 3, "class1": 6}
    assert set(saved["split"]["train"]) == {"8863", "8864"}
    assert saved["metrics"]["accuracy"] == record["metrics"]["accuracy"]
    assert saved["metrics"]["accuracy"] > 0.8  # dark purple vs pale pink is easy
    result = ts.evaluate(idc, model="idc-tumour", weights=out)
    assert result["metrics"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"], abs=1e-3)
    assert result["metrics"]["auc"] == pytest.approx(record["metrics"]["auc"], abs=1e-3)


def test_idc_windows_put_patches_back_at_their_slide_positions(idc: Path) -> None:
    patches = ts.load_idc_patches(idc)
    images, masks, centre = ts.idc_windows(patches, window=128)
    assert images.shape == (47, 128, 128, 3) and masks.shape == (47, 128, 128)
    assert centre.sum() == 50 * 50
    for i, label in enumerate(patches.labels):
        np.testing.assert_array_equal(images[i][centre].reshape(50, 50, 3), patches.images[i])
        own = masks[i][centre]
        assert set(np.unique(own).tolist()) <= {0 if label else 1, 2, 255}
    # x50_y101 sits 50 px right of and 1 px below x0_y100 of the same patient: neighbours
    a = patches.names.index("8863_idx5_x0_y100_class0.png")
    b = patches.names.index("8863_idx5_x50_y101_class0.png")
    np.testing.assert_array_equal(images[a][40:88, 89:128], patches.images[b][0:48, :39])
    # an edge patch's padding is unlabelled, not background
    edge = masks[a][39 + 42 : 39 + 50, 39 : 39 + 50]
    assert (edge == 255).all()


def test_background_pixels_follow_optical_density() -> None:
    rgb = np.full((20, 20, 3), 245, np.uint8)
    rgb[5:15, 5:15] = (120, 60, 150)
    bg = ts.background_pixels(rgb)
    assert bg[0, 0] and not bg[10, 10]


def test_train_tissue_weak_writes_a_loadable_dense_model(idc: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "tissue-fcn.safetensors"
    gen = ts.train_tissue_weak(idc, out, epochs=2, steps_per_epoch=3, batch_size=2, patch=32)
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            record = stop.value
            break
    assert len(steps) == 6 and all(np.isfinite(r["loss"]) for r in steps)
    assert record["classes"] == ["cancer", "non-tumour tissue", "background"]
    assert 0 <= record["metrics"]["pixel_accuracy"] <= 1
    assert set(record["split"]["validation"]) == set(ts.DEFAULT_VALIDATION_PATIENTS)
    from safetensors.torch import load_file

    net = TissueFCN(3, 3, widths=(16, 32, 64))
    net.load_state_dict(load_file(out))
    # the registry entry's evaluation (through the loaded predictor) gives the same numbers
    result = ts.evaluate(idc, model="tissue-fcn", weights=out)
    for key in ("accuracy", "auc", "pixel_accuracy"):
        assert result["metrics"][key] == pytest.approx(record["metrics"][key], abs=1e-3)


def test_main_reports_a_data_error_with_exit_status_2(tmp_path: Path, capsys) -> None:
    assert ts.main(["--data", str(tmp_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "no PNG named" in capsys.readouterr().err


# --------------------------------------------------------------------------- shipped weights


def test_shipped_idc_weights_reproduce_the_card_metrics() -> None:
    from napari_histo_ai.models.registry import load_registry

    data = real("idc_breast_patches")
    spec = load_registry().get("idc-tumour")
    assert spec.weights is not None and spec.weights.resolve() == WEIGHTS.resolve()
    assert WEIGHTS.stat().st_size < 3_000_000
    result = ts.evaluate(data, model="idc-tumour")
    for key in ("accuracy", "f1", "auc"):
        assert result["metrics"][key] == pytest.approx(spec.card.metrics[key], abs=2e-3)
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert record["metrics"]["f1"] == pytest.approx(spec.card.metrics["f1"], abs=1e-4)
    assert set(record["split"]["validation"]) == set(ts.DEFAULT_VALIDATION_PATIENTS)


def test_idc_tumour_runs_through_the_engine_on_a_real_slide_crop(tmp_path: Path) -> None:
    """A 560 × 560 px crop of CMU-1 (given 0.5 µm/px) → 70 px at 4 µm/px → 3 × 3 tiles."""
    import zarr

    from napari_histo_ai.cli import main

    slide = real("wsi/CMU-1-Small-Region.svs")
    from napari_histo_ai.io import open_image

    rgb = np.asarray(open_image(slide).levels[0][1200:1760, 700:1260])[..., :3]
    path = tmp_path / "cmu-crop.png"
    Image.fromarray(rgb).save(path)
    out = tmp_path / "run"
    argv = ["predict", str(path), "--model", "idc-tumour", "--mpp", "0.5", "--out", str(out)]
    assert main([*argv, "--no-tissue"]) == 0
    (run,) = out.glob("*.zarr")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_mpp"] == 4.0
    tiles = np.asarray(zarr.open_group(str(run), mode="r")["tiles/0"])  # (2, rows, cols)
    assert tiles.shape == (2, 3, 3)
    np.testing.assert_allclose(tiles.sum(axis=0), 1.0, atol=1e-5)
    agg = summary["aggregates"]["tumour"]
    assert agg["method"] == "vote" and agg["n_tiles"] == 9
    assert agg["scores"]["tumour"] == pytest.approx(np.mean(tiles[1] >= tiles[0]))
    # the smoothed output's aggregate is the vote over the smoothed map (σ 80 µm = 2 tiles)
    from napari_histo_ai.inference.smoothing import smooth_probabilities

    smoothed = smooth_probabilities(tiles, sigma_px=80.0 / 40.0)
    votes = summary["aggregates"]["tumour smoothed"]["scores"]["tumour"]
    assert votes == pytest.approx(np.mean(smoothed[1] >= smoothed[0]))
    # the engine's tiles equal the patch model applied to the same pixels resampled 8:1
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    def resample(patch: np.ndarray) -> np.ndarray:  # as the engine does, per tile
        image = Image.fromarray(patch)
        return np.asarray(image.resize((50, 50), Image.Resampling.BILINEAR, reducing_gap=2.0))

    patches = np.stack(
        [
            resample(rgb[r * 80 : r * 80 + 400, c * 80 : c * 80 + 400])
            for r in range(3)
            for c in range(3)
        ]
    )
    predictor = load_model(load_registry().get("idc-tumour"), device="cpu")
    direct = ts.predict_patches(predictor, patches)
    np.testing.assert_allclose(tiles[1].ravel(), direct, atol=0.02)


# --------------------------------------------------------------------------- smoothing


def test_smoothing_removes_an_isolated_tile_and_keeps_missing_ones_missing() -> None:
    from napari_histo_ai.inference.smoothing import sigma_pixels, smooth_probabilities

    tumour = np.full((9, 9), 0.2)
    tumour[4, 4] = 0.9  # one flickering tile in a not-tumour field
    tumour[:, 7:] = 0.95  # a contiguous tumour region
    tumour[0, 0] = np.nan  # background, not computed
    p = np.stack([1 - tumour, tumour])
    s = smooth_probabilities(p, sigma_px=sigma_pixels(80.0, 40.0))
    assert np.isnan(s[:, 0, 0]).all() and not np.isnan(s[:, 1:, 1:]).any()
    np.testing.assert_allclose(np.nansum(s, axis=0)[1:, 1:], 1.0, atol=1e-6)
    assert p[:, 4, 4].argmax() == 1 and s[:, 4, 4].argmax() == 0
    assert (s[1, :, 8] > 0.5).all()  # the region survives
    np.testing.assert_allclose(smooth_probabilities(np.ones((2, 5, 5)), sigma_px=2)[0], 1.0)
    with pytest.raises(HistoAIError, match="≥ 0"):
        sigma_pixels(-1.0, 4.0)


def test_smoothing_um_is_a_mask_and_class_field_outside_the_fingerprint() -> None:
    from napari_histo_ai.models.registry import load_registry
    from napari_histo_ai.models.spec import ModelSpec

    data = load_registry().get("idc-tumour").to_dict()
    smooth = json.loads(json.dumps(data))
    smooth["outputs"][0]["smoothing_um"] = 80
    a, b = ModelSpec.from_dict(data), ModelSpec.from_dict(smooth)
    assert b.outputs[0].smoothing_um == 80.0 and a.outputs[0].smoothing_um == 0.0
    assert a.fingerprint() == b.fingerprint()
    bad = json.loads(json.dumps(data))
    bad["outputs"][0]["smoothing_um"] = -1
    with pytest.raises(ModelSpecError, match="smoothing_um"):
        ModelSpec.from_dict(bad)


def test_dense_mask_layer_smooths_probabilities_before_the_threshold(tmp_path: Path) -> None:
    from napari_histo_ai._napari.results import dense_layers
    from napari_histo_ai.inference.engine import RunConfig, run_model_sync
    from napari_histo_ai.inference.smoothing import smooth_uint8_block
    from napari_histo_ai.models.loading import TorchPredictor

    from .test_inference_engine import BlobNet, blobs, make_pyramid, make_spec

    outputs = [
        {"name": "p", "kind": "probability", "channels": [0]},
        {"name": "m", "kind": "mask", "channels": [0], "threshold": 0.5},
        {"name": "smooth", "kind": "mask", "channels": [0], "threshold": 0.5, "smoothing_um": 2.0},
    ]
    spec = make_spec(patch=40, halo=4, overlap=8, mpp=0.5, outputs=outputs)
    result = run_model_sync(
        make_pyramid(blobs([(20, 20), (60, 90)], (100, 120)), mpp=0.5),
        TorchPredictor(BlobNet(), spec, torch.device("cpu")),
        tmp_path / "r.zarr",
        config=RunConfig(tissue=False, fill_value=1.0),
    )
    layers = {
        kw["name"]: data
        for data, kw, _ in dense_layers(result.path, spec, result.geometry, image="i")
    }
    first = lambda d: np.asarray(d[0] if isinstance(d, list) else d)  # noqa: E731
    p8 = np.rint(first(layers["i · test-net · p"]) * 255).astype(np.uint8)
    plain, smooth = first(layers["i · test-net · m"]), first(layers["i · test-net · smooth"])
    expected = (smooth_uint8_block(p8[None], 2.0 / 0.5)[0] >= 128).astype(np.uint8)
    assert np.mean(smooth == expected) > 0.99
    assert not np.array_equal(plain, smooth)


def test_class_map_smoothing_is_applied_when_the_layer_is_built(tmp_path: Path) -> None:
    import dataclasses

    from napari_histo_ai._napari.results import tile_layers
    from napari_histo_ai.inference.engine import RunConfig, run_model_sync
    from napari_histo_ai.inference.smoothing import smooth_probabilities
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    slide = open_image(real("wsi/CMU-1-Small-Region.svs"))
    spec = load_registry().get("idc-tumour")
    result = run_model_sync(
        slide,
        load_model(spec, device="cpu"),
        tmp_path / "r.zarr",
        config=RunConfig(roi=(1000.0, 600.0, 800.0, 800.0)),
    )
    smooth = dataclasses.replace(
        spec, outputs=(dataclasses.replace(spec.outputs[0], smoothing_um=80.0),)
    )
    raw = {kw["name"]: d for d, kw, _ in tile_layers(result.path, spec, result.geometry, image="s")}
    out = {
        kw["name"]: d for d, kw, _ in tile_layers(result.path, smooth, result.geometry, image="s")
    }
    heat = "s · idc-tumour · tumour · tumour"
    import zarr

    tiles = np.asarray(zarr.open_group(str(result.path), mode="r")["tiles/0"])
    expected = np.nan_to_num(smooth_probabilities(tiles, sigma_px=80.0 / 40.0)[1], nan=0.0)
    np.testing.assert_allclose(out[heat], expected, atol=1e-6)
    assert not np.allclose(out[heat], raw[heat])


# --------------------------------------------------------------------------- tissue-fcn


def test_shipped_tissue_fcn_record_matches_its_card() -> None:
    from napari_histo_ai.models.registry import load_registry

    spec = load_registry().get("tissue-fcn")
    assert spec.dense and spec.architecture == "tissue_fcn" and spec.weights is not None
    assert spec.weights.stat().st_size < 3_000_000
    record = json.loads(spec.weights.with_suffix(".json").read_text())
    metrics = record["metrics"]
    assert spec.card.metrics["patch_auc"] == pytest.approx(metrics["auc"], abs=1e-4)
    assert spec.card.metrics["patch_f1"] == pytest.approx(metrics["f1"], abs=1e-4)
    assert spec.card.metrics["pixel_accuracy_weak_labels"] == pytest.approx(
        metrics["pixel_accuracy"], abs=1e-4
    )
    assert record["classes"] == list(spec.outputs[0].classes)
    assert set(record["split"]["validation"]) == set(ts.DEFAULT_VALIDATION_PATIENTS)


def test_tissue_fcn_runs_through_the_engine_and_finds_the_background(tmp_path: Path) -> None:
    """A 1024² crop of CMU-1 with slide background on its left (given 0.5 µm/px)."""
    from napari_histo_ai._napari.results import dense_layers
    from napari_histo_ai.cli import main
    from napari_histo_ai.inference.engine import Geometry
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.registry import load_registry

    rgb = np.asarray(open_image(real("wsi/CMU-1-Small-Region.svs")).levels[0][1600:2624, 0:1024])
    path = tmp_path / "cmu-left.png"
    Image.fromarray(rgb[..., :3]).save(path)
    out = tmp_path / "run"
    argv = ["predict", str(path), "--model", "tissue-fcn", "--mpp", "0.5", "--out", str(out)]
    assert main([*argv, "--no-tissue"]) == 0
    (run,) = out.glob("*.zarr")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["model_mpp"] == 4.0
    spec = load_registry().get("tissue-fcn")
    geo = Geometry(
        tuple(summary["scale"]),
        tuple(summary["translate"]),
        tuple(summary["output_pixel_level0"]),
        summary["unit"],
    )
    layers = {
        " · ".join(kw["name"].split(" · ")[2:]): data
        for data, kw, _ in dense_layers(run, spec, {o.name: geo for o in spec.outputs}, image="c")
    }
    level0 = lambda d: np.asarray(d[0] if isinstance(d, list) else d)  # noqa: E731
    probs = np.stack([level0(layers[f"tissue · {c}"]) for c in spec.outputs[0].classes])
    assert probs.shape == (3, 128, 128)  # 1024 px at 0.5 µm/px = 128 px at 4 µm/px
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=0.02)  # uint8 storage
    raw, smooth = level0(layers["tissue classes"]), level0(layers["tissue classes smoothed"])
    white = rgb[..., :3].reshape(128, 8, 128, 8, 3).mean(axis=(1, 3, 4)) > 225
    assert np.mean(raw[white] == 3) > 0.9  # label 3 = background
    assert np.mean(raw[~white] != 3) > 0.5
    # smoothing makes the label map more contiguous: fewer label changes between neighbours
    changes = lambda m: int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())  # noqa: E731
    assert changes(smooth) <= changes(raw)
