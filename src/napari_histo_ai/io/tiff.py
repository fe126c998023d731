"""tifffile backend: Aperio SVS, Hamamatsu NDPI, generic tiled/pyramidal TIFF, OME-TIFF.

All tifffile calls of the package live in this module (tifffile changes its zarr
output between releases; one adapter keeps that contained).

Each level is served by tifffile's ``ZarrTiffStore`` (``series.aszarr()``) and wrapped
as a dask array chunked by the native tile. Nothing but the IFDs (tags, tile offsets)
is read at open; pixels are decoded per chunk on demand.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import weakref
import xml.etree.ElementTree as ET
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptFileError, UnsupportedFormatError
from .pyramid import Kind, Pyramid

if TYPE_CHECKING:
    import dask.array
    import numpy as np
    import tifffile

log = logging.getLogger(__name__)

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

#: decoded tiles kept per open file (OpenSlide keeps a similar cache); 64 MiB
TILE_CACHE_BYTES = 64 * 2**20
#: native chunks thinner than this (NDPI MCU rows are 8, strips often 1-16) are merged
THIN_CHUNK_ROWS = 64
#: ... into dask chunks of about this many rows
MERGED_CHUNK_ROWS = 256
#: resolution tags that tools write by default and that say nothing about the sample
_DEFAULT_DPI = {72.0, 96.0, 150.0, 300.0}
#: tifffile axis letters -> ours; others must have length 1 (squeezed) or we refuse
#: (Q and I are tifffile's names for an unlabelled stack of pages: shown as Z)
_AXIS_MAP = {"Y": "Y", "X": "X", "S": "S", "C": "S", "Z": "Z", "T": "T", "Q": "Z", "I": "Z"}


def sniff(path: Path) -> bool:
    """True for a regular file that starts with a classic or BigTIFF header."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGIC


# ----------------------------------------------------------------------------- opening
def open_pyramid(
    path: Path, *, decode_threads: int | None = None, tile_cache_bytes: int = TILE_CACHE_BYTES
) -> Pyramid:
    """Open a TIFF-family slide or image lazily.

    Parameters
    ----------
    path : Path
        An SVS, NDPI, (OME-)TIFF or BigTIFF file.
    decode_threads : int, optional
        For levels read through tifffile's zarr store (Z/T stacks, planar-separate
        samples): threads it may decode with (default: the number of CPUs, at least 2,
        so decoding never runs on zarr's single event-loop thread). Plain 2D levels are
        decoded directly, chunk by chunk, in dask's threads.
    tile_cache_bytes : int, keyword-only
        Bytes of decoded tiles kept per open file (least recently used go first);
        0 turns the cache off.

    Returns
    -------
    Pyramid
        kind ``"slide"`` for tiled or pyramidal files, ``"image"`` for plain TIFFs.
    """
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except tifffile.TiffFileError as exc:
        raise CorruptFileError(
            path, f"not a readable TIFF: {exc}", "the file may be truncated or corrupt"
        ) from exc
    try:
        return _open(tf, path, decode_threads, tile_cache_bytes)
    except BaseException:
        tf.close()
        raise


def _open(
    tf: tifffile.TiffFile, path: Path, decode_threads: int | None, tile_cache_bytes: int
) -> Pyramid:
    if not tf.pages or not tf.series:
        raise CorruptFileError(path, "the TIFF contains no images", "the file may be corrupt")
    series = tf.series[0]
    # tifffile groups SVS/NDPI levels, SubIFDs and reduced pages (subfiletype=1) as levels
    pages = [lvl.keyframe for lvl in series.levels]
    for i, page in enumerate(pages):
        _check_tiles(path, tf, page, i)

    axes, squeeze = _axes(path, series.axes, series.shape)
    threads = decode_threads or max(2, os.cpu_count() or 2)
    files = _FileHandles(path)
    cache = TileCache(tile_cache_bytes)
    levels = []
    readers: list[_TileReader | None] = []
    for i in range(len(pages)):
        direct = _direct_page(series.levels[i], axes)
        reader: _TileReader | _ZarrLevelReader
        if direct is not None:
            tile_reader = _TileReader(path, i, direct, files, cache)
            readers.append(tile_reader)
            reader = tile_reader
        else:  # Z/T stacks, planar-separate samples: tifffile's zarr store handles them
            reader = _ZarrLevelReader(path, i, series, squeeze, threads)
            readers.append(None)
        levels.append(_as_dask(reader, axes, name=f"tiff-{_token(path)}-{i}"))
    # drop levels that do not shrink (some files repeat a level)
    kept: list[dask.array.Array] = []
    kept_readers: list[_TileReader | None] = []
    for lv, rd in zip(levels, readers, strict=True):
        if not kept or math.prod(lv.shape) < math.prod(kept[-1].shape):
            kept.append(lv)
            kept_readers.append(rd)

    def close() -> None:
        files.close()
        tf.close()

    def read_region(level: int, top: int, left: int, height: int, width: int) -> np.ndarray | None:
        rd = kept_readers[level]  # None: a zarr-backed level, Pyramid slices dask instead
        return None if rd is None else rd.region(top, left, height, width)

    meta = _metadata(tf, path)
    tiled = bool(series.keyframe.is_tiled) or len(kept) > 1
    kind: Kind = "slide" if tiled or meta["mpp"] is not None else "image"
    pyramid = Pyramid(
        levels=kept,
        axes=axes,
        kind=kind,
        path=str(path),
        format=meta["format"],
        backend="tifffile",
        mpp=meta["mpp"],
        objective_power=meta["objective_power"],
        vendor=meta["vendor"],
        associated=_associated(tf),
        metadata=meta["raw"],
        _close=close,
        _read_region=read_region if any(r is not None for r in kept_readers) else None,
    )
    return pyramid


def _check_tiles(path: Path, tf: tifffile.TiffFile, page: Any, level: int) -> None:
    """Refuse pages without image data, or whose data lies past the end of the file.

    Vectorised: a 10-gigapixel level has ~150k tiles and this runs at every open.
    """
    import numpy as np

    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.size == 0 or not offsets.any() or not counts.any():
        what = "tiles" if page.is_tiled else "strips"
        raise CorruptFileError(
            path,
            f"level {level} declares {page.imagewidth}x{page.imagelength} pixels but has no "
            f"image data (all {offsets.size} {what} are empty)",
            "the file was not written completely; export it again",
        )
    size = tf.filehandle.size
    n = min(offsets.size, counts.size)
    end = int((offsets[:n] + counts[:n]).max())
    if end > size or int(offsets.min()) < 0:
        raise CorruptFileError(
            path,
            f"the file is truncated: level {level} image data ends at byte {end} "
            f"but the file has {size} bytes",
            "copy or download the file again",
        )


def _axes(path: Path, tif_axes: str, shape: tuple[int, ...]) -> tuple[str, list[int]]:
    """Map tifffile axes to ours; return the axes and the indices of length-1 axes to drop."""
    axes = []
    squeeze = []
    for i, (a, n) in enumerate(zip(tif_axes, shape, strict=True)):
        if a in _AXIS_MAP and _AXIS_MAP[a] not in axes:
            axes.append(_AXIS_MAP[a])
        elif n == 1:
            squeeze.append(i)
        else:
            raise UnsupportedFormatError(
                path,
                f"has an image axis {a!r} of length {n} (axes {tif_axes!r}) that napari-histo-ai "
                "does not understand",
                "expected Y, X and optionally channels (S/C), Z or T",
            )
    if "Y" not in axes or "X" not in axes:
        raise UnsupportedFormatError(path, f"has no 2D image axes (axes {tif_axes!r})")
    return "".join(axes), squeeze


#: JPEG 2000 codes: slow enough per tile that a region's tiles decode in parallel
_SLOW_CODECS = {33003, 33004, 33005, 34712, 34713}
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="histo-tiff")
        return _POOL


def _token(path: Path) -> str:
    st = path.stat()
    return f"{abs(hash((str(path.resolve()), st.st_size, st.st_mtime_ns))):x}"


class TileCache:
    """A thread-safe least-recently-used cache of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self.bytes += tile.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes


class _FileHandles:
    """One read-only descriptor per open file, for lock-free ``os.pread`` from any thread."""

    def __init__(self, path: Path) -> None:
        self.fd: int | None = os.open(path, os.O_RDONLY)
        # napari layers never call Pyramid.close(): close when the last reader goes away
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def pread(self, count: int, offset: int) -> bytes:
        if self.fd is None:
            raise ValueError("the file was closed")
        return os.pread(self.fd, count, offset)

    def close(self) -> None:
        self._finalizer()  # closes the descriptor once, whoever comes first
        self.fd = None


def _direct_page(level: Any, axes: str) -> Any | None:
    """The level's page when its pixels are one 2D page of contiguous chunks, else None."""
    if len(level.pages) != 1 or axes not in ("YX", "YXS"):
        return None
    page = level.keyframe
    if page.planarconfig != 1 and page.samplesperpixel > 1:  # planar-separate samples
        return None
    if page.imagedepth != 1 or len(page.chunked) < 2:
        return None
    return page


class _TileReader:
    """Numpy-like view of one level (Y, X[, S]) that decodes its native chunks directly.

    Reads chunk bytes with ``os.pread`` (no lock, no seek) and decodes them with the
    page's own tifffile decoder (``TiffPage.decode``, public API: JPEG tables, NDPI MCU
    headers, JPEG 2000, deflate...). No zarr in the path: zarr 3 adds ~0.5 ms per chunk
    (its event-loop hop and codec pipeline) against ~0.2 ms to decode a 256² JPEG tile.
    dask calls ``__getitem__`` once per dask chunk from its worker threads.
    """

    def __init__(
        self, path: Path, level: int, page: Any, files: _FileHandles, cache: TileCache
    ) -> None:
        import numpy as np

        self.path = path
        self.level = level
        self.files = files
        self.cache = cache
        self.decode = page.decode
        self.decode_args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self.decode_args["jpegtables"] = page.jpegtables
        if page.jpegheader is not None:
            self.decode_args["jpegheader"] = page.jpegheader
        self.samples = int(page.samplesperpixel)
        self.chunk_shape = (int(page.chunks[0]), int(page.chunks[1]))
        self.grid = (int(page.chunked[0]), int(page.chunked[1]))
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        h, w = int(page.imagelength), int(page.imagewidth)
        self.shape: tuple[int, ...] = (h, w, self.samples) if self.samples > 1 else (h, w)
        self.dtype = page.dtype
        self.ndim = len(self.shape)
        self.slow = int(page.compression) in _SLOW_CODECS
        self.chunks = self.chunk_shape

    def chunk(self, row: int, col: int) -> np.ndarray:
        """Decoded chunk (row, col) of the grid, shape ``chunk_shape`` (+ samples)."""
        import numpy as np

        index = row * self.grid[1] + col
        key = (self.level, index)
        tile = self.cache.get(key)
        if tile is not None:
            return tile
        th, tw = self.chunk_shape
        count = int(self.counts[index])
        if count == 0:  # sparse file: a tile that was never written
            tile = np.zeros((th, tw, self.samples), self.dtype)
        else:
            try:
                data = self.files.pread(count, int(self.offsets[index]))
                if len(data) != count:
                    raise EOFError(f"read {len(data)} of {count} bytes")
                decoded = self.decode(data, index, **self.decode_args)[0]
                tile = np.asarray(decoded).reshape(th, tw, self.samples)
            except Exception as exc:
                raise CorruptFileError(
                    self.path,
                    f"level {self.level} tile {index} (row {row}, column {col}) could not be "
                    f"decoded: {type(exc).__name__}: {exc}",
                    "the file is damaged in this region; other regions may still be readable",
                ) from exc
        self.cache.put(key, tile)
        return tile

    def region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels [top:top+height, left:left+width] of this level; must lie inside it."""
        import numpy as np

        th, tw = self.chunk_shape
        out = np.empty((height, width, self.samples), self.dtype)
        jobs = [
            (r, c)
            for r in range(top // th, (top + height - 1) // th + 1)
            for c in range(left // tw, (left + width - 1) // tw + 1)
        ]

        def paste(rc: tuple[int, int]) -> None:
            r, c = rc
            tile = self.chunk(r, c)
            ty, tx = r * th, c * tw
            y0, y1 = max(top, ty), min(top + height, ty + th)
            x0, x1 = max(left, tx), min(left + width, tx + tw)
            out[y0 - top : y1 - top, x0 - left : x1 - left] = tile[
                y0 - ty : y1 - ty, x0 - tx : x1 - tx
            ]

        # decode in parallel only where a tile is slow (J2K) or there are many of them:
        # handing a 0.2 ms JPEG tile to a thread costs about as much as decoding it
        if len(jobs) > 1 and (self.slow or len(jobs) >= 16):
            list(_pool().map(paste, jobs))
        else:
            for rc in jobs:
                paste(rc)
        return out if self.samples > 1 else out[..., 0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        ys, xs = [*key, slice(None), slice(None)][:2]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        region = self.region(y0, x0, max(0, y1 - y0), max(0, x1 - x0))
        rest = tuple(key[2:])
        return region[(slice(None), slice(None), *rest)] if rest else region


class _ZarrLevelReader:
    """Numpy-like view of one level through tifffile's zarr store (stacks, planar data)."""

    def __init__(
        self, path: Path, level: int, series: Any, squeeze: list[int], threads: int
    ) -> None:
        import zarr

        self.path = path
        self.level = level
        # maxworkers >= 2: decode off zarr's single event-loop thread
        self.array = zarr.open_array(series.aszarr(level=level, maxworkers=threads), mode="r")
        self.squeeze = squeeze
        shape = tuple(int(s) for s in self.array.shape)
        self.shape = tuple(s for i, s in enumerate(shape) if i not in squeeze)
        self.dtype = self.array.dtype
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for i, c in enumerate(self.array.chunks) if i not in squeeze)

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        if not isinstance(key, tuple):
            key = (key,)
        full: list[Any] = []
        it = iter(key)
        for i in range(len(self.shape) + len(self.squeeze)):
            full.append(0 if i in self.squeeze else next(it, slice(None)))
        try:
            return np.asarray(self.array[tuple(full)])
        except Exception as exc:
            raise CorruptFileError(
                self.path,
                f"level {self.level} region {key!r} could not be decoded: "
                f"{type(exc).__name__}: {exc}",
                "the file is damaged in this region; other regions may still be readable",
            ) from exc


def _as_dask(reader: _TileReader | _ZarrLevelReader, axes: str, *, name: str) -> dask.array.Array:
    """Wrap a level reader as a dask array chunked by its native tile (thin strips merged)."""
    import dask.array as da
    import numpy as np

    chunks = list(reader.chunks) + list(reader.shape[len(reader.chunks) :])
    y = axes.index("Y")
    if chunks[y] < THIN_CHUNK_ROWS:  # NDPI MCU rows, thin strips: merge for dask
        chunks[y] = math.ceil(MERGED_CHUNK_ROWS / chunks[y]) * chunks[y]
    return da.from_array(
        reader,
        chunks=tuple(min(c, s) for c, s in zip(chunks, reader.shape, strict=True)),
        asarray=False,
        fancy=False,
        lock=False,
        inline_array=True,
        name=name,
        meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
    )


# ---------------------------------------------------------------------------- metadata
def _metadata(tf: tifffile.TiffFile, path: Path) -> dict[str, Any]:
    page = tf.pages.first
    raw: dict[str, Any] = {}
    mpp: tuple[float, float] | None = None
    objective: float | None = None
    vendor: str | None = None
    fmt = "tiff"
    if tf.is_svs:
        import tifffile

        fmt, vendor = "aperio-svs", "aperio"
        try:
            svs = tifffile.tifffile.svs_description_metadata(page.description)
        except Exception:  # malformed description: metadata missing, pixels fine
            svs = {}
        raw = {k: v for k, v in svs.items() if isinstance(v, (int, float, str))}
        if _positive(svs.get("MPP")):
            mpp = (float(svs["MPP"]), float(svs["MPP"]))
        if _positive(svs.get("AppMag")):
            objective = float(svs["AppMag"])
    elif tf.is_ndpi:
        fmt, vendor = "ndpi", "hamamatsu"
        tags = page.ndpi_tags or {}
        raw = {
            k: v for k, v in tags.items() if isinstance(v, (int, float, str)) and k != "Comments"
        }
        if _positive(tags.get("Magnification")):
            objective = float(tags["Magnification"])
        mpp = _mpp_from_resolution(page)
    elif tf.is_ome:
        fmt = "ome-tiff"
        mpp, objective, raw = _ome(tf.ome_metadata or "")
    else:
        fmt = "pyramidal-tiff" if page.is_tiled else "tiff"
        raw, mpp = _description_metadata(page.description)
        if mpp is None:
            mpp = _mpp_from_resolution(page)
        if _positive(raw.get("objective_power")):
            objective = float(raw["objective_power"])
    for name in ("Make", "Model", "Software"):
        tag = page.tags.get(name)
        if tag is not None and isinstance(tag.value, str):
            raw[name.lower()] = tag.value.strip()
    if vendor is None and raw.get("make"):
        vendor = str(raw["make"]).lower()
    raw["compression"] = str(getattr(page.compression, "name", page.compression))
    if page.is_tiled:
        raw["tile_size"] = [int(page.tilelength), int(page.tilewidth)]
    return {
        "format": fmt,
        "vendor": vendor,
        "mpp": mpp,
        "objective_power": objective,
        "raw": _jsonable(raw),
    }


def _positive(value: Any) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


def _mpp_from_resolution(page: Any) -> tuple[float, float] | None:
    """µm/px from X/YResolution with a centimetre or inch unit; ``None`` if unknown."""
    xres = page.tags.get("XResolution")
    yres = page.tags.get("YResolution")
    unit = page.tags.get("ResolutionUnit")
    if xres is None or yres is None or unit is None:
        return None
    try:
        unit_value = int(unit.value)
        xr = xres.value[0] / xres.value[1]
        yr = yres.value[0] / yres.value[1]
    except (TypeError, ZeroDivisionError, IndexError, ValueError):
        return None
    if not (_positive(xr) and _positive(yr)):
        return None
    if unit_value == 2:  # inch
        if xr in _DEFAULT_DPI and yr in _DEFAULT_DPI:
            return None  # a screen default, not a measured pixel size
        per_unit_um = 25400.0
    elif unit_value == 3:  # centimetre
        per_unit_um = 10000.0
    else:  # no absolute unit
        return None
    mpp = (per_unit_um / yr, per_unit_um / xr)
    if not all(0.01 <= v <= 1000 for v in mpp):
        return None
    return mpp


def _description_metadata(description: str) -> tuple[dict[str, Any], tuple[float, float] | None]:
    """Metadata in a generic ImageDescription: JSON (ours) or ``key=value`` pairs."""
    raw: dict[str, Any] = {}
    text = (description or "").strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                raw = parsed
        except ValueError:
            pass
    else:
        for m in re.finditer(r"([A-Za-z_][\w .-]*?)\s*[=:]\s*([^|;\n\r]+)", text):
            raw[m.group(1).strip()] = m.group(2).strip()
    mpp = None
    for key in ("mpp", "MPP", "microns_per_pixel"):
        if _positive(raw.get(key)):
            v = float(raw[key])
            mpp = (v, v)
            break
    return raw, mpp


def _ome(xml: str) -> tuple[tuple[float, float] | None, float | None, dict[str, Any]]:
    """PhysicalSizeY/X (converted to µm) and objective magnification from OME-XML."""
    factors = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    raw: dict[str, Any] = {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None, raw
    mpp = None
    objective = None
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels" and mpp is None:
            sx, sy = el.get("PhysicalSizeX"), el.get("PhysicalSizeY")
            ux = el.get("PhysicalSizeXUnit", "µm")
            uy = el.get("PhysicalSizeYUnit", "µm")
            if _positive(sx) and _positive(sy) and ux in factors and uy in factors:
                mpp = (float(sy) * factors[uy], float(sx) * factors[ux])  # type: ignore[arg-type]
            raw["ome_pixels"] = {k: v for k, v in el.attrib.items()}
        elif tag == "Objective" and _positive(el.get("NominalMagnification")):
            objective = float(el.get("NominalMagnification"))  # type: ignore[arg-type]
    return mpp, objective, raw


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = str(v)
        out[str(k)] = v
    return out


def _associated(tf: tifffile.TiffFile) -> dict[str, Any]:
    """Label, macro and thumbnail images as callables that decode on demand."""
    names = {"label": "label", "macro": "macro", "thumbnail": "thumbnail", "overview": "macro"}
    out: dict[str, Any] = {}
    for s in tf.series[1:]:
        name = names.get((s.name or "").lower())
        if name and name not in out:
            out[name] = _reader_for(s)
    return out


def _reader_for(series: Any) -> Any:
    def read() -> np.ndarray:
        return series.asarray()

    return read


# -- small whole arrays (masks, training patches) -------------------------------------------
def read_array(path: str | Path) -> np.ndarray:
    """The first image of a (small) TIFF as one array, values as stored (label masks).

    Raises
    ------
    CorruptFileError
        The file is not a readable TIFF.
    """
    import numpy as np
    import tifffile

    try:
        return np.asarray(tifffile.imread(path))
    except Exception as exc:  # tifffile raises many types for damaged files
        raise CorruptFileError(path, f"is not a readable TIFF ({exc})") from exc


def write_array(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (H, W) or (H, W, 3|4) as a zlib-compressed TIFF (RGB when 3 or 4
    channels, else grey), e.g. a training patch or a float target map."""
    import tifffile

    rgb = array.ndim == 3 and array.shape[2] in (3, 4)
    tifffile.imwrite(path, array, photometric="rgb" if rgb else "minisblack", compression="zlib")
