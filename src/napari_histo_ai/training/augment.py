"""Augmentation of normalised training batches (numpy, seeded by the caller's generator).

Inputs are model inputs, ``(N, C, H, W)`` float32 after `normalise`; dense targets are
``(N, H, W)`` and follow every geometric change. Because inputs are normalised first
(once per item, so an epoch does not re-run Macenko on every patch), the colour
augmentations act on normalised values:

* **flips** (vertical, horizontal) and **90° rotations** of input and target (the
  dihedral group: each of the 8 transforms equally likely when both are on);
* **stain jitter** σ: for 3-channel inputs in [0, 1] (``scale`` normalisation), each
  image's optical density ``-log(x)`` is scaled per channel by ``1 + N(0, σ)`` and shifted
  by ``N(0, σ/4)`` (stain amount and hue vary; white stays white when the shift is 0);
  other inputs get a per-channel affine ``x·(1 + N(0, σ)) + N(0, σ)``;
* **Gaussian noise** σ added to every input value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Augmentation", "augment"]

_OD_FLOOR = 1.0 / 255.0


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations a training pass applies (see the module docstring)."""

    flips: bool = True
    rotations: bool = True
    noise_sigma: float = 0.0
    stain_jitter: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.flips or self.rotations or self.noise_sigma or self.stain_jitter)


def _dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(array, k, axes=(-2, -1)) if k else array
    return out[..., ::-1] if flip else out


def augment(
    inputs: np.ndarray,
    targets: np.ndarray | None,
    rng: np.random.Generator,
    augmentation: Augmentation,
    *,
    od_space: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augment one batch.

    Parameters
    ----------
    inputs : ndarray, shape (N, C, H, W), float32
        Square patches (rotations need H == W).
    targets : ndarray, shape (N, H, W), or None
        Dense targets transformed with the inputs (``None`` for tile labels).
    rng : numpy.random.Generator
    augmentation : Augmentation
    od_space : bool, keyword-only
        Inputs are RGB in [0, 1]: jitter stains in optical density.

    Returns
    -------
    (inputs, targets) : new arrays (the arguments are not changed)
    """
    x = np.array(inputs, dtype=np.float32, copy=True)
    y = None if targets is None else np.array(targets, copy=True)
    n = x.shape[0]
    if augmentation.flips or augmentation.rotations:
        for i in range(n):
            k = int(rng.integers(4)) if augmentation.rotations else 0
            flip = bool(rng.integers(2)) if augmentation.flips else False
            if augmentation.flips and not augmentation.rotations and rng.integers(2):
                k = 2  # flips alone: vertical flip = rot180 + horizontal flip
            x[i] = _dihedral(x[i], k, flip)
            if y is not None:
                y[i] = _dihedral(y[i], k, flip)
    sigma = float(augmentation.stain_jitter)
    if sigma > 0:
        c = x.shape[1]
        scale = 1.0 + rng.normal(0.0, sigma, size=(n, c, 1, 1)).astype(np.float32)
        if od_space:
            shift = rng.normal(0.0, sigma / 4, size=(n, c, 1, 1)).astype(np.float32)
            od = -np.log(np.clip(x, _OD_FLOOR, 1.0))
            od = np.clip(od * scale + shift, 0.0, None)
            x = np.exp(-od).astype(np.float32)
        else:
            shift = rng.normal(0.0, sigma, size=(n, c, 1, 1)).astype(np.float32)
            x = (x * scale + shift).astype(np.float32)
    if augmentation.noise_sigma > 0:
        x = x + rng.normal(0.0, augmentation.noise_sigma, size=x.shape).astype(np.float32)
    return np.ascontiguousarray(x), None if y is None else np.ascontiguousarray(y)
