"""The on-disk result of a run: an OME-Zarr (NGFF 0.5) folder plus progress files.

Layout of ``<run>.zarr``::

    zarr.json              group; attributes["napari_histo_ai"] = the run record
    probability/           dense models: OME-Zarr image, axes c[, z], y, x, uint8 = p * 255,
                           levels 0..n built while the run goes (2x mean each)
    sizes/                 detectors: float32 box height / width channels (output px)
    tiles/                 tile models: OME-Zarr image, axes c[, z], y, x, float32 per tile
                           (NaN = not computed)
    progress.npz           which output cells / tiles are final (written atomically)
    points.geojson, boxes.geojson, summary.json   written when the run stops

A cell is written to ``probability`` only once every tile that touches it is done, so
whatever is on disk is final: a cancelled or crashed run leaves a consistent partial
result, and resuming recomputes only tiles that touch unfinished cells.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json_atomic as _write_json

RECORD_KEY = "napari_histo_ai"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    _write_json(path, data, fsync=False)


def save_progress(path: Path, **arrays: np.ndarray) -> None:
    """Save progress arrays atomically (``np.savez`` to a temp file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_progress(path: Path) -> dict[str, np.ndarray] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None


def multiscales(
    name: str,
    axes: list[str],
    n_levels: int,
    scale: tuple[float, float],
    translate: tuple[float, float],
    unit: str | None,
    factor: int = 2,
) -> dict[str, Any]:
    """NGFF 0.5 ``multiscales`` metadata for arrays ``0..n_levels-1`` (2x per level in y, x).

    ``scale``/``translate`` are those of level 0 along (y, x); at level k the pixel is
    ``factor**k`` times larger and its centre shifts by ``(factor**k - 1) / 2`` level-0
    pixels.
    """
    axes_meta = []
    for a in axes:
        entry: dict[str, Any] = {"name": a}
        if a in ("y", "x"):
            entry["type"] = "space"
            if unit == "um":
                entry["unit"] = "micrometer"
            elif unit == "mm":
                entry["unit"] = "millimeter"
        elif a == "z":
            entry["type"] = "space"
        else:
            entry["type"] = "channel"
        axes_meta.append(entry)
    lead = len(axes) - 2
    datasets = []
    for k in range(n_levels):
        f = factor**k
        s = [1.0] * lead + [scale[0] * f, scale[1] * f]
        t = [0.0] * lead + [
            translate[0] + (f - 1) / 2 * scale[0],
            translate[1] + (f - 1) / 2 * scale[1],
        ]
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": s},
                    {"type": "translation", "translation": t},
                ],
            }
        )
    return {
        "version": "0.5",
        "multiscales": [{"name": name, "axes": axes_meta, "datasets": datasets}],
    }


class DenseOutput:
    """The ``probability`` (and ``sizes``) arrays of a dense model's run.

    Parameters
    ----------
    group : zarr.Group
        The run's root group.
    n_prob : int
        Probability channels (stored as uint8, p * 255).
    n_sizes : int
        Raw float channels (box sizes); 0 when none.
    planes : tuple of int
        Leading plane shape (``()`` for 2D, ``(Z,)`` for volumes).
    shape : (int, int)
        Output (height, width), output pixels.
    cell_size : int
        Output chunk side (= tile stride in output pixels).
    n_levels : int
        Levels to build (2x mean each); level k must divide ``cell_size`` by 2**k.
    """

    def __init__(
        self,
        group: Any,
        *,
        n_prob: int,
        n_sizes: int,
        planes: tuple[int, ...],
        shape: tuple[int, int],
        cell_size: int,
        n_levels: int,
        scale: tuple[float, float],
        translate: tuple[float, float],
        unit: str | None,
        create: bool,
    ) -> None:
        self.planes = planes
        self.cell_size = cell_size
        self.shape = shape
        self.n_levels = n_levels
        axes = ["c", *(["z"] if planes else []), "y", "x"]
        if create:
            prob = group.create_group("probability")
            prob.attrs["ome"] = multiscales("probability", axes, n_levels, scale, translate, unit)
            for k in range(n_levels):
                h = -(-shape[0] // 2**k)
                w = -(-shape[1] // 2**k)
                prob.create_array(
                    str(k),
                    shape=(n_prob, *planes, h, w),
                    chunks=(n_prob, *(1 for _ in planes), cell_size, cell_size),
                    dtype="uint8",
                    fill_value=0,
                )
            if n_sizes:
                sizes = group.create_group("sizes")
                sizes.attrs["ome"] = multiscales("sizes", axes, 1, scale, translate, unit)
                sizes.create_array(
                    "0",
                    shape=(n_sizes, *planes, *shape),
                    chunks=(n_sizes, *(1 for _ in planes), cell_size, cell_size),
                    dtype="float32",
                    fill_value=0.0,
                )
        self.prob = [group["probability"][str(k)] for k in range(n_levels)]
        self.sizes = group["sizes"]["0"] if n_sizes else None
        # lower-level chunks being filled, oldest first: (level, plane, row, col) -> data
        self._lower: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._flushed: set[tuple[Any, ...]] = set()
        self._lower_budget = max(8, int(16e6 // max(1, n_prob * cell_size * cell_size)))

    def cell_slices(self, ci: int, cj: int) -> tuple[slice, slice]:
        cs = self.cell_size
        return (
            slice(ci * cs, min(self.shape[0], (ci + 1) * cs)),
            slice(cj * cs, min(self.shape[1], (cj + 1) * cs)),
        )

    def write_cell(
        self,
        plane: tuple[int, ...],
        ci: int,
        cj: int,
        prob: np.ndarray,
        sizes: np.ndarray | None,
        *,
        footprint_final: Callable[[tuple[int, ...], int, int, int, int], bool] | None = None,
    ) -> np.ndarray:
        """Write one final cell: ``prob`` (K, h, w) in [0, 1] and optional ``sizes``.

        Level 0 is written at once. The cell's 2x, 4x, ... mean-downsampled versions go
        to levels 1..n through an in-memory buffer of lower-level chunks: a chunk is
        written whole once ``footprint_final(plane, r0, c0, r1, c1)`` says every level-0
        cell under it is final (or never will be computed), or when the buffer is over
        its budget, or at `flush`. This saves a read-modify-write per level per cell.

        Returns
        -------
        numpy.ndarray
            The quantised uint8 cell (K, h, w) as stored.
        """
        ys, xs = self.cell_slices(ci, cj)
        h, w = ys.stop - ys.start, xs.stop - xs.start
        prob = prob[:, :h, :w]
        pl = tuple(plane)
        stored = _quantise(prob)
        self.prob[0][(slice(None), *pl, ys, xs)] = stored
        if self.sizes is not None and sizes is not None:
            self.sizes[(slice(None), *pl, ys, xs)] = sizes[:, :h, :w].astype(np.float32)
        cur = prob
        cs = self.cell_size
        for k in range(1, self.n_levels):
            cur = _mean2(cur)
            f = 2**k
            key = (k, pl, ci // f, cj // f)
            entry = self._lower.get(key)
            if entry is None:
                entry = (
                    np.zeros((prob.shape[0], cs, cs), dtype=np.uint8),
                    np.zeros((cs, cs), dtype=bool),
                )
                self._lower[key] = entry
            buf, covered = entry
            y0, x0 = (ci % f) * (cs // f), (cj % f) * (cs // f)
            hh, ww = cur.shape[1], cur.shape[2]
            buf[:, y0 : y0 + hh, x0 : x0 + ww] = _quantise(cur)
            covered[y0 : y0 + hh, x0 : x0 + ww] = True
            if footprint_final is not None and footprint_final(
                pl, (ci // f) * f, (cj // f) * f, (ci // f + 1) * f, (cj // f + 1) * f
            ):
                self._flush_chunk(key)
        while len(self._lower) > self._lower_budget:
            self._flush_chunk(next(iter(self._lower)))
        return stored

    def _flush_chunk(self, key: tuple[Any, ...]) -> None:
        k, pl, cy, cx = key
        buf, covered = self._lower.pop(key)
        arr = self.prob[k]
        cs = self.cell_size
        ys = slice(cy * cs, min(arr.shape[-2], (cy + 1) * cs))
        xs = slice(cx * cs, min(arr.shape[-1], (cx + 1) * cs))
        h, w = ys.stop - ys.start, xs.stop - xs.start
        sel = (slice(None), *pl, ys, xs)
        data = buf[:, :h, :w]
        if key in self._flushed:  # an earlier partial flush: keep what it wrote
            old = np.asarray(arr[sel])
            cov = covered[:h, :w]
            data = np.where(cov[None], data, old)
        arr[sel] = data
        self._flushed.add(key)

    def flush(self) -> None:
        """Write every buffered lower-level chunk (at the end of a run or on cancel)."""
        while self._lower:
            self._flush_chunk(next(iter(self._lower)))

    def read_cell_region(
        self, plane: tuple[int, ...], y0: int, x0: int, y1: int, x1: int
    ) -> np.ndarray:
        """Quantised probabilities (K, h, w) uint8 of a level-0 output box, clipped."""
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(self.shape[0], y1), min(self.shape[1], x1)
        return np.asarray(self.prob[0][(slice(None), *plane, slice(y0, y1), slice(x0, x1))])


def _quantise(p: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)


def _mean2(a: np.ndarray) -> np.ndarray:
    """2x2 mean over the last two axes (odd edges padded by repetition)."""
    h, w = a.shape[-2:]
    if h % 2 or w % 2:
        a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)], mode="edge")
    return 0.25 * (a[..., ::2, ::2] + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2])


class TileOutput:
    """Per-tile vectors of a tile model: ``tiles/0`` float32 (K, [Z,] rows, cols)."""

    def __init__(
        self,
        group: Any,
        *,
        n_channels: int,
        planes: tuple[int, ...],
        n_tiles: tuple[int, int],
        scale: tuple[float, float],
        translate: tuple[float, float],
        unit: str | None,
        create: bool,
    ) -> None:
        axes = ["c", *(["z"] if planes else []), "y", "x"]
        if create:
            tiles = group.create_group("tiles")
            tiles.attrs["ome"] = multiscales("tiles", axes, 1, scale, translate, unit)
            tiles.create_array(
                "0",
                shape=(n_channels, *planes, *n_tiles),
                chunks=(n_channels, *(1 for _ in planes), 256, 256),
                dtype="float32",
                fill_value=float("nan"),
            )
        self.array = group["tiles"]["0"]

    def write(
        self, plane: tuple[int, ...], rows: np.ndarray, cols: np.ndarray, values: np.ndarray
    ) -> None:
        """Write vectors ``values`` (N, K) for tiles at ``rows``, ``cols`` (N,)."""
        current = np.asarray(self.array[(slice(None), *plane)])
        current[:, rows, cols] = values.T
        self.array[(slice(None), *plane)] = current
