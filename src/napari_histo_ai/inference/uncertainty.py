"""Where a model is unsure: uncertainty maps of a run and a ranked queue of regions to review.

Two sources of uncertainty, both read as a lazy pyramid like the run's own outputs:

* **Predictive entropy** of a finished (or partial) run (`entropy_map`), computed chunk
  by chunk from the stored probabilities, nothing written: binary entropy
  ``H(p) = -(p log p + (1 - p) log(1 - p)) / log 2`` per sigmoid channel (several
  sigmoid channels: the largest, the most uncertain label), or the Shannon entropy of a
  softmax distribution over its K channels divided by ``log K``. Values are 0..1.
* **MC-dropout** (`MCDropoutPredictor`, `mc_dropout_run`): the model runs ``passes``
  times per tile with its dropout layers sampling (everything else in eval mode,
  BatchNorm included), through the normal engine, so tiling, halo, regions, resume,
  progress and cancel work as for any run. The run stores the mean probability and the
  uncertainty ``u = 2 · sqrt(mean over the group's channels of Var_t[p_t])`` (0..1: a
  probability's variance is at most 1/4), one channel per sigmoid channel or softmax
  group. `mc_dropout_map` reads it.

`uncertainty_map` picks whichever the run has (MC-dropout if it is an MC run, else
entropy). Then `rank_regions` cuts the image into square regions and ranks them.

Coarse levels
-------------
Level k of the map is computed from level k of the stored probabilities (their 2^k × 2^k
mean): there it is the uncertainty of the *averaged* prediction, which is also high where
confident classes meet inside one coarse pixel (class boundaries). Level 0 is exact.

Not computed
------------
Output cells the run has not finished (``progress.npz``: not yet run, cancelled,
background tiles skipped by the tissue mask, outside the run's region) are **NaN** in the
maps; the napari layer shows them as 0 (`napari_histo_ai._napari.uncertainty`). Tile
models: NaN tiles (not computed) stay NaN. While a run is still writing, its coarse
levels may lag behind level 0 (the engine writes them in batches).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelInputError, RunStateError
from ..models.loading import Predictor
from ..models.spec import DEFAULT_COLOURS, ModelCard, ModelSpec, OutputSpec
from .engine import Geometry, RunConfig, RunResult, _apply_activation, run_geometry, run_model
from .store import RECORD_KEY, load_progress

if TYPE_CHECKING:
    import torch

    from ..io.pyramid import Pyramid
    from .engine import Progress
    from .tissue import TissueMask

__all__ = [
    "MC_OUTPUT",
    "RANK_SIDE",
    "MCDropoutPredictor",
    "RankProgress",
    "Ranking",
    "Region",
    "UncertaintyMap",
    "entropy_map",
    "iter_rank_regions",
    "mc_dropout_map",
    "mc_dropout_run",
    "mc_dropout_spec",
    "rank_regions",
    "uncertainty_map",
]

#: name of the output an MC-dropout run stores its uncertainty in
MC_OUTPUT = "mc-dropout uncertainty"
#: ranking reads the finest map level whose longest side is at most this many pixels
RANK_SIDE = 4096
_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------
# the map


@dataclass(frozen=True)
class UncertaintyMap:
    """A lazy uncertainty pyramid over a run's image.

    Attributes
    ----------
    levels : list of dask.array.Array
        Level k: float32 ``(*planes, h_k, w_k)`` in [0, 1], NaN where not computed;
        level k + 1 is 2x coarser (dense runs; tile runs have one level).
    geometry : Geometry
        Placement of level 0 over the source image (as the run's outputs).
    run : Path
        The run folder.
    spec : ModelSpec
        The run's model (for an MC run: the derived spec, `mc_dropout_spec`).
    method : str
        ``"entropy"`` or ``"mc-dropout"``.
    planes : tuple of int
        Plane shape of the run (``()`` for 2D).
    plane_scale : tuple of float
        World scale of the plane axes (e.g. z spacing, mm).
    image_shape : (int, int)
        Level-0 (height, width) of the source image, pixels.
    image_mpp : (float, float) or None
        Level-0 µm/px of the source image; ``None`` when unknown.
    image : str
        Path of the source image, as recorded by the run.
    """

    levels: list[Any]
    geometry: Geometry
    run: Path
    spec: ModelSpec
    method: str
    planes: tuple[int, ...] = ()
    plane_scale: tuple[float, ...] = ()
    image_shape: tuple[int, int] = (0, 0)
    image_mpp: tuple[float, float] | None = None
    image: str = ""

    @property
    def model(self) -> str:
        return self.spec.name

    def level_pixel(self, level: int) -> tuple[float, float]:
        """Level-0 image pixels per pixel of map level ``level`` (row, col)."""
        f = 2**level
        return (self.geometry.pixel[0] * f, self.geometry.pixel[1] * f)

    def origin(self) -> tuple[float, float]:
        """Level-0 image coordinate (continuous px) where map pixel (0, 0) starts."""
        g = self.geometry
        out = []
        for a in range(2):
            unit = g.scale[a] / g.pixel[a]
            out.append(g.translate[a] / unit + 0.5 - g.pixel[a] / 2)
        return (out[0], out[1])


def _open_run(run: str | Path) -> tuple[Any, dict[str, Any], ModelSpec]:
    import zarr

    path = Path(run)
    if not (path / "zarr.json").is_file():
        raise RunStateError(f"{path} is not a run folder (no zarr.json): give a *.zarr run")
    group = zarr.open_group(str(path), mode="r")
    raw = group.attrs.get(RECORD_KEY)
    if not isinstance(raw, dict) or "spec" not in raw:
        raise RunStateError(
            f"{path} is not a napari-histo-ai run (no '{RECORD_KEY}' record): run a model "
            "with 'Run model' or `napari-histo-ai predict` first"
        )
    record = dict(raw)
    return group, record, ModelSpec.from_dict(record["spec"], source=str(path))


def _cells_done(run: Path, record: dict[str, Any]) -> np.ndarray | None:
    state = load_progress(run / "progress.npz")
    if state is None:
        return None
    key = "cells_done" if record.get("dense", True) else "tiles_done"
    done = state.get(key)
    return None if done is None else np.asarray(done, dtype=bool)


def _base(
    group: Any, record: dict[str, Any], spec: ModelSpec, run: Path, method: str, levels: list[Any]
) -> UncertaintyMap:
    n_plane = len(record.get("planes", []))
    saved = record.get("plane_scale") or ()
    plane_scale = tuple(float(v) for v in saved) if len(saved) == n_plane else (1.0,) * n_plane
    shape = [int(v) for v in record.get("image_shape", [0, 0])]
    axes_shape = shape[n_plane : n_plane + 2] if len(shape) >= n_plane + 2 else shape[:2]
    mpp = record.get("image_mpp")
    return UncertaintyMap(
        levels=levels,
        geometry=run_geometry(record),
        run=run,
        spec=spec,
        method=method,
        planes=tuple(int(v) for v in record.get("planes", [])),
        plane_scale=plane_scale,
        image_shape=(int(axes_shape[0]), int(axes_shape[1])),
        image_mpp=(float(mpp[0]), float(mpp[1])) if mpp else None,
        image=str(record.get("image", "")),
    )


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits (0..1) of probabilities ``p`` (any shape); NaN stays NaN."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(_xlogx(p) + _xlogx(1.0 - p)) / _LOG2
    return h.astype(np.float32)


def normalised_entropy(p: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """Shannon entropy of distributions along ``axis`` divided by ``log K`` (0..1).

    ``p`` is renormalised along ``axis`` first (stored probabilities are quantised);
    where it sums to 0 (nothing computed) the result is NaN.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    k = p.shape[axis]
    total = p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(total > 0, p / np.where(total > 0, total, 1.0), np.nan)
        h = -_xlogx(q).sum(axis=axis) / (math.log(k) if k > 1 else 1.0)
    return np.clip(h, 0.0, 1.0).astype(np.float32)


def _xlogx(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), np.where(np.isnan(p), p, 0.0))


def _mask_unfinished(
    values: np.ndarray,
    location: Sequence[tuple[int, int]],
    cells_done: np.ndarray,
    cell: int,
    factor: int,
) -> np.ndarray:
    """NaN where the level-0 output cell under each pixel of a block is not final."""
    plane_sl = tuple(slice(a, b) for a, b in location[:-2])
    done = cells_done[plane_sl]
    nr, nc = done.shape[-2:]
    ys = np.minimum((np.arange(*location[-2]) * factor) // cell, nr - 1)
    xs = np.minimum((np.arange(*location[-1]) * factor) // cell, nc - 1)
    done = done[..., ys, :][..., xs]
    return np.where(done, values, np.float32(np.nan)).astype(np.float32)


def _dense_entropy_block(
    block: np.ndarray,
    *,
    softmax: bool,
    cells_done: np.ndarray | None,
    cell: int,
    factor: int,
    block_info: Any = None,
) -> np.ndarray:
    p = block.astype(np.float32) / 255.0
    h = normalised_entropy(p, axis=0) if softmax else binary_entropy(p).max(axis=0)
    if cells_done is not None and block_info is not None:
        h = _mask_unfinished(h, block_info[None]["array-location"], cells_done, cell, factor)
    return h.astype(np.float32)


def _stored_block(
    block: np.ndarray,
    *,
    cells_done: np.ndarray | None,
    cell: int,
    factor: int,
    block_info: Any = None,
) -> np.ndarray:
    u = (block.astype(np.float32) / 255.0).max(axis=0)
    if cells_done is not None and block_info is not None:
        u = _mask_unfinished(u, block_info[None]["array-location"], cells_done, cell, factor)
    return u.astype(np.float32)


def entropy_map(run: str | Path, *, channels: Sequence[int] | None = None) -> UncertaintyMap:
    """Predictive entropy of a run's stored probabilities, lazily, level by level.

    Parameters
    ----------
    run : str or Path
        A run folder (``*.zarr``) written by the engine, finished or partial.
    channels : sequence of int, optional
        Sigmoid models: the model channels to use (default all probability channels;
        the map is their largest binary entropy). Ignored for softmax models, whose
        distribution is over all their probability channels.

    Returns
    -------
    UncertaintyMap
        ``method == "entropy"``; dense runs: one level per stored probability level
        (chunked like it), tile runs: one level of per-tile values.

    Raises
    ------
    RunStateError
        ``run`` is not a run folder.
    ModelInputError
        A tile model without an activation (raw values, e.g. a magnification regressor),
        or ``channels`` naming channels the run did not store.
    """
    import dask.array as da

    path = Path(run)
    group, record, spec = _open_run(path)
    softmax = spec.activation == "softmax"
    done = _cells_done(path, record)
    if spec.dense:
        prob_channels = [int(c) for c in record["prob_channels"]]
        index = {c: i for i, c in enumerate(prob_channels)}
        if softmax or channels is None:
            chans = list(range(len(prob_channels)))
        else:
            missing = [c for c in channels if c not in index]
            if missing:
                raise ModelInputError(
                    f"{path}: channels {missing} are not probability channels of model "
                    f"'{spec.name}' (stored: {prob_channels})"
                )
            chans = [index[c] for c in channels]
        levels = _block_levels(group, chans, done, _dense_entropy_block, softmax=softmax)
        return _base(group, record, spec, path, "entropy", levels)
    if spec.activation == "none":
        raise ModelInputError(
            f"{path}: model '{spec.name}' gives raw per-tile values (activation none), not "
            "probabilities, so they have no entropy; use a sigmoid or softmax model"
        )
    tiles = np.asarray(group["tiles"]["0"], dtype=np.float32)  # small: one vector per tile
    if softmax:
        values = normalised_entropy(tiles, axis=0)
    else:
        sel = tiles if channels is None else tiles[list(channels)]
        values = binary_entropy(sel).max(axis=0)
    values = np.where(np.isnan(tiles).any(axis=0), np.float32(np.nan), values).astype(np.float32)
    return _base(group, record, spec, path, "entropy", [da.from_array(values)])


def _block_levels(group: Any, chans: list[int], done: Any, block: Any, **kwargs: Any) -> list[Any]:
    """One lazy map per stored probability level: ``block`` over its chunks of ``chans``
    (the channel axis dropped), told which cells are final."""
    import dask.array as da

    prob = group["probability"]
    cell = int(prob["0"].chunks[-1])
    levels = []
    for k in sorted(int(key) for key in prob.array_keys()):
        lv = da.from_zarr(prob[str(k)])[chans]
        levels.append(
            da.map_blocks(
                block,
                lv,
                cells_done=done,
                cell=cell,
                factor=2**k,
                drop_axis=0,
                dtype=np.float32,
                meta=np.empty((0,) * (lv.ndim - 1), dtype=np.float32),
                **kwargs,
            )
        )
    return levels


def mc_dropout_map(run: str | Path) -> UncertaintyMap:
    """The stored uncertainty of an MC-dropout run (`mc_dropout_run`), lazily.

    Several groups (several sigmoid channels): their largest value per pixel.

    Raises
    ------
    RunStateError
        ``run`` is not a run folder, or not an MC-dropout run (it has no
        ``"mc-dropout uncertainty"`` output).
    """
    import dask.array as da

    path = Path(run)
    group, record, spec = _open_run(path)
    out = next((o for o in spec.outputs if o.name == MC_OUTPUT), None)
    if out is None:
        raise RunStateError(
            f"{path} is a run of model '{spec.name}' without MC-dropout; use entropy_map, "
            "or run mc_dropout_run on it"
        )
    done = _cells_done(path, record)
    if spec.dense:
        index = {int(c): i for i, c in enumerate(record["prob_channels"])}
        chans = [index[c] for c in out.channels]
        levels = _block_levels(group, chans, done, _stored_block)
        return _base(group, record, spec, path, "mc-dropout", levels)
    tiles = np.asarray(group["tiles"]["0"], dtype=np.float32)
    values = tiles[list(out.channels)].max(axis=0).astype(np.float32)
    return _base(group, record, spec, path, "mc-dropout", [da.from_array(values)])


def uncertainty_map(run: str | Path) -> UncertaintyMap:
    """`mc_dropout_map` for an MC-dropout run, else `entropy_map`."""
    _, _, spec = _open_run(Path(run))
    if any(o.name == MC_OUTPUT for o in spec.outputs):
        return mc_dropout_map(run)
    return entropy_map(run)


# ----------------------------------------------------------------------------------------
# MC-dropout


def _dropout_modules(module: Any) -> list[Any]:
    """The dropout layers (nn.Dropout*, TorchScript ones by name) with p > 0."""
    from torch import nn

    found = []
    for m in module.modules():
        is_dropout = isinstance(m, nn.modules.dropout._DropoutNd) or "Dropout" in str(
            getattr(m, "original_name", "")
        )
        p = getattr(m, "p", None)
        if is_dropout and (p is None or float(p) > 0):
            found.append(m)
    return found


def _prob_channels(spec: ModelSpec) -> list[int]:
    """Channels the engine applies the activation to (as `run_model` picks them)."""
    if not spec.dense:
        return list(range(spec.n_outputs))
    chans: list[int] = []
    for o in spec.outputs:
        if o.kind in ("probability", "mask", "points", "boxes", "lines"):
            chans += [c for c in o.channels if c not in chans]
    return chans


def _channel_names(spec: ModelSpec, channels: Sequence[int]) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for o in spec.outputs:
        for c, name in zip(o.channels, o.classes, strict=False):
            names.setdefault(int(c), name)
    return tuple(names.get(int(c), f"channel {c}") for c in channels)


def mc_dropout_spec(spec: ModelSpec, *, passes: int) -> ModelSpec:
    """The spec of an MC-dropout run of ``spec``: its outputs are what the wrapper returns.

    Channels ``0..P-1``: the mean probability of each of the model's P probability
    channels (output ``"mean"``); channels ``P..P+G-1``: the uncertainty of each group
    (output `MC_OUTPUT`; one group per sigmoid channel, one for a softmax). The
    activation is ``"none"`` (the wrapper already applied the model's).
    """
    prob = _prob_channels(spec)
    softmax = spec.activation == "softmax"
    n_groups = 1 if softmax else len(prob)
    names = _channel_names(spec, prob)
    mean_colours = tuple(DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)] for i in range(len(prob)))
    dense = spec.dense
    group_names = ("uncertainty",) if softmax else tuple(f"uncertainty {n}" for n in names)
    source_class = next((o for o in spec.outputs if o.kind == "class"), None)
    mean = OutputSpec(
        name="mean",
        kind="probability" if dense else "class",
        channels=tuple(range(len(prob))),
        classes=names,
        colours=mean_colours,
        aggregate=source_class.aggregate if source_class is not None else "average",
    )
    unc = OutputSpec(
        name=MC_OUTPUT,
        kind="probability" if dense else "class",
        channels=tuple(range(len(prob), len(prob) + n_groups)),
        classes=group_names,
        colours=("#ffffff",) * n_groups,
        aggregate="average",
    )
    card = ModelCard(
        description=f"MC-dropout ({passes} passes) of model '{spec.name}' {spec.version}: "
        "mean probability and 2·sqrt(mean variance) per group",
        provenance=f"mc-dropout of {spec.name}",
        licence=spec.card.licence,
    )
    return replace(
        spec,
        name=f"{spec.name}-mc{passes}",
        task=f"{spec.task} (MC-dropout uncertainty)",
        outputs=(mean, unc),
        activation="none",
        card=card,
    )


class MCDropoutPredictor(Predictor):
    """A torch predictor run ``passes`` times with its dropout layers sampling.

    Only the dropout modules are put in training mode (BatchNorm keeps its running
    statistics); they are put back in eval mode after every call. Each call draws its
    dropout masks from ``seed`` (in a forked RNG; the global one is untouched), so a run
    is reproducible for the same batch size.

    Parameters
    ----------
    base : Predictor
        A `TorchPredictor` of a model with dropout (p > 0).
    passes : int
        Forward passes T per batch (at least 2).
    seed : int

    Attributes
    ----------
    spec : ModelSpec
        `mc_dropout_spec` of the base model: output ``(N, P + G, ...)`` = P mean
        probabilities, then G uncertainties ``2 · sqrt(mean_k Var_t[p_{t,k}])``.

    Raises
    ------
    ModelInputError
        The model has no dropout layer (or only p = 0), is not a torch model, has no
        sigmoid / softmax activation, or ``passes < 2``.
    """

    def __init__(self, base: Predictor, *, passes: int = 8, seed: int = 0) -> None:
        name = base.spec.name
        if int(passes) < 2:
            raise ModelInputError(f"MC-dropout needs at least 2 passes, got {passes}")
        module = getattr(base, "module", None)
        if module is None:
            raise ModelInputError(
                f"model '{name}' is not a torch network ({type(base).__name__}), so its "
                "dropout cannot be sampled; use the entropy of its run instead (entropy_map)"
            )
        self.dropouts = _dropout_modules(module)
        if not self.dropouts:
            raise ModelInputError(
                f"model '{name}' has no dropout layer (or only dropout p = 0), so MC-dropout "
                "gives no variance; use the predictive entropy of its run instead "
                "(entropy_map, or 'Rank regions' on its probability layer)"
            )
        if base.spec.activation not in ("sigmoid", "softmax"):
            raise ModelInputError(
                f"model '{name}' has activation '{base.spec.activation}': MC-dropout "
                "uncertainty needs sigmoid or softmax probabilities"
            )
        self.base = base
        self.passes = int(passes)
        self.seed = int(seed)
        self.device = base.device
        self.base_spec = base.spec
        self.spec = mc_dropout_spec(base.spec, passes=self.passes)
        self._prob = _prob_channels(base.spec)
        self._lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        softmax = self.base_spec.activation == "softmax"
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            total: torch.Tensor | None = None
            total_sq: torch.Tensor | None = None
            for m in self.dropouts:
                m.train(True)
            try:
                for _ in range(self.passes):
                    raw = self.base(batch).float()
                    p = _apply_activation(raw, self.base_spec, self._prob)
                    p = p[:, self._prob]
                    total = p if total is None else total + p
                    total_sq = p * p if total_sq is None else total_sq + p * p
            finally:
                for m in self.dropouts:
                    m.train(False)
            assert total is not None and total_sq is not None
            mean = total / self.passes
            var = (total_sq / self.passes - mean * mean).clamp_min(0.0)
            u = 2.0 * var.mean(dim=1, keepdim=True).sqrt() if softmax else 2.0 * var.sqrt()
            return torch.cat([mean, u.clamp(0.0, 1.0)], dim=1).contiguous()


def run_spec(run: str | Path) -> ModelSpec:
    """The model a run folder was made with (from its record)."""
    return _open_run(run)[2]


def mc_dropout_run(
    pyramid: Pyramid,
    predictor: Predictor,
    out: str | Path,
    *,
    passes: int = 8,
    seed: int = 0,
    config: RunConfig | None = None,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, RunResult]:
    """Run ``predictor`` with MC-dropout through the engine (`run_model`); yields progress.

    Give ``config.roi`` (or ``polygon``) to sample a region: ``passes`` forward passes
    per tile cost ``passes`` times a normal run. The run folder is an ordinary run of
    `mc_dropout_spec` (outputs ``"mean"`` and `MC_OUTPUT`), read with `mc_dropout_map`.

    Raises
    ------
    ModelInputError
        The model has no dropout (see `MCDropoutPredictor`), or the image does not fit.
    """
    wrapped = MCDropoutPredictor(predictor, passes=passes, seed=seed)
    return (yield from run_model(pyramid, wrapped, out, config=config, cancel=cancel))


# ----------------------------------------------------------------------------------------
# regions


@dataclass(frozen=True)
class Region:
    """One square region of the image to review, level-0 pixels.

    ``rank`` starts at 1 (most uncertain); ``score`` is the region's uncertainty
    statistic (see `rank_regions`); ``tissue`` the fraction of its pixels that counted.
    """

    rank: int
    top: int
    left: int
    height: int
    width: int
    score: float
    plane: tuple[int, ...] = ()
    tissue: float = 1.0

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col) centre, continuous level-0 pixels."""
        return (self.top + self.height / 2, self.left + self.width / 2)

    def to_dict(self, mpp: tuple[float, float] | None = None) -> dict[str, Any]:
        """JSON-able: pixels always, µm when ``mpp`` (level-0 µm/px) is known."""
        data: dict[str, Any] = {
            "rank": self.rank,
            "score": round(float(self.score), 6),
            "tissue_fraction": round(float(self.tissue), 4),
            "plane": list(self.plane),
            "top_px": self.top,
            "left_px": self.left,
            "height_px": self.height,
            "width_px": self.width,
        }
        if mpp is not None:
            data.update(
                top_um=round(self.top * mpp[0], 3),
                left_um=round(self.left * mpp[1], 3),
                height_um=round(self.height * mpp[0], 3),
                width_um=round(self.width * mpp[1], 3),
            )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        """Inverse of `to_dict` (pixel fields)."""
        return cls(
            rank=int(data["rank"]),
            top=int(data["top_px"]),
            left=int(data["left_px"]),
            height=int(data["height_px"]),
            width=int(data["width_px"]),
            score=float(data["score"]),
            plane=tuple(int(v) for v in data.get("plane", ())),
            tissue=float(data.get("tissue_fraction", 1.0)),
        )


@dataclass
class RankProgress:
    """One progress record of `iter_rank_regions` (a band of map rows read)."""

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class Ranking:
    """What `iter_rank_regions` returns.

    ``level`` is the map level read, ``region_px`` the region side in level-0 pixels,
    ``statistic`` how regions were scored (``"mean"`` or ``"q0.9"``); ``complete`` is
    false when cancelled (``regions`` then empty).
    """

    regions: list[Region]
    complete: bool
    level: int
    region_px: tuple[float, float]
    statistic: str
    n_scored: int = 0
    method: str = ""
    mpp: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _pick_level(shapes: Sequence[tuple[int, int]], side: int) -> int:
    for k, (h, w) in enumerate(shapes):
        if max(h, w) <= side:
            return k
    return len(shapes) - 1


def iter_rank_regions(
    uncertainty: UncertaintyMap | np.ndarray,
    *,
    region_um: float = 256.0,
    top_k: int | None = 20,
    tissue: TissueMask | np.ndarray | None = None,
    mpp: tuple[float, float] | float | None = None,
    quantile: float | None = 0.9,
    min_tissue: float = 0.25,
    level: int | None = None,
    cancel: threading.Event | None = None,
) -> Generator[RankProgress, None, Ranking]:
    """Rank square regions of the image by uncertainty; yields progress, returns a `Ranking`.

    Parameters
    ----------
    uncertainty : UncertaintyMap or numpy.ndarray
        A map (`uncertainty_map`), or a plain array ``(*planes, H, W)`` in [0, 1] (NaN =
        not computed) taken as level 0 of the image (one map pixel = one image pixel).
    region_um : float, keyword-only
        Region side in µm; in level-0 pixels when the image has no µm/px.
    top_k : int or None
        How many regions to return (None: all that qualify).
    tissue : TissueMask or numpy.ndarray of bool, optional
        Where tissue is (a `TissueMask`, or a bool array over the whole image at any
        resolution). Default: every computed (non-NaN) pixel counts; runs made with the
        tissue mask on already have their background tiles NaN.
    mpp : float or (float, float), optional
        Level-0 µm/px; default the run's image µm/px (``None``: sizes are pixels).
    quantile : float or None
        The score of a region is this quantile of the uncertainty over its counted
        pixels (default 0.9); ``None``: their mean. Why 0.9: a region worth a look often
        holds a small unsure structure (a doubtful mitosis, a tumour border) within
        confident tissue; the mean dilutes it by the region's area, the maximum follows
        single noisy pixels; the 90th percentile ranks first the regions where at least
        a tenth of the tissue is unsure.
    min_tissue : float
        Regions where fewer than this fraction of the map pixels count (tissue and
        computed) are skipped.
    level : int, optional
        The map level to read; default the finest whose longest side is at most
        `RANK_SIDE` pixels (so a whole slide is never read at level 0).
    cancel : threading.Event, optional
        Set it to stop after the current band of rows (returns ``complete=False``).

    Returns
    -------
    Ranking
        ``regions`` sorted by score, highest first, ties broken by (plane, top, left)
        so the order is stable; ``rank`` 1..n. Region boxes are level-0 pixels, clipped
        to the image.
    """
    import dask.array as da

    if not 0.0 <= min_tissue <= 1.0:
        raise ModelInputError(f"min_tissue must be in [0, 1], got {min_tissue}")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ModelInputError(f"quantile must be in [0, 1] or None, got {quantile}")
    if not region_um > 0:
        raise ModelInputError(f"region_um must be positive, got {region_um}")
    if isinstance(uncertainty, UncertaintyMap):
        levels = uncertainty.levels
        n_plane = len(uncertainty.planes)
        image_shape = uncertainty.image_shape
        mpp_img = uncertainty.image_mpp
        origin = uncertainty.origin()
        method = uncertainty.method
        pixels = [uncertainty.level_pixel(k) for k in range(len(levels))]
    else:
        arr = np.asarray(uncertainty, dtype=np.float32)
        if arr.ndim < 2:
            raise ModelInputError(f"an uncertainty array needs (…, H, W), got shape {arr.shape}")
        levels = [da.from_array(arr, chunks=(*(1,) * (arr.ndim - 2), 1024, 1024))]
        n_plane = arr.ndim - 2
        image_shape = (int(arr.shape[-2]), int(arr.shape[-1]))
        mpp_img = None
        origin = (0.0, 0.0)
        method = "array"
        pixels = [(1.0, 1.0)]
    if mpp is not None:
        mpp_img = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(mpp)  # type: ignore[assignment,arg-type]
    shapes = [(int(lv.shape[-2]), int(lv.shape[-1])) for lv in levels]
    k = _pick_level(shapes, RANK_SIDE) if level is None else int(level)
    if not 0 <= k < len(levels):
        raise ModelInputError(f"level {level} is not a level of the map (0..{len(levels) - 1})")
    lv = levels[k]
    pix = pixels[k]
    side = (
        (region_um / mpp_img[0], region_um / mpp_img[1])
        if mpp_img is not None
        else (float(region_um), float(region_um))
    )
    statistic = "mean" if quantile is None else f"q{quantile:g}"
    h, w = shapes[k]
    # level-0 centre of every map row / column, and the region row / column it falls in
    yc = origin[0] + (np.arange(h) + 0.5) * pix[0]
    xc = origin[1] + (np.arange(w) + 0.5) * pix[1]
    h0, w0 = image_shape if image_shape[0] else (h * pix[0], w * pix[1])
    n_rr, n_rc = max(1, math.ceil(h0 / side[0])), max(1, math.ceil(w0 / side[1]))
    ri = np.floor(yc / side[0]).astype(np.int64)
    ci = np.floor(xc / side[1]).astype(np.int64)
    row_in = (yc >= 0) & (yc < h0)
    col_in = (xc >= 0) & (xc < w0)
    tissue_px = _tissue_lookup(tissue, yc, xc, (h0, w0)) if tissue is not None else None

    plane_list = list(np.ndindex(*lv.shape[:-2])) if n_plane else [()]
    row_chunks = lv.chunks[-2]
    bounds = np.cumsum((0, *row_chunks))
    total = len(plane_list) * len(row_chunks)
    done = 0
    # region label of every map pixel (-1: centre outside the image)
    inside = row_in[:, None] & col_in[None, :]
    labels = np.where(inside, ri[:, None] * n_rc + ci[None, :], -1)
    n_regions = n_rr * n_rc
    counts = np.bincount(labels[inside], minlength=n_regions)
    candidates: list[tuple[float, tuple[int, ...], int, int, float]] = []
    for plane in plane_list:
        data = np.empty((h, w), dtype=np.float32)
        for b in range(len(row_chunks)):  # band by band: progress and cancel
            if cancel is not None and cancel.is_set():
                return Ranking([], False, k, side, statistic, 0, method, mpp_img)
            y0, y1 = int(bounds[b]), int(bounds[b + 1])
            block = lv[(*plane, slice(y0, y1), slice(None))]
            data[y0:y1] = np.asarray(
                block.compute(scheduler="threads") if hasattr(block, "compute") else block,
                dtype=np.float32,
            )
            done += 1
            yield RankProgress(done, total, f"uncertainty: {done}/{total} bands read")
        valid = inside & np.isfinite(data)
        if tissue_px is not None:
            valid &= tissue_px
        candidates += _score(data[valid], labels[valid], counts, n_rc, plane, quantile, min_tissue)
    candidates.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
    chosen = candidates if top_k is None else candidates[: max(0, int(top_k))]
    regions = []
    for n, (score, plane, a, b, frac) in enumerate(chosen):
        top, left = a * side[0], b * side[1]
        bottom, right = min(h0, (a + 1) * side[0]), min(w0, (b + 1) * side[1])
        regions.append(
            Region(
                rank=n + 1,
                top=math.floor(top),
                left=math.floor(left),
                height=int(math.ceil(bottom) - math.floor(top)),
                width=int(math.ceil(right) - math.floor(left)),
                score=float(score),
                plane=tuple(int(v) for v in plane),
                tissue=float(frac),
            )
        )
    return Ranking(regions, True, k, side, statistic, len(candidates), method, mpp_img)


def _tissue_lookup(
    tissue: TissueMask | np.ndarray, yc: np.ndarray, xc: np.ndarray, shape0: tuple[float, float]
) -> np.ndarray:
    """Tissue (bool) at every (row centre, column centre) of the map, (h, w).

    A plain bool array covers the whole level-0 image at its own resolution.
    """
    from .tissue import TissueMask

    if isinstance(tissue, TissueMask):
        mask, (dy, dx) = np.asarray(tissue.mask, dtype=bool), tissue.downsample
    else:
        mask = np.asarray(tissue, dtype=bool)
        if mask.ndim != 2 or not mask.size:
            raise ModelInputError(f"a tissue mask must be 2-D (rows, cols), got {mask.shape}")
        dy, dx = shape0[0] / mask.shape[0], shape0[1] / mask.shape[1]
    rows = np.clip(np.floor(yc / dy).astype(np.int64), 0, mask.shape[0] - 1)
    cols = np.clip(np.floor(xc / dx).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _score(
    values: np.ndarray,
    labels: np.ndarray,
    counts: np.ndarray,
    n_cols: int,
    plane: tuple[int, ...],
    quantile: float | None,
    min_tissue: float,
) -> list[tuple[float, tuple[int, ...], int, int, float]]:
    """(score, plane, region row, region col, counted fraction) of every region with
    enough counted pixels."""
    if not len(values):
        return []
    order = np.argsort(labels, kind="stable")
    labels, values = labels[order], values[order]
    uniq, starts, n_valid = np.unique(labels, return_index=True, return_counts=True)
    frac = n_valid / np.maximum(counts[uniq], 1)
    out = []
    for lab, s, n, f in zip(uniq, starts, n_valid, frac, strict=True):
        if f <= 0 or f < min_tissue:
            continue
        v = values[s : s + n]
        score = float(v.mean() if quantile is None else np.quantile(v, quantile))
        out.append((score, plane, int(lab // n_cols), int(lab % n_cols), float(f)))
    return out


def rank_regions(
    uncertainty: UncertaintyMap | np.ndarray,
    *,
    region_um: float = 256.0,
    top_k: int | None = 20,
    tissue: TissueMask | np.ndarray | None = None,
    mpp: tuple[float, float] | float | None = None,
    quantile: float | None = 0.9,
    min_tissue: float = 0.25,
    level: int | None = None,
) -> list[Region]:
    """`iter_rank_regions` run to the end in this thread; returns the ranked regions."""
    gen = iter_rank_regions(
        uncertainty,
        region_um=region_um,
        top_k=top_k,
        tissue=tissue,
        mpp=mpp,
        quantile=quantile,
        min_tissue=min_tissue,
        level=level,
    )
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            ranking: Ranking = stop.value
            return ranking.regions
