"""The metrics module against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_histo_ai import metrics as m


def test_confusion_matrix_rows_are_truth():
    cm = m.confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m.confusion_matrix([], [], n_classes=2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="5 values"):
        m.confusion_matrix([0] * 5, [0] * 4)


def test_binary_scores_by_hand():
    # truth 1 1 1 0 0 0, pred 1 1 0 1 0 0: TP 2, FP 1, FN 1, TN 2
    t, p = [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]
    assert m.accuracy(t, p) == pytest.approx(4 / 6)
    assert m.precision(t, p) == pytest.approx(2 / 3)
    assert m.recall(t, p) == pytest.approx(2 / 3)
    assert m.f1(t, p) == pytest.approx(2 / 3)
    assert m.f1(t, p, positive=0) == pytest.approx(2 / 3)
    assert m.prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    assert m.prf(3, 1, 2)["f1"] == pytest.approx(6 / 9)


def test_dice_and_jaccard():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[1:3, 1:3] = True  # 4 px, overlap 1
    assert m.dice(a, b) == pytest.approx(2 / 8)
    assert m.jaccard(a, b) == pytest.approx(1 / 7)
    assert m.dice(np.zeros(3), np.zeros(3)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        m.dice(a, b[:3])


def test_auc_with_ties_and_curves():
    # pairs (pos, neg): scores pos [0.9, 0.5], neg [0.5, 0.1]:
    # 0.9>0.5 1, 0.9>0.1 1, 0.5=0.5 0.5, 0.5>0.1 1 -> 3.5 / 4
    t = [1, 1, 0, 0]
    s = [0.9, 0.5, 0.5, 0.1]
    assert m.roc_auc(t, s) == pytest.approx(0.875)
    assert math.isnan(m.roc_auc([1, 1], [0.1, 0.2]))
    fpr, tpr, _ = m.roc_curve(t, s)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    # trapezoid area equals the rank AUC
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875)
    prec, rec, _ = m.pr_curve(t, s)
    assert prec.tolist() == pytest.approx([1.0, 2 / 3, 0.5])
    assert rec.tolist() == pytest.approx([0.5, 1.0, 1.0])


def test_cohen_kappa_by_hand():
    # 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = (25*30 + 25*20)/2500 = 0.5 -> 0.4
    t = [0] * 25 + [1] * 25
    p = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
    assert m.cohen_kappa(t, p) == pytest.approx(0.4)
    assert m.cohen_kappa([0, 1, 2], [0, 1, 2], weights="quadratic") == pytest.approx(1.0)
    # linear weights: one step off in a 3-class problem is penalised less than two
    one = m.cohen_kappa([0, 1, 2, 2], [0, 1, 2, 1], weights="linear")
    two = m.cohen_kappa([0, 1, 2, 2], [0, 1, 2, 0], weights="linear")
    assert one > two
    assert math.isnan(m.cohen_kappa([1, 1], [1, 1]))


def test_match_points_is_optimal_one_to_one():
    truth = [[0, 0], [0, 8]]
    # nearest-first greedy gives (0, 2) to (0, 0) (distance 2) and leaves (0, -3) and
    # (0, 8) unmatched; the optimal matching pairs (0, 2)-(0, 8) and (0, -3)-(0, 0)
    pred = [[0, 2], [0, -3]]
    assert m.match_points(pred, truth, radius=6) == (2, 0, 0)
    assert m.match_points(pred, truth, radius=5) == (1, 1, 1)
    assert m.match_points([], truth, radius=1) == (0, 0, 2)


def test_boxes_iou_overlap_ratio_and_matching():
    a = [[0, 0, 10, 10]]
    b = [[0, 5, 10, 15], [20, 20, 30, 30]]
    iou = m.box_iou(a, b)
    assert iou[0].tolist() == pytest.approx([50 / 150, 0.0])
    orr = m.overlap_ratio(a, b)
    assert orr[0].tolist() == pytest.approx([0.5, 0.0])
    # OR of a small box inside a large one is 1, its IoU small
    assert m.overlap_ratio([[2, 2, 4, 4]], [[0, 0, 10, 10]])[0, 0] == pytest.approx(1.0)
    mask_a = np.zeros((4, 4), bool)
    mask_a[:2] = True
    mask_b = np.zeros((4, 4), bool)
    mask_b[1:] = True
    assert m.overlap_ratio(mask_a, mask_b) == pytest.approx(0.5)
    # the higher-scored prediction takes the true box; the duplicate is a false positive
    hit = m.match_boxes([[0, 0, 10, 10], [0, 1, 10, 11]], [0.2, 0.9], [[0, 0, 10, 10]])
    assert hit.tolist() == [False, True]
    hit = m.match_boxes(
        [[2, 2, 4, 4]], [0.5], [[0, 0, 10, 10]], threshold=0.5, criterion="overlap_ratio"
    )
    assert hit.tolist() == [True]


def test_average_precision_by_hand():
    # ranked: TP, FP, TP with 3 true objects -> recall 1/3 @ P 1, 2/3 @ P 2/3
    ap = m.average_precision([0.9, 0.8, 0.7], [True, False, True], n_true=3)
    assert ap == pytest.approx(1 / 3 * 1.0 + 1 / 3 * 2 / 3)
    assert m.average_precision([], [], n_true=2) == 0.0
    assert m.average_precision([0.5], [True], n_true=1) == pytest.approx(1.0)


def test_paper_detection_figures():
    assert m.paper_map([3, 1], [1, 1]) == pytest.approx((0.75 + 0.5) / 2)
    assert m.fppi(6, 4) == 1.5
    # the image without objects does not count
    assert m.mean_sensitivity([1, 0, 2], [2, 0, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        m.fppi(1, 0)
