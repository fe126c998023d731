"""Evaluation / training plots: real drawings of known data, decoded PNGs, Qt-free."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from napari_histo_ai import metrics, plots
from napari_histo_ai.errors import HistoAIError


def _scores(d: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores whose ROC AUC is Φ(d / √2) (positives N(d, 1), negatives N(0, 1))."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    s = rng.normal(0.0, 1.0, n) + d * y
    return y, s


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _png(path: Path) -> np.ndarray:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_pr_roc_two_versions_known_auc(tmp_path: Path) -> None:
    strong, weak = _scores(2.0), _scores(0.5, seed=1)
    fig = plots.pr_roc_figure({"v1.0": strong, "v1.0-ft1": weak}, title="mitosis")
    ax_pr, ax_roc = fig.axes
    auc_strong = metrics.roc_auc(*strong)
    assert abs(auc_strong - _phi(2.0 / math.sqrt(2.0))) < 0.02  # the data is what we think
    roc_legend = _legend(ax_roc)
    assert f"v1.0 (AUC {auc_strong:.3f})" in roc_legend
    assert f"v1.0-ft1 (AUC {metrics.roc_auc(*weak):.3f})" in roc_legend
    assert any("chance" in t for t in roc_legend)
    ap = metrics.average_precision(strong[1], strong[0] == 1, int(strong[0].sum()))
    assert f"v1.0 (AP {ap:.3f})" in _legend(ax_pr)
    # ROC from (0, 0) to (1, 1); the stronger model's curve lies above the weaker one's
    roc_lines = [ln for ln in ax_roc.get_lines() if ln.get_label().startswith("v1.0")]
    x0, y0 = roc_lines[0].get_data()
    assert (x0[0], y0[0]) == (0.0, 0.0) and (x0[-1], y0[-1]) == (1.0, 1.0)
    x1, y1 = roc_lines[1].get_data()
    grid = np.linspace(0.05, 0.95, 19)
    assert (np.interp(grid, x0, y0) > np.interp(grid, x1, y1)).all()

    out = plots.save_figure(fig, tmp_path / "pr_roc.png", dpi=100)
    pixels = _png(out)
    assert pixels.shape == (440, 1000, 3)  # 10 x 4.4 inches at 100 dpi
    assert pixels.std() > 0


def test_pr_roc_one_class_is_a_legend_note(tmp_path: Path) -> None:
    fig = plots.pr_roc_figure({"good": _scores(1.0), "empty": (np.ones(20), np.linspace(0, 1, 20))})
    for ax in fig.axes:
        assert "empty (n/a: one class)" in _legend(ax)
    pixels = _png(plots.save_figure(fig, tmp_path / "one.png"))
    assert pixels.std() > 0


def test_pr_roc_thins_long_curves() -> None:
    fig = plots.pr_roc_figure({"pixels": _scores(1.0, n=200_000)})
    for ax in fig.axes:
        (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("pixels")]
        assert len(line.get_xdata()) <= plots.MAX_CURVE_POINTS + 1


@pytest.mark.parametrize(
    ("y", "s", "what"),
    [
        ([0, 1, 1], [0.1, 0.2], "3 values"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "binary"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN"),
    ],
)
def test_pr_roc_bad_input_names_the_curve(y, s, what) -> None:
    with pytest.raises(HistoAIError, match=rf"curve 'bad'.*{what}"):
        plots.pr_roc_figure({"bad": (y, s)})


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(-5, 5)), min_size=1, max_size=40))
def test_pr_roc_draws_any_binary_scores(samples) -> None:
    y = [int(b) for b, _ in samples]
    s = [v for _, v in samples]
    fig = plots.pr_roc_figure({"m": (y, s)})
    assert len(fig.axes) == 2
    one_class = len(set(y)) == 1
    assert any("n/a: one class" in t for t in _legend(fig.axes[1])) == one_class


def test_confusion_three_classes(tmp_path: Path) -> None:
    m = np.array([[8, 2, 0], [1, 6, 3], [0, 0, 0]])
    classes = ["cancer", "other tissue", "background"]
    fig = plots.confusion_figure(m, classes, title="tissue-fcn")
    (ax, _colorbar) = fig.axes
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(image[0], [0.8, 0.2, 0.0])
    np.testing.assert_allclose(image[1], [0.1, 0.6, 0.3])
    np.testing.assert_allclose(image[2], 0.0)  # an empty true class: fractions 0, no crash
    texts = [t.get_text() for t in ax.texts]
    assert "8\n80.0%" in texts and "3\n30.0%" in texts and "0\n–" in texts
    assert [t.get_text() for t in ax.get_yticklabels()] == classes
    assert "n = 20, accuracy 0.700" in ax.get_title()
    pixels = _png(plots.save_figure(fig, tmp_path / "cm.png"))
    assert pixels.std() > 0

    counts = plots.confusion_figure(m, classes, normalise=False).axes[0].get_images()[0]
    np.testing.assert_array_equal(counts.get_array(), m)


def test_confusion_rejects_mismatched_classes() -> None:
    with pytest.raises(HistoAIError, match=r"\(3, 3\)"):
        plots.confusion_figure(np.eye(2), ["a", "b", "c"])
    with pytest.raises(HistoAIError, match="negative"):
        plots.confusion_figure([[1, -1], [0, 1]], ["a", "b"])


def test_training_curves_redraw_into_the_same_figure(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_f1": e / 10, "val_auc": 0.5}
        for e in range(1, 6)
    ]
    fig = plots.training_curves_figure(history[:2])
    again = plots.training_curves_figure(history, title="fine-tune", figure=fig)
    assert again is fig and len(fig.axes) == 2  # cleared, not stacked
    ax_loss, ax_metric = fig.axes
    assert [ln.get_label() for ln in ax_loss.get_lines()] == ["train_loss", "val_loss"]
    assert [ln.get_label() for ln in ax_metric.get_lines()] == ["val_f1", "val_auc"]
    np.testing.assert_allclose(ax_loss.get_lines()[0].get_ydata(), [1 / e for e in range(1, 6)])
    np.testing.assert_allclose(ax_loss.get_lines()[0].get_xdata(), range(1, 6))
    pixels = _png(plots.save_figure(fig, tmp_path / "train.png"))
    assert pixels.std() > 0


def test_training_curves_empty_and_partial_history(tmp_path: Path) -> None:
    fig = plots.training_curves_figure([])
    assert all("no epochs yet" in [t.get_text() for t in ax.texts] for ax in fig.axes)
    assert _png(plots.save_figure(fig, tmp_path / "empty.png")).std() > 0
    # val_loss only from epoch 2; a NaN is a gap; no "epoch" key: positions 1, 2, 3
    partial = [
        {"train_loss": 0.9},
        {"train_loss": 0.7, "val_loss": float("nan")},
        {"val_loss": 0.5},
    ]
    ax_loss, ax_metric = plots.training_curves_figure(partial).axes
    val = next(ln for ln in ax_loss.get_lines() if ln.get_label() == "val_loss")
    np.testing.assert_array_equal(val.get_xdata(), [1.0, 2.0, 3.0])
    assert np.isnan(val.get_ydata()[:2]).all() and val.get_ydata()[2] == 0.5
    assert "no metric values" in [t.get_text() for t in ax_metric.texts]


def test_comparison_bars_and_pr_panel(tmp_path: Path) -> None:
    scores = {"v1": {"f1": 0.61, "auc": 0.8, "split": "test"}, "v2": {"f1": 0.74, "auc": 0.86}}
    fig = plots.comparison_figure(scores, title="before / after")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["f1", "auc"]  # "split" not shared
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [0.61, 0.74, 0.8, 0.86]
    labels = [t.get_text() for t in ax.texts]
    assert "0.610" in labels and "0.860" in labels
    with_curves = plots.comparison_figure(scores, curves={"v1": _scores(1), "v2": _scores(2)})
    assert len(with_curves.axes) == 2
    assert any(t.startswith("v2 (AP") for t in _legend(with_curves.axes[1]))
    pixels = _png(plots.save_figure(with_curves, tmp_path / "cmp.png", dpi=50))
    assert pixels.shape == (220, 550, 3) and pixels.std() > 0
    nothing = plots.comparison_figure({"v1": {"a": 1.0}, "v2": {"b": 2.0}})
    assert "no metric shared by all versions" in [t.get_text() for t in nothing.axes[0].texts]


def test_save_figure_is_atomic_and_keeps_the_canvas(tmp_path: Path, monkeypatch) -> None:
    fig = plots.confusion_figure([[1, 0], [0, 1]], ["a", "b"])
    canvas = fig.canvas
    target = tmp_path / "sub" / "cm.png"
    assert plots.save_figure(fig, target) == target
    assert fig.canvas is canvas
    assert [p.name for p in target.parent.iterdir()] == ["cm.png"]  # no temp file left
    before = target.read_bytes()
    with pytest.raises(HistoAIError, match=r"cm\.jpg.*\.png"):
        plots.save_figure(fig, tmp_path / "cm.jpg")

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def half_written(self, fh, **kwargs):
        fh.write(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_figure", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.save_figure(fig, target)
    assert fig.canvas is canvas
    assert target.read_bytes() == before  # the previous PNG is intact
    assert [p.name for p in target.parent.iterdir()] == ["cm.png"]


def test_evaluation_plots_from_a_json_result(tmp_path: Path) -> None:
    y, s = _scores(1.5, n=500)
    result = {
        "model": "idc-tumour",
        "auc": metrics.roc_auc(y, s),
        "curves": {"patch": {"y_true": y.tolist(), "scores": s.tolist()}},
        "confusion": {
            "patch": {"classes": ["not tumour", "tumour"], "matrix": [[200, 50], [40, 210]]},
            "patient 3/x": {
                "classes": ["a", "b", "c"],
                "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            },
        },
    }
    result = json.loads(json.dumps(result))  # what `evaluate --json-out` holds
    paths = plots.evaluation_plots(result, tmp_path / "plots", stem="idc-tumour")
    assert [p.name for p in paths] == [
        "idc-tumour_pr_roc.png",
        "idc-tumour_confusion_patch.png",
        "idc-tumour_confusion_patient_3_x.png",
    ]
    for p in paths:
        assert _png(p).std() > 0
    only_confusion = {"confusion": result["confusion"]}
    assert len(plots.evaluation_plots(only_confusion, tmp_path / "c")) == 2


def test_evaluation_plots_needs_curves_or_confusion(tmp_path: Path) -> None:
    with pytest.raises(HistoAIError, match=r"neither 'curves' nor 'confusion'.*dice"):
        plots.evaluation_plots({"dice": 0.8}, tmp_path)
    with pytest.raises(HistoAIError, match=r"curves\['x'\].*y_true"):
        plots.evaluation_plots({"curves": {"x": {"scores": [1.0]}}}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_module_is_qt_free_and_lazy() -> None:
    code = (
        "import sys, napari_histo_ai.plots as p\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        "p.training_curves_figure([{'epoch': 1, 'train_loss': 1.0}])\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('PyQt5', 'PyQt6', 'PySide6', 'qtpy', 'napari') or m == 'matplotlib.pyplot']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
