"""The model registry: which models exist, read from data, never from code at import.

Three sources, read in this order by `load_registry`:

1. the packaged ``models.yaml`` beside this module, then the other packaged ``*.yaml``
   files there (one per paper task: ``mitosis.yaml``, ``mri.yaml``, ...), sorted;
2. the entry-point group ``napari_histo_ai.models``: each entry point loads to the path
   of a YAML file, or to a callable returning a list of entries, a ``{"models": [...]}``
   mapping or a YAML path;
3. every ``*.yaml`` / ``*.yml`` in the user folder (`user_models_dir`:
   ``$NAPARI_HISTO_AI_MODELS`` or the platform's user-data folder), relative ``weights``
   resolved against the YAML's folder.

A YAML file is a mapping with a ``models:`` list of entries (see ``models.yaml`` and
`ModelSpec.from_dict`). A broken file or entry never breaks the registry: it becomes
one line in `Registry.problems` and the other models stay usable. A name defined twice
keeps its first definition (packaged models win) and the second is a problem line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError, ModelSpecError
from .spec import ModelSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "Registry",
    "format_card",
    "load_registry",
    "spec_summary",
    "user_models_dir",
]

#: entry-point group other packages use to contribute model YAML files or entries
ENTRY_POINT_GROUP = "napari_histo_ai.models"
#: environment variable naming the user's model folder
ENV_VAR = "NAPARI_HISTO_AI_MODELS"
_PACKAGED = "models.yaml"
_TOP_LEVEL_KEYS = {"models"}


class Registry:
    """Registered models by name, plus one line per entry that could not be read.

    Parameters
    ----------
    specs : iterable of ModelSpec
        Models; the first of two with the same name is kept, the second is a problem.
    problems : iterable of str
        Problems found while reading the sources.

    Attributes
    ----------
    problems : list of str
        One line per broken file, entry or duplicate name, naming the file.
    """

    def __init__(self, specs: Iterable[ModelSpec] = (), problems: Iterable[str] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self.problems: list[str] = list(problems)
        for spec in specs:
            self.add(spec)

    def add(self, spec: ModelSpec) -> bool:
        """Register ``spec``; a duplicate name is recorded as a problem and ignored.

        Returns
        -------
        bool
            Whether it was added.
        """
        first = self._specs.get(spec.name)
        if first is not None:
            self.problems.append(
                f"{spec.source}: model '{spec.name}' is already defined in {first.source}; "
                "this definition is ignored (give it another name)"
            )
            return False
        self._specs[spec.name] = spec
        self._specs = dict(sorted(self._specs.items()))
        return True

    def names(self) -> list[str]:
        """Model names, sorted."""
        return list(self._specs)

    def get(self, name: str) -> ModelSpec:
        """The model called ``name``.

        Raises
        ------
        ModelNotFoundError
            Listing the available names.
        """
        try:
            return self._specs[name]
        except KeyError:
            available = ", ".join(self._specs) or "none"
            raise ModelNotFoundError(
                f"no model named {name!r}; available: {available}. Add models as YAML files "
                f"in {user_models_dir()} (or set ${ENV_VAR})"
            ) from None

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __repr__(self) -> str:
        return f"Registry({self.names()}, problems={len(self.problems)})"


def user_models_dir() -> Path:
    """Folder of the user's own model YAML files (and usually their weights).

    Returns
    -------
    Path
        ``$NAPARI_HISTO_AI_MODELS`` when set, else
        ``platformdirs.user_data_dir("napari-histo-ai") / "models"``. It may not exist.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-histo-ai")) / "models"


def load_registry(
    *, user_dir: Path | None = None, entry_points: bool = True, packaged: bool = True
) -> Registry:
    """Read every model source into a `Registry` (nothing is loaded, no torch).

    Parameters
    ----------
    user_dir : Path, optional
        Folder of user YAML files; default `user_models_dir`. A missing folder is empty.
    entry_points : bool
        Read the ``napari_histo_ai.models`` entry-point group.
    packaged : bool
        Read the packaged ``models.yaml`` and the other packaged YAML files.

    Returns
    -------
    Registry
        With ``problems`` listing broken files, entries and duplicate names.
    """
    registry = Registry()
    if packaged:
        package = resources.files("napari_histo_ai.models")
        others = sorted(
            (r for r in package.iterdir() if r.name.endswith(".yaml") and r.name != _PACKAGED),
            key=lambda r: r.name,
        )
        for resource in [package / _PACKAGED, *others]:
            if isinstance(resource, Path):
                _add_yaml_file(registry, resource)
            else:  # zipped install: relative weights cannot be resolved to files anyway
                text = resource.read_text(encoding="utf-8")
                _add_yaml_text(registry, text, str(resource), None)
    if entry_points:
        _add_entry_points(registry)
    folder = user_models_dir() if user_dir is None else Path(user_dir)
    if folder.is_dir():
        files = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file()
        )
        for path in files:
            _add_yaml_file(registry, path)
    return registry


# ----------------------------------------------------------------------------- sources
def _add_yaml_file(registry: Registry, path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        registry.problems.append(f"{path}: cannot be read ({exc})")
        return
    _add_yaml_text(registry, text, str(path), path.parent)


def _add_yaml_text(registry: Registry, text: str, source: str, base_dir: Path | None) -> None:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        registry.problems.append(f"{source}: not valid YAML ({where}{what})")
        return
    _add_document(registry, data, source, base_dir)


def _add_document(
    registry: Registry, data: Any, source: str, base_dir: Path | None, *, bare_list: bool = False
) -> None:
    if bare_list and isinstance(data, list):  # entries returned by an entry-point callable
        entries: Any = data
    elif isinstance(data, Mapping):
        extra = sorted(str(k) for k in data if k not in _TOP_LEVEL_KEYS)
        if extra:
            registry.problems.append(
                f"{source}: unknown top-level key(s) {extra} ignored; expected only 'models:'"
            )
        if "models" not in data:
            registry.problems.append(f"{source}: no 'models:' list")
            return
        entries = data["models"] if data["models"] is not None else []
    else:
        kind = "empty" if data is None else f"a {type(data).__name__}"
        registry.problems.append(
            f"{source}: is {kind}; expected a mapping with a 'models:' list of entries"
        )
        return
    if not isinstance(entries, list):
        registry.problems.append(
            f"{source}: 'models' is a {type(entries).__name__}; expected a list of entries"
        )
        return
    for index, entry in enumerate(entries):
        try:
            spec = ModelSpec.from_dict(entry, source=source, base_dir=base_dir)
        except ModelSpecError as exc:
            registry.problems.append(str(exc))
            continue
        except Exception as exc:  # a validator gap must not break the registry
            name = entry.get("name", "?") if isinstance(entry, Mapping) else "?"
            registry.problems.append(
                f"{source}: model '{name}' (models[{index}]): {type(exc).__name__}: {exc}"
            )
            continue
        registry.add(spec)


def _add_entry_points(registry: Registry) -> None:
    try:
        found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:
        registry.problems.append(f"entry points '{ENTRY_POINT_GROUP}': cannot be listed ({exc})")
        return
    for ep in sorted(found, key=lambda e: e.name):
        source = f"entry point '{ep.name}' ({ep.value})"
        try:
            value = ep.load()
            if callable(value):
                value = value()
        except Exception as exc:
            registry.problems.append(f"{source}: failed to load: {type(exc).__name__}: {exc}")
            continue
        if isinstance(value, str | os.PathLike):
            path = Path(value)
            if not path.is_file():
                registry.problems.append(f"{source}: YAML file {path} does not exist")
                continue
            _add_yaml_file(registry, path)
        elif isinstance(value, list | Mapping):
            _add_document(registry, value, source, None, bare_list=True)
        else:
            registry.problems.append(
                f"{source}: gave a {type(value).__name__}; expected a YAML path, a list of "
                "entries or a callable returning one"
            )


# ----------------------------------------------------------------------------- display
def _weights_available(spec: ModelSpec) -> bool:
    return spec.format == "builtin" or (spec.weights is not None and spec.weights.is_file())


def spec_summary(spec: ModelSpec) -> dict[str, Any]:
    """JSON-able description of a model: `ModelSpec.to_dict` plus ``"available"``.

    ``available`` is whether its weights file exists (always true for ``builtin``).
    """
    data = spec.to_dict()
    data["available"] = _weights_available(spec)
    return data


def _fmt_number(value: float) -> str:
    return f"{value:g}"


def format_card(spec: ModelSpec) -> str:
    """A readable multi-line description of a model (for the widget and ``--info``).

    Parameters
    ----------
    spec : ModelSpec

    Returns
    -------
    str
        Name, version, task, input geometry, normalisation, outputs, metrics, training
        data, split, provenance, licence and source, one topic per line.
    """
    io = spec.io
    card = spec.card
    norm = io.normalisation
    lines = [f"{spec.name} {spec.version} — {spec.task}"]
    if card.description:
        lines.append(f"  {card.description}")

    def row(label: str, text: str) -> None:
        if text:
            lines.append(f"  {label:<14}{text}")

    mpp = f"{_fmt_number(io.mpp)} µm/px" if io.mpp is not None else "image pixels (no mpp)"
    geometry = f"{mpp}, patch {io.patch_size} px, halo {io.halo} px, overlap {io.overlap} px"
    if spec.dense and io.output_stride > 1:
        geometry += f", output stride {io.output_stride}"
    if io.fixed_size:
        geometry += ", fixed size"
    row("input", geometry)
    normalisation = norm.method
    if norm.method in ("scale", "meanstd"):
        normalisation += f" (÷ {_fmt_number(norm.scale)}"
        if norm.method == "meanstd":
            mean = ", ".join(_fmt_number(v) for v in norm.mean)
            std = ", ".join(_fmt_number(v) for v in norm.std)
            normalisation += f"; mean {mean}; std {std}"
        normalisation += ")"
    if norm.stain is not None:
        normalisation = f"{norm.stain.method} stain normalisation, then {normalisation}"
    row("channels", f"{io.channels}; {normalisation}")
    weights = "none (built-in initialisation)"
    if spec.weights is not None:
        weights = f"{spec.weights} ({'present' if _weights_available(spec) else 'MISSING'})"
    network = spec.architecture or "exported network"
    row("network", f"{network}, format {spec.format}, activation {spec.activation}")
    row("weights", weights)
    for i, out in enumerate(spec.outputs):
        classes = ", ".join(
            f"{name} ({colour})" for name, colour in zip(out.classes, out.colours, strict=True)
        )
        channels = ", ".join(str(c) for c in out.channels)
        text = f"{out.name}: {out.kind}, channel(s) {channels}, classes {classes}"
        if out.kind in ("probability", "mask", "points", "boxes"):
            text += f", threshold {_fmt_number(out.threshold)}"
        if out.kind in ("points", "boxes"):
            text += f", min distance {_fmt_number(out.min_distance_um)} µm"
        if out.size_channels is not None:
            text += f", size channels {out.size_channels[0]}, {out.size_channels[1]}"
        if out.kind in ("class", "magnification"):
            text += f", aggregate {out.aggregate}"
        if out.values:
            text += ", values " + ", ".join(_fmt_number(v) for v in out.values)
        row("outputs" if i == 0 else "", text)
    metrics = ", ".join(f"{k} {_fmt_number(v)}" for k, v in card.metrics.items())
    row("metrics", metrics)
    if card.parent:
        row("parent", f"{card.parent} {card.parent_version}".strip())
    row("training data", card.training_data)
    row("split", card.split)
    row("intended use", card.intended_use)
    row("limitations", card.limitations)
    row("provenance", card.provenance)
    row("licence", card.licence)
    row("citation", card.citation)
    row("source", spec.source)
    return "\n".join(lines)
