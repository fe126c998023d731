"""OpenSlide backend: MRXS, VMS/VMU, SCN, BIF, DICOM and what else tifffile cannot read.

All OpenSlide calls of the package live in this module (extra ``wsi``). The dispatcher
tries tifffile first, so in ``auto`` mode this backend only sees files tifffile does not
claim; ``open_image(path, backend="openslide")`` forces it for any slide OpenSlide reads.

Each OpenSlide level is exposed as a read-only **zarr v3 store** (:class:`OpenSlideStore`)
that serves a group ``zarr.json``, one array ``<level>/zarr.json`` per level (uint8,
shape (H, W, 3), chunk (T, T, 3), ``bytes`` codec, no compressor) and chunk keys
``<level>/c/<i>/<j>/0`` decoded on demand with ``openslide_read_region``. The levels
are dask views of the zarr arrays (``dask.array.from_array(..., inline_array=True)``:
``from_zarr`` builds a layer whose culling enumerates every chunk key of the level on
each compute, 34 ms per region on a 100k × 80k slide with 256-pixel chunks).

Notes
-----
Thread safety: the OpenSlide C library is documented thread-safe for every call but
``openslide_close`` since 3.3.1 ("Document API thread safety", "Parallelize concurrent
openslide_read_region calls on an openslide_t"), and openslide-python calls it through
ctypes, which releases the GIL. One handle therefore serves all dask worker threads
without a lock; chunks are decoded in ``asyncio.to_thread`` so zarr's event-loop
thread never serialises them. Only :meth:`Pyramid.close` must not race with reads.

Non-integer downsamples: ``read_region`` takes its location in level-0 pixels and
OpenSlide paints the level at ``location / downsample``. When a level's downsample is
not an integer (Aperio levels such as 2.0005) that position is fractional and OpenSlide
interpolates by up to half a pixel; chunks are placed at the nearest level-0 pixel, so
adjacent chunks can be offset by a fraction of a pixel (a limitation of the OpenSlide API,
shared with its Deep Zoom generator).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError
from .pyramid import Pyramid

if TYPE_CHECKING:
    import numpy as np
    import openslide

#: chunk edge served when the file's own tiles are not square or not usable (NDPI strips)
DEFAULT_CHUNK = 512
#: native square tiles with an edge in this range are served as they are: one
#: read_region per native tile was fastest in the read benchmark
_NATIVE_TILE_RANGE = (128, 1024)
#: smaller square tiles are aggregated to chunks of at least this edge
MIN_CHUNK = 256

__all__ = ["DEFAULT_CHUNK", "open_pyramid", "sniff"]  # and OpenSlideStore, built lazily


# ----------------------------------------------------------------------------- sniffing
def _import_openslide(path: Path | None = None) -> Any:
    """Import openslide or raise :class:`MissingDependencyError` naming ``path``."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: the shared library failed to load
        what = f"Reading {path.name}" if path is not None else "Reading slides"
        raise MissingDependencyError(f"{what} with OpenSlide", "wsi") from exc
    return openslide


def sniff(path: Path) -> bool:
    """True for a regular file that OpenSlide recognises; never raises.

    Parameters
    ----------
    path : Path
        Candidate file. Folders and missing files are never passed to OpenSlide.

    Returns
    -------
    bool
        ``False`` as well when the ``wsi`` extra (openslide-python) is not installed.
    """
    try:
        if not path.is_file():
            return False
        openslide = _import_openslide(path)
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except Exception:
        return False


# ----------------------------------------------------------------------------- opening
def open_pyramid(path: Path, *, chunk_size: int | None = None) -> Pyramid:
    """Open a whole-slide image lazily through OpenSlide.

    Parameters
    ----------
    path : Path
        A slide OpenSlide reads (MRXS, VMS, SCN, BIF, SVS, NDPI, generic tiled TIFF…).
    chunk_size : int, optional
        Edge in pixels of the square chunks served to zarr and dask. Default: the file's
        square tile (128-1024 pixels; smaller ones aggregated to at least 256), else 512
        (e.g. NDPI, whose tiles are 8-row strips).

    Returns
    -------
    Pyramid
        ``backend="openslide"``, ``kind="slide"``, axes ``"YXS"`` (RGB, uint8), one level
        per OpenSlide level.

    Raises
    ------
    MissingDependencyError
        The ``wsi`` extra (openslide-python with the OpenSlide library) is not installed.
    ImageReadError
        OpenSlide does not recognise the file or fails to read it.
    """
    openslide = _import_openslide(path)
    from ..errors import UnsupportedFormatError

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    if fmt is None:
        raise UnsupportedFormatError(
            path,
            "is not a slide format OpenSlide recognises",
            "OpenSlide reads Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, "
            "Ventana, DICOM and generic tiled TIFF",
        )
    slide = openslide.OpenSlide(str(path))
    try:
        return _pyramid(slide, path, fmt, chunk_size)
    except BaseException:
        slide.close()
        raise


def _pyramid(slide: openslide.OpenSlide, path: Path, fmt: str, chunk_size: int | None) -> Pyramid:
    import dask.array as da
    import numpy as np
    import zarr

    props = dict(slide.properties)
    size = chunk_size or _chunk_size(props)
    if size < 16:
        raise ValueError(f"chunk_size {size} is too small: expected at least 16 pixels")
    store = _store_class()(slide, chunk_size=size)
    token = props.get("openslide.quickhash-1") or f"{path.resolve()}:{path.stat().st_mtime_ns}"
    levels = []
    for level in range(slide.level_count):
        array = zarr.open_array(store, path=str(level), mode="r")
        levels.append(
            da.from_array(
                array,
                chunks=array.chunks,
                asarray=False,
                fancy=False,
                lock=False,  # OpenSlide is thread-safe (see the module notes)
                inline_array=True,
                meta=np.empty((0, 0, 0), dtype=np.uint8),
                name=f"openslide-{_short_hash(token)}-{size}-{level}",
            )
        )

    mpp_x = _positive(props.get("openslide.mpp-x"))
    mpp_y = _positive(props.get("openslide.mpp-y"))
    mpp = (mpp_y, mpp_x) if mpp_x is not None and mpp_y is not None else None
    metadata: dict[str, Any] = {
        "properties": props,
        "level_downsamples": [float(d) for d in slide.level_downsamples],
        "chunk_size": size,
        "background_color": _background(props),
    }
    return Pyramid(
        levels=levels,
        axes="YXS",
        kind="slide",
        path=str(path),
        format=fmt,
        backend="openslide",
        mpp=mpp,
        objective_power=_positive(props.get("openslide.objective-power")),
        vendor=props.get("openslide.vendor") or None,
        associated=_associated(slide),
        metadata=json.loads(json.dumps(metadata)),
        _close=slide.close,
    )


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]


def _chunk_size(props: dict[str, str]) -> int:
    """The level-0 native square tile (small ones aggregated), else :data:`DEFAULT_CHUNK`."""
    try:
        tw = int(props["openslide.level[0].tile-width"])
        th = int(props["openslide.level[0].tile-height"])
    except (KeyError, ValueError):
        return DEFAULT_CHUNK
    if tw != th or not 16 <= tw <= _NATIVE_TILE_RANGE[1]:
        return DEFAULT_CHUNK  # e.g. NDPI's 3968x8 MCU strips
    return tw * math.ceil(MIN_CHUNK / tw) if tw < _NATIVE_TILE_RANGE[0] else tw


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _background(props: dict[str, str]) -> tuple[int, int, int]:
    """``openslide.background-color`` (hex RRGGBB) or white."""
    text = props.get("openslide.background-color", "FFFFFF")
    try:
        value = int(text, 16)
    except ValueError:
        value = 0xFFFFFF
    return ((value >> 16) & 255, (value >> 8) & 255, value & 255)


def _to_rgb(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite non-premultiplied RGBA (H, W, 4) on ``background``; RGB (H, W, 3) uint8.

    Fully transparent pixels (outside the scanned area) take the background colour, as
    OpenSlide's own ``get_thumbnail`` does.
    """
    import numpy as np

    alpha = rgba[..., 3]
    rgb = np.ascontiguousarray(rgba[..., :3])
    if alpha.min() == 255:
        return rgb
    a = alpha[..., None].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    mixed = (rgb.astype(np.uint16) * a + bg * (255 - a) + 127) // 255
    return mixed.astype(np.uint8)


def _associated(slide: openslide.OpenSlide) -> dict[str, Any]:
    """Associated images as callables that decode on demand (RGB on the background)."""
    background = _background(dict(slide.properties))
    names = list(slide.associated_images.keys())  # the keys only; no pixels decoded

    def reader(name: str) -> Any:
        def read() -> np.ndarray:
            import numpy as np

            image = slide.associated_images[name]
            return _to_rgb(np.asarray(image.convert("RGBA")), background)

        return read

    return {name: reader(name) for name in names}


# ------------------------------------------------------------------------- zarr store
@functools.cache
def _store_class() -> type:
    """Build :class:`OpenSlideStore` on first use so importing this module stays light."""
    import asyncio

    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest

    class _OpenSlideStore(Store):
        __doc__ = _STORE_DOC

        def __init__(self, slide: Any, *, chunk_size: int = DEFAULT_CHUNK) -> None:
            super().__init__(read_only=True)
            self._slide = slide
            self._chunk = int(chunk_size)
            props = dict(slide.properties)
            self._background = _background(props)
            self._dimensions = [(int(w), int(h)) for w, h in slide.level_dimensions]
            self._downsamples = [float(d) for d in slide.level_downsamples]
            self._meta = _metadata_documents(self._dimensions, self._chunk)

        # -- identity -------------------------------------------------------------
        def __eq__(self, other: object) -> bool:
            return (
                isinstance(other, type(self))
                and other._slide is self._slide
                and other._chunk == self._chunk
            )

        def __hash__(self) -> int:
            return hash((id(self._slide), self._chunk))

        def __repr__(self) -> str:
            return f"OpenSlideStore({self._slide!r}, chunk_size={self._chunk})"

        def with_read_only(self, read_only: bool = False) -> Store:
            if not read_only:
                raise ValueError("OpenSlideStore is read-only")
            return type(self)(self._slide, chunk_size=self._chunk)

        # -- capabilities ---------------------------------------------------------
        @property
        def supports_writes(self) -> bool:
            return False

        @property
        def supports_deletes(self) -> bool:
            return False

        @property
        def supports_partial_writes(self) -> bool:  # type: ignore[override]
            return False

        @property
        def supports_listing(self) -> bool:
            return True

        # -- reading --------------------------------------------------------------
        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if key in self._meta:
                data = self._meta[key]
            else:
                parsed = self._parse_chunk_key(key)
                if parsed is None:
                    return None
                data = await asyncio.to_thread(self.read_chunk, *parsed)
            if byte_range is not None:
                data = _byte_slice(
                    data, byte_range, RangeByteRequest, OffsetByteRequest, SuffixByteRequest
                )
            return prototype.buffer.from_bytes(data)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
            return [await self.get(key, prototype, rng) for key, rng in key_ranges]

        async def exists(self, key: str) -> bool:
            return key in self._meta or self._parse_chunk_key(key) is not None

        async def set(self, key: str, value: Any) -> None:
            raise PermissionError("OpenSlideStore is read-only")

        async def delete(self, key: str) -> None:
            raise PermissionError("OpenSlideStore is read-only")

        async def list(self) -> Any:
            for key in self._meta:
                yield key

        async def list_prefix(self, prefix: str) -> Any:
            for key in self._meta:
                if key.startswith(prefix):
                    yield key

        async def list_dir(self, prefix: str) -> Any:
            prefix = prefix.rstrip("/")
            seen = set()
            for key in self._meta:
                if prefix and not key.startswith(prefix + "/"):
                    continue
                head = key[len(prefix) + 1 :] if prefix else key
                name = head.split("/", 1)[0]
                if name not in seen:
                    seen.add(name)
                    yield name

        def _parse_chunk_key(self, key: str) -> tuple[int, int, int] | None:
            """``<level>/c/<i>/<j>/0`` -> (level, i, j) inside the grid, else ``None``."""
            parts = key.split("/")
            if len(parts) != 5 or parts[1] != "c" or parts[4] != "0":
                return None
            try:
                level, i, j = int(parts[0]), int(parts[2]), int(parts[3])
            except ValueError:
                return None
            if not 0 <= level < len(self._dimensions):
                return None
            width, height = self._dimensions[level]
            if not (
                0 <= i < math.ceil(height / self._chunk) and 0 <= j < math.ceil(width / self._chunk)
            ):
                return None
            return level, i, j

        def read_chunk(self, level: int, i: int, j: int) -> bytes:
            """Decode chunk (``i``, ``j``) of ``level`` as (T, T, 3) uint8 bytes.

            Edge chunks are read only inside the level and padded with the background.
            """
            import numpy as np

            t = self._chunk
            width, height = self._dimensions[level]
            y, x = i * t, j * t
            h, w = min(t, height - y), min(t, width - x)
            ds = self._downsamples[level]
            location = (round(x * ds), round(y * ds))  # level-0 pixels
            rgba = np.asarray(self._slide.read_region(location, level, (w, h)))
            rgb = _to_rgb(rgba, self._background)
            if (h, w) != (t, t):
                out = np.empty((t, t, 3), dtype=np.uint8)
                out[...] = self._background
                out[:h, :w] = rgb
                rgb = out
            return rgb.tobytes()

    _OpenSlideStore.__name__ = _OpenSlideStore.__qualname__ = "OpenSlideStore"
    _OpenSlideStore.__module__ = __name__
    return _OpenSlideStore


_STORE_DOC = """A read-only zarr v3 store over the levels of one OpenSlide handle.

Parameters
----------
slide : openslide.OpenSlide
    An open slide; the store does not close it.
chunk_size : int, keyword-only
    Edge T of the square (T, T, 3) chunks, in pixels of each level.

Notes
-----
Keys: ``zarr.json`` (a group), ``<level>/zarr.json`` (array metadata: uint8,
shape (H, W, 3), fill value the slide background) and ``<level>/c/<i>/<j>/0``
(chunk rows ``i``, columns ``j``; raw RGB bytes decoded with ``read_region``).
Listing yields the metadata documents only; chunks exist implicitly.
"""


def _metadata_documents(dimensions: list[tuple[int, int]], chunk: int) -> dict[str, bytes]:
    """The group and per-level array ``zarr.json`` documents of the store."""
    docs: dict[str, bytes] = {
        "zarr.json": json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()
    }
    for level, (width, height) in enumerate(dimensions):
        doc = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": [height, width, 3],
            "data_type": "uint8",
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [chunk, chunk, 3]},
            },
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 255,
            "codecs": [{"name": "bytes"}],
            "attributes": {},
            "dimension_names": ["y", "x", "c"],
        }
        docs[f"{level}/zarr.json"] = json.dumps(doc).encode()
    return docs


def _byte_slice(
    data: bytes, byte_range: Any, range_cls: Any, offset_cls: Any, suffix_cls: Any
) -> bytes:
    if isinstance(byte_range, range_cls):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, offset_cls):
        return data[byte_range.offset :]
    if isinstance(byte_range, suffix_cls):
        return data[-byte_range.suffix :]
    raise TypeError(f"unexpected byte range {byte_range!r}")


def __getattr__(name: str) -> Any:
    if name == "OpenSlideStore":
        return _store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
