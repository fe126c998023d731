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
import xml.etree.ElementTree as ET
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

#: native chunks thinner than this (NDPI MCU rows are 8, strips often 1-16) are merged
THIN_CHUNK_ROWS = 64
#: ... into dask chunks of about this many rows
MERGED_CHUNK_ROWS = 256
#: resolution tags that tools write by default and that say nothing about the sample
_DEFAULT_DPI = {72.0, 96.0, 150.0, 300.0}
#: tifffile axis letters -> ours; others must have length 1 (squeezed) or we refuse
_AXIS_MAP = {"Y": "Y", "X": "X", "S": "S", "C": "S", "Z": "Z", "T": "T"}


def sniff(path: Path) -> bool:
    """True for a regular file that starts with a classic or BigTIFF header."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGIC


# ----------------------------------------------------------------------------- opening
def open_pyramid(path: Path, *, decode_threads: int | None = None) -> Pyramid:
    """Open a TIFF-family slide or image lazily.

    Parameters
    ----------
    path : Path
        An SVS, NDPI, (OME-)TIFF or BigTIFF file.
    decode_threads : int, optional
        Threads tifffile's zarr store may use to decode tiles concurrently
        (default: the number of CPUs, at least 2, so decoding never runs on zarr's
        single event-loop thread).

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
        return _open(tf, path, decode_threads)
    except BaseException:
        tf.close()
        raise


def _open(tf: tifffile.TiffFile, path: Path, decode_threads: int | None) -> Pyramid:
    if not tf.pages or not tf.series:
        raise CorruptFileError(path, "the TIFF contains no images", "the file may be corrupt")
    series = tf.series[0]
    # tifffile groups SVS/NDPI levels, SubIFDs and reduced pages (subfiletype=1) as levels
    pages = [lvl.keyframe for lvl in series.levels]
    for i, page in enumerate(pages):
        _check_tiles(path, tf, page, i)

    axes, squeeze = _axes(path, series.axes, series.shape)
    threads = decode_threads or max(2, os.cpu_count() or 2)
    levels = [_level_array(path, series, i, axes, squeeze, threads) for i in range(len(pages))]
    # drop levels that do not shrink (some files repeat a level)
    kept: list[dask.array.Array] = []
    for lv in levels:
        if not kept or math.prod(lv.shape) < math.prod(kept[-1].shape):
            kept.append(lv)

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
        _close=tf.close,
    )
    return pyramid


def _check_tiles(path: Path, tf: tifffile.TiffFile, page: Any, level: int) -> None:
    """Refuse pages without image data, or whose data lies past the end of the file."""
    offsets = page.dataoffsets
    counts = page.databytecounts
    if len(offsets) == 0 or not any(offsets) or not any(counts):
        what = "tiles" if page.is_tiled else "strips"
        raise CorruptFileError(
            path,
            f"level {level} declares {page.imagewidth}x{page.imagelength} pixels but has no "
            f"image data (all {len(offsets)} {what} are empty)",
            "the file was not written completely; export it again",
        )
    size = tf.filehandle.size
    end = max(o + c for o, c in zip(offsets, counts, strict=False))
    if end > size:
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


class _LevelReader:
    """A numpy-like view of one zarr level that turns decode failures into clean errors.

    dask calls ``__getitem__`` once per chunk (from its worker threads).
    """

    def __init__(self, path: Path, level: int, array: Any, squeeze: list[int]) -> None:
        self.path = path
        self.level = level
        self.array = array
        self.squeeze = squeeze
        shape = tuple(int(s) for s in array.shape)
        self.shape = tuple(s for i, s in enumerate(shape) if i not in squeeze)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
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


def _level_array(
    path: Path, series: Any, level: int, axes: str, squeeze: list[int], threads: int
) -> dask.array.Array:
    import dask.array as da
    import zarr

    store = series.aszarr(level=level, maxworkers=threads)
    arr = zarr.open_array(store, mode="r")
    reader = _LevelReader(path, level, arr, squeeze)
    native = [int(c) for i, c in enumerate(arr.chunks) if i not in squeeze]
    chunks = list(native)
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
        name=f"tiff-{abs(hash((str(path), level, path.stat().st_mtime_ns)))}-{level}",
        meta=_empty_meta(reader),
    )


def _empty_meta(reader: _LevelReader) -> np.ndarray:
    import numpy as np

    return np.empty((0,) * reader.ndim, dtype=reader.dtype)


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
