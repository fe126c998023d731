"""Train and evaluate the default mammogram mass detector on mini-MIAS (paper 002).

Paper 002 (section 4.2) detects masses in whole mammograms with Mask R-CNN on DDSM:
CLAHE preprocessing, left/right flips, boxes + masks + benign/malignant class, and an
evaluation (section 4.2.5) by overlap ratio OR = |A∩B| / |A|, mean sensitivity, false
positives per image (FPPI) and a "mAP" that is a mean precision (its eq. 8). This
module reproduces that pipeline at CPU scale with the CenterNet-style `MassDetector`.

Data (`load_mias`): the mini-MIAS folder (``mdbNNN.pgm`` / ``mdbNNN.png``, 1024 × 1024
8-bit, 200 µm pixels) and its ``Info.txt`` (`read_info`): one row per abnormality,
``ref tissue class [severity x y radius]``, origin **bottom-left** (row = 1024 − y).
Every abnormality with a centre (masses, asymmetries, distortions and calcification
clusters alike: the circle encloses it) becomes a target: box = the circle's bounding
square, mask = the disc, class = severity (B → benign, M → malignant). Films whose
abnormality has no centre (``mdb059``, ``mdb216``, ``mdb233``, ``mdb245`` here) are
left out: they can neither be trained on nor scored.

Input, exactly as the engine builds it for the registry entry (``io.mpp`` unset: the
film's own pixels; ``patch_size`` 1280, ``halo`` 128): the 1024² film padded with 0 by
128 px on every side, CLAHE over the whole 1280² patch (clip limit 2, 8 × 8 tiles, the
paper's values), divided by 255. The network average-pools it 4× (800 µm) and answers
at stride 8 (1.6 mm per output pixel); training caches the pooled films.

Split: by woman (the film pair ``mdb2k-1 + mdb2k``, ``case_id`` of ``index.csv``), a
seeded permutation, 20 % of the women held out. Evaluation (`evaluate_films`) decodes
detections as the engine does (quantised maps, 3 × 3 smoothing, local maxima at least
32 px apart, score = max class probability) and sweeps the confidence threshold.
"""

from __future__ import annotations

import argparse
import csv
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

from .. import metrics
from ..errors import HistoAIError, ImageReadError
from ..io.mias import (  # the Info.txt parser; names kept importable from here
    ABNORMALITIES,  # noqa: F401
    FILM,
    PIXEL_UM,
    SEVERITY,
    TISSUES,  # noqa: F401
    InfoRow,
    _info_error,  # noqa: F401
    read_info,
)
from .common import print_progress, run_to_end, save_weights_and_record, sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLASSES",
    "Film",
    "InfoRow",
    "Lesion",
    "decode_detections",
    "evaluate",
    "evaluate_films",
    "film_input",
    "load_mias",
    "main",
    "read_info",
    "split_by_woman",
    "targets",
    "train_mammogram",
    "train_mammogram_sync",
]

#: engine patch (the whole film plus the halo) and halo, film px
PATCH = 1280
HALO = 128
#: the network's stem pool and output stride, film px
DOWNSAMPLE = 4
STRIDE = 2 * DOWNSAMPLE
#: minimum distance between two detections, film px (the entry's ``min_distance_um``,
#: which the engine reads as pixels for images without a pixel size)
MIN_DISTANCE_PX = 32
#: CLAHE of paper 002 (OpenCV clipLimit 2.0, tileGridSize 8 × 8)
CLIP_LIMIT = 2.0
CLAHE_TILES = 8
#: detection classes, heatmap channels 0 and 1
CLASSES = ("benign", "malignant")
#: a prediction hits a true box when OR = |A∩B| / |A| ≥ this (paper 002, ORT 0.5)
OR_THRESHOLD = 0.5
IOU_THRESHOLD = 0.5
#: weight of the L1 log-size loss against the focal and mask losses
SIZE_WEIGHT = 2.0
SWEEP = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
VAL_FRACTION = 0.2

Progress = dict[str, float]


# --------------------------------------------------------------------------- Info.txt


# InfoRow, read_info and _info_error live in napari_histo_ai.io.mias (imported above).


# --------------------------------------------------------------------------- films


@dataclass(frozen=True)
class Lesion:
    """One located abnormality, film pixels with the origin top-left.

    ``row``, ``col``: centre (continuous; ``row = 1024 − y``, ``col = x``);
    ``radius``: px; ``label``: index into `CLASSES`; ``abnormality``: MIAS class.
    """

    row: float
    col: float
    radius: float
    label: int
    abnormality: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the circle's bounding square, film px."""
        r = self.radius
        return (self.row - r, self.col - r, self.row + r, self.col + r)


@dataclass(frozen=True)
class Film:
    """One mammogram and its truth.

    Parameters
    ----------
    ref : str
        ``"mdb001"``.
    case_id : str
        The woman: ``"mdb001+mdb002"``.
    path : Path
    image : numpy.ndarray
        ``(1024, 1024)`` uint8.
    lesions : tuple of Lesion
        Empty for a normal film.
    tissue : str
    abnormal : bool
        Whether ``Info.txt`` lists an abnormality (located or not).
    """

    ref: str
    case_id: str
    path: Path
    image: np.ndarray
    lesions: tuple[Lesion, ...]
    tissue: str
    abnormal: bool

    @property
    def located(self) -> bool:
        """Normal, or every abnormality has a centre (so the film can be scored)."""
        return not self.abnormal or bool(self.lesions)


def _pair(ref: str) -> str:
    number = int(ref[3:])
    first = number if number % 2 else number - 1
    return f"mdb{first:03d}+mdb{first + 1:03d}"


def _case_ids(data_dir: Path) -> dict[str, str]:
    """``ref -> case_id`` from ``../index.csv`` when present (else the pair rule)."""
    index = data_dir.parent / "index.csv"
    found: dict[str, str] = {}
    if not index.is_file():
        return found
    with open(index, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("dataset") == "mini_mias" and row.get("case_id"):
                found[Path(row.get("path", "")).stem] = row["case_id"]
    return found


def _read_film(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode != "L":
                raise ImageReadError(
                    path, f"mode {img.mode}, expected an 8-bit greyscale (L) mammogram"
                )
            image = np.asarray(img, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageReadError(path, f"cannot be read ({exc})", "re-copy the film") from exc
    if image.shape != (FILM, FILM):
        raise ImageReadError(
            path, f"is {image.shape[1]} × {image.shape[0]} px, expected a {FILM}² mini-MIAS film"
        )
    return image


def load_mias(data_dir: str | Path, *, refs: Sequence[str] | None = None) -> list[Film]:
    """Read the mini-MIAS films of a folder with their truth from its ``Info.txt``.

    Parameters
    ----------
    data_dir : str or Path
        Folder with ``Info.txt`` and ``mdbNNN.pgm`` / ``mdbNNN.png`` films.
    refs : sequence of str, optional
        Only these films.

    Returns
    -------
    list of Film
        Sorted by reference; films without an ``Info.txt`` row are an error.

    Raises
    ------
    HistoAIError
        No ``Info.txt`` or films, a malformed ``Info.txt`` line, a film missing from it.
    ImageReadError
        A film that is not a 1024² 8-bit greyscale image.
    """
    data_dir = Path(data_dir)
    info_path = data_dir / "Info.txt"
    if not info_path.is_file():
        raise HistoAIError(
            f"{data_dir}: no Info.txt (expected the mini-MIAS folder with Info.txt and "
            "mdbNNN.pgm / .png films)"
        )
    rows = read_info(info_path)
    by_ref: dict[str, list[InfoRow]] = {}
    for row in rows:
        by_ref.setdefault(row.ref, []).append(row)
    paths: dict[str, Path] = {}
    for p in sorted(data_dir.iterdir()):
        if p.suffix.lower() in (".pgm", ".png") and p.stem.startswith("mdb"):
            paths.setdefault(p.stem, p)
    if refs is not None:
        missing = [r for r in refs if r not in paths]
        if missing:
            raise HistoAIError(f"{data_dir}: no film file for {', '.join(missing)}")
        paths = {r: paths[r] for r in refs}
    if not paths:
        raise HistoAIError(f"{data_dir}: no mdbNNN.pgm / .png films")
    cases = _case_ids(data_dir)
    films = []
    for ref, path in sorted(paths.items()):
        if ref not in by_ref:
            raise HistoAIError(f"{path}: film {ref} has no row in {info_path}; add its truth")
        lesions = tuple(
            Lesion(
                row=float(FILM - r.y),
                col=float(r.x),
                radius=float(r.radius),
                label=SEVERITY[r.severity],
                abnormality=r.abnormality,
            )
            for r in by_ref[ref]
            if r.x is not None and r.y is not None and r.radius is not None and r.severity
        )
        films.append(
            Film(
                ref=ref,
                case_id=cases.get(ref, _pair(ref)),
                path=path,
                image=_read_film(path),
                lesions=lesions,
                tissue=by_ref[ref][0].tissue,
                abnormal=any(r.abnormality != "NORM" for r in by_ref[ref]),
            )
        )
    return films


def split_by_woman(
    films: Sequence[Film], *, seed: int = 0, val_fraction: float = VAL_FRACTION
) -> tuple[list[Film], list[Film]]:
    """Seeded split by woman (``case_id``): both films of a woman land on one side.

    Films that cannot be scored (an abnormality without a centre) are dropped.

    Returns
    -------
    (train, validation) : lists of Film
    """
    usable = [f for f in films if f.located]
    women = sorted({f.case_id for f in usable})
    if len(women) < 2:
        raise HistoAIError(f"need films of at least 2 women to split, got {len(women)}")
    order = np.random.default_rng(seed).permutation(len(women))
    n_val = min(len(women) - 1, max(1, round(val_fraction * len(women))))
    held = {women[i] for i in order[:n_val]}
    return [f for f in usable if f.case_id not in held], [f for f in usable if f.case_id in held]


# --------------------------------------------------------------------------- input / targets


def film_input(image: np.ndarray) -> np.ndarray:
    """The model input the engine builds from a film: padded, CLAHE, / 255.

    Parameters
    ----------
    image : numpy.ndarray
        ``(1024, 1024)`` uint8 film.

    Returns
    -------
    numpy.ndarray
        ``(1280, 1280)`` float32 in [0, 1]: the film at offset (128, 128) in a 0-filled
        patch (the engine's single tile with its halo), CLAHE (clip 2, 8 × 8 tiles) over
        the whole patch, divided by 255.
    """
    from ..models.preprocessing import clahe

    patch = np.zeros((PATCH, PATCH), dtype=np.uint8)
    patch[HALO : HALO + FILM, HALO : HALO + FILM] = image
    out = clahe(patch, clip_limit=CLIP_LIMIT, tiles=CLAHE_TILES)
    return out.astype(np.float32) / np.float32(255.0)


def targets(lesions: Sequence[Lesion], *, size: int = PATCH // STRIDE) -> dict[str, np.ndarray]:
    """Training targets of one film on the ``size²`` output grid (stride 8, padded patch).

    Parameters
    ----------
    lesions : sequence of Lesion
        Film coordinates (the patch offset of 128 px is added here).
    size : int
        Output side (160 for the 1280² patch).

    Returns
    -------
    dict of numpy.ndarray (float32)
        ``heat`` (2, size, size): per-class Gaussian centre heatmaps (σ = radius / 3 in
        output px, at least 0.75), exactly 1 at the pixel holding each centre;
        ``mask`` (size, size): 1 inside the discs (pixel centres within the radius; at
        least the centre pixel); ``log_size`` (2, size, size): log of the box height and
        width, output px, at every pixel; ``size_weight`` (size, size): where the size is
        supervised (the heatmap value where ≥ 0.5, nearest lesion).
    """
    heat = np.zeros((len(CLASSES), size, size), dtype=np.float32)
    mask = np.zeros((size, size), dtype=np.float32)
    log_size = np.zeros((2, size, size), dtype=np.float32)
    weight = np.zeros((size, size), dtype=np.float32)
    centres = (np.arange(size, dtype=np.float32) + 0.5) * STRIDE  # patch px
    for lesion in lesions:
        cy, cx = lesion.row + HALO, lesion.col + HALO
        r = lesion.radius
        sigma = max(0.75, r / STRIDE / 3.0)
        gy = np.exp(-(((centres - cy) / STRIDE) ** 2) / (2 * sigma**2))
        gx = np.exp(-(((centres - cx) / STRIDE) ** 2) / (2 * sigma**2))
        g = np.outer(gy, gx).astype(np.float32)
        iy = int(np.clip(cy // STRIDE, 0, size - 1))
        ix = int(np.clip(cx // STRIDE, 0, size - 1))
        g[iy, ix] = 1.0
        np.maximum(heat[lesion.label], g, out=heat[lesion.label])
        inside = ((centres[:, None] - cy) ** 2 + (centres[None, :] - cx) ** 2) <= r * r
        inside[iy, ix] = True
        mask[inside] = 1.0
        supervise = (g >= 0.5) & (g > weight)
        weight[supervise] = g[supervise]
        log_size[:, supervise] = math.log(2 * r / STRIDE)
    return {"heat": heat, "mask": mask, "log_size": log_size, "size_weight": weight}


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Detections:
    """Detections of one film: ``boxes`` (N, 4) (top, left, bottom, right) film px,
    ``scores`` (N,), ``labels`` (N,) into `CLASSES`; ``mask`` (128, 128) bool lesion
    mask at the output stride (8 px)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def decode_detections(
    output: np.ndarray, *, threshold: float, mask_threshold: float = 0.5
) -> Detections:
    """Boxes from one film's network output, the way the engine finds them.

    Parameters
    ----------
    output : numpy.ndarray
        ``(5, 160, 160)`` for the padded 1280² patch: class and mask **probabilities**
        (after the sigmoid), then box height and width in output px.
    threshold : float
        Minimum centre probability.
    mask_threshold : float
        Mask probability threshold.

    Returns
    -------
    Detections
        As the engine's ``boxes`` output: probabilities quantised to 8 bits, the
        kept area (the halo cut), peaks of the 3 × 3-smoothed maximum class map at least
        `MIN_DISTANCE_PX` apart, score = the maximum class probability at the peak,
        label = its argmax, box = the predicted size around the output pixel's centre.
    """
    from scipy.ndimage import uniform_filter
    from skimage.feature import peak_local_max

    k = len(CLASSES)
    h = HALO // STRIDE
    n = FILM // STRIDE
    kept = output[:, h : h + n, h : h + n]
    prob = np.clip(np.rint(kept[: k + 1] * 255.0), 0, 255).astype(np.uint8)
    prob_f = prob.astype(np.float32) / 255.0
    best = prob_f[:k].max(axis=0)
    label = prob_f[:k].argmax(axis=0)
    mask = prob_f[k] >= mask_threshold
    empty = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), mask)
    if float(best.max(initial=0.0)) < threshold:
        return empty
    smooth = uniform_filter(best, size=3, mode="nearest")
    peaks = peak_local_max(
        smooth,
        min_distance=max(1, round(MIN_DISTANCE_PX / STRIDE)),
        threshold_abs=threshold,
        exclude_border=False,
    )
    if len(peaks) == 0:
        return empty
    scores = best[peaks[:, 0], peaks[:, 1]]
    peaks = peaks[scores >= threshold]
    scores = scores[scores >= threshold].astype(np.float64)
    rows = (peaks[:, 0] + 0.5) * STRIDE
    cols = (peaks[:, 1] + 0.5) * STRIDE
    hh = kept[k + 1, peaks[:, 0], peaks[:, 1]].astype(np.float64) * STRIDE
    ww = kept[k + 2, peaks[:, 0], peaks[:, 1]].astype(np.float64) * STRIDE
    boxes = np.column_stack([rows - hh / 2, cols - ww / 2, rows + hh / 2, cols + ww / 2])
    return Detections(boxes, scores, label[peaks[:, 0], peaks[:, 1]].astype(np.int64), mask)


def _true_mask(film: Film) -> np.ndarray:
    """(128, 128) bool: output pixels (stride 8) whose centre lies in a lesion disc."""
    n = FILM // STRIDE
    c = (np.arange(n) + 0.5) * STRIDE
    out = np.zeros((n, n), dtype=bool)
    for lesion in film.lesions:
        out |= ((c[:, None] - lesion.row) ** 2 + (c[None, :] - lesion.col) ** 2) <= lesion.radius**2
    return out


# --------------------------------------------------------------------------- evaluation


def _truth(film: Film) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.array([lesion.box for lesion in film.lesions], dtype=np.float64).reshape(-1, 4)
    labels = np.array([lesion.label for lesion in film.lesions], dtype=np.int64)
    return boxes, labels


def _score_threshold(
    films: Sequence[Film], outputs: Sequence[np.ndarray], threshold: float, criterion: str
) -> dict[str, float]:
    """Paper 002's numbers at one confidence threshold.

    The detections are decoded at ``threshold`` itself, as the engine does (its peak
    search thresholds the smoothed map, so filtering a lower threshold's detections by
    score would keep peaks the engine drops)."""
    cut = OR_THRESHOLD if criterion == "overlap_ratio" else IOU_THRESHOLD
    tp_img, n_img, fp_total = [], [], 0
    tp_c = np.zeros(len(CLASSES))
    fp_c = np.zeros(len(CLASSES))
    for film, output in zip(films, outputs, strict=True):
        d = decode_detections(output, threshold=threshold)
        boxes, labels = _truth(film)
        hit = metrics.match_boxes(d.boxes, d.scores, boxes, threshold=cut, criterion=criterion)
        tp_img.append(int(hit.sum()))
        n_img.append(len(boxes))
        fp_total += int((~hit).sum())
        for c in range(len(CLASSES)):
            mine = d.labels == c
            hit_c = metrics.match_boxes(
                d.boxes[mine],
                d.scores[mine],
                boxes[labels == c],
                threshold=cut,
                criterion=criterion,
            )
            tp_c[c] += int(hit_c.sum())
            fp_c[c] += int((~hit_c).sum())
    n_true = max(1, sum(n_img))
    return {
        "threshold": threshold,
        "mean_sensitivity": round(metrics.mean_sensitivity(tp_img, n_img), 4),
        "fppi": round(metrics.fppi(fp_total, len(films)), 4),
        "paper_map": round(metrics.paper_map(tp_c.tolist(), fp_c.tolist()), 4),
        "sensitivity_all_lesions": round(sum(tp_img) / n_true, 4),
        "detections_per_image": round((sum(tp_img) + fp_total) / len(films), 4),
        "tp": int(sum(tp_img)),
        "fp": int(fp_total),
    }


def _voc_ap(
    films: Sequence[Film], dets: Sequence[Detections], criterion: str, classes: Sequence[int] | None
) -> float:
    """VOC all-point AP over the films; ``classes=None``: class-agnostic."""
    cut = OR_THRESHOLD if criterion == "overlap_ratio" else IOU_THRESHOLD
    scores, hits, n_true = [], [], 0
    for film, d in zip(films, dets, strict=True):
        boxes, labels = _truth(film)
        mine = np.ones(len(d.scores), bool) if classes is None else np.isin(d.labels, classes)
        want = np.ones(len(boxes), bool) if classes is None else np.isin(labels, classes)
        hit = metrics.match_boxes(
            d.boxes[mine], d.scores[mine], boxes[want], threshold=cut, criterion=criterion
        )
        scores.append(d.scores[mine])
        hits.append(hit)
        n_true += int(want.sum())
    return metrics.average_precision(np.concatenate(scores), np.concatenate(hits), n_true)


def _probabilities(raw: np.ndarray) -> np.ndarray:
    """Sigmoid on the class and mask channels (what the engine's activation does)."""
    out = raw.astype(np.float32, copy=True)
    k = len(CLASSES) + 1
    out[:k] = 1.0 / (1.0 + np.exp(-out[:k]))
    return out


def _pooled_input(model: Any, film: Film) -> np.ndarray:
    """(1, 320, 320) float32: `film_input` through the network's fixed stem pool."""
    import torch

    x = torch.from_numpy(film_input(film.image))[None, None]
    pooled: np.ndarray = model.pool(x)[0].numpy()
    return pooled


def _pooled_output(model: Any, pooled: np.ndarray) -> np.ndarray:
    """(5, 160, 160) probabilities + sizes of one cached, pooled film (1, 320, 320)."""
    import torch

    with torch.inference_mode():
        y = model.forward_features(torch.from_numpy(np.ascontiguousarray(pooled))[None])
    return _probabilities(y[0].numpy())


def evaluate_films(
    films: Sequence[Film],
    outputs: Sequence[np.ndarray],
    *,
    threshold: float,
    sweep: Sequence[float] = SWEEP,
) -> dict[str, Any]:
    """Paper 002's detection metrics of network outputs on held-out films.

    Parameters
    ----------
    films : sequence of Film
        The held-out films (normal ones count for FPPI).
    outputs : sequence of numpy.ndarray
        ``(5, 160, 160)`` per film, probabilities and sizes (see `decode_detections`).
    threshold : float
        The operating confidence threshold (the registry entry's ``threshold``).
    sweep : sequence of float
        Confidence thresholds of the sweep.

    Returns
    -------
    dict
        ``at_threshold`` (hits by OR ≥ 0.5: mean sensitivity, FPPI, eq. 8 "mAP" …),
        ``at_threshold_iou`` (the same with IoU ≥ 0.5), ``voc_ap`` (class-agnostic
        lesion AP and per-class / mean AP, OR and IoU), ``sweep`` (a list, OR
        criterion), ``mask`` (pixel Dice, OR = |pred ∩ true| / |pred|), and counts.
    """
    floor = min(min(sweep), threshold)
    dets = [decode_detections(o, threshold=floor) for o in outputs]
    ap: dict[str, float] = {}
    for criterion, tag in (("overlap_ratio", "or"), ("iou", "iou")):
        per_class = [_voc_ap(films, dets, criterion, [c]) for c in range(len(CLASSES))]
        present = [
            c
            for c in range(len(CLASSES))
            if any(les.label == c for f in films for les in f.lesions)
        ]
        ap[f"lesion_ap_{tag}"] = round(_voc_ap(films, dets, criterion, None), 4)
        for c, name in enumerate(CLASSES):
            ap[f"ap_{name}_{tag}"] = round(per_class[c], 4)
        ap[f"voc_map_{tag}"] = (
            round(float(np.mean([per_class[c] for c in present])), 4) if present else 0.0
        )
    pred_mask = np.concatenate([d.mask.ravel() for d in dets])
    true_mask = np.concatenate([_true_mask(f).ravel() for f in films])
    return {
        "at_threshold": _score_threshold(films, outputs, threshold, "overlap_ratio"),
        "at_threshold_iou": _score_threshold(films, outputs, threshold, "iou"),
        "voc_ap": ap,
        "sweep": [_score_threshold(films, outputs, t, "overlap_ratio") for t in sweep],
        "mask": {
            "pixel_dice": round(metrics.dice(pred_mask, true_mask), 4),
            "pixel_overlap_ratio": round(float(metrics.overlap_ratio(pred_mask, true_mask)), 4),
            "resolution": f"{STRIDE} px = {STRIDE * PIXEL_UM / 1000:g} mm per mask pixel",
        },
        "n_films": len(films),
        "n_films_with_lesions": sum(1 for f in films if f.lesions),
        "n_lesions": sum(len(f.lesions) for f in films),
        "n_lesions_per_class": {
            name: sum(1 for f in films for les in f.lesions if les.label == c)
            for c, name in enumerate(CLASSES)
        },
        "matching": (
            f"greedy by score; a detection hits an unmatched true box when OR = |A∩B|/|A| "
            f"≥ {OR_THRESHOLD} (A = predicted box; paper 002's ORT) - 'at_threshold_iou' "
            f"uses IoU ≥ {IOU_THRESHOLD}; sensitivity and FPPI class-agnostic, eq. 8 'mAP' "
            "and per-class AP class-aware (a detection of class c can only hit a lesion "
            "of class c); detections decoded at each threshold as the engine does; VOC AP "
            f"ranks the detections found at threshold {floor:g}"
        ),
    }


def _choose_threshold(films: Sequence[Film], outputs: Sequence[np.ndarray]) -> float:
    """Operating threshold from the **training** films: the highest-sensitivity sweep
    value whose FPPI is at most 1 (the paper's operating point is 1.11 FPPI)."""
    rows = [_score_threshold(films, outputs, t, "overlap_ratio") for t in SWEEP]
    ok = [r for r in rows if r["fppi"] <= 1.0] or rows[-1:]
    best = max(ok, key=lambda r: (r["mean_sensitivity"], -r["fppi"]))
    return float(best["threshold"])


# --------------------------------------------------------------------------- training


def _focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (α = 2, β = 4), per positive."""
    import torch
    from torch.nn import functional

    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.ge(0.999).float()
    log_p = functional.logsigmoid(logits)
    log_not_p = functional.logsigmoid(-logits)
    pos_loss = -(pos * (1 - p) ** 2 * log_p).sum()
    neg_loss = -((1 - pos) * (1 - target) ** 4 * p**2 * log_not_p).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def _loss(raw: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch
    from torch.nn import functional

    k = len(CLASSES)
    heat = _focal(raw[:, :k], batch["heat"])
    mask_logit = raw[:, k]
    mask = batch["mask"]
    bce = functional.binary_cross_entropy_with_logits(mask_logit, mask)
    pm = torch.sigmoid(mask_logit)
    dice = 1 - (2 * (pm * mask).sum() + 1) / (pm.sum() + mask.sum() + 1)
    w = batch["size_weight"]
    size = (w[:, None] * (raw[:, k + 1 :] - batch["log_size"]).abs()).sum() / (
        2 * w.sum().clamp(min=1.0)
    )
    return heat + SIZE_WEIGHT * size + bce + dice


def _batch(
    cache: Sequence[dict[str, np.ndarray]],
    batch_size: int,
    rng: np.random.Generator,
    *,
    crop: int = 192,
    p_lesion: float = 0.7,
) -> dict[str, np.ndarray]:
    """Random crops of the cached films with left/right flips and gamma jitter.

    A crop is ``crop`` pooled px (``4 · crop`` film px) square at an even origin (so
    the stride-2 targets stay aligned); with probability ``p_lesion`` it holds the
    centre of a random lesion of a film that has one (at least 16 px inside), else it
    lies anywhere on a random film.
    """
    parts: dict[str, list[np.ndarray]] = {
        "x": [],
        "heat": [],
        "mask": [],
        "log_size": [],
        "size_weight": [],
    }
    with_lesion = [i for i, c in enumerate(cache) if c["lesions"].size]
    for _ in range(batch_size):
        side = cache[0]["x"].shape[-1]
        if with_lesion and rng.random() < p_lesion:
            item = cache[with_lesion[int(rng.integers(len(with_lesion)))]]
            lesions = item["lesions"]
            cy, cx = lesions[int(rng.integers(len(lesions)))]
            lo = np.clip(np.array([cy, cx]) - crop + 16, 0, side - crop)
            hi = np.clip(np.array([cy, cx]) - 16, 0, side - crop)
            origin = [int(rng.integers(a, max(a, b) + 1)) for a, b in zip(lo, hi, strict=True)]
        else:
            item = cache[int(rng.integers(len(cache)))]
            origin = [int(v) for v in rng.integers(0, side - crop + 1, size=2)]
        y0, x0 = (v - v % 2 for v in origin)
        part = {
            "x": item["x"][:, y0 : y0 + crop, x0 : x0 + crop],
            **{
                k: item[k][..., y0 // 2 : (y0 + crop) // 2, x0 // 2 : (x0 + crop) // 2]
                for k in ("heat", "mask", "log_size", "size_weight")
            },
        }
        if rng.random() < 0.5:  # left/right flip (paper 002's augmentation)
            part = {k: v[..., ::-1] for k, v in part.items()}
        gamma = float(np.exp(rng.uniform(-0.25, 0.25)))
        part["x"] = np.power(part["x"], gamma, dtype=np.float32)
        for k in parts:
            parts[k].append(np.ascontiguousarray(part[k]))
    return {k: np.stack(v).astype(np.float32) for k, v in parts.items()}


def _default_command(data_dir: Path, out_path: Path, seed: int, epochs: int) -> str:
    args = ["--data", str(data_dir), "--out", str(out_path), "--seed", str(seed)]
    args += ["--epochs", str(epochs)]
    return "python -m napari_histo_ai.training.mammogram " + shlex.join(args)


def train_mammogram(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    epochs: int = 110,
    batch_size: int = 8,
    crop: int = 192,
    width: int = 16,
    learning_rate: float = 3e-3,
    val_fraction: float = VAL_FRACTION,
    refs: Sequence[str] | None = None,
    command: str | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Train the mass detector; a generator yielding one progress record per step.

    Parameters
    ----------
    data_dir : str or Path
        The mini-MIAS folder (see `load_mias`).
    out_path : str or Path
        Weights file (``.safetensors``); the JSON record goes beside it. Both atomic.
    seed : int
        Seeds the split, the augmentation (numpy) and the initialisation (torch).
    epochs : int
        ``ceil(n_train / batch_size)`` steps each (one crop per training film).
    batch_size : int
        Crops per step.
    crop : int
        Side of the training crops, pooled px (4 film px each; a multiple of 8).
    width : int
        `MassDetector` width.
    learning_rate : float
        Peak AdamW learning rate (5 % warm-up, cosine decay).
    val_fraction : float
        Share of the women held out.
    refs : sequence of str, optional
        Only these films (tests).
    command : str, optional
        Command line recorded in the JSON.

    Yields
    ------
    dict
        ``{"epoch", "step", "steps", "loss"}`` after every step.

    Returns
    -------
    dict
        The JSON record (metrics on the held-out women, split, threshold, timing …).

    Raises
    ------
    HistoAIError
        Bad data folder, Info.txt or schedule.
    """
    import torch

    from ..models.architectures.detector import MassDetector

    data_dir, out_path = Path(data_dir), Path(out_path)
    for label, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise HistoAIError(f"{label} must be ≥ 1, got {value}")
    side = PATCH // DOWNSAMPLE
    if crop < 8 or crop % 8 or crop > side:
        raise HistoAIError(f"crop {crop} must be a multiple of 8 between 8 and {side} pooled px")
    started = time.perf_counter()
    cpu_started = time.process_time()
    films = load_mias(data_dir, refs=refs)
    train, val = split_by_woman(films, seed=seed, val_fraction=val_fraction)
    if not any(f.lesions for f in train):
        raise HistoAIError(f"{data_dir}: no located abnormality among the training films")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    kwargs = {"in_channels": 1, "n_classes": len(CLASSES), "width": width, "downsample": DOWNSAMPLE}
    model = MassDetector(**kwargs, seed=seed)
    cache = [
        {
            "x": _pooled_input(model, film),
            **targets(film.lesions),
            # lesion centres, pooled px of the padded patch (crop sampling)
            "lesions": np.array(
                [
                    ((le.row + HALO) / DOWNSAMPLE, (le.col + HALO) / DOWNSAMPLE)
                    for le in film.lesions
                ]
            ).reshape(-1, 2),
        }
        for film in train
    ]
    prep_time = time.perf_counter() - started

    steps_per_epoch = math.ceil(len(train) / batch_size)
    # channels-last convolutions are ~25 % faster on CPU (oneDNN); weights saved contiguous
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    total = epochs * steps_per_epoch
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
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
            arrays = _batch(cache, batch_size, rng, crop=crop)
            batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
            batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
            optimiser.zero_grad(set_to_none=True)
            loss = _loss(model.raw_features(batch["x"]), batch)
            loss.backward()
            optimiser.step()
            scheduler.step()
            step += 1
            yield {"epoch": epoch, "step": step, "steps": total, "loss": float(loss.item())}
    train_time = time.perf_counter() - started
    cpu_time = time.process_time() - cpu_started
    model.eval()

    threshold = _choose_threshold(train, [_pooled_output(model, c["x"]) for c in cache])
    outputs = [_pooled_output(model, _pooled_input(model, f)) for f in val]
    scores = evaluate_films(val, outputs, threshold=threshold)
    record: dict[str, Any] = {
        "architecture": "mass_detector",
        "kwargs": kwargs,
        "weights": out_path.name,
        "input": (
            f"film px (200 µm, io.mpp unset), {PATCH}² patch = film + {HALO} px halo of 0, "
            f"CLAHE clip {CLIP_LIMIT} tiles {CLAHE_TILES} over the patch, / 255; pooled "
            f"{DOWNSAMPLE}× in the network, output stride {STRIDE} px"
        ),
        "output": (
            "5 channels: benign / malignant centre logits, lesion mask logit (sigmoid), "
            "box height / width in output px"
        ),
        "threshold": threshold,
        "threshold_rule": (
            f"highest mean sensitivity with FPPI ≤ 1 on the training films (sweep {list(SWEEP)})"
        ),
        "metrics": scores,
        "split": {
            "by": "woman (case_id = film pair mdb2k-1+mdb2k)",
            "seed": seed,
            "val_fraction": val_fraction,
            "train": [f.ref for f in train],
            "validation": [f.ref for f in val],
            "validation_women": sorted({f.case_id for f in val}),
            "excluded_unlocated": [f.ref for f in films if not f.located],
        },
        "seed": seed,
        "epochs": epochs,
        "steps": total,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "augmentation": (
            f"{crop}² pooled-px crops ({crop * DOWNSAMPLE}² film px), 70 % holding a "
            "lesion centre; left/right flip; gamma exp(U(-0.25, 0.25))"
        ),
        "crop": crop,
        "loss": (
            f"CenterNet focal (heatmaps) + {SIZE_WEIGHT:g} × L1 log size + BCE + soft Dice (mask)"
        ),
        "command": command or _default_command(data_dir, out_path, seed, epochs),
        "data": {
            "folder": str(data_dir),
            "sha256": {f.path.name: sha256(f.path)[:16] for f in films}
            | {"Info.txt": sha256(data_dir / "Info.txt")[:16]},
        },
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "preprocess_time_s": round(prep_time, 1),
        "train_time_s": round(train_time, 1),
        "train_cpu_time_s": round(cpu_time, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    metadata = {
        "architecture": "mass_detector",
        "kwargs": json.dumps(kwargs),
        "seed": str(seed),
        "threshold": str(threshold),
    }
    save_weights_and_record(model, out_path, metadata, record)
    return record


def train_mammogram_sync(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `train_mammogram` to the end and return its record (``progress`` gets every step)."""
    return run_to_end(train_mammogram(data_dir, out_path, **options), progress)


def evaluate(
    data_dir: Path, *, model: str = "mias-mass-detector", weights: Path | None = None
) -> dict[str, Any]:
    """Score a registered detector on the held-out women of a mini-MIAS folder.

    The held-out films are those of the JSON record beside the weights (the split the
    model was trained with); without a record, the seed-0 split by woman. The network
    runs on the engine's input (`film_input`) through the registry's loader, and the
    entry's ``threshold`` is the operating point.

    Parameters
    ----------
    data_dir : Path
        The mini-MIAS folder.
    model : str
        Registry name (``mias-mass-detector``).
    weights : Path, optional
        A weights file to score instead of the registered one (same architecture).

    Returns
    -------
    dict
        `evaluate_films`'s metrics plus ``model``, ``weights`` and ``split``.

    Raises
    ------
    HistoAIError
        Unknown model, unreadable weights, bad data folder.
    """
    import torch

    from ..models.loading import load_model
    from ..models.registry import load_registry

    spec = load_registry().get(model)
    if weights is not None:
        spec = dataclasses.replace(spec, weights=Path(weights))
    boxes = next((o for o in spec.outputs if o.kind == "boxes"), None)
    if boxes is None:
        raise HistoAIError(f"model {model!r} has no 'boxes' output; expected a mass detector")
    record_path = spec.weights.with_suffix(".json") if spec.weights is not None else None
    record: dict[str, Any] = {}
    if record_path is not None and record_path.is_file():
        record = json.loads(record_path.read_text("utf-8"))
    films = load_mias(data_dir)
    held = record.get("split", {}).get("validation")
    if held:
        known = {f.ref for f in films}
        missing = [r for r in held if r not in known]
        if missing:
            raise HistoAIError(
                f"{data_dir}: held-out film(s) {', '.join(missing)} of {record_path} are missing"
            )
        val = [f for f in films if f.ref in set(held)]
        split = {"by": "woman", "source": str(record_path), "validation": held}
    else:
        seed = int(record.get("seed", 0))
        _, val = split_by_woman(films, seed=seed)
        split = {"by": "woman", "seed": seed, "validation": [f.ref for f in val]}
    predictor = load_model(spec, device="cpu")
    outputs = []
    for film in val:
        x = torch.from_numpy(film_input(film.image))[None, None]
        with torch.inference_mode():
            y = predictor(x)
        outputs.append(_probabilities(y[0].float().numpy()))
    result = evaluate_films(val, outputs, threshold=boxes.threshold)
    result.update(
        {
            "model": model,
            "weights": str(spec.weights),
            "split": split,
            "validation_women": sorted({f.case_id for f in val}),
        }
    )
    result.update(_plot_entries(val, outputs, threshold=boxes.threshold))
    return result


def _plot_entries(
    films: Sequence[Film], outputs: Sequence[np.ndarray], *, threshold: float
) -> dict[str, Any]:
    """``curves`` / ``confusion`` of `evaluate` for `napari_histo_ai.plots.evaluation_plots`.

    Curves: per film, "has a located lesion" against the film's highest class
    probability (the best box score it could give); per mask pixel (8 px = 1.6 mm
    stride, every film pooled), lesion disc against the mask probability. Confusion:
    the lesions and detections at the operating ``threshold``, matched greedily by
    score with OR ≥ `OR_THRESHOLD` (class-agnostic, as sensitivity and FPPI are): a
    matched pair counts at (true class, predicted class), a missed lesion at (its
    class, "none"), an unmatched detection at ("none", its class).
    """
    from ..plots import confusion_entry, curve_entry

    k = len(CLASSES)
    h, n = HALO // STRIDE, FILM // STRIDE
    film_truth, film_score, mask_truth, mask_score = [], [], [], []
    confusion = np.zeros((k + 1, k + 1), np.int64)
    for film, output in zip(films, outputs, strict=True):
        kept = output[:, h : h + n, h : h + n]
        film_truth.append(bool(film.lesions))
        film_score.append(float(kept[:k].max()))
        mask_truth.append(_true_mask(film).ravel())
        mask_score.append(kept[k].ravel())
        d = decode_detections(output, threshold=threshold)
        boxes, labels = _truth(film)
        overlap = np.zeros((len(d.scores), len(boxes)))
        if len(d.scores) and len(boxes):
            overlap = np.asarray(metrics.overlap_ratio(d.boxes, boxes), dtype=np.float64)
        used = np.zeros(len(boxes), bool)
        for i in np.argsort(-d.scores, kind="mergesort"):
            cand = np.where(used, -1.0, overlap[i])
            j = int(np.argmax(cand)) if len(boxes) else -1
            if j >= 0 and cand[j] >= OR_THRESHOLD:
                used[j] = True
                confusion[labels[j], d.labels[i]] += 1
            else:
                confusion[k, d.labels[i]] += 1
        for missed in np.flatnonzero(~used):
            confusion[labels[missed], k] += 1
    return {
        "curves": {
            "film (max class probability)": curve_entry(film_truth, film_score),
            "mask pixel": curve_entry(np.concatenate(mask_truth), np.concatenate(mask_score)),
        },
        "confusion": {
            f"lesions at threshold {threshold:g}": confusion_entry(confusion, (*CLASSES, "none"))
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, print the record's metrics; exit status 2 on a data error."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_histo_ai.training.mammogram",
        description="Train the default mammogram mass detector on mini-MIAS (paper 002).",
    )
    parser.add_argument("--data", type=Path, required=True, help="mini_mias folder")
    parser.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=110)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    command = "python -m napari_histo_ai.training.mammogram " + shlex.join(given)

    def report(record: Progress) -> None:
        steps_per_epoch = record["steps"] / max(1, args.epochs)
        if not args.quiet and record["step"] % max(1, round(steps_per_epoch)) == 0:
            print_progress(record, "epoch", "step", "loss")

    try:
        import torch

        torch.set_num_threads(1)
        result = train_mammogram_sync(
            args.data,
            args.out,
            progress=report,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            command=command,
        )
    except HistoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "at_threshold": result["metrics"]["at_threshold"],
        "voc_ap": result["metrics"]["voc_ap"],
        "mask": result["metrics"]["mask"],
        "threshold": result["threshold"],
        "train_time_s": result["train_time_s"],
        "command": result["command"],
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
