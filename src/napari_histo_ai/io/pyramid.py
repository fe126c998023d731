"""The one type every reader returns: a lazy multiscale image with physical metadata."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import dask.array
    import numpy as np

Kind = Literal["slide", "volume", "image"]

#: the largest piece any level may be read in (a damaged header can claim far more)
MAX_CHUNK_BYTES = 2**30


@dataclass
class Pyramid:
    """A lazy image pyramid with its physical metadata.

    Parameters
    ----------
    levels : list of dask.array.Array
        Level 0 first, each level smaller than the one before. Axes as in ``axes``;
        chunked by the file's native tile (or an aggregate of tiny native chunks).
    axes : str
        Axis letters of every level, e.g. ``"YXS"`` (RGB slide), ``"YX"`` (grayscale),
        ``"ZYX"`` (volume), ``"TZYX"`` (volume series). ``S`` is the channel axis.
    kind : {"slide", "volume", "image"}
        Slides carry ``mpp`` in µm/px; volumes carry ``spacing_mm``; plain images may
        carry either or neither.
    path : str
        The file or folder opened.
    format : str
        Human-readable format name, e.g. ``"aperio-svs"``, ``"ndpi"``, ``"nifti"``.
    backend : str
        The adapter that read it: ``"tifffile"``, ``"openslide"``, ``"ome-zarr"``,
        ``"nibabel"`` or ``"pillow"``.
    mpp : tuple of float or None
        Level-0 pixel size (row, column) in micrometres per pixel; ``None`` when the file
        does not say (never guessed).
    spacing_mm : tuple of float or None
        Voxel spacing in millimetres, one per spatial axis in ``axes`` order (Z, Y, X).
    objective_power : float or None
        Scanner objective magnification, when recorded.
    vendor : str or None
        Scanner vendor, when recorded.
    orientation : str or None
        Volume orientation codes of the (Z, Y, X) array axes, e.g. ``"SPL"``.
    affine : numpy.ndarray or None
        4×4 voxel-to-world affine (mm) of the original file, for volumes.
    associated : dict of str to callable
        Associated images (``"label"``, ``"macro"``, ``"thumbnail"``); each callable reads
        the image (H, W[, C]) uint8 on demand.
    metadata : dict
        Raw, JSON-serialisable metadata of the file (vendor properties).
    mpp_source : str
        Where ``mpp`` came from: ``"file"``, ``"user"`` or ``"missing"``.
    """

    levels: list[dask.array.Array]
    axes: str
    kind: Kind
    path: str
    format: str
    backend: str
    mpp: tuple[float, float] | None = None
    spacing_mm: tuple[float, ...] | None = None
    objective_power: float | None = None
    vendor: str | None = None
    orientation: str | None = None
    affine: np.ndarray | None = None
    associated: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    mpp_source: str = "file"
    _close: Callable[[], None] | None = field(default=None, repr=False)
    #: backend fast path: (level, top, left, height, width) -> pixels inside the level,
    #: or None where that level has no direct reader
    _read_region: Callable[[int, int, int, int, int], np.ndarray | None] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        if self.mpp is None and self.mpp_source == "file":
            self.mpp_source = "missing"

    def validate(self) -> None:
        """Check the structure every consumer relies on; raise ``CorruptFileError`` if broken.

        Every level non-empty, with the same axes and dtype, and smaller than the one
        before; no chunk over 1 GiB; level 0 below a terapixel (larger means a damaged
        header).
        """
        from ..errors import CorruptFileError

        if not self.levels:
            raise CorruptFileError(self.path, "the image has no resolution levels")
        previous = None
        for i, lv in enumerate(self.levels):
            if lv.ndim != len(self.axes) or lv.dtype != self.levels[0].dtype:
                raise CorruptFileError(
                    self.path,
                    f"level {i} has shape {lv.shape} / {lv.dtype}, inconsistent "
                    f"with axes {self.axes!r} / {self.levels[0].dtype}",
                )
            spatial = self.spatial_shape(i)
            if any(s <= 0 for s in lv.shape):
                raise CorruptFileError(self.path, f"level {i} has an empty dimension: {lv.shape}")
            if previous is not None and math.prod(spatial) >= math.prod(previous):
                raise CorruptFileError(
                    self.path, f"level {i} {spatial} is not smaller than level {i - 1} {previous}"
                )
            previous = spatial
        for i, lv in enumerate(self.levels):
            chunk_bytes = math.prod(max(c) for c in lv.chunks) * lv.dtype.itemsize
            if chunk_bytes > MAX_CHUNK_BYTES:
                raise CorruptFileError(
                    self.path,
                    f"level {i} would be read in pieces of {chunk_bytes / 2**30:.1f} GiB "
                    f"(shape {lv.shape}, chunks {lv.chunksize})",
                    "the header is probably damaged; if not, convert the file to a tiled "
                    "TIFF or OME-Zarr",
                )
        if math.prod(self.spatial_shape(0)) > 10**12:
            raise CorruptFileError(
                self.path,
                f"implausible size {self.spatial_shape(0)} (over a terapixel)",
                "the header is probably damaged",
            )

    # -- geometry -----------------------------------------------------------------
    @property
    def channel_axis(self) -> int | None:
        """Index of the channel axis ``S`` in each level, or ``None``."""
        return self.axes.index("S") if "S" in self.axes else None

    @property
    def spatial_axes(self) -> str:
        return self.axes.replace("S", "").replace("T", "")

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.levels[0].shape)

    def spatial_shape(self, level: int = 0) -> tuple[int, ...]:
        shp = self.levels[level].shape
        return tuple(int(shp[i]) for i, a in enumerate(self.axes) if a in "ZYX")

    @property
    def downsamples(self) -> list[float]:
        """Per-level downsample factor relative to level 0 (mean over Y and X)."""
        h0, w0 = self.spatial_shape(0)[-2:]
        out = []
        for i in range(len(self.levels)):
            h, w = self.spatial_shape(i)[-2:]
            out.append(round((h0 / h + w0 / w) / 2, 6))
        return out

    def level_scales(self) -> list[tuple[float, ...]]:
        """Per-level (row, column) factors relative to level 0, exact per axis."""
        h0, w0 = self.spatial_shape(0)[-2:]
        return [
            (h0 / self.spatial_shape(i)[-2], w0 / self.spatial_shape(i)[-1])
            for i in range(len(self.levels))
        ]

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """Pixel size of ``level`` in µm/px (row, column), or ``None`` if unknown."""
        if self.mpp is None:
            return None
        fy, fx = self.level_scales()[level]
        return (self.mpp[0] * fy, self.mpp[1] * fx)

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose pixels are no larger than ``mpp`` µm/px."""
        if self.mpp is None:
            raise ValueError("this image has no mpp; set one before choosing a level")
        best = 0
        for i in range(len(self.levels)):
            lm = self.level_mpp(i)
            assert lm is not None
            if max(lm) <= mpp * 1.01:
                best = i
        return best

    def read_region(
        self,
        top_left: tuple[int, int],
        size: tuple[int, int],
        *,
        level: int = 0,
        fill_value: float = 0,
    ) -> np.ndarray:
        """Read a rectangle of a 2D level into memory, padding outside the image.

        The fast way to get pixels for tiling and inference: backends with a direct
        tile decoder (tifffile) bypass dask; others slice the dask level.

        Parameters
        ----------
        top_left : (int, int)
            (row, column) of the first pixel, in pixels of ``level``; may be negative.
        size : (int, int)
            (height, width) in pixels of ``level``.
        level : int, keyword-only
            Pyramid level (0 = full resolution).
        fill_value : float, keyword-only
            Value of pixels outside the image (255 gives white background for H&E).

        Returns
        -------
        numpy.ndarray
            Shape (height, width) or (height, width, channels) for axes ``YX``/``YXS``;
            other 2D axis orders keep the level's order.
        """
        import numpy as np

        if set(self.axes) - set("YXS"):
            raise ValueError(
                f"read_region reads 2D images; {self.path} has axes {self.axes!r}: "
                "slice pyramid.levels instead"
            )
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} does not exist: {len(self.levels)} levels")
        height, width = int(size[0]), int(size[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        top, left = int(top_left[0]), int(top_left[1])
        lv = self.levels[level]
        ly, lx = self.axes.index("Y"), self.axes.index("X")
        shape = list(lv.shape)
        shape[ly], shape[lx] = height, width
        out = np.full(shape, fill_value, dtype=lv.dtype)
        y0, y1 = max(0, top), min(int(lv.shape[ly]), top + height)
        x0, x1 = max(0, left), min(int(lv.shape[lx]), left + width)
        if y1 <= y0 or x1 <= x0:
            return out
        inside: np.ndarray | None = None
        if self._read_region is not None and self.axes in ("YX", "YXS"):
            inside = self._read_region(level, y0, x0, y1 - y0, x1 - x0)
        if inside is None:  # no direct reader for this level: slice the dask level
            key = [slice(None)] * lv.ndim
            key[ly], key[lx] = slice(y0, y1), slice(x0, x1)
            inside = np.asarray(lv[tuple(key)])
        key = [slice(None)] * lv.ndim
        key[ly], key[lx] = slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)
        out[tuple(key)] = inside
        return out

    # -- physical scale for napari ------------------------------------------------------
    @property
    def units(self) -> str:
        """Unit of ``layer_scale``: ``"um"``, ``"mm"`` or ``"pixel"``."""
        if self.spacing_mm is not None:
            return "mm"
        if self.mpp is not None:
            return "um"
        return "pixel"

    def layer_scale(self) -> tuple[float, ...]:
        """Level-0 scale of the non-channel axes (µm for slides, mm for volumes)."""
        nonchannel = [a for a in self.axes if a != "S"]
        if self.spacing_mm is not None:
            sp = list(self.spacing_mm)
            return tuple([1.0] * (len(nonchannel) - len(sp)) + sp)
        if self.mpp is not None:
            return tuple([1.0] * (len(nonchannel) - 2) + [self.mpp[0], self.mpp[1]])
        return tuple([1.0] * len(nonchannel))

    def set_mpp(self, mpp: float | tuple[float, float], *, source: str = "user") -> None:
        """Set the level-0 pixel size in µm/px (from the user or an estimate)."""
        from ..errors import MetadataError

        pair = (float(mpp), float(mpp)) if isinstance(mpp, (int, float)) else tuple(map(float, mpp))
        if len(pair) != 2 or not all(math.isfinite(v) and 0.01 <= v <= 1000 for v in pair):
            raise MetadataError(
                f"mpp {mpp!r} is out of range: expected micrometres per pixel between "
                "0.01 and 1000 (0.25 at 40x, 0.5 at 20x)"
            )
        self.mpp = (pair[0], pair[1])
        self.mpp_source = source

    # -- summary ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """JSON-serialisable summary (the ``napari-histo-ai info`` output)."""
        if self.kind == "volume":
            levels = [list(map(int, lv.shape)) for lv in self.levels]
        else:
            levels = []
            for i, lv in enumerate(self.levels):
                h, w = self.spatial_shape(i)[-2:]
                c = int(lv.shape[self.channel_axis]) if self.channel_axis is not None else 1
                levels.append([h, w, c])
        return {
            "path": self.path,
            "format": self.format,
            "backend": self.backend,
            "kind": self.kind,
            "levels": levels,
            "downsamples": self.downsamples,
            "mpp": list(self.mpp) if self.mpp is not None else None,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "vendor": self.vendor,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm is not None else None,
            "orientation": self.orientation,
            "dtype": str(self.dtype),
            "axes": self.axes,
            "channel_axis": self.channel_axis,
            "associated_images": sorted(self.associated),
        }

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None
