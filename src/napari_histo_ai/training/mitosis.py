"""Train and evaluate the default mitosis models of paper 000 on the AMi-Br crops.

Paper 000 (Pearce, "Convolutional Neural Networks and the Analysis of Cancer Imagery")
turns each labelled mitosis point into a probability map ``pi = exp(-a·d)`` (``d`` the
distance to the point) and calls a tile positive when its map exceeds a threshold
(`probability_map`, `tile_labels`); it trains a "basic convnet" tile classifier (blocks
of two 3×3 conv + BN + ReLU and a max-pool, one dense layer with dropout, a binary
output) on Macenko-normalised H&E with Adam, balanced sampling (about 2/3 negative, 1/3
positive tiles) and the **negative feed** (after every epoch the model is run over the
training set; the misclassified tiles plus a random sample of correctly classified ones,
distorted by random rotations and Gaussian noise, are trained on once more), with binary
cross-entropy or the **binary rare-hinge loss** (`rare_hinge_loss`). Its fully
convolutional variant failed in the paper; `MitosisFCN` here is trained the same way
against the dense ``exp(-a·d)`` maps and gives the mitosis map and points.

Data (``ami_br_mitosis``): 680 RGB crops of 128 × 128 px, each centred on a mitotic
figure of a MIDOG 2021 (≈ 0.23 µm/px) or TUPAC16 (≈ 0.25 µm/px) image; ``AMI-BR.csv``
holds every mitosis of those images, so other mitoses inside a crop are labelled too.
Crops are resampled to the models' 0.5 µm/px (≈ 59 or 64 px). The split is by source
image (`split_by_image`, fixed seed, ~20 % of the crops of each dataset held out).

* convnet tiles (24 px = 12 µm): positives are windows over the crop centre (jitter
  ±3 px); negatives are the four corner windows of each crop (their nearest pixel is
  ≥ 9 px = 4.6 µm from the centre) unless their map says otherwise, plus random
  windows of the MICCAI 2015 nucleus tiles beside the data folder
  (``../miccai_nuclei_seg``: brain-tumour H&E without labelled mitoses; **assumed
  mitosis-free**; image01, 02, 08, 09 train, image03, 11 test).
* FCN: the crops cut to 56 px (Macenko-normalised as a whole) with their dense maps,
  trained as random 48 px sub-windows (the crop periphery is the negative context), and
  56 px MICCAI windows with empty maps as negative tiles. In the negative feed a window
  is wrong when it misses a labelled mitosis or calls one far from all (`_mistakes`).
  Augmentation: dihedral transforms, Gaussian noise and an optical-density (stain
  intensity) jitter; free rotations in the negative feed.

Every tile is stain-normalised with Macenko's method to a reference fitted on a mosaic
of training crops (`reference_stains`), per tile as the inference engine does it with
the registry's ``normalisation.stain``.

Command line (``napari-histo-ai train-default mitosis`` runs `main`)::

    napari-histo-ai train-default mitosis --data ../shared/data/ami_br_mitosis \
        --out src/napari_histo_ai/models/weights/mitosis-fcn-v1.safetensors

writes ``mitosis-fcn-v1.safetensors`` and, beside it, ``mitosis-convnet-v1.safetensors``
(`convnet_weights_path`), each with its JSON record.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics
from ..errors import HistoAIError, ImageReadError
from ..models.spec import StainReference
from .common import run_to_end, save_weights_and_record, sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODEL_MPP",
    "Crop",
    "Window",
    "convnet_weights_path",
    "detect_peaks",
    "evaluate",
    "fcn_map",
    "load_ami_crops",
    "main",
    "probability_map",
    "rare_hinge_loss",
    "reference_stains",
    "split_by_image",
    "tile_labels",
    "train_mitosis",
    "train_mitosis_sync",
]

#: µm per pixel of both models' input
MODEL_MPP = 0.5
#: µm per pixel of the source datasets, as reported by their organisers
SOURCE_MPP = {"MIDOG21": 0.23, "TUPAC16": 0.25}
#: side of the AMi-Br crops, source pixels; the mitosis is at (CROP_SIDE / 2, CROP_SIDE / 2)
CROP_SIDE = 128
#: convnet tile side, px at MODEL_MPP (12 µm)
TILE = 24
#: FCN training window side, px at MODEL_MPP (24 µm)
WINDOW = 48
#: decay ``a`` of the target maps, per µm (0.15 per px at 0.5 µm/px: p = 0.5 at 2.3 µm)
DECAY_PER_UM = 0.3
#: a tile is positive when its map reaches this
TILE_THRESHOLD = 0.5
#: peaks of the FCN map closer than this are merged, µm (as the registry's points output)
MIN_DISTANCE_UM = 5.0
#: detection matching radii, µm (7.5 µm = 30 px at 0.25 µm/px, the MIDOG convention)
MATCH_RADII_UM = (7.5, 4.0)
#: an FCN window counts as called positive in the negative feed when its map max reaches
#: this (the soft exp(-a·d) targets keep the map's peaks below 1)
DENSE_FEED_THRESHOLD = 0.4
#: held-out MICCAI 2015 tiles (negatives) and the ones that train
MICCAI_TEST = ("image03", "image11")
MICCAI_TRAIN = ("image01", "image02", "image08", "image09")

Progress = dict[str, float]


# ----------------------------------------------------------------------------- targets
def probability_map(
    shape: tuple[int, int], points: np.ndarray | Sequence[Sequence[float]], *, a: float
) -> np.ndarray:
    """Paper 000's target map ``pi = exp(-a·d)`` of labelled points.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the map, pixels.
    points : array-like, shape (N, 2)
        ``(row, column)`` of the labelled mitoses, pixels (pixel ``i`` is centred on
        ``i``; points may lie outside the map and still raise it near its edge).
    a : float, per pixel
        Decay; ``d`` is the Euclidean distance in pixels to the nearest point.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 in [0, 1]: 1 at a point, ``exp(-a·d)`` around it, 0 when
        there are no points.

    Raises
    ------
    HistoAIError
        ``a`` is not a positive finite number, ``shape`` is not two positive ints, or
        ``points`` is not ``(N, 2)``.

    Examples
    --------
    >>> m = probability_map((5, 5), [(2, 2)], a=1.0)
    >>> round(float(m[2, 2]), 2), round(float(m[2, 3]), 2)
    (1.0, 0.37)
    """
    if not (isinstance(a, int | float) and math.isfinite(a) and a > 0):
        raise HistoAIError(f"decay a must be a positive number (per pixel), got {a!r}")
    if len(shape) != 2 or min(int(s) for s in shape) < 1:
        raise HistoAIError(f"map shape must be (H, W) with positive sides, got {shape!r}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return np.zeros((int(shape[0]), int(shape[1])), np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise HistoAIError(f"points must be (N, 2) (row, column) pixels, got shape {pts.shape}")
    rows = np.arange(int(shape[0]), dtype=np.float64)[:, None, None]
    cols = np.arange(int(shape[1]), dtype=np.float64)[None, :, None]
    d2 = (rows - pts[:, 0]) ** 2 + (cols - pts[:, 1]) ** 2  # (H, W, N)
    return np.exp(-a * np.sqrt(d2.min(axis=2))).astype(np.float32)


def tile_labels(
    prob_map: np.ndarray, tile: int, *, threshold: float = TILE_THRESHOLD
) -> np.ndarray:
    """Tile labels of a target map: a tile is positive when its map reaches ``threshold``.

    Parameters
    ----------
    prob_map : numpy.ndarray
        ``(H, W)`` map from `probability_map`.
    tile : int
        Tile side, pixels; tiles are laid from the top-left corner without overlap
        (partial tiles at the bottom / right edge are dropped).
    threshold : float
        Minimum map value inside a positive tile, in (0, 1].

    Returns
    -------
    numpy.ndarray
        ``(H // tile, W // tile)`` bool.

    Raises
    ------
    HistoAIError
        ``tile`` < 1, or ``threshold`` outside (0, 1].
    """
    if tile < 1:
        raise HistoAIError(f"tile side must be ≥ 1 px, got {tile}")
    if not 0 < threshold <= 1:
        raise HistoAIError(f"tile threshold must be in (0, 1], got {threshold}")
    h, w = prob_map.shape[0] // tile, prob_map.shape[1] // tile
    blocks = prob_map[: h * tile, : w * tile].reshape(h, tile, w, tile)
    return np.asarray(blocks.max(axis=(1, 3)) >= threshold)


# ----------------------------------------------------------------------------- losses
def rare_hinge_loss(
    scores: torch.Tensor, targets: torch.Tensor, *, a: float = 2.0, margin: float = 1.0
) -> torch.Tensor:
    """Paper 000's binary rare-hinge loss, mean over elements.

    ``max(0, margin - y·s) · exp(a·t)`` with ``y = 2t - 1``: the hinge loss of the
    binary score ``s``, amplified ``e^a``-fold for positives (``t = 1``) so that calling
    everything negative (the paper's "saturation") is expensive; negatives keep weight 1.
    Soft targets ``t`` in (0, 1) (the dense ``exp(-a·d)`` maps) interpolate both.

    Parameters
    ----------
    scores : torch.Tensor
        Binary scores (logits), any shape.
    targets : torch.Tensor
        Same shape, in [0, 1].
    a : float
        Amplification exponent (the paper tried 2 and 4).
    margin : float
        Hinge margin ``Δ``.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    import torch

    y = 2 * targets - 1
    return (torch.clamp(margin - y * scores, min=0) * torch.exp(a * targets)).mean()


def _loss(
    scores: torch.Tensor, targets: torch.Tensor, *, loss: str, hinge_a: float, pos_weight: float
) -> torch.Tensor:
    import torch.nn.functional as F

    if loss == "rare_hinge":
        return rare_hinge_loss(scores, targets, a=hinge_a)
    weight = 1 + pos_weight * targets
    return F.binary_cross_entropy_with_logits(scores, targets, weight=weight)


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Crop:
    """One AMi-Br crop at the model resolution.

    Parameters
    ----------
    name : str
        File stem, ``<dataset>_<uid>``.
    case_id : str
        ``<dataset>/<source image>`` (the unit of the split).
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB at `MODEL_MPP`.
    points : numpy.ndarray
        ``(N, 2)`` float (row, column) px at `MODEL_MPP` of every known mitosis within
        one crop side of the centre (the first is the crop's own, at the centre); some
        lie outside the crop.
    source_mpp : float
        µm per pixel of the source image.
    """

    name: str
    case_id: str
    image: np.ndarray
    points: np.ndarray
    source_mpp: float

    @property
    def centre(self) -> np.ndarray:
        """(row, column) of the crop's own mitosis, px."""
        return self.points[0]

    def inside(self, margin: float = 0.0) -> np.ndarray:
        """The points at least ``margin`` px inside the crop, ``(M, 2)``."""
        h, w = self.image.shape[:2]
        p = self.points
        keep = (
            (p[:, 0] >= -0.5 + margin)
            & (p[:, 0] <= h - 0.5 - margin)
            & (p[:, 1] >= -0.5 + margin)
            & (p[:, 1] <= w - 0.5 - margin)
        )
        return p[keep]


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased (Pillow Lanczos) resize of a uint8 RGB image to ``(H, W)``."""
    from PIL import Image

    if image.shape[:2] == shape:
        return image
    im = Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def load_ami_crops(data_dir: str | Path, *, mpp: float = MODEL_MPP) -> list[Crop]:
    """Load every AMi-Br crop (``normal/`` and ``atypical/``), resampled to ``mpp``.

    Parameters
    ----------
    data_dir : str or Path
        The ``ami_br_mitosis`` folder: ``AMI-BR.csv`` and ``{normal,atypical}/*.png``
        named ``<dataset>_<uid>.png`` (joined to the CSV on dataset and uid).
    mpp : float, micrometres per pixel
        Output resolution; source µm/px from `SOURCE_MPP` by dataset.

    Returns
    -------
    list of Crop
        Sorted by name. ``points`` holds the crop's mitosis and every other mitosis of
        its source image within one crop side (128 source px) of it.

    Raises
    ------
    HistoAIError
        Missing folder, CSV or crops; a crop without a CSV row; an unknown dataset.
    ImageReadError
        A PNG that cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    data_dir = Path(data_dir)
    table = data_dir / "AMI-BR.csv"
    if not table.is_file():
        raise HistoAIError(
            f"{data_dir}: no AMI-BR.csv (expected the ami_br_mitosis folder with AMI-BR.csv "
            "and normal/, atypical/ crops, e.g. ../shared/data/ami_br_mitosis)"
        )
    rows: dict[tuple[str, str], dict[str, str]] = {}
    by_slide: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with open(table, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = (row["dataset"], row["uid"])
            rows[key] = row
            by_slide.setdefault((row["dataset"], row["slide"]), []).append(
                (float(row["y"]), float(row["x"]))
            )
    files = sorted(
        (p for sub in ("normal", "atypical") for p in (data_dir / sub).glob("*.png")),
        key=lambda p: p.stem,
    )
    if not files:
        raise HistoAIError(f"{data_dir}: no crops in normal/ or atypical/ (expected *.png)")
    crops = []
    for path in files:
        dataset, _, uid = path.stem.rpartition("_")
        entry = rows.get((dataset, uid))
        if entry is None:
            raise HistoAIError(
                f"{path}: no row with dataset {dataset!r} and uid {uid!r} in {table.name}"
            )
        if dataset not in SOURCE_MPP:
            raise HistoAIError(
                f"{path}: unknown dataset {dataset!r}; expected one of {', '.join(SOURCE_MPP)}"
            )
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageReadError(path, f"cannot decode the crop: {exc}") from exc
        source_mpp = SOURCE_MPP[dataset]
        factor = source_mpp / mpp  # output px per source px
        shape = (max(1, round(rgb.shape[0] * factor)), max(1, round(rgb.shape[1] * factor)))
        image = _resize(rgb, shape)
        cy, cx = float(entry["y"]), float(entry["x"])
        others = np.asarray(by_slide[(dataset, entry["slide"])], dtype=np.float64)
        near = np.abs(others - (cy, cx)).max(axis=1) <= CROP_SIDE
        rel = others[near] - (cy, cx)
        rel = rel[np.argsort(np.hypot(rel[:, 0], rel[:, 1]), kind="stable")]
        # source pixel (CROP_SIDE/2 + r) → output coordinate (centres at integer px)
        scale = np.array([shape[0] / rgb.shape[0], shape[1] / rgb.shape[1]])
        points = (rel + CROP_SIDE / 2 + 0.5) * scale - 0.5
        crops.append(
            Crop(
                name=path.stem,
                case_id=f"{dataset}/{entry['slide']}",
                image=image,
                points=points,
                source_mpp=source_mpp,
            )
        )
    return crops


def split_by_image(
    crops: Sequence[Crop], *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Crop], list[Crop]]:
    """Slide-disjoint split: whole source images go to train or test.

    Per dataset (MIDOG21, TUPAC16) the source images are shuffled with ``seed`` and
    taken into the test set until it holds at least ``test_fraction`` of that dataset's
    crops.

    Returns
    -------
    (train, test) : lists of Crop
        No ``case_id`` is in both.
    """
    if not 0 < test_fraction < 1:
        raise HistoAIError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_cases: set[str] = set()
    for dataset in sorted({c.case_id.split("/")[0] for c in crops}):
        members = [c for c in crops if c.case_id.split("/")[0] == dataset]
        cases = sorted({c.case_id for c in members})
        count = {k: sum(c.case_id == k for c in members) for k in cases}
        taken = 0
        for k in (cases[i] for i in rng.permutation(len(cases))):
            if taken >= test_fraction * len(members):
                break
            test_cases.add(k)
            taken += count[k]
    train = [c for c in crops if c.case_id not in test_cases]
    test = [c for c in crops if c.case_id in test_cases]
    return train, test


def _miccai_images(data_dir: Path, names: Sequence[str]) -> list[np.ndarray]:
    """MICCAI 2015 nucleus tiles beside ``data_dir`` at `MODEL_MPP` (empty if absent)."""
    from .nuclei import load_miccai_nuclei

    folder = data_dir.parent / "miccai_nuclei_seg"
    if not folder.is_dir():
        return []
    present = [n for n in names if (folder / f"{n}.png").is_file()]
    if not present:
        return []
    return [s.image for s in load_miccai_nuclei(folder, mpp=MODEL_MPP, names=present)]


def reference_stains(crops: Sequence[Crop], *, n: int = 36, seed: int = 0) -> StainReference:
    """Macenko reference fitted on a mosaic of ``n`` crops drawn with ``seed``."""
    from ..models.preprocessing import macenko_fit

    rng = np.random.default_rng(seed)
    chosen = [crops[int(i)] for i in rng.choice(len(crops), size=min(n, len(crops)), replace=False)]
    side = min(min(c.image.shape[:2]) for c in chosen)
    tiles = [c.image[:side, :side] for c in chosen]
    per_row = math.ceil(math.sqrt(len(tiles)))
    while len(tiles) % per_row:
        tiles.append(tiles[len(tiles) % len(chosen)])
    mosaic = np.concatenate(
        [np.concatenate(tiles[i : i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    )
    # percentiles over all pixels: the convention the shipped reference was fitted with
    return macenko_fit(mosaic, tissue_only=False)


# ----------------------------------------------------------------------------- windows
@dataclass
class Window:
    """Training / test samples of one kind: images, target maps and tile labels.

    ``images`` ``(N, S, S, 3)`` uint8 stain-normalised, ``maps`` ``(N, S, S)`` float32
    targets, ``labels`` ``(N,)`` bool (map reaches `TILE_THRESHOLD`).
    """

    images: np.ndarray
    maps: np.ndarray
    labels: np.ndarray

    @staticmethod
    def concat(parts: Sequence[Window]) -> Window:
        parts = [p for p in parts if len(p.labels)]
        return Window(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.maps for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )


def _stain(image: np.ndarray, stain: StainReference | None) -> np.ndarray:
    from ..models.preprocessing import macenko_apply

    return image if stain is None else macenko_apply(image, stain)


def _crop_map(crop: Crop, a_px: float) -> np.ndarray:
    return probability_map(crop.image.shape[:2], crop.points, a=a_px)


def _tile_windows(
    crops: Sequence[Crop],
    stain: StainReference | None,
    *,
    a_px: float,
    threshold: float,
    jitter: Sequence[int] = (-3, 0, 3),
    corners: bool = True,
) -> Window:
    """Convnet tiles: centre windows (every jitter offset) and the four corner windows."""
    images, maps = [], []
    for crop in crops:
        full = _crop_map(crop, a_px)
        h, w = crop.image.shape[:2]
        cy = round(crop.centre[0]) - TILE // 2
        cx = round(crop.centre[1]) - TILE // 2
        origins = [
            (min(max(cy + dy, 0), h - TILE), min(max(cx + dx, 0), w - TILE))
            for dy in jitter
            for dx in jitter
        ]
        if corners:
            origins += [(0, 0), (0, w - TILE), (h - TILE, 0), (h - TILE, w - TILE)]
        for r, c in origins:
            images.append(_stain(crop.image[r : r + TILE, c : c + TILE], stain))
            maps.append(full[r : r + TILE, c : c + TILE])
    m = np.stack(maps)
    return Window(np.stack(images), m, m.max(axis=(1, 2)) >= threshold)


def _negative_windows(
    images: Sequence[np.ndarray], side: int, n: int, stain: StainReference | None, seed: int
) -> Window:
    """``n`` random ``side`` px windows of label-free images (empty maps, negative)."""
    if not images or n < 1:
        return Window(
            np.zeros((0, side, side, 3), np.uint8),
            np.zeros((0, side, side), np.float32),
            np.zeros(0, bool),
        )
    rng = np.random.default_rng(seed)
    areas = np.array([im.shape[0] * im.shape[1] for im in images], float)
    out = []
    for _ in range(n):
        im = images[int(rng.choice(len(images), p=areas / areas.sum()))]
        r = int(rng.integers(im.shape[0] - side + 1))
        c = int(rng.integers(im.shape[1] - side + 1))
        out.append(_stain(im[r : r + side, c : c + side], stain))
    return Window(np.stack(out), np.zeros((n, side, side), np.float32), np.zeros(n, bool))


def _grid_windows(image: np.ndarray, side: int, stain: StainReference | None) -> Window:
    """Non-overlapping ``side`` px tiles of a label-free image (negatives)."""
    h, w = image.shape[0] // side, image.shape[1] // side
    out = [
        _stain(image[r * side : (r + 1) * side, c * side : (c + 1) * side], stain)
        for r in range(h)
        for c in range(w)
    ]
    n = len(out)
    return Window(np.stack(out), np.zeros((n, side, side), np.float32), np.zeros(n, bool))


def _fcn_crops(crops: Sequence[Crop], stain: StainReference | None, a_px: float) -> Window:
    """Whole crops (stain-normalised as a whole) cut to a common side, with their maps."""
    side = min(min(c.image.shape[:2]) for c in crops) // 4 * 4
    images, maps = [], []
    for crop in crops:
        img = _stain(crop.image, stain)
        full = _crop_map(crop, a_px)
        h, w = img.shape[:2]
        r, c = (h - side) // 2, (w - side) // 2
        images.append(img[r : r + side, c : c + side])
        maps.append(full[r : r + side, c : c + side])
    m = np.stack(maps)
    return Window(np.stack(images), m, m.max(axis=(1, 2)) >= TILE_THRESHOLD)


# ----------------------------------------------------------------------------- augmentation
def _augment(
    images: np.ndarray,
    maps: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    rotate: bool,
    noise: float,
    od_jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``size`` crop, dihedral transform, optional free rotation, Gaussian noise,
    and optical-density scaling by ``exp(U(-od_jitter, od_jitter))`` (stain intensity,
    e.g. the darkening Macenko gives a patch that is partly background).

    ``images`` ``(N, S, S, 3)`` uint8, ``maps`` ``(N, S, S)``; returns float32
    ``(N, 3, size, size)`` in 0..1 (+ noise) and ``(N, 1, size, size)`` maps.
    """
    from scipy import ndimage

    n, s = images.shape[0], images.shape[1]
    x = np.empty((n, 3, size, size), np.float32)
    y = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        im = images[i].astype(np.float32)
        if od_jitter > 0:  # stain intensity: scale the optical density (io = 240)
            od = -np.log((im + 1) / 240) * np.exp(rng.uniform(-od_jitter, od_jitter))
            im = np.clip(240 * np.exp(-od) - 1, 0, 255)
        im /= 255
        mp = maps[i]
        if rotate:
            angle = float(rng.uniform(0, 360))
            im = ndimage.rotate(im, angle, axes=(0, 1), reshape=False, order=1, mode="reflect")
            mp = ndimage.rotate(mp, angle, reshape=False, order=1, mode="constant", cval=0.0)
        r, c = int(rng.integers(s - size + 1)), int(rng.integers(s - size + 1))
        im, mp = im[r : r + size, c : c + size], mp[r : r + size, c : c + size]
        k = int(rng.integers(4))
        im, mp = np.rot90(im, k), np.rot90(mp, k)
        if rng.random() < 0.5:
            im, mp = im[:, ::-1], mp[:, ::-1]
        x[i] = im.transpose(2, 0, 1)
        y[i, 0] = mp
    if noise > 0:
        x += rng.normal(0, noise, size=x.shape).astype(np.float32)
    return x, y


# ----------------------------------------------------------------------------- inference
def _logits(model: torch.nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Eval-mode forward of float32 ``(N, 3, H, W)`` in batches → numpy logits."""
    import torch

    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0,))


def _as_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` → float32 ``(N, 3, H, W)`` / 255 (the registry's 'scale')."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


def _convnet_scores(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Softmax mitosis probability of each tile, ``(N,)``."""
    logits = _logits(model, _as_input(images))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e[:, 1] / e.sum(axis=1)).astype(np.float64)


def fcn_map(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Whole-image mitosis probability of a `MitosisFCN`.

    Parameters
    ----------
    model : torch.nn.Module
        The FCN (``size_multiple`` honoured).
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB, already stain-normalised, at `MODEL_MPP`.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 sigmoid map (reflect-padded to the size multiple and cropped back).
    """
    m = int(getattr(model, "size_multiple", 1))
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, -h % m), (0, -w % m), (0, 0)), mode="reflect")
    logits = _logits(model, _as_input(padded[None]))
    return (1 / (1 + np.exp(-logits[0, 0, :h, :w]))).astype(np.float32)


def detect_peaks(prob: np.ndarray, *, threshold: float, min_distance_px: float) -> np.ndarray:
    """Mitosis points of a map as the engine finds them: 3×3-smoothed local maxima.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(H, W)`` probability map.
    threshold : float
        Minimum probability of a peak.
    min_distance_px : float
        Minimum separation of peaks, px.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` float (row, column) px.
    """
    from scipy.ndimage import uniform_filter
    from skimage.feature import peak_local_max

    if float(prob.max(initial=0.0)) < threshold:
        return np.zeros((0, 2))
    smooth = uniform_filter(prob.astype(np.float32), size=3, mode="nearest")
    peaks = peak_local_max(
        smooth,
        min_distance=max(1, round(min_distance_px)),
        threshold_abs=threshold,
        exclude_border=False,
    )
    if len(peaks):
        peaks = peaks[prob[peaks[:, 0], peaks[:, 1]] >= threshold]
    return peaks.astype(float).reshape(-1, 2)


def _detection_counts(peaks: np.ndarray, crop: Crop, radius_px: float) -> tuple[int, int, int]:
    """(tp, fp, fn) of one crop: truth = known mitoses inside it; peaks that match a
    known mitosis just outside the crop are neither TP nor FP."""
    truth = crop.inside()
    tp, fp, fn = metrics.match_points(peaks, truth, radius_px)
    if fp and len(crop.points) > len(truth):
        outside = np.array([p for p in crop.points if not any((p == t).all() for t in truth)])
        unmatched = [
            p for p in peaks if not len(truth) or np.hypot(*(truth - p).T).min() > radius_px
        ]
        if unmatched and len(outside):
            near = sum(np.hypot(*(outside - p).T).min() <= radius_px for p in unmatched)
            fp -= min(fp, int(near))
    return tp, fp, fn


def _detection_scores(
    maps: Sequence[np.ndarray],
    crops: Sequence[Crop],
    negatives: Sequence[np.ndarray],
    *,
    threshold: float,
    mpp: float,
) -> dict[str, float]:
    """Peak detection P/R/F1 on crops at each matching radius, + FP density on negatives."""
    min_px = MIN_DISTANCE_UM / mpp
    peaks = [detect_peaks(m, threshold=threshold, min_distance_px=min_px) for m in maps]
    out: dict[str, float] = {}
    for radius in MATCH_RADII_UM:
        tp = fp = fn = 0
        for p, crop in zip(peaks, crops, strict=True):
            t, f, n = _detection_counts(p, crop, radius / mpp)
            tp, fp, fn = tp + t, fp + f, fn + n
        tag = f"{radius:g}um"
        scores = metrics.prf(tp, fp, fn)
        out.update({f"detection_{k}_{tag}": round(float(v), 4) for k, v in scores.items()})
        out[f"detection_tp_{tag}"], out[f"detection_fp_{tag}"] = float(tp), float(fp)
        out[f"detection_fn_{tag}"] = float(fn)
    dists = []
    for m, crop in zip(maps, crops, strict=True):
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        dists.append(float(np.hypot(r - crop.centre[0], c - crop.centre[1])) * mpp)
    out["map_max_to_centre_median_um"] = round(float(np.median(dists)), 2) if dists else math.nan
    out["map_max_within_4um_fraction"] = (
        round(float(np.mean(np.asarray(dists) <= 4.0)), 4) if dists else math.nan
    )
    if negatives:
        n_fp = sum(
            len(detect_peaks(m, threshold=threshold, min_distance_px=min_px)) for m in negatives
        )
        area_mm2 = sum(m.size for m in negatives) * (mpp * 1e-3) ** 2
        out["negative_images_false_points"] = float(n_fp)
        out["negative_images_false_points_per_mm2"] = round(n_fp / area_mm2, 2)
    return out


def _tile_scores(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    y_pred = (scores >= threshold).astype(int)
    t = y_true.astype(int)
    cm = metrics.confusion_matrix(t, y_pred, n_classes=2)
    return {
        "accuracy": round(metrics.accuracy(t, y_pred), 4),
        "precision": round(metrics.precision(t, y_pred), 4),
        "recall": round(metrics.recall(t, y_pred), 4),
        "f1": round(metrics.f1(t, y_pred), 4),
        "roc_auc": round(metrics.roc_auc(t, scores), 4) if 0 < t.sum() < len(t) else math.nan,
        "tiles": float(len(t)),
        "positives": float(t.sum()),
        "confusion": cm.tolist(),
    }


def _fcn_tile_scores(
    model: torch.nn.Module,
    crops: Sequence[Crop],
    stain: StainReference | None,
    a_px: float,
    miccai_maps: Sequence[np.ndarray],
    threshold: float,
    *,
    curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """FCN as a tile classifier: max of its crop map over each convnet tile window.

    ``curves``, when given, receives the tile (labels, scores) (`_evaluate_nets`).
    """
    maps = [fcn_map(model, _stain(c.image, stain)) for c in crops]
    labels, scores = [], []
    for crop, m in zip(crops, maps, strict=True):
        full = _crop_map(crop, a_px)
        h, w = m.shape
        cy = min(max(round(crop.centre[0]) - TILE // 2, 0), h - TILE)
        cx = min(max(round(crop.centre[1]) - TILE // 2, 0), w - TILE)
        for r, c in [(cy, cx), (0, 0), (0, w - TILE), (h - TILE, 0), (h - TILE, w - TILE)]:
            labels.append(full[r : r + TILE, c : c + TILE].max() >= TILE_THRESHOLD)
            scores.append(float(m[r : r + TILE, c : c + TILE].max()))
    result: dict[str, Any] = {"crops": _tile_scores(np.array(labels), np.array(scores), threshold)}
    if curves is not None:
        curves["fcn_tiles/crops"] = (np.array(labels), np.array(scores))
    if miccai_maps:
        neg = np.concatenate(
            [
                m[: m.shape[0] // TILE * TILE, : m.shape[1] // TILE * TILE]
                .reshape(m.shape[0] // TILE, TILE, m.shape[1] // TILE, TILE)
                .max(axis=(1, 3))
                .ravel()
                for m in miccai_maps
            ]
        )
        all_labels = np.concatenate([np.array(labels), np.zeros(len(neg), bool)])
        all_scores = np.concatenate([np.array(scores), neg])
        result["crops_and_miccai"] = _tile_scores(all_labels, all_scores, threshold)
        if curves is not None:
            curves["fcn_tiles/crops_and_miccai"] = (all_labels, all_scores)
    return result, maps


# ----------------------------------------------------------------------------- training loop
def _train_pass(
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    data: Window,
    order: np.ndarray,
    rng: np.random.Generator,
    *,
    dense: bool,
    size: int,
    batch_size: int,
    rotate: bool,
    noise: float,
    loss: str,
    hinge_a: float,
    pos_weight: float,
    od_jitter: float,
) -> Generator[float, None, None]:
    """One pass over ``data[order]`` in batches; yields each batch's loss."""
    import torch

    model.train()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) < 2:  # batch norm needs two samples
            continue
        x, y = _augment(
            data.images[idx],
            data.maps[idx],
            rng,
            size=size,
            rotate=rotate,
            noise=noise,
            od_jitter=od_jitter,
        )
        out = model(torch.from_numpy(x))
        if dense:
            target = torch.from_numpy(y)
            scores = out
        else:
            target = torch.from_numpy(data.labels[idx].astype(np.float32))
            scores = out[:, 1] - out[:, 0]
        value = _loss(scores, target, loss=loss, hinge_a=hinge_a, pos_weight=pos_weight)
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()
        yield float(value.item())


def _balanced_order(
    labels: np.ndarray, n: int, rng: np.random.Generator, positive_share: float
) -> np.ndarray:
    """``n`` indices: ``positive_share`` positives, the rest negatives (with replacement
    only when a class has fewer members than asked)."""
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    n_pos = round(n * positive_share) if len(pos) else 0
    n_neg = n - n_pos if len(neg) else 0
    parts = [
        rng.choice(pos, n_pos, replace=n_pos > len(pos)) if n_pos else np.zeros(0, int),
        rng.choice(neg, n_neg, replace=n_neg > len(neg)) if n_neg else np.zeros(0, int),
    ]
    order = np.concatenate(parts)
    return order[rng.permutation(len(order))]


def _mistakes(model: torch.nn.Module, data: Window, *, dense: bool, threshold: float) -> np.ndarray:
    """Which training samples the model gets wrong (eval mode, no augmentation), ``(N,)`` bool.

    Convnet: the tile's mitosis probability ``≥ threshold`` differs from its label. FCN:
    the window is wrong when its map stays below ``threshold`` everywhere its target is
    ≥ `TILE_THRESHOLD` (a missed mitosis) or reaches ``threshold`` anywhere its target is
    below 0.05 (a false mitosis away from every labelled one).
    """
    if not dense:
        return np.asarray((_convnet_scores(model, data.images) >= threshold) != data.labels)
    wrong = np.zeros(len(data.labels), bool)
    for i in range(0, len(data.labels), 64):
        logits = _logits(model, _as_input(data.images[i : i + 64]))[:, 0]
        prob = 1 / (1 + np.exp(-logits))
        target = data.maps[i : i + 64]
        hit = np.where(target >= TILE_THRESHOLD, prob, 0.0).reshape(len(prob), -1).max(axis=1)
        far = np.where(target < 0.05, prob, 0.0).reshape(len(prob), -1).max(axis=1)
        labels = data.labels[i : i + 64]
        wrong[i : i + 64] = (labels & (hit < threshold)) | (far >= threshold)
    return wrong


def _negative_feed(
    wrong: np.ndarray, rng: np.random.Generator, *, correct_share: float
) -> np.ndarray:
    """Indices of the misclassified samples (``wrong``) + a random sample of correctly
    classified ones (``correct_share`` × the misclassified count, at least 32), shuffled."""
    bad = np.flatnonzero(wrong)
    right = np.flatnonzero(~wrong)
    n_right = min(len(right), max(32, round(correct_share * len(bad))))
    chosen = np.concatenate([bad, rng.choice(right, n_right, replace=False)])
    return chosen[rng.permutation(len(chosen))]


def _fit(
    model: torch.nn.Module,
    data: Window,
    rng: np.random.Generator,
    *,
    name: str,
    dense: bool,
    size: int,
    epochs: int,
    samples_per_epoch: int,
    batch_size: int,
    learning_rate: float,
    negative_feed: bool,
    loss: str,
    hinge_a: float,
    pos_weight: float,
    noise: float,
    positive_share: float,
    correct_share: float,
    feed_threshold: float = 0.5,
    od_jitter: float = 0.0,
) -> Generator[Progress, None, list[dict[str, float]]]:
    """Balanced epochs, each followed by a negative-feed pass; Adam with cosine decay."""
    import torch

    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    feed_size = samples_per_epoch if negative_feed else 0
    total_batches = max(1, epochs * (samples_per_epoch + feed_size) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_batches) / total_batches))
    )
    history = []
    for epoch in range(1, epochs + 1):
        order = _balanced_order(data.labels, samples_per_epoch, rng, positive_share)
        losses = []
        for value in _train_pass(
            model,
            optimiser,
            data,
            order,
            rng,
            dense=dense,
            size=size,
            batch_size=batch_size,
            rotate=False,
            noise=noise / 2,
            loss=loss,
            hinge_a=hinge_a,
            pos_weight=pos_weight,
            od_jitter=od_jitter,
        ):
            scheduler.step()
            losses.append(value)
        entry = {"epoch": float(epoch), "loss": float(np.mean(losses)) if losses else math.nan}
        if negative_feed:
            mistakes = _mistakes(model, data, dense=dense, threshold=feed_threshold)
            feed = _negative_feed(mistakes, rng, correct_share=correct_share)
            wrong = int(np.count_nonzero(mistakes))
            entry["misclassified"] = float(wrong)
            entry["train_tile_accuracy"] = 1 - wrong / len(data.labels)
            entry["feed"] = float(len(feed))
            feed_losses = []
            for value in _train_pass(
                model,
                optimiser,
                data,
                feed[:feed_size],
                rng,
                dense=dense,
                size=size,
                batch_size=batch_size,
                rotate=True,
                noise=noise,
                loss=loss,
                hinge_a=hinge_a,
                pos_weight=pos_weight,
                od_jitter=od_jitter,
            ):
                scheduler.step()
                feed_losses.append(value)
            entry["feed_loss"] = float(np.mean(feed_losses)) if feed_losses else math.nan
        history.append(entry)
        yield {"model": 0.0 if name == "convnet" else 1.0, **entry}
    return history


def convnet_weights_path(out_path: Path) -> Path:
    """Where the convnet's weights go beside the FCN's ``out_path``.

    ``…/mitosis-fcn-v1.safetensors`` → ``…/mitosis-convnet-v1.safetensors``; a name
    without ``fcn`` gets ``.convnet`` before the suffix.
    """
    if "fcn" in out_path.name:
        return out_path.with_name(out_path.name.replace("fcn", "convnet", 1))
    return out_path.with_name(f"{out_path.stem}.convnet{out_path.suffix}")


def _choose_threshold(
    maps: Sequence[np.ndarray], crops: Sequence[Crop], negatives: Sequence[np.ndarray]
) -> float:
    """Peak threshold with the best 7.5 µm detection F1 on the training data."""
    best, best_f1 = 0.5, -1.0
    for t in np.round(np.arange(0.2, 0.91, 0.05), 2):
        s = _detection_scores(maps, crops, negatives, threshold=float(t), mpp=MODEL_MPP)
        # the training negatives' false points count as FP too (per image area)
        tp = s["detection_tp_7.5um"]
        fp = s["detection_fp_7.5um"] + s.get("negative_images_false_points", 0.0)
        fn = s["detection_fn_7.5um"]
        f1 = metrics.prf(tp, fp, fn)["f1"]
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def _evaluate_nets(
    convnet: torch.nn.Module | None,
    fcn: torch.nn.Module | None,
    test: Sequence[Crop],
    miccai_test: Sequence[np.ndarray],
    stain: StainReference | None,
    *,
    a_px: float,
    peak_threshold: float,
    curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Tile and detection metrics of the nets on held-out crops (+ MICCAI negatives).

    ``curves``, when given, receives the tile (labels, scores) behind each tile metric
    (keys ``"convnet_tiles/crops"``, ``"fcn_tiles/crops_and_miccai"`` …) for the plots.
    """
    out: dict[str, Any] = {}
    if convnet is not None:
        tiles = _tile_windows(test, stain, a_px=a_px, threshold=TILE_THRESHOLD, jitter=(0,))
        scores = _convnet_scores(convnet, tiles.images)
        result: dict[str, Any] = {"crops": _tile_scores(tiles.labels, scores, 0.5)}
        if curves is not None:
            curves["convnet_tiles/crops"] = (tiles.labels, scores)
        if miccai_test:
            neg = Window.concat([_grid_windows(im, TILE, stain) for im in miccai_test])
            neg_scores = _convnet_scores(convnet, neg.images)
            result["crops_and_miccai"] = _tile_scores(
                np.concatenate([tiles.labels, neg.labels]),
                np.concatenate([scores, neg_scores]),
                0.5,
            )
            if curves is not None:
                curves["convnet_tiles/crops_and_miccai"] = (
                    np.concatenate([tiles.labels, neg.labels]),
                    np.concatenate([scores, neg_scores]),
                )
        out["convnet_tiles"] = result
    if fcn is not None:
        miccai_maps = [fcn_map(fcn, _stain(im, stain)) for im in miccai_test]
        tile_result, maps = _fcn_tile_scores(
            fcn, test, stain, a_px, miccai_maps, peak_threshold, curves=curves
        )
        out["fcn_tiles"] = tile_result
        out["fcn_detection"] = _detection_scores(
            maps, test, miccai_maps, threshold=peak_threshold, mpp=MODEL_MPP
        )
    return out


def _split_record(train: Sequence[Crop], test: Sequence[Crop], miccai: bool) -> dict[str, Any]:
    return {
        "method": "by source image (slide-disjoint), per dataset, ~20 % of crops held out, seed 0",
        "train_images": sorted({c.case_id for c in train}),
        "test_images": sorted({c.case_id for c in test}),
        "train_crops": len(train),
        "test_crops": len(test),
        "negatives": (
            f"MICCAI 2015 nucleus tiles, train {', '.join(MICCAI_TRAIN)}, test "
            f"{', '.join(MICCAI_TEST)} (assumed mitosis-free)"
            if miccai
            else "none beyond the crops' corners"
        ),
    }


def train_mitosis(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    epochs: int = 8,
    convnet_epochs: int | None = None,
    samples_per_epoch: int = 768,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    loss: str = "bce",
    hinge_a: float = 2.0,
    decay_per_um: float = DECAY_PER_UM,
    negative_feed: bool = True,
    stain_normalise: bool = True,
    pos_weight: float = 5.0,
    noise: float = 0.03,
    od_jitter: float = 0.3,
    fcn_filters: Sequence[int] = (16, 32, 64),
    convnet_filters: Sequence[int] = (16, 32),
    command: str | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Train the mitosis convnet and FCN; a generator yielding one record per epoch.

    Parameters
    ----------
    data_dir : str or Path
        The ``ami_br_mitosis`` folder (`load_ami_crops`); MICCAI negatives are read from
        ``data_dir.parent / "miccai_nuclei_seg"`` when present.
    out_path : str or Path
        FCN weights file (``.safetensors``); the convnet's goes to
        `convnet_weights_path` ``(out_path)``; each gets a ``.json`` record.
    seed : int
        Seeds numpy (sampling, augmentation, feed) and torch (initialisation).
    epochs, convnet_epochs : int
        Epochs of the FCN and of the convnet (default: ``epochs``); each epoch is a
        balanced pass of ``samples_per_epoch`` samples, then (with ``negative_feed``)
        a negative-feed pass of at most as many.
    batch_size : int
        Samples per Adam step.
    learning_rate : float
        Peak Adam learning rate (cosine decay to 0).
    loss : {"bce", "rare_hinge"}
        Binary cross-entropy (dense: weighted ``1 + pos_weight·t``) or `rare_hinge_loss`.
    hinge_a : float
        ``a`` of the rare-hinge loss (2 or 4 in the paper).
    decay_per_um : float, per µm
        ``a`` of the target maps (`probability_map`), converted to px at `MODEL_MPP`.
    negative_feed : bool
        Run the negative-feed pass after each epoch.
    stain_normalise : bool
        Macenko-normalise every tile to `reference_stains` (the registry does too).
    pos_weight : float
        Extra BCE weight of mitosis pixels in the dense loss.
    noise : float
        Gaussian noise σ (0..1 intensities) of the negative feed (half in balanced passes).
    od_jitter : float
        Stain-intensity augmentation: optical density scaled by ``exp(U(-j, j))``.
    fcn_filters, convnet_filters : sequence of int
        Widths of the networks' levels.
    command : str, optional
        Command line recorded in the JSON.

    Yields
    ------
    dict
        ``{"model": 0 (convnet) | 1 (FCN), "epoch", "loss", "misclassified", "feed", ...}``.

    Returns
    -------
    dict
        ``{"convnet": record, "fcn": record}``, the JSON records written beside the weights.
    """
    import torch

    from ..models.architectures.mitosis import BasicConvNet, MitosisFCN

    if loss not in ("bce", "rare_hinge"):
        raise HistoAIError(f"loss must be 'bce' or 'rare_hinge', got {loss!r}")
    for label, value in (
        ("epochs", epochs),
        ("samples_per_epoch", samples_per_epoch),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise HistoAIError(f"{label} must be ≥ 1, got {value}")
    data_dir, out_path = Path(data_dir), Path(out_path)
    started = time.perf_counter()
    a_px = decay_per_um * MODEL_MPP
    crops = load_ami_crops(data_dir)
    train, test = split_by_image(crops)
    if not train or not test:
        raise HistoAIError(f"{data_dir}: too few source images for a train / test split")
    miccai_train = _miccai_images(data_dir, MICCAI_TRAIN)
    miccai_test = _miccai_images(data_dir, MICCAI_TEST)
    stain = reference_stains(train, seed=seed) if stain_normalise else None
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    # ---- convnet
    tiles = _tile_windows(train, stain, a_px=a_px, threshold=TILE_THRESHOLD)
    n_neg_extra = int(np.count_nonzero(~tiles.labels)) if miccai_train else 0
    tiles = Window.concat([tiles, _negative_windows(miccai_train, TILE, n_neg_extra, stain, seed)])
    c_kwargs = {
        "in_channels": 3,
        "filters": list(convnet_filters),
        "dense": 64,
        "dropout": 0.5,
        "n_classes": 2,
    }
    convnet = BasicConvNet(**c_kwargs)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    c_history = yield from _fit(
        convnet,
        tiles,
        rng,
        name="convnet",
        dense=False,
        size=TILE,
        epochs=convnet_epochs or epochs,
        samples_per_epoch=samples_per_epoch * 2,
        batch_size=batch_size * 2,
        learning_rate=learning_rate,
        negative_feed=negative_feed,
        loss=loss,
        hinge_a=hinge_a,
        pos_weight=0.0,
        noise=noise,
        positive_share=1 / 3,
        correct_share=1.0,
        od_jitter=od_jitter,
    )
    c_time = time.perf_counter() - t0

    # ---- FCN
    positives = _fcn_crops(train, stain, a_px)
    side = positives.images.shape[1]
    negatives = _negative_windows(miccai_train, side, 2 * len(train), stain, seed + 1)
    windows = Window.concat([positives, negatives])
    f_kwargs = {
        "in_channels": 3,
        "filters": list(fcn_filters),
        "dense": 64,
        "dropout": 0.1,
        "out_channels": 1,
    }
    fcn = MitosisFCN(**f_kwargs)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    f_history = yield from _fit(
        fcn,
        windows,
        rng,
        name="fcn",
        dense=True,
        size=WINDOW,
        epochs=epochs,
        samples_per_epoch=samples_per_epoch,
        batch_size=batch_size,
        learning_rate=learning_rate,
        negative_feed=negative_feed,
        loss=loss,
        hinge_a=hinge_a,
        pos_weight=pos_weight,
        noise=noise,
        positive_share=1 / 3,
        correct_share=1.0,
        feed_threshold=DENSE_FEED_THRESHOLD,
        od_jitter=od_jitter,
    )
    f_time = time.perf_counter() - t0

    # ---- threshold on training data, then held-out evaluation
    train_maps = [fcn_map(fcn, _stain(c.image, stain)) for c in train]
    train_neg_maps = [fcn_map(fcn, _stain(im, stain)) for im in miccai_train]
    peak_threshold = _choose_threshold(train_maps, train, train_neg_maps)
    scores = _evaluate_nets(
        convnet, fcn, test, miccai_test, stain, a_px=a_px, peak_threshold=peak_threshold
    )
    total_time = time.perf_counter() - started

    files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    digest = {
        "AMI-BR.csv": sha256(data_dir / "AMI-BR.csv")[:16],
        "crops_sha256_of_names_and_sizes": _sha_list(files),
    }
    common: dict[str, Any] = {
        "mpp": MODEL_MPP,
        "normalisation": "Macenko to the stain reference, then RGB / 255"
        if stain is not None
        else "RGB / 255",
        "stain_reference": None
        if stain is None
        else {
            "stain_matrix": [list(v) for v in stain.stain_matrix],
            "max_concentrations": list(stain.max_concentrations),
        },
        "targets": f"exp(-a·d), a = {decay_per_um} per µm ({a_px:g} per px); tile positive "
        f"when its map ≥ {TILE_THRESHOLD}",
        "split": _split_record(train, test, bool(miccai_test)),
        "seed": seed,
        "loss": loss if loss == "bce" else f"rare_hinge (a = {hinge_a})",
        "negative_feed": negative_feed,
        "sampling": "balanced, 1/3 positive, 2/3 negative per epoch",
        "augmentation": f"dihedral, Gaussian noise σ {noise} (feed) / {noise / 2} (balanced), "
        f"optical density × exp(U(±{od_jitter})), free rotations in the feed",
        "optimiser": f"Adam, lr {learning_rate}, cosine decay",
        "samples_per_epoch": samples_per_epoch,
        "batch_size": batch_size,
        "command": command or _default_command(data_dir, out_path, seed, epochs),
        "data": {"folder": str(data_dir), "crops": len(crops), "sha256": digest},
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "train_time_s_both_models": round(total_time, 1),
    }
    c_path = convnet_weights_path(out_path)
    c_record = {
        "architecture": "mitosis_convnet",
        "kwargs": c_kwargs,
        "weights": c_path.name,
        "tile_px": TILE,
        "output": "2 logits (no mitosis, mitosis); apply a softmax",
        "metrics": {"tiles": scores["convnet_tiles"], "threshold": 0.5},
        "history": c_history,
        "epochs": convnet_epochs or epochs,
        "fit_time_s": round(c_time, 1),
        "parameters": sum(p.numel() for p in convnet.parameters()),
        **common,
    }
    f_record = {
        "architecture": "mitosis_fcn",
        "kwargs": f_kwargs,
        "weights": out_path.name,
        "window_px": WINDOW,
        "output": "1 logit map (mitosis); apply a sigmoid",
        "metrics": {
            "detection": scores["fcn_detection"],
            "tiles": scores["fcn_tiles"],
            "peak_threshold": peak_threshold,
            "min_distance_um": MIN_DISTANCE_UM,
            "matching": "one-to-one (optimal) within 7.5 µm / 4 µm of known mitoses inside "
            "each held-out crop; peaks matching a known mitosis just outside the "
            "crop are ignored; MICCAI test images: every peak is a false point",
        },
        "history": f_history,
        "epochs": epochs,
        "fit_time_s": round(f_time, 1),
        "parameters": sum(p.numel() for p in fcn.parameters()),
        **common,
    }
    for model, path, record in ((convnet, c_path, c_record), (fcn, out_path, f_record)):
        meta = {
            "architecture": record["architecture"],
            "kwargs": json.dumps(record["kwargs"]),
            "mpp": str(MODEL_MPP),
            "seed": str(seed),
        }
        save_weights_and_record(model, path, meta, record)
    return {"convnet": c_record, "fcn": f_record}


def _sha_list(files: Sequence[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _default_command(data_dir: Path, out_path: Path, seed: int, epochs: int) -> str:
    args = ["--data", str(data_dir), "--out", str(out_path), "--seed", str(seed)]
    return "napari-histo-ai train-default mitosis " + shlex.join([*args, "--epochs", str(epochs)])


def train_mitosis_sync(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `train_mitosis` to the end; ``progress`` gets every record. Returns the records."""
    return run_to_end(train_mitosis(data_dir, out_path, **options), progress)


# ----------------------------------------------------------------------------- evaluate
def evaluate(data_dir: Path, *, model: str, weights: Path | None = None) -> dict[str, Any]:
    """Held-out metrics of ``mitosis-convnet`` or ``mitosis-fcn`` (registry entry).

    Parameters
    ----------
    data_dir : Path
        The ``ami_br_mitosis`` folder (MICCAI negatives from its sibling
        ``miccai_nuclei_seg`` when present).
    model : str
        A registered model of this task (its kwargs, stain reference and peak threshold
        are read from the registry).
    weights : Path, optional
        Weights file to score instead of the registered one.

    Returns
    -------
    dict
        ``model``, ``split`` and the metrics (tiles for the convnet; tiles and detection
        for the FCN), JSON-able.

    Raises
    ------
    HistoAIError
        Unknown model, missing data.
    """
    from ..models.loading import load_model
    from ..models.registry import load_registry

    spec = load_registry().get(model)
    if spec.architecture not in ("mitosis_convnet", "mitosis_fcn"):
        raise HistoAIError(
            f"model {model!r} (architecture {spec.architecture}) is not a mitosis model; "
            "expected mitosis-convnet or mitosis-fcn"
        )
    if weights is not None:
        spec = replace(spec, weights=Path(weights))
    net = load_model(spec, device="cpu").module  # type: ignore[attr-defined]
    stain = spec.io.normalisation.stain
    data_dir = Path(data_dir)
    crops = load_ami_crops(data_dir, mpp=spec.io.mpp or MODEL_MPP)
    train, test = split_by_image(crops)
    miccai_test = _miccai_images(data_dir, MICCAI_TEST)
    dense = spec.architecture == "mitosis_fcn"
    points = [o for o in spec.outputs if o.kind == "points"]
    threshold = points[0].threshold if points else 0.5
    tile_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scores = _evaluate_nets(
        None if dense else net,
        net if dense else None,
        test,
        miccai_test,
        stain,
        a_px=DECAY_PER_UM * MODEL_MPP,
        peak_threshold=threshold,
        curves=tile_curves,
    )
    return {
        "model": model,
        "weights": str(spec.weights),
        "split": _split_record(train, test, bool(miccai_test)),
        "metrics": scores,
        "peak_threshold": threshold if dense else None,
        **_plot_entries(scores, tile_curves),
    }


def _plot_entries(
    scores: dict[str, Any], tile_curves: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """``curves`` / ``confusion`` of `evaluate` for `napari_histo_ai.plots.evaluation_plots`.

    The tile curves are the (tile truth, tile score) pairs behind each tile metric; the
    confusions are the tile metrics' own ``confusion`` (at the metrics' threshold).
    Detection has no curve: its points are peaks above one threshold.
    """
    from ..plots import confusion_entry, curve_entry

    confusion = {
        f"{net}/{subset}": confusion_entry(tile["confusion"], ("no mitosis", "mitosis"))
        for net, subsets in scores.items()
        if net.endswith("_tiles")
        for subset, tile in subsets.items()
    }
    curves = {name: curve_entry(t, s) for name, (t, s) in tile_curves.items()}
    return {"curves": curves, "confusion": confusion}


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train both models, print their held-out metrics; 2 on a data error."""
    parser = argparse.ArgumentParser(
        prog="napari-histo-ai train-default mitosis",
        description="Train the mitosis convnet (tiles) and FCN (map + points) on AMi-Br crops.",
    )
    parser.add_argument("--data", type=Path, required=True, help="ami_br_mitosis folder")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="FCN weights (.safetensors); the convnet's go beside it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--convnet-epochs", type=int, default=None)
    parser.add_argument("--samples-per-epoch", type=int, default=768)
    parser.add_argument(
        "--pos-weight", type=float, default=5.0, help="extra BCE weight of mitosis pixels (FCN)"
    )
    parser.add_argument("--loss", choices=("bce", "rare_hinge"), default="bce")
    parser.add_argument("--hinge-a", type=float, default=2.0)
    parser.add_argument(
        "--decay-per-um",
        type=float,
        default=DECAY_PER_UM,
        help="a of the exp(-a·d) targets, per µm",
    )
    parser.add_argument("--no-negative-feed", action="store_true")
    parser.add_argument("--no-stain", action="store_true", help="skip Macenko normalisation")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the shipped weights' setting)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        print(f"error: --threads must be ≥ 1, got {args.threads}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    given = list(sys.argv[1:] if argv is None else argv)
    command = "napari-histo-ai train-default mitosis " + shlex.join(given)

    def report(record: Progress) -> None:
        if not args.quiet:
            name = "convnet" if record["model"] == 0 else "fcn"
            extra = "".join(
                f"  {k} {record[k]:.4g}"
                for k in ("misclassified", "feed", "feed_loss")
                if k in record
            )
            print(
                f"{name} epoch {record['epoch']:.0f}  loss {record['loss']:.4f}{extra}",
                file=sys.stderr,
                flush=True,
            )

    try:
        result = train_mitosis_sync(
            args.data,
            args.out,
            progress=report,
            seed=args.seed,
            epochs=args.epochs,
            convnet_epochs=args.convnet_epochs,
            samples_per_epoch=args.samples_per_epoch,
            loss=args.loss,
            hinge_a=args.hinge_a,
            decay_per_um=args.decay_per_um,
            negative_feed=not args.no_negative_feed,
            stain_normalise=not args.no_stain,
            pos_weight=args.pos_weight,
            command=command,
        )
    except HistoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        name: {"metrics": rec["metrics"], "train_time_s": rec["train_time_s_both_models"]}
        for name, rec in result.items()
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
