"""Paper 002's benign / malignant ResNet: architecture, exist / exist3 aggregates, sliding
crops equal to the engine's tiling, patient folds, training record, registry entry, and
``napari-histo-ai predict`` on a real BreakHis image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_ai.errors import HistoAIError, ModelSpecError
from napari_histo_ai.inference.objects import aggregate, exist_aggregate
from napari_histo_ai.inference.tiling import PatchGrid
from napari_histo_ai.models.architectures import build_architecture
from napari_histo_ai.models.architectures.resnet import BreakHisResNet
from napari_histo_ai.models.spec import ModelSpec, OutputSpec
from napari_histo_ai.training import benign_malignant as bm

from .conftest import real

CLASS_SPEC = OutputSpec(name="malignancy", kind="class", channels=(0, 1), classes=bm.CLASSES)


def _spec_with(aggregate_name: str, kind: str = "class") -> ModelSpec:
    output = {"name": "out", "kind": kind, "channels": [0, 1], "aggregate": aggregate_name}
    return ModelSpec.from_dict(
        {
            "name": "t",
            "task": "t",
            "version": "1",
            "format": "builtin",
            "architecture": "tiny_classifier",
            "dense": False,
            "io": {"patch_size": 32},
            "outputs": [output],
        }
    )


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize(
    ("kwargs", "head_side"),
    [
        ({"stem_kernel": 7, "downsample": "pool"}, 32),
        ({"stem_kernel": 3, "downsample": "stride"}, 32),
    ],
)
def test_resnet_halves_through_five_stages(kwargs: dict, head_side: int) -> None:
    torch.manual_seed(0)
    net = BreakHisResNet(base=4, blocks=[1, 2, 1, 1, 1], **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    head = net.head(x)
    assert head.shape == (2, 4, head_side, head_side)  # 16-channel head at H/2 (base 4 here)
    sides, channels, y = [], [], head
    for stage in net.stages:
        y = stage(y)
        sides.append(y.shape[-1])
        channels.append(y.shape[1])
    assert sides == [32, 16, 8, 4, 2]  # H/2 ... H/32
    assert channels == [4, 8, 16, 32, 64]  # base · (1, 2, 4, 8, 16)
    assert len(net.stages[1]) == 2
    logits = net(x)
    assert logits.shape == (2, 2)
    assert isinstance(net.dropout, torch.nn.Dropout) and net.dropout.p == 0.5


def test_resnet_paper_size_and_registry_name() -> None:
    net = build_architecture("breakhis_resnet", base=16, blocks=5)
    assert isinstance(net, BreakHisResNet)
    assert net.fc.in_features == 256  # 16 → 256 channels
    n = sum(p.numel() for p in net.parameters())
    assert 7_000_000 < n < 8_000_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downsample": "avg"},
        {"stem_kernel": 4},
        {"blocks": [1, 1]},
        {"blocks": 0},
        {"dropout": 1.0},
    ],
)
def test_resnet_rejects_bad_kwargs(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BreakHisResNet(**kwargs)
    with pytest.raises(ModelSpecError, match="does not accept"):
        build_architecture("breakhis_resnet", **kwargs)


# --------------------------------------------------------------------------- aggregates


def test_exist_and_exist3_rules() -> None:
    benign = [0.9, 0.1]
    one = np.array([benign, benign, [0.2, 0.8], benign])
    three = np.array([[0.3, 0.7], benign, [0.4, 0.6], [0.45, 0.55], benign])
    spec1 = _spec_with("exist").outputs[0]
    spec3 = _spec_with("exist3").outputs[0]
    r = aggregate(one, spec1)
    assert r["class"] == "class 1" and r["label"] == 1 and r["n_tiles"] == 4
    assert r["scores"]["class 1"] == pytest.approx(0.8)
    assert aggregate(one, spec3)["label"] == 0  # only one malignant crop
    r3 = aggregate(three, spec3)
    assert r3["label"] == 1
    assert r3["scores"]["class 1"] == pytest.approx(0.55)  # 3rd largest p(malignant)
    # NaN rows (background tiles) are ignored; fewer than 3 tiles can never reach 3
    with_nan = np.vstack([three[:2], [[np.nan, np.nan]]])
    r_nan = aggregate(with_nan, spec3)
    assert r_nan["label"] == 0 and r_nan["n_tiles"] == 2
    assert aggregate(np.array([benign] * 6), spec1)["label"] == 0


def test_exist_with_three_classes_takes_the_most_voted_positive_class() -> None:
    v = np.array([[0.1, 0.2, 0.7], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7], [0.8, 0.1, 0.1]])
    label, scores = exist_aggregate(v, at_least=1)
    assert label == 2
    assert scores.sum() == pytest.approx(1.0)
    assert exist_aggregate(v, at_least=4)[0] == 0


def test_exist_is_refused_for_magnification_outputs() -> None:
    with pytest.raises(ModelSpecError, match="only applies to kind 'class'"):
        _spec_with("exist3", kind="magnification")


@pytest.mark.parametrize("method", bm.AGGREGATIONS)
def test_training_aggregation_matches_the_engine(method: str) -> None:
    rng = np.random.default_rng(1)
    spec = OutputSpec(name="m", kind="class", channels=(0, 1), classes=bm.CLASSES, aggregate=method)
    for n in (1, 2, 3, 7, 60):
        for _ in range(20):
            p1 = rng.beta(0.5, 0.5, size=n) if rng.random() < 0.5 else rng.random(n) * 0.6
            probs = np.stack([1 - p1, p1], axis=1)
            label, score = bm.aggregate_image(probs, method)
            engine = aggregate(probs, spec)
            assert label == engine["label"], (method, probs)
            if method in ("exist", "exist3", "vote", "average"):
                assert score == pytest.approx(engine["scores"]["malignant"])


# --------------------------------------------------------------------------- data, crops


@pytest.mark.parametrize(("h", "w"), [(328, 500), (96, 96), (100, 250), (60, 70)])
def test_sliding_crops_follow_the_engine_grid(h: int, w: int) -> None:
    image = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3).astype(np.uint8)
    crops, origins = bm.sliding_crops(image, patch=96, overlap=48)
    grid = PatchGrid(h, w, 96, 48)
    rows, cols = grid.n_tiles
    expected = [grid.input_origin(i, j) for i in range(rows) for j in range(cols)]
    assert [tuple(o) for o in origins] == expected
    assert crops.shape == (rows * cols, 96, 96, 3)
    y, x = origins[-1]
    if h >= 96 and w >= 96:
        np.testing.assert_array_equal(crops[-1], image[y : y + 96, x : x + 96])
    else:
        assert (crops[0][h:] == 255).all()  # padded like the engine (white)


def test_real_breakhis_folds_are_patient_disjoint(data_dir: Path) -> None:
    images = bm.load_breakhis(real("breakhis_resized"))
    assert len(images) == 20
    assert sum(im.label for im in images) == 11
    assert {im.magnification for im in images} == {40, 100, 200, 400}
    folds = bm.patient_folds(images, 4)
    flat = [p for f in folds for p in f]
    assert len(flat) == len(set(flat)) == len({im.patient for im in images})
    assert "14-22549" in flat and "14-13412" in flat  # letter suffixes / types grouped
    for f in folds:
        labels = [im.label for im in images if im.patient in f]
        assert 0 in labels and 1 in labels  # every held-out fold has both classes


def test_breakhis_name_contradicting_its_folder_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "benign" / "100X"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "SOB_M_DC-14-1-100-001.png")
    with pytest.raises(HistoAIError, match="name says malignant"):
        bm.load_breakhis(tmp_path)
    with pytest.raises(HistoAIError, match="BreakHis folder not found"):
        bm.load_breakhis(tmp_path / "missing")


def test_image_metrics_per_magnification() -> None:
    def im(name: str, label: int, mag: int) -> bm.BreakHisImage:
        return bm.BreakHisImage(name, np.zeros((1, 1, 3), np.uint8), label, "X", name, name, mag)

    mal = np.array([[0.1, 0.9]] * 4)
    ben = np.array([[0.9, 0.1]] * 4)
    one_bad = np.array([[0.9, 0.1]] * 3 + [[0.2, 0.8]])
    preds = [(im("a", 1, 40), mal), (im("b", 0, 40), one_bad), (im("c", 0, 100), ben)]
    result = bm.image_metrics(preds)
    vote, exist = result["image_level"]["vote"], result["image_level"]["exist"]
    assert vote["all"]["accuracy"] == 1.0 and vote["40x"]["auc"] == 1.0
    assert vote["100x"]["auc"] is None  # one class only
    assert exist["all"]["accuracy"] == pytest.approx(2 / 3, abs=1e-4)  # one crop flips b
    assert exist["40x"]["confusion_matrix"] == [[0, 1], [0, 1]]
    assert result["crop_level"]["all"]["n_crops"] == 12
    assert result["per_image"]["b"]["exist"]["class"] == "malignant"


# --------------------------------------------------------------------------- training


def _synthetic_data(root: Path) -> Path:
    """A tiny BreakHis + IDC layout: 4 patients (2 B, 2 M), 8 IDC patches."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (cls, kind) in enumerate([("B", "F"), ("B", "A"), ("M", "DC"), ("M", "LC")]):
        folder = root / bm.BREAKHIS / ("benign" if cls == "B" else "malignant") / "100X"
        folder.mkdir(parents=True, exist_ok=True)
        base = 200 if cls == "B" else 90
        pixels = rng.integers(base - 40, base + 40, size=(70, 90, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"SOB_{cls}_{kind}-14-{100 + i}-100-001.png")
    idc = root / bm.IDC / "patients" / "9000"
    idc.mkdir(parents=True)
    for k in range(8):
        label = k % 2
        base = 90 if label else 200
        pixels = rng.integers(base - 40, base + 40, size=(50, 50 - k, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(idc / f"9000_idx5_x{k}_y0_class{label}.png")
    return root


def test_training_writes_weights_and_a_cross_validated_record(tmp_path: Path) -> None:
    data = _synthetic_data(tmp_path / "data")
    out = tmp_path / "w" / "bm.safetensors"
    arch = dict(bm.ARCH, base=2, blocks=1)
    seen: list[dict] = []
    record = bm.train_breakhis_sync(
        data, out, progress=seen.append, folds=2, steps=3, batch_size=4, patch=32, arch=arch
    )
    assert len(seen) == 6 and seen[-1]["fold"] == 1
    assert out.is_file() and out.with_suffix(".json").is_file()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["split"]["folds"] == record["split"]["folds"]
    cv = record["metrics"]["cross_validation"]
    assert cv["image_level"]["vote"]["all"]["n_images"] == 4  # every image out of fold
    held = record["metrics"]["held_out"]["image_level"]["exist3"]["all"]
    assert held["n_images"] == 2 and held["n_benign"] == 1
    assert record["split"]["idc_patches"] == 8
    from safetensors.torch import load_file

    state = load_file(str(out))
    net = BreakHisResNet(**arch)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all("num_batches_tracked" in k for k in missing)
    with pytest.raises(HistoAIError, match="multiple of 32"):
        bm.train_breakhis_sync(data, out, patch=40)


# --------------------------------------------------------------------------- shipped model


def test_registry_entry_is_a_half_overlap_tile_model() -> None:
    from napari_histo_ai.models.registry import load_registry

    spec = load_registry().get(bm.MODEL)
    assert not spec.dense and spec.activation == "softmax"
    assert spec.io.overlap * 2 == spec.io.patch_size  # 50 % overlap
    assert spec.io.mpp is None  # runs at the image's own pixels
    assert spec.io.normalisation.method == "clahe"
    (out,) = spec.outputs
    assert out.kind == "class" and out.classes == bm.CLASSES
    assert spec.weights is not None and spec.weights.is_file()
    assert spec.weights.stat().st_size < 3_500_000
    record = json.loads(spec.weights.with_suffix(".json").read_text())
    assert record["kwargs"] == dict(spec.kwargs)
    assert record["patch"] == spec.io.patch_size and record["normalisation"] == "clahe"


def test_predict_cli_on_a_real_breakhis_image(tmp_path: Path) -> None:
    """The engine's per-crop probabilities equal the training code's, and the summary
    carries the image-level aggregate."""
    import zarr
    from PIL import Image

    from napari_histo_ai.cli import main
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    source = real("breakhis_resized/malignant/100X/SOB_M_DC-14-2523-100-023.png")
    rgb = np.asarray(Image.open(source).convert("RGB"))[:144, :192]
    path = tmp_path / "SOB_M_DC-14-2523-100-023-crop.png"
    Image.fromarray(rgb).save(path)
    out = tmp_path / "run"
    assert main(["predict", str(path), "--model", bm.MODEL, "--out", str(out)]) == 0
    (run,) = out.glob("*.zarr")
    summary = json.loads((run / "summary.json").read_text())
    agg = summary["aggregates"]["malignancy"]
    crops, _ = bm.sliding_crops(rgb, patch=96, overlap=48)
    assert agg["n_tiles"] == len(crops) == 6
    assert agg["class"] in bm.CLASSES and agg["method"] == "vote"
    assert sum(agg["scores"].values()) == pytest.approx(1.0)
    tiles = np.asarray(zarr.open_group(str(run), mode="r")["tiles/0"])  # (K, rows, cols)
    assert tiles.shape == (2, 2, 3)
    spec = load_registry().get(bm.MODEL)
    expected = bm.predict_crops(load_model(spec, device="cpu"), crops, spec.io.normalisation)
    np.testing.assert_allclose(tiles.reshape(2, -1).T, expected, atol=1e-5)
    label, _ = bm.aggregate_image(expected, "vote")
    assert agg["label"] == label


def test_evaluate_scores_the_held_out_patients(data_dir: Path) -> None:
    from napari_histo_ai.models.registry import load_registry

    real("breakhis_resized")  # skips without the data

    weights = load_registry().get(bm.MODEL).weights
    assert weights is not None
    record = json.loads(weights.with_suffix(".json").read_text())
    held_names = record["split"]["held_out_images"]
    result = bm.evaluate(data_dir, model=bm.MODEL, names=held_names[:1])
    held = record["split"]["folds"][record["split"]["ship_fold"]]
    assert result["split"]["held_out_patients"] == held
    assert result["split"]["images"] == held_names[:1]
    vote = result["metrics"]["image_level"]["vote"]["all"]
    assert vote["n_images"] == 1
    # the record's held-out scores are reproduced from the shipped weights file
    mine = result["metrics"]["per_image"][held_names[0]]
    theirs = record["metrics"]["held_out"]["per_image"][held_names[0]]
    for method in bm.AGGREGATIONS:
        assert mine[method]["score"] == pytest.approx(theirs[method]["score"], abs=2e-4)
        assert mine[method]["class"] == theirs[method]["class"]
