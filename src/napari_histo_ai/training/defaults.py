"""The shipped default models: which training module reproduces and evaluates each.

Data, not code: `TASKS` maps a ``train-default`` task name to the module that trains it
and the registry models it produces. Every training module follows one contract:

* ``main(argv) -> int`` parses ``--data DIR --out FILE [--seed N] [--epochs N]``, trains
  (seeded), writes ``FILE`` (float32 safetensors, atomically) and a JSON record beside it
  (metrics, split, seed, command, data hashes), and returns an exit status;
* ``evaluate(data_dir, *, model, weights=None) -> dict`` scores a registered model (or
  the weights file given) on the held-out part of the labelled folder ``data_dir`` and
  returns JSON-able metrics with the split they were computed on.

Nothing is imported until a task runs (torch stays out of ``--help``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import HistoAIError

__all__ = ["TASKS", "DefaultTask", "evaluate_model", "task_for_model", "train_default"]


@dataclass(frozen=True)
class DefaultTask:
    """One reproducible default: its training module and the models it feeds."""

    name: str
    module: str
    models: tuple[str, ...]
    data: str
    summary: str
    #: arguments passed to the module's ``main`` before the user's (e.g. which network)
    args: tuple[str, ...] = ()


TASKS: dict[str, DefaultTask] = {
    t.name: t
    for t in (
        DefaultTask(
            "nuclei",
            "napari_histo_ai.training.nuclei",
            ("nuclei-unet",),
            "miccai_nuclei_seg",
            "nucleus U-Net on the MICCAI 2015 tiles",
        ),
        DefaultTask(
            "mitosis",
            "napari_histo_ai.training.mitosis",
            ("mitosis-convnet", "mitosis-fcn"),
            "ami_br_mitosis",
            "mitosis tile classifier and dense FCN on the AMi-Br crops (paper 000)",
        ),
        DefaultTask(
            "idc",
            "napari_histo_ai.training.tissue",
            ("idc-tumour",),
            "idc_breast_patches",
            "tumour vs not patch model on the IDC patches (papers 000-002)",
            ("--model", "idc-tumour"),
        ),
        DefaultTask(
            "tissue",
            "napari_histo_ai.training.tissue",
            ("tissue-fcn",),
            "idc_breast_patches",
            "3-class cancer / other tissue / background FCN on weak labels from the IDC "
            "patches (paper 001)",
            ("--model", "tissue-fcn"),
        ),
        DefaultTask(
            "breakhis",
            "napari_histo_ai.training.benign_malignant",
            ("breakhis-resnet",),
            ".",
            "benign / malignant ResNet on IDC + BreakHis (paper 002)",
        ),
        DefaultTask(
            "mri",
            "napari_histo_ai.training.mri",
            ("mri-unet",),
            "brats2015_mri",
            "2D U-Net over MRI slices on BraTS 2015 (paper 003)",
        ),
        DefaultTask(
            "mammogram",
            "napari_histo_ai.training.mammogram",
            ("mias-mass-detector",),
            "mini_mias",
            "mass detector with boxes, masks and class on mini-MIAS (paper 002)",
        ),
        DefaultTask(
            "magnification",
            "napari_histo_ai.training.magnification",
            ("magnification-shallownet",),
            ".",
            "ShallowNet magnification regression with nucleus-area fusion (paper 004)",
        ),
    )
}


def _module(task: DefaultTask) -> ModuleType:
    try:
        return importlib.import_module(task.module)
    except ImportError as exc:
        raise HistoAIError(
            f"train-default {task.name}: module {task.module} cannot be imported ({exc})"
        ) from exc


def train_default(task: str, argv: list[str]) -> int:
    """Run ``task``'s training module with command-line arguments ``argv``."""
    if task not in TASKS:
        raise HistoAIError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    status: int = _module(TASKS[task]).main([*TASKS[task].args, *argv])
    return status


def task_for_model(model: str) -> DefaultTask:
    """The default task whose module evaluates the registered model ``model``.

    A fine-tuned version (``mitosis-fcn-v2``) is evaluated by its lineage root's task.
    """
    for task in TASKS.values():
        if model in task.models:
            return task
    from ..models.registry import load_registry
    from .versions import lineage_root

    registry = load_registry()
    if model in registry:
        root = lineage_root(registry, model)
        for task in TASKS.values():
            if root in task.models:
                return task
    known = ", ".join(m for t in TASKS.values() for m in t.models)
    raise HistoAIError(
        f"model {model!r} has no evaluator: expected one of {known} "
        "(a model of your own is evaluated by the task it was derived from)"
    )


def evaluate_model(
    model: str, data_dir: str | Path, *, weights: Path | None = None
) -> dict[str, Any]:
    """Metrics of registered model ``model`` on the labelled folder ``data_dir`` (JSON-able)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HistoAIError(f"{data_dir}: not a folder (expected the labelled data folder)")
    module = _module(task_for_model(model))
    result: dict[str, Any] = module.evaluate(data_dir, model=model, weights=weights)
    return result
