"""Tile grids and blending weights (pure geometry, numpy only).

Dense models
------------
A patch of ``patch_size`` input pixels loses ``halo`` pixels on each side (outputs that
saw padding) and keeps ``kept = patch_size - 2 * halo``. Neighbouring tiles' kept
areas overlap by ``overlap`` pixels, so the stride is ``kept - overlap``. Along one axis,
tile ``i`` keeps ``[i * stride - overlap, (i + 1) * stride)`` and reads
``[i * stride - overlap - halo, (i + 1) * stride + halo)``.

Output *cells* are the stride-sized squares ``[i * stride, (i + 1) * stride)``; cell
``i`` receives tile ``i`` (weight 1, tapering down over its last ``overlap`` pixels) and
tile ``i + 1`` (tapering up over the same pixels). The tapers are ``sin²`` and ``cos²``
of the same angle, so the weights of all tiles sum to exactly one at every pixel: a
partition of unity, without edge cases (tile 0's up-taper lies before pixel 0 and the
last tile's down-taper after the image). In 2D a cell depends on 2 × 2 tiles.

Tile models
-----------
Patches of ``patch_size`` slide with stride ``patch_size - overlap``; each gives one
vector, placed on a grid whose pixel is one stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def taper(overlap: int) -> np.ndarray:
    """Up-taper weights over ``overlap`` pixels: ``sin²(π/2 · (t + ½) / overlap)``.

    ``taper(o) + taper(o)[::-1] == 1`` exactly (up to float rounding).
    """
    if overlap <= 0:
        return np.zeros(0, dtype=np.float32)
    t = (np.arange(overlap, dtype=np.float64) + 0.5) / overlap
    return (np.sin(np.pi / 2 * t) ** 2).astype(np.float32)


def tile_weights(kept: int, overlap: int) -> np.ndarray:
    """1D weights over one tile's kept pixels: up-taper, ones, down-taper.

    Parameters
    ----------
    kept : int
        Kept pixels per tile (output resolution).
    overlap : int
        Overlap between neighbouring tiles (output resolution).
    """
    w = np.ones(kept, dtype=np.float32)
    if overlap:
        up = taper(overlap)
        w[:overlap] = up
        w[kept - overlap :] = up[::-1]
    return w


@dataclass(frozen=True)
class DenseGrid:
    """Tiling of a (height, width) image, at model resolution, for a dense model.

    All lengths are pixels at the model's input resolution; ``output_stride`` divides
    them (checked by `ModelSpec`). ``cells`` and output arrays use output pixels.
    """

    height: float
    width: float
    patch_size: int
    halo: int
    overlap: int
    output_stride: int = 1

    @property
    def kept(self) -> int:
        return self.patch_size - 2 * self.halo

    @property
    def stride(self) -> int:
        return self.kept - self.overlap

    @property
    def n_tiles(self) -> tuple[int, int]:
        """(rows, columns) of tiles whose kept area meets the image."""
        s, o = self.stride, self.overlap
        return (
            max(1, math.ceil((self.height + o) / s)),
            max(1, math.ceil((self.width + o) / s)),
        )

    @property
    def output_shape(self) -> tuple[int, int]:
        """(height, width) of the full output, output pixels."""
        r = self.output_stride
        return max(1, math.ceil(self.height / r)), max(1, math.ceil(self.width / r))

    @property
    def cell_size(self) -> int:
        """Side of one output cell (= output chunk), output pixels."""
        return self.stride // self.output_stride

    @property
    def n_cells(self) -> tuple[int, int]:
        cs = self.cell_size
        h, w = self.output_shape
        return math.ceil(h / cs), math.ceil(w / cs)

    def input_origin(self, i: int, j: int) -> tuple[int, int]:
        """(row, column) of the first input pixel tile (i, j) reads, model pixels."""
        off = self.overlap + self.halo
        return i * self.stride - off, j * self.stride - off

    def kept_origin(self, i: int, j: int) -> tuple[int, int]:
        """(row, column) of tile (i, j)'s first kept pixel, output pixels (may be < 0)."""
        r = self.output_stride
        return (i * self.stride - self.overlap) // r, (j * self.stride - self.overlap) // r

    def kept_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Tile (i, j)'s kept area (top, left, bottom, right), model pixels, unclipped."""
        s, o = self.stride, self.overlap
        return i * s - o, j * s - o, (i + 1) * s, (j + 1) * s

    def weights(self) -> np.ndarray:
        """2D blending weights of one tile's kept area, output pixels."""
        r = self.output_stride
        w = tile_weights(self.kept // r, self.overlap // r)
        return np.outer(w, w)

    def cells_of_tile(self, i: int, j: int) -> list[tuple[int, int]]:
        """Cells that tile (i, j) contributes to (inside the output)."""
        nr, nc = self.n_cells
        out = []
        for ci in (i - 1, i):
            for cj in (j - 1, j):
                if 0 <= ci < nr and 0 <= cj < nc:
                    if self.overlap == 0 and (ci != i or cj != j):
                        continue
                    out.append((ci, cj))
        return out

    def tiles_of_cell(self, ci: int, cj: int) -> list[tuple[int, int]]:
        """Tiles that contribute to cell (ci, cj)."""
        nr, nc = self.n_tiles
        out = []
        for i in (ci, ci + 1):
            for j in (cj, cj + 1):
                if i < nr and j < nc:
                    if self.overlap == 0 and (i != ci or j != cj):
                        continue
                    out.append((i, j))
        return out


@dataclass(frozen=True)
class PatchGrid:
    """Sliding patches of a tile-level model over a (height, width) image, model pixels."""

    height: float
    width: float
    patch_size: int
    overlap: int = 0

    @property
    def stride(self) -> int:
        return max(1, self.patch_size - self.overlap)

    @property
    def n_tiles(self) -> tuple[int, int]:
        p, s = self.patch_size, self.stride
        return (
            max(1, math.ceil(max(0.0, self.height - p) / s) + 1),
            max(1, math.ceil(max(0.0, self.width - p) / s) + 1),
        )

    def input_origin(self, i: int, j: int) -> tuple[int, int]:
        """First input pixel of patch (i, j); the last row / column is pulled back to end
        at the image border, so no patch reads padding unless the image is smaller."""
        p = self.patch_size
        last_y = max(0, int(self.height) - p)
        last_x = max(0, int(self.width) - p)
        return min(i * self.stride, last_y), min(j * self.stride, last_x)

    def kept_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        s = self.stride
        y, x = self.input_origin(i, j)
        # the patch's central stride-sized square: what its grid pixel stands for
        c = (self.patch_size - s) // 2
        return y + c, x + c, y + c + s, x + c + s
