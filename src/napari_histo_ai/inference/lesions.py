"""Per-lesion measurements of a tumour mask: connected lesions and their longest diameter.

Paper 003's annotation is, per tumour, one line across its largest diameter. The same
measurement from a predicted (or true) mask:

1. lesions are the 3D connected components of the mask (26-connectivity: voxels that
   share a face, an edge or a corner), those smaller than ``min_volume_mm3`` dropped;
2. per lesion, the slice (constant ``z``) where its cross-section has the largest area;
3. on that slice, the longest in-plane diameter (maximum Feret diameter): the two
   voxel centres of the cross-section farthest apart in millimetres, found among the
   vertices of their convex hull (scipy / Qhull) with the anisotropic spacing applied.

The length is measured between voxel centres, as the line is drawn over the image: a
lesion ``n`` voxels wide measures ``(n - 1) · spacing`` across (one voxel spacing less
than an edge-to-edge reading).

`lesion_objects` turns the result into `Objects` of kind ``lines`` for the engine (one
line per lesion, with ``lesion``, ``length_mm``, ``volume_mm3``, ``area_mm2`` and
``slice`` features), which the run folder stores as GeoJSON ``LineString`` features and
napari shows as a Shapes layer of lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelInputError
from .objects import Objects

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid
    from .engine import Geometry

__all__ = [
    "DEFAULT_MIN_VOLUME_MM3",
    "Lesion",
    "lesion_objects",
    "longest_diameter",
    "measure_lesions",
    "output_spacing_mm",
]

#: lesions smaller than this are dropped: a 10 mm sphere (524 mm³) is RECIST's smallest
#: measurable lesion; below it a predicted blob is more often speckle than tumour
DEFAULT_MIN_VOLUME_MM3 = 500.0
#: the largest mask (voxels) `lesion_objects` reads back into memory
MAX_MASK_VOXELS = 2**29


@dataclass(frozen=True)
class Lesion:
    """One connected lesion and its longest in-plane diameter.

    Attributes
    ----------
    id : int
        1..n, by decreasing volume.
    n_voxels : int
        Voxels of the lesion.
    volume_mm3 : float, cubic millimetres
        ``n_voxels`` times the voxel volume.
    slice : int
        ``z`` index of the slice with the largest cross-section.
    area_mm2 : float, square millimetres
        Area of the cross-section on that slice.
    start, end : (float, float, float)
        Ends of the longest diameter, (z, row, column) voxel indices of level 0 (voxel
        centres; ``z == slice`` for both).
    length_mm : float, millimetres
        Distance between ``start`` and ``end`` with the voxel spacing applied.
    centroid : (float, float, float)
        Mean (z, row, column) voxel index of the lesion.
    bbox : (int, int, int, int, int, int)
        (z0, row0, col0, z1, row1, col1), ends exclusive.
    mean_value : float
        Mean of ``values`` over the lesion's voxels (NaN when none were given).
    """

    id: int
    n_voxels: int
    volume_mm3: float
    slice: int
    area_mm2: float
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    length_mm: float
    centroid: tuple[float, float, float]
    bbox: tuple[int, int, int, int, int, int]
    mean_value: float = float("nan")


def longest_diameter(
    points: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0)
) -> tuple[int, int, float]:
    """The two points farthest apart (maximum Feret diameter of a pixel set).

    Parameters
    ----------
    points : numpy.ndarray
        ``(n, 2)`` (row, column) pixel indices (pixel centres), ``n ≥ 1``.
    spacing_mm : (float, float)
        Pixel spacing (row, column), millimetres.

    Returns
    -------
    (int, int, float)
        Indices into ``points`` of the two ends and their distance in mm (0 for a
        single point).
    """
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist, squareform

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) * np.asarray(spacing_mm, float)
    n = len(pts)
    if n == 0:
        raise ModelInputError("longest_diameter needs at least one point, got none")
    if n == 1:
        return 0, 0, 0.0
    candidates = np.arange(n)
    if n > 3:
        try:
            candidates = ConvexHull(pts).vertices
        except QhullError:  # all points on one line: its two extremes
            direction = pts[int(np.argmax(((pts - pts[0]) ** 2).sum(axis=1)))] - pts[0]
            projection = (pts - pts[0]) @ direction
            candidates = np.array([int(np.argmin(projection)), int(np.argmax(projection))])
    distances = squareform(pdist(pts[candidates]))
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    return int(candidates[i]), int(candidates[j]), float(distances[i, j])


def measure_lesions(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3,
    values: np.ndarray | None = None,
) -> list[Lesion]:
    """Connected lesions of a 3D mask, each with its longest in-plane diameter.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(Z, Y, X)`` bool (or 0/non-zero) tumour mask; a 2D ``(Y, X)`` mask is one slice
        (``z = 0``, ``spacing_mm`` then (row, column), a "volume" is an area × 1 mm).
    spacing_mm : sequence of float
        Voxel spacing (z, row, column) in millimetres ((row, column) for a 2D mask).
    min_volume_mm3 : float, cubic millimetres
        Lesions smaller than this are dropped (0 keeps every voxel).
    values : numpy.ndarray, optional
        An array of the mask's shape (e.g. probabilities) averaged over each lesion
        (`Lesion.mean_value`).

    Returns
    -------
    list of Lesion
        By decreasing volume (ties: by position); ids 1..n in that order.

    Raises
    ------
    ModelInputError
        ``mask`` is not 2D / 3D, or ``spacing_mm`` has the wrong length or a value that
        is not positive.
    """
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool, copy=False)
    if values is not None and np.shape(values) != mask.shape:
        raise ModelInputError(
            f"values of shape {np.shape(values)} do not match the mask's {mask.shape}"
        )
    if mask.ndim == 2:
        mask = mask[None]
        values = None if values is None else np.asarray(values)[None]
        spacing = (1.0, *(float(s) for s in spacing_mm))
    elif mask.ndim == 3:
        spacing = tuple(float(s) for s in spacing_mm)
    else:
        raise ModelInputError(
            f"measure_lesions expects a (Z, Y, X) or (Y, X) mask, got shape {mask.shape}"
        )
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ModelInputError(
            f"spacing_mm {tuple(spacing_mm)} must give one positive size (mm) per axis of "
            f"the {mask.ndim}-D mask"
        )
    sz, sy, sx = spacing
    voxel_mm3 = sz * sy * sx
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(labels)
    found = []
    for index, box in enumerate(boxes, start=1):
        if box is None or counts[index] * voxel_mm3 < min_volume_mm3:
            continue
        own = labels[box] == index
        per_slice = own.sum(axis=(1, 2))
        best = int(np.argmax(per_slice))
        rows, cols = np.nonzero(own[best])
        i, j, length = longest_diameter(np.column_stack([rows, cols]), (sy, sx))
        z = best + box[0].start
        r0, c0 = box[1].start, box[2].start
        zz, rr, cc = np.nonzero(own)
        mean_value = float(np.asarray(values)[box][own].mean()) if values is not None else math.nan
        found.append(
            (
                int(counts[index]),
                z,
                float(per_slice[best]) * sy * sx,
                (float(z), float(rows[i] + r0), float(cols[i] + c0)),
                (float(z), float(rows[j] + r0), float(cols[j] + c0)),
                length,
                (
                    float(zz.mean() + box[0].start),
                    float(rr.mean() + r0),
                    float(cc.mean() + c0),
                ),
                (box[0].start, r0, c0, box[0].stop, box[1].stop, box[2].stop),
                mean_value,
            )
        )
    found.sort(key=lambda f: (-f[0], f[7]))
    return [
        Lesion(
            id=k,
            n_voxels=n_vox,
            volume_mm3=n_vox * voxel_mm3,
            slice=z,
            area_mm2=area,
            start=start,
            end=end,
            length_mm=length,
            centroid=centroid,
            bbox=bbox,
            mean_value=mean_value,
        )
        for k, (n_vox, z, area, start, end, length, centroid, bbox, mean_value) in enumerate(
            found, start=1
        )
    ]


def output_spacing_mm(pyramid: Pyramid, geometry: Geometry) -> tuple[float, float, float] | None:
    """Spacing (plane, row, column) in mm of a run's output pixels, ``None`` if unknown.

    Volumes: the plane spacing is the file's ``Z`` spacing and the in-plane spacing the
    output pixel (``geometry.pixel`` level-0 voxels) times the voxel spacing. 2D images
    with a µm/px: one "plane" of 1 mm. Images without a physical size: ``None``.
    """
    pixel = geometry.pixel
    if pyramid.spacing_mm is not None and len(pyramid.spacing_mm) >= 3:
        sz, sy, sx = (float(s) for s in pyramid.spacing_mm[-3:])
        return sz, pixel[0] * sy, pixel[1] * sx
    if pyramid.mpp is not None:
        return 1.0, pixel[0] * pyramid.mpp[0] / 1000, pixel[1] * pyramid.mpp[1] / 1000
    return None


def lesion_objects(
    probability: Any,
    threshold: float,
    *,
    pixel: tuple[float, float],
    spacing_mm: tuple[float, float, float] | None,
    classes: tuple[str, ...] = (),
    min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3,
) -> Objects:
    """Longest-diameter lines of the lesions of a stored probability map, as `Objects`.

    Parameters
    ----------
    probability : array-like
        ``(Z, Y, X)`` or ``(Y, X)`` uint8 probabilities ``p · 255`` as the run folder
        stores them (one channel of level 0).
    threshold : float
        Probability threshold (0..1); a voxel is tumour when its stored value is at
        least ``ceil(255 · threshold)``, as the mask layer decides.
    pixel : (float, float)
        Level-0 pixels per output pixel (row, column) (`Geometry.pixel`).
    spacing_mm : (float, float, float) or None
        Output voxel spacing (z, row, column) in mm (`output_spacing_mm`); ``None`` for
        images without a physical size: lengths, areas and volumes are then NaN and
        ``min_volume_mm3`` counts voxels.
    classes : tuple of str
        Class names of the output (the line's class is the first).
    min_volume_mm3 : float
        See `measure_lesions`.

    Returns
    -------
    Objects
        Kind ``lines``: ``coords`` ``(N, p + 4)`` = (plane..., row0, col0, row1, col1)
        in continuous level-0 pixels (pixel i spans [i, i + 1), so a voxel centre is at
        i + 0.5), ``p`` = 1 for a volume, 0 for a 2D image; ``scores`` = mean
        probability of the lesion's voxels; ``features`` ``lesion``, ``length_mm``,
        ``volume_mm3``, ``area_mm2``, ``slice``, ``n_voxels``.

    Raises
    ------
    ModelInputError
        The map is not 2D / 3D, or larger than `MAX_MASK_VOXELS`.
    """
    shape = tuple(int(s) for s in probability.shape)
    if len(shape) not in (2, 3):
        raise ModelInputError(
            f"lesion lines need a (Z, Y, X) or (Y, X) probability map, got shape {shape}"
        )
    if math.prod(shape) > MAX_MASK_VOXELS:
        raise ModelInputError(
            f"the probability map of shape {shape} is too large to measure lesions in "
            f"memory (> {MAX_MASK_VOXELS:,} voxels); run the model on a region instead"
        )
    stored = np.asarray(probability, dtype=np.uint8)
    t8 = int(np.clip(np.ceil(threshold * 255 - 1e-6), 1, 255))
    physical = spacing_mm is not None
    spacing = spacing_mm if spacing_mm is not None else (1.0, 1.0, 1.0)
    volume = stored if stored.ndim == 3 else stored[None]
    lesions = measure_lesions(volume >= t8, spacing, min_volume_mm3=min_volume_mm3, values=volume)
    n_plane = 1 if stored.ndim == 3 else 0
    rows = []
    for lesion in lesions:
        ends = [
            ((a[1] + 0.5) * pixel[0], (a[2] + 0.5) * pixel[1]) for a in (lesion.start, lesion.end)
        ]
        plane = [float(lesion.slice)] if n_plane else []
        rows.append([*plane, ends[0][0], ends[0][1], ends[1][0], ends[1][1]])
    nan = float("nan")

    def column(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    features = {
        "lesion": np.asarray([les.id for les in lesions], dtype=np.int64),
        "length_mm": column([les.length_mm if physical else nan for les in lesions]),
        "volume_mm3": column([les.volume_mm3 if physical else nan for les in lesions]),
        "area_mm2": column([les.area_mm2 if physical else nan for les in lesions]),
        "slice": np.asarray([les.slice for les in lesions], dtype=np.int64),
        "n_voxels": np.asarray([les.n_voxels for les in lesions], dtype=np.int64),
    }
    return Objects(
        "lines",
        np.asarray(rows, dtype=np.float64).reshape(-1, n_plane + 4),
        np.asarray([les.mean_value / 255 for les in lesions], dtype=np.float64),
        np.zeros(len(lesions), dtype=np.int64),
        tuple(classes),
        features=features,
    )
