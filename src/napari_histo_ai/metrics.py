"""The papers' metrics in plain numpy (scipy only for the optimal point matching).

Classification: `confusion_matrix`, `accuracy`, `precision`, `recall`, `f1`, `prf`,
`cohen_kappa`, `roc_auc`, `roc_curve`, `pr_curve`. Segmentation: `dice`, `jaccard`.
Detection: `match_points`, `box_iou`, `overlap_ratio`, `match_boxes`,
`average_precision`, `paper_map`, `fppi`, `mean_sensitivity`.

Conventions: labels are integer class indices (binary: ``positive`` = 1); scores are
"higher means more positive"; boxes are ``(top, left, bottom, right)`` in pixels with
``bottom``/``right`` exclusive (a pixel ``i`` spans ``[i, i + 1)``), so a box's area is
``(bottom - top) · (right - left)``. A ratio whose denominator is zero is ``0.0``
(``nan`` for AUC and kappa, where no value is meaningful), never a warning.

Examples
--------
>>> from napari_histo_ai import metrics
>>> metrics.f1([1, 1, 0, 0], [1, 0, 1, 0])
0.5
>>> metrics.dice([[1, 1], [0, 0]], [[1, 0], [0, 0]])
0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "average_precision",
    "box_iou",
    "cohen_kappa",
    "confusion_matrix",
    "dice",
    "f1",
    "fppi",
    "jaccard",
    "match_boxes",
    "match_points",
    "mean_sensitivity",
    "overlap_ratio",
    "paper_map",
    "pr_curve",
    "precision",
    "prf",
    "recall",
    "roc_auc",
    "roc_curve",
]


def _ratio(num: Any, den: Any) -> float:
    return float(num) / float(den) if den else 0.0


def _labels(y: Any) -> np.ndarray:
    a = np.asarray(y)
    if a.dtype == bool:
        a = a.astype(np.int64)
    return a.ravel()


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values but y_pred has {p.size}; expected equal")
    return t, p


# ------------------------------------------------------------------ classification
def confusion_matrix(y_true: Any, y_pred: Any, *, n_classes: int | None = None) -> np.ndarray:
    """Counts of (true class, predicted class).

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (N,)
    n_classes : int, optional
        Number of classes K; default ``max(label) + 1``.

    Returns
    -------
    ndarray of int64, shape (K, K)
        ``m[i, j]`` = samples of true class ``i`` predicted as ``j`` (rows = truth).
    """
    t, p = _pair(y_true, y_pred)
    t = t.astype(np.int64)
    p = p.astype(np.int64)
    if t.size and (t.min() < 0 or p.min() < 0):
        raise ValueError("class labels must be non-negative integers")
    k = n_classes if n_classes is not None else int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and max(t.max(), p.max()) >= k:
        raise ValueError(f"a label is >= n_classes={k}")
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of samples whose prediction equals the truth (0.0 when empty)."""
    t, p = _pair(y_true, y_pred)
    return _ratio(np.count_nonzero(t == p), t.size)


def _counts(y_true: Any, y_pred: Any, positive: int) -> tuple[int, int, int]:
    t, p = _pair(y_true, y_pred)
    tp = int(np.count_nonzero((t == positive) & (p == positive)))
    fp = int(np.count_nonzero((t != positive) & (p == positive)))
    fn = int(np.count_nonzero((t == positive) & (p != positive)))
    return tp, fp, fn


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision, recall and F1 from counts.

    Returns
    -------
    dict
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}``; F1 = 2·TP / (2·TP + FP + FN).
    """
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
    }


def precision(y_true: Any, y_pred: Any, *, positive: int = 1) -> float:
    """TP / (TP + FP) for class ``positive``."""
    return prf(*_counts(y_true, y_pred, positive))["precision"]


def recall(y_true: Any, y_pred: Any, *, positive: int = 1) -> float:
    """TP / (TP + FN) for class ``positive`` (sensitivity)."""
    return prf(*_counts(y_true, y_pred, positive))["recall"]


def f1(y_true: Any, y_pred: Any, *, positive: int = 1) -> float:
    """Harmonic mean of precision and recall for class ``positive``."""
    return prf(*_counts(y_true, y_pred, positive))["f1"]


def cohen_kappa(
    y_true: Any, y_pred: Any, *, weights: str | None = None, n_classes: int | None = None
) -> float:
    """Cohen's kappa: agreement corrected for chance.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (N,)
        Class indices (ordered classes for weighted kappa, e.g. magnifications sorted).
    weights : {None, "linear", "quadratic"}
        Disagreement weights ``|i - j|`` or ``(i - j)²``; ``None`` is the unweighted kappa.
    n_classes : int, optional

    Returns
    -------
    float
        ``1 - Σ w·O / Σ w·E`` (``nan`` if chance agreement is perfect, e.g. one class only).
    """
    m = confusion_matrix(y_true, y_pred, n_classes=n_classes).astype(np.float64)
    n = m.sum()
    if n == 0:
        return float("nan")
    k = m.shape[0]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(np.float64)
    else:
        raise ValueError(f"weights {weights!r}: expected None, 'linear' or 'quadratic'")
    expected = np.outer(m.sum(axis=1), m.sum(axis=0)) / n
    den = float((w * expected).sum())
    if den == 0:
        return float("nan")
    return float(1.0 - (w * m).sum() / den)


def _binary_scores(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _labels(y_true).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"y_true has {t.size} values but scores has {s.size}; expected equal")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("y_true must be binary (0 / 1)")
    return t, s


def roc_auc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half).

    Returns ``nan`` when only one class is present.
    """
    t, s = _binary_scores(y_true, scores)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _sweep(t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP, FP at each distinct threshold, highest first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tp = np.cumsum(t_sorted)[last]
    fp = (last + 1) - tp
    return tp.astype(np.float64), fp.astype(np.float64), s_sorted[last]


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: (false-positive rate, true-positive rate, thresholds), from (0, 0)."""
    t, s = _binary_scores(y_true, scores)
    tp, fp, thr = _sweep(t, s)
    n_pos, n_neg = t.sum(), t.size - t.sum()
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.zeros(tp.size + 1)
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.zeros(fp.size + 1)
    return fpr, tpr, np.r_[np.inf, thr]


def pr_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve: (precision, recall, thresholds), highest threshold first."""
    t, s = _binary_scores(y_true, scores)
    tp, fp, thr = _sweep(t, s)
    n_pos = t.sum()
    prec = tp / np.maximum(tp + fp, 1)
    rec = tp / n_pos if n_pos else np.zeros_like(tp)
    return prec, rec, thr


# ------------------------------------------------------------------ segmentation
def _masks(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    return p, t


def dice(pred: Any, truth: Any) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two masks (1.0 when both are empty)."""
    p, t = _masks(pred, truth)
    den = int(p.sum()) + int(t.sum())
    return 1.0 if den == 0 else 2.0 * int(np.count_nonzero(p & t)) / den


def jaccard(pred: Any, truth: Any) -> float:
    """Jaccard index (IoU) |A∩B| / |A∪B| of two masks (1.0 when both are empty)."""
    p, t = _masks(pred, truth)
    union = int(np.count_nonzero(p | t))
    return 1.0 if union == 0 else int(np.count_nonzero(p & t)) / union


# ------------------------------------------------------------------ detection
def match_points(pred: Any, truth: Any, radius: float) -> tuple[int, int, int]:
    """Optimal one-to-one matching of points within ``radius``.

    Parameters
    ----------
    pred, truth : array-like, shape (N, 2) / (M, 2)
        (row, col) coordinates, same units as ``radius``.
    radius : float
        A prediction matches a true point at distance ≤ ``radius``.

    Returns
    -------
    (tp, fp, fn) : tuple of int
        Maximum-cardinality matching (ties broken by smallest total distance).
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0 or len(t) == 0:
        return 0, len(p), len(t)
    from scipy.optimize import linear_sum_assignment

    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    big = 1e6 + d.max() * len(p)
    cost = np.where(d <= radius, d, big)
    rows, cols = linear_sum_assignment(cost)
    tp = int(np.count_nonzero(d[rows, cols] <= radius))
    return tp, len(p) - tp, len(t) - tp


def _boxes(b: Any) -> np.ndarray:
    a = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if (a[:, 2] < a[:, 0]).any() or (a[:, 3] < a[:, 1]).any():
        raise ValueError("boxes must be (top, left, bottom, right) with bottom >= top")
    return a


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)


def _area(a: np.ndarray) -> np.ndarray:
    return (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Intersection over union of every pair of boxes, shape (N, M)."""
    a, b = _boxes(a), _boxes(b)
    inter = _intersection(a, b)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def overlap_ratio(pred: Any, truth: Any) -> Any:
    """Paper 002's overlap ratio OR(A, B) = |A∩B| / |A|, A the prediction.

    Parameters
    ----------
    pred, truth : boolean masks of one shape, or boxes (N, 4) / (M, 4)

    Returns
    -------
    float for masks (0.0 when A is empty); ndarray (N, M) for boxes.
    """
    pa, ta = np.asarray(pred), np.asarray(truth)
    if pa.dtype == bool or ta.dtype == bool or (pa.ndim == 2 and pa.shape[-1] != 4):
        p, t = _masks(pa, ta)
        return _ratio(np.count_nonzero(p & t), np.count_nonzero(p))
    a, b = _boxes(pa), _boxes(ta)
    inter = _intersection(a, b)
    area = _area(a)[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def match_boxes(
    pred: Any,
    scores: Any,
    truth: Any,
    *,
    threshold: float = 0.5,
    criterion: str = "iou",
) -> np.ndarray:
    """Greedy matching of scored predicted boxes to true boxes (highest score first).

    Parameters
    ----------
    pred : (N, 4) boxes; scores : (N,) confidences; truth : (M, 4) boxes
    threshold : float
        A prediction hits a not-yet-matched true box when the criterion ≥ ``threshold``.
    criterion : {"iou", "overlap_ratio"}
        IoU, or paper 002's OR = |A∩B| / |A| (A the prediction).

    Returns
    -------
    ndarray of bool, shape (N,)
        True where the prediction is a true positive (in the input order).
    """
    p = _boxes(pred)
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = _boxes(truth)
    if len(s) != len(p):
        raise ValueError(f"{len(p)} boxes but {len(s)} scores")
    if criterion == "iou":
        q = box_iou(p, t)
    elif criterion == "overlap_ratio":
        q = overlap_ratio(p, t)
    else:
        raise ValueError(f"criterion {criterion!r}: expected 'iou' or 'overlap_ratio'")
    hit = np.zeros(len(p), dtype=bool)
    used = np.zeros(len(t), dtype=bool)
    for i in np.argsort(-s, kind="mergesort"):
        if not len(t):
            break
        cand = np.where(used, -1.0, q[i])
        j = int(np.argmax(cand))
        if cand[j] >= threshold:
            hit[i] = True
            used[j] = True
    return hit


def average_precision(scores: Any, is_tp: Any, n_true: int) -> float:
    """VOC all-point average precision of ranked detections.

    Parameters
    ----------
    scores : (N,) confidences of all detections (over all images)
    is_tp : (N,) bool, whether each detection matched a true object
    n_true : int
        Number of true objects (the recall denominator).

    Returns
    -------
    float
        Area under the precision envelope over recall (0.0 when ``n_true`` is 0).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    hit = np.asarray(is_tp, dtype=bool).ravel()
    if n_true <= 0 or s.size == 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    tp = np.cumsum(hit[order])
    fp = np.cumsum(~hit[order])
    rec = np.r_[0.0, tp / n_true, 1.0]
    prec = np.r_[1.0, tp / np.maximum(tp + fp, 1), 0.0]
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    step = np.flatnonzero(np.diff(rec)) + 1
    return float(np.sum((rec[step] - rec[step - 1]) * prec[step]))


def paper_map(tp_per_class: Sequence[float], fp_per_class: Sequence[float]) -> float:
    """Paper 002's "mAP" (its eq. 8): mean over classes of TP(c) / (TP(c) + FP(c)).

    This is a mean precision, not the ranked VOC AP (`average_precision`).
    """
    tp = np.asarray(tp_per_class, dtype=np.float64)
    fp = np.asarray(fp_per_class, dtype=np.float64)
    if tp.shape != fp.shape or tp.size == 0:
        raise ValueError("tp_per_class and fp_per_class need one value per class each")
    return float(np.mean([_ratio(a, a + b) for a, b in zip(tp, fp, strict=True)]))


def fppi(n_false_positives: float, n_images: int) -> float:
    """False positives per image (paper 002)."""
    if n_images <= 0:
        raise ValueError("fppi needs at least one image")
    return float(n_false_positives) / n_images


def mean_sensitivity(tp_per_image: Sequence[float], n_true_per_image: Sequence[float]) -> float:
    """Mean over the images that hold objects of TP / (objects in the image).

    Images without true objects do not count (their sensitivity is undefined); 0.0 if
    no image has an object.
    """
    tp = np.asarray(tp_per_image, dtype=np.float64)
    n = np.asarray(n_true_per_image, dtype=np.float64)
    if tp.shape != n.shape:
        raise ValueError("tp_per_image and n_true_per_image need one value per image each")
    has = n > 0
    return float(np.mean(tp[has] / n[has])) if has.any() else 0.0
