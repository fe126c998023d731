"""Fine-tune any registered model on reviewed corrections: the human-in-the-loop step.

`finetune` is a generator (the Retrain widget drives it in a thread worker, the CLI
with `run_to_end`): it yields a `TrainProgress` record after every batch and every
epoch and returns a `FinetuneResult`. One run:

1. **Data**: `load_items` reads the training sets (and folders of real data) at the
   model's µm/px, each item marked train or val by the fixed split (so every version of
   a model is compared on the same validation items). Inputs are normalised once,
   exactly as the inference engine normalises tiles (`normalise`, per-patch Macenko
   included).
2. **Before**: the parent model is scored on the validation items.
3. **Epochs**: a **balanced** pass (``positive_fraction`` of each batch drawn from the
   positives, the rest from the negatives; hard negatives weighted
   ``hard_negative_weight`` in the loss), then the **negative feed** of paper 000
   generalised: the model is run over every training item; the ones it gets wrong plus
   an equal number of correctly handled ones (random) are trained on once more,
   augmented. Then validation (loss and metrics), a checkpoint, early stopping when the
   validation loss has not improved for ``patience`` epochs (the best epoch's weights are
   kept).
4. **After**: the best weights are scored on the same validation items and registered as
   a new version (`register_version`) with its card: parent, data, config, metrics before
   and after. Only when some epoch beat the parent's validation loss: a copy of the
   parent is not a new version (``FinetuneResult.improved``).

Losses (``loss``): ``wbce`` (binary maps: BCE weighted ``1 + w·t``, ``w`` = negative /
``w`` = ``pos_weight``, 5 as the mitosis FCN trains), ``bce_dice`` (binary
masks: BCE + soft Dice, as nuclei-unet), ``ce`` (multi-class maps and tile classes;
ignored pixels skipped), ``rare_hinge`` (binary tile classes, paper 000). ``auto``:
``wbce`` for point maps, ``bce_dice`` for masks, ``ce`` otherwise.

Scores (validation): every item is one decision, so detectors, segmenters and tile
classifiers share the same metrics. A dense item's **score** is the highest probability
in its central half (its truth: the target reaches 0.5 there), a tile item's the
probability of not being class 0. Reported: ``auc``, ``average_precision``, ``f1``,
``precision``, ``recall``, ``accuracy`` at the model's threshold,
``hard_negative_fp_rate`` (validation hard negatives, with no reviewed object in their
central half, still called positive),
``added_miss_recall`` and, for dense targets, ``dice`` (pixels ≥ threshold against
target ≥ 0.5) and the loss.

Crash- and cancel-safety: ``run_dir/checkpoint.pt`` (model, optimiser, epoch, best
weights, history, random state) is replaced atomically after every epoch and read back
with ``torch.load(weights_only=True)``; ``resume=True`` continues after the last finished
epoch. A cancelled run (``cancel`` set, or the generator closed) keeps that checkpoint
and registers nothing.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics
from ..atomic import write_json_atomic
from ..errors import HistoAIError
from ..models.spec import ModelSpec
from .augment import Augmentation, augment
from .datasets import IGNORE, TrainingTask, TrainItem, load_items, training_task

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOSSES",
    "FinetuneConfig",
    "FinetuneResult",
    "TrainProgress",
    "default_run_dir",
    "evaluate_version",
    "finetune",
    "finetune_sync",
    "plotted_history",
]

#: loss names by task kind
LOSSES: dict[str, tuple[str, ...]] = {
    "binary": ("auto", "wbce", "bce_dice"),
    "multiclass": ("auto", "ce"),
    "class": ("auto", "ce", "rare_hinge"),
}
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
SUMMARY = "summary.json"
#: metrics drawn in the comparison (rates in [0, 1]; counts and losses are left out)
PLOTTED_METRICS: tuple[str, ...] = (
    "f1",
    "precision",
    "recall",
    "auc",
    "average_precision",
    "hard_negative_fp_rate",
    "added_miss_recall",
    "dice",
    "pixel_accuracy",
)
#: per-epoch keys drawn in the training curves
PLOTTED_HISTORY: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_f1",
    "val_auc",
    "val_hard_negative_fp_rate",
    "val_added_miss_recall",
)
#: a progress record per batch at most this often (s), so the GUI is not flooded
_PROGRESS_EVERY_S = 0.2


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of one fine-tuning run (all JSON-able).

    Parameters
    ----------
    epochs : int
        At most this many epochs (early stopping may end sooner).
    learning_rate : float
        Adam's learning rate.
    batch_size : int
    steps_per_epoch : int or None
        Batches of the balanced pass; ``None``: training items / batch size (at least 1).
    flips, rotations : bool
        Random flips and 90° rotations.
    noise_sigma, stain_jitter : float
        Gaussian noise σ and stain (optical density) jitter σ; see `augment`.
    balanced : bool
        Draw ``positive_fraction`` of each batch from positives.
    positive_fraction : float
    negative_feed : bool
        Re-feed misclassified items (+ as many correct ones) after every epoch.
    hard_negative_weight : float
        Loss weight of hard negatives (removed false positives).
    loss : str
        See `LOSSES` and the module docstring.
    pos_weight : float
        ``wbce``: target pixels weigh ``1 + pos_weight·t`` (5, as the shipped mitosis FCN
        trains: a weight from the pixel ratio, ~50, made fine-tuned versions place 20 %
        more false points on the CMU-1 sample).
    freeze_batchnorm : bool
        Keep batch-norm layers' running statistics as the parent learnt them on its full
        training set (their affine weights still train): a few hundred patches are too
        few to re-estimate them.
    freeze_fraction : float
        Share of the network's parameter tensors, in definition order (the first layers),
        that stay as the parent's; 0 trains all.
    patience : int
        Epochs without a better validation loss before stopping; 0 = never stop early.
    val_fraction : float
        Share of each training set held out (fixed split; see `load_items`).
    seed : int
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    threads : int or None
        torch CPU threads while this run trains (``None``: leave torch's setting); the
        previous setting is restored afterwards. On a loaded 2-core machine one thread is
        often faster.
    """

    epochs: int = 6
    learning_rate: float = 3e-4
    batch_size: int = 16
    steps_per_epoch: int | None = None
    flips: bool = True
    rotations: bool = True
    noise_sigma: float = 0.02
    stain_jitter: float = 0.05
    balanced: bool = True
    positive_fraction: float = 1 / 3
    negative_feed: bool = True
    hard_negative_weight: float = 2.0
    loss: str = "auto"
    pos_weight: float = 5.0
    freeze_batchnorm: bool = True
    freeze_fraction: float = 0.0
    patience: int = 3
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (
                self.steps_per_epoch is None or self.steps_per_epoch >= 1,
                "steps_per_epoch must be at least 1",
            ),
            (0 < self.positive_fraction < 1, "positive_fraction must be in (0, 1)"),
            (self.noise_sigma >= 0 and self.stain_jitter >= 0, "sigmas must be >= 0"),
            (self.hard_negative_weight > 0, "hard_negative_weight must be positive"),
            (self.patience >= 0, "patience must be >= 0"),
            (self.pos_weight >= 0, "pos_weight must be >= 0"),
            (0 <= self.freeze_fraction < 1, "freeze_fraction must be in [0, 1)"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.threads is None or self.threads >= 1, "threads must be at least 1"),
        ]
        for ok, problem in checks:
            if not ok:
                raise HistoAIError(f"training configuration: {problem}")

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.flips, self.rotations, self.noise_sigma, self.stain_jitter)


@dataclass(frozen=True)
class TrainProgress:
    """One progress record.

    ``phase`` is ``prepare`` (data and the parent's scores), ``train`` (a batch of the
    balanced pass), ``feed`` (the negative feed), ``epoch`` (an epoch ended: ``history``
    gained its record), ``register`` or ``done``. ``history`` holds one dict per finished
    epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_<metric>``, ``feed_mistakes``,
    ``steps`` (optimiser steps, both passes), ``seconds``.
    """

    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None
    elapsed_s: float
    history: tuple[dict[str, float], ...] = ()
    message: str = ""

    @property
    def fraction(self) -> float:
        if self.phase == "done":
            return 1.0
        per_epoch = 1.0 / max(self.epochs, 1)
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (max(self.epoch - 1, 0) + within) * per_epoch)


@dataclass
class FinetuneResult:
    """What a run produced.

    Attributes
    ----------
    run_dir : Path
    spec : ModelSpec or None
        The registered new version (``None`` when cancelled or ``register=False``).
    before, after : dict of str to float
        Validation metrics of the parent and of the best epoch (same items).
    curves : dict of str to (y_true, scores)
        Validation scores of both (``"<name> <version>"``), for PR / ROC plots
        (`napari_histo_ai.plots`).
    confusion : dict of str to {"classes", "matrix"}
        Validation confusion matrices of both (rows: truth).
    history : list of dict
    best_epoch : int
    stopped_early, cancelled : bool
    improved : bool
        Some epoch beat the parent's validation loss (else the parent's weights are
        kept and nothing is registered).
    counts : dict of str to int
        Items by split and kind.
    seconds : float
    """

    run_dir: Path
    spec: ModelSpec | None
    before: dict[str, float]
    after: dict[str, float]
    curves: dict[str, tuple[list[int], list[float]]]
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool
    cancelled: bool
    improved: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    confusion: dict[str, dict[str, Any]] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (the run folder's ``summary.json``)."""
        return {
            "run_dir": str(self.run_dir),
            "model": self.spec.name if self.spec else None,
            "version": self.spec.version if self.spec else None,
            "weights": str(self.spec.weights) if self.spec and self.spec.weights else None,
            "before": self.before,
            "after": self.after,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "cancelled": self.cancelled,
            "improved": self.improved,
            "counts": self.counts,
            "seconds": round(self.seconds, 2),
            "history": self.history,
            "plots": [str(p) for p in self.plots],
        }


def default_run_dir(model: str) -> Path:
    """``<user data>/training-runs/<model>-<UTC time>``: a new folder for a new run."""
    import platformdirs

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root = Path(platformdirs.user_data_dir("napari-histo-ai")) / "training-runs"
    return root / f"{model}-{stamp}"


# ----------------------------------------------------------------------------- arrays
@dataclass
class _Data:
    """Normalised, cropped-to-size arrays of one split."""

    inputs: np.ndarray  # (N, C, S, S) float32, S = item side (>= window)
    targets: np.ndarray  # (N, S, S) float32 / int64, or (N,) int64
    kinds: np.ndarray  # (N,) str
    added: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def positive(self) -> np.ndarray:
        return np.asarray(self.kinds == "positive")


def _window(task: TrainingTask, spec: ModelSpec, items: Sequence[TrainItem]) -> int:
    """Training window side: a tile model's patch; dense: the largest multiple of
    ``size_multiple`` (× ``output_stride``) that fits every item, at most the patch."""
    side = min(min(it.image.shape[:2]) for it in items)
    if task.kind == "class":
        if side < spec.io.patch_size:
            raise HistoAIError(
                f"training patches of {side} px are smaller than model {spec.name!r}'s "
                f"{spec.io.patch_size} px input; export the training set with a larger "
                "patch size"
            )
        return spec.io.patch_size
    multiple = max(spec.io.size_multiple, spec.io.output_stride, 1)
    window = min(side, spec.io.patch_size) // multiple * multiple
    if window < max(16, multiple):
        raise HistoAIError(
            f"training patches of {side} px are too small for model {spec.name!r} "
            f"(at least {max(16, multiple)} px at {spec.io.mpp} µm/px); export the "
            "training set with a larger patch size"
        )
    return window


def _centre(array: np.ndarray, side: int) -> np.ndarray:
    h, w = array.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return array[top : top + side, left : left + side]


def _arrays(items: Sequence[TrainItem], spec: ModelSpec, task: TrainingTask, side: int) -> _Data:
    """Centre-crop every item to ``side`` and normalise it as the engine does."""
    from ..models.preprocessing import normalise

    if not items:
        c = spec.io.channels
        empty_t = np.zeros((0,) if task.kind == "class" else (0, side, side))
        return _Data(np.zeros((0, c, side, side), np.float32), empty_t, np.array([]), np.array([]))
    inputs = np.concatenate(
        [normalise(_centre(it.image, side)[None], spec.io.normalisation) for it in items]
    )
    if task.kind == "class":
        targets = np.asarray([int(it.target) for it in items], dtype=np.int64)
    else:
        dtype = np.int64 if task.kind == "multiclass" else np.float32
        targets = np.stack([_centre(np.asarray(it.target), side) for it in items]).astype(dtype)
    return _Data(
        inputs.astype(np.float32),
        targets,
        np.asarray([it.kind for it in items]),
        np.asarray([it.added_miss for it in items], dtype=bool),
    )


def _random_crop(
    data: _Data, index: np.ndarray, window: int, rng: np.random.Generator, task: TrainingTask
) -> tuple[np.ndarray, np.ndarray]:
    side = data.inputs.shape[-1]
    x = np.empty((len(index), data.inputs.shape[1], window, window), np.float32)
    dense = task.kind != "class"
    y = np.empty((len(index), window, window), data.targets.dtype) if dense else data.targets[index]
    # tile models: a small jitter only, the object stays where the label says
    slack = side - window if dense else min(side - window, max(2, window // 8))
    base = 0 if dense else (side - window - slack) // 2
    for j, i in enumerate(index):
        top = base + (int(rng.integers(slack + 1)) if slack > 0 else 0)
        left = base + (int(rng.integers(slack + 1)) if slack > 0 else 0)
        x[j] = data.inputs[i, :, top : top + window, left : left + window]
        if dense:
            y[j] = data.targets[i, top : top + window, left : left + window]
    return x, y


def _centre_crop(data: _Data, window: int, task: TrainingTask) -> tuple[np.ndarray, np.ndarray]:
    side = data.inputs.shape[-1]
    top = (side - window) // 2
    x = data.inputs[:, :, top : top + window, top : top + window]
    if task.kind == "class":
        return np.ascontiguousarray(x), data.targets
    y = data.targets[:, top : top + window, top : top + window]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


# ----------------------------------------------------------------------------- losses
def _resolve_loss(name: str, task: TrainingTask, targets: np.ndarray) -> str:
    allowed = LOSSES[task.kind]
    if name not in allowed:
        raise HistoAIError(
            f"loss {name!r} does not train a {task.kind} model; expected one of "
            f"{', '.join(allowed)}"
        )
    if name != "auto":
        return name
    if task.kind == "binary":
        soft = targets.size and np.any((targets > 0) & (targets < 1))
        return "wbce" if soft else "bce_dice"
    return "ce"


def _dense_logits(out: torch.Tensor, task: TrainingTask, side: int) -> Any:
    import torch.nn.functional as F

    logits = out[:, list(task.channels)]
    if logits.shape[-1] != side:  # strided output: compare at input resolution
        logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    return logits


def _loss(
    out: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    name: str,
    task: TrainingTask,
    spec: ModelSpec,
    pos_weight: float,
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    if task.kind == "class":
        logits = out.reshape(out.shape[0], -1)[:, list(task.channels)]
        if name == "rare_hinge":
            from .mitosis import rare_hinge_loss

            score = logits[:, 1] - logits[:, 0] if logits.shape[1] > 1 else logits[:, 0]
            return rare_hinge_loss(score, (y > 0).float())
        per = F.cross_entropy(logits, y, reduction="none")
        return (per * weights).sum() / weights.sum()
    logits = _dense_logits(out, task, y.shape[-1])
    w = weights.view(-1, 1, 1)
    if task.kind == "multiclass":
        per = F.cross_entropy(logits, y, reduction="none", ignore_index=IGNORE)
        valid = (y != IGNORE).float() * w
        return (per * valid).sum() / valid.sum().clamp_min(1.0)
    logit = logits[:, 0]
    if name == "wbce":
        pixel_w = (1 + pos_weight * y) * w
        return F.binary_cross_entropy_with_logits(logit, y, weight=pixel_w)
    bce = F.binary_cross_entropy_with_logits(logit, y, weight=w.expand_as(y))
    p = torch.sigmoid(logit)
    inter = (p * y).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + y.sum() + 1)
    return bce + dice


# ----------------------------------------------------------------------------- scoring
def _forward_all(
    module: torch.nn.Module, x: np.ndarray, device: Any, batch: int = 64
) -> np.ndarray:
    import torch

    outs = []
    was_training = module.training
    module.eval()
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            xb = torch.from_numpy(x[start : start + batch]).to(device)
            outs.append(module(xb).float().cpu().numpy())
    if was_training:
        module.train()
    if not outs:
        return np.zeros((0,), np.float32)
    return np.concatenate(outs)


def _probabilities(raw: np.ndarray, spec: ModelSpec, task: TrainingTask, side: int) -> np.ndarray:
    """Dense: (N, K', side, side) probabilities of the task channels; class: (N, K')."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(raw)
    if task.kind == "class":
        logits = t.reshape(t.shape[0], -1)[:, list(task.channels)]
    else:
        logits = _dense_logits(t, task, side)
    if (
        spec.activation == "softmax"
        or task.kind in ("multiclass",)
        or (task.kind == "class" and spec.activation != "sigmoid")
    ):
        return F.softmax(logits, dim=1).numpy()
    if spec.activation == "none":
        return logits.numpy()
    return torch.sigmoid(logits).numpy()


def _item_scores(
    prob: np.ndarray, targets: np.ndarray, task: TrainingTask
) -> tuple[np.ndarray, np.ndarray]:
    """Per item (truth 0/1, score): central-half maximum for dense maps."""
    if task.kind == "class":
        truth = (targets > 0).astype(int)
        score = 1.0 - prob[:, 0] if prob.shape[1] > 1 else prob[:, 0]
        return truth, score
    side = targets.shape[-1]
    q = side // 4
    centre = (slice(None), slice(q, side - q), slice(q, side - q))
    if task.kind == "multiclass":
        background = [i for i, c in enumerate(task.classes) if c.lower() == "background"]
        keep = [i for i in range(prob.shape[1]) if i not in background]
        fg = prob[:, keep].max(axis=1)
        truth_map = np.isin(targets, keep) & (targets != IGNORE)
        return truth_map[centre].reshape(len(targets), -1).any(1).astype(int), fg[centre].reshape(
            len(targets), -1
        ).max(1)
    truth = (targets[centre] >= 0.5).reshape(len(targets), -1).any(1).astype(int)
    score = prob[:, 0][centre].reshape(len(targets), -1).max(1)
    return truth, score


def _score(
    module: torch.nn.Module,
    data: _Data,
    *,
    spec: ModelSpec,
    task: TrainingTask,
    window: int,
    device: Any,
    loss_name: str,
    pos_weight: float,
) -> _Evaluation:
    """Validation metrics, with the items' truth and scores and a confusion matrix."""
    import torch

    if not len(data):
        return _Evaluation({}, np.zeros(0, int), np.zeros(0), np.zeros((0, 0), int), [])
    x, y = _centre_crop(data, window, task)
    raw = _forward_all(module, x, device)
    # balanced by kind: the mean of the positives', the negatives' and the hard
    # negatives' loss, so 50 corrections weigh as much as 500 rehearsal items
    parts = []
    with torch.no_grad():
        for kind in ("positive", "negative", "hard_negative"):
            group = np.asarray(data.kinds == kind)
            if group.any():
                parts.append(
                    float(
                        _loss(
                            torch.from_numpy(raw[group]),
                            torch.from_numpy(y[group]),
                            torch.ones(int(group.sum())),
                            name=loss_name,
                            task=task,
                            spec=spec,
                            pos_weight=pos_weight,
                        )
                    )
                )
    loss = float(np.mean(parts))
    prob = _probabilities(raw, spec, task, window)
    truth, score = _item_scores(prob, y, task)
    called = score >= task.threshold
    out: dict[str, float] = {"loss": loss, "items": float(len(x))}
    tp = float(np.sum(called & (truth == 1)))
    fp = float(np.sum(called & (truth == 0)))
    fn = float(np.sum(~called & (truth == 1)))
    out.update(metrics.prf(tp, fp, fn))
    out["accuracy"] = float(np.mean(called == (truth == 1)))
    if 0 < truth.sum() < len(truth):
        out["auc"] = metrics.roc_auc(truth, score)
        order = np.argsort(-score, kind="stable")
        out["average_precision"] = metrics.average_precision(
            score[order], truth[order].astype(bool), int(truth.sum())
        )
    # hard negatives whose central half holds no reviewed object (a correct one may lie
    # beside a removed false positive)
    hard = (data.kinds == "hard_negative") & (truth == 0)
    if hard.any():
        out["hard_negative_fp_rate"] = float(np.mean(called[hard]))
    if data.added.any():
        out["added_miss_recall"] = float(np.mean(called[data.added]))
    if task.kind == "binary":
        out["dice"] = metrics.dice(prob[:, 0] >= task.threshold, y >= 0.5)
    elif task.kind == "multiclass":
        valid = y != IGNORE
        out["pixel_accuracy"] = (
            float(np.mean(prob.argmax(1)[valid] == y[valid])) if valid.any() else 0.0
        )
    if task.kind == "binary":
        classes = [
            f"not {task.classes[0]}" if task.classes else "negative",
            task.classes[0] if task.classes else "positive",
        ]
        matrix = metrics.confusion_matrix(truth, called.astype(int), n_classes=2)
    elif task.kind == "class":
        classes = list(task.classes)
        matrix = metrics.confusion_matrix(y, prob.argmax(1), n_classes=len(classes))
    else:
        classes = list(task.classes)
        valid = y != IGNORE
        matrix = metrics.confusion_matrix(y[valid], prob.argmax(1)[valid], n_classes=len(classes))
    return _Evaluation(out, truth, score, np.asarray(matrix), classes)


@dataclass
class _Evaluation:
    metrics: dict[str, float]
    truth: np.ndarray
    scores: np.ndarray
    confusion: np.ndarray
    classes: list[str]


def _mistakes(
    module: torch.nn.Module,
    data: _Data,
    *,
    spec: ModelSpec,
    task: TrainingTask,
    window: int,
    device: Any,
) -> np.ndarray:
    """Indices of training items the model gets wrong (central-half decision)."""
    x, y = _centre_crop(data, window, task)
    prob = _probabilities(_forward_all(module, x, device), spec, task, window)
    truth, score = _item_scores(prob, y, task)
    return np.flatnonzero((score >= task.threshold) != (truth == 1))


# ----------------------------------------------------------------------------- state
def _config_key(
    spec: ModelSpec, sources: Sequence[str | Path], config: FinetuneConfig
) -> dict[str, Any]:
    return {
        "model": spec.name,
        "version": spec.version,
        "fingerprint": spec.fingerprint(),
        "sources": [str(Path(s).expanduser().resolve()) for s in sources],
        "config": asdict(config),
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    from ..atomic import atomic_open

    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file
        raise HistoAIError(
            f"{path}: not a readable training checkpoint ({exc}); start a new run"
        ) from None
    return state


def _trainable(module: torch.nn.Module, fraction: float) -> list[Any]:
    """The parameters to train: all but the first ``fraction`` of the tensors."""
    params = list(module.parameters())
    frozen = int(len(params) * fraction)
    for p in params[:frozen]:
        p.requires_grad_(False)
    return params[frozen:]


def _train_mode(module: torch.nn.Module, *, freeze_batchnorm: bool) -> None:
    import torch

    module.train()
    if freeze_batchnorm:
        for layer in module.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()


def _state_copy(module: torch.nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _counts(items: Sequence[TrainItem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for it in items:
        key = f"{it.split}_{it.kind}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- the run
def finetune(
    spec: ModelSpec,
    sources: Sequence[str | Path],
    *,
    config: FinetuneConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    register: bool = True,
    models_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
) -> Generator[TrainProgress, None, FinetuneResult]:
    """Fine-tune ``spec`` on ``sources``; see the module docstring.

    Parameters
    ----------
    spec : ModelSpec
        The registered parent model (its weights are the starting point).
    sources : sequence of str or Path
        Training-set folders and folders of real data (`load_items`).
    config : FinetuneConfig, optional, keyword-only
    run_dir : str or Path, optional, keyword-only
        Folder of this run's config, checkpoint, history and plots; default
        `default_run_dir`.
    resume : bool, keyword-only
        Continue the run in ``run_dir`` from its checkpoint (its config must match).
    register : bool, keyword-only
        Register the result as a new version (`register_version`).
    models_dir : str or Path, optional, keyword-only
        Where new versions are registered; default the user model folder.
    cancel : threading.Event, optional, keyword-only
        Set it to stop after the current batch (the last epoch's checkpoint stays).

    Yields
    ------
    TrainProgress

    Returns
    -------
    FinetuneResult

    Raises
    ------
    HistoAIError
        Data that cannot train the model (see `load_items`), a bad configuration, a
        resume whose run folder was made with other data or options.
    """
    config = config or FinetuneConfig()
    threads = config.threads
    run = _finetune(
        spec,
        sources,
        config=config,
        run_dir=run_dir,
        resume=resume,
        register=register,
        models_dir=models_dir,
        cancel=cancel,
    )
    if not threads:
        return (yield from run)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # the process-wide setting: inference after training gets its threads back
        return (yield from run)
    finally:
        torch.set_num_threads(previous)


def _finetune(
    spec: ModelSpec,
    sources: Sequence[str | Path],
    *,
    config: FinetuneConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    register: bool = True,
    models_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
) -> Generator[TrainProgress, None, FinetuneResult]:
    """`finetune` without the thread setting."""
    import torch

    from ..models.loading import load_model, resolve_device

    config = config or FinetuneConfig()
    cancel = cancel or threading.Event()
    start = time.perf_counter()
    sources = [str(s) for s in sources]
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(spec.name)
    key = _config_key(spec, sources, config)
    checkpoint_path = run_dir / CHECKPOINT
    if resume:
        config_file = run_dir / CONFIG
        if not config_file.is_file() or not checkpoint_path.is_file():
            raise HistoAIError(f"{run_dir}: no checkpoint to resume; start a new run")
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        if saved != json.loads(json.dumps(key)):
            changed = [k for k in key if saved.get(k) != json.loads(json.dumps(key[k]))]
            raise HistoAIError(
                f"{run_dir}: was started with other {', '.join(changed)}; resume it with "
                "the same model, data and options, or start a new run"
            )
    task = training_task(spec)

    def progress(
        phase: str, epoch: int, step: int, steps: int, loss: float | None, message: str = ""
    ) -> TrainProgress:
        return TrainProgress(
            phase,
            epoch,
            config.epochs,
            step,
            steps,
            loss,
            time.perf_counter() - start,
            tuple(history),
            message,
        )

    history: list[dict[str, float]] = []
    yield progress("prepare", 0, 0, 0, None, "reading the training data")
    items = load_items(sources, spec, val_fraction=config.val_fraction)
    window = _window(task, spec, items)
    side = min(min(it.image.shape[:2]) for it in items)
    train = _arrays([it for it in items if it.split == "train"], spec, task, side)
    val = _arrays([it for it in items if it.split == "val"], spec, task, side)
    loss_name = _resolve_loss(config.loss, task, train.targets)
    pos_weight = config.pos_weight
    device = resolve_device(config.device)
    predictor = load_model(spec, device=device, autocast=False)
    module: torch.nn.Module = predictor.module  # type: ignore[attr-defined]
    module = module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG, key)

    score_args = dict(
        spec=spec,
        task=task,
        window=window,
        device=device,
        loss_name=loss_name,
        pos_weight=pos_weight,
    )
    yield progress("prepare", 0, 0, 0, None, f"scoring {spec.name} {spec.version} (before)")
    scored_before = _score(module, val, **score_args)  # type: ignore[arg-type]
    before = scored_before.metrics

    trainable = _trainable(module, config.freeze_fraction)
    optimiser = torch.optim.Adam(trainable, lr=config.learning_rate)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    first_epoch = 1
    best_state = _state_copy(module)
    best_loss = before.get("loss", math.inf) if len(val) else math.inf
    best_epoch = 0
    stale = 0
    if resume:
        state = _load_checkpoint(checkpoint_path)
        module.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        best_state = state["best_state"]
        best_loss, best_epoch, stale = (
            float(state["best_loss"]),
            int(state["best_epoch"]),
            int(state["stale"]),
        )
        history = [dict(h) for h in json.loads(state["history"])]
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        first_epoch = int(state["epoch"]) + 1

    weights_all = np.where(train.kinds == "hard_negative", config.hard_negative_weight, 1.0)
    steps = config.steps_per_epoch or max(1, math.ceil(len(train) / config.batch_size))
    od_space = spec.io.normalisation.method == "scale" and spec.io.channels == 3
    stopped_early = False
    cancelled = False

    def batches(order: np.ndarray) -> Generator[np.ndarray, None, None]:
        for s in range(0, len(order), config.batch_size):
            yield order[s : s + config.batch_size]

    def balanced_plan(pool: np.ndarray, n_steps: int) -> list[np.ndarray]:
        """Batches from ``pool``: ``positive_fraction`` positives each when balanced."""
        pos = pool[train.positive[pool]]
        neg = pool[~train.positive[pool]]
        if config.balanced and len(pos) and len(neg):
            n_pos = max(1, round(config.batch_size * config.positive_fraction))
            n_neg = max(1, config.batch_size - n_pos)
            return [
                np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, n_neg)])
                for _ in range(n_steps)
            ]
        order = rng.permutation(pool)
        return list(batches(np.resize(order, n_steps * config.batch_size)))

    def train_step(index: np.ndarray) -> float:
        x, y = _random_crop(train, index, window, rng, task)
        dense_y = None if task.kind == "class" else y
        x, dense_y = augment(x, dense_y, rng, config.augmentation, od_space=od_space)
        yt = torch.from_numpy(y if dense_y is None else dense_y).to(device)
        out = module(torch.from_numpy(x).to(device))
        w = torch.from_numpy(weights_all[index].astype(np.float32)).to(device)
        loss = _loss(out, yt, w, name=loss_name, task=task, spec=spec, pos_weight=pos_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    epoch = first_epoch - 1
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        _train_mode(module, freeze_batchnorm=config.freeze_batchnorm)
        plan = balanced_plan(np.arange(len(train)), steps)
        losses = []
        last = 0.0
        for step, index in enumerate(plan, 1):
            if cancel.is_set():
                cancelled = True
                break
            losses.append(train_step(index))
            now = time.perf_counter()
            if now - last > _PROGRESS_EVERY_S or step == len(plan):
                last = now
                yield progress("train", epoch, step, len(plan), float(np.mean(losses)))
        if cancelled:
            break
        mistakes = 0
        if config.negative_feed:
            wrong = _mistakes(module, train, spec=spec, task=task, window=window, device=device)
            mistakes = len(wrong)
            if mistakes:
                right = np.setdiff1d(np.arange(len(train)), wrong)
                extra = (
                    rng.choice(right, min(len(right), mistakes), replace=False)
                    if len(right)
                    else right
                )
                pool = np.concatenate([wrong, extra])
                _train_mode(module, freeze_batchnorm=config.freeze_batchnorm)
                feed = balanced_plan(pool, max(1, math.ceil(len(pool) / config.batch_size)))
                for step, index in enumerate(feed, 1):
                    if cancel.is_set():
                        cancelled = True
                        break
                    losses.append(train_step(index))
                    yield progress(
                        "feed",
                        epoch,
                        step,
                        len(feed),
                        float(np.mean(losses)),
                        f"negative feed: {mistakes} mistakes",
                    )
            if cancelled:
                break
        scores = _score(module, val, **score_args).metrics  # type: ignore[arg-type]
        record: dict[str, float] = {"epoch": float(epoch), "train_loss": float(np.mean(losses))}
        record.update({f"val_{k}": v for k, v in scores.items() if k != "items"})
        record["feed_mistakes"] = float(mistakes)
        record["steps"] = float(len(losses))
        record["seconds"] = round(time.perf_counter() - epoch_start, 3)
        history.append(record)
        monitored = scores.get("loss", record["train_loss"])
        if monitored < best_loss - 1e-6:
            best_loss, best_epoch, stale = monitored, epoch, 0
            best_state = _state_copy(module)
        else:
            stale += 1
        _save_checkpoint(
            checkpoint_path,
            {
                "model": _state_copy(module),
                "optimizer": optimiser.state_dict(),
                "epoch": epoch,
                "best_state": best_state,
                "best_loss": float(best_loss),
                "best_epoch": best_epoch,
                "stale": stale,
                "history": json.dumps(history),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "torch_rng": torch.get_rng_state(),
            },
        )
        write_json_atomic(run_dir / "history.json", history)
        yield progress(
            "epoch",
            epoch,
            len(plan),
            len(plan),
            record["train_loss"],
            f"epoch {epoch}: val loss {monitored:.4f}",
        )
        if config.patience and stale >= config.patience and epoch < config.epochs:
            stopped_early = True
            break

    result = FinetuneResult(
        run_dir=run_dir,
        spec=None,
        before=before,
        after={},
        curves={},
        history=history,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        cancelled=cancelled,
        counts=_counts(items),
    )
    if cancelled:
        result.seconds = time.perf_counter() - start
        write_json_atomic(run_dir / SUMMARY, result.summary())
        return result
    module.load_state_dict(best_state)
    scored_after = _score(module, val, **score_args)  # type: ignore[arg-type]
    after = scored_after.metrics
    result.after = after
    result.improved = best_epoch > 0
    if register and result.improved:
        from .versions import register_version

        yield progress("register", epoch, 0, 0, None, "registering the new version")
        training = {
            **key,
            "run_dir": str(run_dir),
            "best_epoch": best_epoch,
            "stopped_early": stopped_early,
            "counts": result.counts,
            "before": before,
            "after": after,
        }
        result.spec = register_version(
            spec, module, training=training, metrics=after, models_dir=models_dir
        )
    labels = (
        f"{spec.name} {spec.version}",
        f"{result.spec.name} {result.spec.version}" if result.spec else "fine-tuned",
    )
    if len(val):
        for label, scored in zip(labels, (scored_before, scored_after), strict=True):
            result.curves[label] = (scored.truth.tolist(), scored.scores.tolist())
            result.confusion[label] = {
                "classes": scored.classes,
                "matrix": scored.confusion.astype(int).tolist(),
            }
    result.seconds = time.perf_counter() - start
    result.plots = _write_plots(result, run_dir)
    write_json_atomic(run_dir / SUMMARY, result.summary())
    yield progress("done", epoch, 0, 0, None, "done")
    return result


def plotted_history(history: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """The per-epoch records with only the curves worth drawing (`PLOTTED_HISTORY`)."""
    return [{k: v for k, v in h.items() if k in PLOTTED_HISTORY} for h in history]


def _write_plots(result: FinetuneResult, run_dir: Path) -> list[Path]:
    """Training curves, before/after comparison and PR / ROC PNGs in the run folder."""
    from .. import plots

    written = [
        plots.save_figure(
            plots.training_curves_figure(plotted_history(result.history), title="fine-tuning"),
            run_dir / "training_curves.png",
        )
    ]
    if result.curves:
        names = list(result.curves)
        shared = {
            names[0]: {k: v for k, v in result.before.items() if k in PLOTTED_METRICS},
            names[-1]: {k: v for k, v in result.after.items() if k in PLOTTED_METRICS},
        }
        written.append(
            plots.save_figure(
                plots.comparison_figure(shared, curves=result.curves, title="validation"),
                run_dir / "comparison.png",
            )
        )
        evaluation = {
            "curves": {k: {"y_true": t, "scores": v} for k, (t, v) in result.curves.items()},
            "confusion": result.confusion,
        }
        written += plots.evaluation_plots(evaluation, run_dir, stem="validation")
    return written


def finetune_sync(spec: ModelSpec, sources: Sequence[str | Path], **kwargs: Any) -> FinetuneResult:
    """Drive `finetune` to its end in this thread (CLI, tests, scripts)."""
    from .common import run_to_end

    return run_to_end(finetune(spec, sources, **kwargs))


def evaluate_version(
    specs: Sequence[ModelSpec],
    sources: Sequence[str | Path],
    *,
    val_fraction: float = 0.2,
    device: str = "auto",
    split: str = "val",
) -> dict[str, Any]:
    """Score model versions side by side on the same fixed validation items.

    Parameters
    ----------
    specs : sequence of ModelSpec
        Versions of one task (the first one's task and µm/px choose the items).
    sources : sequence of str or Path
        Training sets / data folders (`load_items`).
    split : {"val", "train", "all"}, keyword-only
        Which items to score (the fixed validation split by default).

    Returns
    -------
    dict
        ``{"items": n, "split": ..., "metrics": {"<name> <version>": {...}}, "curves":
        {...: {"y_true": [...], "scores": [...]}}, "confusion": {...: {"classes",
        "matrix"}}}`` (JSON-able; `napari_histo_ai.plots.evaluation_plots` draws it).
    """
    from ..models.loading import load_model

    if not specs:
        raise HistoAIError("no model versions to compare")
    reference = specs[0]
    task = training_task(reference)
    items = load_items(sources, reference, val_fraction=val_fraction)
    chosen = [it for it in items if split == "all" or it.split == split]
    if not chosen:
        raise HistoAIError(f"no {split} items in {', '.join(map(str, sources))}")
    window = _window(task, reference, chosen)
    side = min(min(it.image.shape[:2]) for it in chosen)
    out: dict[str, Any] = {
        "items": len(chosen),
        "split": split,
        "metrics": {},
        "curves": {},
        "confusion": {},
    }
    for spec in specs:
        other = training_task(spec)
        if (other.kind, spec.io.mpp, spec.io.channels) != (
            task.kind,
            reference.io.mpp,
            reference.io.channels,
        ):
            raise HistoAIError(
                f"{spec.name} and {reference.name} are not versions of one task "
                "(different targets, µm/px or channels); compare versions of one model"
            )
        data = _arrays(chosen, spec, task, side)
        predictor = load_model(spec, device=device, autocast=False)
        module = predictor.module  # type: ignore[attr-defined]
        loss_name = _resolve_loss("auto", task, data.targets)
        pos_weight = FinetuneConfig().pos_weight
        scored = _score(
            module,
            data,
            spec=spec,
            task=task,
            window=window,
            device=predictor.device,
            loss_name=loss_name,
            pos_weight=pos_weight,
        )
        label = f"{spec.name} {spec.version}"
        out["metrics"][label] = scored.metrics
        out["curves"][label] = {
            "y_true": scored.truth.tolist(),
            "scores": scored.scores.tolist(),
        }
        out["confusion"][label] = {
            "classes": scored.classes,
            "matrix": scored.confusion.astype(int).tolist(),
        }
    return out
