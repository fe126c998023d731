"""Post-processing: objects from probability maps, image-level aggregates of tile vectors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models.spec import OutputSpec


@dataclass
class Objects:
    """Points, boxes or lines found in a run, in level-0 pixel coordinates.

    Attributes
    ----------
    kind : str
        ``"points"``, ``"boxes"`` or ``"lines"``.
    coords : numpy.ndarray
        points: (N, 2 + p) (plane..., row, col) centres; boxes: (N, p + 4)
        (plane..., top, left, bottom, right); lines: (N, p + 4) (plane..., row0, col0,
        row1, col1), both ends on the same plane. Level-0 pixels, continuous (pixel i
        spans [i, i + 1)).
    scores : numpy.ndarray (N,)
    labels : numpy.ndarray of int (N,)
        Class index into the output's ``classes``.
    features : dict of str to numpy.ndarray
        Extra per-object columns, each (N,) (lines: ``length_mm``, ``volume_mm3``...).
    """

    kind: str
    coords: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...] = field(default_factory=tuple)
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, kind: str, n_plane: int, classes: tuple[str, ...]) -> Objects:
        width = n_plane + (2 if kind == "points" else 4)
        return cls(kind, np.zeros((0, width)), np.zeros(0), np.zeros(0, dtype=np.int64), classes)

    def extend(self, other: Objects) -> None:
        n_self, n_other = len(self), len(other)
        self.features = {
            key: np.concatenate(
                [
                    self.features.get(key, np.full(n_self, np.nan)),
                    other.features.get(key, np.full(n_other, np.nan)),
                ]
            )
            for key in {**self.features, **other.features}
        }
        self.coords = np.concatenate([self.coords, other.coords])
        self.scores = np.concatenate([self.scores, other.scores])
        self.labels = np.concatenate([self.labels, other.labels])

    def __len__(self) -> int:
        return len(self.scores)


def find_peaks(
    prob: np.ndarray,
    *,
    threshold: float,
    min_distance: int,
    core: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of (K, h, w) probabilities, one class per peak, inside ``core``.

    Parameters
    ----------
    prob : numpy.ndarray
        (K, h, w) probabilities of a block read with a margin around ``core``.
    threshold : float
        Minimum probability of a peak.
    min_distance : int
        Minimum separation between peaks, output pixels.
    core : (top, left, bottom, right)
        The block's own area (peaks in the margin belong to a neighbour block).

    Returns
    -------
    (rows, cols, scores, labels) as arrays; rows/cols in block pixels.
    """
    from skimage.feature import peak_local_max

    top, left, bottom, right = core
    best = prob.max(axis=0)
    label = prob.argmax(axis=0)
    if float(best.max(initial=0.0)) < threshold:
        empty = np.zeros((0, 2), dtype=np.int64)
        return empty, np.zeros(0), np.zeros(0, dtype=np.int64)
    # smooth a little so plateaus (quantised uint8 maps) give one peak
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(best, size=3, mode="nearest")
    peaks = peak_local_max(
        smooth,
        min_distance=max(1, int(min_distance)),
        threshold_abs=threshold,
        exclude_border=False,
    )
    if len(peaks) == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64)
    keep = (
        (peaks[:, 0] >= top)
        & (peaks[:, 0] < bottom)
        & (peaks[:, 1] >= left)
        & (peaks[:, 1] < right)
    )
    peaks = peaks[keep]
    scores = best[peaks[:, 0], peaks[:, 1]]
    keep2 = scores >= threshold
    peaks = peaks[keep2]
    return peaks, scores[keep2].astype(np.float64), label[peaks[:, 0], peaks[:, 1]].astype(np.int64)


def aggregate(values: np.ndarray, spec: OutputSpec) -> dict[str, object]:
    """Image-level result of per-tile vectors.

    Parameters
    ----------
    values : numpy.ndarray
        (N, K) per-tile probabilities (class) or values (magnification); rows with NaN
        (not computed, background) are ignored.
    spec : OutputSpec

    Returns
    -------
    dict
        class: ``{"method", "label", "class", "scores": {class: score}, "n_tiles"}``;
        magnification: ``{"method", "value", "n_tiles"}``.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v).any(axis=1)] if v.size else v.reshape(0, len(spec.channels))
    n = len(v)
    method = spec.aggregate
    if spec.kind == "magnification":
        per_tile = tile_magnification(v, spec)
        if n == 0:
            return {"method": method, "value": None, "n_tiles": 0}
        fn: dict[str, Callable[[np.ndarray], Any]] = {
            "median": np.median,
            "average": np.mean,
            "max": np.max,
            "sum": np.sum,
        }
        if method == "vote":
            vals, counts = np.unique(per_tile, return_counts=True)
            value = float(vals[np.argmax(counts)])
        else:
            value = float(fn[method](per_tile))
        return {"method": method, "value": value, "n_tiles": n}
    if n == 0:
        return {"method": method, "label": None, "class": None, "scores": {}, "n_tiles": 0}
    if method == "vote":
        counts = np.bincount(v.argmax(axis=1), minlength=v.shape[1]).astype(np.float64)
        scores = counts / n
    elif method == "average":
        scores = v.mean(axis=0)
    elif method == "max":
        scores = v.max(axis=0)
    elif method == "sum":
        scores = v.sum(axis=0)
    elif method in ("exist", "exist3"):
        label, scores = exist_aggregate(v, at_least=1 if method == "exist" else 3)
        return {
            "method": method,
            "label": label,
            "class": spec.classes[label],
            "scores": {c: float(s) for c, s in zip(spec.classes, scores, strict=True)},
            "n_tiles": n,
        }
    else:  # median
        scores = np.median(v, axis=0)
    label = int(np.argmax(scores))
    return {
        "method": method,
        "label": label,
        "class": spec.classes[label],
        "scores": {c: float(s) for c, s in zip(spec.classes, scores, strict=True)},
        "n_tiles": n,
    }


def exist_aggregate(values: np.ndarray, *, at_least: int) -> tuple[int, np.ndarray]:
    """Paper 002's ``exist`` (``at_least=1``) and ``exist3`` (``at_least=3``) rules.

    Class 0 is the negative class (benign, background). A tile *is positive* when its
    most likely class is not 0; the image is positive when at least ``at_least`` tiles
    are, and then takes the non-zero class most of those tiles chose (ties: the lower
    index); otherwise it is class 0.

    Parameters
    ----------
    values : numpy.ndarray
        (N, K) per-tile class probabilities, K >= 2, no NaN rows.
    at_least : int
        Positive tiles needed.

    Returns
    -------
    label : int
    scores : numpy.ndarray (K,)
        ``s`` = the ``at_least``-th largest ``1 - p_0`` over the tiles (0 with fewer
        tiles); class 0 scores ``1 - s``, the other classes share ``s`` in proportion to
        their positive tiles. With two classes ``label == argmax(scores)`` and ``s`` is
        the image's positive score (``s > 0.5`` exactly when ``at_least`` tiles say 1).
    """
    v = np.asarray(values, dtype=np.float64)
    n, k = v.shape
    scores = np.zeros(k)
    if n == 0 or k < 2:
        if k:
            scores[0] = 1.0
        return 0, scores
    labels = v.argmax(axis=1)
    positive = labels[labels != 0]
    votes = np.bincount(positive, minlength=k).astype(np.float64)
    votes[0] = 0.0
    q = np.sort(1.0 - v[:, 0])[::-1]
    s = float(q[at_least - 1]) if n >= at_least else 0.0
    share = votes / votes.sum() if votes.sum() else np.full(k, 1.0 / (k - 1))
    share[0] = 0.0
    scores = s * share
    scores[0] = 1.0 - s
    label = int(np.argmax(votes)) if len(positive) >= at_least else 0
    return label, scores


def tile_magnification(values: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Per-tile magnification: regressor value, or the value of the most likely class."""
    v = np.asarray(values, dtype=np.float64)
    if not spec.values:
        return v[..., 0]
    table = np.asarray(spec.values, dtype=np.float64)
    idx = np.nan_to_num(v, nan=-1.0).argmax(axis=-1)
    out = table[idx]
    if v.ndim > 1:
        out = np.where(np.isnan(v).any(axis=-1), np.nan, out)
    return out
