"""Label masks of huge images: a multiscale label pyramid on disk, painted in windows.

A slide is 100,000 × 100,000 pixels: its label mask never fits in memory and napari
cannot paint a multiscale Labels layer. A `LabelPyramid` keeps the mask in a zarr 3
folder; an editor reads a window at level 0, paints it, and writes it back with
`LabelPyramid.write_window`, which rewrites the level-0 chunks under the window and
rebuilds **only the dirty tiles** (chunks touched) of every lower level.

Layout of ``<name>.labels.zarr``::

    zarr.json        group; attributes["napari_histo_ai_labels"] = the record (image
                     identity, classes, provenance, chunk, dtype) and attributes["ome"]
                     = NGFF 0.5 multiscales + image-label (so OME-Zarr readers open it)
    0/ 1/ ...        uint16 / uint32 arrays (*planes, H_k, W_k), chunks (1.., chunk, chunk),
                     H_k = ceil(H / 2**k); levels down by 2x until the smaller side <= chunk
    history/         journal.json (the ops list, atomic) + op-<id>.npz (before / after of
                     each window, compressed, read with allow_pickle=False)

Volumes (``ZYX``, ``TZYX``) keep one pyramid over (Y, X) per plane: levels downsample Y
and X only, ``plane=(z,)`` selects the slice. Chunks are never stored where the mask is
all background (zarr's ``write_empty_chunks=False``), so an empty 100k × 100k pyramid
costs a few kilobytes.

Downsampling
------------
Level ``k`` is level ``k - 1`` reduced by the **most frequent non-zero value of each
2 × 2 block** (`downsample_labels`); a block of background stays 0, ties go to the
first value in the order top-left, top-right, bottom-left, bottom-right. Unlike
OME-Zarr's usual stride (nearest) subsampling, a one-pixel-wide vessel or a small
nucleus stays visible at every level; it costs six comparisons per block in numpy.

Crash safety and undo
---------------------
A window write is: save the window's previous and new content (``op-<id>.npz``,
atomic) → append the op to the journal marked *pending* (atomic) → write the chunks
(each chunk file is replaced atomically by zarr) → mark the op committed (atomic).
`LabelPyramid.open` rolls back an op still pending from its saved "before", so a crash
loses at most the edit in flight. `undo` / `redo` restore the saved window and rebuild
its dirty tiles; they are journaled the same way and completed on open. The history
survives reopening; a write after an undo drops the redo branch; the oldest ops beyond
``history_limit`` are forgotten. One process edits a pyramid at a time.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import write_atomic, write_json_atomic
from ..errors import AnnotationError
from .model import HUMAN, ImageRef, default_annotator, now

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "RECORD_KEY",
    "LabelPyramid",
    "class_color",
    "downsample_labels",
    "level_shapes",
    "ngff_label_metadata",
]

#: group attribute holding the pyramid's record
RECORD_KEY = "napari_histo_ai_labels"
FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")
#: label values shown with these colours (RGBA 0-255), cycled; 0 is transparent
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
)

Box = tuple[int, int, int, int]


# ------------------------------------------------------------------------------ helpers
def downsample_labels(labels: np.ndarray) -> np.ndarray:
    """2× reduce a label array over its last two axes by the most frequent non-zero value.

    Parameters
    ----------
    labels : numpy.ndarray of int, shape (..., H, W)

    Returns
    -------
    numpy.ndarray, shape (..., ceil(H / 2), ceil(W / 2)), same dtype
        Each output pixel is the most frequent non-zero value of its 2 × 2 block (0 if
        the block is background); ties go to the first of top-left, top-right,
        bottom-left, bottom-right. Odd edges are padded with background.
    """
    h, w = labels.shape[-2:]
    if h % 2 or w % 2:
        pad = [(0, 0)] * (labels.ndim - 2) + [(0, h % 2), (0, w % 2)]
        labels = np.pad(labels, pad)
    a = labels[..., 0::2, 0::2]
    b = labels[..., 0::2, 1::2]
    c = labels[..., 1::2, 0::2]
    d = labels[..., 1::2, 1::2]
    ab, ac, ad = a == b, a == c, a == d
    bc, bd, cd = b == c, b == d, c == d
    # votes of each position (1 + equal neighbours), 0 for background
    best = a.copy()
    votes = (ab.astype(np.uint8) + ac + ad + 1) * (a != 0)
    for value, count in (
        (b, (ab.astype(np.uint8) + bc + bd + 1) * (b != 0)),
        (c, (ac.astype(np.uint8) + bc + cd + 1) * (c != 0)),
        (d, (ad.astype(np.uint8) + bd + cd + 1) * (d != 0)),
    ):
        more = count > votes  # strictly more: the earlier position wins ties
        np.copyto(best, value, where=more)
        np.copyto(votes, count, where=more)
    return best


def level_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """(H_k, W_k) of each level: 2× smaller (rounded up) until the smaller side <= ``chunk``."""
    h, w = int(shape[0]), int(shape[1])
    out = [(h, w)]
    while min(h, w) > chunk:
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


def class_color(value: int) -> list[int]:
    """The RGBA colour (0-255) shown and exported for label ``value`` (0: transparent)."""
    if value == 0:
        return [0, 0, 0, 0]
    r, g, b = _PALETTE[(int(value) - 1) % len(_PALETTE)]
    return [r, g, b, 255]


def ngff_label_metadata(
    image: ImageRef,
    n_levels: int,
    *,
    name: str,
    classes: Mapping[int, str],
    source_image: str | None = None,
) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` attributes of a label image: ``multiscales`` + ``image-label``.

    Axes are the image's plane axes (``t``, ``z``) then ``y``, ``x``. Pixel sizes: the
    slide's µm/px (unit ``micrometer``), or a volume's voxel spacing (unit
    ``millimeter`` on z, y, x); without either, scale 1 and no unit (never guessed).
    Level ``k`` pixels are ``2**k`` times larger in y, x and their centre shifts by
    ``(2**k - 1) / 2`` level-0 pixels, as in the engine's output pyramids.
    """
    letters = image.axes.lower()
    scale_yx: tuple[float, float] = (1.0, 1.0)
    unit: str | None = None
    plane_scale = [1.0] * image.n_plane
    if image.mpp is not None:
        scale_yx, unit = (float(image.mpp[0]), float(image.mpp[1])), "micrometer"
    elif image.spacing_mm is not None and len(image.spacing_mm) >= 2:
        sp = [float(v) for v in image.spacing_mm]
        scale_yx, unit = (sp[-2], sp[-1]), "millimeter"
        lead = sp[:-2]
        for i, letter in enumerate(letters[:-2]):
            if letter == "z" and len(lead) == image.n_plane:
                plane_scale[i] = lead[i]
    axes: list[dict[str, Any]] = []
    for letter in letters:
        entry: dict[str, Any] = {"name": letter}
        if letter == "t":
            entry["type"] = "time"
        elif letter in "zyx":
            entry["type"] = "space"
            if unit is not None:
                entry["unit"] = unit
        else:
            entry["type"] = "channel"
        axes.append(entry)
    datasets = []
    for k in range(n_levels):
        f = 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [*plane_scale, scale_yx[0] * f, scale_yx[1] * f]},
                    {
                        "type": "translation",
                        "translation": [0.0] * image.n_plane
                        + [(f - 1) / 2 * scale_yx[0], (f - 1) / 2 * scale_yx[1]],
                    },
                ],
            }
        )
    values = sorted(int(v) for v in classes)
    label_meta: dict[str, Any] = {
        "colors": [{"label-value": v, "rgba": class_color(v)} for v in values if v],
        "properties": [{"label-value": v, "class": classes[v]} for v in values],
    }
    if source_image is not None:
        label_meta["source"] = {"image": source_image}
    return {
        "version": "0.5",
        "multiscales": [{"name": name, "axes": axes, "datasets": datasets}],
        "image-label": label_meta,
    }


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]

    write_atomic(path, write)


def _clean_classes(classes: Mapping[int, str] | None) -> dict[int, str]:
    out: dict[int, str] = {}
    for value, name in (classes or {}).items():
        v = int(value)
        if v < 0:
            raise ValueError(f"label value {value!r} of class {name!r} is negative")
        out[v] = str(name)
    return out


def _chunk_range(lo: int, hi: int, chunk: int) -> range:
    return range(lo // chunk, -(-hi // chunk)) if hi > lo else range(0)


# ------------------------------------------------------------------------------ pyramid
class LabelPyramid:
    """A label mask of an image as a multiscale zarr pyramid on disk (see the module doc).

    Make one with `create` (empty) or `from_array` (a model's mask), reopen it with
    `open`. Attributes: ``path``, ``image`` (`ImageRef`), ``dtype``, ``chunk``,
    ``shapes`` (level (H_k, W_k)), ``planes`` (plane shape), ``annotator`` and
    ``last_rebuilt`` (level -> chunk (row, col) indices rewritten by the last write,
    undo or redo).
    """

    def __init__(self, path: Path, group: Any, *, annotator: str | None = None) -> None:
        self.path = Path(path)
        self._shown_path = self.path  # named in errors (the final path while building)
        self._group = group
        record = dict(group.attrs.get(RECORD_KEY) or {})
        if record.get("format") != FORMAT_VERSION:
            raise AnnotationError(
                path,
                f"is not a label pyramid of format {FORMAT_VERSION} (found "
                f"{record.get('format')!r} in attributes[{RECORD_KEY!r}])",
                "open a folder made by LabelPyramid.create / from_array",
            )
        self._record = record
        self.image = ImageRef.from_dict(record["image"])
        self.dtype = np.dtype(record["dtype"])
        #: the largest label value the dtype holds
        self.max_label = 2 ** (8 * self.dtype.itemsize) - 1
        self.chunk = int(record["chunk"])
        self.name = str(record.get("name", "labels"))
        self.planes: tuple[int, ...] = tuple(self.image.shape[:-2])
        self.shapes = level_shapes(self.image.shape[-2:], self.chunk)  # type: ignore[arg-type]
        try:
            self._arrays = [group[str(k)] for k in range(len(self.shapes))]
        except KeyError as exc:
            raise AnnotationError(
                path, f"level {exc} of the label pyramid is missing", "restore the folder"
            ) from exc
        self.annotator = annotator or default_annotator()
        self.last_rebuilt: dict[int, list[tuple[int, int]]] = {}
        self._history = self.path / "history"
        self._journal_path = self._history / "journal.json"
        self._journal = self._load_journal()
        self.history_limit = 1000

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        image: ImageRef,
        dtype: str = "uint16",
        chunk: int = 512,
        classes: Mapping[int, str] | None = None,
        name: str = "labels",
        annotator: str | None = None,
        source: str = HUMAN,
        model_version: str | None = None,
    ) -> LabelPyramid:
        """Create an empty (all background) label pyramid for ``image``.

        Parameters
        ----------
        path : str or Path
            The pyramid folder to create (e.g. ``slide.labels.zarr``); must not exist.
        image : ImageRef
            The image the labels belong to: its level-0 shape (plane axes then H, W)
            sets level 0, its content hash pairs the pyramid with the file.
        dtype : {"uint16", "uint32"}
        chunk : int
            Chunk side in pixels (each level's chunks are (1.., chunk, chunk)).
        classes : dict of int to str
            Label value -> class name (``{1: "tumour", 2: "stroma"}``).
        name : str
            The label image's name (OME-Zarr ``labels/<name>``).
        annotator, source, model_version : str, optional
            Provenance: who edits (default: the login name), where the first content
            came from (``"human"`` or a model's registry name) and its version.

        Raises
        ------
        AnnotationError
            ``path`` exists, or the image's shape has no (H, W).
        """
        return cls._build(
            Path(path),
            image=image,
            dtype=dtype,
            chunk=chunk,
            classes=classes,
            name=name,
            annotator=annotator,
            source=source,
            model_version=model_version,
            fill=None,
        )

    @classmethod
    def from_array(
        cls,
        path: str | Path,
        array: Any,
        *,
        image: ImageRef,
        scale: float | tuple[float, float] = 1.0,
        dtype: str | None = None,
        chunk: int = 512,
        classes: Mapping[int, str] | None = None,
        name: str = "labels",
        annotator: str | None = None,
        source: str = HUMAN,
        model_version: str | None = None,
    ) -> LabelPyramid:
        """Turn a mask (a model's output, an imported file) into an editable pyramid.

        Parameters
        ----------
        path : str or Path
            The pyramid folder to create; must not exist.
        array : numpy.ndarray or dask.array.Array of int, shape (*planes, h, w)
            Label values (0 = background), read block by block (never whole).
        image : ImageRef
        scale : float or (float, float)
            Level-0 pixels per ``array`` pixel along (row, col): 1 for a level-0 mask,
            4 for a mask computed at a quarter of the resolution. Each level-0 pixel
            takes the value of the mask pixel it falls in (nearest); ``h`` must be
            ``H / scale`` rounded up or down.
        dtype : {"uint16", "uint32"}, optional
            Default: uint16 for 8/16-bit masks, else uint32.
        chunk, classes, name, annotator, source, model_version
            As in `create`.

        Raises
        ------
        AnnotationError
            The array's shape does not fit the image at ``scale``, it holds negative,
            non-integer or too large values; nothing is left on disk.
        """
        arr = array if hasattr(array, "shape") and hasattr(array, "dtype") else np.asarray(array)
        if dtype is None:
            dtype = "uint16" if np.dtype(arr.dtype).itemsize <= 2 else "uint32"
        if isinstance(scale, int | float):
            sy = sx = float(scale)
        else:
            sy, sx = (float(v) for v in scale)
        H, W = image.shape[-2:]
        planes = tuple(image.shape[:-2])
        shape = tuple(int(v) for v in arr.shape)
        ok_plane = shape[:-2] == planes and len(shape) == len(image.shape)
        ok_rows = len(shape) >= 2 and math.floor(H / sy) <= shape[-2] <= math.ceil(H / sy)
        ok_cols = len(shape) >= 2 and math.floor(W / sx) <= shape[-1] <= math.ceil(W / sx)
        if not (ok_plane and ok_rows and ok_cols):
            expect = (*planes, math.ceil(H / sy), math.ceil(W / sx))
            raise AnnotationError(
                path,
                f"the mask has shape {shape} but image {image.path} has shape "
                f"{tuple(image.shape)}: at scale ({sy:g}, {sx:g}) level-0 px per mask px "
                f"the mask should be {expect}",
                "pass the mask made for this image, or the scale it was computed at",
            )

        def fill(pyr: LabelPyramid) -> None:
            block = pyr.chunk * 4
            for plane in np.ndindex(*planes):
                for r0 in range(0, H, block):
                    r1 = min(H, r0 + block)
                    rows = np.minimum((np.arange(r0, r1) / sy).astype(np.int64), shape[-2] - 1)
                    for c0 in range(0, W, block):
                        c1 = min(W, c0 + block)
                        cols = np.minimum((np.arange(c0, c1) / sx).astype(np.int64), shape[-1] - 1)
                        src = np.asarray(
                            arr[
                                (
                                    *plane,
                                    slice(int(rows[0]), int(rows[-1]) + 1),
                                    slice(int(cols[0]), int(cols[-1]) + 1),
                                )
                            ]
                        )
                        up = src[np.ix_(rows - rows[0], cols - cols[0])]
                        values = pyr._as_labels(up, where=f"mask block at ({r0}, {c0})")
                        if values.any():
                            pyr._arrays[0][(*plane, slice(r0, r1), slice(c0, c1))] = values
            pyr.rebuild_levels()

        return cls._build(
            Path(path),
            image=image,
            dtype=dtype,
            chunk=chunk,
            classes=classes,
            name=name,
            annotator=annotator,
            source=source,
            model_version=model_version,
            fill=fill,
        )

    @classmethod
    def _build(
        cls,
        path: Path,
        *,
        image: ImageRef,
        dtype: str,
        chunk: int,
        classes: Mapping[int, str] | None,
        name: str,
        annotator: str | None,
        source: str,
        model_version: str | None,
        fill: Callable[[LabelPyramid], None] | None,
    ) -> LabelPyramid:
        import zarr

        if path.exists():
            raise AnnotationError(
                path, "already exists", "open it with LabelPyramid.open or choose a new path"
            )
        if str(np.dtype(dtype)) not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
        if len(image.shape) < 2 or min(image.shape) < 1:
            raise AnnotationError(
                image.path, f"image shape {image.shape} has no (rows, cols)", "check the image"
            )
        if chunk < 16:
            raise ValueError(f"chunk {chunk} is too small; use at least 16 (512 is typical)")
        planes = tuple(int(v) for v in image.shape[:-2])
        shapes = level_shapes(image.shape[-2:], chunk)  # type: ignore[arg-type]
        who = annotator or default_annotator()
        stamp = now()
        cls_map = _clean_classes(classes)
        record: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "name": name,
            "image": image.to_dict(),
            "dtype": str(np.dtype(dtype)),
            "chunk": int(chunk),
            "downsample": "mode of non-zero values per 2x2 block",
            "classes": {str(k): v for k, v in sorted(cls_map.items())},
            "provenance": {
                "source": source,
                "model_version": model_version,
                "annotator": who,
                "created": stamp,
                "modified": stamp,
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            group.attrs.update(
                {
                    RECORD_KEY: record,
                    "ome": ngff_label_metadata(image, len(shapes), name=name, classes=cls_map),
                }
            )
            for k, (h, w) in enumerate(shapes):
                group.create_array(
                    str(k),
                    shape=(*planes, h, w),
                    chunks=(*(1 for _ in planes), chunk, chunk),
                    dtype=dtype,
                    fill_value=0,
                    dimension_names=[*image.axes.lower()],
                )
            (tmp / "history").mkdir()
            write_json_atomic(tmp / "history" / "journal.json", _empty_journal())
            if fill is not None:
                building = cls(tmp, group, annotator=who)
                building._shown_path = path
                fill(building)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path, annotator=who)

    @classmethod
    def open(
        cls, path: str | Path, *, image: ImageRef | None = None, annotator: str | None = None
    ) -> LabelPyramid:
        """Open a label pyramid; an edit interrupted by a crash is rolled back first.

        Parameters
        ----------
        path : str or Path
        image : ImageRef, optional
            When given, refuse a pyramid made for another image (different content
            hash, both non-empty) or another shape.
        annotator : str, optional
            Who edits from now on (default: the login name).

        Raises
        ------
        AnnotationError
            Not a label pyramid, or made for another image.
        """
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise AnnotationError(
                path, "is not a label pyramid (no zarr.json)", "check the path or create one"
            )
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        except Exception as exc:
            raise AnnotationError(
                path, f"cannot be opened as zarr ({type(exc).__name__}: {exc})"
            ) from exc
        pyr = cls(path, group, annotator=annotator)
        if image is not None:
            mine = pyr.image
            if mine.content_hash and image.content_hash and mine.content_hash != image.content_hash:
                raise AnnotationError(
                    path,
                    f"was made for image {mine.path} (content {mine.content_hash[:24]}…), "
                    f"not {image.path} (content {image.content_hash[:24]}…)",
                    "open the labels of this image, or create new ones",
                )
            if tuple(mine.shape) != tuple(image.shape):
                raise AnnotationError(
                    path,
                    f"labels of shape {tuple(mine.shape)} do not fit image {image.path} of "
                    f"shape {tuple(image.shape)}",
                    "open the labels of this image, or create new ones",
                )
        pyr._recover()
        return pyr

    # -- metadata ----------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self._arrays)

    @property
    def record(self) -> dict[str, Any]:
        """A copy of the stored record (image identity, dtype, chunk, classes, provenance)."""
        import copy

        return copy.deepcopy(self._record)

    @property
    def classes(self) -> dict[int, str]:
        """Label value -> class name."""
        return {int(k): str(v) for k, v in self._record.get("classes", {}).items()}

    @property
    def provenance(self) -> dict[str, Any]:
        """``source``, ``model_version``, ``annotator``, ``created``, ``modified`` (epoch s)."""
        return dict(self._record["provenance"])

    def set_class(self, value: int, name: str | None) -> None:
        """Name label ``value`` (``None`` removes the name); saved at once."""
        classes = self.classes
        if int(value) < 0 or int(value) > self.max_label:
            raise ValueError(f"label value {value} does not fit {self.dtype}")
        if name is None:
            classes.pop(int(value), None)
        else:
            classes[int(value)] = str(name)
        self._record["classes"] = {str(k): v for k, v in sorted(classes.items())}
        self._save_record(touch=True)

    def _save_record(self, *, touch: bool) -> None:
        if touch:
            self._record["provenance"]["modified"] = now()
            self._record["provenance"]["annotator"] = self.annotator
        self._group.attrs.update(
            {
                RECORD_KEY: self._record,
                "ome": ngff_label_metadata(
                    self.image, self.n_levels, name=self.name, classes=self.classes
                ),
            }
        )

    # -- reading -----------------------------------------------------------------------
    def levels(self) -> list[dask.array.Array]:
        """Every level as a lazy dask array (*planes, H_k, W_k), for a multiscale Labels layer."""
        import dask.array as da

        return [da.from_zarr(a) for a in self._arrays]

    def read_window(
        self, box: Sequence[float], *, plane: Sequence[int] = (), level: int = 0
    ) -> np.ndarray:
        """The labels inside ``box`` = (top, left, bottom, right) in level-0 pixels.

        The box is clipped to the image (pixel edges: floor of top/left, ceil of
        bottom/right). ``level > 0`` reads the same area at that level. Returns a
        (bottom - top, right - left) array of ``dtype`` (smaller when clipped).
        """
        pl = self._plane(plane)
        t, left, b, r = self._clip(box)
        if level:
            f = 2**level
            t, left, b, r = t // f, left // f, -(-b // f), -(-r // f)
        return np.asarray(self._arrays[level][(*pl, slice(t, b), slice(left, r))])

    # -- writing -----------------------------------------------------------------------
    def write_window(
        self,
        box: Sequence[float],
        data: np.ndarray,
        *,
        plane: Sequence[int] = (),
        label: str = "paint",
    ) -> None:
        """Write painted labels back: level 0 under ``box``, then the dirty lower tiles.

        Parameters
        ----------
        box : (top, left, bottom, right)
            Level-0 pixels (integers); the part outside the image is dropped.
        data : numpy.ndarray of int, shape (bottom - top, right - left)
            The window's new labels (non-negative, within ``dtype``).
        plane : tuple of int
            Plane indices of a volume slice (``(z,)``), ``()`` in 2-D.
        label : str
            Name of the operation in the undo history.

        A window whose content does not change is not recorded. ``last_rebuilt`` tells
        which chunks of each level were rewritten.
        """
        pl = self._plane(plane)
        data = np.asarray(data)
        t, left, b, r = (round(float(v)) for v in box)
        if data.shape != (b - t, r - left):
            raise ValueError(
                f"window data of shape {data.shape} does not fit box {tuple(box)} "
                f"(expected {(b - t, r - left)})"
            )
        ct, cl, cb, cr = self._clip((t, left, b, r))
        if cb <= ct or cr <= cl:
            self.last_rebuilt = {}
            return
        after = self._as_labels(data[ct - t : cb - t, cl - left : cr - left], where="window")
        before = np.asarray(self._arrays[0][(*pl, slice(ct, cb), slice(cl, cr))])
        if np.array_equal(before, after):
            self.last_rebuilt = {}
            return
        journal = self._journal
        op_id = int(journal["next_id"])
        name = f"op-{op_id:08d}.npz"
        _save_npz(self._history / name, before=before, after=after)
        dropped = journal["ops"][journal["position"] :]
        journal["ops"] = journal["ops"][: journal["position"]]
        journal["ops"].append(
            {
                "id": op_id,
                "label": str(label),
                "plane": list(pl),
                "box": [ct, cl, cb, cr],
                "file": name,
                "time": now(),
                "annotator": self.annotator,
            }
        )
        journal["next_id"] = op_id + 1
        journal["pending"] = {"action": "write", "op": op_id}
        self._save_journal()
        for op in dropped:
            (self._history / op["file"]).unlink(missing_ok=True)
        try:
            self._apply(pl, (ct, cl, cb, cr), after)
        except BaseException:
            try:  # roll back at once (disk full...); if that fails too, open() will
                self._recover()
            except Exception:
                pass
            raise
        journal["position"] = len(journal["ops"])
        journal["pending"] = None
        forgotten = journal["ops"][: max(0, len(journal["ops"]) - self.history_limit)]
        if forgotten:
            journal["ops"] = journal["ops"][len(forgotten) :]
            journal["position"] = len(journal["ops"])
        self._save_journal()
        for op in forgotten:
            (self._history / op["file"]).unlink(missing_ok=True)
        self._save_record(touch=True)

    def _apply(self, plane: tuple[int, ...], box: Box, values: np.ndarray) -> None:
        """Write ``values`` at level 0 and rebuild the dirty tiles of the lower levels.

        At level k the dirty area is the level k-1 dirty area halved (rounded outwards);
        only it is recomputed from the 2x larger area of level k-1 and written back, so
        each level touches the one to four chunks under it.
        """
        top, left, bottom, right = box
        self._write_level0(plane, box, values)
        c = self.chunk

        def chunks(t: int, lf: int, b: int, r: int) -> list[tuple[int, int]]:
            return [(i, j) for i in _chunk_range(t, b, c) for j in _chunk_range(lf, r, c)]

        rebuilt = {0: chunks(top, left, bottom, right)}
        for k in range(1, self.n_levels):
            top, left = top // 2, left // 2
            bottom, right = -(-bottom // 2), -(-right // 2)
            src = np.asarray(
                self._arrays[k - 1][
                    (*plane, slice(2 * top, 2 * bottom), slice(2 * left, 2 * right))
                ]
            )
            self._arrays[k][(*plane, slice(top, bottom), slice(left, right))] = downsample_labels(
                src
            )
            rebuilt[k] = chunks(top, left, bottom, right)
        self.last_rebuilt = rebuilt

    def _write_level0(self, plane: tuple[int, ...], box: Box, values: np.ndarray) -> None:
        t, left, b, r = box
        self._arrays[0][(*plane, slice(t, b), slice(left, r))] = values

    def rebuild_levels(self, *, block: int | None = None) -> None:
        """Recompute every lower level from level 0 (all planes), block by block."""
        c = self.chunk
        step = block or 4 * c
        for k in range(1, self.n_levels):
            h, w = self.shapes[k]
            for plane in np.ndindex(*self.planes):
                for r0 in range(0, h, step):
                    for c0 in range(0, w, step):
                        r1, c1 = min(h, r0 + step), min(w, c0 + step)
                        src = np.asarray(
                            self._arrays[k - 1][
                                (*plane, slice(2 * r0, 2 * r1), slice(2 * c0, 2 * c1))
                            ]
                        )
                        self._arrays[k][(*plane, slice(r0, r1), slice(c0, c1))] = downsample_labels(
                            src
                        )

    # -- undo / redo -------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return int(self._journal["position"]) > 0

    @property
    def can_redo(self) -> bool:
        return int(self._journal["position"]) < len(self._journal["ops"])

    def history(self) -> list[dict[str, Any]]:
        """The undoable ops, oldest first (``id``, ``label``, ``plane``, ``box``, ``time``,
        ``annotator``, ``applied``)."""
        pos = int(self._journal["position"])
        return [{**op, "applied": i < pos} for i, op in enumerate(self._journal["ops"])]

    def undo(self) -> str | None:
        """Undo the last applied window write; returns its label, ``None`` if nothing."""
        if not self.can_undo:
            return None
        index = int(self._journal["position"]) - 1
        op = self._journal["ops"][index]
        self._journal["pending"] = {"action": "undo", "op": op["id"]}
        self._save_journal()
        self._restore(op, "before")
        self._journal["position"] = index
        self._journal["pending"] = None
        self._save_journal()
        self._save_record(touch=True)
        return str(op["label"])

    def redo(self) -> str | None:
        """Redo the last undone window write; returns its label, ``None`` if nothing."""
        if not self.can_redo:
            return None
        index = int(self._journal["position"])
        op = self._journal["ops"][index]
        self._journal["pending"] = {"action": "redo", "op": op["id"]}
        self._save_journal()
        self._restore(op, "after")
        self._journal["position"] = index + 1
        self._journal["pending"] = None
        self._save_journal()
        self._save_record(touch=True)
        return str(op["label"])

    def _restore(self, op: Mapping[str, Any], which: str) -> None:
        file = self._history / str(op["file"])
        try:
            with np.load(file, allow_pickle=False) as saved:
                values = saved[which]
        except (OSError, KeyError, ValueError) as exc:
            raise AnnotationError(
                file,
                f"the saved {which!r} content of edit {op['id']} ({op['label']!r}) cannot "
                f"be read ({type(exc).__name__}: {exc})",
                "the history file is damaged; the edit cannot be undone or redone",
            ) from exc
        t, left, b, r = (int(v) for v in op["box"])
        self._apply(tuple(int(v) for v in op["plane"]), (t, left, b, r), values)

    # -- journal -----------------------------------------------------------------------
    def _load_journal(self) -> dict[str, Any]:
        import json

        if not self._journal_path.is_file():
            self._history.mkdir(exist_ok=True)
            return _empty_journal()
        try:
            journal = json.loads(self._journal_path.read_text(encoding="utf-8"))
            int(journal["position"])
            list(journal["ops"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AnnotationError(
                self._journal_path,
                f"the edit history cannot be read ({type(exc).__name__}: {exc})",
                "move the history/ folder aside to open the labels without undo history",
            ) from exc
        return dict(journal)

    def _save_journal(self) -> None:
        write_json_atomic(self._journal_path, self._journal, indent=None)

    def _recover(self) -> None:
        """Finish or roll back what a crash interrupted; drop orphan history files."""
        journal = self._journal
        pending = journal.get("pending")
        if pending:
            ids = [int(op["id"]) for op in journal["ops"]]
            op_id = int(pending["op"])
            index = ids.index(op_id) if op_id in ids else None
            action = pending.get("action")
            if index is not None and action == "write":
                op = journal["ops"][index]
                self._restore(op, "before")
                journal["ops"] = journal["ops"][:index]
                journal["position"] = min(int(journal["position"]), index)
                (self._history / op["file"]).unlink(missing_ok=True)
            elif index is not None and action == "undo":
                self._restore(journal["ops"][index], "before")
                journal["position"] = index
            elif index is not None and action == "redo":
                self._restore(journal["ops"][index], "after")
                journal["position"] = index + 1
            journal["pending"] = None
            self._save_journal()
        known = {str(op["file"]) for op in journal["ops"]}
        for f in self._history.glob("op-*.npz"):
            if f.name not in known:
                f.unlink(missing_ok=True)

    # -- validation --------------------------------------------------------------------
    def _plane(self, plane: Sequence[int]) -> tuple[int, ...]:
        pl = tuple(int(v) for v in plane)
        if len(pl) != len(self.planes) or any(
            not 0 <= p < n for p, n in zip(pl, self.planes, strict=False)
        ):
            raise ValueError(
                f"plane {pl} does not index the label planes {self.planes} (axes {self.image.axes})"
            )
        return pl

    def _clip(self, box: Sequence[float]) -> Box:
        if len(box) != 4:
            raise ValueError(f"box {tuple(box)} is not (top, left, bottom, right)")
        h, w = self.shapes[0]
        t = max(0, math.floor(float(box[0])))
        left = max(0, math.floor(float(box[1])))
        b = min(h, math.ceil(float(box[2])))
        r = min(w, math.ceil(float(box[3])))
        return t, left, max(t, b), max(left, r)

    def _as_labels(self, data: np.ndarray, *, where: str) -> np.ndarray:
        """``data`` as ``dtype``; AnnotationError for negative, fractional or too large."""
        data = np.asarray(data)
        top = self.max_label
        if data.dtype == bool:
            return data.astype(self.dtype)
        if data.dtype.kind not in "iuf":
            raise AnnotationError(
                self._shown_path, f"{where}: labels of dtype {data.dtype} are not numbers"
            )
        if data.size == 0:
            return data.astype(self.dtype)
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise AnnotationError(
                self._shown_path,
                f"{where}: label values must be whole numbers; found "
                f"{data[data != np.round(data)].flat[0]}",
                "round the mask or convert it to integers",
            )
        lo, hi = data.min(), data.max()
        if lo < 0:
            raise AnnotationError(
                self._shown_path,
                f"{where}: label value {lo} is negative",
                "use 0 for background and 1, 2, ... for labels",
            )
        if hi > top:
            raise AnnotationError(
                self._shown_path,
                f"{where}: label value {hi} does not fit {self.dtype} (0..{top})",
                "create the labels with dtype='uint32' for more labels",
            )
        return data.astype(self.dtype, copy=False)

    def __repr__(self) -> str:
        return (
            f"LabelPyramid({str(self.path)!r}, shape={tuple(self.image.shape)}, "
            f"levels={self.n_levels}, dtype={self.dtype})"
        )


def _empty_journal() -> dict[str, Any]:
    return {"version": 1, "ops": [], "position": 0, "next_id": 1, "pending": None}
