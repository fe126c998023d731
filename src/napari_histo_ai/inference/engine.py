"""The tiled inference engine: a generator that yields progress and returns a `RunResult`.

``run_model(pyramid, predictor, out)`` runs a loaded model over a lazy image of any size:

1. picks the pyramid level nearest the model's µm/px and resamples the rest;
2. computes a foreground mask at low resolution and skips background tiles;
3. reads, decodes, resamples and normalises the next batches in background threads
   while the model runs (``torch.inference_mode``; bf16 autocast on CUDA);
4. blends overlapping tiles with tapered weights that sum to one (`tiling`), writing
   each output cell once, when every tile touching it is done, into an OME-Zarr
   pyramid on disk (`store`), so memory stays bounded whatever the slide size;
5. finds objects (points, boxes) in finished cells as the run goes;
6. stops cleanly at the next batch when ``cancel`` is set, leaving a consistent
   partial result that a later call resumes.

The widget drives the same generator in a napari thread worker; tests and the CLI use
`run_model_sync`.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import ModelInputError, RunStateError
from ..models.spec import ModelSpec, OutputSpec, StainReference
from .objects import Objects, aggregate, find_peaks
from .store import (
    RECORD_KEY,
    DenseOutput,
    TileOutput,
    load_progress,
    save_progress,
    write_json_atomic,
)
from .tiling import DenseGrid, PatchGrid
from .tissue import TissueMask, tissue_mask

if TYPE_CHECKING:
    import torch

    from ..io.pyramid import Pyramid
    from ..models.loading import Predictor

ENGINE_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """Options of one run (everything the model spec does not fix).

    Parameters
    ----------
    batch_size : int or None
        Tiles per forward pass; ``None`` picks one from the device's free memory.
    tissue : bool
        Skip tiles with no foreground in a low-resolution mask (2D images only).
    tissue_threshold : float or None
        Override the mask threshold (optical density for RGB, intensity otherwise).
    roi : (top, left, height, width) or None
        Only tiles meeting this box, level-0 pixels.
    polygon : sequence of (row, col) or None
        Only tiles meeting this polygon, level-0 pixels (a drawn shape).
    priority : (top, left, height, width) or None
        Tiles meeting this box (the viewport) run first, then the rest nearest first.
    threshold : float or None
        Override the outputs' probability thresholds (mask, points, boxes).
    mpp : float or None
        Use this µm/px for the image instead of its metadata.
    fill_value : float or None
        Value outside the image; default white (255) for 8-bit RGB, else 0.
    workers : int
        Background threads that read and prepare batches.
    prefetch : int
        Batches prepared ahead of the model.
    resume : bool
        Continue a previous run in the same folder (else start again).
    memory_mb : float
        Memory for tiles waiting for their neighbours; beyond it they go to disk.
    """

    batch_size: int | None = None
    tissue: bool = True
    tissue_threshold: float | None = None
    roi: tuple[float, float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] | None = None
    priority: tuple[float, float, float, float] | None = None
    threshold: float | None = None
    mpp: float | None = None
    fill_value: float | None = None
    workers: int = 2
    prefetch: int = 2
    resume: bool = True
    memory_mb: float = 32.0


@dataclass(frozen=True)
class Geometry:
    """Where an output lies over the source image.

    ``scale``/``translate`` are per (row, column) in the source layer's world units
    (µm when the image has an mpp, else pixels), for level 0 of the output.
    ``pixel`` is the output pixel size in level-0 pixels.
    """

    scale: tuple[float, float]
    translate: tuple[float, float]
    pixel: tuple[float, float]
    unit: str


@dataclass
class Progress:
    """One progress record, yielded after every batch."""

    done: int
    total: int
    elapsed_s: float
    tiles_per_s: float
    eta_s: float | None
    message: str = ""
    new_objects: dict[str, Objects] = field(default_factory=dict)
    #: set on the first record only: the run folder and where each output lies
    path: Path | None = None
    geometry: dict[str, Geometry] | None = None
    planes: tuple[int, ...] = ()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class RunResult:
    """What a run produced (returned by the generator, also saved as ``summary.json``)."""

    path: Path
    spec: ModelSpec
    complete: bool
    cancelled: bool
    tiles_total: int
    tiles_done: int
    tiles_skipped: int
    geometry: dict[str, Geometry]
    objects: dict[str, Objects]
    aggregates: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    planes: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------
# image access


def _plane_axes(axes: str) -> str:
    return "".join(a for a in axes if a not in "YXS")


def _read_plane_region(
    pyramid: Pyramid,
    level: int,
    plane: tuple[int, ...],
    top: int,
    left: int,
    height: int,
    width: int,
    fill: float,
) -> np.ndarray:
    """(height, width, channels) pixels of one plane, padded with ``fill`` outside."""
    if not plane and pyramid.axes in ("YX", "YXS"):
        out = pyramid.read_region((top, left), (height, width), level=level, fill_value=fill)
        return out[..., None] if out.ndim == 2 else out
    lv = pyramid.levels[level]
    axes = pyramid.axes
    ly, lx = axes.index("Y"), axes.index("X")
    h_img, w_img = int(lv.shape[ly]), int(lv.shape[lx])
    channels = int(lv.shape[axes.index("S")]) if "S" in axes else 1
    out = np.full((height, width, channels), fill, dtype=lv.dtype)
    y0, y1 = max(0, top), min(h_img, top + height)
    x0, x1 = max(0, left), min(w_img, left + width)
    if y1 <= y0 or x1 <= x0:
        return out
    key: list[Any] = []
    plane_iter = iter(plane)
    for a in axes:
        if a == "Y":
            key.append(slice(y0, y1))
        elif a == "X":
            key.append(slice(x0, x1))
        elif a == "S":
            key.append(slice(None))
        else:
            key.append(next(plane_iter))
    region = lv[tuple(key)]
    # local threads, whatever scheduler is active (inside a Dask cluster task too)
    part = np.asarray(region.compute(scheduler="threads") if hasattr(region, "compute") else region)
    rest = "".join(a for a in axes if a in "YXS")
    if "S" not in rest:
        part = part[..., None]
        rest += "S"
    part = np.moveaxis(part, [rest.index("Y"), rest.index("X"), rest.index("S")], [0, 1, 2])
    out[y0 - top : y1 - top, x0 - left : x1 - left] = part
    return out


def _resize(tile: np.ndarray, size: int) -> np.ndarray:
    """Resample an (h, w, c) tile to (size, size, c) with antialiasing."""
    if tile.shape[0] == size and tile.shape[1] == size:
        return tile
    if tile.dtype == np.uint8 and tile.shape[2] in (1, 3, 4):
        from PIL import Image

        img = Image.fromarray(tile[..., 0] if tile.shape[2] == 1 else tile)
        out = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))
        return out[..., None] if out.ndim == 2 else out
    from skimage.transform import resize

    res = resize(
        tile, (size, size, tile.shape[2]), order=1, anti_aliasing=True, preserve_range=True
    )
    return res.astype(tile.dtype)


def _fit_channels(tile: np.ndarray, channels: int, name: str, path: str) -> np.ndarray:
    c = tile.shape[2]
    if c == channels:
        return tile
    if c == 4 and channels == 3:
        return tile[..., :3]
    if c in (3, 4) and channels == 1:
        rgb = tile[..., :3].astype(np.float32)
        grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return grey[..., None].astype(tile.dtype)
    raise ModelInputError(
        f"model '{name}' expects {channels}-channel input but {path} has {c} channel(s); "
        "pick a model made for this kind of image"
    )


# ----------------------------------------------------------------------------------------
# geometry of a run


@dataclass(frozen=True)
class _Plan:
    level: int
    factor: tuple[float, float]  # level pixels per model pixel (row, col)
    level_downsample: tuple[float, float]  # level-0 pixels per level pixel
    model_extent: tuple[float, float]  # image size in model pixels
    image_mpp: tuple[float, float] | None
    unit: str
    unit_size: tuple[float, float]  # world units per level-0 pixel (layer scale)


def _plan(pyramid: Pyramid, spec: ModelSpec, config: RunConfig) -> _Plan:
    image_mpp: tuple[float, float] | None = pyramid.mpp
    if config.mpp is not None:
        if not config.mpp > 0:
            raise ModelInputError(f"mpp must be positive, got {config.mpp}")
        image_mpp = (float(config.mpp), float(config.mpp))
    downsamples = pyramid.downsamples
    shapes = [pyramid.spatial_shape(i)[-2:] for i in range(len(pyramid.levels))]
    h0, w0 = shapes[0]
    if spec.io.mpp is None or image_mpp is None:
        if spec.io.mpp is not None:
            raise ModelInputError(
                f"model '{spec.name}' works at {spec.io.mpp} µm/px but {pyramid.path} has no "
                "pixel size in its metadata; set the µm/px in the 'Open slide / volume' "
                "widget or pass --mpp to the CLI"
            )
        level, factor = 0, (1.0, 1.0)
    else:
        target = float(spec.io.mpp)
        level = 0
        for i, ds in enumerate(downsamples):
            if max(image_mpp) * ds <= target * 1.01:
                level = i
        level_mpp = (image_mpp[0] * downsamples[level], image_mpp[1] * downsamples[level])
        factor = (target / level_mpp[0], target / level_mpp[1])
        if abs(factor[0] - 1) < 0.01 and abs(factor[1] - 1) < 0.01:
            factor = (1.0, 1.0)
    hl, wl = shapes[level]
    level_ds = (h0 / hl, w0 / wl)
    if image_mpp is not None and pyramid.units == "um":
        unit, unit_size = "um", image_mpp
    else:
        scale = pyramid.layer_scale()[-2:] if pyramid.layer_scale() else (1.0, 1.0)
        unit = pyramid.units
        unit_size = (float(scale[0]), float(scale[1]))
        if image_mpp is not None and config.mpp is not None:
            unit, unit_size = "um", image_mpp
    return _Plan(
        level=level,
        factor=factor,
        level_downsample=level_ds,
        model_extent=(hl / factor[0], wl / factor[1]),
        image_mpp=image_mpp,
        unit=unit,
        unit_size=unit_size,
    )


def _geometry(
    plan: _Plan, model_px: tuple[float, float], centre_offset: tuple[float, float]
) -> Geometry:
    """World placement of an output whose pixel is ``model_px`` model pixels.

    ``centre_offset`` is where output pixel 0's centre lies, model pixels.
    """
    pixel = tuple(
        model_px[a] * plan.factor[a] * plan.level_downsample[a] for a in range(2)
    )  # level-0 px per output px
    centre0 = tuple(centre_offset[a] * plan.factor[a] * plan.level_downsample[a] for a in range(2))
    scale = (pixel[0] * plan.unit_size[0], pixel[1] * plan.unit_size[1])
    # napari puts level-0 pixel i's centre at i * unit; continuous coordinate c is at
    # (c - 0.5) * unit
    translate = (
        (centre0[0] - 0.5) * plan.unit_size[0],
        (centre0[1] - 0.5) * plan.unit_size[1],
    )
    return Geometry(scale, translate, (float(pixel[0]), float(pixel[1])), plan.unit)


# ----------------------------------------------------------------------------------------
# selection of tiles


def _polygon_mask(
    polygon: Sequence[tuple[float, float]], shape0: tuple[int, int], side: int = 2048
) -> TissueMask:
    from skimage.draw import polygon as draw_polygon

    h0, w0 = shape0
    ds = max(1.0, max(h0, w0) / side)
    rows = max(1, math.ceil(h0 / ds))
    cols = max(1, math.ceil(w0 / ds))
    mask = np.zeros((rows, cols), dtype=bool)
    pts = np.asarray(polygon, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise ModelInputError(
            f"a region shape needs at least 3 (row, column) vertices, got {pts.shape}"
        )
    rr, cc = draw_polygon(pts[:, 0] / ds, pts[:, 1] / ds, shape=mask.shape)
    mask[rr, cc] = True
    # a thin polygon may cover no pixel centre: mark its vertices
    vr = np.clip((pts[:, 0] / ds).astype(int), 0, rows - 1)
    vc = np.clip((pts[:, 1] / ds).astype(int), 0, cols - 1)
    mask[vr, vc] = True
    return TissueMask(mask, (h0 / rows, w0 / cols), "polygon")


def _order(
    selected: np.ndarray,
    row_centres: np.ndarray,
    col_centres: np.ndarray,
    priority: tuple[float, float, float, float] | None,
) -> np.ndarray:
    """(N, 2) tile indices: row-major (cells finish early); with a priority box (the
    viewport), its tiles first, then rings of growing distance around it."""
    tiles = np.argwhere(selected)
    if priority is None or not len(tiles):
        return tiles
    top, left, height, width = priority
    cy, cx = row_centres[tiles[:, 0]], col_centres[tiles[:, 1]]
    py, px = top + height / 2, left + width / 2
    dist = np.maximum(np.abs(cy - py) - height / 2, np.abs(cx - px) - width / 2)
    ring = np.maximum(0, np.ceil(dist / max(1.0, max(height, width) / 2))).astype(np.int64)
    return tiles[np.lexsort((tiles[:, 1], tiles[:, 0], ring))]


def _touches_unfinished(tiles: np.ndarray, cells_done: np.ndarray, overlap: bool) -> np.ndarray:
    """Whether each (row, col) tile contributes to a cell that is not finished."""
    nr, nc = cells_done.shape
    need = np.zeros(len(tiles), dtype=bool)
    for di, dj in [(-1, -1), (-1, 0), (0, -1), (0, 0)] if overlap else [(0, 0)]:
        ci, cj = tiles[:, 0] + di, tiles[:, 1] + dj
        ok = (ci >= 0) & (ci < nr) & (cj >= 0) & (cj < nc)
        need[ok] |= ~cells_done[ci[ok], cj[ok]]
    return need


# ----------------------------------------------------------------------------------------
# accumulation of dense tiles


class _Pending:
    """Weighted sums of cells still waiting for tiles, bounded in memory (spill to disk)."""

    def __init__(self, n_channels: int, cell: int, budget_bytes: float, spill_dir: Path) -> None:
        self.k = n_channels
        self.cell = cell
        self.budget = max(1, int(budget_bytes // ((n_channels + 1) * cell * cell * 4)))
        self.mem: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.spilled: set[tuple[int, ...]] = set()
        self.spill_dir = spill_dir
        self.n_spills = 0

    def _path(self, key: tuple[int, ...]) -> Path:
        return self.spill_dir / ("_".join(str(k) for k in key) + ".npz")

    def get(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key]
        if key in self.spilled:
            path = self._path(key)
            with np.load(path) as data:
                entry = (data["acc"].copy(), data["weight"].copy())
            path.unlink()
            self.spilled.discard(key)
        else:
            c = self.cell
            entry = (
                np.zeros((self.k, c, c), dtype=np.float32),
                np.zeros((c, c), dtype=np.float32),
            )
        self.mem[key] = entry
        while len(self.mem) > self.budget:
            old, (acc, weight) = self.mem.popitem(last=False)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            np.savez(self._path(old), acc=acc, weight=weight)
            self.spilled.add(old)
            self.n_spills += 1
        return entry

    def pop(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        entry = self.get(key)
        del self.mem[key]
        return entry

    def clear(self) -> None:
        self.mem.clear()
        self.spilled.clear()
        shutil.rmtree(self.spill_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# the run


def _auto_batch_size(spec: ModelSpec, device: torch.device) -> int:
    p = spec.io.patch_size
    per_tile = p * p * spec.io.channels * 4
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        # activations of small CNNs: ~100x the input; keep half the card free
        return int(max(1, min(256, free * 0.5 // (per_tile * 100))))
    # CPU: a few hundred MB of activations at most
    return int(max(1, min(32, 256e6 // (per_tile * 40))))


def _apply_activation(out: torch.Tensor, spec: ModelSpec, prob_channels: list[int]) -> torch.Tensor:
    import torch

    if spec.activation == "none" or not prob_channels:
        return out
    idx = torch.as_tensor(prob_channels, device=out.device)
    sel = out.index_select(1, idx)
    sel = torch.sigmoid(sel) if spec.activation == "sigmoid" else torch.softmax(sel, dim=1)
    out = out.clone()
    out[:, idx] = sel
    return out


#: regions sampled from the tissue of an image for the per-slide Macenko fit ...
STAIN_FIT_REGIONS = 16
#: ... each this many model pixels square (at least one patch)
STAIN_FIT_SIDE = 256


def _fit_slide_stains(
    pyramid: Pyramid,
    plan: _Plan,
    grid: DenseGrid | PatchGrid,
    selected: np.ndarray,
    plane: tuple[int, ...],
    fill: float,
    spec: ModelSpec,
) -> dict[str, Any]:
    """Fit the source stains of an image once (paper 000: one Macenko fit per slide).

    Up to `STAIN_FIT_REGIONS` regions of ``max(patch_size, STAIN_FIT_SIDE)`` model
    pixels, centred on tiles spread evenly (row-major) over ``selected`` (the tissue
    tiles of the run), are read at the run's level and resampled like the tiles; their
    mosaic is fitted with `macenko_fit` (stain vectors and 99th-percentile
    concentrations over tissue pixels only).

    Returns
    -------
    dict
        JSON-able, saved in the run record: ``fit`` ``"slide"`` with ``stain_matrix``
        (H, E rows) and ``max_concentrations``, ``regions`` (level-0 (top, left, height,
        width) of each region read); or ``fit`` ``"patch"`` with a ``warning`` when no
        fit was possible (no tissue tile, or a single stain): every tile is then fitted
        on its own.
    """
    from ..models.preprocessing import macenko_fit

    cells = np.argwhere(selected)
    if len(cells) == 0:
        return {
            "fit": "patch",
            "warning": "no tissue tile to fit the slide's stains on; each tile was "
            "stain-normalised on its own (per-patch Macenko)",
        }
    io = spec.io
    side = max(io.patch_size, STAIN_FIT_SIDE)
    pick = np.unique(np.linspace(0, len(cells) - 1, min(STAIN_FIT_REGIONS, len(cells))).round())
    read = (max(1, round(side * plan.factor[0])), max(1, round(side * plan.factor[1])))
    ds = plan.level_downsample
    regions, mosaic = [], []
    for k in pick.astype(int):
        i, j = (int(v) for v in cells[k])
        my, mx = grid.input_origin(i, j)
        cy, cx = my + io.patch_size / 2, mx + io.patch_size / 2
        top = round((cy - side / 2) * plan.factor[0])
        left = round((cx - side / 2) * plan.factor[1])
        tile = _read_plane_region(pyramid, plan.level, plane, top, left, read[0], read[1], fill)
        tile = _fit_channels(tile, 3, spec.name, str(pyramid.path))
        mosaic.append(_resize(tile, side))
        box = (top * ds[0], left * ds[1], read[0] * ds[0], read[1] * ds[1])
        regions.append([round(v) for v in box])
    try:
        fit = macenko_fit(np.concatenate(mosaic, axis=1))
    except ModelInputError as exc:
        return {
            "fit": "patch",
            "regions": regions,
            "warning": f"the slide's stains could not be fitted ({exc}); each tile was "
            "stain-normalised on its own (per-patch Macenko)",
        }
    return {
        "fit": "slide",
        "stain_matrix": [list(v) for v in fit.stain_matrix],
        "max_concentrations": list(fit.max_concentrations),
        "regions": regions,
    }


def _stain_source(info: dict[str, Any] | None) -> StainReference | None:
    """The source fit of a run record's ``stain_source`` (None: per-patch)."""
    if not info or info.get("fit") != "slide":
        return None
    m = info["stain_matrix"]
    c = info["max_concentrations"]
    return StainReference(
        stain_matrix=(
            (float(m[0][0]), float(m[0][1]), float(m[0][2])),
            (float(m[1][0]), float(m[1][1]), float(m[1][2])),
        ),
        max_concentrations=(float(c[0]), float(c[1])),
    )


def run_model(
    pyramid: Pyramid,
    predictor: Predictor,
    out: str | Path,
    *,
    config: RunConfig | None = None,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, RunResult]:
    """Run a model over an image, tile by tile; yields `Progress`, returns `RunResult`.

    Parameters
    ----------
    pyramid : Pyramid
        The image (2D ``YX``/``YXS``, or a stack whose other axes are run plane by plane).
    predictor : Predictor
        A loaded model (`napari_histo_ai.models.loading.load_model`).
    out : str or Path
        The run folder (``*.zarr``); an existing run with the same model and image
        resumes.
    config : RunConfig, keyword-only
    cancel : threading.Event, keyword-only
        Set it to stop after the current batch.

    Raises
    ------
    ModelInputError
        The image does not fit the model (channels, missing mpp, region).
    RunStateError
        ``out`` holds something else than a run of this model on this image.
    """
    import zarr

    config = config or RunConfig()
    spec = predictor.spec
    out = Path(out)
    t_start = time.perf_counter()
    predictor.check()

    plan = _plan(pyramid, spec, config)
    plane_axes = _plane_axes(pyramid.axes)
    lv0_shape = pyramid.levels[0].shape
    plane_shape = tuple(int(lv0_shape[pyramid.axes.index(a)]) for a in plane_axes)
    planes = list(np.ndindex(*plane_shape)) if plane_shape else [()]
    channels = int(lv0_shape[pyramid.axes.index("S")]) if "S" in pyramid.axes else 1
    if not (
        channels == spec.io.channels
        or (channels == 4 and spec.io.channels == 3)
        or (channels in (3, 4) and spec.io.channels == 1)
    ):
        _fit_channels(
            np.zeros((1, 1, channels), np.uint8), spec.io.channels, spec.name, str(pyramid.path)
        )
    fill = config.fill_value
    if fill is None:
        fill = 255.0 if (pyramid.dtype == np.uint8 and channels >= 3) else 0.0
    h0, w0 = pyramid.spatial_shape(0)[-2:]

    io = spec.io
    prob_channels: list[int] = []
    size_channels: list[int] = []
    for o in spec.outputs:
        if o.kind in ("probability", "mask", "points", "boxes", "lines"):
            prob_channels += [c for c in o.channels if c not in prob_channels]
        if o.kind == "boxes" and o.size_channels:
            size_channels += [c for c in o.size_channels if c not in size_channels]
    prob_index = {c: i for i, c in enumerate(prob_channels)}
    size_index = {c: i for i, c in enumerate(size_channels)}

    grid: DenseGrid | PatchGrid
    if spec.dense:
        grid = DenseGrid(
            plan.model_extent[0],
            plan.model_extent[1],
            io.patch_size,
            io.halo,
            io.overlap,
            io.output_stride,
        )
        r = io.output_stride
        geo = _geometry(plan, (r, r), (r / 2, r / 2))
    else:
        grid = PatchGrid(plan.model_extent[0], plan.model_extent[1], io.patch_size, io.overlap)
        s = grid.stride
        geo = _geometry(plan, (s, s), (io.patch_size / 2, io.patch_size / 2))
    n_rows, n_cols = grid.n_tiles
    to0 = (plan.factor[0] * plan.level_downsample[0], plan.factor[1] * plan.level_downsample[1])

    # ---- which tiles --------------------------------------------------------------------
    masks: list[TissueMask] = []
    tissue_method = "off"
    if config.tissue and not plane_shape:
        tm = tissue_mask(pyramid, threshold=config.tissue_threshold)
        masks.append(tm)
        tissue_method = tm.method
    if config.polygon is not None:
        masks.append(_polygon_mask(config.polygon, (h0, w0)))
    roi = None
    if config.roi is not None:
        top, left, height, width = (float(v) for v in config.roi)
        if height <= 0 or width <= 0:
            raise ModelInputError(f"region {config.roi} must have a positive height and width")
        roi = (max(0.0, top), max(0.0, left), min(h0, top + height), min(w0, left + width))
        if roi[2] <= roi[0] or roi[3] <= roi[1]:
            raise ModelInputError(
                f"region (top, left, height, width) = {config.roi} level-0 pixels lies "
                f"outside the image ({h0} x {w0} pixels)"
            )
    # kept area of every tile row / column in level-0 pixels (the grid is separable)
    rows_kept = np.array([grid.kept_box(i, 0)[0::2] for i in range(n_rows)], dtype=np.float64)
    cols_kept = np.array([grid.kept_box(0, j)[1::2] for j in range(n_cols)], dtype=np.float64)
    top0 = np.clip(rows_kept[:, 0] * to0[0], 0, h0)
    bottom0 = np.clip(rows_kept[:, 1] * to0[0], 0, h0)
    left0 = np.clip(cols_kept[:, 0] * to0[1], 0, w0)
    right0 = np.clip(cols_kept[:, 1] * to0[1], 0, w0)
    row_ok, col_ok = bottom0 > top0, right0 > left0
    if roi is not None:
        row_ok &= (top0 < roi[2]) & (bottom0 > roi[0])
        col_ok &= (left0 < roi[3]) & (right0 > roi[1])
    inside = row_ok[:, None] & col_ok[None, :]
    foreground = np.ones_like(inside)
    for m in masks:
        foreground &= m.any_in_grid(top0, bottom0, left0, right0)
    selected = inside & foreground
    n_background = int((inside & ~foreground).sum())
    order = _order(selected, (top0 + bottom0) / 2, (left0 + right0) / 2, config.priority)

    # ---- the run folder -----------------------------------------------------------------
    record = {
        "engine_version": ENGINE_VERSION,
        "model": spec.name,
        "model_version": spec.version,
        "fingerprint": spec.fingerprint(),
        "image": str(pyramid.path),
        "image_shape": [int(v) for v in lv0_shape],
        "image_mpp": list(plan.image_mpp) if plan.image_mpp else None,
        "level": plan.level,
        "factor": list(plan.factor),
        "dense": spec.dense,
        "grid": [io.patch_size, io.halo, io.overlap, io.output_stride],
        "prob_channels": prob_channels,
        "size_channels": size_channels,
        "planes": list(plane_shape),
        "geometry": {
            "scale": list(geo.scale),
            "translate": list(geo.translate),
            "pixel": list(geo.pixel),
            "unit": geo.unit,
        },
    }
    group = None
    created = False
    old: dict[str, Any] = {}
    if out.exists():
        try:
            group = zarr.open_group(str(out), mode="r+")
            raw = group.attrs.get(RECORD_KEY)
            old = dict(raw) if isinstance(raw, dict) else {}
        except Exception:  # not a zarr group at all
            old = {}
        same = {k: v for k, v in old.items() if k in record} == record
        if not old:
            raise RunStateError(
                f"{out} exists and is not a napari-histo-ai run; choose another output folder"
            )
        if not same or not config.resume:
            shutil.rmtree(out)
            group = None
    # world scale of the plane axes (e.g. a volume's z spacing in mm), so that a run folder
    # opened on its own places its planes like the source layer; not part of `record`,
    # which decides whether a run resumes
    nonchannel = [a for a in pyramid.axes if a != "S"]
    full_scale = pyramid.layer_scale()
    described = {
        "spec": spec.to_dict(),
        "plane_scale": [float(full_scale[nonchannel.index(a)]) for a in plane_axes],
    }
    if group is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(out), mode="w")
        group.attrs[RECORD_KEY] = cast(Any, {**record, **described})
        created = True
    # ---- stain normalisation: the source stains, fitted once per run (kept on resume)
    stain_info: dict[str, Any] | None = None
    stain_ref = io.normalisation.stain
    if stain_ref is not None and stain_ref.fit == "slide":
        saved = old.get("stain_source") if not created else None
        if isinstance(saved, dict) and saved.get("fit") in ("slide", "patch"):
            stain_info = dict(saved)
        else:
            stain_info = _fit_slide_stains(pyramid, plan, grid, selected, planes[0], fill, spec)
            group.attrs[RECORD_KEY] = cast(Any, {**record, **described, "stain_source": stain_info})
    stain_source = _stain_source(stain_info)
    run_warnings = [stain_info["warning"]] if stain_info and "warning" in stain_info else []

    progress_path = out / "progress.npz"
    state = load_progress(progress_path) if not created else None
    dense_out: DenseOutput | None = None
    tile_out: TileOutput | None = None
    if spec.dense:
        assert isinstance(grid, DenseGrid)
        cs = grid.cell_size
        oh, ow = grid.output_shape
        n_levels = 1
        while cs % 2**n_levels == 0 and max(oh, ow) / 2**n_levels >= 256 and n_levels < 8:
            n_levels += 1
        dense_out = DenseOutput(
            group,
            n_prob=len(prob_channels),
            n_sizes=len(size_channels),
            planes=plane_shape,
            shape=(oh, ow),
            cell_size=cs,
            n_levels=n_levels,
            scale=geo.scale,
            translate=geo.translate,
            unit=geo.unit,
            create=created,
        )
        n_cells = grid.n_cells
        cells_done = np.zeros((*plane_shape, *n_cells), dtype=bool)
        if state is not None and state.get("cells_done", np.zeros(0)).shape == cells_done.shape:
            cells_done = state["cells_done"].astype(bool)
    else:
        tile_out = TileOutput(
            group,
            n_channels=spec.n_outputs,
            planes=plane_shape,
            n_tiles=(n_rows, n_cols),
            scale=geo.scale,
            translate=geo.translate,
            unit=geo.unit,
            create=created,
        )
        tiles_done_arr = np.zeros((*plane_shape, n_rows, n_cols), dtype=bool)
        if state is not None and state.get("tiles_done", np.zeros(0)).shape == tiles_done_arr.shape:
            tiles_done_arr = state["tiles_done"].astype(bool)

    # tiles still to compute, per plane: (plane..., row, col) rows of an int array
    n_plane = len(plane_shape)
    todo_parts = []
    for plane in planes:
        if spec.dense:
            assert isinstance(grid, DenseGrid)
            need = _touches_unfinished(order, cells_done[plane], grid.overlap > 0)
        else:
            need = ~tiles_done_arr[plane][order[:, 0], order[:, 1]]
        rows = order[need]
        lead = np.tile(np.asarray(plane, dtype=np.int64), (len(rows), 1))
        todo_parts.append(np.column_stack([lead, rows]) if n_plane else rows)
    todo = np.concatenate(todo_parts) if todo_parts else np.zeros((0, 2 + n_plane), np.int64)
    total = int(selected.sum()) * len(planes)
    already = total - len(todo)

    # pending counts per cell: selected tiles touching it that are still to compute
    pending = None
    remaining = np.zeros(0, dtype=np.int16)
    if spec.dense:
        assert isinstance(grid, DenseGrid)
        pending = _Pending(
            len(prob_channels) + len(size_channels),
            grid.cell_size,
            config.memory_mb * 1e6,
            out / ".pending",
        )
        pending.clear()
        remaining = np.zeros(cells_done.shape, dtype=np.int16)
        nr_c, nc_c = grid.n_cells
        offsets = [(-1, -1), (-1, 0), (0, -1), (0, 0)] if grid.overlap > 0 else [(0, 0)]
        for di, dj in offsets:
            ci = todo[:, n_plane] + di
            cj = todo[:, n_plane + 1] + dj
            ok = (ci >= 0) & (ci < nr_c) & (cj >= 0) & (cj < nc_c)
            key = (*(todo[ok, k] for k in range(n_plane)), ci[ok], cj[ok])
            np.add.at(remaining, key, 1)
        remaining[cells_done] = 0
        weights = grid.weights()

    # ---- objects ------------------------------------------------------------------------
    object_outputs = [o for o in spec.outputs if o.kind in ("points", "boxes")]
    objects = {o.name: Objects.empty(o.kind, len(plane_shape), o.classes) for o in object_outputs}
    extracted: set[tuple[int, ...]] = set()
    out_px_um = geo.scale[0] if geo.unit in ("um", "mm") else geo.pixel[0]
    if geo.unit == "mm":
        out_px_um = geo.scale[0] * 1000

    def threshold_of(o: OutputSpec) -> float:
        return config.threshold if config.threshold is not None else o.threshold

    # recently finished cells (uint8, as stored), so objects need no read-back from disk
    recent: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
    recent_budget = 0
    if spec.dense:
        assert isinstance(grid, DenseGrid)
        recent_budget = max(16, int(24e6 // max(1, len(prob_channels) * grid.cell_size**2)))

    def remember(key: tuple[int, ...], stored: np.ndarray) -> None:
        if not object_outputs:
            return
        recent[key] = stored
        while len(recent) > recent_budget:
            recent.popitem(last=False)

    def gather(plane: tuple[int, ...], y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Probabilities (K, h, w) float32 of an output box clipped to the output,
        from the recent cells where possible, else from disk."""
        assert dense_out is not None and isinstance(grid, DenseGrid)
        cs = grid.cell_size
        oh, ow = grid.output_shape
        y0, x0, y1, x1 = max(0, y0), max(0, x0), min(oh, y1), min(ow, x1)
        block = np.zeros((len(prob_channels), y1 - y0, x1 - x0), dtype=np.uint8)
        for ci in range(y0 // cs, (y1 - 1) // cs + 1):
            for cj in range(x0 // cs, (x1 - 1) // cs + 1):
                ry0, rx0 = max(y0, ci * cs), max(x0, cj * cs)
                ry1, rx1 = min(y1, (ci + 1) * cs), min(x1, (cj + 1) * cs)
                cell = recent.get((*plane, ci, cj))
                if cell is not None:
                    part = cell[:, ry0 - ci * cs : ry1 - ci * cs, rx0 - cj * cs : rx1 - cj * cs]
                elif cells_done[(*plane, ci, cj)]:
                    part = dense_out.read_cell_region(plane, ry0, rx0, ry1, rx1)
                else:
                    continue  # never computed: zeros
                block[:, ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = part
        return block.astype(np.float32) / 255.0

    def footprint_final(pl: tuple[int, ...], r0: int, c0: int, r1: int, c1: int) -> bool:
        window: tuple[Any, ...] = (*pl, slice(r0, r1), slice(c0, c1))
        return not bool((remaining[window] > 0).any())

    def extract(key: tuple[int, ...]) -> dict[str, Objects]:
        assert dense_out is not None and isinstance(grid, DenseGrid)
        plane, (ci, cj) = key[:-2], key[-2:]
        found: dict[str, Objects] = {}
        cs = grid.cell_size
        for o in object_outputs:
            md = max(1, round(o.min_distance_um / max(out_px_um, 1e-9)))
            margin = min(cs, md + 2)
            y0, x0 = ci * cs - margin, cj * cs - margin
            y1, x1 = (ci + 1) * cs + margin, (cj + 1) * cs + margin
            cy0, cx0 = max(0, y0), max(0, x0)
            block = gather(plane, y0, x0, y1, x1)
            chans = [prob_index[c] for c in o.channels]
            core = (ci * cs - cy0, cj * cs - cx0, (ci + 1) * cs - cy0, (cj + 1) * cs - cx0)
            peaks, scores, labels = find_peaks(
                block[chans], threshold=threshold_of(o), min_distance=md, core=core
            )
            if not len(peaks):
                continue
            rows = (peaks[:, 0] + cy0 + 0.5) * geo.pixel[0]
            cols = (peaks[:, 1] + cx0 + 0.5) * geo.pixel[1]
            lead = np.tile(np.asarray(plane, dtype=np.float64), (len(rows), 1))
            if o.kind == "points":
                coords = np.column_stack([lead, rows, cols])
            else:
                assert dense_out.sizes is not None and o.size_channels is not None
                sz = np.asarray(
                    dense_out.sizes[
                        (
                            slice(None),
                            *plane,
                            slice(cy0, cy0 + block.shape[1]),
                            slice(cx0, cx0 + block.shape[2]),
                        )
                    ]
                )
                hh = sz[size_index[o.size_channels[0]], peaks[:, 0], peaks[:, 1]] * geo.pixel[0]
                ww = sz[size_index[o.size_channels[1]], peaks[:, 0], peaks[:, 1]] * geo.pixel[1]
                coords = np.column_stack(
                    [lead, rows - hh / 2, cols - ww / 2, rows + hh / 2, cols + ww / 2]
                )
            found[o.name] = Objects(o.kind, coords, scores, labels, o.classes)
        return found

    def ready_for_objects(key: tuple[int, ...]) -> bool:
        plane, (ci, cj) = key[:-2], key[-2:]
        nr, nc = cells_done.shape[-2:]
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ni, nj = ci + di, cj + dj
                if 0 <= ni < nr and 0 <= nj < nc:
                    nkey = (*plane, ni, nj)
                    if not cells_done[nkey] and remaining[nkey] > 0:
                        return False
        return True

    # ---- workers ------------------------------------------------------------------------
    device = predictor.device
    batch_size = config.batch_size or _auto_batch_size(spec, device)
    p = io.patch_size
    read_size = (max(1, round(p * plan.factor[0])), max(1, round(p * plan.factor[1])))
    stats = {"read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    stats_lock = threading.Lock()

    def prepare(batch: list[tuple[tuple[int, ...], int, int]]) -> np.ndarray:
        t0 = time.perf_counter()
        from ..models.preprocessing import normalise

        tiles = []
        for plane, i, j in batch:
            my, mx = grid.input_origin(i, j)
            top = round(my * plan.factor[0])
            left = round(mx * plan.factor[1])
            tile = _read_plane_region(
                pyramid, plan.level, plane, top, left, read_size[0], read_size[1], fill
            )
            tile = _fit_channels(tile, io.channels, spec.name, str(pyramid.path))
            tiles.append(_resize(tile, p))
        x = normalise(np.stack(tiles), io.normalisation, source=stain_source)
        with stats_lock:
            stats["read_s"] += time.perf_counter() - t0
        return x

    new_objects: dict[str, Objects] = {}
    objects_lock = threading.Lock()

    def absorb(batch: list[tuple[tuple[int, ...], int, int]], y: np.ndarray) -> None:
        """Blend a batch's outputs into pending cells; write the cells that are complete."""
        t0 = time.perf_counter()
        if not spec.dense:
            assert tile_out is not None
            by_plane: dict[tuple[int, ...], list[int]] = {}
            for n, (plane, _, _) in enumerate(batch):
                by_plane.setdefault(plane, []).append(n)
            for plane, idx in by_plane.items():
                rows = np.array([batch[n][1] for n in idx])
                cols = np.array([batch[n][2] for n in idx])
                tile_out.write(plane, rows, cols, y[idx])
                done_key: tuple[Any, ...] = (*plane, rows, cols)
                tiles_done_arr[done_key] = True
            with stats_lock:
                stats["write_s"] += time.perf_counter() - t0
            return
        assert isinstance(grid, DenseGrid) and dense_out is not None and pending is not None
        cs = grid.cell_size
        r = io.output_stride
        halo_o = io.halo // r
        kept_o = grid.kept // r
        finished: list[tuple[int, ...]] = []
        chans = prob_channels + size_channels
        for n, (plane, i, j) in enumerate(batch):
            kept = y[n, chans, halo_o : halo_o + kept_o, halo_o : halo_o + kept_o]
            ky, kx = grid.kept_origin(i, j)
            for ci, cj in grid.cells_of_tile(i, j):
                key = (*plane, ci, cj)
                if remaining[key] == 0:  # finished, or no selected tile left for it
                    continue
                # overlap of the tile's kept area with the cell, in cell coordinates
                y0, x0 = max(ky, ci * cs), max(kx, cj * cs)
                y1, x1 = min(ky + kept_o, (ci + 1) * cs), min(kx + kept_o, (cj + 1) * cs)
                if y1 <= y0 or x1 <= x0:
                    continue
                acc, wsum = pending.get(key)
                w = weights[y0 - ky : y1 - ky, x0 - kx : x1 - kx]
                sl = (slice(y0 - ci * cs, y1 - ci * cs), slice(x0 - cj * cs, x1 - cj * cs))
                acc[(slice(None), *sl)] += kept[:, y0 - ky : y1 - ky, x0 - kx : x1 - kx] * w
                wsum[sl] += w
            for ci, cj in grid.cells_of_tile(i, j):
                key = (*plane, ci, cj)
                if remaining[key] > 0:
                    remaining[key] -= 1
                    if remaining[key] == 0:
                        acc, wsum = pending.pop(key)
                        value = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
                        npb = len(prob_channels)
                        stored = dense_out.write_cell(
                            plane,
                            ci,
                            cj,
                            value[:npb],
                            value[npb:] if size_channels else None,
                            footprint_final=footprint_final,
                        )
                        remember(key, stored)
                        cells_done[key] = True
                        finished.append(key)
        if object_outputs:
            candidates: set[tuple[int, ...]] = set()
            for key in finished:
                plane, (ci, cj) = key[:-2], key[-2:]
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        candidates.add((*plane, ci + di, cj + dj))
            for key in sorted(candidates):
                if key in extracted or not _inside(key, cells_done.shape):
                    continue
                if cells_done[key] and ready_for_objects(key):
                    extracted.add(key)
                    found = extract(key)
                    with objects_lock:
                        for name, objs in found.items():
                            objects[name].extend(objs)
                            if name in new_objects:
                                new_objects[name].extend(objs)
                            else:
                                new_objects[name] = Objects(
                                    objs.kind, objs.coords, objs.scores, objs.labels, objs.classes
                                )
        with stats_lock:
            stats["write_s"] += time.perf_counter() - t0

    def save_state() -> None:
        if spec.dense:
            save_progress(progress_path, cells_done=cells_done)
        else:
            save_progress(progress_path, tiles_done=tiles_done_arr)

    # objects of cells finished by an earlier, interrupted run
    if object_outputs and spec.dense:
        for key in zip(*np.nonzero(cells_done), strict=False):
            k = tuple(int(v) for v in key)
            if ready_for_objects(k):
                extracted.add(k)
                for name, objs in extract(k).items():
                    objects[name].extend(objs)
    resumed_objects = {
        name: Objects(o.kind, o.coords.copy(), o.scores.copy(), o.labels.copy(), o.classes)
        for name, o in objects.items()
        if len(o)
    }

    def batches_of_todo() -> Iterator[list[tuple[tuple[int, ...], int, int]]]:
        for n in range(0, len(todo), batch_size):
            yield [
                (tuple(int(v) for v in row[:n_plane]), int(row[n_plane]), int(row[n_plane + 1]))
                for row in todo[n : n + batch_size]
            ]

    readers = ThreadPoolExecutor(
        max_workers=max(1, config.workers), thread_name_prefix="histo-read"
    )
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histo-write")
    queue: list[tuple[list[tuple[tuple[int, ...], int, int]], Future[np.ndarray]]] = []
    batch_iter: Iterator[list[tuple[tuple[int, ...], int, int]]] = batches_of_todo()
    writes: list[Future[None]] = []
    done = already
    cancelled = False
    rate_window: list[tuple[float, int]] = [(time.perf_counter(), done)]
    message = (
        f"{spec.name}: {total} tiles ({n_background} background skipped), "
        f"level {plan.level}, batch {batch_size}, {device}"
    )
    yield Progress(
        done,
        total,
        time.perf_counter() - t_start,
        0.0,
        None,
        message,
        resumed_objects,
        path=out,
        geometry={o.name: geo for o in spec.outputs},
        planes=plane_shape,
    )

    def fill_queue() -> None:
        while len(queue) < max(1, config.prefetch):
            nxt = next(batch_iter, None)
            if nxt is None:
                return
            queue.append((nxt, readers.submit(prepare, nxt)))

    try:
        fill_queue()
        while queue:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            batch, fut = queue.pop(0)
            x = fut.result()
            fill_queue()
            t0 = time.perf_counter()
            y = _forward(predictor, x, spec, prob_channels)
            stats["model_s"] += time.perf_counter() - t0
            # keep at most two batches waiting for the writer (bounded memory)
            while len(writes) >= 2:
                writes.pop(0).result()
            writes.append(writer.submit(absorb, batch, y))
            done += len(batch)
            now = time.perf_counter()
            rate_window.append((now, done))
            rate_window = rate_window[-20:]
            dt = now - rate_window[0][0]
            rate = (done - rate_window[0][1]) / dt if dt > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else None
            with objects_lock:
                fresh = dict(new_objects)
                new_objects.clear()
            save_state()
            yield Progress(done, total, now - t_start, rate, eta, message, fresh)
    finally:
        for _, f in queue:
            f.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        for w in writes:
            w.result()
        writer.shutdown(wait=True)
        if dense_out is not None:
            dense_out.flush()
        save_state()
        if pending is not None:
            pending.clear()

    with objects_lock:
        fresh = dict(new_objects)
        new_objects.clear()
    complete = not cancelled and done >= total
    if object_outputs and spec.dense and complete:
        # cells whose neighbours never finish (region borders) still get their objects
        for key in zip(*np.nonzero(cells_done), strict=False):
            k = tuple(int(v) for v in key)
            if k not in extracted:
                extracted.add(k)
                for name, objs in extract(k).items():
                    objects[name].extend(objs)
                    if name in fresh:
                        fresh[name].extend(objs)
                    else:
                        fresh[name] = objs

    line_outputs = [o for o in spec.outputs if o.kind == "lines"]
    if line_outputs and dense_out is not None and complete and len(plane_shape) <= 1:
        # per lesion of the finished map, its longest diameter (inference/lesions.py)
        from .lesions import lesion_objects, output_spacing_mm

        for o in line_outputs:
            lines = lesion_objects(
                dense_out.prob[0][prob_index[o.channels[0]]],
                threshold_of(o),
                pixel=geo.pixel,
                spacing_mm=output_spacing_mm(pyramid, geo),
                classes=o.classes,
            )
            objects[o.name] = lines
            fresh[o.name] = lines

    aggregates: dict[str, dict[str, Any]] = {}
    if not spec.dense:
        assert tile_out is not None
        values = np.asarray(tile_out.array)
        for o in spec.outputs:
            chosen = values[list(o.channels)]
            if o.kind == "class" and o.smoothing_um > 0:  # aggregate of the smoothed map
                from .smoothing import sigma_pixels, smooth_probabilities

                sigma = sigma_pixels(o.smoothing_um, geo.scale[-1])
                chosen = smooth_probabilities(chosen, sigma_px=sigma)
            v = chosen.reshape(len(o.channels), -1).T
            aggregates[o.name] = aggregate(v, o)

    geometry = {o.name: geo for o in spec.outputs}
    summary = {
        "model": spec.name,
        "model_version": spec.version,
        "task": spec.task,
        "image": str(pyramid.path),
        "image_shape": [int(v) for v in lv0_shape],
        "image_mpp": list(plan.image_mpp) if plan.image_mpp else None,
        "model_mpp": io.mpp,
        "level": plan.level,
        "resample_factor": list(plan.factor),
        "output_pixel_level0": list(geo.pixel),
        "scale": list(geo.scale),
        "translate": list(geo.translate),
        "unit": geo.unit,
        "tissue": tissue_method,
        "roi": list(config.roi) if config.roi else None,
        "tiles_total": total,
        "tiles_done": done,
        "tiles_background": n_background,
        "complete": complete,
        "cancelled": cancelled,
        "device": str(device),
        "batch_size": batch_size,
        "wall_s": round(time.perf_counter() - t_start, 3),
        "read_s": round(stats["read_s"], 3),
        "model_s": round(stats["model_s"], 3),
        "write_s": round(stats["write_s"], 3),
        "spilled_cells": pending.n_spills if pending is not None else 0,
        "objects": {k: len(v) for k, v in objects.items()},
        "aggregates": aggregates,
        "stain_source": stain_info,
        "warnings": run_warnings,
    }
    write_json_atomic(out / "summary.json", summary)
    for name, objs in objects.items():
        from .geojson import write_objects

        write_objects(out / f"{name}.geojson", objs, pixel_size=plan.image_mpp)
    if fresh:
        yield Progress(done, total, time.perf_counter() - t_start, 0.0, 0.0, message, fresh)
    return RunResult(
        path=out,
        spec=spec,
        complete=complete,
        cancelled=cancelled,
        tiles_total=total,
        tiles_done=done,
        tiles_skipped=n_background,
        geometry=geometry,
        objects=objects,
        aggregates=aggregates,
        summary=summary,
        planes=plane_shape,
    )


def run_geometry(record: dict[str, Any]) -> Geometry:
    """The `Geometry` saved in a run folder's record (``group.attrs["napari_histo_ai"]``)."""
    g = record["geometry"]
    return Geometry(
        (float(g["scale"][0]), float(g["scale"][1])),
        (float(g["translate"][0]), float(g["translate"][1])),
        (float(g["pixel"][0]), float(g["pixel"][1])),
        str(g["unit"]),
    )


def _inside(key: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return all(0 <= k < s for k, s in zip(key, shape, strict=True))


def _forward(
    predictor: Predictor, x: np.ndarray, spec: ModelSpec, prob_channels: list[int]
) -> np.ndarray:
    """Model + activation on one batch; on a GPU out-of-memory, halve the batch and retry."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    try:
        batch = torch.from_numpy(x)
        if predictor.device.type == "cuda":
            batch = batch.pin_memory().to(predictor.device, non_blocking=True)
        with torch.inference_mode():
            y = predictor(batch)
            y = _apply_activation(
                y.float(), spec, prob_channels if spec.dense else list(range(y.shape[1]))
            )
        return y.cpu().numpy()
    except oom:
        if len(x) == 1:
            raise ModelInputError(
                f"model '{spec.name}' runs out of {predictor.device} memory on a single "
                f"{spec.io.patch_size}² tile; free the GPU or choose device cpu"
            ) from None
        if predictor.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(x) // 2
        return np.concatenate(
            [
                _forward(predictor, x[:half], spec, prob_channels),
                _forward(predictor, x[half:], spec, prob_channels),
            ]
        )


def run_model_sync(
    pyramid: Pyramid,
    predictor: Predictor,
    out: str | Path,
    *,
    config: RunConfig | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunResult:
    """Drive `run_model` to the end in this thread (tests, CLI, scripts)."""
    gen = run_model(pyramid, predictor, out, config=config, cancel=cancel)
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            result: RunResult = stop.value
            return result
        if on_progress is not None:
            on_progress(progress)
