"""Post-processing: objects from probability maps, image-level aggregates of tile vectors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models.spec import OutputSpec


@dataclass
class Objects:
    """Points or boxes found in a run, in level-0 pixel coordinates.

    Attributes
    ----------
    kind : str
        ``"points"`` or ``"boxes"``.
    coords : numpy.ndarray
        points: (N, 2 + p) (plane..., row, col) centres; boxes: (N, p + 4)
        (plane..., top, left, bottom, right). Level-0 pixels, continuous (pixel i spans
        [i, i + 1)).
    scores : numpy.ndarray (N,)
    labels : numpy.ndarray of int (N,)
        Class index into the output's ``classes``.
    """

    kind: str
    coords: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def empty(cls, kind: str, n_plane: int, classes: tuple[str, ...]) -> Objects:
        width = n_plane + (2 if kind == "points" else 4)
        return cls(kind, np.zeros((0, width)), np.zeros(0), np.zeros(0, dtype=np.int64), classes)

    def extend(self, other: Objects) -> None:
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
