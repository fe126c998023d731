"""`evaluate` results carry `curves` / `confusion`; `evaluate --plots` writes the PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_histo_ai import metrics, plots
from napari_histo_ai.errors import HistoAIError
from tests.conftest import real


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)


def _assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert np.asarray(im.convert("L")).std() > 0


def _check_entries(result: dict) -> None:
    """The convention `plots.evaluation_plots` reads, JSON-able."""
    result = json.loads(json.dumps(result, default=float))
    for entry in result.get("curves", {}).values():
        assert len(entry["y_true"]) == len(entry["scores"]) <= plots.MAX_CURVE_SAMPLES
        assert set(entry["y_true"]) <= {0, 1}
    for entry in result.get("confusion", {}).values():
        m = np.asarray(entry["matrix"])
        assert m.shape == (len(entry["classes"]),) * 2 and (m >= 0).all()


# ------------------------------------------------------------------ CLI, real data


def test_cli_evaluate_plots_idc_tumour(tmp_path: Path, capsys) -> None:
    from napari_histo_ai.cli import main

    data = real("idc_breast_patches")
    out_json, out_dir = tmp_path / "m.json", tmp_path / "plots"
    argv = ["evaluate", "--model", "idc-tumour", "--data", str(data)]
    assert main([*argv, "--json-out", str(out_json), "--plots", str(out_dir)]) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert shown == json.loads(out_json.read_text())
    assert "curves" not in shown  # the per-patch arrays stay out of the printed JSON
    matrix = np.asarray(shown["confusion"]["patch"]["matrix"])
    assert matrix.sum() == shown["metrics"]["n"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(shown["metrics"]["accuracy"], abs=1e-4)
    written = sorted(out_dir.iterdir())
    assert [p.name for p in written] == ["idc-tumour_confusion_patch.png", "idc-tumour_pr_roc.png"]
    for p in written:
        _assert_png(p)
        assert str(p) in captured.err

    assert main([*argv, "--with-curves"]) == 0
    full = json.loads(capsys.readouterr().out)
    curve = full["curves"]["patch"]
    assert len(curve["y_true"]) == shown["metrics"]["n"]
    # the plotted curve is the one the reported AUC comes from
    auc = metrics.roc_auc(curve["y_true"], curve["scores"])
    assert auc == pytest.approx(shown["metrics"]["auc"], abs=1e-4)


# ------------------------------------------------------------------ modules, real data


def test_nuclei_pixel_curve_and_confusion_one_tile() -> None:
    from napari_histo_ai.training import nuclei

    result = nuclei.evaluate(real("miccai_nuclei_seg"), names=["image03"])
    _check_entries(result)
    m = np.asarray(result["confusion"]["pixel"]["matrix"])
    scores = result["per_image"]["image03"]
    # every pixel counts in the confusion; its precision / recall are the reported ones
    tp, fp, fn = m[1, 1], m[0, 1], m[1, 0]
    assert tp / (tp + fp) == pytest.approx(scores["precision"], abs=1e-3)
    assert tp / (tp + fn) == pytest.approx(scores["recall"], abs=1e-3)
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(scores["dice"], abs=1e-3)
    curve = result["curves"]["pixel"]
    assert len(curve["y_true"]) == min(m.sum(), plots.MAX_CURVE_SAMPLES)
    # a uniform subsample: the nucleus fraction matches the whole tile's
    assert np.mean(curve["y_true"]) == pytest.approx(m[1].sum() / m.sum(), abs=0.01)
    assert metrics.roc_auc(curve["y_true"], curve["scores"]) > 0.9


def test_mitosis_convnet_tile_curves_match_its_metrics(tmp_path: Path) -> None:
    from napari_histo_ai.training import mitosis

    result = mitosis.evaluate(real("ami_br_mitosis"), model="mitosis-convnet")
    _check_entries(result)
    tiles = result["metrics"]["convnet_tiles"]
    for subset, scores in tiles.items():
        name = f"convnet_tiles/{subset}"
        assert result["confusion"][name]["matrix"] == scores["confusion"]
        curve = result["curves"][name]
        assert len(curve["y_true"]) == scores["tiles"]
        auc = metrics.roc_auc(curve["y_true"], curve["scores"])
        assert auc == pytest.approx(scores["roc_auc"], abs=1e-4)
    paths = plots.evaluation_plots(result, tmp_path, stem="mitosis-convnet")
    assert len(paths) == 1 + len(tiles)
    for p in paths:
        _assert_png(p)


def test_mammogram_lesion_confusion_matches_the_detection_counts() -> None:
    from napari_histo_ai.training import mammogram as mm

    result = mm.evaluate(real("mini_mias"))
    _check_entries(result)
    (entry,) = result["confusion"].values()
    assert entry["classes"] == [*mm.CLASSES, "none"]
    m = np.asarray(entry["matrix"])
    k = len(mm.CLASSES)
    at = result["at_threshold"]  # class-agnostic OR matching at the operating threshold
    assert m[:k, :k].sum() == at["tp"]
    assert m[k, :k].sum() == at["fp"]
    assert m[:k].sum() == result["n_lesions"]
    assert m[k, k] == 0
    film = result["curves"]["film (max class probability)"]
    assert len(film["y_true"]) == result["n_films"]
    assert sum(film["y_true"]) == result["n_films_with_lesions"]


# ------------------------------------------------------------------ helpers, synthetic


def test_tissue_fcn_window_scores_fill_the_pixel_confusion() -> None:
    torch = pytest.importorskip("torch")
    from napari_histo_ai.training import tissue

    rng = np.random.default_rng(0)
    n, size = 5, 12
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (n, size, size)).astype(np.int64)
    masks[:, :2] = 255  # unlabelled pixels do not count
    centre = np.zeros((size, size), bool)
    centre[2:10, 2:10] = True
    logits = torch.from_numpy(rng.normal(size=(n, 3, size, size)).astype(np.float32))

    def model(x: torch.Tensor) -> torch.Tensor:
        return logits[: len(x)]

    confusion = np.zeros((3, 3), np.int64)
    scores, accuracy = tissue._window_scores(model, images, masks, centre, confusion=confusion)
    plain, same = tissue._window_scores(model, images, masks, centre)
    np.testing.assert_array_equal(scores, plain)  # the metrics do not change
    assert same == accuracy
    labelled = centre & (masks != 255)
    assert confusion.sum() == labelled.sum()
    assert np.trace(confusion) / confusion.sum() == pytest.approx(accuracy)
    expected = metrics.confusion_matrix(
        masks[labelled], logits.numpy().argmax(1)[labelled], n_classes=3
    )
    np.testing.assert_array_equal(confusion, expected)
    entries = tissue._plot_entries(np.array([0, 1, 1, 0, 1]), scores, pixels=confusion)
    assert entries["confusion"]["pixel (weak labels)"]["classes"] == list(tissue.WEAK_CLASSES)
    _check_entries(entries)


def test_mri_voxel_sample_counts_every_voxel() -> None:
    from napari_histo_ai.training import mri

    rng = np.random.default_rng(1)
    sample = mri._VoxelSample()
    truths, probs = [], []
    for shape in [(4, 300, 300), (3, 200, 200)]:  # 360k + 120k voxels
        truth = rng.random(shape) < 0.05
        prob = np.clip(truth * 0.6 + rng.random(shape) * 0.5, 0, 1).astype(np.float32)
        sample.add(truth, prob, 0.5)
        truths.append(truth.ravel())
        probs.append(prob.ravel())
    entries = sample.entries()
    _check_entries(entries)
    t, p = np.concatenate(truths), np.concatenate(probs)
    expected = metrics.confusion_matrix(t, p >= 0.5, n_classes=2)
    assert entries["confusion"]["voxel"]["matrix"] == expected.tolist()
    curve = entries["curves"]["voxel"]
    assert len(curve["y_true"]) == plots.MAX_CURVE_SAMPLES
    auc = metrics.roc_auc(curve["y_true"], curve["scores"])
    assert auc == pytest.approx(metrics.roc_auc(t, p), abs=0.01)
    assert mri._VoxelSample().entries() == {}


def test_magnification_confusions_are_the_reported_ones() -> None:
    from napari_histo_ai.training import magnification as mg

    truth = np.array([5, 5, 10, 20, 40, 40, 40], dtype=np.float64)
    predicted = np.array([5, 8, 10, 20, 40, 30, np.nan])
    scores = {"fusion": mg.magnification_scores(truth, predicted)}
    entries = mg._plot_entries(scores)
    (entry,) = entries["confusion"].values()
    assert entry["classes"] == scores["fusion"]["classes"]
    m = np.asarray(entry["matrix"])
    assert m.sum() == len(truth) - 1  # the undetermined prediction is in no column
    assert np.trace(m) == 4 == round(scores["fusion"]["accuracy"] * len(truth))
    assert m[6].tolist() == [0, 0, 0, 0, 0, 1, 1]  # 40x: one right, one read as 30x
    assert "curves" not in entries


def test_breakhis_image_and_crop_entries() -> None:
    from napari_histo_ai.training import benign_malignant as bm

    def image(name: str, label: int) -> bm.BreakHisImage:
        return bm.BreakHisImage(
            name=name,
            image=np.zeros((4, 4, 3), np.uint8),
            label=label,
            tumour_type="DC" if label else "A",
            slide="14-1",
            patient="14-1",
            magnification=100,
        )

    predictions = [
        (image("a", 0), np.array([[0.9, 0.1], [0.7, 0.3]])),
        (image("b", 1), np.array([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])),
        (image("c", 1), np.array([[0.8, 0.2]])),
    ]
    entries = bm._plot_entries(predictions, "average")
    _check_entries(entries)
    assert entries["curves"]["image (average)"]["y_true"] == [0, 1, 1]
    assert entries["curves"]["crop"]["y_true"] == [0, 0, 1, 1, 1, 1]
    reported = bm.image_metrics(predictions)["image_level"]["average"]["all"]
    assert entries["confusion"]["image (average)"]["matrix"] == reported["confusion_matrix"]
    assert entries["confusion"]["crop"]["matrix"] == [[2, 0], [2, 2]]


def test_evaluation_plots_names_a_result_without_entries(tmp_path: Path) -> None:
    with pytest.raises(HistoAIError, match=r"neither 'curves' nor 'confusion'.*mean"):
        plots.evaluation_plots({"model": "x", "mean": {"dice": 0.5}}, tmp_path)
