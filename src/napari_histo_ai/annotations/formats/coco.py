"""COCO JSON (object detection / instance segmentation): boxes, polygons and masks.

Coordinates are level-0 pixels, continuous (pixel ``i`` spans ``[i, i + 1)``), COCO's
(x, y) = (column, row).

Export (`export_coco`)
----------------------
::

    {"info": {..., "histo_ai": <file provenance>},
     "images": [{"id": 1, "file_name": "slide.svs", "width": W, "height": H,
                 "histo_ai": {"path", "content_hash", "mpp", "shape", "axes"}}],
     "categories": [{"id": 1, "name": "mass", "supercategory": ""}, ...],
     "annotations": [{"id", "image_id": 1, "category_id", "bbox": [x, y, w, h],
                      "segmentation": [[x0, y0, x1, y1, ...]], "area", "iscrowd": 0,
                      "score" (model objects), "histo_ai": {kind, provenance...,
                      "measurements"}}]}

* Categories are ``classes`` in order (ids 1, 2, …), then any other class met.
* A polygon's segmentation is its ring; a box's is its rectangle; ``area`` is the
  polygon's area in px².
* **Points, lines and polylines are not COCO objects: they are skipped** and counted in
  ``info.histo_ai.skipped`` (COCO keypoints need a skeleton per category, which these
  are not).
* ``label_masks={class index: (H, W) integer label image}`` adds instance masks: every
  label > 0 of the image becomes one annotation of class ``classes[index]`` with an
  **uncompressed RLE** segmentation (`mask_to_rle`, column-major counts as in
  pycocotools), its ``bbox`` and ``area`` = pixel count. Only 2-D images.

Import (`import_coco`)
----------------------
The image is found in ``images`` by ``image_id=``, else by ``file_name`` (the image's
name), else the only one; its ``width`` × ``height`` must match the image. Each
annotation becomes:

* ``segmentation`` as polygon lists → one polygon per list (several parts each carry
  ``measurements["parts"]``); a box when our ``histo_ai.kind`` says so;
* ``segmentation`` as RLE (uncompressed counts or the compressed string) → the outline
  of its largest connected region as a polygon (`skimage.measure.find_contours` on the
  mask cropped to its bbox, simplified to 0.5 px), with ``measurements["mask_area_px"]``
  = the mask's pixel count and ``measurements["parts"]`` = its regions when more than
  one; only the mask's pixels are decoded, never the full image;
* no segmentation → a box from ``bbox``.

``score`` → ``confidence``; objects with a score and no ``histo_ai`` block are model
objects (``source=`` argument, else ``"coco"``), the rest human.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ...atomic import atomic_open, json_default
from ...errors import AnnotationError
from ..model import HUMAN, Annotation, ImageRef
from ._common import (
    HISTO_AI,
    Checker,
    apply_properties,
    bounds_all,
    check_exports,
    computed_measurements_all,
    default_review,
    file_provenance,
    load_json,
    materialise,
    number,
    object_properties,
    without_gc,
)

__all__ = [
    "export_coco",
    "import_coco",
    "mask_to_rle",
    "rle_from_string",
    "rle_to_mask",
    "rle_to_string",
]

_COCO_KINDS = ("box", "polygon")


# --------------------------------------------------------------------------- RLE


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO run-length encoding of a 2-D mask, as pycocotools writes it.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W), non-zero = inside.

    Returns
    -------
    dict
        ``{"size": [H, W], "counts": [z0, o0, z1, o1, ...]}``: alternating run lengths
        of 0 and 1 over the pixels in **column-major** (Fortran) order, starting with a
        (possibly zero) run of 0.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    h, w = mask.shape
    flat = np.flatnonzero(mask.ravel(order="F"))
    return {"size": [int(h), int(w)], "counts": _counts_from_indices(flat, h * w)}


def _counts_from_indices(flat: np.ndarray, total: int) -> list[int]:
    """Run lengths from the sorted column-major indices of the mask's pixels."""
    if len(flat) == 0:
        return [int(total)]
    breaks = np.flatnonzero(np.diff(flat) != 1)
    starts = flat[np.r_[0, breaks + 1]]
    ends = flat[np.r_[breaks, len(flat) - 1]] + 1
    counts = np.empty(2 * len(starts), dtype=np.int64)
    counts[0] = starts[0]
    counts[2::2] = starts[1:] - ends[:-1]
    counts[1::2] = ends - starts
    out = counts.tolist()
    if ends[-1] < total:
        out.append(int(total - ends[-1]))
    return out


def rle_to_mask(rle: dict[str, Any], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a COCO RLE (uncompressed counts list or compressed string) to a mask.

    Parameters
    ----------
    rle : dict
        ``{"size": [H, W], "counts": ...}``.
    shape : tuple of int, optional
        Expected (H, W); defaults to ``rle["size"]``.

    Returns
    -------
    numpy.ndarray of bool, shape (H, W)

    Raises
    ------
    ValueError
        The size does not match ``shape`` or the counts do not add up to H × W.
    """
    h, w, counts = _rle_parts(rle, shape)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


def _rle_parts(rle: dict[str, Any], shape: tuple[int, int] | None) -> tuple[int, int, np.ndarray]:
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2):
        raise ValueError(f"RLE size {size!r} is not [height, width]")
    h, w = int(size[0]), int(size[1])
    if shape is not None and (h, w) != tuple(shape):
        raise ValueError(f"RLE size {h} × {w} does not match the expected {tuple(shape)}")
    raw = rle.get("counts")
    if isinstance(raw, (str, bytes)):
        counts = np.asarray(rle_from_string(raw), dtype=np.int64)
    elif isinstance(raw, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
        counts = np.asarray(raw, dtype=np.int64)
    else:
        raise ValueError("RLE counts are neither a list of integers nor a compressed string")
    if np.any(counts < 0) or int(counts.sum()) != h * w:
        raise ValueError(
            f"RLE counts add up to {int(counts.sum())} pixels, expected {h} × {w} = {h * w}"
        )
    return h, w, counts


def rle_to_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed RLE string of uncompressed ``counts`` (``rleToString``)."""
    out = []
    for i, value in enumerate(counts):
        x = int(value)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_from_string(text: str | bytes) -> list[int]:
    """Uncompressed counts of a pycocotools compressed RLE string (``rleFrString``)."""
    s = text.decode("ascii") if isinstance(text, bytes) else text
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(s):
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


# --------------------------------------------------------------------------- export


@without_gc
def export_coco(
    annotations: Iterable[Annotation],
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    provenance: dict[str, Any] | None = None,
    label_masks: dict[int, np.ndarray] | None = None,
    include_rejected: bool = True,
) -> Path:
    """Write boxes, polygons (and instance masks) as one-image COCO JSON, atomically.

    Parameters
    ----------
    annotations : iterable of Annotation
        Boxes and polygons are written; points and lines are skipped and counted in
        ``info.histo_ai.skipped``.
    path : str or Path
        The ``.json`` file.
    image : ImageRef
        A 2-D image (planes: the object's ``plane`` is kept in its ``histo_ai`` block).
    classes : sequence of str
        Category order (ids from 1); other classes met are appended.
    provenance : dict, optional
        Extra keys under ``info.histo_ai.extra``.
    label_masks : dict of int to numpy.ndarray, optional
        ``{class index: (H, W) label image}``; every label > 0 is one instance mask of
        class ``classes[index]``, written as uncompressed RLE.
    include_rejected : bool
        Write rejected model objects (their ``histo_ai.review`` says so).

    Returns
    -------
    Path

    Raises
    ------
    AnnotationError
        An object is invalid or outside the image, a mask's shape is not the image's
        or its class index is not in ``classes`` (nothing is written).
    """
    path = Path(path)
    anns = materialise(annotations)
    categories: dict[str, int] = {}
    for name in [*classes, *(a.class_name for a in anns if a.kind in _COCO_KINDS)]:
        categories.setdefault(name, len(categories) + 1)
    skipped: dict[str, int] = {}
    records = []
    next_id = 1 + max((a.id for a in anns if a.id is not None), default=0)
    indices = []
    for index, ann in enumerate(anns):
        if ann.kind not in _COCO_KINDS or (not include_rejected and ann.review == "rejected"):
            key = ann.kind if ann.kind not in _COCO_KINDS else "rejected"
            skipped[key] = skipped.get(key, 0) + 1
        else:
            indices.append(index)
    chosen = [anns[i] for i in indices]
    check_exports(chosen, indices, path=path, image=image)
    areas = computed_measurements_all(chosen, image, physical=False)
    all_bounds = bounds_all(chosen).tolist()
    for ann, area, (top, left, bottom, right) in zip(chosen, areas, all_bounds, strict=True):
        ring = ann.ring()
        block = object_properties(ann)
        block["measurements"] = dict(ann.measurements)
        if ann.id is not None:
            aid = ann.id
        else:
            aid, next_id = next_id, next_id + 1
        record: dict[str, Any] = {
            "id": int(aid),
            "image_id": 1,
            "category_id": categories[ann.class_name],
            "bbox": [left, top, right - left, bottom - top],
            "segmentation": [ring[:, ::-1].ravel().tolist()],
            "area": area["area_px"],
            "iscrowd": 0,
        }
        if ann.is_model and ann.confidence is not None:
            record["score"] = float(ann.confidence)
        record[HISTO_AI] = block
        records.append(record)
    n_masks = 0
    for class_index, labels in (label_masks or {}).items():
        masks = _mask_records(path, image, classes, class_index, labels, categories, next_id)
        next_id += len(masks)
        n_masks += len(masks)
        records.extend(masks)
    prov = file_provenance(anns, image=image, fmt="coco", provenance=provenance, skipped=skipped)
    prov["count"] += n_masks
    prov["masks"] = n_masks
    h, w = image.shape[-2:]
    data = {
        "images": [
            {
                "id": 1,
                "file_name": Path(image.path).name,
                "width": int(w),
                "height": int(h),
                HISTO_AI: {**image.to_dict(), "mpp": list(image.mpp) if image.mpp else None},
            }
        ],
        "categories": [
            {"id": cid, "name": name, "supercategory": ""} for name, cid in categories.items()
        ],
        "info": {
            "description": f"annotations of {Path(image.path).name}",
            "version": str(prov["version"]),
            "date_created": prov["exported"],
            HISTO_AI: prov,
        },
        "annotations": records,
    }
    text = orjson.dumps(data, default=json_default, option=orjson.OPT_SERIALIZE_NUMPY)
    with atomic_open(path, "wb") as fh:
        fh.write(text)
    return path


def _mask_records(
    path: Path,
    image: ImageRef,
    classes: Sequence[str],
    class_index: int,
    labels: np.ndarray,
    categories: dict[str, int],
    first_id: int,
) -> list[dict[str, Any]]:
    from scipy import ndimage

    labels = np.asarray(labels)
    h, w = image.shape[-2:]
    if labels.shape != (h, w):
        raise AnnotationError(
            path,
            f"label mask of class index {class_index} has shape {labels.shape}, the image "
            f"is {h} × {w} px",
            "pass a label image of the image's level-0 size (is it the right image?)",
        )
    if not 0 <= class_index < len(classes):
        raise AnnotationError(
            path,
            f"label mask class index {class_index} is not an index into classes {list(classes)}",
            "key label_masks by the class's position in classes",
        )
    if labels.dtype.kind not in "iub":
        raise AnnotationError(
            path,
            f"label mask dtype {labels.dtype} is not integer",
            "pass an integer label image (0 = background)",
        )
    name = classes[class_index]
    cid = categories.setdefault(name, len(categories) + 1)
    values = labels.astype(np.int64, copy=False)
    out: list[dict[str, Any]] = []
    for label, box in enumerate(ndimage.find_objects(np.where(values > 0, values, 0)), start=1):
        if box is None:
            continue
        rs, cs = box
        inside = values[rs, cs] == label
        # column-major indices over the full image: col * H + row
        rr, cc = np.nonzero(inside.T)  # rr: column offset, cc: row offset, sorted
        flat = (cs.start + rr) * h + (rs.start + cc)
        area = len(flat)
        out.append(
            {
                "id": first_id + len(out),
                "image_id": 1,
                "category_id": cid,
                "bbox": [
                    float(cs.start),
                    float(rs.start),
                    float(cs.stop - cs.start),
                    float(rs.stop - rs.start),
                ],
                "segmentation": {
                    "size": [int(h), int(w)],
                    "counts": _counts_from_indices(flat, h * w),
                },
                "area": float(area),
                "iscrowd": 0,
                HISTO_AI: {"kind": "mask", "label": int(label), "source": HUMAN},
            }
        )
    return out


# --------------------------------------------------------------------------- import


@without_gc
def import_coco(
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    allow_new_classes: bool = False,
    source: str | None = None,
    model_version: str | None = None,
    annotator: str | None = None,
    image_id: int | None = None,
) -> list[Annotation]:
    """Read one image's annotations of a COCO JSON file (pure: nothing is stored).

    Parameters
    ----------
    path : str or Path
    image : ImageRef
        Its ``width`` × ``height`` must match the COCO image's.
    classes, allow_new_classes
        As in `napari_histo_ai.annotations.formats.import_annotations`.
    source, model_version : str, optional
        Provenance of scored objects without our ``histo_ai`` block (default ``"coco"``).
    annotator : str, optional
        Annotator of human objects.
    image_id : int, optional
        The COCO image id, when the file lists several images.

    Returns
    -------
    list of Annotation
        Boxes and polygons in file order (see the module docstring for masks).

    Raises
    ------
    AnnotationError
        Bad JSON, missing keys, wrong types, an unknown category, a bad RLE, an image
        size mismatch, objects outside the image or of unknown classes.
    """
    path = Path(path)
    checker = Checker(path, image=image, classes=classes, allow_new_classes=allow_new_classes)
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(
            path,
            f"top level is a {type(data).__name__}",
            "expected a COCO object with images, categories, annotations",
        )
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(
                path,
                f"'{key}' is missing or not a list",
                "expected COCO JSON with 'images', 'categories' and 'annotations' lists",
            )
    entry = _find_image(data["images"], image, image_id, checker)
    cats: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories") or []):
        if (
            not isinstance(cat, dict)
            or not isinstance(cat.get("id"), int)
            or not isinstance(cat.get("name"), str)
        ):
            raise checker.fail(
                f"category {i}",
                f"{cat!r} is not {{'id': int, 'name': str}}",
                "fix the categories list",
            )
        cats[cat["id"]] = cat["name"]
    for index, record in enumerate(data["annotations"]):
        where = f"annotation {index}"
        if not isinstance(record, dict):
            raise checker.fail(where, f"is a {type(record).__name__}", "expected an object")
        if record.get("image_id") != entry["id"]:
            continue
        if "id" in record:
            where = f"annotation {index} (id {record['id']})"
        _read_record(record, where, cats, checker, source, model_version, annotator)
    return checker.finish()


def _find_image(
    images: list[Any], image: ImageRef, image_id: int | None, checker: Checker
) -> dict[str, Any]:
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry:
            raise checker.fail(
                f"image {i}",
                f"{entry!r} has no id",
                "expected {'id', 'file_name', 'width', 'height'}",
            )
    name = Path(image.path).name
    if image_id is not None:
        found = [e for e in images if e["id"] == image_id]
    else:
        found = [
            e
            for e in images
            if e.get("file_name") is not None and Path(str(e["file_name"])).name == name
        ]
        if not found and len(images) == 1:
            found = images
    if not found:
        listed = ", ".join(f"{e['id']}: {e.get('file_name')}" for e in images[:8])
        raise checker.fail(
            "images",
            f"no image {image_id if image_id is not None else name!r}; the file "
            f"lists {len(images)} ({listed})",
            "pass image_id= one of the listed ids",
        )
    entry = found[0]
    h, w = checker.image.shape[-2:]
    size = (entry.get("height"), entry.get("width"))
    if size != (None, None) and size != (h, w):
        raise checker.fail(
            f"image {entry['id']} ({entry.get('file_name')})",
            f"is {size[1]} × {size[0]} px (width × height) but the image is {w} × {h} px",
            "check that the file belongs to this image (level-0 size)",
        )
    return entry


def _read_record(
    record: dict[str, Any],
    where: str,
    cats: dict[int, str],
    checker: Checker,
    source: str | None,
    model_version: str | None,
    annotator: str | None,
) -> list[Annotation]:
    cid = record.get("category_id")
    if cid not in cats:
        raise checker.fail(
            where,
            f"category_id {cid!r} is not in categories {sorted(cats)}",
            "fix the category id or add the category",
        )
    score = record.get("score")
    confidence = None if score is None else number(score, "score", where, checker)
    block = record.get(HISTO_AI)
    src = source or ("coco" if score is not None else HUMAN)
    base: dict[str, Any] = {
        "class_name": cats[cid],
        "plane": (0,) * checker.image.n_plane,
        "source": src,
        "model_version": model_version if source else None,
        "confidence": confidence,
        "review": default_review(src),
        "annotator": annotator if src == HUMAN else None,
    }
    measurements: dict[str, float] = {}
    if isinstance(block, dict):
        own = block.get("measurements")
        if isinstance(own, dict):
            measurements = {
                str(k): float(v)
                for k, v in own.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        if block.get("kind") == "mask":
            block = {k: v for k, v in block.items() if k not in ("kind", "label")}
        base = apply_properties(base, block, where, checker)
    wanted = base.pop("kind", None)
    seg = record.get("segmentation")
    parts: list[tuple[str, np.ndarray]] = []
    if isinstance(seg, dict):
        ring, area, n_regions = _rle_polygon(seg, record, where, checker)
        measurements["mask_area_px"] = float(area)
        if n_regions > 1:
            measurements["parts"] = float(n_regions)
        parts = [("polygon", ring)]
    elif isinstance(seg, list) and seg:
        for i, poly in enumerate(seg):
            arr = np.asarray(poly) if isinstance(poly, list) else np.asarray([])
            if arr.dtype.kind not in "iuf" or arr.ndim != 1 or len(arr) < 6 or len(arr) % 2:
                raise checker.fail(
                    where,
                    f"segmentation polygon {i} is not a flat list of "
                    "x, y numbers (at least 3 vertices)",
                    "expected [[x0, y0, x1, y1, x2, y2, ...]]",
                )
            xy = arr.astype(np.float64).reshape(-1, 2)
            parts.append(("polygon", xy[:, ::-1]))
        if len(parts) > 1:
            measurements["parts"] = float(len(parts))
    else:
        bbox = record.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise checker.fail(
                where,
                f"has no segmentation and bbox {bbox!r} is not [x, y, width, height]",
                "expected a bbox or a segmentation",
            )
        x, y, bw, bh = (number(v, "bbox value", where, checker) for v in bbox)
        if bw <= 0 or bh <= 0:
            raise checker.fail(
                where, f"bbox {bbox} has a non-positive size", "width and height must be > 0"
            )
        parts = [("box", np.array([[y, x], [y + bh, x + bw]]))]
    out = []
    for kind, coords in parts:
        if kind == "polygon" and wanted == "box" and len(parts) == 1 and _rectangle(coords):
            kind, coords = "box", np.stack([coords.min(axis=0), coords.max(axis=0)])
        ann = Annotation(kind=kind, coords=coords, measurements=dict(measurements), **base)
        out.append(checker.check(ann, where))
    return out  # checked at the end by import_coco (checker.finish)


def _rectangle(ring: np.ndarray) -> bool:
    if len(ring) != 4:
        return False
    following = np.roll(ring, -1, axis=0)
    aligned = (ring[:, 0] == following[:, 0]) | (ring[:, 1] == following[:, 1])
    return bool(np.all(aligned)) and len({(float(r), float(c)) for r, c in ring}) == 4


def _rle_polygon(
    seg: dict[str, Any], record: dict[str, Any], where: str, checker: Checker
) -> tuple[np.ndarray, int, int]:
    """The outline of an RLE mask's largest region (continuous coords), its area and
    number of regions; decodes only the mask's own pixels."""
    from skimage import measure

    try:
        h, _, counts = _rle_parts(seg, tuple(checker.image.shape[-2:]))  # type: ignore[arg-type]
    except ValueError as exc:
        raise checker.fail(
            where,
            f"bad RLE segmentation: {exc}",
            "expected {'size': [H, W], 'counts': [...]} of this image",
        ) from None
    ends = np.cumsum(counts)
    starts = ends - counts
    ones = slice(1, None, 2)
    run_starts, run_lengths = starts[ones], counts[ones]
    keep = run_lengths > 0
    run_starts, run_lengths = run_starts[keep], run_lengths[keep]
    area = int(run_lengths.sum())
    if area == 0:
        raise checker.fail(where, "RLE segmentation is empty", "delete the annotation")
    offsets = np.arange(area) - np.repeat(np.cumsum(run_lengths) - run_lengths, run_lengths)
    flat = np.repeat(run_starts, run_lengths) + offsets
    cols, rows = np.divmod(flat, h)
    r0, c0 = int(rows.min()), int(cols.min())
    crop = np.zeros((int(rows.max()) - r0 + 3, int(cols.max()) - c0 + 3), dtype=bool)
    crop[rows - r0 + 1, cols - c0 + 1] = True
    labelled = measure.label(crop, connectivity=2)
    n_regions = int(labelled.max())
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    biggest = labelled == int(np.argmax(sizes))
    contours = measure.find_contours(biggest.astype(np.float64), 0.5)
    contour = max(contours, key=len)
    contour = measure.approximate_polygon(contour, tolerance=0.5)
    if len(contour) > 1 and np.array_equal(contour[0], contour[-1]):
        contour = contour[:-1]
    if len(contour) < 3:  # a one-pixel-wide sliver: its pixel square
        (rr, cc) = np.nonzero(biggest)
        contour = np.array(
            [
                [rr.min() - 0.5, cc.min() - 0.5],
                [rr.min() - 0.5, cc.max() + 0.5],
                [rr.max() + 0.5, cc.max() + 0.5],
                [rr.max() + 0.5, cc.min() - 0.5],
            ]
        )
    # crop index i (pixel centre i + 0.5 in crop-continuous coords) ↔ image r0 + i - 1
    ring = contour + np.array([r0 - 1 + 0.5, c0 - 1 + 0.5])
    return ring, area, n_regions
