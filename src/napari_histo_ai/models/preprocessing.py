"""Pixels → model input: stain normalisation and intensity normalisation (numpy only).

`normalise` turns a batch of patches ``(N, H, W, C)`` as read from an image into the
float32 ``(N, C, H, W)`` array a model expects, following `Normalisation`. Stain
normalisation (Macenko et al. 2009, "A method for normalizing histology slides for
quantitative analysis", ISBI) is applied first, per patch, on 8-bit RGB.

The Macenko code follows the widely used numpy implementation (M. Macenko's method as
written in ``schaugf/HEnorm_python``): optical density ``OD = -log((I + 1) / io)``,
pixels with every channel's OD ≥ ``beta`` are tissue, the plane of the two largest
eigenvectors of their OD covariance holds both stains, and the ``alpha`` / ``100 -
alpha`` percentiles of the angle in that plane are the stain vectors; the one with the
larger red component is haematoxylin. Eigenvectors are sign-fixed (positive red
component) so that results do not depend on the LAPACK sign convention.

The source stains can be fitted per patch (`macenko_apply` without ``source``: the
patch's own stain vectors and 99th-percentile concentrations over all its pixels, as
the training code of the mitosis models does it) or once per slide, as paper 000 does
(`macenko_fit` on tissue pixels sampled from the slide, then
``macenko_apply(patch, target, source=fit)`` for every tile). A fixed source fit keeps
a partly background patch from being darkened and a patch full of dark nuclei from
being dimmed, since neither changes the concentration scale any more.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelInputError
from .spec import Normalisation, StainReference

__all__ = ["clahe", "macenko_apply", "macenko_fit", "normalise"]

#: lower bound of the per-patch standard deviation in ``zscore`` (avoids 0 / 0)
ZSCORE_EPS = 1e-6
#: a patch needs at least this fraction of tissue pixels for Macenko ...
MIN_TISSUE_FRACTION = 0.01
#: ... and at least this many
MIN_TISSUE_PIXELS = 16
#: stain vectors closer than this cosine (about 8°) mean a single-stain patch; real H
#: and E vectors have cosines of 0.7-0.9
MAX_STAIN_COSINE = 0.99


def normalise(
    batch: np.ndarray, norm: Normalisation, *, source: StainReference | None = None
) -> np.ndarray:
    """Normalise a batch of patches into a model's input array.

    Parameters
    ----------
    batch : ndarray, shape (N, H, W, C)
        Patches, uint8 or float, channels last as read from an image.
    norm : Normalisation
        ``method`` ``none`` (float32 of the raw values), ``scale`` (``x / scale``),
        ``meanstd`` (``(x / scale - mean) / std`` per channel), ``zscore`` (per patch
        and channel ``(x - mean(x)) / max(std(x), ZSCORE_EPS)``), ``whiten`` (the same
        over all channels of a patch together) or ``clahe`` (`clahe` per patch, then
        ``/ scale``; needs uint8 patches). With ``norm.stain``
        set each patch is first stain-normalised with `macenko_apply` (needs uint8 RGB).
    source : StainReference or None, keyword-only
        The source stains fitted once for the whole image (`macenko_fit`); ``None``
        fits every patch on its own. Ignored without ``norm.stain``.

    Returns
    -------
    ndarray, shape (N, C, H, W), float32, C-contiguous

    Raises
    ------
    ModelInputError
        ``batch`` is not 4-D, stain normalisation gets non-uint8 or non-RGB patches, or
        ``meanstd`` has a different number of values than channels.
    """
    batch = np.asarray(batch)
    if batch.ndim != 4:
        raise ModelInputError(
            f"normalise expects a batch (N, H, W, C), got an array of shape {batch.shape}"
        )
    channels = batch.shape[-1]
    if norm.stain is not None:
        if batch.dtype != np.uint8 or channels != 3:
            raise ModelInputError(
                f"stain normalisation needs 8-bit RGB patches (N, H, W, 3), got {batch.dtype} "
                f"of shape {batch.shape}"
            )
        stain = norm.stain
        batch = np.stack([macenko_apply(patch, stain, source=source) for patch in batch])
    if norm.method == "clahe":
        if batch.dtype != np.uint8 or channels not in (1, 3):
            raise ModelInputError(
                f"CLAHE needs 8-bit grey or RGB patches (N, H, W, 1 or 3), got {batch.dtype} "
                f"of shape {batch.shape}"
            )
        batch = np.stack(
            [clahe(patch, clip_limit=norm.clip_limit, tiles=norm.tiles) for patch in batch]
        )
    out = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    method = norm.method
    if method == "none":
        return out
    if method == "scale":
        out *= np.float32(1.0 / norm.scale)
        return out
    if method == "meanstd":
        if len(norm.mean) != channels or len(norm.std) != channels:
            raise ModelInputError(
                f"normalisation 'meanstd' has {len(norm.mean)} mean and {len(norm.std)} std "
                f"values but the patches have {channels} channels"
            )
        mean = np.asarray(norm.mean, np.float32).reshape(1, channels, 1, 1)
        std = np.asarray(norm.std, np.float32).reshape(1, channels, 1, 1)
        out *= np.float32(1.0 / norm.scale)
        out -= mean
        out /= std
        return out
    if method in ("zscore", "whiten"):
        axes = (2, 3) if method == "zscore" else (1, 2, 3)
        mean = out.mean(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
        out -= mean
        std = np.sqrt((out * out).mean(axis=axes, keepdims=True, dtype=np.float64))
        out /= np.maximum(std, ZSCORE_EPS).astype(np.float32)
        return out
    if method == "clahe":
        out *= np.float32(1.0 / norm.scale)
        return out
    raise ModelInputError(f"unknown normalisation method {method!r}")


# ----------------------------------------------------------------------------- CLAHE
def clahe(image: np.ndarray, *, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an 8-bit image.

    Paper 002's preprocessing: RGB is converted to YUV, the Y (luma) channel equalised
    and converted back; a grey image is equalised directly. scikit-image does the work.

    Parameters
    ----------
    image : ndarray, shape (H, W), (H, W, 1) or (H, W, 3), uint8
    clip_limit : float
        OpenCV's convention: a histogram bin is clipped at ``clip_limit`` times the mean
        bin height of its tile (2.0 in the paper). scikit-image's normalised limit is
        ``clip_limit / 256``.
    tiles : int
        The image is divided into ``tiles`` × ``tiles`` contextual regions (8 × 8).

    Returns
    -------
    ndarray, uint8, the shape of ``image``

    Raises
    ------
    ModelInputError
        Not uint8, or not grey / RGB.
    """
    from skimage import color, exposure

    image = np.asarray(image)
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))
    ):
        raise ModelInputError(
            f"CLAHE needs an 8-bit grey or RGB image, got {image.dtype} of shape {image.shape}"
        )
    h, w = image.shape[:2]
    if h < 2 or w < 2:
        return image.copy()
    kernel = (max(1, h // tiles), max(1, w // tiles))
    limit = float(clip_limit) / 256.0
    if image.ndim == 3 and image.shape[-1] == 3:
        yuv = color.rgb2yuv(image)
        y = np.clip(yuv[..., 0], 0.0, 1.0)
        yuv[..., 0] = exposure.equalize_adapthist(
            y, kernel_size=kernel, clip_limit=limit, nbins=256
        )
        rgb = color.yuv2rgb(yuv)
        return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    grey = image[..., 0] if image.ndim == 3 else image
    eq = exposure.equalize_adapthist(grey, kernel_size=kernel, clip_limit=limit, nbins=256)
    out = np.clip(np.rint(eq * 255.0), 0, 255).astype(np.uint8)
    return out[..., None] if image.ndim == 3 else out


# ----------------------------------------------------------------------------- Macenko
def _od_lut(io: float) -> np.ndarray:
    """Optical density of each 8-bit value: ``-log((v + 1) / io)`` (float32, 256)."""
    return (-np.log((np.arange(256, dtype=np.float64) + 1.0) / io)).astype(np.float32)


def _fit(
    rgb: np.ndarray, io: float, alpha: float, beta: float, *, tissue_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Stain matrix (3, 2: H, E columns), 99th-percentile concentrations (2,) and the
    concentrations of every pixel (2, H*W); ``None`` when the patch cannot be fitted.

    The percentiles are over all pixels (the per-patch convention the shipped mitosis
    models were trained with) or, with ``tissue_only``, over the tissue pixels."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ModelInputError(
            f"Macenko needs an 8-bit RGB patch (H, W, 3), got {rgb.dtype} of shape {rgb.shape}"
        )
    od = _od_lut(io)[rgb.reshape(-1, 3)]  # (P, 3)
    is_tissue = (od >= beta).all(axis=1)
    tissue = od[is_tissue]
    n_pixels = od.shape[0]
    if len(tissue) < max(MIN_TISSUE_FRACTION * n_pixels, MIN_TISSUE_PIXELS):
        return None
    cov = np.cov(tissue.T.astype(np.float64))
    if not np.all(np.isfinite(cov)):
        return None
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    if eigvals[2] <= 0 or eigvals[1] <= 1e-9 * eigvals[2]:
        return None  # one stain only (or none): the plane is undefined
    plane = eigvecs[:, 1:3] * np.where(eigvecs[0, 1:3] < 0, -1.0, 1.0)  # (3, 2)
    projected = tissue @ plane.astype(np.float32)  # (T, 2)
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    min_phi, max_phi = np.percentile(phi, (alpha, 100.0 - alpha))
    v_min = plane @ np.array([np.cos(min_phi), np.sin(min_phi)])
    v_max = plane @ np.array([np.cos(max_phi), np.sin(max_phi)])
    stains = (
        np.stack([v_min, v_max], axis=1)
        if v_min[0] > v_max[0]
        else np.stack([v_max, v_min], axis=1)
    )
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    if abs(float(stains[:, 0] @ stains[:, 1])) > MAX_STAIN_COSINE:
        return None  # one stain only: both percentiles on (nearly) the same direction
    concentrations = (np.linalg.pinv(stains).astype(np.float32) @ od.T).astype(np.float32)
    max_c = np.percentile(
        concentrations[:, is_tissue] if tissue_only else concentrations, 99, axis=1
    )
    if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-6)):
        return None
    return stains, max_c, concentrations


def macenko_fit(
    rgb: np.ndarray,
    *,
    io: float = 240,
    alpha: float = 1.0,
    beta: float = 0.15,
    tissue_only: bool = True,
) -> StainReference:
    """Estimate the H and E stains of an image (a reference or a source fit for
    `macenko_apply`).

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        A representative H&E image, e.g. a mosaic of tissue regions of a slide.
        The stain vectors are computed over tissue pixels (OD ≥ ``beta``) only.
    io : float
        Transmitted (background) light intensity, 8-bit units.
    alpha : float
        Percentile (0–100) of the stain angles taken as the extreme stain directions.
    beta : float
        Optical-density threshold: pixels with OD ≥ ``beta`` in every channel are tissue.
    tissue_only : bool
        Take the concentration percentiles over tissue pixels only (default; right for
        a source fit on a slide). ``False``: over all pixels, the convention the
        shipped mitosis models' reference stains were fitted with (so that
        ``train-default mitosis`` reproduces them).

    Returns
    -------
    StainReference
        ``stain_matrix``: unit OD vectors (haematoxylin first, eosin second);
        ``max_concentrations``: their 99th-percentile concentrations.

    Raises
    ------
    ModelInputError
        Not 8-bit RGB, or too little tissue (< 1 % of pixels) / a single stain, so no
        two stains can be found.
    """
    fitted = _fit(np.asarray(rgb), io, alpha, beta, tissue_only=tissue_only)
    if fitted is None:
        raise ModelInputError(
            f"cannot estimate H&E stains from this {rgb.shape[0]}×{rgb.shape[1]} image: fewer "
            f"than {MIN_TISSUE_FRACTION:.0%} tissue pixels (OD ≥ {beta}) or a single stain; "
            "choose a tissue-rich H&E region as the reference"
        )
    stains, max_c, _ = fitted
    h, e = stains.T
    return StainReference(
        method="macenko",
        stain_matrix=(
            (float(h[0]), float(h[1]), float(h[2])),
            (float(e[0]), float(e[1]), float(e[2])),
        ),
        max_concentrations=(float(max_c[0]), float(max_c[1])),
    )


def macenko_apply(
    rgb: np.ndarray,
    target: StainReference,
    *,
    source: StainReference | None = None,
    io: float = 240,
    alpha: float = 1.0,
    beta: float = 0.15,
) -> np.ndarray:
    """Re-render an H&E patch with the stains of ``target``.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        The patch.
    target : StainReference
        Reference stains and concentrations (e.g. from `macenko_fit`).
    source : StainReference or None, keyword-only
        The stains and 99th-percentile concentrations of the image the patch comes
        from, fitted once (`macenko_fit` on tissue of the whole slide). ``None``: fit
        them on the patch itself (all its pixels, background included).
    io, alpha, beta : float
        As in `macenko_fit`.

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
        The normalised patch. Without ``source``, ``rgb`` itself, unchanged, when the
        patch has too little tissue (< 1 % of pixels) or a single stain (never NaN).
        Background pixels of a normalised patch become ``io``.

    Raises
    ------
    ModelInputError
        ``rgb`` is not 8-bit RGB.
    """
    rgb = np.asarray(rgb)
    if source is not None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ModelInputError(
                f"Macenko needs an 8-bit RGB patch (H, W, 3), got {rgb.dtype} of shape {rgb.shape}"
            )
        stains = np.asarray(source.stain_matrix, np.float64).T  # (3, 2)
        max_c = np.asarray(source.max_concentrations, np.float64)
        od_pixels = _od_lut(io)[rgb.reshape(-1, 3)]
        concentrations = (np.linalg.pinv(stains).astype(np.float32) @ od_pixels.T).astype(
            np.float32
        )
    else:
        fitted = _fit(rgb, io, alpha, beta)
        if fitted is None:
            return rgb
        _, max_c, concentrations = fitted
    reference = np.asarray(target.stain_matrix, np.float32).T  # (3, 2)
    factor = (np.asarray(target.max_concentrations, np.float64) / max_c).astype(np.float32)
    concentrations *= factor[:, None]
    od = reference @ concentrations  # (3, P)
    out = np.exp(-od)
    out *= np.float32(io)
    np.clip(out, 0, 255, out=out)
    return np.rint(out.T).astype(np.uint8).reshape(rgb.shape)
