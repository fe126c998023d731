"""Train the MRI tumour-segmentation U-Net of paper 003 on BraTS 2015 FLAIR slices.

Paper 003 ("Segmentation of Breast Cancer Tumors using Deep Learning") segments tumours
in 3D MRI with a 2D U-Net run over the slices of each volume: slices z-scored (mean
subtracted, divided by the standard deviation), optionally downsampled 2× to train
faster, a sigmoid output, Adam, three losses compared (a weighted cross-entropy that
weighs pixels near the tumour border more, Dice loss, Jaccard loss) and an output
threshold that trades recall for precision. Its breast-MRI data is private; this
module applies the same method to the two BraTS 2015 brain-MRI cases of
``../shared/data/brats2015_mri``.

Data (`load_case`): per case folder ``Flair_subtrMeanDivStd.nii.gz`` (the input, FLAIR
only: the one file a user opens) and ``OTMultiClass.nii.gz`` (labels 0..4; **whole
tumour = label > 0**), read through the package's NIfTI adapter as (Z, Y, X) arrays.
Split: case-disjoint, the case under ``train/`` (``brats_2013_pat0005_1``) trains, the
case under ``validation/`` (``brats_2013_pat0003_1``) is held out.

Normalisation (`zscore_slices`): **per slice**, ``(x - mean) / std`` over the whole
240 × 240 slice, computed by `napari_histo_ai.models.preprocessing.normalise` with the
registry entry's ``zscore`` method, the very call the inference engine makes on each
tile. The shipped entry tiles BraTS slices with one 240 × 240 tile (``halo: 0``,
``overlap: 0``), so the engine's per-tile z-score *is* this per-slice z-score, and the
model sees identical inputs in training, `evaluate` and ``napari-histo-ai predict``.

Network: `SliceUNet` (``models/architectures/mri.py``), a `UNet` (base 16, 3 poolings,
482k parameters) that average-pools its input by ``downsample`` and upsamples its logits
back (bilinear), so the 2× downsampling is a training option that the engine never has
to know about. The shipped model uses ``downsample=2`` (120 × 120 inside the network).

Training (`train_mri`, a generator yielding one progress record per step): batches of
slices drawn at random from the training volume (all 155 slices, the paper's "full"
set; ``tumour_fraction`` draws that share from tumour slices instead, 1.0 = the paper's
"balanced" set), a random gamma on the raw slice before its z-score (``gamma``),
random left-right / up-down flips and 90° rotations, one of three
losses (`LOSSES`): ``wbce`` (class- and border-weighted binary cross-entropy, the
U-Net weight map ``w = w_class + w0 · exp(-d² / 2σ²)`` with ``d`` the distance to the
tumour border), ``dice`` (soft Dice) or ``jaccard`` (soft Jaccard distance); Adam with a
short warm-up and cosine decay; seeded.

Validation: every slice of the held-out volume, sigmoid, threshold = the registry
entry's (0.5); voxel-level Dice, Jaccard, precision, recall, F1 and accuracy per case
(`volume_scores`, through `napari_histo_ai.metrics`).

Command line::

    napari-histo-ai train-default mri --data DIR --out FILE [--seed N] [--epochs N]
    python -m napari_histo_ai.training.mri --data DIR --out FILE [--loss wbce|dice|jaccard]
        [--downsample 1|2] [--tumour-fraction F] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import HistoAIError, ImageReadError
from .common import print_progress, run_to_end, save_weights_and_record, sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLAIR",
    "LABELS",
    "LOSSES",
    "Case",
    "border_weights",
    "evaluate",
    "find_cases",
    "load_case",
    "loss_value",
    "main",
    "predict_volume",
    "train_mri",
    "train_mri_sync",
    "volume_scores",
    "zscore_slices",
]

FLAIR = "Flair_subtrMeanDivStd.nii.gz"
LABELS = "OTMultiClass.nii.gz"
LOSSES = ("wbce", "dice", "jaccard")
MODEL = "mri-unet"
THRESHOLD = 0.5
#: U-Net border weight map (Ronneberger et al. 2015): amplitude and width (pixels)
BORDER_W0 = 5.0
BORDER_SIGMA_PX = 5.0
#: class weight of tumour pixels in ``wbce``
POS_WEIGHT = 3.0

Progress = dict[str, float]


@dataclass(frozen=True)
class Case:
    """One labelled MRI volume.

    Parameters
    ----------
    name : str
        Case folder name, e.g. ``"brats_2013_pat0003_1"``.
    image : numpy.ndarray
        ``(Z, Y, X)`` float32 FLAIR intensities as stored in the file.
    tumour : numpy.ndarray
        ``(Z, Y, X)`` bool, whole tumour (label > 0).
    spacing_mm : tuple of float
        Voxel spacing (Z, Y, X), millimetres.
    folder : Path
        The case folder.
    """

    name: str
    image: np.ndarray
    tumour: np.ndarray
    spacing_mm: tuple[float, float, float]
    folder: Path


# --------------------------------------------------------------------------- loading


def _read_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    from ..io import open_image

    if not path.is_file():
        raise ImageReadError(path, "file not found", f"each case folder needs {FLAIR} and {LABELS}")
    pyramid = open_image(path)
    if pyramid.axes != "ZYX":
        raise ImageReadError(
            path, f"expected a 3D (Z, Y, X) volume, got axes {pyramid.axes!r}", "open a 3D NIfTI"
        )
    spacing = tuple(float(s) for s in (pyramid.spacing_mm or (1.0, 1.0, 1.0)))
    return np.asarray(pyramid.levels[0].compute(), dtype=np.float32), (
        spacing[0],
        spacing[1],
        spacing[2],
    )


def load_case(folder: str | Path) -> Case:
    """Read one case folder: FLAIR volume and whole-tumour mask.

    Parameters
    ----------
    folder : str or Path
        Holds ``Flair_subtrMeanDivStd.nii.gz`` and ``OTMultiClass.nii.gz``.

    Returns
    -------
    Case

    Raises
    ------
    ImageReadError
        A file is missing or not a 3D volume, or the two volumes differ in shape.
    """
    folder = Path(folder)
    image, spacing = _read_volume(folder / FLAIR)
    labels, _ = _read_volume(folder / LABELS)
    if labels.shape != image.shape:
        raise ImageReadError(
            folder / LABELS,
            f"label volume has shape {labels.shape} but {FLAIR} has {image.shape}",
            "the labels must be on the image's voxel grid",
        )
    return Case(folder.name, image, labels > 0, spacing, folder)


def find_cases(data_dir: str | Path, split: str) -> list[Path]:
    """Case folders under ``data_dir/split`` (``train`` or ``validation``), sorted.

    Raises
    ------
    HistoAIError
        The folder has no case with a FLAIR file.
    """
    root = Path(data_dir) / split
    cases = sorted(p for p in root.glob("*") if (p / FLAIR).is_file()) if root.is_dir() else []
    if not cases:
        raise HistoAIError(
            f"{root}: no case folders with {FLAIR} (expected the brats2015_mri layout: "
            f"train/<case>/ and validation/<case>/, e.g. ../shared/data/brats2015_mri)"
        )
    return cases


# --------------------------------------------------------------------------- preprocessing


def zscore_slices(volume: np.ndarray) -> np.ndarray:
    """Per-slice z-score, exactly as the inference engine normalises one tile.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(Z, Y, X)`` intensities.

    Returns
    -------
    numpy.ndarray
        ``(Z, 1, Y, X)`` float32, each slice ``(x - mean) / max(std, 1e-6)`` (a constant
        slice becomes zeros), through `napari_histo_ai.models.preprocessing.normalise`
        with ``Normalisation(method="zscore")``.
    """
    from ..models.preprocessing import normalise
    from ..models.spec import Normalisation

    return normalise(np.asarray(volume)[..., None], Normalisation(method="zscore"))


def border_weights(
    mask: np.ndarray,
    *,
    pos_weight: float = POS_WEIGHT,
    w0: float = BORDER_W0,
    sigma_px: float = BORDER_SIGMA_PX,
) -> np.ndarray:
    """U-Net weight map of a binary slice: class weight plus a border term.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(..., H, W)`` bool tumour masks (each 2D slice handled on its own).
    pos_weight : float
        Class weight of tumour pixels (background pixels weigh 1).
    w0 : float
        Amplitude of the border term.
    sigma_px : float, pixels
        Width of the border term.

    Returns
    -------
    numpy.ndarray
        float32 of ``mask``'s shape: ``w_class + w0 · exp(-d² / (2 σ²))`` where ``d`` is
        each pixel's distance (pixels) to the tumour border (the nearest pixel of the
        other class). Slices without tumour get weight 1 everywhere.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    flat = mask.reshape(-1, *mask.shape[-2:])
    out = np.ones(flat.shape, np.float32)
    for k, m in enumerate(flat):
        if not m.any():
            continue
        inside = ndimage.distance_transform_edt(m)
        outside = ndimage.distance_transform_edt(~m)
        d = np.where(m, inside - 0.5, outside - 0.5)  # distance from the border line
        out[k] = np.where(m, pos_weight, 1.0) + w0 * np.exp(-(d**2) / (2 * sigma_px**2))
    return out.reshape(mask.shape)


# --------------------------------------------------------------------------- losses


def loss_value(
    name: str, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One of the paper's three losses on a batch.

    Parameters
    ----------
    name : {"wbce", "dice", "jaccard"}
        ``wbce``: ``mean(w · BCE)`` with the weight map ``weight`` (`border_weights`;
        plain BCE when ``None``); ``dice``: ``1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)``;
        ``jaccard``: ``1 - (Σ p t + 1) / (Σ p + Σ t - Σ p t + 1)`` (Jaccard distance),
        both soft (``p`` = sigmoid probability) and over the whole batch.
    logits, target : torch.Tensor
        ``(N, 1, H, W)``; ``target`` 0/1 float.
    weight : torch.Tensor, optional
        ``(N, 1, H, W)`` per-pixel weights for ``wbce``.

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Raises
    ------
    HistoAIError
        Unknown ``name``.
    """
    import torch.nn.functional as F

    if name == "wbce":
        return F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    if name not in ("dice", "jaccard"):
        raise HistoAIError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}")
    p = logits.sigmoid()
    intersection = (p * target).sum()
    total = p.sum() + target.sum()
    if name == "dice":
        return 1 - (2 * intersection + 1) / (total + 1)
    return 1 - (intersection + 1) / (total - intersection + 1)


# --------------------------------------------------------------------------- model I/O


def predict_volume(
    model: Callable[[torch.Tensor], torch.Tensor],
    volume: np.ndarray,
    *,
    batch_size: int = 8,
    device: str = "cpu",
) -> np.ndarray:
    """Tumour probability of every slice of a volume (whole-slice forward passes).

    Parameters
    ----------
    model : callable
        ``(N, 1, H, W)`` normalised slices → ``(N, 1, H, W)`` logits (a `SliceUNet` or a
        loaded `Predictor`); a ``torch.nn.Module`` is put in eval mode for the call.
    volume : numpy.ndarray
        ``(Z, Y, X)`` raw intensities; ``Y`` and ``X`` multiples of the network's
        ``size_multiple``.
    batch_size : int
        Slices per forward pass.
    device : str
        Torch device of the network.

    Returns
    -------
    numpy.ndarray
        ``(Z, Y, X)`` float32 sigmoid probabilities.
    """
    import torch

    x = zscore_slices(volume)
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    out = np.empty(volume.shape, np.float32)
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start : start + batch_size]).to(device)
            out[start : start + len(batch)] = model(batch).float().sigmoid()[:, 0].cpu().numpy()
    if module is not None:
        module.train(was_training)
    return out


def volume_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Voxel-level scores of a binary tumour mask.

    Parameters
    ----------
    predicted, truth : numpy.ndarray
        Bool masks of one shape (a whole volume).

    Returns
    -------
    dict
        ``dice``, ``jaccard``, ``precision``, ``recall``, ``f1``, ``accuracy`` (from
        `napari_histo_ai.metrics`) and the voxel counts ``true_voxels``,
        ``predicted_voxels``.
    """
    from .. import metrics

    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(predicted & truth))
    fp = int(np.count_nonzero(predicted & ~truth))
    fn = int(np.count_nonzero(~predicted & truth))
    scores = metrics.prf(tp, fp, fn)
    return {
        "dice": metrics.dice(predicted, truth),
        "jaccard": metrics.jaccard(predicted, truth),
        "precision": float(scores["precision"]),
        "recall": float(scores["recall"]),
        "f1": float(scores["f1"]),
        "accuracy": float(1.0 - (fp + fn) / predicted.size),
        "true_voxels": float(np.count_nonzero(truth)),
        "predicted_voxels": float(np.count_nonzero(predicted)),
    }


# --------------------------------------------------------------------------- training


def _augment(
    image: np.ndarray, mask: np.ndarray, weight: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same random flip / 90° rotation of ``(H, W)`` image, mask and weight map."""
    k = int(rng.integers(4)) if image.shape[0] == image.shape[1] else 2 * int(rng.integers(2))
    arrays = [np.rot90(a, k) for a in (image, mask, weight)]
    if rng.random() < 0.5:
        arrays = [a[:, ::-1] for a in arrays]
    return (
        np.ascontiguousarray(arrays[0]),
        np.ascontiguousarray(arrays[1]),
        np.ascontiguousarray(arrays[2]),
    )


def _gamma(image: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """``((x - min) / (max - min)) ** exp(u)``, ``u ~ U(-spread, spread)`` (float32)."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    power = math.exp(rng.uniform(-spread, spread))
    return (((image - lo) / (hi - lo)) ** power).astype(np.float32)


def _draw(
    n_slices: int,
    tumour_slices: np.ndarray,
    tumour_fraction: float | None,
    rng: np.random.Generator,
) -> int:
    if tumour_fraction is None or not len(tumour_slices):
        return int(rng.integers(n_slices))
    if rng.random() < tumour_fraction:
        return int(tumour_slices[rng.integers(len(tumour_slices))])
    others = np.setdiff1d(np.arange(n_slices), tumour_slices)
    if not len(others):
        return int(tumour_slices[rng.integers(len(tumour_slices))])
    return int(others[rng.integers(len(others))])


def _record_command(argv: Sequence[str] | None, defaults: dict[str, Any]) -> str:
    if argv is not None:
        return "napari-histo-ai train-default mri " + shlex.join(list(argv))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in defaults.items()]
    return "python -m napari_histo_ai.training.mri " + shlex.join(args)


def train_mri(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    epochs: int = 6,
    steps_per_epoch: int = 100,
    batch_size: int = 8,
    loss: str = "wbce",
    downsample: int = 2,
    tumour_fraction: float | None = None,
    gamma: float = 0.4,
    learning_rate: float = 1e-3,
    base: int = 16,
    depth: int = 3,
    device: str = "cpu",
    command: str | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Train the slice U-Net; a generator yielding one progress record per step.

    Parameters
    ----------
    data_dir : str or Path
        ``brats2015_mri`` folder: ``train/<case>/`` cases train, ``validation/<case>/``
        cases are held out (see `load_case`).
    out_path : str or Path
        Weights file (``.safetensors``); the JSON record goes to
        ``out_path.with_suffix(".json")``. Both are replaced atomically.
    seed : int
        Seeds numpy (slice draws, augmentation) and torch (initialisation).
    epochs, steps_per_epoch : int
        Schedule: ``epochs · steps_per_epoch`` Adam steps.
    batch_size : int
        Slices per step.
    loss : {"wbce", "dice", "jaccard"}
        See `loss_value`.
    downsample : int
        `SliceUNet` input pooling (1 = full resolution, 2 = the paper's 2×).
    tumour_fraction : float or None
        Share of each batch drawn from slices that contain tumour; ``None`` draws
        uniformly over all slices (the paper's "full" set), 1.0 only tumour slices (its
        "balanced" set).
    gamma : float
        Intensity augmentation: each drawn slice is rescaled to 0..1 (its min..max),
        raised to a power ``exp(u)``, ``u`` uniform in ``[-gamma, gamma]``, then
        z-scored (0 = off: the slices are z-scored once). Inference never applies it.
    learning_rate : float
        Peak Adam learning rate (5 % linear warm-up, cosine decay to 0).
    base, depth : int
        Inner `UNet` width and number of poolings.
    device : str
        Torch device.
    command : str, optional
        Command line recorded in the JSON.

    Yields
    ------
    dict
        ``{"epoch": e, "step": s, "steps": total, "loss": l}`` after each step.

    Returns
    -------
    dict
        The JSON record (the generator's ``StopIteration.value``): ``metrics``
        (``per_case`` Dice, Jaccard, precision, recall, F1, accuracy; ``threshold``),
        ``split``, ``seed``, schedule, ``command``, ``data`` hashes, ``torch_version``,
        ``train_time_s``, ``architecture``, ``kwargs``.

    Raises
    ------
    HistoAIError
        Bad data folder, loss name or schedule value.
    """
    import torch

    from ..models.architectures.mri import SliceUNet

    data_dir, out_path = Path(data_dir), Path(out_path)
    if loss not in LOSSES:
        raise HistoAIError(f"unknown loss {loss!r}: expected one of {', '.join(LOSSES)}")
    for label, value in (
        ("epochs", epochs),
        ("steps_per_epoch", steps_per_epoch),
        ("batch_size", batch_size),
        ("downsample", downsample),
    ):
        if value < 1:
            raise HistoAIError(f"{label} must be ≥ 1, got {value}")
    if tumour_fraction is not None and not 0.0 <= tumour_fraction <= 1.0:
        raise HistoAIError(f"tumour_fraction must be in 0..1 or None, got {tumour_fraction}")
    started = time.perf_counter()

    train_cases = [load_case(p) for p in find_cases(data_dir, "train")]
    val_dirs = find_cases(data_dir, "validation")
    overlap = {p.name for p in val_dirs} & {c.name for c in train_cases}
    if overlap:
        raise HistoAIError(f"case(s) {sorted(overlap)} are in both train/ and validation/")
    kwargs = {
        "in_channels": 1,
        "out_channels": 1,
        "base": base,
        "depth": depth,
        "downsample": downsample,
    }
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = SliceUNet(**kwargs).to(device)
    multiple = model.size_multiple
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    tumour_slices: list[np.ndarray] = []
    offset = 0
    for case in train_cases:
        if case.image.shape[1] % multiple or case.image.shape[2] % multiple:
            raise HistoAIError(
                f"{case.folder / FLAIR}: slices of {case.image.shape[1]} × "
                f"{case.image.shape[2]} px are not multiples of {multiple} "
                "(downsample · 2**depth); pad or crop the volume"
            )
        images.append(case.image if gamma else zscore_slices(case.image)[:, 0])
        masks.append(case.tumour)
        if loss == "wbce":
            weights.append(border_weights(case.tumour))
        tumour_slices.append(np.nonzero(case.tumour.any(axis=(1, 2)))[0] + offset)
        offset += len(case.image)
    x_all = np.concatenate(images)
    y_all = np.concatenate(masks)
    w_all = np.concatenate(weights) if loss == "wbce" else np.ones((1, 1, 1), np.float32)
    tumour_idx = np.concatenate(tumour_slices)

    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    side = x_all.shape[1:]
    model.train()
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            xb = np.empty((batch_size, 1, *side), np.float32)
            yb = np.empty((batch_size, 1, *side), np.float32)
            wb = np.empty((batch_size, 1, *side), np.float32)
            for b in range(batch_size):
                z = _draw(len(x_all), tumour_idx, tumour_fraction, rng)
                w = w_all[z] if loss == "wbce" else np.ones(side, np.float32)
                image = x_all[z]
                if gamma:  # raw slice -> random gamma -> the per-slice z-score
                    image = zscore_slices(_gamma(image, rng, gamma)[None])[0, 0]
                img, msk, wgt = _augment(image, y_all[z], w, rng)
                xb[b, 0], yb[b, 0], wb[b, 0] = img, msk, wgt
            x = torch.from_numpy(xb).to(device)
            y = torch.from_numpy(yb).to(device)
            wt = torch.from_numpy(wb).to(device) if loss == "wbce" else None
            optimiser.zero_grad(set_to_none=True)
            batch_loss = loss_value(loss, model(x), y, wt)
            batch_loss.backward()
            optimiser.step()
            scheduler.step()
            step += 1
            yield {"epoch": epoch, "step": step, "steps": total, "loss": float(batch_loss.item())}
    train_time = time.perf_counter() - started

    model.eval()
    per_case: dict[str, dict[str, float]] = {}
    val_cases = [load_case(p) for p in val_dirs]
    for case in val_cases:
        probability = predict_volume(model, case.image, device=device)
        scores = volume_scores(probability >= THRESHOLD, case.tumour)
        per_case[case.name] = {k: round(v, 4) for k, v in scores.items()}
    files = [c.folder / name for c in train_cases + val_cases for name in (FLAIR, LABELS)]
    record: dict[str, Any] = {
        "architecture": "slice_unet",
        "kwargs": kwargs,
        "weights": out_path.name,
        "input": "FLAIR (Flair_subtrMeanDivStd.nii.gz), one channel",
        "normalisation": "per-slice z-score (models.preprocessing.normalise, method zscore)",
        "output": "1 logit channel (whole tumour = label > 0); apply a sigmoid",
        "metrics": {
            "per_case": per_case,
            "threshold": THRESHOLD,
            "evaluated_at": "every slice of the held-out volume, voxel level, full resolution",
        },
        "split": {
            "train": [c.name for c in train_cases],
            "validation": [c.name for c in val_cases],
            "kind": "case-disjoint",
        },
        "seed": seed,
        "loss": loss,
        "downsample": downsample,
        "tumour_fraction": tumour_fraction,
        "gamma": gamma,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "steps": total,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimiser": "Adam, 5 % warm-up, cosine decay",
        "command": command
        or _record_command(
            None,
            {
                "data": data_dir,
                "out": out_path,
                "seed": seed,
                "epochs": epochs,
                "loss": loss,
                "downsample": downsample,
            },
        ),
        "data": {
            "folder": str(data_dir),
            "sha256": {f"{p.parent.name}/{p.name}": sha256(p)[:16] for p in files},
        },
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "train_time_s": round(train_time, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    metadata = {
        "architecture": "slice_unet",
        "kwargs": json.dumps(kwargs),
        "seed": str(seed),
        "loss": loss,
    }
    save_weights_and_record(model, out_path, metadata, record)
    return record


def train_mri_sync(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `train_mri` to the end and return its record (``progress`` gets every step)."""
    return run_to_end(train_mri(data_dir, out_path, **options), progress)


# --------------------------------------------------------------------------- evaluation


def evaluate(data_dir: Path, *, model: str = MODEL, weights: Path | None = None) -> dict[str, Any]:
    """Score a registered model on the held-out case(s) of ``data_dir``.

    Parameters
    ----------
    data_dir : Path
        ``brats2015_mri`` folder; the cases under ``validation/`` are scored.
    model : str
        Registry name (``mri-unet``).
    weights : Path, optional
        Score this weights file with the entry's architecture instead of its own.

    Returns
    -------
    dict
        ``model``, ``weights``, ``threshold`` (the entry's mask threshold),
        ``per_case`` (Dice, Jaccard, precision, recall, F1, accuracy, voxel counts),
        ``mean`` over cases, and ``split``. The slices are normalised with the entry's
        ``io.normalisation`` (the engine's call) and run whole, which for 240 × 240
        slices is exactly the engine's single tile.
    """
    import torch

    from ..models.loading import load_model
    from ..models.registry import load_registry

    spec = load_registry().get(model)
    if weights is not None:
        spec = dataclasses.replace(spec, weights=Path(weights))
    predictor = load_model(spec, device="cpu")
    masks = [o for o in spec.outputs if o.kind == "mask"]
    threshold = masks[0].threshold if masks else THRESHOLD

    def forward(x: torch.Tensor) -> torch.Tensor:
        return predictor(x)

    from ..models.preprocessing import normalise

    per_case: dict[str, dict[str, float]] = {}
    voxels = _VoxelSample()
    for folder in find_cases(data_dir, "validation"):
        case = load_case(folder)
        x = normalise(case.image[..., None], spec.io.normalisation)
        probability = np.empty(case.image.shape, np.float32)
        with torch.inference_mode():
            for start in range(0, len(x), 8):
                logits = forward(torch.from_numpy(x[start : start + 8]))
                probability[start : start + len(logits)] = logits.sigmoid()[:, 0].numpy()
        scores = volume_scores(probability >= threshold, case.tumour)
        per_case[case.name] = {k: round(v, 4) for k, v in scores.items()}
        voxels.add(case.tumour, probability, threshold)
    keys = ("dice", "jaccard", "precision", "recall", "f1", "accuracy")
    mean = {k: round(float(np.mean([s[k] for s in per_case.values()])), 4) for k in keys}
    return {
        "model": model,
        "weights": str(spec.weights),
        "threshold": threshold,
        "per_case": per_case,
        "mean": mean,
        "split": (
            f"case-disjoint: validation/ cases {sorted(per_case)} of {data_dir} "
            "(the model trains on the train/ case); voxel level over every slice"
        ),
        **voxels.entries(),
    }


class _VoxelSample:
    """``curves`` / ``confusion`` of `evaluate` for `napari_histo_ai.plots.evaluation_plots`.

    Every case's voxels count in the (background, tumour) confusion at the mask
    threshold; the curve keeps a seeded uniform subsample of each case's voxels, pooled
    and subsampled again to `~napari_histo_ai.plots.MAX_CURVE_SAMPLES`.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.confusion = np.zeros((2, 2), np.int64)
        self.truth: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []

    def add(self, truth: np.ndarray, probability: np.ndarray, threshold: float) -> None:
        from ..plots import MAX_CURVE_SAMPLES

        t = np.asarray(truth, bool).ravel()
        p = np.asarray(probability).ravel()
        cells = 2 * t.astype(np.int64) + (p >= threshold)
        self.confusion += np.bincount(cells, minlength=4).reshape(2, 2)
        keep = self.rng.choice(t.size, min(t.size, MAX_CURVE_SAMPLES), replace=False)
        self.truth.append(t[keep])
        self.scores.append(p[keep])

    def entries(self) -> dict[str, Any]:
        from ..plots import confusion_entry, curve_entry

        if not self.truth:
            return {}
        return {
            "curves": {
                "voxel": curve_entry(np.concatenate(self.truth), np.concatenate(self.scores))
            },
            "confusion": {"voxel": confusion_entry(self.confusion, ("background", "tumour"))},
        }


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, print the JSON record's metrics; exit status 2 on a data error."""
    parser = argparse.ArgumentParser(
        prog="napari-histo-ai train-default mri",
        description="Train the MRI tumour U-Net of paper 003 on BraTS 2015 FLAIR slices.",
    )
    parser.add_argument("--data", type=Path, required=True, help="brats2015_mri folder")
    parser.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loss", choices=LOSSES, default="wbce")
    parser.add_argument("--downsample", type=int, default=2, help="1 = full resolution")
    parser.add_argument(
        "--tumour-fraction",
        type=float,
        default=None,
        help="share of slices drawn from tumour slices (default: uniform over all)",
    )
    parser.add_argument(
        "--gamma", type=float, default=0.4, help="intensity augmentation spread (0 = off)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)

    def report(record: Progress) -> None:
        if not args.quiet and record["step"] % args.steps_per_epoch == 0:
            print_progress(record, "epoch", "step", "loss")

    try:
        result = train_mri_sync(
            args.data,
            args.out,
            progress=report,
            seed=args.seed,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            loss=args.loss,
            downsample=args.downsample,
            tumour_fraction=args.tumour_fraction,
            gamma=args.gamma,
            learning_rate=args.learning_rate,
            device=args.device,
            command=_record_command(given, {}),
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
