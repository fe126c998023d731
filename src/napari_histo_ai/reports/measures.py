"""The numbers of a report, measured from run folders and the slide.

Every function here reads what the engine wrote (``summary.json``, the zarr record
``group.attrs["napari_histo_ai"]``, ``probability/``, ``tiles/``, ``*.geojson``; see
`napari_histo_ai.inference.store`) and returns a `Measure`: the values with their units,
plain-language sentences and a table. Where a number cannot be computed (no µm/px, no
tissue, an empty run) the measure says so and why instead of guessing.

Coordinates: objects are level-0 pixels (continuous: pixel i spans [i, i + 1)); an
output pixel (a dense map's cell or a tile model's tile) covers ``geometry.pixel``
level-0 pixels, and output pixel 0 starts at level-0 pixel
``translate / (scale / pixel) - (pixel - 1) / 2``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import HistoAIError
from .content import Measure, ModelEntry, ReportOptions, fmt_number

if TYPE_CHECKING:
    from ..inference.engine import Geometry
    from ..inference.objects import Objects
    from ..inference.tissue import TissueMask
    from ..io.pyramid import Pyramid
    from ..models.spec import ModelSpec, OutputSpec

__all__ = [
    "RunData",
    "SlideContext",
    "check_run_image",
    "measure_run",
    "measure_tissue",
    "model_entry",
    "open_run",
    "slide_context",
]

#: how many cells the hotspot window is wide (the density grid's resolution)
HOTSPOT_CELLS = 16
#: tissue-fcn style masks: classes that are tissue (the others are background)
_NOT_TISSUE = ("background",)


# ----------------------------------------------------------------------------- run data
@dataclass
class RunData:
    """A run folder opened for reading.

    Attributes
    ----------
    path : Path
    record : dict
        The zarr group's ``napari_histo_ai`` attribute (the engine's run record).
    summary : dict or None
        ``summary.json`` (absent while a run has never stopped).
    spec : ModelSpec
        The model as it was run (from the record).
    geometry : Geometry
    """

    path: Path
    record: dict[str, Any]
    summary: dict[str, Any] | None
    spec: ModelSpec
    geometry: Geometry
    _group: Any = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def complete(self) -> bool:
        return bool(self.summary and self.summary.get("complete"))

    @property
    def image_shape(self) -> list[int]:
        return [int(v) for v in self.record.get("image_shape", [])]

    @property
    def image_mpp(self) -> tuple[float, float] | None:
        mpp = self.record.get("image_mpp")
        return (float(mpp[0]), float(mpp[1])) if mpp else None

    @property
    def group(self) -> Any:
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def aggregates(self) -> dict[str, dict[str, Any]]:
        """Image-level aggregates of the tile outputs (summary, else recomputed)."""
        saved = (self.summary or {}).get("aggregates") or {}
        if saved or self.spec.dense:
            return dict(saved)
        from ..inference.objects import aggregate

        tiles = self.tiles()
        out: dict[str, dict[str, Any]] = {}
        if tiles is None:
            return out
        for o in self.spec.outputs:
            values = tiles[list(o.channels)].reshape(len(o.channels), -1).T
            out[o.name] = aggregate(values, o)
        return out

    def tiles(self) -> np.ndarray | None:
        """The tile model's per-tile vectors (K, [Z,] rows, cols), NaN = not computed."""
        if "tiles" not in self.group:
            return None
        return np.asarray(self.group["tiles"]["0"])

    def objects(self, output: OutputSpec) -> Objects | None:
        """The objects of a points / boxes / lines output (``None`` when not written)."""
        from ..inference.geojson import read_objects

        file = self.path / f"{output.name}.geojson"
        if not file.is_file():
            return None
        n_plane = len(self.record.get("planes", []))
        try:
            return read_objects(file, kind=output.kind, classes=output.classes, n_plane=n_plane)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise HistoAIError(
                f"{file}: cannot read the {output.name!r} objects ({exc}); run the model "
                "again into a new folder"
            ) from None

    def probability_level(self, max_side: int) -> tuple[np.ndarray, int]:
        """The finest ``probability`` level whose longest side is at most ``max_side``.

        Returns
        -------
        (array, level)
            uint8 (K, [Z,] h, w) (p × 255) and its level k (2**k output pixels each).
        """
        prob = self.group["probability"]
        keys = sorted(prob.array_keys(), key=int)
        chosen = keys[-1]
        for k in keys:
            if max(prob[k].shape[-2:]) <= max_side:
                chosen = k
                break
        return np.asarray(prob[chosen]), int(chosen)

    def channel_index(self, channel: int) -> int:
        """Where model channel ``channel`` is stored in ``probability``."""
        return list(self.record.get("prob_channels", [])).index(channel)


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` holds an engine run (reads one JSON file)."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and "napari_histo_ai" in attrs


def open_run(path: str | Path) -> RunData:
    """Open a run folder written by the engine.

    Raises
    ------
    HistoAIError
        ``path`` is missing or not a napari-histo-ai run folder.
    """
    from ..inference.engine import run_geometry
    from ..models.spec import ModelSpec

    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise HistoAIError(f"run folder {path} does not exist; give a *.zarr run folder")
    if not is_run_folder(path):
        raise HistoAIError(
            f"{path} is not a napari-histo-ai run folder (no run record in zarr.json); "
            "give a folder written by `napari-histo-ai predict`"
        )
    meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    record = dict(meta["attributes"]["napari_histo_ai"])
    try:
        spec = ModelSpec.from_dict(record["spec"], source=str(path))
        geometry = run_geometry(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise HistoAIError(
            f"{path}: the run record is incomplete ({exc}); run the model again"
        ) from None
    summary = None
    file = path / "summary.json"
    if file.is_file():
        try:
            summary = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = None
    return RunData(path, record, summary, spec, geometry)


def check_run_image(run: RunData, image: str | Path, shape: tuple[int, ...]) -> None:
    """Refuse a run folder made on another image.

    The run's record names its image file and level-0 shape; the shape must be the
    same, and the file either the same path or (a moved slide) the same file name.

    Raises
    ------
    HistoAIError
        Naming the run folder, the image it was made on and the image given.
    """
    recorded = str(run.record.get("image", ""))
    same_shape = [int(v) for v in shape] == run.image_shape
    a, b = Path(recorded), Path(image)
    same_file = a.name == b.name
    try:
        same_file = same_file or a.resolve() == b.resolve()
    except OSError:
        pass
    if not (same_shape and same_file):
        raise HistoAIError(
            f"run folder {run.path} was made on {recorded} (shape {run.image_shape}), not on "
            f"{image} (shape {list(shape)}); give the run folder of this image or let the "
            "report run the model (--model)"
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_SHA_CACHE: dict[tuple[str, int, float], str] = {}


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file (cached by path, size and mtime); ``""`` when absent."""
    try:
        st = path.stat()
    except OSError:
        return ""
    key = (str(path), st.st_size, st.st_mtime)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _file_sha256(path)
    return _SHA_CACHE[key]


def _one_line(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + "…"


def model_entry(run: RunData) -> ModelEntry:
    """Name, version, lineage, weights (+ short sha256), run date / device and card."""
    spec = run.spec
    card = spec.card
    parent = ""
    if card.parent:
        parent = card.parent + (f" {card.parent_version}" if card.parent_version else "")
    weights = ""
    sha = ""
    if spec.weights is not None:
        weights = Path(spec.weights).name
        sha = weights_sha256(Path(spec.weights))[:12]
    summary = run.summary or {}
    when = ""
    stamp = run.path / "summary.json"
    if stamp.is_file():
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp.stat().st_mtime))
    done, total = summary.get("tiles_done"), summary.get("tiles_total")
    tiles = f"{done:,} / {total:,} tiles" if done is not None and total is not None else ""
    return ModelEntry(
        name=spec.name,
        version=spec.version,
        task=spec.task,
        run=str(run.path),
        parent=parent,
        weights=weights,
        weights_sha256=sha,
        run_date=when,
        device=str(summary.get("device", "")),
        wall_s=summary.get("wall_s"),
        tiles=tiles,
        intended_use=_one_line(card.intended_use or card.description),
        limitations=_one_line(card.limitations),
        complete=run.complete,
    )


# ----------------------------------------------------------------------------- slide
@dataclass
class SlideContext:
    """What measures need from the slide: its µm/px and tissue mask.

    Attributes
    ----------
    mpp : (float, float) or None
        µm per level-0 pixel (row, column); ``None`` when unknown.
    mpp_source : str
        Where it came from (``file``, ``--mpp``, ``missing``...).
    shape : (int, int)
        Level-0 (rows, columns).
    tissue : TissueMask
        The foreground mask (all ones when tissue detection is off).
    annotations : dict of str to list, optional
        Reviewed objects per class from an annotation store (``counted`` and
        ``unreviewed`` lists of (row, col, confidence)).
    """

    mpp: tuple[float, float] | None
    mpp_source: str
    shape: tuple[int, int]
    tissue: TissueMask
    options: ReportOptions
    annotations: dict[str, dict[str, list[tuple[float, float, float]]]] | None = None
    annotations_path: str | None = None

    @property
    def pixel_area_mm2(self) -> float | None:
        """Area of one level-0 pixel, mm²."""
        if self.mpp is None:
            return None
        return self.mpp[0] * self.mpp[1] * 1e-6

    @property
    def tissue_pixels0(self) -> float:
        """Tissue area in level-0 pixels."""
        dy, dx = self.tissue.downsample
        return float(self.tissue.mask.sum()) * dy * dx

    @property
    def tissue_mm2(self) -> float | None:
        a = self.pixel_area_mm2
        return None if a is None else self.tissue_pixels0 * a


def slide_context(
    pyramid: Pyramid,
    options: ReportOptions,
    *,
    mpp: float | None = None,
    tissue: bool = True,
    tissue_threshold: float | None = None,
) -> SlideContext:
    """The slide's µm/px and tissue mask (computed on a low pyramid level)."""
    from ..inference.tissue import TissueMask, tissue_mask

    h0, w0 = pyramid.spatial_shape(0)[-2:]
    if mpp is not None:
        pixel: tuple[float, float] | None = (float(mpp), float(mpp))
        source = "given (--mpp)"
    elif pyramid.mpp is not None:
        pixel = (float(pyramid.mpp[0]), float(pyramid.mpp[1]))
        source = pyramid.mpp_source
    elif pyramid.kind == "volume" and pyramid.spacing_mm:
        sy, sx = (float(v) * 1000.0 for v in pyramid.spacing_mm[-2:])
        pixel, source = (sy, sx), "voxel spacing"
    else:
        pixel, source = None, "missing"
    if tissue and pyramid.kind != "volume":
        mask = tissue_mask(pyramid, threshold=tissue_threshold, area=True)
        mask = TissueMask(mask.mask, mask.downsample, f"tissue detector: {mask.method}")
    else:
        side = 512
        f = max(1.0, max(h0, w0) / side)
        rows, cols = max(1, round(h0 / f)), max(1, round(w0 / f))
        why = "tissue detection off" if not tissue else "a volume"
        mask = TissueMask(
            np.ones((rows, cols), dtype=bool), (h0 / rows, w0 / cols), f"whole image ({why})"
        )
    return SlideContext(pixel, source, (int(h0), int(w0)), mask, options)


def measure_tissue(ctx: SlideContext) -> Measure:
    """Tissue area in mm² (the tissue detector on a low level) and how it was found."""
    dy, dx = ctx.tissue.downsample
    frac = ctx.tissue.fraction
    values: dict[str, Any] = {
        "area_mm2": ctx.tissue_mm2,
        "area_px": ctx.tissue_pixels0,
        "fraction_of_image": frac,
        "method": ctx.tissue.method,
        "mask_pixel_um": [dy * ctx.mpp[0], dx * ctx.mpp[1]] if ctx.mpp else None,
        "mpp": list(ctx.mpp) if ctx.mpp else None,
        "mpp_source": ctx.mpp_source,
    }
    method = (
        f"{ctx.tissue.method}, on a {ctx.tissue.mask.shape[1]} × {ctx.tissue.mask.shape[0]} "
        f"px overview ({dy:.3g} slide pixels per overview pixel)"
    )
    if ctx.tissue_mm2 is None:
        sentences = [
            f"Tissue covers {frac:.0%} of the image; its area in mm² cannot be given because "
            "the file records no pixel size (µm per pixel)."
        ]
        table = [["Quantity", "Value"], ["Tissue", f"{frac:.0%} of the image"]]
    else:
        h_mm = ctx.shape[0] * ctx.mpp[0] / 1000 if ctx.mpp else 0
        w_mm = ctx.shape[1] * ctx.mpp[1] / 1000 if ctx.mpp else 0
        sentences = [
            f"The slide holds {fmt_number(ctx.tissue_mm2)} mm² of tissue "
            f"({frac:.0%} of the {w_mm:.2f} × {h_mm:.2f} mm image)."
        ]
        table = [
            ["Quantity", "Value"],
            ["Tissue area", f"{fmt_number(ctx.tissue_mm2)} mm²"],
            ["Image size", f"{w_mm:.2f} × {h_mm:.2f} mm ({ctx.shape[1]:,} × {ctx.shape[0]:,} px)"],
            ["Pixel size", f"{ctx.mpp[0]:.4g} µm/px ({ctx.mpp_source})" if ctx.mpp else "missing"],
        ]
    table.append(["Method", method])
    return Measure("tissue", "Tissue", None, sentences, values, table, [f"Tissue: {method}."])


# ----------------------------------------------------------------------------- geometry
def _origin(geometry: Geometry) -> tuple[float, float]:
    """Level-0 pixel where output pixel 0 starts, per (row, column)."""
    out = []
    for a in range(2):
        unit = geometry.scale[a] / geometry.pixel[a]  # world units per level-0 pixel
        out.append(geometry.translate[a] / unit - (geometry.pixel[a] - 1) / 2)
    return out[0], out[1]


def sample_on_mask(
    grid: np.ndarray, geometry: Geometry, level: int, tissue: TissueMask
) -> np.ndarray:
    """Values of an output grid (h, w) at every tissue-mask pixel centre (nearest).

    Mask pixels outside the grid get NaN (float grids) or 0 (integer grids).
    """
    rows, cols = tissue.mask.shape
    dy, dx = tissue.downsample
    oy, ox = _origin(geometry)
    py, px = geometry.pixel[0] * 2**level, geometry.pixel[1] * 2**level
    yc = (np.arange(rows) + 0.5) * dy
    xc = (np.arange(cols) + 0.5) * dx
    iy = np.floor((yc - oy) / py).astype(np.int64)
    ix = np.floor((xc - ox) / px).astype(np.int64)
    oky = (iy >= 0) & (iy < grid.shape[0])
    okx = (ix >= 0) & (ix < grid.shape[1])
    fill = np.nan if np.issubdtype(grid.dtype, np.floating) else 0
    out = np.full((rows, cols), fill, dtype=grid.dtype)
    sub = grid[np.clip(iy, 0, grid.shape[0] - 1)][:, np.clip(ix, 0, grid.shape[1] - 1)]
    ok = oky[:, None] & okx[None, :]
    out[ok] = sub[ok]
    return out


# ----------------------------------------------------------------------------- mitosis
def hotspot(
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    window_px: tuple[float, float],
    *,
    cells: int = HOTSPOT_CELLS,
) -> tuple[int, tuple[float, float, float, float]]:
    """The highest number of points in any window of ``window_px`` level-0 pixels.

    Points are binned on a grid of ``cells`` cells per window side; every window
    position on that grid inside the image is counted (one summed-area table). A
    window larger than the image along an axis covers the whole axis.

    Returns
    -------
    (count, (top, left, bottom, right))
        The best count and its window, level-0 pixels.
    """
    h, w = shape
    cy, cx = window_px[0] / cells, window_px[1] / cells
    ny, nx = max(1, math.ceil(h / cy)), max(1, math.ceil(w / cx))
    grid = np.zeros((ny, nx), dtype=np.int64)
    if len(rows):
        iy = np.clip((np.asarray(rows) // cy).astype(np.int64), 0, ny - 1)
        ix = np.clip((np.asarray(cols) // cx).astype(np.int64), 0, nx - 1)
        np.add.at(grid, (iy, ix), 1)
    wy, wx = min(cells, ny), min(cells, nx)
    sat = np.zeros((ny + 1, nx + 1), dtype=np.int64)
    sat[1:, 1:] = grid.cumsum(0).cumsum(1)
    sums = sat[wy:, wx:] - sat[:-wy, wx:] - sat[wy:, :-wx] + sat[:-wy, :-wx]
    r, c = np.unravel_index(int(np.argmax(sums)), sums.shape)
    box = (
        float(r * cy),
        float(c * cx),
        float(min(h, (r + wy) * cy)),
        float(min(w, (c + wx) * cx)),
    )
    return int(sums[r, c]), box


def _score_table(scores: np.ndarray) -> list[list[str]]:
    if not len(scores):
        return []
    rows = [["Confidence", "Objects"]]
    edges = [0.0, 0.5, 0.7, 0.9, 1.0001]
    labels = ["below 0.5", "0.5 – 0.7", "0.7 – 0.9", "0.9 and above"]
    for lo, hi, name in zip(edges[:-1], edges[1:], labels, strict=True):
        n = int(((scores >= lo) & (scores < hi)).sum())
        if n or lo >= 0.5:
            rows.append([name, f"{n:,}"])
    rows.append(
        [
            "median (min – max)",
            f"{np.median(scores):.2f} ({scores.min():.2f} – {scores.max():.2f})",
        ]
    )
    return rows


def measure_mitosis(run: RunData | None, output: OutputSpec | None, ctx: SlideContext) -> Measure:
    """Mitotic count, per mm² of tissue, per N HPF and the hotspot (N HPF window).

    ``run`` and ``output`` may be ``None`` when only reviewed annotations are counted
    (``ctx.annotations`` must then hold the class ``mitosis``).
    """
    opts = ctx.options
    classes = output.classes if output is not None else ("mitosis",)
    label = "mitosis" if "mitosis" in classes else (classes or ("object",))[0]
    k = classes.index(label) if label in classes else 0
    objs = run.objects(output) if run is not None and output is not None else None
    if objs is None:
        coords = np.zeros((0, 2))
        scores = np.zeros(0)
    else:
        keep = objs.labels == k
        coords = objs.coords[keep][:, -2:]
        scores = objs.scores[keep]
    model = run.model if run is not None else None
    source = f"model {model} ({output.name})" if run is not None and output is not None else ""
    notes: list[str] = []
    ann = (ctx.annotations or {}).get(label)
    reviewed = None
    if ann is not None:
        # what stands after review: the reviewers' objects (accepted, corrected, added)
        # and the model's calls nobody has looked at yet; rejected ones are removed
        confirmed = ann.get("counted", [])
        unreviewed = ann.get("unreviewed", [])
        counted = [*confirmed, *unreviewed]
        coords = np.asarray([[r, c] for r, c, _ in counted], dtype=float).reshape(-1, 2)
        scores = np.asarray([s for _, _, s in counted], dtype=float)
        n_unrev = len(unreviewed)
        n_rej = len(ann.get("rejected", []))
        reviewed = {
            "counted": len(counted),
            "confirmed": len(confirmed),
            "unreviewed": n_unrev,
            "rejected": n_rej,
        }
        source = f"reviewed annotations ({ctx.annotations_path})"
        notes.append(
            f"Counted from the annotations after review: {len(confirmed):,} objects accepted, "
            f"corrected or added by a reviewer and {n_unrev:,} model detections not yet "
            f"reviewed; {n_rej:,} rejected by a reviewer are not counted."
        )
        if n_unrev:
            notes.append(
                f"{n_unrev:,} of the {len(counted):,} counted objects have not been reviewed: "
                "review them (Review & correct, N for the next one) before the count is used."
            )
    count = len(coords)
    hpf_total = opts.hpf_count * opts.hpf_area_mm2
    hpf_label = f"{opts.hpf_count} HPF"
    values: dict[str, Any] = {
        "count": count,
        "class": label,
        "source": source,
        "reviewed": reviewed,
        "hpf_area_mm2": opts.hpf_area_mm2,
        "hpf_count": opts.hpf_count,
        "tissue_mm2": ctx.tissue_mm2,
        "per_mm2": None,
        "per_hpf": None,
        "hotspot_count": None,
        "hotspot_box": None,
        "hotspot_area_mm2": None,
        "scores": {
            "median": float(np.median(scores)) if count else None,
            "min": float(scores.min()) if count else None,
            "max": float(scores.max()) if count else None,
        },
    }
    if reviewed is None:
        who = "The automated analysis found"
    elif reviewed["unreviewed"]:
        who = "After review (some detections still unchecked) there are"
    else:
        who = "The reviewers counted"
    noun = "mitosis" if count == 1 else "mitoses"
    table = [["Quantity", "Value"], ["Mitoses counted", f"{count:,}"]]
    tissue = ctx.tissue_mm2
    if ctx.mpp is None or tissue is None:
        sentences = [
            f"{who} {count:,} {noun}. Rates per mm² and per {hpf_label} cannot be computed: "
            "the file records no pixel size (µm per pixel), so the tissue area is unknown."
        ]
        notes.append(
            "Per-area numbers need the slide's real pixel size; give it with --mpp if known."
        )
    elif tissue <= 0:
        sentences = [f"{who} {count:,} {noun}; no tissue was detected, so no rate is given."]
    else:
        per_mm2 = count / tissue
        per_hpf = per_mm2 * hpf_total
        side_mm = math.sqrt(hpf_total)
        window = (side_mm * 1000 / ctx.mpp[0], side_mm * 1000 / ctx.mpp[1])
        hot, box = hotspot(coords[:, 0], coords[:, 1], ctx.shape, window)
        box_area = (box[2] - box[0]) * (box[3] - box[1]) * (ctx.pixel_area_mm2 or 0)
        values.update(
            per_mm2=per_mm2,
            per_hpf=per_hpf,
            hotspot_count=hot,
            hotspot_box=list(box),
            hotspot_area_mm2=box_area,
            hotspot_side_mm=side_mm,
        )
        sentences = [
            f"{who} {count:,} {noun} in {fmt_number(tissue)} mm² of tissue "
            f"({fmt_number(per_mm2)} per mm²; {fmt_number(per_hpf)} per {hpf_label} of "
            f"{opts.hpf_area_mm2:g} mm²)."
        ]
        table += [
            ["Tissue area", f"{fmt_number(tissue)} mm²"],
            ["Per mm² of tissue", fmt_number(per_mm2)],
            [f"Per {hpf_label} ({fmt_number(hpf_total)} mm²)", fmt_number(per_hpf)],
            [f"Hotspot (most in any {side_mm:.2f} × {side_mm:.2f} mm area)", f"{hot:,}"],
        ]
        if tissue < hpf_total:
            values["hotspot_note"] = "tissue smaller than the hotspot window"
            sentences.append(
                f"The tissue ({fmt_number(tissue)} mm²) is smaller than {hpf_label} "
                f"({fmt_number(hpf_total)} mm²): the per-{hpf_label} figure is extrapolated "
                f"from the area, and the hotspot ({hot:,}) is simply the count in the "
                f"{fmt_number(box_area)} mm² window that holds the most, not a full "
                f"{hpf_label} count."
            )
        else:
            sentences.append(
                f"The densest {hpf_label}-sized area ({side_mm:.2f} × {side_mm:.2f} mm) holds "
                f"{hot:,} {'mitosis' if hot == 1 else 'mitoses'} (hotspot)."
            )
        notes.append(
            f"One high-power field (HPF) is taken as {opts.hpf_area_mm2:g} mm² (change with "
            f"--hpf-area); {hpf_label} = {fmt_number(hpf_total)} mm². The hotspot is the "
            f"highest count in a square window of that area slid over the slide on a "
            f"{side_mm / HOTSPOT_CELLS * 1000:.0f} µm grid."
        )
    table += _score_table(scores)[1:]
    if count >= 5 and float(np.median(scores)) < 0.7:
        low = int((scores < 0.7).sum())
        sentences.append(
            f"{low:,} of the {count:,} candidates have a confidence below 0.7; they need a "
            "pathologist's review before the count is used."
        )
    notes.append(
        f"Source: {source}; each point is a candidate mitotic figure with a confidence "
        "between 0 and 1 (the detector's peak probability; 1 for objects a reviewer added)."
    )
    return Measure("mitosis", "Mitotic count", model, sentences, values, table, notes)


# ----------------------------------------------------------------------------- tumour
def measure_tumour_tiles(run: RunData, output: OutputSpec, ctx: SlideContext) -> Measure | None:
    """Tumour area fraction from a tile class map (e.g. ``idc-tumour``, class tumour)."""
    tiles = run.tiles()
    if tiles is None or tiles.ndim != 3:
        return None
    k = output.classes.index("tumour")
    v = tiles[list(output.channels)]
    if output.smoothing_um > 0:
        from ..inference.smoothing import sigma_pixels, smooth_probabilities

        v = smooth_probabilities(
            v, sigma_px=sigma_pixels(output.smoothing_um, run.geometry.scale[-1])
        )
    missing = np.isnan(v).any(axis=0)
    labels = np.where(missing, -1, np.nan_to_num(v, nan=-1).argmax(axis=0))
    on_mask = sample_on_mask(labels.astype(np.int64), run.geometry, 0, ctx.tissue)
    tissue = ctx.tissue.mask
    dy, dx = ctx.tissue.downsample
    tumour_px = float((tissue & (on_mask == k)).sum()) * dy * dx
    tissue_px = ctx.tissue_pixels0
    fraction = tumour_px / tissue_px if tissue_px > 0 else float("nan")
    n_tumour = int((labels == k).sum())
    n_done = int((labels >= 0).sum())
    return _tumour_measure(
        run,
        output,
        ctx,
        fraction,
        tumour_px,
        detail=(
            f"{n_tumour:,} of {n_done:,} analysed tissue squares "
            f"({run.geometry.pixel[0] * (ctx.mpp[0] if ctx.mpp else 1):.0f}"
            f"{' µm' if ctx.mpp else ' px'} each) were called tumour"
        ),
        how=(
            "each square of the tile map is given its most likely class; the tumour area is "
            "the tissue (from the tissue detector) under squares called tumour"
            + (
                f", after a {output.smoothing_um:g} µm smoothing of the map"
                if output.smoothing_um
                else ""
            )
        ),
    )


def measure_tumour_mask(run: RunData, output: OutputSpec, ctx: SlideContext) -> Measure | None:
    """Cancer area fraction from a multi-class mask (``tissue-fcn``: cancer vs tissue)."""
    prob, level = run.probability_level(4096)
    chans = [run.channel_index(c) for c in output.channels]
    block = prob[chans]
    if block.ndim != 3:
        return None
    t8 = int(np.clip(np.ceil(output.threshold * 255 - 1e-6), 1, 255))
    best = block.max(axis=0)
    labels = np.where(best >= t8, block.argmax(axis=0), -1)
    classes = list(output.classes)
    k = classes.index("cancer")
    tissue_classes = [i for i, c in enumerate(classes) if c not in _NOT_TISSUE]
    py, px = run.geometry.pixel[0] * 2**level, run.geometry.pixel[1] * 2**level
    cancer_px = float((labels == k).sum()) * py * px
    tissue_px = float(np.isin(labels, tissue_classes).sum()) * py * px
    fraction = cancer_px / tissue_px if tissue_px > 0 else float("nan")
    names = " + ".join(classes[i] for i in tissue_classes)
    return _tumour_measure(
        run,
        output,
        ctx,
        fraction,
        cancer_px,
        tissue_px=tissue_px,
        detail=f"cancer pixels over {names} pixels of the model's own map",
        how=(
            f"each pixel of the model's map gets its most likely class (probability ≥ "
            f"{output.threshold:g}); fraction = cancer / ({names})"
        ),
        label="cancer",
    )


def _tumour_measure(
    run: RunData,
    output: OutputSpec,
    ctx: SlideContext,
    fraction: float,
    tumour_px: float,
    *,
    detail: str,
    how: str,
    tissue_px: float | None = None,
    label: str = "tumour",
) -> Measure:
    a = ctx.pixel_area_mm2
    tumour_mm2 = tumour_px * a if a is not None else None
    tissue_mm2 = (tissue_px * a if tissue_px is not None else ctx.tissue_mm2) if a else None
    values = {
        "fraction": fraction,
        "tumour_mm2": tumour_mm2,
        "tissue_mm2": tissue_mm2,
        "class": label,
        "output": output.name,
        "method": how,
    }
    if math.isnan(fraction):
        sentences = [f"No tissue was analysed, so no {label} fraction is given ({run.model})."]
    elif tumour_mm2 is not None:
        sentences = [
            f"About {fraction:.0%} of the tissue looks like {label} to the automated analysis "
            f"({fmt_number(tumour_mm2)} of {fmt_number(tissue_mm2)} mm²)."
        ]
    else:
        sentences = [
            f"About {fraction:.0%} of the tissue looks like {label} to the automated analysis; "
            "areas in mm² "
            "cannot be given without the pixel size."
        ]
    table = [
        ["Quantity", "Value"],
        [
            f"{label.capitalize()} fraction of tissue",
            "n/a" if math.isnan(fraction) else f"{fraction:.1%}",
        ],
        [
            f"{label.capitalize()} area",
            f"{fmt_number(tumour_mm2)} mm²" if tumour_mm2 is not None else "n/a (no µm/px)",
        ],
        [
            "Tissue area",
            f"{fmt_number(tissue_mm2)} mm²" if tissue_mm2 is not None else "n/a (no µm/px)",
        ],
        ["Detail", detail],
    ]
    notes = [f"Tumour fraction ({run.model}, output {output.name!r}): {how}."]
    return Measure(
        "tumour", f"{label.capitalize()} area", run.model, sentences, values, table, notes
    )


# ----------------------------------------------------------------------------- malignancy
_METHOD_WORDS = {
    "vote": "vote: each image crop is called benign or malignant (whichever is more likely) "
    "and the slide gets the majority call",
    "average": "average: the mean of the crops' probabilities",
    "median": "median: the middle value of the crops' probabilities",
    "max": "maximum: the highest probability of any crop",
    "sum": "sum of the crops' probabilities",
    "exist": "the slide is called malignant as soon as one crop is",
    "exist3": "the slide is called malignant when at least three crops are",
}


def _crop_text(run: RunData, ctx: SlideContext) -> str:
    """`` (96 × 96 µm, one every 24 µm)``: a tile model's crop and stride."""
    grid = run.record.get("grid") or []
    factor = run.record.get("factor") or [1.0, 1.0]
    stride = run.geometry.pixel[0]
    side = float(grid[0]) * float(factor[0]) if grid else stride
    if ctx.mpp is None:
        return f" ({side:.0f} px, one every {stride:.0f} px)"
    a, b = side * ctx.mpp[0], stride * ctx.mpp[0]
    if abs(a - b) < 0.5:
        return f" ({a:.0f} × {a:.0f} µm each)"
    return f" ({a:.0f} × {a:.0f} µm, one every {b:.0f} µm)"


def measure_malignancy(run: RunData, output: OutputSpec, ctx: SlideContext) -> Measure:
    """Benign / malignant call: the aggregate with its method in words, plus the mean crop
    probability from the tiles array."""
    agg = run.aggregates().get(output.name) or {}
    classes = list(output.classes)
    k = classes.index("malignant")
    method = str(agg.get("method", output.aggregate))
    n = int(agg.get("n_tiles", 0))
    score = (agg.get("scores") or {}).get("malignant")
    call = agg.get("class")
    tiles = run.tiles()
    mean_p = None
    if tiles is not None:
        v = tiles[list(output.channels)]
        ok = ~np.isnan(v).any(axis=0)
        if ok.any():
            mean_p = float(v[k][ok].mean())
    crop = _crop_text(run, ctx)
    if score is None or n == 0:
        sentences = [f"No benign / malignant call: {run.model} analysed no tissue."]
        explained = "no crops analysed"
    else:
        if method == "vote":
            explained = (
                f"by majority vote: {score:.0%} of {n:,} image crops{crop} were called malignant"
            )
        elif method in ("exist", "exist3"):
            explained = f"{_METHOD_WORDS[method]} ({n:,} crops{crop})"
        else:
            explained = (
                f"{_METHOD_WORDS.get(method, method)}: {score:.2f} malignant over {n:,} crops{crop}"
            )
        sentences = [
            f"The automated benign / malignant assessment calls this slide {call}"
            f"{', ' if method == 'vote' else '; '}{explained}."
        ]
        if mean_p is not None:
            sentences.append(
                f"Averaged over the crops, the probability of malignant is {mean_p:.2f} "
                "(a second view that does not depend on the 0.5 cut-off)."
            )
    values = {
        "call": call,
        "malignant_score": score,
        "method": method,
        "n_tiles": n,
        "mean_probability": mean_p,
        "explanation": explained,
    }
    table = [
        ["Quantity", "Value"],
        ["Call", str(call) if call else "n/a"],
        [f"Malignant score ({method})", "n/a" if score is None else f"{score:.2f}"],
        ["How it was combined", explained],
        ["Mean crop probability of malignant", "n/a" if mean_p is None else f"{mean_p:.2f}"],
        ["Crops analysed", f"{n:,}"],
    ]
    notes = [
        f"Benign / malignant ({run.model}): the image is cut into crops{crop}; "
        f"{_METHOD_WORDS.get(method, method)}."
    ]
    return Measure("malignancy", "Benign or malignant", run.model, sentences, values, table, notes)


# ----------------------------------------------------------------------------- magnification
def metadata_magnification(
    pyramid: Pyramid, mpp: tuple[float, float] | None
) -> tuple[float | None, str]:
    """What the file says: objective power, else ``10 / mpp``; and where it came from."""
    from ..models.magnification import magnification_from_mpp

    if pyramid.objective_power:
        return float(pyramid.objective_power), "objective power in the file's metadata"
    if mpp is not None and pyramid.mpp_source == "file":
        return magnification_from_mpp(
            float(np.mean(mpp))
        ), "the file's pixel size (10 µm/px ÷ µm/px)"
    return None, "none"


def measure_magnification(
    run: RunData | None,
    pyramid: Pyramid,
    ctx: SlideContext,
    *,
    classical: bool = True,
) -> Measure:
    """Magnification metadata against the estimate (model aggregate, and the classical
    nucleus-size estimator), with a verdict in words."""
    from ..models.magnification import MAGNIFICATIONS, nearest_magnification, steps_apart

    meta, meta_source = metadata_magnification(pyramid, ctx.mpp)
    estimate = None
    outputs: dict[str, float | None] = {}
    if run is not None:
        aggs = run.aggregates()
        for o in run.spec.outputs:
            if o.kind == "magnification":
                value = (aggs.get(o.name) or {}).get("value")
                outputs[o.name] = None if value is None else float(value)
        first = next((o.name for o in run.spec.outputs if o.kind == "magnification"), None)
        estimate = outputs.get(first) if first else None
    classic = None
    classic_text = ""
    if classical and pyramid.kind != "volume":
        try:
            from ..models.magnification import estimate_slide_magnification

            est = estimate_slide_magnification(pyramid)
            classic = est.magnification
            if est.continuous is not None:
                classic_text = f"{est.magnification:g}× (continuous {est.continuous:.1f}×)"
        except (HistoAIError, ValueError):
            classic = None
    primary = estimate if estimate is not None else classic
    by = (
        f"model {run.model} (median over crops)"
        if estimate is not None and run is not None
        else "nucleus sizes (classical estimator)"
    )
    snapped = nearest_magnification(primary) if primary is not None else None
    if meta is None:
        verdict = "metadata missing"
        words = "The file records neither the objective power nor the pixel size" + (
            f"; the estimate is {snapped:g}×." if snapped else "."
        )
    elif snapped is None:
        verdict = "no estimate"
        words = f"The file says {meta:g}×; no estimate could be made."
    else:
        steps = steps_apart(meta, float(snapped))
        verdict = (
            "consistent" if steps == 0 else f"disagrees by {steps} class{'es' if steps > 1 else ''}"
        )
        if steps == 0:
            words = f"The file says {meta:g}× and the image looks like {snapped:g}×, which agree."
        else:
            scale = "/".join(f"{m}×" for m in MAGNIFICATIONS)
            words = (
                f"The file says {meta:g}× but the image looks like {snapped:g}× "
                f"({steps} step{'s' if steps > 1 else ''} apart on the {scale} scale)"
                + (
                    "; neighbouring classes are close, so this is a mild disagreement."
                    if steps == 1
                    else "; check the scanner metadata before trusting per-area numbers."
                )
            )
    values = {
        "metadata": meta,
        "metadata_source": meta_source,
        "mpp": list(ctx.mpp) if ctx.mpp else None,
        "mpp_source": ctx.mpp_source,
        "estimate": primary,
        "estimate_class": snapped,
        "estimate_by": by,
        "model_outputs": outputs,
        "classical": classic,
        "verdict": verdict,
    }
    table = [
        ["Quantity", "Value"],
        ["File metadata", f"{meta:g}× ({meta_source})" if meta else "missing"],
        ["Pixel size", f"{ctx.mpp[0]:.4g} µm/px ({ctx.mpp_source})" if ctx.mpp else "missing"],
    ]
    for name, value in outputs.items():
        table.append(
            [
                f"Estimate: {name} ({run.model if run else ''})",
                "n/a" if value is None else f"{value:.1f}×",
            ]
        )
    if classic_text:
        table.append(["Estimate: nucleus sizes (classical)", classic_text])
    table.append(["Verdict", verdict])
    notes = [
        f"Magnification: the estimate is by {by}, snapped to the nearest of "
        f"{', '.join(f'{m}×' for m in MAGNIFICATIONS)}; "
        "'consistent' means the same class as the metadata."
    ]
    return Measure(
        "magnification",
        "Magnification check",
        run.model if run else None,
        [words],
        values,
        table,
        notes,
    )


# ----------------------------------------------------------------------------- boxes / lines
def measure_boxes(run: RunData, output: OutputSpec, ctx: SlideContext) -> Measure:
    """Suspicious regions: class, confidence, position and extent in mm."""
    objs = run.objects(output)
    n = 0 if objs is None else len(objs)
    table = [["#", "Class", "Confidence", "Centre x, y", "Size w × h"]]
    boxes: list[dict[str, Any]] = []
    if objs is not None and n:
        order = np.argsort(-objs.scores)
        for rank, i in enumerate(order, 1):
            top, left, bottom, right = (float(v) for v in objs.coords[i][-4:])
            cls = objs.classes[int(objs.labels[i])] if objs.classes else str(objs.labels[i])
            if ctx.mpp is not None:
                f = (ctx.mpp[0] / 1000, ctx.mpp[1] / 1000)
                centre = f"{(left + right) / 2 * f[1]:.1f}, {(top + bottom) / 2 * f[0]:.1f} mm"
                size = f"{(right - left) * f[1]:.1f} × {(bottom - top) * f[0]:.1f} mm"
            else:
                centre = f"{(left + right) / 2:.0f}, {(top + bottom) / 2:.0f} px"
                size = f"{right - left:.0f} × {bottom - top:.0f} px"
            table.append([str(rank), cls, f"{objs.scores[i]:.2f}", centre, size])
            boxes.append(
                {"class": cls, "score": float(objs.scores[i]), "box_px": [top, left, bottom, right]}
            )
    by_class: dict[str, int] = {}
    for b in boxes:
        by_class[b["class"]] = by_class.get(b["class"], 0) + 1
    if n == 0:
        sentences = [f"The automated analysis ({run.model}) marked no suspicious region."]
    else:
        parts = ", ".join(f"{v} {k}" for k, v in by_class.items())
        best = boxes[0]
        sentences = [
            f"The automated analysis marked {n} suspicious region{'s' if n > 1 else ''} "
            f"({parts}); the most confident is {best['class']} at {best['score']:.2f}."
        ]
    notes = [
        "Positions are from the image's top-left corner (x to the right, y down)"
        + (" in mm." if ctx.mpp else " in pixels: the image has no pixel size.")
    ]
    return Measure(
        "boxes",
        "Suspicious regions",
        run.model,
        sentences,
        {"count": n, "by_class": by_class, "boxes": boxes},
        table,
        notes,
    )


def measure_lesions(run: RunData, output: OutputSpec, ctx: SlideContext) -> Measure:
    """Lesions of a volume: count, longest diameters (mm), volumes and the slice."""
    objs = run.objects(output)
    n = 0 if objs is None else len(objs)
    table = [["Lesion", "Longest diameter", "Volume", "Slice", "Mean probability"]]
    lesions: list[dict[str, Any]] = []
    if objs is not None:
        feats = objs.features
        for i in range(n):
            length = float(feats.get("length_mm", np.full(n, np.nan))[i])
            volume = float(feats.get("volume_mm3", np.full(n, np.nan))[i])
            plane = int(objs.coords[i][0]) if objs.coords.shape[1] > 4 else 0
            table.append(
                [
                    str(i + 1),
                    f"{length:.1f} mm" if math.isfinite(length) else "n/a",
                    f"{volume:,.0f} mm³" if math.isfinite(volume) else "n/a",
                    str(plane),
                    f"{objs.scores[i]:.2f}",
                ]
            )
            lesions.append(
                {
                    "length_mm": length,
                    "volume_mm3": volume,
                    "slice": plane,
                    "score": float(objs.scores[i]),
                    "coords": [float(v) for v in objs.coords[i]],
                }
            )
    if n == 0:
        sentences = [f"The automated analysis ({run.model}) found no lesion."]
    else:
        big = max(lesions, key=lambda x: x["length_mm"] if math.isfinite(x["length_mm"]) else -1)
        size = f"{big['length_mm']:.1f} mm" if math.isfinite(big["length_mm"]) else "unknown size"
        sentences = [
            f"The automated analysis found {n} lesion{'s' if n > 1 else ''}; the largest measures "
            f"{size} across (longest in-plane diameter, slice {big['slice']})."
        ]
    return Measure(
        "lesions",
        "Lesions",
        run.model,
        sentences,
        {"count": n, "lesions": lesions},
        table,
        [
            "Diameters: the longest distance across each lesion on the slice where it is largest, "
            "with the voxel spacing applied."
        ],
    )


# ----------------------------------------------------------------------------- generic
def measure_generic(run: RunData, outputs: list[OutputSpec], ctx: SlideContext) -> Measure:
    """Counts / areas per class of outputs no specific measure reads (nothing is dropped)."""
    table = [["Output", "Kind", "Class", "Value"]]
    values: dict[str, Any] = {}
    a = ctx.pixel_area_mm2
    for o in outputs:
        if o.kind in ("points", "boxes", "lines"):
            objs = run.objects(o)
            counts: dict[str, int] = {}
            if objs is not None:
                for lab in objs.labels:
                    name = objs.classes[int(lab)] if objs.classes else str(int(lab))
                    counts[name] = counts.get(name, 0) + 1
            values[o.name] = counts
            for cls in o.classes or ("objects",):
                table.append([o.name, o.kind, cls, f"{counts.get(cls, 0):,} objects"])
        elif o.kind in ("probability", "mask") and "probability" in run.group:
            prob, level = run.probability_level(4096)
            py, px = run.geometry.pixel[0] * 2**level, run.geometry.pixel[1] * 2**level
            t8 = int(np.clip(np.ceil(o.threshold * 255 - 1e-6), 1, 255))
            chans = [run.channel_index(c) for c in o.channels]
            block = prob[chans]
            if len(chans) > 1 and o.kind == "mask":
                best = block.max(axis=0)
                lab = np.where(best >= t8, block.argmax(axis=0), -1)
                per = {c: float((lab == i).sum()) * py * px for i, c in enumerate(o.classes)}
            else:
                per = {
                    (o.classes[i] if i < len(o.classes) else str(i)): float((block[i] >= t8).sum())
                    * py
                    * px
                    for i in range(len(chans))
                }
            values[o.name] = {k: (v * a if a else v) for k, v in per.items()}
            for cls, px0 in per.items():
                text = f"{fmt_number(px0 * a)} mm²" if a else f"{px0:,.0f} px"
                table.append([o.name, o.kind, cls, f"{text} (p ≥ {o.threshold:g})"])
        elif o.kind in ("class", "magnification"):
            agg = run.aggregates().get(o.name) or {}
            values[o.name] = agg
            if o.kind == "class":
                for cls, s in (agg.get("scores") or {}).items():
                    table.append([o.name, f"class ({agg.get('method')})", cls, f"{s:.2f}"])
            else:
                v = agg.get("value")
                table.append([o.name, o.kind, "", "n/a" if v is None else f"{v:g}×"])
    sentences = [f"{run.model}: {', '.join(o.name for o in outputs)} (see the table)."]
    return Measure(
        "generic", f"Other results of {run.model}", run.model, sentences, values, table, []
    )


# ----------------------------------------------------------------------------- dispatch
def measure_run(run: RunData, pyramid: Pyramid, ctx: SlideContext) -> list[Measure]:
    """Every measure of one run: the specific ones its outputs allow, then the rest as a
    generic table."""
    measures: list[Measure] = []
    used: set[str] = set()
    outs = list(run.spec.outputs)
    # mitoses: a points output of class "mitosis" (its probability map is the heatmap)
    for o in outs:
        if o.kind == "points" and "mitosis" in o.classes:
            measures.append(measure_mitosis(run, o, ctx))
            used.add(o.name)
            used.update(p.name for p in outs if p.kind == "probability" and "mitosis" in p.classes)
            break
    # tumour fraction: a tile class map with a "tumour" class, or a mask with "cancer"
    for o in outs:
        if o.kind == "class" and "tumour" in o.classes and not run.spec.dense:
            m = measure_tumour_tiles(run, o, ctx)
            if m is not None:
                measures.append(m)
                used.update(p.name for p in outs if p.kind == "class" and "tumour" in p.classes)
                break
    if not any(m.kind == "tumour" for m in measures):
        for o in outs:
            if o.kind == "mask" and "cancer" in o.classes and run.spec.dense:
                m = measure_tumour_mask(run, o, ctx)
                if m is not None:
                    measures.append(m)
                    used.update(
                        p.name
                        for p in outs
                        if p.kind in ("mask", "probability") and "cancer" in p.classes
                    )
                    break
    for o in outs:
        if o.kind == "class" and "malignant" in o.classes and o.name not in used:
            measures.append(measure_malignancy(run, o, ctx))
            used.add(o.name)
            break
    if any(o.kind == "magnification" for o in outs):
        measures.append(measure_magnification(run, pyramid, ctx))
        used.update(o.name for o in outs if o.kind == "magnification")
    for o in outs:
        if o.kind == "boxes" and o.name not in used:
            measures.append(measure_boxes(run, o, ctx))
            used.add(o.name)
            # the box detector's mask / probability is its heatmap
            used.update(p.name for p in outs if p.kind in ("mask", "probability"))
    for o in outs:
        if o.kind == "lines" and o.name not in used:
            measures.append(measure_lesions(run, o, ctx))
            used.add(o.name)
            used.update(p.name for p in outs if p.kind in ("mask", "probability"))
    rest = [o for o in outs if o.name not in used]
    if rest:
        measures.append(measure_generic(run, rest, ctx))
    return measures
