"""One press of Retrain: export an image's reviewed corrections, then fine-tune.

`retrain` is the generator the Retrain widget drives in a thread worker and ``napari-
histo-ai train --image`` drives in the terminal. It exports the corrections in the image's
annotation store as a training set at the model's µm/px (`export_training_set`; the
rejected model objects become hard negatives, the added ones misses), then runs
`finetune` on it and on any further data folders. Both steps yield `TrainProgress`
records (the export as phase ``export``) and honour ``cancel``.

The training set goes to ``<run folder>/training-set``. On ``resume`` an existing one is
reused (the run continues on the data it started with).
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HistoAIError
from ..models.spec import ModelSpec
from .datasets import training_task
from .finetune import FinetuneConfig, FinetuneResult, TrainProgress, default_run_dir, finetune

__all__ = ["RetrainRequest", "export_patch_size", "retrain"]

#: σ of point targets (µm): a mitosis map is 0.5 at 2.35 µm, as the default models' maps
POINT_SIGMA_UM = 2.0
#: the training-set folder inside a run folder
TRAINING_SET = "training-set"


def export_patch_size(spec: ModelSpec) -> int:
    """Patch side (model px) a correction is exported at for ``spec``.

    Tile classifiers: their input patch. Dense models: room for the receptive field on
    both sides of the object plus 32 px, a multiple of ``size_multiple``, between 64 px and
    the model's patch.
    """
    if not spec.dense:
        return spec.io.patch_size
    multiple = max(spec.io.size_multiple, spec.io.output_stride, 1)
    side = 2 * spec.io.halo + 32
    side = -(-side // multiple) * multiple
    return int(min(max(side, 64), max(spec.io.patch_size, 64)))


@dataclass(frozen=True)
class RetrainRequest:
    """Everything one retraining run needs.

    Parameters
    ----------
    spec : ModelSpec
        The model to fine-tune.
    image : str or Path, optional
        The image whose corrections are exported (its store: ``store`` or the default
        store beside it).
    store : str or Path, optional
    sources : sequence of str
        Further training-set / data folders.
    config : FinetuneConfig
    run_dir : Path, optional
        Default: a new `default_run_dir`.
    resume : bool
    models_dir : Path, optional
        Where the new version is registered (default the user model folder).
    """

    spec: ModelSpec
    image: str | Path | None = None
    store: str | Path | None = None
    sources: Sequence[str] = ()
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    run_dir: Path | None = None
    resume: bool = False
    models_dir: Path | None = None


def _export(
    request: RetrainRequest, run_dir: Path, cancel: threading.Event
) -> Generator[TrainProgress, None, Path | None]:
    from ..annotations.model import ImageRef
    from ..annotations.store import AnnotationStore
    from ..annotations.store_paths import default_store_path
    from ..annotations.training_set import MANIFEST_JSON, export_training_set
    from ..io import open_image

    out = run_dir / TRAINING_SET
    if request.resume and (out / MANIFEST_JSON).is_file():
        return out
    assert request.image is not None
    store_path = Path(request.store) if request.store else default_store_path(request.image)
    if not store_path.is_file():
        raise HistoAIError(
            f"{store_path}: no annotation store for {request.image}; make a result layer "
            "editable in Review & correct and review some objects first"
        )
    pyramid = open_image(request.image)
    try:
        ref = ImageRef.from_pyramid(pyramid)
        with AnnotationStore.open(store_path, image=ref) as store:
            spec = request.spec
            generator = export_training_set(
                store,
                pyramid,
                out,
                mpp=spec.io.mpp,
                patch_size=export_patch_size(spec),
                targets="auto",
                sigma_um=POINT_SIGMA_UM,
                seed=request.config.seed,
                cancel=cancel,
            )
            while True:
                try:
                    step = next(generator)
                except StopIteration as stop:
                    manifest = stop.value
                    break
                yield TrainProgress(
                    "export",
                    0,
                    request.config.epochs,
                    step.done,
                    step.total,
                    None,
                    step.elapsed_s,
                    message=f"exporting corrections: {step.done}/{step.total} patches",
                )
    finally:
        pyramid.close()
    if not manifest.complete:
        return None
    return out


def retrain(
    request: RetrainRequest, cancel: threading.Event | None = None
) -> Generator[TrainProgress, None, FinetuneResult | None]:
    """Export ``request.image``'s corrections (if given), then fine-tune; see the module.

    Returns
    -------
    FinetuneResult or None
        ``None`` when cancelled during the export.

    Raises
    ------
    HistoAIError
        No image and no data; a model that cannot be fine-tuned; no store beside the
        image; nothing reviewed in it; anything `finetune` refuses.
    """
    cancel = cancel or threading.Event()
    training_task(request.spec)  # refuse untrainable models before any export
    if request.image is None and not request.sources:
        raise HistoAIError(
            "nothing to train on: choose an image with reviewed corrections or add a "
            "training-set folder"
        )
    run_dir = request.run_dir or default_run_dir(request.spec.name)
    sources = [str(s) for s in request.sources]
    if request.image is not None:
        exported = yield from _export(request, run_dir, cancel)
        if exported is None:
            return None
        sources.insert(0, str(exported))
    result: FinetuneResult = yield from finetune(
        request.spec,
        sources,
        config=request.config,
        run_dir=run_dir,
        resume=request.resume,
        models_dir=request.models_dir,
        cancel=cancel,
    )
    return result
