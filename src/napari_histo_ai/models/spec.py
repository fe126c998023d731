"""What a model is, as data: `ModelSpec` = architecture + weights + IO config + outputs + card.

A spec is built from a plain mapping (one entry of a ``models.yaml``) by
`ModelSpec.from_dict`, which validates every field and raises `ModelSpecError`
naming the source file, the model and the field. Nothing here imports torch.

The model contract the engine relies on
---------------------------------------
Input: a float32 tensor ``(N, C, H, W)`` (``C = io.channels``), pixels at
``io.mpp`` µm/px, normalised as ``io.normalisation`` says.

* ``dense`` models return ``(N, K, H / s, W / s)`` with ``s = io.output_stride``;
  the engine tiles them with overlap and blends tiles with tapered weights.
* tile models (``dense: false``) return ``(N, K)``: one vector per patch of
  ``io.patch_size``; the engine slides them with stride ``patch_size - overlap``.

``activation`` (sigmoid / softmax over K / none) is applied by the engine to the raw
output, so exported ONNX / TorchScript files can stay plain logits.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelSpecError

FORMATS = ("safetensors", "state_dict", "torchscript", "onnx", "builtin")
OUTPUT_KINDS = ("probability", "mask", "points", "boxes", "class", "magnification", "lines")
DENSE_KINDS = ("probability", "mask", "points", "boxes", "lines")
TILE_KINDS = ("class", "magnification")
ACTIVATIONS = ("sigmoid", "softmax", "none")
NORMALISATIONS = ("none", "scale", "meanstd", "zscore", "whiten", "clahe")
AGGREGATES = ("vote", "average", "max", "sum", "median", "exist", "exist3")
#: class-only aggregates (paper 002): positive if >= 1 / >= 3 tiles are not class 0
CLASS_AGGREGATES = ("exist", "exist3")
STAIN_METHODS = ("macenko",)
STAIN_FITS = ("patch", "slide")

DEFAULT_COLOURS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
)  # fmt: skip


@dataclass(frozen=True)
class StainReference:
    """Target stains for stain normalisation (Macenko et al. 2009).

    Parameters
    ----------
    method : str
        ``"macenko"``.
    stain_matrix : tuple of two (r, g, b) tuples
        Unit optical-density vectors of haematoxylin and eosin in the reference.
    max_concentrations : (float, float)
        99th percentile of the H and E concentrations in the reference.
    fit : str
        How the engine estimates the *source* stains of an image: ``"patch"`` (the
        default) fits every tile on its own, as the shipped mitosis models were trained;
        ``"slide"`` fits them once per run on tissue sampled from the image (paper 000)
        and applies that fit to every tile. The default is chosen by measurement: with
        per-slide fitting the per-patch-trained mitosis models did worse on held-out
        data (see the header of ``models.yaml``).
    """

    method: str = "macenko"
    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (0.5626, 0.7201, 0.4062),
        (0.2159, 0.8012, 0.5581),
    )
    max_concentrations: tuple[float, float] = (1.9705, 1.0308)
    fit: str = "patch"


@dataclass(frozen=True)
class Normalisation:
    """How raw pixels become the model's input tensor.

    ``method``:
      * ``none``: float32 of the raw values;
      * ``scale``: divided by ``scale`` (255 for 8-bit);
      * ``meanstd``: ``(x / scale - mean) / std`` per channel;
      * ``zscore``: per patch, ``(x - mean(x)) / std(x)`` per channel;
      * ``whiten``: per patch, ``(x - mean(x)) / std(x)`` over all channels together
        (paper 002's per-image whitening);
      * ``clahe``: contrast-limited adaptive histogram equalisation of 8-bit patches
        (RGB: on the Y channel of YUV; grey: on the channel), ``clip_limit`` as OpenCV
        counts it (multiples of the mean bin height), ``tiles`` × ``tiles`` tiles, then
        divided by ``scale``.

    ``stain`` (optional) is applied first, on the 8-bit RGB patch.
    """

    method: str = "scale"
    scale: float = 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    stain: StainReference | None = None
    clip_limit: float = 2.0
    tiles: int = 8


@dataclass(frozen=True)
class IOConfig:
    """Resolution and geometry of a model's input.

    Parameters
    ----------
    mpp : float or None
        Micrometres per pixel the model was trained at. ``None``: the image's own
        pixels (level 0), for images without physical scale (mammograms, MRI slices).
    patch_size : int
        Side of one input patch, pixels at ``mpp``.
    halo : int
        Pixels at each side of a dense patch whose outputs are discarded (they see the
        padding); at least the receptive-field radius for seamless tiling.
    overlap : int
        Dense: pixels (input resolution) over which neighbouring tiles' kept areas
        overlap and are blended with tapered weights. Tile models: ``patch_size -
        stride``.
    channels : int
        Number of input channels (3 for RGB).
    normalisation : Normalisation
    output_stride : int
        Input pixels per output pixel of a dense model.
    size_multiple : int
        Every input side must be a multiple of this (U-Nets with poolings).
    fixed_size : bool
        The network only accepts ``patch_size`` inputs (ONNX files with static shape).
    """

    patch_size: int
    mpp: float | None = None
    halo: int = 0
    overlap: int = 0
    channels: int = 3
    normalisation: Normalisation = field(default_factory=Normalisation)
    output_stride: int = 1
    size_multiple: int = 1
    fixed_size: bool = False


@dataclass(frozen=True)
class OutputSpec:
    """One result a model produces and how it becomes a layer.

    Parameters
    ----------
    name : str
        Short name used in layer and file names (``"nuclei"``, ``"tumour"``).
    kind : str
        ``probability`` (Image 0..1), ``mask`` (Labels: argmax, or threshold for one
        channel), ``points`` (peaks of a probability map), ``boxes`` (peaks + box size
        channels), ``class`` (per-tile class vector + image aggregate),
        ``magnification`` (per-tile estimate + image aggregate), ``lines`` (per
        connected lesion of the thresholded map, its longest in-plane diameter, computed
        when the run completes; `napari_histo_ai.inference.lesions`).
    channels : tuple of int
        Indices into the model's K outputs that this result reads.
    classes : tuple of str
        A name per channel (mask: per label 1..n).
    colours : tuple of str
        ``#rrggbb`` per class.
    threshold : float
        Probability above which a pixel / peak / box counts.
    min_distance_um : float
        Points and boxes: minimum distance between two peaks, µm (px when the image
        has no mpp).
    size_channels : (int, int) or None
        Boxes: the channels holding box height and width, in output pixels.
    aggregate : str
        Class / magnification: how tiles combine into one image-level value
        (vote, average, max, sum, median); class outputs also ``exist`` / ``exist3``
        (paper 002: the image is positive when at least 1 / 3 tiles are not class 0).
    values : tuple of float
        Magnification classifiers: the magnification each channel stands for; empty for
        a regressor (one channel = the magnification itself).
    smoothing_um : float
        Mask / class outputs: Gaussian σ (µm; px when the image has no mpp) applied to
        the class probabilities before the argmax / threshold when the layer is built
        (`napari_histo_ai.inference.smoothing`); 0 = none. The stored run is not
        changed; a class output's image aggregate is taken over the smoothed map.
    """

    name: str
    kind: str
    channels: tuple[int, ...] = (0,)
    classes: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    threshold: float = 0.5
    min_distance_um: float = 4.0
    size_channels: tuple[int, int] | None = None
    aggregate: str = "average"
    values: tuple[float, ...] = ()
    smoothing_um: float = 0.0


@dataclass(frozen=True)
class ModelCard:
    """What a user should know before trusting a model (shown in the widget and CLI)."""

    description: str = ""
    training_data: str = ""
    split: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    provenance: str = ""
    licence: str = ""
    citation: str = ""
    intended_use: str = ""
    limitations: str = ""
    #: the registered model this one was fine-tuned from ("" for a trained-from-scratch
    #: model), and that model's version (`napari_histo_ai.training.versions`)
    parent: str = ""
    parent_version: str = ""
    #: how a fine-tuned version was made: config, data (manifests with hashes), run
    #: folder, metrics before / after on the fixed validation set (JSON-able)
    training: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model. See the module docstring for the tensor contract."""

    name: str
    task: str
    version: str
    format: str
    io: IOConfig
    outputs: tuple[OutputSpec, ...]
    architecture: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    dense: bool = True
    activation: str = "sigmoid"
    card: ModelCard = field(default_factory=ModelCard)
    source: str = ""

    @property
    def n_outputs(self) -> int:
        """Channels K the network returns (the highest channel any output reads + 1)."""
        highest = 0
        for out in self.outputs:
            highest = max(highest, *out.channels, *(out.size_channels or (0, 0)))
        return highest + 1

    def fingerprint(self) -> str:
        """Hash of everything that changes the numbers a run produces (for resume)."""
        data = self.to_dict()
        data.pop("card", None)
        data.pop("source", None)
        for output in data["outputs"]:  # display-time smoothing does not change a run
            output.pop("smoothing_um", None)
        if self.weights is not None and self.weights.is_file():
            stat = self.weights.stat()
            data["weights_stat"] = [stat.st_size, int(stat.st_mtime)]
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (the inverse of `from_dict`)."""
        data = asdict(self)
        data["weights"] = str(self.weights) if self.weights is not None else None
        data["card"]["metrics"] = dict(self.card.metrics)
        data["card"]["training"] = dict(self.card.training)
        data["kwargs"] = dict(self.kwargs)
        return data

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "<dict>", base_dir: Path | None = None
    ) -> ModelSpec:
        """Validate a mapping (one ``models.yaml`` entry) into a spec.

        Parameters
        ----------
        data : mapping
            The entry. ``weights`` is resolved against ``base_dir``.
        source : str
            Where it came from, for error messages.
        base_dir : Path, optional
            Folder relative weight paths are resolved against.

        Raises
        ------
        ModelSpecError
            Naming the source, the model and the bad field.
        """
        return _Parser(source, data, base_dir).spec()


class _Parser:
    def __init__(self, source: str, data: Mapping[str, Any], base_dir: Path | None) -> None:
        self.source = source
        self.data = data
        self.base_dir = base_dir
        self.name = str(data.get("name", "?")) if isinstance(data, Mapping) else "?"

    def fail(self, problem: str, hint: str = "") -> ModelSpecError:
        return ModelSpecError(self.source, self.name, problem, hint)

    def mapping(self, value: Any, where: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(f"'{where}' must be a mapping, got {type(value).__name__}")
        return value

    def unknown(self, value: Mapping[str, Any], allowed: set[str], where: str) -> None:
        extra = sorted(str(k) for k in set(value) - allowed)
        if extra:
            raise self.fail(
                f"unknown field(s) {extra} in '{where}'", f"allowed: {', '.join(sorted(allowed))}"
            )

    def choice(self, value: Any, allowed: tuple[str, ...], where: str) -> str:
        if value not in allowed:
            raise self.fail(f"'{where}' is {value!r}; expected one of {', '.join(allowed)}")
        return str(value)

    def number(self, value: Any, where: str, *, minimum: float = 0.0, integer: bool = False) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if integer:
            ok = ok and float(value).is_integer()
        if not ok or value < minimum:
            kind = "an integer" if integer else "a number"
            raise self.fail(f"'{where}' is {value!r}; expected {kind} >= {minimum:g}")
        return int(value) if integer else float(value)

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"'{where}' is {value!r}; expected true or false")
        return value

    def floats(self, value: Any, where: str) -> tuple[float, ...]:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise self.fail(f"'{where}' is {value!r}; expected a list of numbers")
        return tuple(float(self.number(v, where, minimum=-math.inf)) for v in value)

    def strings(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise self.fail(f"'{where}' is {value!r}; expected a list")
        return tuple(str(v) for v in value)

    def spec(self) -> ModelSpec:
        data = self.mapping(self.data, "entry")
        # 'source' is accepted (to_dict writes it) but the keyword argument wins
        self.unknown(data, set(ModelSpec.__dataclass_fields__), "entry")
        for key in ("name", "task", "version", "format", "io", "outputs"):
            if key not in data:
                raise self.fail(f"missing required field '{key}'")
        name = data["name"]
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ ·"):
            raise self.fail(f"'name' is {name!r}; expected a short name without spaces or /")
        fmt = self.choice(data["format"], FORMATS, "format")
        architecture = data.get("architecture")
        if fmt in ("safetensors", "state_dict", "builtin") and not architecture:
            raise self.fail(f"format '{fmt}' needs an 'architecture' (a registered network)")
        weights = data.get("weights")
        weights_path: Path | None = None
        if fmt != "builtin":
            if not weights:
                raise self.fail(f"format '{fmt}' needs a 'weights' file")
            weights_path = Path(str(weights)).expanduser()
            if not weights_path.is_absolute() and self.base_dir is not None:
                weights_path = self.base_dir / weights_path
        kwargs = dict(self.mapping(data.get("kwargs"), "kwargs"))
        io = self.io(self.mapping(data["io"], "io"))
        outputs_raw = data["outputs"]
        if not isinstance(outputs_raw, list | tuple) or not outputs_raw:
            raise self.fail("'outputs' must be a non-empty list")
        dense = self.boolean(data.get("dense", True), "dense")
        outputs = tuple(self.output(o, i) for i, o in enumerate(outputs_raw))
        for out in outputs:
            if dense != (out.kind in DENSE_KINDS):
                raise self.fail(
                    f"output '{out.name}' of kind '{out.kind}' does not fit a "
                    f"{'dense' if dense else 'tile'} model",
                    "dense models give probability/mask/points/boxes/lines; tile models "
                    "class/magnification",
                )
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise self.fail(f"output names must be unique, got {names}")
        activation = self.choice(data.get("activation", "sigmoid"), ACTIVATIONS, "activation")
        card = self.card(self.mapping(data.get("card"), "card"))
        return ModelSpec(
            name=name,
            task=str(data["task"]),
            version=str(data["version"]),
            format=fmt,
            io=io,
            outputs=outputs,
            architecture=str(architecture) if architecture else None,
            kwargs=kwargs,
            weights=weights_path,
            dense=dense,
            activation=activation,
            card=card,
            source=self.source,
        )

    def io(self, raw: Mapping[str, Any]) -> IOConfig:
        self.unknown(raw, set(IOConfig.__dataclass_fields__), "io")
        if "patch_size" not in raw:
            raise self.fail("missing required field 'io.patch_size'")
        patch = self.number(raw["patch_size"], "io.patch_size", minimum=1, integer=True)
        mpp = raw.get("mpp")
        if mpp is not None:
            mpp = self.number(mpp, "io.mpp", minimum=1e-6)
        halo = self.number(raw.get("halo", 0), "io.halo", integer=True)
        overlap = self.number(raw.get("overlap", 0), "io.overlap", integer=True)
        stride = self.number(
            raw.get("output_stride", 1), "io.output_stride", minimum=1, integer=True
        )
        multiple = self.number(
            raw.get("size_multiple", 1), "io.size_multiple", minimum=1, integer=True
        )
        channels = self.number(raw.get("channels", 3), "io.channels", minimum=1, integer=True)
        if patch - 2 * halo - overlap < 1:
            raise self.fail(
                f"io.patch_size {patch} leaves nothing after a halo of {halo} on each side "
                f"and an overlap of {overlap}",
                "make patch_size larger than 2 * halo + overlap",
            )
        for key, value in (("patch_size", patch), ("halo", halo), ("overlap", overlap)):
            if value % stride:
                raise self.fail(f"io.{key} {value} is not a multiple of io.output_stride {stride}")
        if patch % multiple:
            raise self.fail(
                f"io.patch_size {patch} is not a multiple of io.size_multiple {multiple}"
            )
        norm = self.normalisation(
            self.mapping(raw.get("normalisation"), "io.normalisation"), channels
        )
        return IOConfig(
            patch_size=patch,
            mpp=mpp,
            halo=halo,
            overlap=overlap,
            channels=channels,
            normalisation=norm,
            output_stride=stride,
            size_multiple=multiple,
            fixed_size=self.boolean(raw.get("fixed_size", False), "io.fixed_size"),
        )

    def normalisation(self, raw: Mapping[str, Any], channels: int) -> Normalisation:
        self.unknown(raw, set(Normalisation.__dataclass_fields__), "io.normalisation")
        method = self.choice(raw.get("method", "scale"), NORMALISATIONS, "io.normalisation.method")
        scale = self.number(raw.get("scale", 255.0), "io.normalisation.scale", minimum=1e-12)
        mean = self.floats(raw.get("mean"), "io.normalisation.mean")
        std = self.floats(raw.get("std"), "io.normalisation.std")
        if method == "meanstd":
            if len(mean) != channels or len(std) != channels:
                raise self.fail(
                    f"io.normalisation 'meanstd' needs {channels} mean and std values, "
                    f"got {len(mean)} and {len(std)}"
                )
            if any(s <= 0 for s in std):
                raise self.fail(f"io.normalisation.std {std} must be positive")
        stain = None
        if raw.get("stain") is not None:
            s = self.mapping(raw["stain"], "io.normalisation.stain")
            self.unknown(s, set(StainReference.__dataclass_fields__), "io.normalisation.stain")
            method_s = self.choice(s.get("method", "macenko"), STAIN_METHODS, "stain.method")
            if channels != 3:
                raise self.fail("stain normalisation needs an RGB model (io.channels = 3)")
            default = StainReference()
            matrix = s.get("stain_matrix", default.stain_matrix)
            maxc = s.get("max_concentrations", default.max_concentrations)
            try:
                m = tuple(tuple(float(v) for v in row) for row in matrix)
                c = tuple(float(v) for v in maxc)
            except (TypeError, ValueError) as exc:
                raise self.fail(f"stain reference is not numeric: {exc}") from None
            if len(m) != 2 or any(len(row) != 3 for row in m) or len(c) != 2:
                raise self.fail("stain.stain_matrix must be 2 x 3 and max_concentrations 2 values")
            fit = self.choice(s.get("fit", default.fit), STAIN_FITS, "stain.fit")
            stain = StainReference(method_s, (m[0], m[1]), (c[0], c[1]), fit)  # type: ignore[arg-type]
        clip_limit = self.number(
            raw.get("clip_limit", 2.0), "io.normalisation.clip_limit", minimum=1e-6
        )
        tiles = self.number(raw.get("tiles", 8), "io.normalisation.tiles", minimum=1, integer=True)
        if method == "clahe" and channels not in (1, 3):
            raise self.fail(f"io.normalisation 'clahe' needs 1 or 3 channels, not {channels}")
        return Normalisation(method, scale, mean, std, stain, float(clip_limit), int(tiles))

    def output(self, raw: Any, index: int) -> OutputSpec:
        where = f"outputs[{index}]"
        raw = self.mapping(raw, where)
        self.unknown(raw, set(OutputSpec.__dataclass_fields__), where)
        if "name" not in raw or "kind" not in raw:
            raise self.fail(f"{where} needs a 'name' and a 'kind'")
        kind = self.choice(raw["kind"], OUTPUT_KINDS, f"{where}.kind")
        channels_raw = raw.get("channels", [0])
        if isinstance(channels_raw, int):
            channels_raw = [channels_raw]
        if not isinstance(channels_raw, list | tuple):
            raise self.fail(f"'{where}.channels' is {channels_raw!r}; expected a list of integers")
        channels = tuple(self.number(c, f"{where}.channels", integer=True) for c in channels_raw)
        if not channels:
            raise self.fail(f"{where}.channels is empty")
        classes = self.strings(raw.get("classes"), f"{where}.classes")
        if not classes:
            classes = tuple(
                f"{raw['name']}" if len(channels) == 1 else f"class {i}"
                for i in range(len(channels))
            )
        if len(classes) != len(channels):
            raise self.fail(f"{where} has {len(channels)} channels but {len(classes)} class names")
        colours = self.strings(raw.get("colours"), f"{where}.colours")
        if not colours:
            colours = tuple(DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)] for i in range(len(classes)))
        if len(colours) != len(classes):
            raise self.fail(f"{where} has {len(classes)} classes but {len(colours)} colours")
        for c in colours:
            if not (isinstance(c, str) and c.startswith("#") and len(c) in (7, 9)):
                raise self.fail(f"{where} colour {c!r} is not '#rrggbb'")
        threshold = self.number(raw.get("threshold", 0.5), f"{where}.threshold")
        size_channels = raw.get("size_channels")
        if kind == "boxes":
            if not (isinstance(size_channels, list | tuple) and len(size_channels) == 2):
                raise self.fail(f"{where} of kind 'boxes' needs size_channels: [h, w]")
            size_channels = tuple(
                self.number(c, f"{where}.size_channels", integer=True) for c in size_channels
            )
        elif size_channels is not None:
            raise self.fail(f"{where}.size_channels only applies to kind 'boxes'")
        values = self.floats(raw.get("values"), f"{where}.values")
        if kind != "class" and raw.get("aggregate") in CLASS_AGGREGATES:
            raise self.fail(
                f"{where}.aggregate '{raw['aggregate']}' only applies to kind 'class'",
                "use vote, average, max, sum or median",
            )
        if kind == "magnification" and values and len(values) != len(channels):
            raise self.fail(f"{where} has {len(channels)} channels but {len(values)} values")
        return OutputSpec(
            name=str(raw["name"]),
            kind=kind,
            channels=channels,
            classes=classes,
            colours=colours,
            threshold=threshold,
            min_distance_um=self.number(
                raw.get("min_distance_um", 4.0), f"{where}.min_distance_um"
            ),
            size_channels=size_channels,
            aggregate=self.choice(
                raw.get("aggregate", "average"), AGGREGATES, f"{where}.aggregate"
            ),
            values=values,
            smoothing_um=self._smoothing(raw, kind, where),
        )

    def _smoothing(self, raw: Mapping[str, Any], kind: str, where: str) -> float:
        smoothing = self.number(raw.get("smoothing_um", 0.0), f"{where}.smoothing_um")
        if smoothing and kind not in ("mask", "class"):
            raise self.fail(f"{where}.smoothing_um only applies to kinds 'mask' and 'class'")
        return float(smoothing)

    def card(self, raw: Mapping[str, Any]) -> ModelCard:
        self.unknown(raw, set(ModelCard.__dataclass_fields__), "card")
        metrics = self.mapping(raw.get("metrics"), "card.metrics")
        for key, value in metrics.items():
            self.number(value, f"card.metrics.{key}", minimum=-1e300)
        training = self.mapping(raw.get("training"), "card.training")
        fields = {k: str(v) for k, v in raw.items() if k not in ("metrics", "training")}
        return ModelCard(
            **fields,
            metrics={str(k): float(v) for k, v in metrics.items()},
            training=dict(training),
        )
