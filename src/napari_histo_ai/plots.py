"""Evaluation and training plots as matplotlib figures, saved as PNG (Qt-free).

Every function builds a `matplotlib.figure.Figure` directly (never ``pyplot``, never a
backend switch), so the CLI draws headless and the Retrain widget can hand the same
figure to its Qt canvas. PNGs are rendered with the Agg canvas and written atomically.
matplotlib is imported inside the functions: importing this module is free.

Curves come from `napari_histo_ai.metrics` (`~napari_histo_ai.metrics.pr_curve`,
`~napari_histo_ai.metrics.roc_curve`, `~napari_histo_ai.metrics.roc_auc`,
`~napari_histo_ai.metrics.average_precision`), so the numbers in a legend are the
numbers ``evaluate`` reports.

Examples
--------
>>> from napari_histo_ai import plots
>>> fig = plots.pr_roc_figure({"v1": ([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.4])})
>>> plots.save_figure(fig, tmp / "pr_roc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from . import metrics
from .atomic import atomic_open
from .errors import HistoAIError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "comparison_figure",
    "confusion_entry",
    "confusion_figure",
    "curve_entry",
    "evaluation_plots",
    "pr_roc_figure",
    "save_figure",
    "training_curves_figure",
]

#: most points drawn per curve (a 200k-pixel curve is thinned to this, endpoints kept)
MAX_CURVE_POINTS = 2000
#: most samples an evaluation result keeps per curve (pixel tasks are subsampled)
MAX_CURVE_SAMPLES = 200_000


# --------------------------------------------------------------------------- result entries
def curve_entry(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    max_samples: int = MAX_CURVE_SAMPLES,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """A ``result["curves"][name]`` entry: JSON-able labels and scores, subsampled.

    Parameters
    ----------
    y_true : array-like of {0, 1} or bool, any shape
        Truth per sample (e.g. per pixel); flattened.
    scores : array-like of float, same size
        Score per sample, higher meaning more positive (e.g. a probability).
    max_samples : int
        At most this many samples are kept, drawn uniformly without replacement with
        ``seed`` (the same samples on every run), in their original order.
    seed : int

    Returns
    -------
    dict
        ``{"y_true": [int, ...], "scores": [float, ...]}``, scores rounded to 6 decimals.
    """
    t, s = _binary("entry", y_true, scores)
    if t.size > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(t.size, max_samples, replace=False))
        t, s = t[keep], s[keep]
    return {"y_true": t.tolist(), "scores": np.round(s, 6).tolist()}


def confusion_entry(matrix: ArrayLike, classes: Sequence[str]) -> dict[str, list[Any]]:
    """A ``result["confusion"][name]`` entry: ``{"classes": [...], "matrix": [[...]]}``.

    ``matrix`` is (K, K) counts, rows the true class (`metrics.confusion_matrix`).
    """
    m = np.asarray(matrix)
    if m.shape != (len(classes), len(classes)):
        raise HistoAIError(
            f"confusion matrix of shape {m.shape} for classes {list(classes)}: "
            f"expected ({len(classes)}, {len(classes)})"
        )
    return {"classes": [str(c) for c in classes], "matrix": m.astype(np.int64).tolist()}


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _binary(name: str, y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y_true as int64 0/1, scores as float64)`` of curve ``name``."""
    t = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = (t.astype(np.int64) if t.dtype == bool else t).ravel()
    if t.shape != s.shape:
        raise HistoAIError(
            f"curve {name!r}: y_true has {t.size} values but scores has {s.size}; "
            "expected one score per label"
        )
    if t.size and not np.isin(t, (0, 1)).all():
        bad = np.unique(t[~np.isin(t, (0, 1))])[:5].tolist()
        raise HistoAIError(
            f"curve {name!r}: y_true holds {bad}; expected binary labels 0 / 1 "
            "(one-vs-rest the classes of a multi-class task first)"
        )
    if not np.isfinite(s).all():
        raise HistoAIError(
            f"curve {name!r}: {int(np.count_nonzero(~np.isfinite(s)))} scores are NaN or "
            "infinite; expected finite scores (drop the samples the model could not score)"
        )
    return t.astype(np.int64), s


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, MAX_CURVE_POINTS).round().astype(np.int64))
    return x[keep], y[keep]


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _pr_panel(ax: Axes, curves: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> None:
    """Precision over recall, one line per name, AP in the legend."""
    for name, (y_true, scores) in curves.items():
        t, s = _binary(name, y_true, scores)
        n_pos = int(t.sum())
        if n_pos == 0 or n_pos == t.size:
            ax.plot([], [], " ", label=f"{name} (n/a: one class)")
            continue
        prec, rec, _ = metrics.pr_curve(t, s)
        ap = metrics.average_precision(s, t == 1, n_pos)
        # start at recall 0 with the first precision: the curve a reader expects
        x, y = _thin(np.r_[0.0, rec], np.r_[prec[0], prec])
        line = ax.plot(x, y, drawstyle="steps-pre", label=f"{name} (AP {ap:.3f})")[0]
        ax.axhline(n_pos / t.size, color=line.get_color(), lw=0.8, ls=":", alpha=0.6)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("precision-recall (dotted: prevalence)", fontsize="medium")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left", fontsize="small")
    else:
        _note(ax, "no curves")


def _roc_panel(ax: Axes, curves: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> None:
    """True-positive rate over false-positive rate, AUC in the legend, chance diagonal."""
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance (AUC 0.5)")
    for name, (y_true, scores) in curves.items():
        t, s = _binary(name, y_true, scores)
        n_pos = int(t.sum())
        if n_pos == 0 or n_pos == t.size:
            ax.plot([], [], " ", label=f"{name} (n/a: one class)")
            continue
        fpr, tpr, _ = metrics.roc_curve(t, s)
        auc = metrics.roc_auc(t, s)
        x, y = _thin(fpr, tpr)
        ax.plot(x, y, label=f"{name} (AUC {auc:.3f})")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("ROC", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def pr_roc_figure(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], *, title: str = "") -> Figure:
    """Precision-recall and ROC curves side by side, one line per model version.

    Parameters
    ----------
    curves : mapping of str to (y_true, scores)
        Name (e.g. ``"mitosis-fcn 1.0"``) to labels, shape (N,), 0 / 1, and scores,
        shape (N,), float, higher meaning more positive. A name whose labels hold one
        class only has no curve; it appears in the legend as "n/a: one class".
    title : str
        Figure title.

    Returns
    -------
    Figure
        Left: precision over recall, average precision (VOC all-point,
        `metrics.average_precision`) in the legend, the prevalence dotted. Right: TPR over
        FPR, ROC AUC (`metrics.roc_auc`) in the legend, the chance diagonal dashed.

    Raises
    ------
    HistoAIError
        Labels and scores differ in length, labels other than 0 / 1, non-finite scores.
    """
    fig = _new_figure((10.0, 4.4))
    ax_pr, ax_roc = fig.subplots(1, 2)
    _pr_panel(ax_pr, curves)
    _roc_panel(ax_roc, curves)
    if title:
        fig.suptitle(title)
    return fig


def confusion_figure(
    matrix: ArrayLike, classes: Sequence[str], *, title: str = "", normalise: bool = True
) -> Figure:
    """A confusion matrix: true class rows, predicted class columns.

    Parameters
    ----------
    matrix : array-like of int, shape (K, K)
        ``matrix[i, j]`` = samples of true class ``i`` predicted as ``j``
        (`metrics.confusion_matrix`).
    classes : sequence of str, length K
        Class names in index order.
    title : str
        Figure title (the sample count and accuracy are appended).
    normalise : bool
        Colour cells by the row-normalised fraction (recall per true class) rather than
        by the count. Each cell shows the count and, below it, the row fraction.

    Returns
    -------
    Figure

    Raises
    ------
    HistoAIError
        The matrix is not square, does not match ``classes``, or holds negative counts.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = len(classes)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != k:
        raise HistoAIError(
            f"confusion matrix of shape {m.shape} with {k} class names {list(classes)}: "
            f"expected a square ({k}, {k}) matrix, rows true class, columns predicted"
        )
    if not np.isfinite(m).all() or (m < 0).any():
        raise HistoAIError("confusion matrix holds negative or non-finite counts; expected counts")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = max(3.6, 1.2 + 0.9 * k)
    fig = _new_figure((side + 1.2, side))
    ax = fig.subplots()
    shown = frac if normalise else m
    vmax = 1.0 if normalise else max(float(m.max(initial=0.0)), 1.0)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalise else "count")
    for i in range(k):
        for j in range(k):
            dark = shown[i, j] > 0.6 * vmax
            text = f"{m[i, j]:.0f}"
            text += f"\n{frac[i, j]:.1%}" if rows[i, 0] > 0 else "\n–"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize="small",
                color="white" if dark else "black",
            )
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=30 if k > 3 else 0, ha="right")
    ax.set_yticks(range(k), [str(c) for c in classes])
    ax.set(xlabel="predicted class", ylabel="true class")
    n = float(m.sum())
    acc = float(np.trace(m)) / n if n else float("nan")
    summary = f"n = {int(n)}, accuracy {acc:.3f}" if n else "n = 0"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize="medium")
    return fig


_LOSS = re.compile(r"loss", re.IGNORECASE)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def training_curves_figure(
    history: Sequence[Mapping[str, float]],
    *,
    title: str = "",
    figure: Figure | None = None,
) -> Figure:
    """Loss curves (left) and validation metrics (right) over the epochs.

    Parameters
    ----------
    history : sequence of mapping
        One record per epoch: ``"epoch"`` (x; default the record's 1-based position),
        ``"train_loss"``, optionally ``"val_loss"`` and any other numeric keys (e.g.
        ``"val_f1"``, ``"val_auc"``). Keys containing "loss" go to the left panel, the
        other numeric keys to the right. Missing, non-numeric or non-finite values are
        gaps. An empty history draws empty panels ("no epochs yet").
    title : str
        Figure title.
    figure : Figure, optional
        Clear and redraw into this figure (e.g. the widget's live canvas) instead of
        making a new one; the caller redraws its canvas.

    Returns
    -------
    Figure
        ``figure`` if given.
    """
    if figure is None:
        figure = _new_figure((10.0, 4.0))
    else:
        figure.clear()
    ax_loss, ax_metric = figure.subplots(1, 2)
    xs = [_number(r.get("epoch")) for r in history]
    x = [float(i + 1) if v is None else v for i, v in enumerate(xs)]
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k != "epoch" and k not in keys]
    plotted = {"loss": 0, "metric": 0}
    for key in keys:
        values = [_number(r.get(key)) for r in history]
        if all(v is None for v in values):
            continue
        y = np.array([np.nan if v is None else v for v in values])
        is_loss = bool(_LOSS.search(key))
        ax = ax_loss if is_loss else ax_metric
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=key)
        plotted["loss" if is_loss else "metric"] += 1
    ax_loss.set(xlabel="epoch", ylabel="loss")
    ax_loss.set_title("loss", fontsize="medium")
    ax_metric.set(xlabel="epoch", ylabel="value")
    ax_metric.set_title("validation metrics", fontsize="medium")
    from matplotlib.ticker import MaxNLocator

    for ax, kind in ((ax_loss, "loss"), (ax_metric, "metric")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if plotted[kind]:
            ax.legend(fontsize="small")
        else:
            _note(ax, "no epochs yet" if not history else f"no {kind} values")
    if title:
        figure.suptitle(title)
    return figure


def comparison_figure(
    metrics: Mapping[str, Mapping[str, float]],
    *,
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
    title: str = "",
    figure: Figure | None = None,
) -> Figure:
    """Before / after of model versions on one validation set.

    Parameters
    ----------
    metrics : mapping of str to mapping of str to float
        Version name to its metrics (e.g. ``{"v1": {"f1": 0.7, "auc": 0.8}, ...}``).
        The metric names every version reports with a finite number are drawn as grouped
        bars, one bar per version, values written above the bars.
    curves : mapping of str to (y_true, scores), optional
        When given, a precision-recall panel (as in `pr_roc_figure`) beside the bars.
    title : str
        Figure title.
    figure : Figure, optional
        Clear and redraw into this figure (the Retrain widget's canvas).

    Returns
    -------
    Figure
        ``figure`` if given.
    """
    versions = list(metrics)
    shared: list[str] = []
    if versions:
        first = metrics[versions[0]]
        shared = [k for k in first if all(_number(metrics[v].get(k)) is not None for v in versions)]
    if figure is None:
        fig = _new_figure((11.0 if curves is not None else 7.0, 4.4))
    else:
        fig = figure
        fig.clear()
    if curves is not None:
        ax_bar, ax_pr = fig.subplots(1, 2, width_ratios=(1.3, 1.0))
        _pr_panel(ax_pr, curves)
    else:
        ax_bar = fig.subplots()
    if shared:
        width = 0.8 / len(versions)
        base = np.arange(len(shared), dtype=np.float64)
        for i, version in enumerate(versions):
            values = [float(metrics[version][k]) for k in shared]
            bars = ax_bar.bar(
                base + (i - (len(versions) - 1) / 2) * width, values, width, label=version
            )
            ax_bar.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=2)
        ax_bar.set_xticks(base, shared, rotation=30 if len(shared) > 4 else 0)
        ax_bar.margins(y=0.15)
        ax_bar.legend(fontsize="small")
    else:
        _note(ax_bar, "no metric shared by all versions" if versions else "no versions")
    ax_bar.set_ylabel("value")
    ax_bar.set_title("metrics per version", fontsize="medium")
    ax_bar.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Render ``figure`` with the Agg canvas and write it as PNG, atomically.

    Parameters
    ----------
    figure : Figure
        Any figure, also one shown on a Qt canvas (its canvas is restored afterwards).
    path : str or Path
        Target ``.png`` file; its folder is created. A previous file is replaced only
        once the new one is complete.
    dpi : int
        Pixels per inch of the PNG (a 10 x 4.4 inch figure at 120 dpi is 1200 x 528 px).

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise HistoAIError(f"{path}: plots are written as PNG; expected a .png file name")
    original = figure.canvas
    try:
        with atomic_open(path, "wb") as fh:
            FigureCanvasAgg(figure).print_figure(fh, format="png", dpi=dpi)
    finally:
        figure.set_canvas(original)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "default"


def evaluation_plots(
    result: Mapping[str, Any], out_dir: str | Path, *, stem: str = "evaluation"
) -> list[Path]:
    """Write the PNGs of an ``evaluate`` result: PR/ROC curves and confusion matrices.

    Parameters
    ----------
    result : mapping
        An evaluation result (`training.defaults.evaluate_model`) holding
        ``result["curves"] = {name: {"y_true": [...], "scores": [...]}}`` (binary scoring
        tasks) and/or ``result["confusion"] = {name: {"classes": [...],
        "matrix": [[...], ...]}}``.
    out_dir : str or Path
        Folder to write into (created).
    stem : str
        File-name prefix, e.g. the model name.

    Returns
    -------
    list of Path
        ``out_dir/<stem>_pr_roc.png`` (every curve in one figure) when there are curves,
        then ``out_dir/<stem>_confusion_<name>.png`` per confusion matrix.

    Raises
    ------
    HistoAIError
        Neither key is present (or both are empty), or an entry lacks its fields.
    """
    out_dir = Path(out_dir)
    curves_in = result.get("curves") or {}
    confusion_in = result.get("confusion") or {}
    if not curves_in and not confusion_in:
        raise HistoAIError(
            f"the evaluation result has neither 'curves' nor 'confusion' (its keys: "
            f"{', '.join(sorted(result)) or 'none'}); expected at least one to plot "
            "(this model's evaluator does not report scores)"
        )
    written: list[Path] = []
    if curves_in:
        curves: dict[str, tuple[Any, Any]] = {}
        for name, entry in curves_in.items():
            if not isinstance(entry, Mapping) or "y_true" not in entry or "scores" not in entry:
                raise HistoAIError(
                    f"curves[{name!r}]: expected a mapping with 'y_true' and 'scores' lists"
                )
            curves[str(name)] = (entry["y_true"], entry["scores"])
        fig = pr_roc_figure(curves, title=stem)
        written.append(save_figure(fig, out_dir / f"{_safe(stem)}_pr_roc.png"))
    for name, entry in confusion_in.items():
        if not isinstance(entry, Mapping) or "matrix" not in entry or "classes" not in entry:
            raise HistoAIError(
                f"confusion[{name!r}]: expected a mapping with 'classes' and 'matrix'"
            )
        fig = confusion_figure(entry["matrix"], entry["classes"], title=f"{stem}: {name}")
        written.append(
            save_figure(fig, out_dir / f"{_safe(stem)}_confusion_{_safe(str(name))}.png")
        )
    return written
