"""Readers: one adapter module per backend, all returning a :class:`Pyramid`.

``open_image(path)`` sniffs the file cheaply (magic bytes, folder layout, extension) and
hands it to the matching backend. Backends:

========== =========================================================== ===============
name       what                                                        module
========== =========================================================== ===============
tifffile   SVS, NDPI, generic tiled/pyramidal TIFF, OME-TIFF, plain TIFF ``io/tiff.py``
openslide  what tifffile cannot read (MRXS, VMS, SCN, BIF…), extra wsi ``io/openslide.py``
ome-zarr   OME-Zarr (NGFF multiscales) folders                         ``io/ome_zarr.py``
nibabel    NIfTI ``.nii`` / ``.nii.gz`` volumes                         ``io/nifti.py``
pillow     PNG, JPEG, PGM/PPM, BMP plain 2D images                      ``io/image.py``
========== =========================================================== ===============
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HistoAIError, ImageReadError, UnsupportedFormatError
from .pyramid import Pyramid

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["BACKENDS", "Pyramid", "detect_backend", "open_image"]

log = logging.getLogger(__name__)

#: backend name -> adapter module (relative); the order is the sniffing order.
BACKENDS: dict[str, str] = {
    "ome-zarr": ".ome_zarr",
    "nibabel": ".nifti",
    "tifffile": ".tiff",
    "pillow": ".image",
    "openslide": ".openslide",
}

#: extensions each backend claims, to explain a mismatch between name and content
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "ome-zarr": (".zarr", ".ome.zarr"),
    "nibabel": (".nii", ".nii.gz"),
    "tifffile": (".svs", ".ndpi", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8"),
    "pillow": (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pnm", ".bmp"),
    "openslide": (".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide", ".dcm"),
}


#: what a user calls the files each backend reads, for messages
FORMAT_NAMES: dict[str, str] = {
    "ome-zarr": "OME-Zarr",
    "nibabel": "NIfTI",
    "tifffile": "TIFF/SVS/NDPI",
    "pillow": "PNG/JPEG/PGM",
    "openslide": "OpenSlide (MRXS/VMS/SCN)",
}


def _adapter(name: str) -> ModuleType:
    return importlib.import_module(BACKENDS[name], __name__)


def backend_for_extension(path: str | Path) -> str | None:
    """The backend that the file name's extension points to, or ``None``."""
    name = str(path).lower().rstrip("/")
    best: tuple[int, str | None] = (0, None)
    for backend, exts in EXTENSIONS.items():
        for ext in exts:
            if name.endswith(ext) and len(ext) > best[0]:
                best = (len(ext), backend)
    return best[1]


def detect_backend(path: str | Path) -> str | None:
    """Cheaply find the backend able to read ``path``; ``None`` if none. Never raises."""
    try:
        p = Path(path)
        if not p.exists():
            return None
        for name in BACKENDS:
            try:
                if _adapter(name).sniff(p):
                    return name
            except Exception:  # a sniffer must never break detection
                log.debug("sniffer %s failed on %s", name, p, exc_info=True)
    except Exception:
        return None
    return None


def _check_path(p: Path) -> None:
    if not p.exists():
        raise ImageReadError(p, "no such file or folder", "check the path")
    if p.is_file() and p.stat().st_size == 0:
        raise ImageReadError(p, "the file is empty (0 bytes)", "copy or download it again")


def open_image(
    path: str | Path, *, backend: str = "auto", tile_cache_bytes: int | None = None
) -> Pyramid:
    """Open an image lazily as a :class:`Pyramid`.

    Parameters
    ----------
    path : str or Path
        A slide, volume, image file or OME-Zarr folder.
    backend : str, keyword-only
        ``"auto"`` (sniff the content) or one of :data:`BACKENDS`.
    tile_cache_bytes : int, keyword-only, optional
        Size of the decoded-tile cache for backends that keep one (tifffile: default
        64 MiB; 0 turns it off, e.g. to measure decoding).

    Returns
    -------
    Pyramid
        Levels as dask arrays; nothing but metadata is read.

    Raises
    ------
    ImageReadError
        The file is missing, empty, damaged or of an unknown format; the message names
        the file, the problem and what to do.
    """
    p = Path(path).expanduser()
    _check_path(p)
    if backend == "auto":
        chosen = detect_backend(p)
        if chosen is None:
            raise _unrecognised(p)
        claimed = backend_for_extension(p)
        pair = {claimed, chosen}
        if claimed is not None and claimed != chosen and pair != {"tifffile", "openslide"}:
            log.warning(
                "%s: the name suggests a %s file but the content is %s; reading it as %s",
                p,
                FORMAT_NAMES[claimed],
                FORMAT_NAMES[chosen],
                FORMAT_NAMES[chosen],
            )
    elif backend in BACKENDS:
        chosen = backend
    else:
        raise UnsupportedFormatError(
            p, f"unknown backend {backend!r}", f"use one of: auto, {', '.join(BACKENDS)}"
        )
    try:
        options = (
            {}
            if tile_cache_bytes is None or chosen != "tifffile"
            else {"tile_cache_bytes": tile_cache_bytes}
        )
        pyramid: Pyramid = _adapter(chosen).open_pyramid(p, **options)
        try:
            pyramid.validate()
        except HistoAIError:
            pyramid.close()
            raise
    except HistoAIError:
        raise
    except MemoryError as exc:
        raise ImageReadError(p, f"not enough memory to read it with {chosen}") from exc
    except Exception as exc:  # a library error deep in a damaged file
        raise ImageReadError(
            p,
            f"could not be read with the {chosen} backend: {type(exc).__name__}: {exc}",
            "the file may be truncated or corrupt; try another copy",
        ) from exc
    if pyramid.mpp is None and pyramid.kind == "slide":
        log.info("%s: no pixel size (mpp) in the file; set one to get physical units", p)
    return pyramid


def _unrecognised(p: Path) -> ImageReadError:
    if p.is_dir():
        return UnsupportedFormatError(
            p,
            "is a folder but not an OME-Zarr image (no zarr.json or .zattrs with 'multiscales')",
            "open a slide, volume or image file, or an OME-Zarr folder",
        )
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return ImageReadError(p, f"cannot be read: {exc.strerror or exc}")
    claimed = backend_for_extension(p)
    what = f"its name ends like a {FORMAT_NAMES[claimed]} file but " if claimed else ""
    return UnsupportedFormatError(
        p,
        f"{what}its content is not a format napari-histo-ai reads (starts with {head[:8]!r})",
        "supported: SVS, NDPI, (OME-)TIFF, OME-Zarr, NIfTI, PNG, JPEG, PGM; "
        "MRXS/VMS/SCN with napari-histo-ai[wsi]",
    )
