"""NIfTI-1 / NIfTI-2 volumes (``.nii``, ``.nii.gz``) through nibabel, as a lazy :class:`Pyramid`.

Every nibabel call of the package lives in this module. The voxel data are never loaded
at open: nibabel's array proxy (``img.dataobj``, which applies ``scl_slope`` /
``scl_inter`` exactly as nibabel does) is wrapped in a dask array chunked by slabs of
whole slices, and reordered lazily from the file's (X, Y, Z[, T]) to napari's
(Z, Y, X) / (T, Z, Y, X).
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptFileError, ImageReadError, UnsupportedFormatError
from .pyramid import Pyramid

if TYPE_CHECKING:
    import dask.array
    import numpy as np

__all__ = ["open_pyramid", "sniff", "write_labels"]

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"  # single-file NIfTI-1 (``ni1`` is the .hdr/.img pair)
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"

#: chunk budget (bytes) of an uncompressed ``.nii``: random access is cheap (the file
#: is memory-mapped), so small slabs keep a 2D slice view from reading much more than
#: the slice itself.
_CHUNK_BYTES_RAW = 4 * 2**20
#: chunk budget of a ``.nii.gz``: gzip has no random access, so every chunk read
#: re-decompresses the stream from the start of the file up to the chunk. Reading all
#: ``n`` chunks therefore costs about ``n / 2`` full decompressions; large chunks keep
#: ``n`` small (a typical 3D MRI is 1-2 chunks) while staying inside the 32 MiB bound
#: that keeps one chunk's memory reasonable.
_CHUNK_BYTES_GZ = 32 * 2**20

#: NIfTI ``xyzt_units`` space unit -> millimetres per unit. ``unknown`` is read as mm,
#: as nibabel, FSL, ITK and 3D Slicer do.
_MM_PER_UNIT = {"mm": 1.0, "micron": 1e-3, "meter": 1e3, "unknown": 1.0}


# -- sniffing ------------------------------------------------------------------------------
def _read_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of the (decompressed) file."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == _GZIP_MAGIC:
        with gzip.open(path, "rb") as gz:
            return gz.read(n)
    with open(path, "rb") as fh:
        return fh.read(n)


def _nifti_version(head: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI header, ``None`` otherwise."""
    if len(head) < 12:
        return None
    # sizeof_hdr, in either byte order
    sizeof_hdr = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
    if len(head) >= 348 and head[344:348] == _NIFTI1_MAGIC and 348 in sizeof_hdr:
        return 1
    if head[4:12] == _NIFTI2_MAGIC and 540 in sizeof_hdr:
        return 2
    return None


def sniff(path: Path) -> bool:
    """Whether ``path`` is a single-file NIfTI-1/2 volume (plain or gzipped).

    Reads at most 544 (decompressed) bytes of the header; never raises.
    """
    try:
        return path.is_file() and _nifti_version(_read_head(path, 544)) is not None
    except Exception:
        return False


# -- lazy array ----------------------------------------------------------------------------
class _ProxySlabs:
    """Array-like over nibabel's proxy that dask slices chunk by chunk.

    Read errors (a truncated or damaged stream found only when a chunk is read) become
    a :class:`CorruptFileError` naming the file.
    """

    def __init__(self, proxy: Any, path: Path, dtype: np.dtype) -> None:
        self._proxy = proxy
        self._path = path
        self.shape = tuple(int(s) for s in proxy.shape)
        self.ndim = len(self.shape)
        self.dtype = dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        try:
            data = self._proxy[key]
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise CorruptFileError(
                self._path,
                f"voxel data could not be read ({type(exc).__name__}: {exc})",
                "the file is truncated or damaged; copy or export it again",
            ) from exc
        return np.asarray(data, dtype=self.dtype)


def _slab_chunks(shape: tuple[int, ...], itemsize: int, budget: int) -> tuple[int, ...]:
    """Chunks of a Fortran-ordered (X, Y, Z[, T]) array that are contiguous on disk.

    Whole extents of the fastest axes are taken while they fit in ``budget`` bytes; the
    first axis that does not fit is split into balanced blocks; slower axes get 1.
    X is never split.
    """
    chunks = [shape[0]]
    room = max(1, budget // max(1, shape[0] * itemsize))
    for n in shape[1:]:
        if room >= n:
            chunks.append(n)
            room //= n
        elif room > 1:
            blocks = math.ceil(n / room)
            chunks.append(math.ceil(n / blocks))
            room = 1
        else:
            chunks.append(1)
    return tuple(chunks)


# -- checks at open ------------------------------------------------------------------------
def _check_raw_size(path: Path, data_end: int) -> None:
    size = path.stat().st_size
    if size < data_end:
        raise CorruptFileError(
            path,
            f"is truncated: the header describes {data_end:,} bytes (header + voxel data) "
            f"but the file holds only {size:,}",
            "copy or download it again",
        )


def _check_gzip_size(path: Path, data_end: int) -> None:
    """Detect a truncated ``.nii.gz`` cheaply, decompressing only when in doubt.

    The gzip trailer stores the uncompressed size modulo 2**32 in the last 4 bytes. When
    it matches the size the header implies, the stream is taken as complete; otherwise
    (a truncated file, or a rare multi-member stream) it is decompressed once to be sure.
    """
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() >= 18:
            fh.seek(-4, 2)
            (isize,) = struct.unpack("<I", fh.read(4))
            if isize == data_end % 2**32:
                return
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            while block := gz.read(16 * 2**20):
                total += len(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptFileError(
            path,
            f"the gzip stream is truncated or damaged ({type(exc).__name__}: {exc})",
            "copy or download it again, or re-export the volume",
        ) from exc
    if total < data_end:
        raise CorruptFileError(
            path,
            f"is truncated: the header describes {data_end:,} bytes (header + voxel data) "
            f"but the decompressed stream holds only {total:,}",
            "copy or download it again",
        )


def _check_not_all_nan(path: Path, proxy: Any, middle: np.ndarray) -> None:
    """Refuse a volume whose sampled voxels are all NaN.

    Looks at the middle slice (already read) and, only if that is all NaN, at a strided
    sample of the first volume (about 64×64 voxels per slice, 16 slices).
    """
    import numpy as np

    if middle.dtype.kind != "f" or not np.isnan(middle).all():
        return
    nx, ny, nz = proxy.shape[:3]
    sx, sy, sz = max(1, nx // 64), max(1, ny // 64), max(1, nz // 16)
    key: tuple[Any, ...] = (slice(None, None, sx), slice(None, None, sy), slice(None, None, sz))
    key += (0,) * (len(proxy.shape) - 3)
    sample = np.asarray(proxy[key])
    if np.isnan(sample).all():
        raise CorruptFileError(
            path,
            f"every sampled voxel is NaN (the middle slice and {middle.size + sample.size:,} "
            "voxels spread over the volume): the file holds no image data",
            "check the step that wrote it and export the volume again",
        )


# -- metadata ------------------------------------------------------------------------------
def _spacing_mm(
    header: Any, affine: np.ndarray, path: Path
) -> tuple[tuple[float, float, float], dict[str, Any]]:
    """Voxel spacing (Z, Y, X) in mm from the header zooms and ``xyzt_units``."""
    import numpy as np

    notes: dict[str, Any] = {}
    try:
        space_unit, time_unit = header.get_xyzt_units()
    except KeyError:  # an invalid unit code
        space_unit, time_unit = "unknown", "unknown"
    notes["xyzt_units"] = [space_unit, time_unit]
    factor = _MM_PER_UNIT.get(space_unit, 1.0)
    zooms = [float(z) for z in header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        # pixdim unset or damaged: fall back on the affine's column lengths
        from_affine = [float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]
        fixed = [
            z if math.isfinite(z) and z > 0 else (a if math.isfinite(a) and a > 0 else 1.0)
            for z, a in zip(zooms, from_affine, strict=True)
        ]
        log.warning(
            "%s: voxel sizes %s in the header are not positive; using %s", path, zooms, fixed
        )
        notes["spacing_fallback"] = f"header zooms {zooms} invalid; used {fixed}"
        zooms = fixed
    x, y, z = (v * factor for v in zooms)
    return (z, y, x), notes


def _orientation(affine: np.ndarray) -> str | None:
    """Axis codes of the (Z, Y, X) array axes, e.g. ``"SPL"``; ``None`` if degenerate."""
    import nibabel

    try:
        codes = nibabel.aff2axcodes(affine)
    except Exception:
        return None
    if any(c is None for c in codes[:3]):
        return None
    return "".join(str(c) for c in reversed(codes[:3]))


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("latin-1").rstrip("\x00").strip()
    return value


# -- open ----------------------------------------------------------------------------------
def _load(path: Path, version: int) -> Any:
    import nibabel
    from nibabel.filebasedimages import ImageFileError

    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise UnsupportedFormatError(
            path,
            f"holds a NIfTI-{version} volume but its name does not end in .nii or .nii.gz",
            "rename it to .nii (or .nii.gz if gzipped) so the volume can be read",
        )
    klass = nibabel.Nifti1Image if version == 1 else nibabel.Nifti2Image
    try:
        return klass.from_filename(str(path), mmap=True, keep_file_open=False)
    except ImageFileError as exc:
        raise CorruptFileError(
            path, f"is not a readable NIfTI-{version} file ({exc})", "export it again"
        ) from exc
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise CorruptFileError(
            path,
            f"the NIfTI header could not be read ({type(exc).__name__}: {exc})",
            "the file is truncated or damaged; copy or export it again",
        ) from exc


def open_pyramid(path: Path) -> Pyramid:
    """Open a NIfTI volume lazily.

    Parameters
    ----------
    path : Path
        A single-file NIfTI-1 or NIfTI-2 volume, ``.nii`` or ``.nii.gz``.

    Returns
    -------
    Pyramid
        One level, ``kind="volume"``, ``backend="nibabel"``, ``format="nifti"``:

        * axes ``"ZYX"``, shape (Z, Y, X), for a 3D file of shape (X, Y, Z);
        * axes ``"TZYX"``, shape (T, Z, Y, X), for a 4D file of shape (X, Y, Z, T).
          Trailing dimensions of length 1 (e.g. (X, Y, Z, 1)) are dropped.

        The dtype is that of nibabel's proxy: the on-disk type, or floating point when
        ``scl_slope`` / ``scl_inter`` rescale the data. ``spacing_mm`` is (Z, Y, X) in
        millimetres, converted from the header's ``xyzt_units`` (micron, metre; unknown
        is read as mm). ``orientation`` gives the anatomical codes of the (Z, Y, X) array
        axes (``"SPL"`` for an LPS file); ``mpp`` is ``None``.

        ``affine`` is the file's own 4×4 voxel-to-world matrix (nibabel's best affine:
        sform, else qform), in the header's space units, indexed by the *file's* voxel
        indices (i, j, k). The array voxel ``levels[0][z, y, x]`` (or ``[t, z, y, x]``) is
        the file's voxel (i, j, k) = (x, y, z), so its world position is
        ``affine @ [x, y, z, 1]``. The affine of the (z, y, x) array indices is
        ``affine[:, [2, 1, 0, 3]]``.

    Raises
    ------
    ImageReadError
        Not a NIfTI file, a 2D or 5D+ image, a truncated file or stream, or a volume whose
        sampled voxels are all NaN; the message names the file.

    Notes
    -----
    Chunks are slabs of whole slices (or whole volumes for a 4D file), contiguous in the
    file: about 4 MiB for ``.nii`` and 32 MiB for ``.nii.gz``, where each chunk read
    decompresses the stream from its start.
    """
    import dask.array as da
    import numpy as np
    from dask.base import tokenize

    try:
        version = _nifti_version(_read_head(path, 544))
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptFileError(
            path,
            f"the header could not be read ({type(exc).__name__}: {exc})",
            "the file is truncated or damaged; copy it again",
        ) from exc
    if version is None:
        raise UnsupportedFormatError(
            path,
            "is not a single-file NIfTI-1/2 volume (no 'n+1' / 'n+2' magic in the header)",
            "open a .nii or .nii.gz file",
        )
    img = _load(path, version)
    proxy = img.dataobj
    shape = tuple(int(s) for s in proxy.shape)
    ndim = len(shape)
    while ndim > 3 and shape[ndim - 1] == 1:
        ndim -= 1
    if ndim < 3 or ndim > 4:
        raise ImageReadError(
            path,
            f"expected a 3D or 4D volume, found shape {shape} (file order X, Y, Z, T…)",
            "2D images: save as PNG or TIFF; vector or 5D data: split into 3D/4D volumes",
        )
    if 0 in shape:
        raise CorruptFileError(path, f"has an empty dimension: shape {shape}", "export it again")

    itemsize = np.dtype(proxy.dtype).itemsize
    data_end = int(proxy.offset) + math.prod(shape) * itemsize
    compressed = path.name.lower().endswith(".gz")
    if compressed:
        _check_gzip_size(path, data_end)
    else:
        _check_raw_size(path, data_end)

    # the middle slice of the first volume: proves the data decode, gives the dtype
    # after scaling, and is the first NaN probe
    middle_key: tuple[Any, ...] = (slice(None), slice(None), shape[2] // 2)
    middle_key += (0,) * (len(shape) - 3)
    try:
        middle = np.asarray(proxy[middle_key])
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise CorruptFileError(
            path,
            f"voxel data could not be read ({type(exc).__name__}: {exc})",
            "the file is truncated or damaged; copy or export it again",
        ) from exc
    _check_not_all_nan(path, proxy, middle)

    dtype = middle.dtype.newbyteorder("=")  # native byte order for napari / torch
    budget = _CHUNK_BYTES_GZ if compressed else _CHUNK_BYTES_RAW
    chunks = _slab_chunks(shape, dtype.itemsize, budget)
    stat = path.stat()
    name = "nifti-" + tokenize(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    file_order = da.from_array(
        _ProxySlabs(proxy, path, dtype),
        chunks=chunks,
        name=name,
        meta=np.empty((0,) * len(shape), dtype=dtype),
    )
    if len(shape) > ndim:  # drop trailing singleton dimensions
        file_order = file_order[(slice(None),) * ndim + (0,) * (len(shape) - ndim)]
    level: dask.array.Array = file_order.transpose(tuple(range(ndim - 1, -1, -1)))
    axes = "ZYX" if ndim == 3 else "TZYX"

    affine = np.asarray(img.affine, dtype=np.float64)
    header = img.header
    spacing, notes = _spacing_mm(header, affine, path)
    slope, inter = header.get_slope_inter()
    metadata: dict[str, Any] = {
        "nifti_version": version,
        "file_shape": list(shape),
        "file_axes": "XYZT"[: len(shape)] if len(shape) <= 4 else None,
        "datatype": str(np.dtype(proxy.dtype)),
        "scl_slope": None if slope is None else float(slope),
        "scl_inter": None if inter is None else float(inter),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "descrip": _jsonable(header["descrip"]),
        "affine": affine.tolist(),
        **notes,
    }
    if ndim == 4:
        metadata["time_step"] = float(header.get_zooms()[3])
    return Pyramid(
        levels=[level],
        axes=axes,
        kind="volume",
        path=str(path),
        format="nifti",
        backend="nibabel",
        mpp=None,
        spacing_mm=spacing,
        orientation=_orientation(affine),
        affine=affine,
        metadata=metadata,
    )


# -- write ---------------------------------------------------------------------------------
def write_labels(data: np.ndarray, path: str | Path, *, affine: Any, description: str = "") -> Path:
    """Write a (Z, Y, X) integer label volume as a NIfTI-1 file, atomically.

    Parameters
    ----------
    data : numpy.ndarray of int, shape (Z, Y, X)
        Labels in the array order `open_pyramid` returns; stored in the file's
        (X, Y, Z) order, so reading the file back gives the same (Z, Y, X) array.
    path : str or Path
        ``.nii`` or ``.nii.gz`` (gzipped); written to a temporary file and renamed.
    affine : array-like, shape (4, 4)
        Voxel-to-world matrix of the file's voxel indices (i, j, k) = (x, y, z), in mm:
        the ``affine`` of the volume the labels belong to. Stored as sform and qform
        (code 1, scanner).
    description : str
        Header ``descrip`` (at most 79 characters kept), e.g. the class names.

    Returns
    -------
    Path
    """
    import nibabel
    import numpy as np

    from ..atomic import write_atomic

    matrix = np.asarray(affine, dtype=np.float64)
    img = nibabel.Nifti1Image(np.asarray(data).transpose(2, 1, 0), matrix)
    img.set_sform(matrix, code=1)
    img.set_qform(matrix, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("label")
    img.header["descrip"] = description[:79].encode("latin-1", "replace")
    return write_atomic(path, lambda tmp: nibabel.save(img, str(tmp)))
