"""A :class:`~napari_histo_ai.io.Pyramid` as napari layer data tuples (no Qt here).

Slides and volumes enter napari as lazy multiscale Image layers whose ``scale`` is the
physical pixel size (µm for slides, mm for volumes) and whose ``units`` drive the scale
bar. Nothing here reads level 0 of a slide: contrast limits come from the smallest level
(or a small crop of it), and uint8 images need none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MetadataError

if TYPE_CHECKING:
    import napari
    from napari.types import LayerDataTuple

    from ..io.pyramid import Pyramid

__all__ = [
    "PYRAMID_KEY",
    "add_layer_data",
    "contrast_limits",
    "layer_name",
    "layer_units",
    "pyramid_of",
    "pyramid_to_layer_data",
    "scale_bar",
    "set_layer_mpp",
    "show_scale_bar",
]

#: ``layer.metadata`` key holding the :class:`Pyramid` a layer shows
PYRAMID_KEY = "pyramid"

#: above this many elements the smallest level is only sampled (a central crop)
_MAX_STAT_ELEMENTS = 4096 * 4096
#: side of the central crop used when the smallest level is too large
_CROP = 2048

_MAGENTA_GREEN = ("magenta", "green")
_CMYBGR = ("cyan", "magenta", "yellow", "blue", "green", "red")


def layer_name(pyramid: Pyramid) -> str:
    """The file (or folder) name of ``pyramid.path``, e.g. ``"CMU-1.svs"``."""
    return Path(str(pyramid.path).rstrip("/\\")).name or str(pyramid.path)


def layer_units(pyramid: Pyramid) -> tuple[str, ...]:
    """Unit of every non-channel axis: ``pyramid.units`` on Z/Y/X, ``"pixel"`` elsewhere."""
    unit = pyramid.units
    return tuple(unit if a in "ZYX" else "pixel" for a in pyramid.axes if a != "S")


def contrast_limits(pyramid: Pyramid, *, channel: int | None = None) -> tuple[float, float] | None:
    """Display range from the smallest level; ``None`` when the dtype makes it obvious.

    Parameters
    ----------
    pyramid : Pyramid
        The image; only its smallest level (or a central crop of at most
        2048×2048 of it) is read.
    channel : int, optional
        Index along the channel axis ``S`` to restrict the statistics to.

    Returns
    -------
    tuple of float or None
        ``(low, high)``; ``(0, 255)`` for uint8 grey images, ``None`` for uint8 RGB(A)
        (napari needs no limits) and for boolean data.
    """
    import numpy as np

    dtype = np.dtype(pyramid.dtype)
    if dtype == np.bool_:
        return None
    if dtype == np.uint8:
        return None if _is_rgb(pyramid) else (0.0, 255.0)
    level = pyramid.levels[-1]
    if channel is not None and pyramid.channel_axis is not None:
        level = level[(slice(None),) * pyramid.channel_axis + (channel,)]
    if level.size > _MAX_STAT_ELEMENTS:
        # a single huge level (a big non-pyramidal TIFF): a central crop of the last
        # two axes reads a few chunks instead of the whole image
        index: list[Any] = [slice(None)] * level.ndim
        for ax in range(max(level.ndim - 2, 0), level.ndim):
            n = int(level.shape[ax])
            start = max((n - _CROP) // 2, 0)
            index[ax] = slice(start, start + _CROP)
        level = level[tuple(index)]
    low, high = (float(v) for v in _finite_min_max(level))
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if high <= low:
        high = low + 1.0
    return (low, high)


def _finite_min_max(level: Any) -> tuple[float, float]:
    import dask
    import dask.array as da
    import numpy as np

    if np.issubdtype(level.dtype, np.floating):
        level = da.where(da.isfinite(level), level, np.nan)
        low, high = dask.compute(da.nanmin(level), da.nanmax(level))
    else:
        low, high = dask.compute(level.min(), level.max())
    return float(low), float(high)


def _is_rgb(pyramid: Pyramid) -> bool:
    ch = pyramid.channel_axis
    return (
        ch is not None
        and ch == len(pyramid.axes) - 1
        and int(pyramid.levels[0].shape[ch]) in (3, 4)
        and "S" not in pyramid.axes[:-1]
    )


def _metadata(pyramid: Pyramid) -> dict[str, Any]:
    """The pyramid's JSON summary (path, backend, mpp, ...) plus the Pyramid itself."""
    return {**pyramid.info(), PYRAMID_KEY: pyramid}


def pyramid_to_layer_data(pyramid: Pyramid, *, name: str | None = None) -> list[LayerDataTuple]:
    """Layer data tuples that show ``pyramid`` lazily at its physical scale.

    Parameters
    ----------
    pyramid : Pyramid
        An opened image (see :func:`napari_histo_ai.io.open_image`).
    name : str, optional
        Layer name; default the file name. Multichannel (non-RGB) images get one layer
        per channel, named ``"<name> [<channel>]"``.

    Returns
    -------
    list of (data, kwargs, "image")
        ``data`` is the list of dask levels (``multiscale=True``) or the single level.
        ``kwargs`` carry ``scale`` (level 0, µm for slides, mm for volumes, 1 where
        unknown), ``units``, ``rgb``, ``contrast_limits`` where needed, and
        ``metadata`` with the path, backend, format, mpp, mpp_source,
        objective_power, spacing_mm, orientation and the Pyramid under ``"pyramid"``.
    """
    base = name or layer_name(pyramid)
    multiscale = len(pyramid.levels) > 1
    common: dict[str, Any] = {
        "scale": tuple(float(s) for s in pyramid.layer_scale()),
        "units": layer_units(pyramid),
        "multiscale": multiscale,
        "metadata": _metadata(pyramid),
    }
    ch = pyramid.channel_axis
    if ch is None or _is_rgb(pyramid):
        data = list(pyramid.levels) if multiscale else pyramid.levels[0]
        kwargs = {**common, "name": base, "rgb": ch is not None}
        limits = contrast_limits(pyramid)
        if limits is not None:
            kwargs["contrast_limits"] = limits
        return [(data, kwargs, "image")]

    # a channel axis that napari cannot show as RGB: one additive layer per channel
    n_channels = int(pyramid.levels[0].shape[ch])
    names = pyramid.metadata.get("channel_names")
    if not (isinstance(names, Sequence) and len(names) == n_channels):
        names = [str(i) for i in range(n_channels)]
    colormaps = _MAGENTA_GREEN if n_channels == 2 else _CMYBGR
    out: list[LayerDataTuple] = []
    for i in range(n_channels):
        index = (slice(None),) * ch + (i,)
        levels = [lv[index] for lv in pyramid.levels]
        metadata = {**common["metadata"], "channel": i}
        kwargs = {
            **common,
            "metadata": metadata,
            "name": f"{base} [{names[i]}]",
            "rgb": False,
            "colormap": "gray" if n_channels == 1 else colormaps[i % len(colormaps)],
            "blending": "translucent_no_depth" if i == 0 else "additive",
        }
        limits = contrast_limits(pyramid, channel=i)
        if limits is not None:
            kwargs["contrast_limits"] = limits
        out.append((levels if multiscale else levels[0], kwargs, "image"))
    return out


def add_layer_data(
    viewer: napari.viewer.ViewerModel, layer_data: Iterable[LayerDataTuple]
) -> list[napari.layers.Layer]:
    """Add layer data tuples to ``viewer`` as napari itself does for a reader's output.

    Shows the scale bar when any added layer has a physical unit (µm or mm).

    Returns
    -------
    list of napari.layers.Layer
        The layers added, in order.
    """
    added: list[napari.layers.Layer] = []
    for data, kwargs, layer_type in layer_data:
        result = getattr(viewer, f"add_{layer_type}")(data, **kwargs)
        added.extend(result if isinstance(result, list) else [result])
    pyramids = [pyramid_of(lyr) for lyr in added]
    if any(p is not None and p.units != "pixel" for p in pyramids):
        show_scale_bar(viewer)
    return added


def pyramid_of(layer: napari.layers.Layer) -> Pyramid | None:
    """The Pyramid a layer made by :func:`pyramid_to_layer_data` shows, else ``None``."""
    pyramid = layer.metadata.get(PYRAMID_KEY)
    return pyramid if hasattr(pyramid, "layer_scale") else None


def set_layer_mpp(
    layer: napari.layers.Layer,
    mpp: float | tuple[float, float],
    *,
    viewer: napari.viewer.ViewerModel | None = None,
) -> list[napari.layers.Layer]:
    """Set the pixel size of the image ``layer`` shows and rescale its layers.

    Parameters
    ----------
    layer : napari.layers.Layer
        A layer made by :func:`pyramid_to_layer_data` (its metadata holds the Pyramid).
    mpp : float or (float, float)
        Level-0 pixel size in micrometres per pixel (row, column).
    viewer : napari.viewer.ViewerModel, optional
        When given, every layer of the viewer showing the same Pyramid (e.g. the other
        channels) is rescaled too, the scale bar is shown and the view is reset.

    Returns
    -------
    list of napari.layers.Layer
        The layers whose ``scale`` and ``units`` changed.

    Raises
    ------
    MetadataError
        The layer shows no Pyramid, or ``mpp`` is out of range (0.01–1000 µm/px).
    """
    pyramid = pyramid_of(layer)
    if pyramid is None:
        raise MetadataError(
            f"layer {layer.name!r} was not opened by napari-histo-ai, so its pixel size "
            "cannot be set here; open the file with the 'Open slide / volume' widget"
        )
    if pyramid.spacing_mm is not None:
        raise MetadataError(
            f"layer {layer.name!r} is a volume with a voxel spacing in mm "
            f"{tuple(pyramid.spacing_mm)}; µm/px applies to slides and 2D images only"
        )
    pyramid.set_mpp(mpp, source="user")
    layers: Iterable[napari.layers.Layer] = [layer]
    if viewer is not None:
        layers = [lyr for lyr in viewer.layers if pyramid_of(lyr) is pyramid] or [layer]
    changed = []
    scale = tuple(float(s) for s in pyramid.layer_scale())
    units = layer_units(pyramid)
    for lyr in layers:
        lyr.scale = scale
        lyr.units = units
        lyr.metadata["mpp"] = list(pyramid.mpp) if pyramid.mpp is not None else None
        lyr.metadata["mpp_source"] = pyramid.mpp_source
        changed.append(lyr)
    if viewer is not None:
        show_scale_bar(viewer)
        viewer.reset_view()
    return changed


def visible_world(viewer: napari.viewer.ViewerModel) -> tuple[Any, Any]:
    """Centre and half-size, in world units of the last two axes, of what the canvas shows.

    Uses the canvas size in screen pixels (``viewer.canvas.size``, napari >= 0.9) and
    the camera's zoom (screen pixels per world unit).
    """
    import numpy as np

    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    canvas = getattr(viewer, "canvas", None)
    size = np.asarray(getattr(canvas, "size", (600, 800)), dtype=float)[-2:]
    centre = np.asarray(camera.center[-2:], dtype=float)
    return centre, size / max(float(camera.zoom), 1e-12) / 2


def scale_bar(viewer: napari.viewer.ViewerModel) -> Any:
    """The viewer's scale bar overlay (``viewer.canvas.overlays`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and "scale_bar" in canvas.overlays:
        return canvas.overlays["scale_bar"]
    return viewer.scale_bar  # napari < 0.9


def show_scale_bar(viewer: napari.viewer.ViewerModel) -> None:
    """Show the viewer's scale bar.

    Its unit follows the layers' ``units`` (napari ≥ 0.6 dropped ``scale_bar.unit``), so
    a layer at µm scale gets a bar in µm/mm and a volume one in mm.
    """
    scale_bar(viewer).visible = True
