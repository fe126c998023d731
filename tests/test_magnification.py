"""Magnification estimation (paper 004): classical estimator, ShallowNet fusion, training,
the registry model through the engine, and the "Estimate magnification" widget action."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_histo_ai.errors import HistoAIError
from napari_histo_ai.models import magnification as mag

from .conftest import real

CMU = "wsi/CMU-1-Small-Region.svs"
TCGA = "wsi/TCGA-CR-7395-01A-01-TS1.svs"


def _disks(
    side: int, radius: float, *, spacing: int, seed: int = 0, offset: int | None = None
) -> np.ndarray:
    """Pink H&E-like field with purple disks of ``radius`` px on a jittered grid."""
    rng = np.random.default_rng(seed)
    image = np.empty((side, side, 3), np.uint8)
    image[:] = (235, 160, 200)  # eosin-pink stroma
    rows, cols = np.mgrid[:side, :side]
    start = spacing // 2 if offset is None else offset
    for cy in range(start, side, spacing):
        for cx in range(start, side, spacing):
            y, x = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
            inside = (rows - y) ** 2 + (cols - x) ** 2 <= radius**2
            image[inside] = (70, 40, 130)  # hematoxylin-purple nucleus
    noise = rng.normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- conversions


def test_conversions_and_snapping():
    assert mag.mpp_from_magnification(20) == pytest.approx(0.5)
    assert mag.magnification_from_mpp(0.25) == pytest.approx(40)
    assert mag.nearest_magnification(22.0) == 20
    assert mag.nearest_magnification(34.0) == 30  # log scale: 34 is nearer 30 than 40
    assert mag.nearest_magnification(6.0) == 5
    snapped = mag.nearest_magnification(np.array([np.nan, 9.0, 100.0]))
    assert np.isnan(snapped[0]) and list(snapped[1:]) == [10, 40]
    assert mag.steps_apart(20, 40) == 2 and mag.steps_apart(15, 20) == 1
    with pytest.raises(HistoAIError, match="positive"):
        mag.mpp_from_magnification(0)


def test_fusion_weights_the_area_branch_by_alpha():
    # the paper: alpha x Net_area + (1 - alpha) x Net_magnification, alpha = 0.2
    assert float(mag.fuse(40.0, 20.0)) == pytest.approx(0.2 * 40 + 0.8 * 20)
    assert float(mag.fuse(40.0, 20.0, alpha=1.0)) == pytest.approx(40)
    areas = mag.class_areas(400.0)  # m² law from 400 px² at 40×
    assert areas[-1] == pytest.approx(400) and areas[4] == pytest.approx(100)
    got = mag.area_to_magnification(np.array([390.0, 110.0, 3.0]), areas)
    assert list(got) == [40, 20, 5]
    with pytest.raises(HistoAIError, match="one per class"):
        mag.area_to_magnification(np.array([1.0]), [1.0, 2.0])


# --------------------------------------------------------------------------- classical


def test_nucleus_areas_measures_disks_and_drops_border_and_small_blobs():
    image = _disks(200, 6.0, spacing=25, offset=0)
    found = mag.nucleus_areas(image)
    assert found.areas_px.size == 49  # 8 × 8 disks minus the 15 cut by the border
    assert found.mean_area_px == pytest.approx(math.pi * 36, rel=0.15)
    tiny = mag.nucleus_areas(_disks(200, 1.5, spacing=25))
    assert tiny.areas_px.size == 0, "blobs under 20 px are not nuclei"
    blank = mag.nucleus_areas(np.full((64, 64, 3), 245, np.uint8))
    assert blank.areas_px.size == 0 and math.isnan(blank.mean_area_px)
    with pytest.raises(HistoAIError, match="RGB"):
        mag.nucleus_areas(np.zeros((8, 8)))


def test_bigger_nuclei_read_as_higher_magnification():
    low, area_low, n_low = mag.estimate_magnification(_disks(256, 3.0, spacing=14))
    high, area_high, n_high = mag.estimate_magnification(_disks(256, 8.0, spacing=30))
    assert n_low > 3 and n_high > 3
    assert area_high > 4 * area_low
    # the calibrated law: area ∝ m^AREA_EXPONENT
    expected = (area_high / area_low) ** (1 / mag.AREA_EXPONENT)
    assert high / low == pytest.approx(expected, rel=1e-6)
    assert math.isnan(mag.estimate_magnification(np.full((64, 64, 3), 250, np.uint8))[0])


def test_slide_estimate_on_real_slides():
    from napari_histo_ai.io import open_image

    cmu = open_image(real(CMU))
    estimate = mag.estimate_slide_magnification(cmu, n_regions=4)
    assert estimate.magnification == 20  # the file says AppMag 20, 0.499 µm/px
    assert estimate.mpp == pytest.approx(0.5)
    assert estimate.metadata_source == "objective" and estimate.steps == 0
    assert not estimate.disagrees and estimate.warning == ""
    assert len(estimate.regions) == 4 and all(r.n_nuclei >= 3 for r in estimate.regions)
    json.dumps(estimate.to_dict())

    cmu.objective_power = 5.0  # wrong metadata: three classes away
    wrong = mag.estimate_slide_magnification(cmu, n_regions=2)
    assert wrong.disagrees and "5×" in wrong.warning and "20×" in wrong.warning

    tcga = open_image(real(TCGA))  # no mpp, no objective: the case the estimate is for
    assert tcga.mpp is None
    blind = mag.estimate_slide_magnification(tcga, n_regions=3)
    assert blind.metadata_source == "none" and blind.steps is None
    assert blind.magnification in mag.MAGNIFICATIONS
    assert blind.mpp == pytest.approx(10 / blind.magnification)
    assert "no magnification" in blind.describe()


# --------------------------------------------------------------------------- networks


def test_shallownet_and_fusion_contract():
    import torch

    from napari_histo_ai.models.architectures import build_architecture

    net = build_architecture("shallownet", patch_size=32, widths=[4, 4, 8, 8])
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 1)
    with pytest.raises(ValueError, match="32² patches"):
        net(torch.zeros(1, 3, 48, 48))
    fusion = build_architecture(
        "shallownet_fusion", patch_size=32, widths=[4, 4, 8, 8], alpha=0.2
    ).eval()
    y = fusion(torch.rand(3, 3, 32, 32)).detach().numpy()
    assert y.shape == (3, 3)
    assert np.allclose(y[:, 0], 0.2 * y[:, 2] + 0.8 * y[:, 1], rtol=1e-5)
    assert set(y[:, 2]) <= set(map(float, mag.MAGNIFICATIONS))
    assert list(fusion.state_dict()) and not any("class_areas" in k for k in fusion.state_dict())


def test_scores_use_kappa_and_macro_f1():
    from napari_histo_ai.training.magnification import magnification_scores

    truth = np.array([20, 20, 40, 40, 5])
    perfect = magnification_scores(truth, truth + 0.4)
    assert perfect["kappa"] == 1.0 and perfect["f1_macro"] == 1.0
    partial = magnification_scores(truth, np.array([20, 40, 40, 40, np.nan]))
    assert partial["undetermined"] == 1 and partial["accuracy"] == pytest.approx(0.6)
    assert 0 < partial["kappa"] < 1 and partial["within_one_class"] == pytest.approx(0.6)
    assert partial["f1_per_class"]["5x"] == 0.0


def _fake_miccai(folder):
    """Four small synthetic tiles in the MICCAI layout (image01/03 at 20×, 08/11 at 40×)."""
    from PIL import Image

    folder.mkdir()
    for name, radius in (("image01", 5), ("image03", 5), ("image08", 9), ("image11", 9)):
        rgb = _disks(192, radius, spacing=4 * radius, seed=int(name[-2:]))
        Image.fromarray(rgb).save(folder / f"{name}.png")
        ids = np.zeros((192, 192), np.int64)
        purple = rgb[..., 2] > rgb[..., 0] + 20
        from scipy import ndimage

        ids = ndimage.label(purple)[0]
        text = "192 192\n" + " ".join(map(str, ids.ravel()))
        (folder / f"{name}_mask.txt").write_text(text)


def test_training_writes_a_loadable_model(tmp_path):
    import dataclasses

    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry
    from napari_histo_ai.training.magnification import train_magnification_sync

    _fake_miccai(tmp_path / "miccai_nuclei_seg")
    out = tmp_path / "w.safetensors"
    seen = []
    record = train_magnification_sync(
        tmp_path,
        out,
        steps=2,
        batch_size=4,
        patch=32,
        widths=(4, 4, 8, 8),
        use_cmu=False,
        recalibration_batches=2,
        progress=seen.append,
    )
    assert [s["step"] for s in seen] == [1, 2]
    assert all(math.isfinite(s["loss_direct"]) and math.isfinite(s["loss_area"]) for s in seen)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["steps"] == 2
    assert "miccai/image03" in record["split"]["held_out_groups"]
    assert {"fusion", "direct", "area", "classical"} <= set(record["metrics"])
    spec = load_registry().get("magnification-shallownet")
    spec = dataclasses.replace(
        spec,
        weights=out,
        kwargs=record["kwargs"],
        io=dataclasses.replace(spec.io, patch_size=32),
    )
    predictor = load_model(spec, device="cpu")
    assert predictor.module.alpha == pytest.approx(0.2)


def test_registered_model_runs_through_the_engine(tmp_path):
    from PIL import Image

    from napari_histo_ai.inference.engine import run_model_sync
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    cmu = open_image(real(CMU))
    # a tissue-rich field of the held-out (bottom 40 %) part of the CMU-1 region
    crop = cmu.read_region((2100, 1100), (384, 384))
    Image.fromarray(crop).save(tmp_path / "cmu_crop.png")  # a PNG: no mpp, no objective
    spec = load_registry().get("magnification-shallownet")
    assert spec.io.mpp is None and not spec.dense
    pyramid = open_image(tmp_path / "cmu_crop.png")
    result = run_model_sync(pyramid, load_model(spec, device="cpu"), tmp_path / "run")
    assert set(result.aggregates) == {"magnification", "direct magnification", "area magnification"}
    agg = result.aggregates["magnification"]
    assert agg["method"] == "median" and 8 <= agg["n_tiles"] <= 16
    # the crop is at 20×: the image-level estimate must land within one class of it
    assert mag.steps_apart(agg["value"], 20) <= 1


# --------------------------------------------------------------------------- widget


@pytest.mark.gui
def test_open_widget_estimates_and_fills_a_missing_mpp(make_napari_viewer, qtbot, monkeypatch):
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-histo-ai", "Open slide / volume")
    widget.set_path(real(TCGA))
    widget.inspect_file()
    assert not widget.use_estimate_button.isEnabled()
    worker = widget.estimate_magnification()
    assert worker is not None
    qtbot.waitUntil(lambda: widget._estimate_worker is None, timeout=60_000)
    estimate = widget._estimate
    assert estimate is not None and estimate.magnification in mag.MAGNIFICATIONS
    assert f"{estimate.magnification:g}×" in widget.magnification_label.text()
    assert widget.use_estimate_button.isEnabled()
    widget.use_estimated_mpp()
    assert widget.mpp_spin.value() == pytest.approx(10 / estimate.magnification, abs=1e-4)
    layers = widget.open_file()
    assert tuple(layers[0].scale) == pytest.approx((estimate.mpp, estimate.mpp), abs=1e-4)
    assert shown == []

    widget.set_path(real(CMU))  # a pixel size in the file: the estimate must not replace it
    worker = widget.estimate_magnification()
    qtbot.waitUntil(lambda: widget._estimate_worker is None, timeout=60_000)
    assert widget._estimate.magnification == 20 and not widget.use_estimate_button.isEnabled()


def test_batch_norm_recalibration_matches_inference_statistics():
    import torch

    from napari_histo_ai.training.magnification import recalibrate_batch_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(4)
    )
    x = np.random.default_rng(0).random((8, 3, 12, 12), dtype=np.float32) + 1.0
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.from_numpy(x))  # running statistics under dropout
    recalibrate_batch_norm(net, [x[:4], x[4:]])
    assert not net.training and net[2].momentum == pytest.approx(0.1)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).numpy()
    # statistics now those of the dropout-free activations: normalised output, mean 0
    assert np.abs(y.mean(axis=(0, 2, 3))).max() < 1e-4
