"""Uncertainty maps and review-queue regions as napari layer data tuples (no Qt).

* `uncertainty_layer`: a multiscale Image (lazy, one dask level per map level) placed
  exactly like the run's probability layer (`napari_histo_ai._napari.results`); cells
  the run did not compute (NaN in the map) show as 0.
* `rank_job`: the "Rank regions" worker's generator (entropy of the run, or an
  MC-dropout run over the view first).
* `regions_layer`: a Shapes layer of the ranked regions (rectangles, rank as text),
  named ``"<image> · <model> · review queue"``, placed like the model's object layers
  (level-0 pixels, world = (c - 0.5) · unit).
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..inference.uncertainty import Region, UncertaintyMap
from .results import LayerDataTuple, _object_placement, _placement, _units

__all__ = ["is_result_layer", "rank_job", "regions_layer", "result_run", "uncertainty_layer"]

#: metadata ``kind`` of the layers made here
UNCERTAINTY_KIND = "uncertainty"
QUEUE_KIND = "review queue"


def _plane_units(umap: UncertaintyMap) -> tuple[str, ...]:
    n = len(umap.planes)
    return (*("pixel",) * (n - 1), umap.geometry.unit) if n else ()


def _image_name(umap: UncertaintyMap, image: str | None) -> str:
    return image if image else Path(umap.image).name


def uncertainty_layer(umap: UncertaintyMap, *, image: str | None = None) -> LayerDataTuple:
    """The uncertainty map as an Image layer data tuple (multiscale when it has levels).

    Parameters
    ----------
    umap : UncertaintyMap
    image : str, optional
        The source image layer's name (default: the run's image file name).
    """
    data = [lv.map_blocks(np.nan_to_num, dtype=np.float32) for lv in umap.levels]
    scale, translate = _placement(umap.geometry, umap.plane_scale)
    name = f"{_image_name(umap, image)} · {umap.model} · uncertainty"
    return (
        data if len(data) > 1 else data[0],
        {
            "name": name,
            "scale": scale,
            "translate": translate,
            "units": _units(umap.geometry, _plane_units(umap)),
            "colormap": "inferno",
            "contrast_limits": (0.0, 1.0),
            "opacity": 0.6,
            "blending": "translucent",
            "metadata": {
                "run": str(umap.run),
                "kind": UNCERTAINTY_KIND,
                "method": umap.method,
                "output": "uncertainty",
            },
        },
        "image",
    )


def regions_layer(
    regions: Sequence[Region], umap: UncertaintyMap, *, image: str | None = None
) -> LayerDataTuple:
    """The ranked regions as a Shapes layer data tuple (rectangles, rank as text).

    ``metadata["regions"]`` holds the regions (`Region.to_dict`), so a widget can hand
    them to `AnnotationSession.set_region_queue`.
    """
    scale, translate = _object_placement(umap.geometry, umap.plane_scale)
    rects = []
    for r in regions:
        p = [float(v) for v in r.plane]
        t, left, b, right = r.top, r.left, r.top + r.height, r.left + r.width
        rects.append(
            np.array([[*p, t, left], [*p, t, right], [*p, b, right], [*p, b, left]], dtype=float)
        )
    n_plane = len(umap.planes)
    features = {
        "rank": np.asarray([r.rank for r in regions], dtype=np.int64),
        "score": np.asarray([r.score for r in regions], dtype=np.float64),
    }
    return (
        rects,
        {
            "name": f"{_image_name(umap, image)} · {umap.model} · review queue",
            "scale": scale,
            "translate": translate,
            "units": _units(umap.geometry, _plane_units(umap)),
            "shape_type": "rectangle",
            "features": features,
            "text": {"string": "{rank}", "size": 12, "color": "cyan", "anchor": "upper_left"}
            if regions
            else None,
            "edge_color": "cyan",
            "face_color": "transparent",
            "edge_width": 3 * scale[-1],
            "metadata": {
                "run": str(umap.run),
                "kind": QUEUE_KIND,
                "method": umap.method,
                "regions": [r.to_dict(umap.image_mpp) for r in regions],
            },
            "ndim": 2 + n_plane,
        },
        "shapes",
    )


def is_result_layer(layer: Any) -> bool:
    """Whether ``layer`` is a probability (or per-tile class) layer of a run folder."""
    meta = getattr(layer, "metadata", None) or {}
    run = meta.get("run")
    return bool(run) and meta.get("kind") in ("probability", "class") and Path(run).is_dir()


def result_run(layer: Any) -> Path:
    """The run folder of a result layer (`is_result_layer`)."""
    return Path(layer.metadata["run"])


def rank_job(
    viewer: Any,
    layer: Any,
    *,
    passes: int,
    region_um: float,
    top_k: int,
    cancel: threading.Event,
    device: str = "auto",
) -> Generator[Any, None, tuple[Any, UncertaintyMap] | None]:
    """What "Rank regions" runs in its worker: the uncertainty of result layer ``layer``,
    then its ranked regions.

    ``passes == 0``: the run's own entropy (no model runs). ``passes >= 2``: an
    MC-dropout run of the run's model over the **visible part** of the image first
    (``passes`` forward passes per tile, so a view rather than a slide), into
    ``<run>.mc<passes>.zarr`` beside the run; an existing one resumes.

    Yields the engine's progress, then the ranking's; returns ``(Ranking, map)``, or
    ``None`` when cancelled during the MC-dropout run.
    """
    from ..errors import HistoAIError
    from ..inference.engine import RunConfig
    from ..inference.uncertainty import (
        iter_rank_regions,
        mc_dropout_map,
        mc_dropout_run,
        run_spec,
        uncertainty_map,
    )
    from ..models.loading import load_model
    from .run import layer_pyramid, viewport_box

    run = result_run(layer)
    if passes:
        image_name = str(layer.name).split(" · ")[0]
        if image_name not in viewer.layers:
            raise HistoAIError(
                f"the image '{image_name}' of result '{layer.name}' is not open: MC-dropout "
                "runs the model on it again"
            )
        image = viewer.layers[image_name]
        pyramid = layer_pyramid(image)
        box = viewport_box(viewer, pyramid, image)
        if box is None:
            raise HistoAIError(f"the view does not show '{image_name}': pan to a region first")
        out = run.with_name(f"{run.stem}.mc{passes}.zarr")
        predictor = load_model(run_spec(run), device=device)
        result = yield from mc_dropout_run(
            pyramid, predictor, out, passes=passes, config=RunConfig(roi=box), cancel=cancel
        )
        if result.cancelled:
            return None
        umap = mc_dropout_map(out)
    else:
        umap = uncertainty_map(run)
    ranking = yield from iter_rank_regions(umap, region_um=region_um, top_k=top_k, cancel=cancel)
    return ranking, umap
