"""Training items for fine-tuning a registered model: from training-set manifests and
folders of real data, at the model's resolution, with a fixed validation split.

A `TrainItem` is one patch (``(H, W, C)`` at the model's µm/px) with its target in the
form the model's task trains on (`TrainingTask`):

``binary``
    dense sigmoid models with one channel (mitosis-fcn, nuclei-unet, mri-unet): a
    ``float32 (H, W)`` map in [0, 1]: a training set's ``points`` target as it is (the
    Gaussian map of the reviewed objects), a ``mask`` target as ``1`` where the mask
    holds the model's class (by name; any non-zero label when no name matches), a
    ``boxes`` target as the filled boxes.
``multiclass``
    dense softmax models (tissue-fcn): an ``int64 (H, W)`` map of the model's channel
    indices, ``IGNORE`` (-100) where the label's class name is not one of the model's.
    Label 0 (unlabelled) maps to a model class named ``background`` when there is one.
``class``
    tile classifiers (mitosis-convnet, idc-tumour, breakhis-resnet): an ``int`` channel
    index: 0 for negatives and hard negatives, for positives the model class named like
    the object's class, else 1 (binary models).

Models whose outputs a training set cannot supervise are refused with a message naming
the model and what to use instead: box detectors (mias-mass-detector: boxes need box
regression targets) and magnification estimators (a training set carries no
magnification labels; use ``napari-histo-ai train-default magnification``).

Data sources
------------
* a training-set folder (or its ``manifest.json``) written by `export_training_set`;
* the AMi-Br mitosis crops (a folder with ``AMI-BR.csv``), for models of the mitosis
  task: every crop with its ``exp(-a·d)`` map (the default models' own targets), split
  slide-disjoint as in ``train-default mitosis`` (its held-out crops are validation
  items, never trained on). Mixing them in keeps a fine-tune from forgetting what the
  model knew (rehearsal).

Validation split
----------------
Fixed, so that every version of a model is compared on the same items: a manifest's
sample goes to validation when the SHA-256 of ``<image content hash>:<block row>:<block
column>`` (blocks of 2 patch sides, so neighbouring, overlapping patches go together)
falls below ``val_fraction``; a kind of sample (positive, negative, hard negative) with
at least 5 items of which the hash held none out (its objects fell in few blocks) has its
lowest-hash blocks held out until ``val_fraction`` of it is, so the corrections are
always among the items every version is judged on. AMi-Br items follow their
slide-disjoint split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HistoAIError
from ..models.spec import ModelSpec

__all__ = [
    "IGNORE",
    "TrainItem",
    "TrainingTask",
    "load_items",
    "training_task",
]

#: target value ignored by the multi-class loss (torch's default ignore_index)
IGNORE = -100
#: relative µm/px difference below which patches are used as they are
_MPP_TOLERANCE = 0.02
#: validation blocks are this many patch sides wide
_BLOCK_PATCHES = 2
#: side (model px) of the MICCAI negative windows that come with the AMi-Br crops
MICCAI_NEGATIVE_SIDE = 64
#: a kind of sample this frequent always has some validation items
_MIN_KIND_FOR_VAL = 5


@dataclass(frozen=True)
class TrainingTask:
    """What a model's fine-tune trains: the kind of target and which output channels.

    Parameters
    ----------
    kind : {"binary", "multiclass", "class"}
    channels : tuple of int
        The network's output channels the loss reads.
    classes : tuple of str
        A name per channel (``binary``: the foreground class).
    threshold : float
        Probability above which the model calls a pixel or tile positive.
    """

    kind: str
    channels: tuple[int, ...]
    classes: tuple[str, ...]
    threshold: float = 0.5


@dataclass
class TrainItem:
    """One training patch at the model's resolution.

    Parameters
    ----------
    image : ndarray, shape (H, W, C)
        As read (uint8 RGB for slides), at the model's µm/px.
    target : ndarray or int
        See the module docstring (``binary``: float32 (H, W); ``multiclass``: int64
        (H, W); ``class``: int).
    kind : {"positive", "negative", "hard_negative"}
    split : {"train", "val"}
    source : str
        Where it came from (``<manifest folder>#<row>`` or ``ami_br:<crop>``).
    added_miss : bool
        A human-added object (a miss of the model).
    """

    image: np.ndarray
    target: np.ndarray | int
    kind: str
    split: str
    source: str
    added_miss: bool = False


def training_task(spec: ModelSpec) -> TrainingTask:
    """The target kind a training set gives ``spec``, or a clear refusal.

    Raises
    ------
    HistoAIError
        ONNX and TorchScript files (no trainable architecture), box detectors and
        magnification estimators (see the module docstring).
    """
    if spec.format in ("onnx", "torchscript"):
        raise HistoAIError(
            f"model {spec.name!r} is a {spec.format} file: it has no architecture this "
            "program can fine-tune; register it as safetensors with its architecture"
        )
    kinds = {o.kind for o in spec.outputs}
    if "boxes" in kinds:
        raise HistoAIError(
            f"model {spec.name!r} detects boxes: fine-tuning it needs box-regression "
            "targets this program does not build yet; retrain it with "
            "`napari-histo-ai train-default mammogram`"
        )
    if "magnification" in kinds:
        raise HistoAIError(
            f"model {spec.name!r} estimates magnification: a training set carries no "
            "magnification labels; retrain it with `napari-histo-ai train-default "
            "magnification`"
        )
    if spec.dense:
        out = next((o for o in spec.outputs if o.kind in ("probability", "mask")), None)
        out = out or spec.outputs[0]
        classes = tuple(out.classes) or tuple(f"class {c}" for c in out.channels)
        if spec.activation == "softmax" or len(out.channels) > 1:
            return TrainingTask("multiclass", tuple(out.channels), classes, out.threshold)
        thresholds = [o.threshold for o in spec.outputs if o.kind in ("points", "mask")]
        threshold = thresholds[0] if thresholds else out.threshold
        return TrainingTask("binary", (out.channels[0],), classes[:1], threshold)
    out = next((o for o in spec.outputs if o.kind == "class"), None)
    if out is None:
        raise HistoAIError(
            f"model {spec.name!r} has no class output to train (outputs: "
            f"{', '.join(o.kind for o in spec.outputs)})"
        )
    classes = tuple(out.classes) or tuple(f"class {c}" for c in out.channels)
    return TrainingTask("class", tuple(out.channels), classes, out.threshold)


# --------------------------------------------------------------------------- resampling
def _rescale(array: np.ndarray, factor: float, *, order: int) -> np.ndarray:
    """Resample (H, W[, C]) by ``factor`` (anti-aliased when shrinking a smooth image)."""
    from skimage.transform import rescale

    if abs(factor - 1.0) <= _MPP_TOLERANCE:
        return array
    channel_axis = 2 if array.ndim == 3 else None
    out = rescale(
        array.astype(np.float32),
        factor,
        order=order,
        channel_axis=channel_axis,
        anti_aliasing=order > 0 and factor < 1,
        preserve_range=True,
    )
    if array.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(array.dtype)


def _block_value(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _hold_out_every_kind(items: list[TrainItem], values: list[float], val_fraction: float) -> None:
    """A kind of sample (positive, negative, hard negative) with at least
    `_MIN_KIND_FOR_VAL` items but none held out by the hash (its objects fell in few
    blocks) gets its lowest-hash blocks held out, until ``val_fraction`` of it is."""
    if val_fraction <= 0:
        return
    for kind in {it.kind for it in items}:
        members = [i for i, it in enumerate(items) if it.kind == kind]
        if len(members) < _MIN_KIND_FOR_VAL or any(items[i].split == "val" for i in members):
            continue
        wanted = max(1, round(val_fraction * len(members)))
        held = 0
        for value in sorted({values[i] for i in members}):
            block = [i for i in range(len(items)) if values[i] == value]
            for i in block:
                items[i].split = "val"
            held += sum(items[i].kind == kind for i in block)
            if held >= wanted:
                break


# --------------------------------------------------------------------------- targets
def _class_index(task: TrainingTask, name: str) -> int | None:
    lowered = [c.lower() for c in task.classes]
    return lowered.index(name.lower()) if name and name.lower() in lowered else None


def _binary_from_labels(labels: np.ndarray, values: dict[str, str], task: TrainingTask) -> Any:
    wanted = task.classes[0].lower() if task.classes else ""
    matching = [int(v) for v, name in values.items() if name.lower() == wanted]
    if matching:
        return np.isin(labels, matching).astype(np.float32)
    return (labels > 0).astype(np.float32)


def _multiclass_from_labels(
    labels: np.ndarray, values: dict[str, str], task: TrainingTask, where: Path
) -> np.ndarray:
    out = np.full(labels.shape, IGNORE, dtype=np.int64)
    background = _class_index(task, "background")
    if background is not None:
        out[labels == 0] = background
    matched = background is not None
    for value, name in values.items():
        index = _class_index(task, name)
        if index is not None:
            out[labels == int(value)] = index
            matched = True
    if not matched:
        raise HistoAIError(
            f"{where}: none of the training set's classes "
            f"({', '.join(values.values()) or 'none'}) is one of the model's "
            f"({', '.join(task.classes)}); name the annotation classes like the model's"
        )
    return out


def _boxes_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        boxes = [b["box"] for b in data["boxes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HistoAIError(f"{path}: not a boxes target ({exc}); export again") from None
    mask = np.zeros(shape, dtype=np.float32)
    for top, left, bottom, right in boxes:
        r0, c0 = max(int(np.floor(top)), 0), max(int(np.floor(left)), 0)
        r1, c1 = min(int(np.ceil(bottom)), shape[0]), min(int(np.ceil(right)), shape[1])
        mask[r0:r1, c0:c1] = 1.0
    return mask


def _read(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        from ..io.tiff import read_array as read_tiff

        return read_tiff(path)
    from ..io.image import read_array

    return read_array(path)


def _model_channels(image: np.ndarray, spec: ModelSpec, where: Path) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 4 and spec.io.channels == 3:  # RGBA patch: drop alpha
        image = image[:, :, :3]
    elif channels == 3 and spec.io.channels == 1:
        raise HistoAIError(
            f"{where}: an RGB patch, but model {spec.name!r} takes 1 channel; "
            "export the training set from a grey image"
        )
    if image.shape[2] != spec.io.channels:
        raise HistoAIError(
            f"{where}: {image.shape[2]} channels, model {spec.name!r} takes {spec.io.channels}"
        )
    return image


# --------------------------------------------------------------------------- manifests
def _manifest_items(
    path: Path, spec: ModelSpec, task: TrainingTask, *, val_fraction: float
) -> list[TrainItem]:
    from ..annotations.training_set import read_manifest

    manifest = read_manifest(path)
    folder = manifest.path.parent if manifest.path.suffix == ".json" else manifest.path
    factor = 1.0
    if spec.io.mpp is not None and manifest.mpp:
        factor = float(manifest.mpp) / float(spec.io.mpp)
    image_mpp = manifest.image.get("mpp") or None
    level0 = float(max(image_mpp)) if image_mpp else float(manifest.mpp or 1.0)
    block = _BLOCK_PATCHES * manifest.patch_size * float(manifest.mpp or level0) / level0
    content = str(manifest.image.get("content_hash") or manifest.image.get("path") or folder)
    items = []
    values = []
    for index, sample in enumerate(manifest.samples):
        where = folder / sample.image
        image = _model_channels(_read(where), spec, where)
        image = _rescale(image, factor, order=1)
        target_path = folder / sample.target
        target: np.ndarray | int
        if task.kind == "class":
            if sample.kind == "positive":
                named = _class_index(task, sample.class_name)
                target = named if named is not None else 1
                if target == 0 and len(task.classes) > 1:
                    target = 1  # a positive named like the model's negative class
            else:
                target = 0
        elif manifest.targets == "points":
            target = _rescale(_read(target_path).astype(np.float32), factor, order=1)
            target = np.clip(target, 0.0, 1.0)
        elif manifest.targets == "boxes":
            boxes = _boxes_mask(target_path, _read(where).shape[:2])
            if task.kind == "multiclass":
                raise HistoAIError(
                    f"{folder}: a boxes training set cannot train the per-pixel classes "
                    f"of {spec.name!r}; export it with targets 'mask'"
                )
            target = _rescale(boxes, factor, order=0)
        else:  # mask
            labels = _rescale(_read(target_path), factor, order=0)
            if task.kind == "binary":
                target = _binary_from_labels(labels, manifest.mask_values, task)
            else:
                target = _multiclass_from_labels(labels, manifest.mask_values, task, folder)
        plane = ":".join(str(p) for p in sample.plane)
        key = f"{content}:{plane}:{int(sample.y // block)}:{int(sample.x // block)}"
        values.append(_block_value(key))
        items.append(
            TrainItem(
                image=image,
                target=target,
                kind=sample.kind,
                split="val" if values[-1] < val_fraction else "train",
                source=f"{folder}#{index}",
                added_miss=sample.added_miss,
            )
        )
    _hold_out_every_kind(items, values, val_fraction)
    return items


# --------------------------------------------------------------------------- real data
def _ami_items(folder: Path, spec: ModelSpec, task: TrainingTask) -> list[TrainItem]:
    from . import mitosis

    if spec.io.mpp is None:
        raise HistoAIError(f"{folder}: the AMi-Br crops need a model with an input µm/px")
    crops = mitosis.load_ami_crops(folder, mpp=float(spec.io.mpp))
    _, test = mitosis.split_by_image(crops)
    held_out = {c.name for c in test}
    a_px = mitosis.DECAY_PER_UM * float(spec.io.mpp)
    items = []
    for crop in crops:
        image = _model_channels(crop.image, spec, folder / crop.name)
        target: np.ndarray | int
        if task.kind == "class":
            target = 1
        elif task.kind == "binary":
            target = mitosis.probability_map(crop.image.shape[:2], crop.points, a=a_px)
        else:
            raise HistoAIError(
                f"{folder}: the AMi-Br crops label mitoses, not the classes of "
                f"{spec.name!r} ({', '.join(task.classes)})"
            )
        items.append(
            TrainItem(
                image=image,
                target=target,
                kind="positive",
                split="val" if crop.name in held_out else "train",
                source=f"ami_br:{crop.name}",
            )
        )
    items += _miccai_negatives(folder, spec, task)
    return items


def _miccai_negatives(folder: Path, spec: ModelSpec, task: TrainingTask) -> list[TrainItem]:
    """The mitosis task's negatives: `MICCAI_NEGATIVE_SIDE` px windows of the MICCAI 2015
    tiles beside the AMi-Br folder (brain-tumour H&E, assumed mitosis-free), the training
    tiles as train items and the test tiles as validation items (as ``train-default
    mitosis`` splits them). None when that folder is absent."""
    from . import mitosis

    side = MICCAI_NEGATIVE_SIDE
    items = []
    for split, names in (("train", mitosis.MICCAI_TRAIN), ("val", mitosis.MICCAI_TEST)):
        for index, image in enumerate(mitosis._miccai_images(folder, names)):
            image = _model_channels(image, spec, folder)
            rows, cols = image.shape[0] // side, image.shape[1] // side
            for r in range(rows):
                for c in range(cols):
                    window = image[r * side : (r + 1) * side, c * side : (c + 1) * side]
                    target: np.ndarray | int = (
                        0 if task.kind == "class" else np.zeros((side, side), np.float32)
                    )
                    items.append(
                        TrainItem(
                            image=np.ascontiguousarray(window),
                            target=target,
                            kind="negative",
                            split=split,
                            source=f"miccai:{names[index]}:{r}:{c}",
                        )
                    )
    return items


def load_items(
    sources: Sequence[str | Path],
    spec: ModelSpec,
    *,
    val_fraction: float = 0.2,
) -> list[TrainItem]:
    """Every training item of ``sources`` for ``spec``, each marked train or val.

    Parameters
    ----------
    sources : sequence of str or Path
        Training-set folders (or their ``manifest.json``) and folders of real data (see
        the module docstring).
    spec : ModelSpec
        The model to fine-tune (its task, µm/px and channels).
    val_fraction : float, keyword-only
        Share of a manifest's blocks held out for validation, in [0, 1).

    Raises
    ------
    HistoAIError
        A source that is neither; a model the sources cannot train; patches that do not
        fit the model (channels, classes). `AnnotationError` for a bad manifest.
    """
    if not 0 <= val_fraction < 1:
        raise HistoAIError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not sources:
        raise HistoAIError("no training data: give one or more training-set folders")
    task = training_task(spec)
    items: list[TrainItem] = []
    for source in sources:
        path = Path(source).expanduser()
        folder = path.parent if path.suffix == ".json" else path
        if (folder / "manifest.json").exists() or (
            folder / ".napari-histo-ai-training-set"
        ).exists():
            items += _manifest_items(path, spec, task, val_fraction=val_fraction)
        elif (folder / "AMI-BR.csv").exists():
            items += _ami_items(folder, spec, task)
        else:
            raise HistoAIError(
                f"{path}: not training data: expected a training-set folder (written by "
                "`napari-histo-ai training-set` or the Review widget) or the AMi-Br "
                "mitosis folder (with AMI-BR.csv)"
            )
    if not any(item.split == "train" for item in items):
        raise HistoAIError(
            f"no training items in {', '.join(map(str, sources))}: every sample fell in "
            "the validation split; export more samples or lower val_fraction"
        )
    return items
