"""Label masks in and out: PNG / TIFF / NPY / MICCAI text masks, OME-Zarr labels, NIfTI.

Import
------
`import_mask` reads a mask file into a numpy array after checking it fits its image:
a mask whose shape differs from the image's is refused with an `AnnotationError`
naming both shapes and saying whether it is the image transposed, a downsampled copy,
or the size of another image beside it (the MICCAI 2015 training set ships the masks of
image04 and image05 swapped). `import_nifti_labels` reads a NIfTI label volume and
refuses one whose shape or affine differs from the volume's.

Export
------
`export_ome_zarr_labels` writes ``<root>/labels/<name>``: an NGFF 0.5 (zarr v3) label
image, the one `napari_histo_ai.io.ome_zarr` reads, with ``image-label`` colours and
class names, pixel sizes in the coordinate transformations (``micrometer`` for slides,
``millimeter`` for volumes) and the image identity, classes and provenance in
``attributes["napari_histo_ai_labels"]``. `export_nifti_labels` writes a volume's labels
with the volume's own affine. Both build beside the target and rename, so an existing
good export is never replaced by a broken one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json_atomic
from ..errors import AnnotationError, HistoAIError
from .labels import RECORD_KEY, LabelPyramid, ngff_label_metadata
from .model import ImageRef

__all__ = [
    "MASK_SUFFIXES",
    "export_nifti_labels",
    "export_ome_zarr_labels",
    "import_mask",
    "import_nifti_labels",
    "read_miccai_mask",
]

#: mask files `import_mask` reads (``*_mask.txt`` is the MICCAI 2015 text format)
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".bmp", ".txt")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm")
#: sibling images looked at to explain a size mismatch (swapped masks)
_MAX_SIBLINGS = 200


# ------------------------------------------------------------------------------- import
def read_miccai_mask(path: str | Path) -> np.ndarray:
    """Read a MICCAI 2015 nucleus mask (``imageXX_mask.txt``).

    The file is ASCII: ``width height`` on the first line, then ``width * height``
    integers in row-major order (x fastest), 0 = background, 1..N = nucleus id.

    Returns
    -------
    numpy.ndarray of int64, shape (height, width)

    Raises
    ------
    AnnotationError
        A bad header, a value that is not an integer (with its line), or a count of
        values different from width × height.
    """
    path = Path(path)
    try:
        tokens = path.read_bytes().split()
    except OSError as exc:
        raise AnnotationError(path, f"cannot be read ({exc})") from exc
    try:
        width, height = int(tokens[0]), int(tokens[1])
    except (IndexError, ValueError) as exc:
        raise AnnotationError(
            path,
            "the first line must be 'width height' (two integers) of a MICCAI mask; found "
            f"{b' '.join(tokens[:2]).decode('latin-1')!r}",
            "check that this is an imageXX_mask.txt file",
        ) from exc
    values = tokens[2:]
    if width <= 0 or height <= 0 or len(values) != width * height:
        raise AnnotationError(
            path,
            f"the header says {width} × {height} = {width * height:,} pixels but the file "
            f"holds {len(values):,} values",
            "the file is truncated or damaged; copy it again",
        )
    try:
        flat = np.array(values, dtype=np.int64)
    except ValueError:
        bad = next(i for i, v in enumerate(values) if not v.lstrip(b"-").isdigit())
        raise AnnotationError(
            path,
            f"value {values[bad].decode('latin-1')!r} on line {bad + 2} is not an integer",
            "the mask must hold one integer label per line",
        ) from None
    return flat.reshape(height, width)


def _read_raster(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.asarray(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise AnnotationError(
                path, f"is not a readable .npy array ({exc})", "save it with numpy.save"
            ) from exc
    from ..errors import ImageReadError

    try:
        if suffix in (".tif", ".tiff"):
            from ..io.tiff import read_array

            return read_array(path)
        from ..io.image import read_array as read_plain

        return read_plain(path)
    except ImageReadError as exc:  # CorruptFileError too
        raise AnnotationError(path, exc.problem, exc.hint) from exc


def _image_size(path: Path) -> tuple[int, int] | None:
    """(rows, cols) of an image file from its header only; ``None`` if unreadable."""
    from ..io.image import image_size

    return image_size(path)


def _siblings_of_size(shape: tuple[int, int], folders: Sequence[Path], skip: Path) -> list[str]:
    found: list[str] = []
    seen = 0
    for folder in dict.fromkeys(folders):
        try:
            files = sorted(folder.iterdir())
        except OSError:
            continue
        for f in files:
            if f.suffix.lower() not in _IMAGE_SUFFIXES or f.resolve() == skip or "mask" in f.name:
                continue
            seen += 1
            if seen > _MAX_SIBLINGS:
                return found
            if _image_size(f) == shape:
                found.append(f.name)
    return found


def _mismatch(path: Path, mask_shape: tuple[int, ...], image: ImageRef) -> AnnotationError:
    """The error for a mask whose shape is not the image's, explaining what it matches."""
    want = tuple(int(v) for v in image.shape)
    have = tuple(int(v) for v in mask_shape)
    problem = (
        f"the mask is {' × '.join(map(str, have))} but image {Path(image.path).name} is "
        f"{' × '.join(map(str, want))} ({'plane × ' * image.n_plane}rows × columns)"
    )
    notes: list[str] = []
    hint = "import the mask made for this image; nothing was imported"
    if len(have) == len(want) and have[:-2] == want[:-2]:
        h, w = have[-2:]
        H, W = want[-2:]
        if (h, w) == (W, H):
            notes.append(
                "it matches the image transposed (rows and columns swapped): it was "
                "probably written column-major"
            )
            hint = "transpose the mask (mask.T) if it belongs to this image"
        elif h and w and H % h == 0 and W % w == 0 and H // h == W // w > 1:
            f = H // h
            notes.append(f"it is the image's size divided by {f}: a lower-resolution mask")
            hint = f"create the label pyramid with LabelPyramid.from_array(mask, scale={f})"
        if len(have) == 2:
            folders = [path.parent, Path(image.path).parent]
            others = _siblings_of_size((h, w), folders, Path(image.path).resolve())
            if others:
                notes.append(
                    f"it matches the size of {', '.join(others[:5])}: the masks of two "
                    "images may be swapped (as image04 / image05 of MICCAI 2015)"
                )
                hint = f"pair the mask with {others[0]} or get the right mask; nothing was imported"
    elif len(have) != len(want):
        notes.append(f"the mask has {len(have)} dimensions, the image {len(want)}")
    if notes:
        problem += "; " + "; ".join(notes)
    return AnnotationError(path, problem, hint)


def _as_label_values(path: Path, data: np.ndarray, classes: Mapping[int, str] | None) -> np.ndarray:
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise AnnotationError(path, f"holds {data.dtype} values, not label numbers")
    whole = data.dtype.kind != "f" or (
        bool(np.all(np.isfinite(data))) and np.array_equal(data, np.round(data))
    )
    if not whole:
        bad = data[~(np.isfinite(data) & (data == np.round(data)))].flat[0]
        raise AnnotationError(
            path,
            f"label values must be whole numbers; found {bad}",
            "save the mask as integers (0 = background)",
        )
    if data.size == 0:
        return data.astype(np.uint16)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0:
        raise AnnotationError(
            path, f"holds negative label value {lo}", "use 0 for background, 1.. for labels"
        )
    if hi > 2**32 - 1:
        raise AnnotationError(path, f"label value {hi} does not fit uint32")
    if classes is not None:
        values = np.unique(data)
        unknown = [int(v) for v in values if v != 0 and int(v) not in classes]
        if unknown:
            known = ", ".join(f"{k}={v}" for k, v in sorted(classes.items())) or "none"
            raise AnnotationError(
                path,
                f"label values {unknown[:10]}{'…' if len(unknown) > 10 else ''} are not in "
                f"the classes ({known})",
                "add the missing classes or fix the mask; nothing was imported",
            )
    return data.astype(np.uint16 if hi <= 2**16 - 1 else np.uint32)


def import_mask(
    path: str | Path, *, image: ImageRef, classes: Mapping[int, str] | None = None
) -> np.ndarray:
    """Read a label mask for ``image``, refusing one that does not fit it.

    Parameters
    ----------
    path : str or Path
        PNG / BMP (8- or 16-bit grey or palette indices), TIFF, ``.npy`` (read with
        ``allow_pickle=False``) or a MICCAI 2015 ``*_mask.txt``. An RGB(A) file whose
        colour channels are all equal is read as grey.
    image : ImageRef
        The image the mask belongs to; the mask must have its shape (planes, rows,
        columns).
    classes : dict of int to str, optional
        When given, every non-zero value must be one of its keys.

    Returns
    -------
    numpy.ndarray of uint16 (uint32 above 65535), shape ``image.shape``
        0 = background.

    Raises
    ------
    AnnotationError
        Unreadable file; a shape other than the image's (the message names both shapes
        and whether the mask matches the image transposed, a downsampled size or another
        image beside it); a colour mask; negative, fractional or unknown label values.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "no such mask file", "check the path")
    suffix = path.suffix.lower()
    if suffix not in MASK_SUFFIXES:
        raise AnnotationError(
            path,
            f"mask files ending in {suffix!r} are not read",
            f"save the mask as one of {', '.join(MASK_SUFFIXES)}",
        )
    data = read_miccai_mask(path) if suffix == ".txt" else _read_raster(path)
    want = tuple(int(v) for v in image.shape)
    if data.ndim == len(want) + 1 and data.shape[-1] in (3, 4) and data.shape[:-1] == want:
        rgb = data[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise AnnotationError(
                path,
                f"is a colour image ({data.shape[-1]} channels with different values), not "
                "a label mask",
                "save one label number per pixel (grey or palette PNG, TIFF or .npy)",
            )
        data = rgb[..., 0]
    if tuple(data.shape) != want:
        raise _mismatch(path, tuple(data.shape), image)
    return _as_label_values(path, data, classes)


# ------------------------------------------------------------------------------- export
def _replace_folder(built: Path, target: Path) -> None:
    """Move the finished folder ``built`` to ``target``, keeping the old one until then."""
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    had_old = target.exists()
    if had_old:
        target.rename(backup)
    try:
        built.rename(target)
    except BaseException:
        if had_old:
            backup.rename(target)
        raise
    if had_old:
        shutil.rmtree(backup, ignore_errors=True)


def _zarr_v3_group_attrs(folder: Path) -> dict[str, Any] | None:
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnotationError(folder, f"its zarr.json cannot be read ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise AnnotationError(folder, "is a zarr array, not a group", "export into a folder")
    attrs = doc.get("attributes")
    return dict(attrs) if isinstance(attrs, dict) else {}


def export_ome_zarr_labels(
    pyramid: LabelPyramid, path: str | Path, *, name: str = "labels"
) -> Path:
    """Write ``pyramid`` as the OME-Zarr (NGFF 0.5) label image ``<path>/labels/<name>``.

    Parameters
    ----------
    pyramid : LabelPyramid
    path : str or Path
        An OME-Zarr root (zarr v3): an NGFF 0.5 image folder or a new folder (created as
        an empty group). Writing into the image's own folder changes its
        `content_hash` (the hash covers the folder's files).
    name : str
        The label image's name; an existing ``labels/<name>`` is replaced only once the
        new one is complete.

    Returns
    -------
    Path
        The label image folder ``<path>/labels/<name>``; it opens with
        `napari_histo_ai.io.open_image` as a multiscale image (uint16/uint32 levels).

    Raises
    ------
    AnnotationError
        ``path`` is a file, a zarr v2 (NGFF 0.4) folder, or not a group.
    """
    import zarr

    root = Path(path)
    if root.exists() and not root.is_dir():
        raise AnnotationError(root, "is a file, not an OME-Zarr folder", "pass a folder path")
    if (root / ".zattrs").exists() or (root / ".zgroup").exists():
        raise AnnotationError(
            root,
            "is a zarr v2 (NGFF 0.4) folder; labels are written as NGFF 0.5 (zarr v3)",
            "export into a new folder, or convert the image to NGFF 0.5",
        )
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"label name {name!r} must be a plain folder name")
    root_attrs = _zarr_v3_group_attrs(root) if root.exists() else None
    if root_attrs is None:
        write_json_atomic(
            root / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}}
        )
    labels_dir = root / "labels"
    labels_attrs = _zarr_v3_group_attrs(labels_dir) or {}
    labels_dir.mkdir(parents=True, exist_ok=True)
    target = labels_dir / name
    source_image = "../../" if root_attrs and "multiscales" in root_attrs.get("ome", {}) else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=labels_dir))
    try:
        for k in range(pyramid.n_levels):  # a zarr v3 array folder is self-contained
            shutil.copytree(pyramid.path / str(k), tmp / str(k))
        record = {
            **pyramid.record,  # image identity (path, content hash, mpp), classes, provenance
            "name": name,
            "exported_from": str(pyramid.path),
        }
        ome = ngff_label_metadata(
            pyramid.image,
            pyramid.n_levels,
            name=name,
            classes=pyramid.classes,
            source_image=source_image,
        )
        write_json_atomic(
            tmp / "zarr.json",
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"ome": ome, RECORD_KEY: record},
            },
        )
        check = zarr.open_group(str(tmp), mode="r", zarr_format=3)
        for k, (h, w) in enumerate(pyramid.shapes):
            level = check[str(k)]
            if not isinstance(level, zarr.Array) or tuple(level.shape[-2:]) != (h, w):
                raise AnnotationError(tmp, f"level {k} was not copied whole")
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ome_labels = dict(labels_attrs.get("ome", {}))
    names = [n for n in ome_labels.get("labels", []) if n != name] + [name]
    ome_labels.update({"version": "0.5", "labels": names})
    write_json_atomic(
        labels_dir / "zarr.json",
        {"zarr_format": 3, "node_type": "group", "attributes": {**labels_attrs, "ome": ome_labels}},
    )
    return target


def _volume_affine(image: ImageRef, where: str | Path) -> np.ndarray:
    """The 4×4 voxel-to-world (mm) affine of the file voxel order (x, y, z)."""
    if image.affine is not None:
        return np.asarray(image.affine, dtype=np.float64)
    if image.spacing_mm is not None and len(image.spacing_mm) == 3:
        z, y, x = (float(v) for v in image.spacing_mm)
        return np.diag([x, y, z, 1.0])
    raise AnnotationError(
        where,
        f"image {image.path} has neither an affine nor a voxel spacing",
        "open the volume from its NIfTI file so its affine is known",
    )


def export_nifti_labels(pyramid: LabelPyramid, path: str | Path) -> Path:
    """Write a volume's labels as NIfTI-1 with the volume's affine.

    Parameters
    ----------
    pyramid : LabelPyramid
        Labels of a ``ZYX`` volume; level 0 is read whole (a volume is small).
    path : str or Path
        ``.nii`` or ``.nii.gz``; written through a temporary file and a rename.

    Returns
    -------
    Path
        The file: file voxel (x, y, z) holds ``labels[z, y, x]`` (the volume's own voxel
        order), affine = `ImageRef.affine` (or the diagonal of ``spacing_mm`` when the
        volume had no affine), units mm, intent "label".

    Raises
    ------
    AnnotationError
        Not a ZYX volume, or no affine / spacing known.
    """
    from ..io.nifti import write_labels

    image = pyramid.image
    target = Path(path)
    if image.axes != "ZYX":
        raise AnnotationError(
            target,
            f"NIfTI labels are written for ZYX volumes; these labels are {image.axes} "
            f"{tuple(image.shape)}",
            "export 2-D labels as OME-Zarr, PNG or TIFF",
        )
    if not (target.name.endswith(".nii") or target.name.endswith(".nii.gz")):
        raise AnnotationError(target, "a NIfTI file name must end in .nii or .nii.gz")
    affine = _volume_affine(image, target)
    data = np.asarray(pyramid.levels()[0])
    classes = ", ".join(f"{k}={v}" for k, v in sorted(pyramid.classes.items()))
    out = write_labels(data, target, affine=affine, description=classes[:79])
    # NIfTI's header has 80 characters of text: the provenance goes to a sidecar
    write_json_atomic(nifti_sidecar_path(out), _export_record(pyramid, "nifti-labels"))
    return out


def nifti_sidecar_path(path: str | Path) -> Path:
    """The provenance file of a NIfTI labels export: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _export_record(pyramid: LabelPyramid, fmt: str) -> dict[str, Any]:
    """File-level provenance of a label export: image identity and µm/px (or spacing),
    classes, the labels' source / model version / annotator, export time, our version."""
    import time

    from .. import __version__

    record = pyramid.record
    return {
        "format": fmt,
        "software": "napari-histo-ai",
        "version": __version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image": pyramid.image.to_dict(),
        "mpp": list(pyramid.image.pixel_um) if pyramid.image.pixel_um else None,
        "spacing_mm": list(pyramid.image.spacing_mm) if pyramid.image.spacing_mm else None,
        "classes": {str(k): v for k, v in sorted(pyramid.classes.items())},
        "provenance": record.get("provenance", {}),
    }


def import_nifti_labels(path: str | Path, *, image: ImageRef) -> np.ndarray:
    """Read NIfTI labels of ``image`` (a ZYX volume), refusing another grid.

    Returns
    -------
    numpy.ndarray of uint16 (uint32 above 65535), shape (Z, Y, X) = ``image.shape``

    Raises
    ------
    AnnotationError
        The file is not a readable 3-D NIfTI, its shape or affine differs from the
        image's (both named), or it holds negative or fractional values.
    """
    from ..io import nifti

    path = Path(path)
    try:
        volume = nifti.open_pyramid(path)
    except HistoAIError as exc:
        raise AnnotationError(path, f"cannot be read as NIfTI labels: {exc}") from exc
    shape = tuple(int(v) for v in volume.levels[0].shape)
    if volume.axes != "ZYX" or shape != tuple(image.shape):
        raise _mismatch(path, shape, image)
    if image.affine is not None and volume.affine is not None:
        mine = np.asarray(volume.affine, dtype=np.float64)
        want = np.asarray(image.affine, dtype=np.float64)
        if not np.allclose(mine, want, atol=1e-4, rtol=1e-5):
            raise AnnotationError(
                path,
                f"its affine {np.round(mine, 4).tolist()} differs from the volume's "
                f"{np.round(want, 4).tolist()}: the labels lie on another voxel grid",
                "resample the labels onto the volume (same shape and affine) first",
            )
    data = np.asarray(volume.levels[0])
    volume.close()
    return _as_label_values(path, data, None)
