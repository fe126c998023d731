"""Spatial smoothing of class-probability maps before the argmax / threshold.

Tumours grow as contiguous regions (paper 001 proposes a smoothness term for exactly
this reason), so a per-pixel or per-tile argmax that flickers between classes is
better read after smoothing the probabilities. A registry output of kind ``mask`` or
``class`` with ``smoothing_um: σ`` gets its probabilities Gaussian-smoothed with
standard deviation σ micrometres (pixels when the image has no mpp) when its layer is
built (`napari_histo_ai._napari.results`); a ``class`` output's image-level aggregate is
taken over the smoothed tile map (`napari_histo_ai.inference.engine`). The stored run
is left as computed, so changing σ needs no rerun.

* `smooth_probabilities`: ``(K, ..., H, W)`` float maps with NaN for tiles / pixels not
  computed; a normalised convolution (``G * (p · valid) / G * valid``), so missing
  values neither leak in as zeros nor spread out.
* `smoothed_levels`: the same for a lazy dask pyramid of uint8 probabilities (p · 255),
  level ``i`` with σ / 2**i, by ``map_overlap`` with a 3σ halo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import HistoAIError

__all__ = ["sigma_pixels", "smooth_probabilities", "smooth_uint8_block", "smoothed_levels"]


def sigma_pixels(smoothing_um: float, pixel_um: float) -> float:
    """Gaussian σ in output pixels for σ ``smoothing_um`` µm and pixels of ``pixel_um`` µm.

    Raises
    ------
    HistoAIError
        A negative or non-finite σ, or a pixel size that is not positive.
    """
    if not (math.isfinite(smoothing_um) and smoothing_um >= 0):
        raise HistoAIError(f"smoothing σ {smoothing_um} µm must be a number ≥ 0")
    if not (math.isfinite(pixel_um) and pixel_um > 0):
        raise HistoAIError(f"output pixel size {pixel_um} µm must be positive")
    return float(smoothing_um) / float(pixel_um)


def _sigma(ndim: int, sigma_px: float) -> tuple[float, ...]:
    return (0.0,) * (ndim - 2) + (sigma_px, sigma_px)


def smooth_probabilities(probability: np.ndarray, *, sigma_px: float) -> np.ndarray:
    """Gaussian-smooth class probabilities over the last two (row, column) axes.

    Parameters
    ----------
    probability : numpy.ndarray
        ``(K, ..., H, W)`` float probabilities; NaN marks values not computed
        (background tiles), which stay NaN.
    sigma_px : float, output pixels
        Gaussian standard deviation; 0 returns a float32 copy.

    Returns
    -------
    numpy.ndarray
        ``(K, ..., H, W)`` float32: at each computed position the Gaussian-weighted mean
        of the computed neighbours (a normalised convolution, zero outside the image),
        so per-position sums over K are preserved.
    """
    from scipy.ndimage import gaussian_filter

    p = np.asarray(probability, dtype=np.float64)
    if p.ndim < 3:
        raise HistoAIError(f"probabilities must be (K, ..., H, W), got shape {p.shape}")
    if sigma_px <= 0:
        return p.astype(np.float32)
    valid = ~np.isnan(p).any(axis=0)
    weight = gaussian_filter(
        valid.astype(np.float64), _sigma(p.ndim - 1, sigma_px), mode="constant"
    )
    out = np.full(p.shape, np.nan, np.float64)
    for k in range(p.shape[0]):
        smoothed = gaussian_filter(
            np.where(valid, p[k], 0.0), _sigma(p.ndim - 1, sigma_px), mode="constant"
        )
        out[k] = np.where(valid, smoothed / np.maximum(weight, 1e-12), np.nan)
    return out.astype(np.float32)


def smooth_uint8_block(block: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian-smooth a ``(K, ..., h, w)`` uint8 block over its last two axes (reflect)."""
    from scipy.ndimage import gaussian_filter

    smoothed = gaussian_filter(
        block.astype(np.float32), _sigma(block.ndim, sigma_px), mode="reflect"
    )
    return np.rint(smoothed).clip(0, 255).astype(np.uint8)


def smoothed_levels(levels: Sequence[Any], *, sigma_px: float) -> list[Any]:
    """Lazily smooth a probability pyramid (dask arrays ``(K, ..., H, W)`` uint8).

    Parameters
    ----------
    levels : sequence of dask.array.Array
        Level ``i`` has pixels ``2**i`` times larger than level 0.
    sigma_px : float, level-0 output pixels
        Gaussian σ at level 0 (``σ / 2**i`` at level ``i``; levels below a tenth of a
        pixel are returned unchanged).

    Returns
    -------
    list of dask.array.Array
        Same shapes, chunks and dtype.
    """
    import dask.array as da

    out = []
    for i, level in enumerate(levels):
        s = sigma_px / 2**i
        if s < 0.1:
            out.append(level)
            continue
        halo = math.ceil(3 * s)
        depth = {axis: 0 for axis in range(level.ndim)}
        depth[level.ndim - 2] = depth[level.ndim - 1] = halo
        out.append(
            da.map_overlap(
                smooth_uint8_block,
                level,
                depth=depth,
                boundary="reflect",
                dtype=np.uint8,
                sigma_px=s,
            )
        )
    return out
