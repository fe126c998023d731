"""Plain 2D images (PNG, JPEG, PGM/PPM/PBM, BMP) through Pillow, as a one-level :class:`Pyramid`.

Every Pillow call of the readers lives in this module. Only the header is read at open
(size, mode, resolution) plus a cheap integrity check; the pixels are decoded by one
dask task when first needed. These formats have no random access, so the level is a
single chunk.

Pixel layout
------------
==================================== ======== ======= ===============================
file mode (Pillow)                   axes     dtype   note
==================================== ======== ======= ===============================
``L`` (8-bit grey)                   ``YX``   uint8
``1`` (bilevel, PBM / 1-bit PNG)     ``YX``   uint8   0 / 255
``I;16*`` (16-bit grey PNG / PGM)    ``YX``   uint16
``I`` (32-bit int)                   ``YX``   int32   uint16 for a 16-bit PGM
``F`` (32-bit float)                 ``YX``   float32
``RGB``, ``CMYK``, ``YCbCr``, ``P``  ``YXS``  uint8   3 channels, RGB
``RGBA``, ``P`` with transparency    ``YXS``  uint8   4 channels: alpha is kept as
                                                      stored (napari renders RGBA)
``LA``                               ``YX``   uint8   grey only: alpha is dropped,
                                                      napari has no grey+alpha display
==================================== ======== ======= ===============================

16-bit-per-channel RGB PNGs are reduced to 8 bits by Pillow.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptFileError, ImageReadError, UnsupportedFormatError
from .pyramid import Pyramid

if TYPE_CHECKING:
    import numpy as np

__all__ = ["open_pyramid", "sniff"]

log = logging.getLogger(__name__)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNM_KINDS = {b"1": "pbm", b"2": "pgm", b"3": "ppm", b"4": "pbm", b"5": "pgm", b"6": "ppm"}
#: BMP info-header sizes (BITMAPCOREHEADER ... BITMAPV5HEADER)
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}

#: Pillow mode -> (mode to convert to or None, numpy dtype, channels)
_MODES: dict[str, tuple[str | None, str, int]] = {
    "L": (None, "uint8", 1),
    "1": ("L", "uint8", 1),
    "LA": ("L", "uint8", 1),
    "La": ("L", "uint8", 1),
    "I;16": (None, "uint16", 1),
    "I;16L": (None, "uint16", 1),
    "I;16B": (None, "uint16", 1),
    "I;16N": (None, "uint16", 1),
    "I": (None, "int32", 1),
    "F": (None, "float32", 1),
    "RGB": (None, "uint8", 3),
    "RGBX": ("RGB", "uint8", 3),
    "CMYK": ("RGB", "uint8", 3),
    "YCbCr": ("RGB", "uint8", 3),
    "LAB": ("RGB", "uint8", 3),
    "HSV": ("RGB", "uint8", 3),
    "RGBA": (None, "uint8", 4),
    "RGBa": ("RGBA", "uint8", 4),
    "PA": ("RGBA", "uint8", 4),
}

#: bits per pixel of Pillow's raw modes, to check the size of uncompressed PNM files
_RAW_BITS = {"1;I": 1, "L": 8, "RGB": 24, "I;16B": 16, "I;32B": 32, "RGB;16B": 48}

#: resolutions written by default by many tools; they say nothing about the pixel size
_DEFAULT_DPI = (72, 96)


def _format_of(head: bytes) -> str | None:
    """Format name from the first bytes (``"png"``, ``"jpeg"``, ``"pgm"``…) or ``None``."""
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in _PNM_KINDS and head[2:3].isspace():
        return _PNM_KINDS[head[1:2]]
    if (
        len(head) >= 18
        and head[:2] == b"BM"
        and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES
    ):
        return "bmp"
    return None


def sniff(path: Path) -> bool:
    """Whether ``path`` is a PNG, JPEG, PNM (PBM/PGM/PPM) or BMP file, by its magic bytes.

    Reads 18 bytes; never raises.
    """
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            return _format_of(fh.read(18)) is not None
    except Exception:
        return False


# -- physical pixel size -------------------------------------------------------------------
def _mpp_from_info(fmt: str, info: dict[str, Any]) -> tuple[float, float] | None:
    """Pixel size (row, column) in µm from a resolution the file states in physical units.

    Trusted: PNG ``pHYs`` and BMP pixels-per-metre (Pillow reports them as ``dpi`` only
    when the unit is the metre), and JPEG JFIF densities in dots per inch or per cm.
    Ignored: the 72 / 96 dpi defaults, unitless aspect ratios, EXIF resolution, and values
    outside 0.01-1000 µm/px.
    """
    dpi: tuple[float, float] | None = None
    if fmt in ("png", "bmp") and "dpi" in info:
        dpi = info["dpi"]
    elif fmt == "jpeg" and info.get("jfif_unit") in (1, 2):
        dx, dy = info.get("jfif_density", (0, 0))
        per_inch = 2.54 if info["jfif_unit"] == 2 else 1.0
        dpi = (dx * per_inch, dy * per_inch)
    if dpi is None:
        return None
    try:
        dx, dy = float(dpi[0]), float(dpi[1])
    except (TypeError, ValueError, IndexError):
        return None
    if not all(math.isfinite(d) and d > 0 for d in (dx, dy)):
        return None
    if all(round(d) in _DEFAULT_DPI for d in (dx, dy)):
        return None
    mpp = (25400.0 / dy, 25400.0 / dx)
    if not all(0.01 <= m <= 1000 for m in mpp):
        return None
    return mpp


# -- integrity checks at open ----------------------------------------------------------------
def _corrupt(path: Path, exc: BaseException) -> CorruptFileError:
    return CorruptFileError(
        path,
        f"cannot be decoded ({type(exc).__name__}: {exc})",
        "the file is truncated or damaged; copy or export it again",
    )


def _check_integrity(path: Path, fmt: str, img: Any) -> None:
    """Cheap decodability checks; raises :class:`CorruptFileError`.

    * PNG: ``Image.verify()`` walks every chunk and its CRC (no inflating), so a
      truncated or damaged file fails here, at open.
    * JPEG: a complete stream ends with the EOI marker; when it is missing from the
      file's tail the image is decoded once to decide.
    * PNM / BMP without compression: the file must hold the header plus every pixel.
    """
    if fmt == "png":
        try:
            with _open(path, allow_large=True) as probe:
                probe.verify()
        except Exception as exc:
            raise _corrupt(path, exc) from exc
        return
    if fmt == "jpeg":
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 4096))
            tail = fh.read()
        if b"\xff\xd9" in tail:
            return
        try:
            with _open(path, allow_large=True) as probe:
                probe.load()
        except Exception as exc:
            raise _corrupt(path, exc) from exc
        return
    tiles = list(getattr(img, "tile", []) or [])
    if len(tiles) != 1 or tiles[0][0] != "raw":
        return
    _, extents, offset, args = tiles[0]
    width, height = extents[2] - extents[0], extents[3] - extents[1]
    if isinstance(args, tuple) and len(args) >= 2 and args[1]:
        stride = abs(int(args[1]))
    else:
        rawmode = args[0] if isinstance(args, tuple) else args
        bits = _RAW_BITS.get(rawmode)
        if bits is None:
            return
        stride = math.ceil(width * bits / 8)
    needed = int(offset) + stride * height
    size = path.stat().st_size
    if size < needed:
        raise CorruptFileError(
            path,
            f"is truncated: {width}×{height} pixels need {needed:,} bytes but the file "
            f"holds {size:,}",
            "copy or export it again",
        )


# -- reading --------------------------------------------------------------------------------
def _open(path: Path, *, allow_large: bool) -> Any:
    """``Image.open`` with our decompression-bomb policy (see :func:`open_pyramid`)."""
    from PIL import Image

    try:
        if allow_large:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(path)
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(path, str(exc)) from exc


def _bomb_error(path: Path, detail: str) -> ImageReadError:
    return ImageReadError(
        path,
        f"is too large to decode as a plain image ({detail})",
        "convert it to a tiled, pyramidal TIFF or OME-Zarr; or, if you trust the file, "
        "raise PIL.Image.MAX_IMAGE_PIXELS (None disables the limit)",
    )


def _read_pixels(path: str, dtype: str, shape: tuple[int, ...], allow_large: bool) -> np.ndarray:
    """Decode the whole image (the single dask task)."""
    import numpy as np

    p = Path(path)
    try:
        with _open(p, allow_large=allow_large) as img:
            mode = img.mode
            target = _target_mode(img)
            frame = img.convert(target) if target != mode else img
            frame.load()
            data = np.asarray(frame)
    except ImageReadError:
        raise
    except Exception as exc:
        raise _corrupt(p, exc) from exc
    data = data.astype(dtype, copy=False)
    if data.shape != shape:
        raise CorruptFileError(
            p,
            f"decoded to shape {data.shape}, but its header announced {shape}",
            "the file changed since it was opened, or is damaged; open it again",
        )
    return data


def _target_mode(img: Any) -> str:
    mode = img.mode
    if mode == "P":
        return "RGBA" if "transparency" in img.info else "RGB"
    convert = _MODES[mode][0]
    return convert or mode


def open_pyramid(path: Path) -> Pyramid:
    """Open a PNG, JPEG, PNM or BMP image lazily.

    Parameters
    ----------
    path : Path
        The image file.

    Returns
    -------
    Pyramid
        One level, one chunk; ``kind="image"``, ``backend="pillow"``; axes ``"YX"``
        (grey, shape (H, W)) or ``"YXS"`` (colour, shape (H, W, 3) RGB or (H, W, 4) RGBA);
        dtype as in the module table. ``mpp`` (row, column) in µm/px only when the file
        states a physical resolution (PNG ``pHYs`` in pixels per metre, JPEG JFIF
        density per inch / cm, BMP pixels per metre; the 72 / 96 dpi defaults are
        ignored); otherwise ``None``.

    Raises
    ------
    ImageReadError
        An unknown or unsupported pixel mode; an image with more than
        ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's decompression-bomb limit,
        about 179 megapixels by default); a truncated or damaged file (checked at open
        where cheap, otherwise when the pixels are read).
    """
    import dask
    import dask.array as da
    import numpy as np
    from dask.base import tokenize
    from PIL import Image

    with open(path, "rb") as fh:
        fmt = _format_of(fh.read(18))
    if fmt is None:
        raise UnsupportedFormatError(
            path,
            "is not a PNG, JPEG, PNM or BMP image (unknown magic bytes)",
            "open a PNG, JPEG, PGM/PPM or BMP file",
        )
    try:
        img = _open(path, allow_large=True)
    except ImageReadError:
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    with img:
        width, height = img.size
        limit = Image.MAX_IMAGE_PIXELS
        pixels = width * height
        if limit is not None and pixels > 2 * limit:
            raise _bomb_error(
                path,
                f"{width}×{height} = {pixels / 1e6:.0f} megapixels, the limit is "
                f"{2 * limit / 1e6:.0f}",
            )
        large = limit is not None and pixels > limit
        mode = img.mode
        if mode not in _MODES and mode != "P":
            raise UnsupportedFormatError(
                path,
                f"has pixel mode {mode!r}, which this reader does not convert",
                "save it as 8/16-bit grey, RGB or RGBA",
            )
        target = _target_mode(img)
        _, dtype, channels = _MODES[target]
        if mode == "I" and fmt in ("pgm", "ppm"):
            dtype = "uint16"  # Pillow widens 16-bit PNM to int32; values fit in uint16
        info = dict(img.info)
        _check_integrity(path, fmt, img)

    shape: tuple[int, ...] = (height, width) if channels == 1 else (height, width, channels)
    axes = "YX" if channels == 1 else "YXS"
    stat = path.stat()
    token = tokenize(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    task = dask.delayed(_read_pixels, pure=True)(str(path), dtype, shape, large)
    level = da.from_delayed(task, shape=shape, dtype=np.dtype(dtype), name=f"pillow-{fmt}-{token}")
    mpp = _mpp_from_info(fmt, info)
    metadata: dict[str, Any] = {"mode": mode, "converted_to": target if target != mode else None}
    for key in ("dpi", "jfif_unit", "jfif_density", "aspect"):
        if key in info:
            value = info[key]
            metadata[key] = [float(v) for v in value] if isinstance(value, tuple) else value
    if mode in ("LA", "La"):
        metadata["alpha_dropped"] = True
    return Pyramid(
        levels=[level],
        axes=axes,
        kind="image",
        path=str(path),
        format=fmt,
        backend="pillow",
        mpp=mpp,
        metadata=metadata,
    )


# -- small whole arrays (masks, training patches) -------------------------------------------
def read_array(path: str | Path) -> np.ndarray:
    """The pixel values of a plain image as stored: palette (``P``) images keep their
    indices and 16-bit greys stay 16-bit (label masks), unlike `open_pyramid`, which
    converts to what a viewer shows.

    Raises
    ------
    ImageReadError
        The file is not a readable image, or too large to decode whole.
    """
    import numpy as np

    try:
        with _open(Path(path), allow_large=False) as img:
            if img.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(img).astype(np.uint16)
            return np.asarray(img)
    except ImageReadError:
        raise
    except Exception as exc:  # Pillow raises many types for damaged files
        raise ImageReadError(path, f"is not a readable image ({exc})") from exc


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(rows, columns) of an image file from its header only; ``None`` if unreadable."""
    try:
        with _open(Path(path), allow_large=True) as img:
            w, h = img.size
            return int(h), int(w)
    except Exception:
        return None


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (H, W) or (H, W, 3|4) uint8 as a PNG."""
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")
