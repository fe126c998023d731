"""Train and evaluate paper 002's benign / malignant ResNet on BreakHis (+ IDC patches).

Paper 002 (histology part) classifies BreakHis H&E images (700 × 460 px, 40×–400×) as
benign or malignant: sliding-window crops with 50 % overlap, CLAHE and / or whitening,
a ResNet per crop (`BreakHisResNet`) and an image-level decision aggregated over the
crops by *sum*, *vote*, *average*, *exist* (malignant if any crop is) or *exist3*
(malignant if at least 3 crops are); patient-disjoint splits (75 % / 25 % of patients).

Data here (``data_dir`` = the shared data folder):

* ``breakhis_resized/<benign|malignant>/<mag>X/SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png``:
  only 20 BreakHis images (9 benign, 11 malignant), downsized by their source from
  700 × 460 to 500 × 328 px. Patients are grouped by the numeric slide id without its
  letter suffix (``14-22549AB`` and ``14-22549CD`` are one group, as are the DC and LC
  images of ``14-13412``): 12 groups, a conservative reading of BreakHis' patient ids.
* ``idc_breast_patches/patients/<id>/<id>_idx5_x<X>_y<Y>_class<C>.png``: 2,650 IDC
  patches (50 × 50 px, lower magnification), always in the training set as a *proxy*:
  IDC-positive tissue stands in for malignant, IDC-negative for benign tissue. They
  are resized to the crop size; their scale (≈ 2.5× objective) is far coarser than
  BreakHis', so they mainly teach colour and texture.

Protocol (`train_breakhis`): the 12 patient groups are dealt into ``folds`` (4, the
paper's 75 / 25 %) folds balancing the classes (`patient_folds`). For each fold a fresh
network is trained on all IDC patches + the BreakHis crops of the other folds (each crop
labelled with its image's class, as in the paper) and scores the crops of the held-out
images. Image-level accuracy, precision, recall, F1 and AUC are computed per
magnification and overall for the five aggregations, on the pooled out-of-fold
predictions of all 20 images and on the shipped fold alone; crop-level ("batch level")
accuracy and AUC too. The shipped weights are the model of fold ``ship_fold`` (0), so
`evaluate` can score them on images none of their training saw.

Training: crops ``patch`` px (96) at the image's own pixels, stride ``patch / 2``
(the engine's `PatchGrid`: the last row / column pulled back to the border);
preprocessing = the registry's normalisation (`napari_histo_ai.models.preprocessing`:
CLAHE on Y of YUV, clip 2, 8 × 8 tiles, by default), computed once per crop; random
dihedral flips / rotations (the paper's geometric augmentation, without shear and
stretch) and, not in the paper, a stain-like colour jitter of the equalised crop
(`_augment`; in 150-step runs it raised pooled vote accuracy 0.60 → 0.75); each
batch half IDC, half BreakHis, class-balanced within each source; cross-entropy, Adam
with warm-up and cosine decay, L2 weight decay 2e-4 (paper), seeded.

Command line::

    python -m napari_histo_ai.training.benign_malignant --data DIR --out FILE [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import HistoAIError, ImageReadError
from ..models.spec import Normalisation
from .common import print_progress, run_to_end, save_weights_and_record, sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "AGGREGATIONS",
    "CLASSES",
    "BreakHisImage",
    "aggregate_image",
    "evaluate",
    "image_metrics",
    "load_breakhis",
    "load_idc",
    "main",
    "patient_folds",
    "predict_crops",
    "sliding_crops",
    "train_breakhis",
    "train_breakhis_sync",
]

CLASSES = ("benign", "malignant")
#: the image-level aggregations of paper 002, as the engine names them
AGGREGATIONS = ("sum", "vote", "average", "exist", "exist3")
BREAKHIS = "breakhis_resized"
IDC = "idc_breast_patches"
MODEL = "breakhis-resnet"
#: network defaults (CPU budget: fewer blocks and half the paper's width, see the card)
ARCH = {
    "in_channels": 3,
    "n_classes": 2,
    "stem_kernel": 7,
    "downsample": "pool",
    "base": 8,
    "blocks": 2,
    "dropout": 0.5,
}
NORMALISATIONS: dict[str, Normalisation] = {
    "clahe": Normalisation(method="clahe", scale=255.0, clip_limit=2.0, tiles=8),
    "whiten": Normalisation(method="whiten"),
    "zscore": Normalisation(method="zscore"),
    "scale": Normalisation(method="scale", scale=255.0),
}

_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<slide>\d+)(?P<suffix>[A-Z]*)"
    r"-(?P<mag>\d+)-(?P<seq>\d+)$"
)
_IDC_NAME = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])$")

Progress = dict[str, float]


@dataclass(frozen=True)
class BreakHisImage:
    """One BreakHis image.

    Parameters
    ----------
    name : str
        File stem (``SOB_M_DC-14-2523-100-023``).
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB, the file's own pixels (no µm/px in the file).
    label : int
        0 benign, 1 malignant (from the name, checked against the folder).
    tumour_type : str
        ``A``, ``F``, ``PT``, ``TA`` (benign), ``DC``, ``LC``, ``MC``, ``PC`` (malignant).
    slide : str
        ``14-22549CD``.
    patient : str
        Group used for patient-disjoint splits: the slide id without letter suffix.
    magnification : int
        Objective magnification (40, 100, 200, 400).
    """

    name: str
    image: np.ndarray
    label: int
    tumour_type: str
    slide: str
    patient: str
    magnification: int


# --------------------------------------------------------------------------- loading


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageReadError(path, f"cannot decode the image: {exc}") from exc


def load_breakhis(folder: str | Path) -> list[BreakHisImage]:
    """Read every BreakHis PNG below ``folder`` (``benign|malignant/<mag>/*.png``).

    Parameters
    ----------
    folder : str or Path
        The ``breakhis_resized`` folder (or any folder of BreakHis-named PNGs).

    Returns
    -------
    list of BreakHisImage
        Sorted by name.

    Raises
    ------
    HistoAIError
        The folder is missing or has no BreakHis-named PNG; a file's class letter
        contradicts its ``benign`` / ``malignant`` folder.
    ImageReadError
        A PNG cannot be decoded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HistoAIError(
            f"{folder}: BreakHis folder not found (expected benign|malignant/<mag>X/"
            "SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png, e.g. ../shared/data/"
            "breakhis_resized)"
        )
    files = sorted((p for p in folder.rglob("*.png") if _NAME.match(p.stem)), key=lambda p: p.stem)
    if not files:
        raise HistoAIError(
            f"{folder}: no PNG named SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png "
            "(expected the BreakHis layout)"
        )
    images = []
    for path in files:
        m = _NAME.match(path.stem)
        assert m is not None
        label = int(m["cls"] == "M")
        parents = {p.name.lower() for p in path.parents}
        if CLASSES[1 - label] in parents:
            raise HistoAIError(
                f"{path}: the name says {CLASSES[label]} but the file is in a "
                f"'{CLASSES[1 - label]}' folder; fix the file's place or name"
            )
        images.append(
            BreakHisImage(
                name=path.stem,
                image=_read_rgb(path),
                label=label,
                tumour_type=m["type"],
                slide=f"{m['year']}-{m['slide']}{m['suffix']}",
                patient=f"{m['year']}-{m['slide']}",
                magnification=int(m["mag"]),
            )
        )
    return images


def load_idc(folder: str | Path, *, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """IDC patches resized to ``patch`` × ``patch`` px.

    Parameters
    ----------
    folder : str or Path
        ``idc_breast_patches`` (PNG files named ``<id>_idx5_x<X>_y<Y>_class<C>.png``).
    patch : int, pixels
        Output side; the 50 × 50 patches (edge patches smaller: padded with white to
        50 × 50 first) are resized with bilinear interpolation.

    Returns
    -------
    images : numpy.ndarray
        ``(N, patch, patch, 3)`` uint8.
    labels : numpy.ndarray
        ``(N,)`` int64, 1 = IDC positive (malignant proxy), 0 = negative (benign proxy).

    Raises
    ------
    HistoAIError
        Folder missing or without IDC-named PNG files.
    ImageReadError
        A PNG cannot be decoded.
    """
    from PIL import Image

    folder = Path(folder)
    files = (
        sorted((p for p in folder.rglob("*.png") if _IDC_NAME.match(p.stem)), key=lambda p: p.name)
        if folder.is_dir()
        else []
    )
    if not files:
        raise HistoAIError(
            f"{folder}: no IDC patches (expected patients/<id>/<id>_idx5_x<X>_y<Y>_class<C>.png,"
            " e.g. ../shared/data/idc_breast_patches)"
        )
    images = np.empty((len(files), patch, patch, 3), np.uint8)
    labels = np.empty(len(files), np.int64)
    for n, path in enumerate(files):
        rgb = _read_rgb(path)
        side = max(50, *rgb.shape[:2])
        canvas = np.full((side, side, 3), 255, np.uint8)
        canvas[: rgb.shape[0], : rgb.shape[1]] = rgb
        images[n] = np.asarray(
            Image.fromarray(canvas).resize((patch, patch), Image.Resampling.BILINEAR)
        )
        m = _IDC_NAME.match(path.stem)
        assert m is not None
        labels[n] = int(m["label"])
    return images, labels


def sliding_crops(image: np.ndarray, *, patch: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window crops as the inference engine tiles a tile model.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, C)``.
    patch : int, pixels
        Crop side.
    overlap : int, pixels
        ``patch - stride`` (``patch / 2`` = the paper's 50 % overlap).

    Returns
    -------
    crops : numpy.ndarray
        ``(n, patch, patch, C)``, same dtype; an image smaller than ``patch`` is padded
        with 255 (uint8) / 0 at the bottom / right, like the engine.
    origins : numpy.ndarray
        ``(n, 2)`` (row, column) of each crop's first pixel; the last row / column of
        crops is pulled back to end at the border (`PatchGrid.input_origin`).
    """
    h, w = image.shape[:2]
    stride = max(1, patch - overlap)
    n_rows = max(1, math.ceil(max(0, h - patch) / stride) + 1)
    n_cols = max(1, math.ceil(max(0, w - patch) / stride) + 1)
    fill = 255 if image.dtype == np.uint8 else 0
    if h < patch or w < patch:
        padded = np.full((max(h, patch), max(w, patch), image.shape[2]), fill, image.dtype)
        padded[:h, :w] = image
        image = padded
    ys = [min(i * stride, max(0, h - patch)) for i in range(n_rows)]
    xs = [min(j * stride, max(0, w - patch)) for j in range(n_cols)]
    origins = np.array([(y, x) for y in ys for x in xs], dtype=np.int64)
    crops = np.stack([image[y : y + patch, x : x + patch] for y, x in origins])
    return crops, origins


def patient_folds(images: Sequence[BreakHisImage], n_folds: int = 4) -> list[list[str]]:
    """Deal patient groups into ``n_folds`` folds, balancing the classes.

    Groups (largest first, then by name) go to the fold with the fewest images of the
    group's majority class, then the fewest images, then the lowest index.

    Returns
    -------
    list of list of str
        Patient groups of each fold (sorted).

    Raises
    ------
    HistoAIError
        Fewer patient groups than folds.
    """
    groups: dict[str, list[int]] = {}
    for im in images:
        groups.setdefault(im.patient, []).append(im.label)
    if n_folds < 2 or len(groups) < n_folds:
        raise HistoAIError(
            f"{n_folds} folds need at least {max(n_folds, 2)} patient groups, got {len(groups)}"
        )
    per_class = np.zeros((n_folds, 2), np.int64)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for patient in sorted(groups, key=lambda p: (-len(groups[p]), p)):
        labels = groups[patient]
        majority = int(2 * sum(labels) >= len(labels))
        fold = min(range(n_folds), key=lambda f: (per_class[f, majority], per_class[f].sum(), f))
        folds[fold].append(patient)
        for label in labels:
            per_class[fold, label] += 1
    return [sorted(f) for f in folds]


# --------------------------------------------------------------------------- aggregation


def aggregate_image(tile_probs: np.ndarray, method: str) -> tuple[int, float]:
    """Image-level label and malignant score from per-crop probabilities.

    The same rules as the engine's ``aggregate`` (`napari_histo_ai.inference.objects`),
    for two classes: ``sum`` / ``average`` (sum / mean of the probabilities, argmax; the
    same decision), ``vote`` (majority of the crops' argmax, ties benign), ``exist`` /
    ``exist3`` (malignant when at least 1 / 3 crops are).

    Parameters
    ----------
    tile_probs : numpy.ndarray
        ``(n, 2)`` softmax probabilities (benign, malignant) per crop.
    method : str
        One of `AGGREGATIONS`.

    Returns
    -------
    label : int
        0 benign, 1 malignant.
    score : float
        Malignant score for ROC analysis: mean ``p_malignant`` (sum, average), fraction
        of malignant crops (vote), the largest / 3rd-largest ``p_malignant`` (exist /
        exist3; 0 with fewer crops).
    """
    p = np.asarray(tile_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise HistoAIError(f"expected (n, 2) crop probabilities, got shape {p.shape}")
    if len(p) == 0:
        return 0, 0.0
    malignant = p.argmax(axis=1) == 1
    if method in ("sum", "average"):
        total = p.sum(axis=0) if method == "sum" else p.mean(axis=0)
        return int(np.argmax(total)), float(total[1] / total.sum())
    if method == "vote":
        fraction = float(malignant.mean())
        return int(malignant.sum() > (~malignant).sum()), fraction
    if method in ("exist", "exist3"):
        k = 1 if method == "exist" else 3
        q = np.sort(1.0 - p[:, 0])[::-1]
        score = float(q[k - 1]) if len(q) >= k else 0.0
        return int(malignant.sum() >= k), score
    raise HistoAIError(f"unknown aggregation {method!r}: expected one of {', '.join(AGGREGATIONS)}")


def _binary_scores(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    from .. import metrics

    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    both = len(np.unique(y_true)) == 2
    cm = metrics.confusion_matrix(y_true, y_pred, n_classes=2)
    return {
        "n_images": len(y_true),
        "n_benign": int((y_true == 0).sum()),
        "n_malignant": int((y_true == 1).sum()),
        "accuracy": round(metrics.accuracy(y_true, y_pred), 4),
        "precision": round(metrics.precision(y_true, y_pred, positive=1), 4),
        "recall": round(metrics.recall(y_true, y_pred, positive=1), 4),
        "f1": round(metrics.f1(y_true, y_pred, positive=1), 4),
        # AUC needs both classes among the images
        "auc": round(metrics.roc_auc(y_true, score), 4) if both else None,
        "confusion_matrix": cm.tolist(),
    }


def image_metrics(
    predictions: Sequence[tuple[BreakHisImage, np.ndarray]],
) -> dict[str, Any]:
    """Image-level metrics per aggregation and magnification, and crop-level metrics.

    Parameters
    ----------
    predictions : sequence of (BreakHisImage, (n, 2) crop probabilities)

    Returns
    -------
    dict
        ``image_level[aggregation][all | "40x" | ...]`` = ``n_images``, ``n_benign``,
        ``n_malignant``, ``accuracy``, ``precision``, ``recall``, ``f1`` (malignant
        positive), ``auc`` (None where one class is absent), ``confusion_matrix`` (rows
        truth); ``crop_level[all | mag]`` = crop accuracy / AUC with each crop labelled
        by its image; ``per_image`` = label, magnification and every aggregation's
        decision and score.
    """
    from .. import metrics

    if not predictions:
        raise HistoAIError("no images to score")
    mags = sorted({im.magnification for im, _ in predictions})
    subsets: dict[str, list[int]] = {"all": list(range(len(predictions)))}
    for mag in mags:
        subsets[f"{mag}x"] = [i for i, (im, _) in enumerate(predictions) if im.magnification == mag]
    y_true = np.array([im.label for im, _ in predictions])
    image_level: dict[str, dict[str, Any]] = {}
    per_image: dict[str, dict[str, Any]] = {
        im.name: {"label": CLASSES[im.label], "magnification": im.magnification, "n_crops": len(p)}
        for im, p in predictions
    }
    for method in AGGREGATIONS:
        decided = [aggregate_image(p, method) for _, p in predictions]
        y_pred = np.array([d[0] for d in decided])
        score = np.array([d[1] for d in decided])
        image_level[method] = {
            key: _binary_scores(y_true[idx], y_pred[idx], score[idx])
            for key, idx in subsets.items()
        }
        for (im, _), (label, s) in zip(predictions, decided, strict=True):
            per_image[im.name][method] = {"class": CLASSES[label], "score": round(s, 4)}
    crop_level: dict[str, dict[str, Any]] = {}
    for key, idx in subsets.items():
        truth = np.concatenate(
            [np.full(len(predictions[i][1]), predictions[i][0].label) for i in idx]
        )
        probs = np.concatenate([predictions[i][1] for i in idx])
        crop_level[key] = {
            "n_crops": len(truth),
            "accuracy": round(metrics.accuracy(truth, probs.argmax(axis=1)), 4),
            "auc": round(metrics.roc_auc(truth, probs[:, 1]), 4)
            if len(np.unique(truth)) == 2
            else None,
        }
    return {"image_level": image_level, "crop_level": crop_level, "per_image": per_image}


# --------------------------------------------------------------------------- model


def _prepare(crops: np.ndarray, norm: Normalisation) -> tuple[np.ndarray, Normalisation]:
    """Apply the expensive, per-crop part of ``norm`` once (CLAHE); return the rest.

    Returns uint8 crops and the normalisation still to apply per batch (``scale`` after
    CLAHE, else ``norm`` itself).
    """
    if norm.method != "clahe":
        return crops, norm
    from ..models.preprocessing import clahe

    out = np.stack([clahe(c, clip_limit=norm.clip_limit, tiles=norm.tiles) for c in crops])
    return out, Normalisation(method="scale", scale=norm.scale)


def predict_crops(
    predict: Callable[[torch.Tensor], torch.Tensor],
    crops: np.ndarray,
    norm: Normalisation,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax probabilities ``(n, K)`` of uint8 crops ``(n, h, w, 3)``.

    ``predict`` maps a float32 ``(N, 3, h, w)`` tensor to logits ``(N, K)`` (a module in
    eval mode or a `Predictor`); ``norm`` is applied as the engine does
    (`napari_histo_ai.models.preprocessing.normalise`).
    """
    import torch

    from ..models.preprocessing import normalise

    out = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(normalise(crops[start : start + batch_size], norm))
            out.append(torch.softmax(predict(x).float(), dim=1).numpy())
    return np.concatenate(out).astype(np.float64)


def _augment(batch: np.ndarray, rng: np.random.Generator, *, colour: bool = False) -> np.ndarray:
    """Random dihedral transform (rotation by k · 90°, optional flip) of each uint8 crop.

    With ``colour``, also a stain-like jitter: per-channel gain × 0.85–1.15, contrast
    × 0.8–1.2 about the crop mean, brightness ± 15 (8-bit units), clipped to 0..255.
    """
    out = np.empty_like(batch)
    for i, crop in enumerate(batch):
        crop = np.rot90(crop, int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if colour:
            c = crop.astype(np.float32) * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
            mean = c.mean()
            c = (c - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-15, 15)
            crop = np.clip(np.rint(c), 0, 255).astype(np.uint8)
        out[i] = crop
    return out


def _sample(
    labels: np.ndarray, n: int, rng: np.random.Generator, *, balanced: bool = True
) -> np.ndarray:
    """``n`` indices, half from each class when both are present."""
    if not balanced or len(np.unique(labels)) < 2:
        return rng.integers(len(labels), size=n)
    half = rng.random(n) < 0.5
    idx = np.empty(n, np.int64)
    for c, mask in ((0, ~half), (1, half)):
        pool = np.flatnonzero(labels == c)
        idx[mask] = pool[rng.integers(len(pool), size=int(mask.sum()))]
    return idx


def _train_one(
    sources: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    norm: Normalisation,
    arch: Mapping[str, Any],
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
    fold: int,
    colour_jitter: bool = False,
) -> Generator[Progress, None, torch.nn.Module]:
    """Train one `BreakHisResNet` on prepared uint8 crops from several sources."""
    import torch
    import torch.nn.functional as F

    from ..models.architectures.resnet import BreakHisResNet
    from ..models.preprocessing import normalise

    rng = np.random.default_rng([seed, fold])
    torch.manual_seed(seed * 1000 + fold)
    model = BreakHisResNet(**arch)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    sources = [s for s in sources if len(s[1])]
    shares = [batch_size // len(sources)] * len(sources)
    shares[0] += batch_size - sum(shares)
    model.train()
    for step in range(1, steps + 1):
        xs, ys = [], []
        for (crops, labels), n in zip(sources, shares, strict=True):
            idx = _sample(labels, n, rng)
            xs.append(_augment(crops[idx], rng, colour=colour_jitter))
            ys.append(labels[idx])
        x = torch.from_numpy(normalise(np.concatenate(xs), norm))
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.concatenate(ys))
        optimiser.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
        scheduler.step()
        yield {"fold": fold, "step": step, "steps": steps, "loss": float(loss.item())}
    model.eval()
    return model


def _default_command(args: Sequence[str]) -> str:
    return "python -m napari_histo_ai.training.benign_malignant " + shlex.join(list(args))


def train_breakhis(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    folds: int = 4,
    ship_fold: int = 0,
    cross_validate: bool = True,
    steps: int = 360,
    batch_size: int = 32,
    patch: int = 96,
    normalisation: str = "clahe",
    use_idc: bool = True,
    colour_jitter: bool = True,
    arch: Mapping[str, Any] | None = None,
    learning_rate: float = 2e-3,
    weight_decay: float = 2e-4,
    command: str | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Train the benign / malignant ResNet; a generator yielding one record per step.

    Parameters
    ----------
    data_dir : str or Path
        The shared data folder holding ``breakhis_resized`` and ``idc_breast_patches``.
    out_path : str or Path
        Weights file (``.safetensors``, the model of ``ship_fold``); the JSON record goes
        beside it (``.json``). Both are written atomically.
    seed : int
        Seeds numpy (sampling, augmentation) and torch (initialisation).
    folds : int
        Patient-disjoint folds over BreakHis (`patient_folds`).
    ship_fold : int
        The fold whose model is saved (its patients are the held-out set of `evaluate`).
    cross_validate : bool
        Train every fold (pooled out-of-fold metrics); ``False`` trains ``ship_fold``
        only.
    steps, batch_size : int
        Optimiser steps per fold and crops per step.
    patch : int, pixels
        Crop side (stride ``patch / 2``); a multiple of 32.
    normalisation : str
        ``clahe`` (paper's CLAHE on Y of YUV, clip 2, 8 × 8 tiles), ``whiten`` (per
        crop over all channels), ``zscore`` (per crop and channel) or ``scale``.
    use_idc : bool
        Add the IDC patches (proxy labels) to every fold's training set.
    colour_jitter : bool
        Add a stain-like colour jitter to the dihedral augmentation.
    arch : mapping, optional
        `BreakHisResNet` keyword arguments (default `ARCH`).
    learning_rate, weight_decay : float
        Adam peak learning rate (5 % warm-up, cosine decay) and L2 weight decay.
    command : str, optional
        Command line recorded in the JSON.

    Yields
    ------
    dict
        ``{"fold", "step", "steps", "loss"}`` per optimiser step.

    Returns
    -------
    dict
        The JSON record (``metrics.cross_validation`` pooled out-of-fold,
        ``metrics.held_out`` = ``ship_fold`` alone, ``split``, timings, data hashes...).

    Raises
    ------
    HistoAIError
        Missing data, bad options.
    """
    import torch

    data_dir, out_path = Path(data_dir), Path(out_path)
    if normalisation not in NORMALISATIONS:
        raise HistoAIError(
            f"normalisation {normalisation!r}: expected one of {', '.join(NORMALISATIONS)}"
        )
    if patch < 32 or patch % 32:
        raise HistoAIError(f"patch {patch} px must be a positive multiple of 32")
    if steps < 1 or batch_size < 2:
        raise HistoAIError(f"steps ({steps}) must be >= 1 and batch_size ({batch_size}) >= 2")
    if not 0 <= ship_fold < folds:
        raise HistoAIError(f"ship_fold {ship_fold} must be in 0..{folds - 1}")
    arch = dict(ARCH if arch is None else arch)
    norm = NORMALISATIONS[normalisation]
    overlap = patch // 2
    started = time.perf_counter()
    cpu_started = time.process_time()

    images = load_breakhis(data_dir / BREAKHIS)
    fold_patients = patient_folds(images, folds)
    crops, prepared = [], []
    batch_norm = norm
    for im in images:
        c, _ = sliding_crops(im.image, patch=patch, overlap=overlap)
        crops.append(c)
        p, batch_norm = _prepare(c, norm)
        prepared.append(p)
    if use_idc:
        idc_images, idc_labels = load_idc(data_dir / IDC, patch=patch)
        idc_prepared, _ = _prepare(idc_images, norm)
    else:
        idc_prepared, idc_labels = np.zeros((0, patch, patch, 3), np.uint8), np.zeros(0, np.int64)
    prepare_time = time.perf_counter() - started

    run_folds = range(folds) if cross_validate else [ship_fold]
    predictions: dict[int, list[tuple[BreakHisImage, np.ndarray]]] = {}
    shipped: torch.nn.Module | None = None
    fold_times: dict[str, float] = {}
    for fold in run_folds:
        fold_started = time.perf_counter()
        held = set(fold_patients[fold])
        train_idx = [i for i, im in enumerate(images) if im.patient not in held]
        bh_x = np.concatenate([prepared[i] for i in train_idx])
        bh_y = np.concatenate([np.full(len(prepared[i]), images[i].label) for i in train_idx])
        sources = [(bh_x, bh_y)] + ([(idc_prepared, idc_labels)] if use_idc else [])
        model = yield from _train_one(
            sources,
            norm=batch_norm,
            arch=arch,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            seed=seed,
            fold=fold,
            colour_jitter=colour_jitter,
        )
        predictions[fold] = [
            (im, predict_crops(model, prepared[i], batch_norm))
            for i, im in enumerate(images)
            if im.patient in held
        ]
        fold_times[str(fold)] = round(time.perf_counter() - fold_started, 1)
        if fold == ship_fold:
            shipped = model
    assert shipped is not None
    train_time = time.perf_counter() - started
    cpu_time = time.process_time() - cpu_started

    metrics: dict[str, Any] = {"held_out": image_metrics(predictions[ship_fold])}
    if cross_validate:
        pooled = [p for f in run_folds for p in predictions[f]]
        metrics["cross_validation"] = image_metrics(pooled)
        metrics["per_fold"] = {
            str(f): {
                "patients": fold_patients[f],
                "n_images": len(predictions[f]),
                "n_benign": sum(1 for im, _ in predictions[f] if im.label == 0),
                "n_malignant": sum(1 for im, _ in predictions[f] if im.label == 1),
                "image_accuracy": {
                    m: image_metrics(predictions[f])["image_level"][m]["all"]["accuracy"]
                    for m in AGGREGATIONS
                },
            }
            for f in run_folds
        }
    bh_files = sorted((data_dir / BREAKHIS).rglob("*.png"))
    idc_files = sorted((data_dir / IDC).rglob("*.png")) if use_idc else []
    idc_digest = hashlib.sha256()
    for file in idc_files:
        idc_digest.update(file.name.encode())
        idc_digest.update(sha256(file).encode())
    record: dict[str, Any] = {
        "architecture": "breakhis_resnet",
        "kwargs": arch,
        "weights": out_path.name,
        "mpp": None,
        "resolution": "the image's own pixels (BreakHis PNGs carry no µm/px)",
        "patch": patch,
        "overlap": overlap,
        "normalisation": normalisation,
        "output": "2 logits (benign, malignant); apply a softmax",
        "metrics": metrics,
        "split": {
            "protocol": (
                f"{folds}-fold patient-disjoint over BreakHis (patient group = slide id "
                "without letter suffix); IDC patches always in training"
                + ("" if use_idc else " (disabled)")
            ),
            "folds": fold_patients,
            "ship_fold": ship_fold,
            "held_out_images": [im.name for im, _ in predictions[ship_fold]],
            "idc_patches": len(idc_labels),
            "idc_positive": int(idc_labels.sum()),
        },
        "seed": seed,
        "steps_per_fold": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "colour_jitter": colour_jitter,
        "command": command or _default_command(["--data", str(data_dir), "--out", str(out_path)]),
        "data": {
            "folder": str(data_dir),
            "breakhis_sha256": {p.stem: sha256(p)[:16] for p in bh_files},
            "idc_files": len(idc_files),
            "idc_sha256_of_names_and_hashes": idc_digest.hexdigest()[:16],
        },
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "prepare_time_s": round(prepare_time, 1),
        "fold_time_s": fold_times,
        "train_time_s": round(train_time, 1),
        "cpu_time_s": round(cpu_time, 1),
        "parameters": sum(p.numel() for p in shipped.parameters()),
    }
    metadata = {
        "architecture": "breakhis_resnet",
        "kwargs": json.dumps(arch),
        "normalisation": normalisation,
        "patch": str(patch),
        "seed": str(seed),
    }
    save_weights_and_record(shipped, out_path, metadata, record)
    return record


def train_breakhis_sync(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `train_breakhis` to the end and return its record (``progress`` per step)."""
    return run_to_end(train_breakhis(data_dir, out_path, **options), progress)


# --------------------------------------------------------------------------- evaluation


def _held_out_patients(
    images: Sequence[BreakHisImage], weights: Path | None
) -> tuple[list[str], str]:
    """Held-out patient groups of a weights file: its JSON record, else fold 0 of 4."""
    if weights is not None:
        record_path = Path(weights).with_suffix(".json")
        if record_path.is_file():
            try:
                split = json.loads(record_path.read_text("utf-8"))["split"]
                return list(split["folds"][split["ship_fold"]]), f"from {record_path.name}"
            except (KeyError, IndexError, TypeError, ValueError):
                pass
    return patient_folds(images, 4)[0], "fold 0 of the default 4-fold patient split"


def evaluate(
    data_dir: Path,
    *,
    model: str = MODEL,
    weights: Path | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score a registered benign / malignant tile model on held-out BreakHis patients.

    Parameters
    ----------
    data_dir : Path
        The shared data folder (with ``breakhis_resized``).
    model : str
        Registry name (``breakhis-resnet``).
    weights : Path, optional
        A weights file to score instead of the registered one (same architecture).
    names : sequence of str, optional
        Score only these held-out images (file stems); all held-out images by default.

    Returns
    -------
    dict
        ``metrics`` (`image_metrics` of the held-out images, crops as the model's
        ``io.patch_size`` / ``io.overlap`` tile them, its normalisation), ``split``,
        ``model``, ``weights``.

    Raises
    ------
    HistoAIError
        Unknown or dense model, missing data, weights that do not fit.
    """
    from ..models.loading import load_model
    from ..models.registry import load_registry

    spec = load_registry().get(model)
    if spec.dense:
        raise HistoAIError(f"model {model!r} is dense; the BreakHis evaluation scores tile models")
    if weights is not None:
        spec = replace(spec, weights=Path(weights))
    predictor = load_model(spec, device="cpu")
    images = load_breakhis(Path(data_dir) / BREAKHIS)
    held, source = _held_out_patients(images, spec.weights)
    held_images = [
        im for im in images if im.patient in set(held) and (names is None or im.name in set(names))
    ]
    if not held_images:
        raise HistoAIError(f"none of the held-out patients {held} is in {data_dir / BREAKHIS}")
    predictions = []
    for im in held_images:
        crops, _ = sliding_crops(im.image, patch=spec.io.patch_size, overlap=spec.io.overlap)
        probs = predict_crops(predictor, crops, spec.io.normalisation)
        predictions.append((im, probs[:, :2]))
    scores = image_metrics(predictions)
    method = next((o.aggregate for o in spec.outputs if o.kind == "class"), "average")
    return {
        "model": model,
        "weights": str(spec.weights),
        "metrics": scores,
        "split": {
            "held_out_patients": held,
            "source": source,
            "images": [im.name for im in held_images],
        },
        **_plot_entries(predictions, method if method in AGGREGATIONS else "average"),
    }


def _plot_entries(
    predictions: Sequence[tuple[BreakHisImage, np.ndarray]], method: str
) -> dict[str, Any]:
    """``curves`` / ``confusion`` of `evaluate` for `napari_histo_ai.plots.evaluation_plots`.

    Image level: each image's malignant score and decision by `aggregate_image` with
    ``method`` (the registry entry's aggregate); crop level: every crop's malignant
    probability, labelled by its image, decided by argmax.
    """
    from .. import metrics
    from ..plots import confusion_entry, curve_entry

    y_image = np.array([im.label for im, _ in predictions], dtype=np.int64)
    decided = [aggregate_image(p, method) for _, p in predictions]
    y_crop = np.concatenate([np.full(len(p), im.label) for im, p in predictions])
    probs = np.concatenate([p for _, p in predictions])
    image = f"image ({method})"
    return {
        "curves": {
            image: curve_entry(y_image, [d[1] for d in decided]),
            "crop": curve_entry(y_crop, probs[:, 1]),
        },
        "confusion": {
            image: confusion_entry(
                metrics.confusion_matrix(y_image, [d[0] for d in decided], n_classes=2), CLASSES
            ),
            "crop": confusion_entry(
                metrics.confusion_matrix(y_crop, probs.argmax(axis=1), n_classes=2), CLASSES
            ),
        },
    }


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, print the metrics summary; exit status 2 on a data error."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_histo_ai.training.benign_malignant",
        description="Train paper 002's benign / malignant ResNet on BreakHis + IDC patches.",
    )
    parser.add_argument("--data", type=Path, required=True, help="shared data folder")
    parser.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=None, help="optimiser steps per fold in units of 40"
    )
    parser.add_argument("--steps", type=int, default=360, help="optimiser steps per fold")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: the measured budget)"
    )
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--no-cv", action="store_true", help="train the shipped fold only")
    parser.add_argument("--normalisation", default="clahe", choices=sorted(NORMALISATIONS))
    parser.add_argument("--no-idc", action="store_true", help="BreakHis crops only")
    parser.add_argument(
        "--no-colour-jitter", action="store_true", help="dihedral augmentation only"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    steps = args.steps if args.epochs is None else 40 * args.epochs
    import torch

    torch.set_num_threads(max(1, args.threads))

    def report(record: Progress) -> None:
        if not args.quiet and (record["step"] % 40 == 0 or record["step"] == record["steps"]):
            print_progress(record, "fold", "step", "loss")

    try:
        result = train_breakhis_sync(
            args.data,
            args.out,
            progress=report,
            seed=args.seed,
            folds=args.folds,
            cross_validate=not args.no_cv,
            steps=steps,
            normalisation=args.normalisation,
            use_idc=not args.no_idc,
            colour_jitter=not args.no_colour_jitter,
            command=_default_command(given),
        )
    except HistoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        key: {
            m: {
                k: result["metrics"][key]["image_level"][m]["all"][k]
                for k in ("n_images", "accuracy", "f1", "auc")
            }
            for m in AGGREGATIONS
        }
        for key in ("cross_validation", "held_out")
        if key in result["metrics"]
    }
    print(
        json.dumps(
            {
                "image_level_all": summary,
                "train_time_s": result["train_time_s"],
                "cpu_time_s": result["cpu_time_s"],
                "command": result["command"],
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
