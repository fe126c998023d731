"""OME-Zarr (NGFF ``multiscales``) folders through zarr-python, as a lazy :class:`Pyramid`.

Supported layouts: NGFF 0.4 (zarr v2, ``.zattrs`` with ``multiscales``), NGFF 0.5 (zarr
v3, ``zarr.json`` with ``attributes["ome"]["multiscales"]``), the older 0.1-0.3 flavours
of the same JSON, and a ``bioformats2raw`` wrapper (the image in its series ``0``).
The metadata are parsed here (a small JSON spec); zarr only opens the arrays.

Axis mapping
------------
NGFF axes map to our letters by name (else by type): ``t``/time → ``T``, ``c``/channel →
``S``, ``z``/``y``/``x`` → ``Z``/``Y``/``X``. Then, lazily:

* axes ``t``, ``c`` and ``z`` of length 1 are dropped (bioformats2raw writes every image
  as 5D ``tczyx``);
* an RGB-like channel axis (3 or 4 channels of uint8) is moved last, so napari renders
  it as colour (``"YXS"``); any other channel axis stays where it is (``"SYX"``,
  ``"TSZYX"``…) and napari can split it into one layer per channel;
* spatial axes are put in Z, Y, X order within the positions they occupy.

Physical size
-------------
``mpp`` (row, column) in µm/px is the y and x ``scale`` of dataset 0 (times any
multiscale-level scale) converted from the axes' length ``unit``; ``spacing_mm`` is the
(Z, Y, X) scale in mm when every spatial axis has a length unit. Without units both are
``None`` (never guessed). ``kind`` is ``"volume"`` with a z axis and length units,
``"slide"`` for 2D with length units or RGB-like channels, else ``"image"``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import CorruptFileError, ImageReadError, UnsupportedFormatError
from .pyramid import Kind, Pyramid

if TYPE_CHECKING:
    import dask.array

__all__ = ["open_pyramid", "sniff"]

log = logging.getLogger(__name__)

#: metadata files larger than this are not OME-Zarr group attributes worth sniffing
_MAX_JSON_BYTES = 16 * 2**20

_LETTER_BY_NAME = {"t": "T", "time": "T", "c": "S", "channel": "S", "z": "Z", "y": "Y", "x": "X"}
_LETTER_BY_TYPE = {"time": "T", "channel": "S"}

#: UDUNITS-2 length units (as NGFF names them, plus common abbreviations) -> µm per unit
_UM_PER_UNIT = {
    "angstrom": 1e-4,
    "picometer": 1e-6,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "decimeter": 1e5,
    "meter": 1e6,
    "m": 1e6,
    "inch": 25400.0,
    "foot": 304800.0,
}


# -- locating the multiscales metadata -----------------------------------------------------
@dataclass
class _Found:
    """Where the multiscales JSON of an image lives."""

    root: Path  # the image group folder (a bioformats2raw series, or the folder itself)
    meta_file: Path  # zarr.json or .zattrs
    zarr_format: Literal[2, 3]
    multiscales: Any  # attributes "multiscales" value (unvalidated)
    attrs: dict[str, Any] = field(default_factory=dict)  # attributes holding it
    version: str | None = None  # "ome" block version (NGFF 0.5)


def _load_json(meta_file: Path, folder: Path) -> Any:
    try:
        with open(meta_file, "rb") as fh:
            text = fh.read(_MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise ImageReadError(folder, f"{meta_file.name} cannot be read: {exc}") from exc
    if len(text) > _MAX_JSON_BYTES:
        raise CorruptFileError(folder, f"{meta_file.name} is larger than 16 MiB")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise CorruptFileError(
            folder,
            f"its {meta_file.name} is not valid JSON ({exc.args[0] if exc.args else exc}{where})",
            "fix the file or convert the image to OME-Zarr again",
        ) from exc


def _locate(folder: Path, *, depth: int = 0) -> _Found | None:
    """Find the multiscales metadata of ``folder``; ``None`` when it is not OME-Zarr.

    Raises :class:`CorruptFileError` when a metadata file is not valid JSON.
    """
    v3, v2 = folder / "zarr.json", folder / ".zattrs"
    attrs: Any
    version: str | None = None
    fmt: Literal[2, 3]
    if v3.is_file():
        doc = _load_json(v3, folder)
        attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
        fmt, meta_file = 3, v3
        ome = attrs.get("ome") if isinstance(attrs, dict) else None
        if isinstance(ome, dict):  # NGFF >= 0.5
            version = str(ome["version"]) if "version" in ome else None
            attrs = ome
    elif v2.is_file():
        attrs = _load_json(v2, folder)
        fmt, meta_file = 2, v2
    else:
        return None
    if not isinstance(attrs, dict):
        return None
    if "multiscales" in attrs:
        return _Found(folder, meta_file, fmt, attrs["multiscales"], attrs, version)
    if "bioformats2raw.layout" in attrs and depth == 0 and (folder / "0").is_dir():
        return _locate(folder / "0", depth=1)
    return None


def _image_folder(path: Path) -> Path:
    """The folder to open: ``path`` itself, or the parent of a picked metadata file."""
    if path.is_file() and path.name in ("zarr.json", ".zattrs"):
        return path.parent
    return path


def sniff(path: Path) -> bool:
    """Whether ``path`` is an OME-Zarr image folder (or its ``zarr.json`` / ``.zattrs``).

    Reads only the group metadata JSON; never raises. A metadata file that mentions
    ``multiscales`` but is not valid JSON is claimed too, so that :func:`open_pyramid`
    can say what is wrong with it.
    """
    try:
        folder = _image_folder(path)
        if not folder.is_dir():
            return False
        try:
            return _locate(folder) is not None
        except CorruptFileError:
            for name in ("zarr.json", ".zattrs"):
                meta = folder / name
                if meta.is_file():
                    with open(meta, "rb") as fh:
                        return b'"multiscales"' in fh.read(_MAX_JSON_BYTES)
            return False
    except Exception:
        return False


# -- parsing -------------------------------------------------------------------------------
def _bad(found: _Found, problem: str) -> CorruptFileError:
    return CorruptFileError(
        found.root,
        f"malformed OME-Zarr metadata in {found.meta_file.name}: {problem}",
        "fix the metadata or convert the image to OME-Zarr again (NGFF 0.4 / 0.5)",
    )


def _axes(found: _Found, ms: dict[str, Any], ndim: int) -> list[dict[str, Any]]:
    """The axes as dicts with ``name``, ``type`` and ``unit`` (NGFF 0.3 strings allowed)."""
    raw = ms.get("axes")
    if raw is None:  # NGFF 0.1 / 0.2: implicitly 5D tczyx
        if ndim == 5:
            raw = ["t", "c", "z", "y", "x"]
        else:
            raise _bad(found, f"no 'axes' and the arrays are {ndim}D (only 5D implies tczyx)")
    if not isinstance(raw, list) or not raw:
        raise _bad(found, "'axes' must be a non-empty list")
    axes = []
    for ax in raw:
        if isinstance(ax, str):
            axes.append({"name": ax})
        elif isinstance(ax, dict) and isinstance(ax.get("name"), str):
            axes.append(ax)
        else:
            raise _bad(found, f"axis {ax!r} has no name")
    if len(axes) != ndim:
        raise _bad(found, f"{len(axes)} axes are listed but dataset 0 has {ndim} dimensions")
    return axes


def _letters(found: _Found, axes: list[dict[str, Any]]) -> str:
    letters = []
    for ax in axes:
        name = ax["name"].lower()
        letter = _LETTER_BY_NAME.get(name) or _LETTER_BY_TYPE.get(str(ax.get("type", "")))
        if letter is None:
            raise UnsupportedFormatError(
                found.root,
                f"has an axis {ax['name']!r} (type {ax.get('type')!r}) this reader does "
                "not map; expected t, c, z, y, x",
                "re-export the image with standard NGFF axes",
            )
        letters.append(letter)
    text = "".join(letters)
    if len(set(text)) != len(text):
        raise _bad(found, f"axes {[a['name'] for a in axes]} repeat a dimension")
    if "Y" not in text or "X" not in text:
        raise _bad(found, f"axes {[a['name'] for a in axes]} lack y or x")
    return text


def _transform_vectors(
    found: _Found, transforms: Any, ndim: int, where: str
) -> tuple[list[float] | None, list[float] | None]:
    """(scale, translation) of a ``coordinateTransformations`` list; ``None`` if absent."""
    if transforms is None:
        return None, None
    if not isinstance(transforms, list):
        raise _bad(found, f"{where} coordinateTransformations must be a list")
    scale: list[float] | None = None
    translation: list[float] | None = None
    for tr in transforms:
        if not isinstance(tr, dict):
            raise _bad(found, f"{where} has a transformation that is not an object: {tr!r}")
        kind = tr.get("type")
        if kind in ("scale", "translation") and "path" in tr and kind not in tr:
            log.info("%s: %s %s stored in a file is not supported", found.root, where, kind)
            continue
        if kind not in ("scale", "translation"):
            continue
        values = tr.get(kind)
        if (
            not isinstance(values, list)
            or len(values) != ndim
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        ):
            raise _bad(found, f"{where} {kind} {values!r} is not {ndim} finite numbers")
        if kind == "scale":
            scale = [float(v) for v in values]
        else:
            translation = [float(v) for v in values]
    return scale, translation


def _datasets(found: _Found, ms: dict[str, Any]) -> list[dict[str, Any]]:
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _bad(found, "'datasets' must be a non-empty list of {'path': ...}")
    for ds in datasets:
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or not ds["path"]:
            raise _bad(found, f"dataset {ds!r} has no 'path'")
    return datasets


def _open_array(found: _Found, group: Any, path: str) -> Any:
    import zarr

    try:
        node = group[path]
    except (KeyError, FileNotFoundError) as exc:
        raise CorruptFileError(
            found.root,
            f"dataset {path!r} listed in multiscales is missing",
            "the conversion may be incomplete; convert the image to OME-Zarr again",
        ) from exc
    if not isinstance(node, zarr.Array):
        raise _bad(found, f"dataset {path!r} is a group, not an array")
    return node


# -- open ----------------------------------------------------------------------------------
def open_pyramid(path: Path) -> Pyramid:
    """Open an OME-Zarr image folder lazily.

    Parameters
    ----------
    path : Path
        The OME-Zarr folder (or its ``zarr.json`` / ``.zattrs`` file). The first image of
        ``multiscales`` is opened; a ``bioformats2raw`` folder opens its series ``0``.

    Returns
    -------
    Pyramid
        ``backend="ome-zarr"``, ``format="ome-zarr"``; one level per NGFF dataset, each a
        ``dask.array.from_zarr`` over the native chunks (or shards), axes and physical
        size as described in the module docstring. ``metadata`` holds the NGFF version,
        the original axes, each level's scale and translation, and the ``omero`` channel
        names when present.

    Raises
    ------
    ImageReadError
        Not an OME-Zarr folder; invalid JSON; malformed multiscales (missing datasets or
        axes, wrong vector lengths); unsupported axes; a dataset listed but missing.
    """
    import dask.array as da
    import zarr

    folder = _image_folder(path)
    found = _locate(folder) if folder.is_dir() else None
    if found is None:
        raise UnsupportedFormatError(
            path,
            "is not an OME-Zarr image (no zarr.json or .zattrs with 'multiscales')",
            "open an OME-Zarr folder written with NGFF 0.4 or 0.5",
        )
    if not isinstance(found.multiscales, list) or not found.multiscales:
        raise _bad(found, "'multiscales' must be a non-empty list")
    ms = found.multiscales[0]
    if not isinstance(ms, dict):
        raise _bad(found, "multiscales[0] must be an object")
    version = found.version or (str(ms["version"]) if "version" in ms else None)
    datasets = _datasets(found, ms)

    try:
        group = zarr.open_group(str(found.root), mode="r", zarr_format=found.zarr_format)
    except Exception as exc:
        raise CorruptFileError(
            found.root,
            f"the zarr group cannot be opened ({type(exc).__name__}: {exc})",
            "check that the folder is complete",
        ) from exc
    arrays = [_open_array(found, group, ds["path"]) for ds in datasets]
    ndim = arrays[0].ndim
    axes_meta = _axes(found, ms, ndim)
    letters = _letters(found, axes_meta)
    for ds, arr in zip(datasets, arrays, strict=True):
        if arr.ndim != ndim or arr.dtype != arrays[0].dtype:
            raise _bad(
                found,
                f"dataset {ds['path']!r} is {arr.ndim}D {arr.dtype}, dataset 0 is "
                f"{ndim}D {arrays[0].dtype}",
            )

    global_scale, _ = _transform_vectors(
        found, ms.get("coordinateTransformations"), ndim, "multiscales"
    )
    scales: list[list[float] | None] = []
    translations: list[list[float] | None] = []
    for ds in datasets:
        scale, translation = _transform_vectors(
            found, ds.get("coordinateTransformations"), ndim, f"dataset {ds['path']!r}"
        )
        if scale is not None and global_scale is not None:
            scale = [a * b for a, b in zip(scale, global_scale, strict=True)]
        elif scale is None:
            scale = global_scale
        scales.append(scale)
        translations.append(translation)

    # levels, largest first (NGFF requires that order; a reversed list is sorted);
    # a level no smaller than the one before it is dropped
    spatial = [i for i, a in enumerate(letters) if a in "ZYX"]
    sizes = [math.prod(int(arr.shape[j]) for j in spatial) for arr in arrays]
    levels: list[dask.array.Array] = []
    kept: list[int] = []
    for i in sorted(range(len(arrays)), key=lambda i: -sizes[i]):
        if kept and sizes[i] >= sizes[kept[-1]]:
            log.warning(
                "%s: dataset %r (shape %s) is the same size as dataset %r; skipped",
                found.root,
                datasets[i]["path"],
                arrays[i].shape,
                datasets[kept[-1]]["path"],
            )
            continue
        arr = arrays[i]
        chunks = getattr(arr, "shards", None) or arr.chunks
        levels.append(da.from_zarr(arr, chunks=chunks))
        kept.append(i)

    # drop singleton t / c / z, move an RGB-like channel last, order spatial axes Z, Y, X
    shape0 = arrays[kept[0]].shape
    keep_axes = [i for i, a in enumerate(letters) if not (a in "TSZ" and shape0[i] == 1)]
    dropped = "".join(letters[i] for i in range(ndim) if i not in keep_axes)
    order = list(keep_axes)
    channel = next((i for i in order if letters[i] == "S"), None)
    rgb_like = channel is not None and shape0[channel] in (3, 4) and arrays[0].dtype == "uint8"
    if rgb_like and channel is not None:
        order.remove(channel)
        order.append(channel)
    slots = [k for k, i in enumerate(order) if letters[i] in "ZYX"]
    spatial_sorted = sorted((order[k] for k in slots), key=lambda i: "ZYX".index(letters[i]))
    for k, i in zip(slots, spatial_sorted, strict=True):
        order[k] = i
    index = tuple(slice(None) if i in keep_axes else 0 for i in range(ndim))
    # after indexing, axis i of the original sits at keep_axes.index(i)
    perm = tuple(keep_axes.index(i) for i in order)
    levels = [lv[index].transpose(perm) for lv in levels]
    axes = "".join(letters[i] for i in order)
    if rgb_like:  # one task per tile for all colour channels, not one per channel
        levels = [lv.rechunk({len(axes) - 1: -1}) for lv in levels]

    # physical size from dataset 0
    scale0 = scales[kept[0]]
    units = {letters[i]: axes_meta[i].get("unit") for i in range(ndim)}
    size_um: dict[str, float] = {}
    if scale0 is not None:
        for i, letter in enumerate(letters):
            factor = _UM_PER_UNIT.get(str(units[letter]).strip().lower()) if units[letter] else None
            if letter in "ZYX" and factor is not None and scale0[i] > 0:
                size_um[letter] = scale0[i] * factor
    spatial_axes = "".join(a for a in axes if a in "ZYX")
    mpp = (size_um["Y"], size_um["X"]) if "Y" in size_um and "X" in size_um else None
    spacing_mm: tuple[float, ...] | None = None
    kind: Kind = "image"
    if "Z" in spatial_axes:
        if all(a in size_um for a in "ZYX"):
            spacing_mm = tuple(size_um[a] / 1000.0 for a in "ZYX")
            kind = "volume"
    elif mpp is not None or rgb_like:
        kind = "slide"

    omero = found.attrs.get("omero")
    channel_names = None
    if isinstance(omero, dict) and isinstance(omero.get("channels"), list):
        channel_names = [str(c.get("label", "")) for c in omero["channels"] if isinstance(c, dict)]
    metadata: dict[str, Any] = {
        "ngff_version": version,
        "zarr_format": found.zarr_format,
        "name": ms.get("name"),
        "ngff_axes": [dict(a) for a in axes_meta],
        "dropped_singleton_axes": dropped,
        "datasets": [datasets[i]["path"] for i in kept],
        "scale": [scales[i] for i in kept],
        "translation": [translations[i] for i in kept],
        "channel_names": channel_names,
        "image_folder": str(found.root),
    }
    return Pyramid(
        levels=levels,
        axes=axes,
        kind=kind,
        path=str(path),
        format="ome-zarr",
        backend="ome-zarr",
        mpp=mpp,
        spacing_mm=spacing_mm,
        metadata=metadata,
    )
