"""Train the default nucleus-segmentation U-Net on the MICCAI 2015 nuclei tiles.

Data: the training set of the MICCAI 2015 digital-pathology nucleus segmentation
challenge (TCGA brain-tumour H&E tiles): ``imageXX.png`` (RGBA, alpha constant) with
``imageXX_mask.txt`` (ASCII: ``width height`` then one nucleus id per pixel, row-major,
0 = background). Tiles come from slides scanned at 20x (≈ 0.5 µm/px) or 40x
(≈ 0.25 µm/px); `load_miccai_nuclei` brings every tile to one resolution (0.5 µm/px by
default, the model's input resolution).

Training (`train_nuclei`, a generator yielding one progress record per step):
random ``patch`` × ``patch`` crops of the training tiles, flips / 90° rotations /
brightness, contrast, per-channel gain and saturation jitter, loss = BCE + soft Dice,
Adam with a cosine learning-rate decay, seeded (numpy and torch). Validation: the
held-out tiles, whole-image forward pass (reflect-padded to a multiple of
``2**depth``), sigmoid, threshold 0.5:

* pixel Dice, precision, recall of the thresholded mask;
* object detection: 4-connected components of the thresholded mask, matched one-to-one
  (Hungarian assignment) to the true nuclei by **centroid distance ≤ 4 µm** (8 px at
  0.5 µm/px); precision, recall, F1. No minimum component size.
* peak detection, as the inference engine finds nucleus centres: local maxima of the
  probability map (minimum distance 4 µm, probability ≥ 0.5), matched the same way.

Weights are written as a float32 safetensors file (atomically), with a JSON record
beside them (metrics, split, seed, schedule, command, data hashes, torch version,
training time).

Command line::

    python -m napari_histo_ai.training.nuclei --data DIR --out FILE [--seed N] [--epochs N]

Model contract for the registry: ``UNet(in_channels=3, out_channels=1, base=16,
depth=3)``; input RGB at 0.5 µm/px scaled to 0..1 (``x / 255``), sides multiples of 8;
output one logit channel (apply a sigmoid).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import HistoAIError, ImageReadError
from .common import (
    print_progress,
    run_to_end,
    save_weights_and_record,
    sha256,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "MICCAI_MAGNIFICATION",
    "Sample",
    "detection_scores",
    "evaluate",
    "load_miccai_nuclei",
    "main",
    "predict_probability",
    "read_miccai_mask",
    "segmentation_scores",
    "train_nuclei",
    "train_nuclei_sync",
]

#: Objective power of each tile of the challenge's training set (its README_training.txt).
MICCAI_MAGNIFICATION: dict[str, int] = {f"image{i:02d}": 20 if i <= 7 else 40 for i in range(1, 16)}
#: µm per pixel assumed for an objective power (TCGA scanners: 20x ≈ 0.5, 40x ≈ 0.25).
MPP_BY_MAGNIFICATION: dict[int, float] = {20: 0.5, 40: 0.25}

DEFAULT_VAL_NAMES = ("image03", "image11")
#: Matching radius of the detection metrics, µm.
MATCH_RADIUS_UM = 4.0
THRESHOLD = 0.5

Progress = dict[str, float]


@dataclass(frozen=True)
class Sample:
    """One annotated tile, resampled to ``mpp``.

    Parameters
    ----------
    name : str
        File stem, e.g. ``"image03"``.
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB at ``mpp``.
    mask : numpy.ndarray
        ``(H, W)`` bool, nucleus pixels (``instances > 0``).
    instances : numpy.ndarray
        ``(H, W)`` int32 nucleus ids (0 = background), nearest-neighbour resampled.
    mpp : float
        Micrometres per pixel of the arrays.
    source_mpp : float
        Micrometres per pixel of the file.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    mpp: float
    source_mpp: float


# --------------------------------------------------------------------------- loading


def read_miccai_mask(path: str | Path) -> np.ndarray:
    """Read a MICCAI 2015 ASCII instance mask.

    Parameters
    ----------
    path : str or Path
        ``imageXX_mask.txt``: first line ``width height``, then ``width · height``
        integers, row-major (x fastest), 0 = background, 1..N = nucleus id.

    Returns
    -------
    numpy.ndarray
        ``(height, width)`` int32.

    Raises
    ------
    ImageReadError
        The file is missing, its header is not two positive integers, or it holds a
        different number of values than the header announces.
    """
    path = Path(path)
    try:
        tokens = path.read_text(encoding="ascii").split()
    except FileNotFoundError:
        raise ImageReadError(
            path, "mask file not found", "each imageXX.png needs an imageXX_mask.txt beside it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageReadError(path, f"cannot read the mask as ASCII text: {exc}") from exc
    try:
        width, height = int(tokens[0]), int(tokens[1])
    except (IndexError, ValueError):
        raise ImageReadError(
            path,
            f"the first line must be 'width height', got {' '.join(tokens[:2])!r}",
            "expected the MICCAI 2015 ASCII mask format",
        ) from None
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"mask size {width} × {height} px is not positive")
    values = tokens[2:]
    if len(values) != width * height:
        raise ImageReadError(
            path,
            f"header says {width} × {height} = {width * height} pixels but the file holds "
            f"{len(values)} values",
            "the file is truncated or not a MICCAI mask",
        )
    try:
        labels = np.array(values, dtype=np.int64)
    except ValueError:
        raise ImageReadError(path, "mask values must be integers") from None
    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise ImageReadError(
            path, f"mask ids must be 0..2**31-1, got {labels.min()} .. {labels.max()}"
        )
    return labels.astype(np.int32).reshape(height, width)


def _magnification_table(data_dir: Path) -> dict[str, int]:
    """Objective power per image stem: the challenge README's table, else the built-in one."""
    table = dict(MICCAI_MAGNIFICATION)
    readme = data_dir / "README_training.txt"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        for stem, power in re.findall(r"(image\d+)\.png\s+(\d+)\s*x", text):
            table[stem] = int(power)
    return table


def _source_mpp(
    name: str, data_dir: Path, mpp_by_name: Mapping[str, float] | None, table: dict[str, int]
) -> float:
    if mpp_by_name is not None and name in mpp_by_name:
        return float(mpp_by_name[name])
    power = table.get(name)
    if power not in MPP_BY_MAGNIFICATION:
        raise HistoAIError(
            f"{data_dir / (name + '.png')}: magnification unknown "
            f"({'not in the table' if power is None else f'{power}x'}); expected 20x or 40x "
            "from README_training.txt, or pass mpp_by_name={name: µm per pixel}"
        )
    return MPP_BY_MAGNIFICATION[power]


def _resample(
    image: np.ndarray, instances: np.ndarray, factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample by ``factor`` source pixels per output pixel.

    Integer factors: area average of ``factor × factor`` blocks for the image (the last
    partial row / column dropped); instance ids by nearest neighbour (the pixel at the
    block's centre). Other factors: anti-aliased interpolation of the image and
    nearest-neighbour instances (scikit-image ``resize``).
    """
    if abs(factor - 1.0) < 1e-6:
        return image, instances
    rounded = round(factor)
    if rounded >= 2 and abs(factor - rounded) < 1e-6:
        f = int(rounded)
        h, w = image.shape[0] // f, image.shape[1] // f
        blocks = image[: h * f, : w * f].reshape(h, f, w, f, 3).astype(np.float32)
        small = np.rint(blocks.mean(axis=(1, 3))).clip(0, 255).astype(np.uint8)
        return small, np.ascontiguousarray(instances[f // 2 : h * f : f, f // 2 : w * f : f])
    from skimage.transform import resize

    shape = (max(1, round(image.shape[0] / factor)), max(1, round(image.shape[1] / factor)))
    small = resize(image, (*shape, 3), order=1, anti_aliasing=factor > 1, preserve_range=True)
    ids = resize(instances, shape, order=0, anti_aliasing=False, preserve_range=True)
    return np.rint(small).clip(0, 255).astype(np.uint8), ids.astype(np.int32)


def load_miccai_nuclei(
    data_dir: str | Path,
    *,
    mpp: float = 0.5,
    mpp_by_name: Mapping[str, float] | None = None,
    names: Iterable[str] | None = None,
) -> list[Sample]:
    """Load the MICCAI 2015 nuclei tiles of a folder, resampled to ``mpp``.

    Parameters
    ----------
    data_dir : str or Path
        Folder holding ``imageXX.png`` and ``imageXX_mask.txt``.
    mpp : float, micrometres per pixel
        Resolution of the returned arrays (0.5 = 20x, the default model's).
    mpp_by_name : mapping of str to float, optional
        Source µm/px per image stem, overriding the magnification table
        (``README_training.txt`` in the folder, else the challenge's: image01–07 20x,
        image08–15 40x; 20x → 0.5 µm/px, 40x → 0.25 µm/px).
    names : iterable of str, optional
        Image stems to load; all ``imageXX.png`` of the folder by default.

    Returns
    -------
    list of Sample
        Sorted by name.

    Raises
    ------
    HistoAIError
        The folder is missing or holds no ``imageXX.png``, a requested name is absent,
        an image's magnification is unknown.
    ImageReadError
        An image cannot be decoded, a mask is missing or malformed, or a mask's size
        differs from its image's (the message names the file and both sizes).
    """
    from PIL import Image, UnidentifiedImageError

    data_dir = Path(data_dir)
    if mpp <= 0 or not math.isfinite(mpp):
        raise HistoAIError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    if not data_dir.is_dir():
        raise HistoAIError(
            f"{data_dir}: MICCAI nuclei folder not found (expected imageXX.png and "
            "imageXX_mask.txt files, e.g. ../shared/data/miccai_nuclei_seg)"
        )
    available = sorted(p.stem for p in data_dir.glob("image[0-9]*.png") if p.stem[5:].isdigit())
    if names is None:
        wanted = available
    else:
        wanted = sorted(set(names))
        missing = [n for n in wanted if n not in available]
        if missing:
            raise HistoAIError(
                f"{data_dir}: no {', '.join(n + '.png' for n in missing)} "
                f"(the folder has {', '.join(available) or 'no imageXX.png'})"
            )
    if not wanted:
        raise HistoAIError(f"{data_dir}: no imageXX.png files (expected the MICCAI layout)")
    table = _magnification_table(data_dir)
    samples = []
    for name in wanted:
        source_mpp = _source_mpp(name, data_dir, mpp_by_name, table)
        image_path = data_dir / f"{name}.png"
        try:
            with Image.open(image_path) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageReadError(image_path, f"cannot decode the image: {exc}") from exc
        mask_path = data_dir / f"{name}_mask.txt"
        instances = read_miccai_mask(mask_path)
        if instances.shape != image.shape[:2]:
            raise ImageReadError(
                mask_path,
                f"mask is {instances.shape[1]} × {instances.shape[0]} px (width × height) "
                f"but {image_path.name} is {image.shape[1]} × {image.shape[0]} px",
                "the mask must have the image's size",
            )
        image, instances = _resample(image, instances, mpp / source_mpp)
        samples.append(
            Sample(
                name=name,
                image=image,
                mask=instances > 0,
                instances=instances,
                mpp=mpp,
                source_mpp=source_mpp,
            )
        )
    return samples


# --------------------------------------------------------------------------- metrics


def segmentation_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel Dice, precision and recall of a binary mask.

    Parameters
    ----------
    predicted, truth : numpy.ndarray
        ``(H, W)`` bool masks.

    Returns
    -------
    dict
        ``dice``, ``precision``, ``recall`` (1.0 when both masks are empty).
    """
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = float(np.count_nonzero(predicted & truth))
    n_pred = float(np.count_nonzero(predicted))
    n_true = float(np.count_nonzero(truth))
    return {
        "dice": 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0,
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_true if n_true else 1.0,
    }


def _match_points(
    predicted: np.ndarray, truth: np.ndarray, max_distance: float, prefix: str
) -> dict[str, float]:
    """One-to-one matching (Hungarian, on distance) of ``(n, 2)`` points within a radius."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    matched = 0
    if len(predicted) and len(truth):
        distance = cdist(predicted, truth)
        cost = np.where(distance <= max_distance, distance, 1e9)
        rows, cols = linear_sum_assignment(cost)
        matched = int(np.count_nonzero(distance[rows, cols] <= max_distance))
    n_pred, n_true = len(predicted), len(truth)
    precision = matched / n_pred if n_pred else 1.0
    recall = matched / n_true if n_true else 1.0
    f1 = 2 * matched / (n_pred + n_true) if n_pred + n_true else 1.0
    return {
        f"{prefix}_f1": f1,
        f"{prefix}_precision": precision,
        f"{prefix}_recall": recall,
        f"{prefix}_predicted": float(n_pred),
        f"{prefix}_true": float(n_true),
    }


def _centroids(labels: np.ndarray) -> np.ndarray:
    """``(n, 2)`` (row, column) centroids of the non-zero labels, pixels."""
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not len(ids):
        return np.zeros((0, 2))
    return np.asarray(ndimage.center_of_mass(labels > 0, labels, ids), dtype=float)


def detection_scores(
    probability: np.ndarray,
    instances: np.ndarray,
    *,
    mpp: float,
    threshold: float = THRESHOLD,
    radius_um: float = MATCH_RADIUS_UM,
) -> dict[str, float]:
    """Object-level detection scores of a nucleus probability map.

    Two detectors, both matched one-to-one (Hungarian assignment) to the true nuclei's
    centroids when within ``radius_um``:

    * ``detection_*``: centroids of the 4-connected components of
      ``probability ≥ threshold`` (touching nuclei merged into one component count once);
    * ``peak_*``: local maxima of ``probability`` at least ``radius_um`` apart and
      ``≥ threshold`` (how the inference engine places nucleus centres).

    Parameters
    ----------
    probability : numpy.ndarray
        ``(H, W)`` float, 0..1.
    instances : numpy.ndarray
        ``(H, W)`` int true nucleus ids, 0 = background.
    mpp : float, micrometres per pixel
        Resolution of both arrays.
    threshold : float
        Probability threshold.
    radius_um : float, micrometres
        Matching radius (and minimum peak distance).

    Returns
    -------
    dict
        ``{detection,peak}_{f1,precision,recall,predicted,true}``.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    radius_px = radius_um / mpp
    truth = _centroids(instances)
    components, _ = ndimage.label(probability >= threshold)
    scores = _match_points(_centroids(components), truth, radius_px, "detection")
    peaks = peak_local_max(
        probability,
        min_distance=max(1, round(radius_px)),
        threshold_abs=threshold,
        exclude_border=False,
    ).astype(float)
    scores.update(_match_points(peaks, truth, radius_px, "peak"))
    return scores


# --------------------------------------------------------------------------- model I/O


def predict_probability(
    model: torch.nn.Module, image: np.ndarray, *, device: str = "cpu"
) -> np.ndarray:
    """Whole-image nucleus probability of a `UNet`.

    Parameters
    ----------
    model : torch.nn.Module
        A `UNet` (its ``size_multiple`` attribute is honoured; 1 if absent).
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB at the model's resolution (0.5 µm/px for the default).
    device : str
        Torch device.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 sigmoid probability. The image is reflect-padded at the bottom
        and right to a multiple of ``size_multiple`` and the result cropped back.
    """
    import torch

    multiple = int(getattr(model, "size_multiple", 1))
    height, width = image.shape[:2]
    pad_h, pad_w = -height % multiple, -width % multiple
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))).float().div(255)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x[None].to(device))
    model.train(was_training)
    probability = torch.sigmoid(logits[0, 0, :height, :width]).cpu().numpy()
    return probability.astype(np.float32)


# --------------------------------------------------------------------------- training


def _augment(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random dihedral transform and colour jitter of one crop.

    ``image`` ``(H, W, 3)`` float32 0..1, ``mask`` ``(H, W)`` float32; returns copies.
    Colour: brightness ± 0.08, contrast × 0.8–1.2, per-channel gain × 0.92–1.08 (a mild
    hue shift), saturation × 0.8–1.2; clipped to 0..1.
    """
    k = int(rng.integers(4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    grey = image.mean(axis=2, keepdims=True)
    image = grey + (image - grey) * rng.uniform(0.8, 1.2)
    image = image * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-0.08, 0.08)
    return np.clip(image, 0, 1).astype(np.float32), np.ascontiguousarray(mask)


def _random_batch(
    samples: Sequence[Sample], batch_size: int, patch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(batch, 3, patch, patch)`` images and ``(batch, 1, patch, patch)`` masks.

    Tiles are drawn with probability proportional to their area; a tile smaller than
    ``patch`` is reflect-padded.
    """
    areas = np.array([s.mask.size for s in samples], dtype=float)
    images = np.empty((batch_size, 3, patch, patch), np.float32)
    masks = np.empty((batch_size, 1, patch, patch), np.float32)
    for b in range(batch_size):
        sample = samples[int(rng.choice(len(samples), p=areas / areas.sum()))]
        image, mask = sample.image, sample.mask
        pad_h, pad_w = max(0, patch - image.shape[0]), max(0, patch - image.shape[1])
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
            mask = np.pad(mask, ((0, pad_h), (0, pad_w)), mode="reflect")
        top = int(rng.integers(image.shape[0] - patch + 1))
        left = int(rng.integers(image.shape[1] - patch + 1))
        crop = image[top : top + patch, left : left + patch].astype(np.float32) / 255
        crop_mask = mask[top : top + patch, left : left + patch].astype(np.float32)
        crop, crop_mask = _augment(crop, crop_mask, rng)
        images[b] = crop.transpose(2, 0, 1)
        masks[b, 0] = crop_mask
    return images, masks


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice loss (Dice over the whole batch, smoothing 1)."""
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = logits.sigmoid()
    intersection = (probability * target).sum()
    dice = (2 * intersection + 1) / (probability.sum() + target.sum() + 1)
    return bce + (1 - dice)


def _default_command(data_dir: Path, out_path: Path, seed: int, epochs: int, steps: int) -> str:
    args = ["--data", str(data_dir), "--out", str(out_path), "--seed", str(seed)]
    args += ["--epochs", str(epochs), "--steps-per-epoch", str(steps)]
    return "python -m napari_histo_ai.training.nuclei " + shlex.join(args)


def train_nuclei(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    epochs: int = 10,
    steps_per_epoch: int = 40,
    batch_size: int = 4,
    patch: int = 256,
    val_names: Sequence[str] = DEFAULT_VAL_NAMES,
    device: str = "cpu",
    base: int = 16,
    depth: int = 3,
    learning_rate: float = 2e-3,
    mpp: float = 0.5,
    mpp_by_name: Mapping[str, float] | None = None,
    command: str | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Train the nucleus U-Net; a generator yielding one progress record per step.

    Parameters
    ----------
    data_dir : str or Path
        MICCAI 2015 nuclei folder (see `load_miccai_nuclei`).
    out_path : str or Path
        Weights file to write (``.safetensors``); the JSON record goes to
        ``out_path.with_suffix(".json")``. Both are replaced atomically.
    seed : int
        Seeds numpy (crops, augmentation) and torch (initialisation).
    epochs, steps_per_epoch : int
        Schedule: ``epochs · steps_per_epoch`` optimiser steps.
    batch_size : int
        Crops per step.
    patch : int, pixels at ``mpp``
        Side of the training crops; a multiple of ``2**depth``.
    val_names : sequence of str
        Held-out image stems (default one 20x and one 40x tile); all others train.
    device : str
        Torch device (``"cpu"``, ``"cuda"``).
    base, depth : int
        `UNet` width and number of poolings.
    learning_rate : float
        Peak Adam learning rate (5 % linear warm-up, cosine decay to 0).
    mpp : float, micrometres per pixel
        Training and validation resolution.
    mpp_by_name : mapping of str to float, optional
        Source µm/px per image stem (overrides the magnification table; for tests).
    command : str, optional
        Command line recorded in the JSON (default: the equivalent ``python -m`` call).

    Yields
    ------
    dict
        ``{"epoch": e, "step": s, "steps": total, "loss": l}`` after each step
        (``epoch`` and ``step`` count from 1; ``loss`` is BCE + soft Dice).

    Returns
    -------
    dict
        The JSON record (the generator's ``StopIteration.value``): ``metrics``
        (``per_image`` and ``mean`` of Dice, precision, recall, detection and peak F1),
        ``split``, ``seed``, ``epochs``, ``steps``, ``command``, ``data``, ``mpp``,
        ``torch_version``, ``train_time_s``, ``architecture``, ``kwargs``...

    Raises
    ------
    HistoAIError
        Bad data folder or split, or a bad schedule value.
    """
    import torch

    from ..models.architectures.unet import UNet

    data_dir, out_path = Path(data_dir), Path(out_path)
    for label, value in (
        ("epochs", epochs),
        ("steps_per_epoch", steps_per_epoch),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise HistoAIError(f"{label} must be ≥ 1, got {value}")
    multiple = 2**depth
    if patch < multiple or patch % multiple:
        raise HistoAIError(f"patch {patch} px must be a positive multiple of {multiple}")
    started = time.perf_counter()

    samples = load_miccai_nuclei(data_dir, mpp=mpp, mpp_by_name=mpp_by_name)
    names = [s.name for s in samples]
    missing = [n for n in val_names if n not in names]
    if missing:
        raise HistoAIError(
            f"validation image(s) {', '.join(missing)} not in {data_dir} "
            f"(it has {', '.join(names)})"
        )
    train = [s for s in samples if s.name not in val_names]
    val = [s for s in samples if s.name in val_names]
    if not train:
        raise HistoAIError(
            f"no training images left in {data_dir} after holding out {', '.join(val_names)}"
        )

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    kwargs = {"in_channels": 3, "out_channels": 1, "base": base, "depth": depth}
    # channels-last convolutions are ~25 % faster on CPU (oneDNN); weights are saved contiguous
    model = UNet(**kwargs).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    model.train()
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            images, masks = _random_batch(train, batch_size, patch, rng)
            x = torch.from_numpy(images).to(device).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(masks).to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = _loss(model(x), y)
            loss.backward()
            optimiser.step()
            scheduler.step()
            step += 1
            yield {"epoch": epoch, "step": step, "steps": total, "loss": float(loss.item())}
    train_time = time.perf_counter() - started

    per_image: dict[str, dict[str, float]] = {}
    for sample in val:
        probability = predict_probability(model, sample.image, device=device)
        scores = segmentation_scores(probability >= THRESHOLD, sample.mask)
        scores.update(detection_scores(probability, sample.instances, mpp=mpp))
        per_image[sample.name] = {k: round(v, 4) for k, v in scores.items()}
    mean = (
        {
            key: round(float(np.mean([s[key] for s in per_image.values()])), 4)
            for key in next(iter(per_image.values()))
        }
        if per_image
        else {}
    )

    files = sorted(p for p in data_dir.iterdir() if p.stem.split("_")[0] in names)
    record: dict[str, Any] = {
        "architecture": "unet",
        "kwargs": kwargs,
        "weights": out_path.name,
        "mpp": mpp,
        "normalisation": "RGB / 255",
        "output": "1 logit channel (nucleus); apply a sigmoid",
        "metrics": {
            "per_image": per_image,
            "mean": mean,
            "threshold": THRESHOLD,
            "matching": (
                f"one-to-one (Hungarian) by centroid distance ≤ {MATCH_RADIUS_UM} µm "
                f"({MATCH_RADIUS_UM / mpp:g} px); detection = 4-connected components of "
                f"p ≥ {THRESHOLD}, peak = local maxima ≥ {THRESHOLD}, "
                f"{MATCH_RADIUS_UM} µm apart"
            ),
            "evaluated_at": f"whole held-out images at {mpp} µm/px",
        },
        "split": {"train": [s.name for s in train], "validation": [s.name for s in val]},
        "seed": seed,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "steps": total,
        "batch_size": batch_size,
        "patch": patch,
        "learning_rate": learning_rate,
        "command": command or _default_command(data_dir, out_path, seed, epochs, steps_per_epoch),
        "data": {
            "folder": str(data_dir),
            "source_mpp": {s.name: s.source_mpp for s in samples},
            "sha256": {p.name: sha256(p)[:16] for p in files if p.is_file()},
        },
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "train_time_s": round(train_time, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    metadata = {
        "architecture": "unet",
        "kwargs": json.dumps(kwargs),
        "mpp": str(mpp),
        "seed": str(seed),
    }
    save_weights_and_record(model, out_path, metadata, record)
    return record


def train_nuclei_sync(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `train_nuclei` to the end and return its record.

    Parameters
    ----------
    data_dir, out_path : str or Path
        As for `train_nuclei`.
    progress : callable, optional
        Called with every progress record.
    **options
        Keyword options of `train_nuclei`.

    Returns
    -------
    dict
        The JSON record written beside the weights.
    """
    return run_to_end(train_nuclei(data_dir, out_path, **options), progress)


def evaluate(
    data_dir: str | Path,
    *,
    model: str = "nuclei-unet",
    weights: Path | None = None,
    names: Sequence[str] = DEFAULT_VAL_NAMES,
) -> dict[str, Any]:
    """Score a registered nucleus model on held-out MICCAI tiles.

    Parameters
    ----------
    data_dir : str or Path
        The ``miccai_nuclei_seg`` folder.
    model : str
        Registry name (its architecture, kwargs and ``io.mpp`` are used).
    weights : Path, optional
        A safetensors file to score instead of the registered weights.
    names : sequence of str
        Tiles to score (default: the held-out image03 and image11).

    Returns
    -------
    dict
        ``{"model", "split", "mpp", "per_image", "mean"}``: pixel Dice / precision /
        recall and detection scores per tile and their means.
    """
    import dataclasses

    from ..models.loading import TorchPredictor, load_model
    from ..models.registry import load_registry

    spec = load_registry().get(model)
    if weights is not None:
        spec = dataclasses.replace(spec, weights=Path(weights))
    mpp = spec.io.mpp or 0.5
    predictor = load_model(spec, device="cpu")
    if not isinstance(predictor, TorchPredictor):
        raise HistoAIError(f"model {model!r}: evaluation needs a torch model, not {spec.format}")
    net = predictor.module
    per_image: dict[str, dict[str, float]] = {}
    pixels: list[tuple[np.ndarray, np.ndarray]] = []
    for sample in load_miccai_nuclei(data_dir, mpp=mpp, names=names):
        probability = predict_probability(net, sample.image)
        scores = segmentation_scores(probability >= THRESHOLD, sample.mask)
        scores.update(detection_scores(probability, sample.instances, mpp=mpp))
        per_image[sample.name] = {k: round(v, 4) for k, v in scores.items()}
        pixels.append((np.asarray(sample.mask, bool).ravel(), probability.ravel()))
    keys = next(iter(per_image.values())).keys() if per_image else ()
    mean = {k: round(float(np.mean([s[k] for s in per_image.values()])), 4) for k in keys}
    return {
        "model": model,
        "weights": str(spec.weights),
        "split": f"held-out tiles {', '.join(names)} (image-disjoint from training)",
        "mpp": mpp,
        "per_image": per_image,
        "mean": mean,
        **_plot_entries(pixels),
    }


def _plot_entries(pixels: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """``curves`` / ``confusion`` of `evaluate` for `napari_histo_ai.plots.evaluation_plots`.

    ``pixels``: per tile, the flat truth mask and nucleus probability. The curve pools
    every tile's pixels, subsampled to `~napari_histo_ai.plots.MAX_CURVE_SAMPLES`
    (seed 0); the confusion counts every pixel at `THRESHOLD`.
    """
    from .. import metrics
    from ..plots import confusion_entry, curve_entry

    if not pixels:
        return {}
    truth = np.concatenate([t for t, _ in pixels]).astype(np.int64)
    probability = np.concatenate([p for _, p in pixels])
    predicted = (probability >= THRESHOLD).astype(np.int64)
    return {
        "curves": {"pixel": curve_entry(truth, probability)},
        "confusion": {
            "pixel": confusion_entry(
                metrics.confusion_matrix(truth, predicted, n_classes=2), ("background", "nucleus")
            )
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, print the JSON record's metrics; exit status 2 on a data error."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_histo_ai.training.nuclei",
        description="Train the default nucleus U-Net on the MICCAI 2015 nuclei tiles.",
    )
    parser.add_argument("--data", type=Path, required=True, help="miccai_nuclei_seg folder")
    parser.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    command = "python -m napari_histo_ai.training.nuclei " + shlex.join(given)

    def report(record: Progress) -> None:
        if not args.quiet and record["step"] % args.steps_per_epoch == 0:
            print_progress(record, "epoch", "step", "loss")

    try:
        result = train_nuclei_sync(
            args.data,
            args.out,
            progress=report,
            seed=args.seed,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            device=args.device,
            command=command,
        )
    except HistoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {k: result[k] for k in ("metrics", "train_time_s", "command")},
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
