"""Nucleus U-Net: MICCAI loader, metrics, a tiny training run, and the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_ai.errors import HistoAIError, ImageReadError, ModelInputError
from napari_histo_ai.training.nuclei import (
    detection_scores,
    load_miccai_nuclei,
    read_miccai_mask,
    segmentation_scores,
    train_nuclei,
    train_nuclei_sync,
)

from .conftest import real

WEIGHTS = (
    Path(__file__).resolve().parents[1]
    / "src/napari_histo_ai/models/weights/nuclei-unet-v1.safetensors"
)


def _write_mask(path: Path, labels: np.ndarray) -> None:
    height, width = labels.shape
    body = "\n".join(str(int(v)) for v in labels.ravel())
    path.write_text(f"{width} {height}\n{body}\n", encoding="ascii")


def _write_tile(folder: Path, name: str, *, size: int = 64, seed: int = 0) -> np.ndarray:
    """A pink tile with dark purple disc 'nuclei'; returns the instance labels."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for nucleus in range(1, 6):
        r, c = rng.integers(8, size - 8, size=2)
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= rng.integers(9, 30)] = nucleus
    rgba = np.empty((size, size, 4), np.uint8)
    rgba[..., :3] = (235, 170, 200)
    rgba[labels > 0, :3] = (90, 40, 130)
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(folder / f"{name}.png")
    _write_mask(folder / f"{name}_mask.txt", labels)
    return labels


@pytest.fixture
def miccai(tmp_path: Path) -> Path:
    for seed, name in enumerate(("image01", "image02", "image03", "image08")):
        _write_tile(tmp_path, name, seed=seed)
    return tmp_path


def test_read_mask_is_row_major(tmp_path: Path) -> None:
    """The example of the challenge's README: 5 × 4 px, x fastest."""
    expected = np.array(
        [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [1, 1, 2, 0, 0], [0, 2, 2, 2, 0]], np.int32
    )
    _write_mask(tmp_path / "m.txt", expected)
    labels = read_miccai_mask(tmp_path / "m.txt")
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("5 x\n0\n", "width height"), ("2 2\n0\n1\n1\n", "header says 2 × 2 = 4"), ("", "width")],
)
def test_read_mask_rejects_malformed(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "m.txt").write_text(text)
    with pytest.raises(ImageReadError, match=problem):
        read_miccai_mask(tmp_path / "m.txt")


def test_loader_resamples_40x_and_keeps_20x(miccai: Path) -> None:
    samples = {s.name: s for s in load_miccai_nuclei(miccai)}
    assert sorted(samples) == ["image01", "image02", "image03", "image08"]
    s20, s40 = samples["image01"], samples["image08"]
    assert (s20.source_mpp, s40.source_mpp) == (0.5, 0.25)
    assert s20.image.shape == (64, 64, 3) and s20.image.dtype == np.uint8
    assert s40.image.shape == (32, 32, 3) and s40.mask.shape == (32, 32)
    assert s40.instances.dtype == np.int32 and s40.mask.dtype == bool
    np.testing.assert_array_equal(s40.mask, s40.instances > 0)
    # nuclei stay dark, background stays pink after area averaging
    assert s40.image[s40.mask].mean() < s40.image[~s40.mask].mean()


def test_loader_rejects_a_mask_of_the_wrong_size(miccai: Path) -> None:
    _write_mask(miccai / "image02_mask.txt", np.zeros((60, 64), np.int32))
    with pytest.raises(ImageReadError) as info:
        load_miccai_nuclei(miccai)
    message = str(info.value)
    assert "image02_mask.txt" in message and "image02.png" in message
    assert "64 × 60" in message and "64 × 64" in message


def test_loader_errors_name_the_problem(miccai: Path, tmp_path: Path) -> None:
    with pytest.raises(HistoAIError, match="not found"):
        load_miccai_nuclei(tmp_path / "absent")
    (miccai / "image03_mask.txt").unlink()
    with pytest.raises(ImageReadError, match=r"image03_mask\.txt"):
        load_miccai_nuclei(miccai)
    _write_tile(miccai, "image03")
    _write_tile(miccai, "image42")  # not in the challenge's magnification table
    with pytest.raises(HistoAIError, match="mpp_by_name"):
        load_miccai_nuclei(miccai)
    samples = load_miccai_nuclei(miccai, mpp_by_name={"image42": 0.25}, names=["image42"])
    assert samples[0].image.shape == (32, 32, 3)


def test_metrics_on_known_masks() -> None:
    truth = np.zeros((40, 40), np.int32)
    truth[5:15, 5:15] = 1
    truth[25:35, 25:35] = 2
    predicted = np.zeros((40, 40), bool)
    predicted[5:15, 5:15] = True  # one nucleus exactly, the other missed
    scores = segmentation_scores(predicted, truth > 0)
    assert scores == pytest.approx({"dice": 2 * 100 / 300, "precision": 1.0, "recall": 0.5})
    detection = detection_scores(predicted.astype(np.float32), truth, mpp=0.5)
    assert detection["detection_f1"] == pytest.approx(2 / 3)
    assert detection["detection_precision"] == 1.0 and detection["detection_recall"] == 0.5


@pytest.mark.parametrize(("depth", "shape"), [(3, (24, 40)), (3, (64, 64)), (2, (12, 20))])
def test_unet_output_has_the_input_size(depth: int, shape: tuple[int, int]) -> None:
    from napari_histo_ai.models.architectures.unet import UNet

    model = UNet(base=4, depth=depth, out_channels=2).eval()
    assert model.size_multiple == 2**depth
    with torch.no_grad():
        out = model(torch.rand(2, 3, *shape))
    assert out.shape == (2, 2, *shape)


def test_unet_rejects_sizes_off_the_pooling_grid() -> None:
    from napari_histo_ai.models.architectures.unet import UNet

    model = UNet(base=4)
    with pytest.raises(ModelInputError, match="multiples of 8"):
        model(torch.rand(1, 3, 30, 32))
    default = UNet()
    assert 100_000 <= sum(p.numel() for p in default.parameters()) <= 500_000
    assert default.receptive_field == 96


def test_tiny_training_writes_loadable_weights_and_a_record(miccai: Path) -> None:
    from safetensors.torch import load_file

    from napari_histo_ai.models.architectures.unet import UNet

    out = miccai / "out" / "tiny.safetensors"
    options = dict(
        seed=3, epochs=1, steps_per_epoch=2, batch_size=2, patch=32, base=4, val_names=["image03"]
    )
    generator = train_nuclei(miccai, out, **options)
    progress = []
    with pytest.raises(StopIteration) as stop:
        while True:
            progress.append(next(generator))
    assert [p["step"] for p in progress] == [1, 2]
    assert all(set(p) >= {"epoch", "step", "loss"} for p in progress)
    record = stop.value.value
    assert record["split"] == {
        "train": ["image01", "image02", "image08"],
        "validation": ["image03"],
    }

    state = load_file(out)
    assert all(t.dtype == torch.float32 for t in state.values())
    model = UNet(**record["kwargs"])
    model.load_state_dict(state, strict=True)

    written = json.loads(out.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(record))
    for key in ("metrics", "split", "seed", "epochs", "steps", "command", "data", "mpp"):
        assert key in written
    assert {"torch_version", "train_time_s"} <= set(written)
    scores = written["metrics"]["per_image"]["image03"]
    assert {"dice", "precision", "recall", "detection_f1"} <= set(scores)
    assert set(written["metrics"]["mean"]) == set(scores)
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave nothing behind
    assert out.stat().st_mode & 0o777 == 0o644  # readable once packaged

    again = train_nuclei_sync(miccai, miccai / "again.safetensors", **options)
    assert again["metrics"] == record["metrics"]  # seeded: same run, same numbers


def test_shipped_weights_segment_real_nuclei() -> None:
    """One forward pass of the packaged model, loaded through the registry as users get
    it, over held-out image03 at 0.5 µm/px."""
    folder = real("miccai_nuclei_seg")
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry
    from napari_histo_ai.training.nuclei import predict_probability

    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert "image03" in record["split"]["validation"]
    assert WEIGHTS.stat().st_size < 2_000_000
    spec = load_registry(user_dir=Path("/nonexistent"), entry_points=False).get("nuclei-unet")
    assert spec.weights == WEIGHTS.resolve() and dict(spec.kwargs) == record["kwargs"]
    model = load_model(spec, device="cpu").module
    (sample,) = load_miccai_nuclei(folder, mpp=0.5, names=["image03"])
    probability = predict_probability(model, sample.image)
    assert probability.shape == sample.mask.shape
    assert segmentation_scores(probability >= 0.5, sample.mask)["dice"] >= 0.6
