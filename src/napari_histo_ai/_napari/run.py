"""What the "Run model" widget runs, without Qt: image of a layer, run folder, the job.

`run_job` is the generator a napari thread worker drives: it loads the model (so a
slow or failing load never blocks the viewer), then yields the engine's progress.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..inference.engine import Progress, RunConfig, RunResult, run_model
from ..models.spec import ModelSpec
from .layers import pyramid_of

if TYPE_CHECKING:
    import napari

    from ..io.pyramid import Pyramid


def layer_pyramid(layer: napari.layers.Image) -> Pyramid:
    """The lazy image behind an Image layer: ours, or a wrapper over any layer's data."""
    import dask.array as da

    from ..io.pyramid import Pyramid

    own = pyramid_of(layer)
    if own is not None:
        return own
    data = list(layer.data) if layer.multiscale else [layer.data]
    levels = [lv if isinstance(lv, da.Array) else da.asarray(lv) for lv in data]
    ndim = levels[0].ndim
    if layer.rgb:
        axes = {3: "YXS", 4: "ZYXS"}.get(ndim)
    else:
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim)
    if axes is None:
        from ..errors import ModelInputError

        raise ModelInputError(
            f"layer '{layer.name}' has {ndim} dimensions; models run on 2D images and "
            "on stacks of 2D planes"
        )
    mpp = None
    units = [str(u) for u in getattr(layer, "units", ())]
    scale = tuple(float(s) for s in layer.scale[-2:])
    if units and units[-1] in ("micrometer", "µm", "um") and scale[0] != 1.0:
        mpp = scale
    return Pyramid(levels, axes, "image", layer.name, "napari layer", "napari", mpp=mpp)


def default_run_folder(pyramid: Pyramid, spec: ModelSpec, *, root: Path | None = None) -> Path:
    """``<cache>/runs/<image>.<model>.<hash>.zarr``: the same image and model resume."""
    import platformdirs

    root = root or Path(platformdirs.user_cache_dir("napari-histo-ai")) / "runs"
    key = f"{Path(str(pyramid.path)).resolve()}|{pyramid.shape}|{spec.fingerprint()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    stem = Path(str(pyramid.path)).name.split(".")[0] or "image"
    return root / f"{stem}.{spec.name}.{digest}.zarr"


@dataclass(frozen=True)
class JobRequest:
    """Everything the widget gathers for one run."""

    pyramid: Pyramid
    spec: ModelSpec
    out: Path
    config: RunConfig
    device: str = "auto"


def run_job(request: JobRequest, cancel: threading.Event) -> Generator[Progress, None, RunResult]:
    """Load the model, then run the engine; yields `Progress`, returns `RunResult`."""
    # modules the result layers need (napari features use pandas): importing them here,
    # in the worker thread, keeps a 0.4 s import off the GUI thread when layers appear
    import pandas  # noqa: F401
    import scipy.linalg  # noqa: F401  (napari's label colormaps)
    import skimage.feature  # noqa: F401

    from ..models.loading import load_model

    predictor = load_model(request.spec, device=request.device)
    return (
        yield from run_model(
            request.pyramid, predictor, request.out, config=request.config, cancel=cancel
        )
    )


def viewport_box(
    viewer: napari.viewer.Viewer, pyramid: Pyramid, layer: napari.layers.Layer
) -> tuple[float, float, float, float] | None:
    """The visible part of a layer as (top, left, height, width) level-0 pixels.

    ``None`` when the view does not show the layer at all.
    """
    from .layers import visible_world

    center, half = visible_world(viewer)
    lead = np.zeros(layer.ndim - 2)
    a = np.asarray(layer.world_to_data(np.concatenate([lead, center - half])))[-2:]
    b = np.asarray(layer.world_to_data(np.concatenate([lead, center + half])))[-2:]
    h0, w0 = pyramid.spatial_shape(0)[-2:]
    top, left = max(0.0, float(min(a[0], b[0]))), max(0.0, float(min(a[1], b[1])))
    bottom, right = min(float(h0), float(max(a[0], b[0]))), min(float(w0), float(max(a[1], b[1])))
    if bottom <= top or right <= left:
        return None
    return (top, left, bottom - top, right - left)


def shape_polygon(
    shapes: napari.layers.Shapes, layer: napari.layers.Layer
) -> tuple[tuple[float, float], ...] | None:
    """The selected (else the last) shape of a Shapes layer, in ``layer``'s level-0 pixels."""
    if not len(shapes.data):
        return None
    index = max(shapes.selected_data) if shapes.selected_data else len(shapes.data) - 1
    vertices = np.asarray(shapes.data[index], dtype=float)
    world = np.asarray([shapes.data_to_world(v) for v in vertices])
    data = np.asarray([layer.world_to_data(w[-layer.ndim :]) for w in world])[:, -2:]
    return tuple((float(r), float(c)) for r, c in data)
