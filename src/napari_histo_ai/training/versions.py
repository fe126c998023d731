"""Versioned models: every fine-tuning run registers a new version with its card.

A version is an ordinary user registry entry (a YAML file and a safetensors file in the
user model folder, `user_models_dir`), so it appears in the Run widget, ``models`` and
``predict`` like any model. Names: the lineage's root model name plus ``-v<N>``
(``mitosis-fcn`` → ``mitosis-fcn-v2``, ``-v3``, ...; the packaged model is version 1),
version ``"<N>.0"``. The card records the parent (name and version, so lineages can
branch), the training data (manifests and their hashes), the configuration, the run
folder and the validation metrics before and after (``card.training``); the card's
``metrics`` are the new version's validation metrics.

Both files are written atomically, the weights first: a crash never leaves an entry
whose weights are missing, and the entry is validated (loaded back, weights included)
before `register_version` returns.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HistoAIError
from ..models.registry import Registry, load_registry, user_models_dir
from ..models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["lineage", "lineage_root", "register_version", "versions_of"]

_SUFFIX = re.compile(r"^(?P<root>.+)-v(?P<n>\d+)$")


def lineage_root(registry: Registry, name: str) -> str:
    """The model a lineage starts from: follow ``card.parent`` while it is registered.

    A version whose parent is not registered (here) keeps its lineage by name:
    ``<root>-vN`` → ``<root>``.
    """
    seen = {name}
    spec = registry.get(name)
    while spec.card.parent and spec.card.parent in registry and spec.card.parent not in seen:
        seen.add(spec.card.parent)
        spec = registry.get(spec.card.parent)
    match = _SUFFIX.match(spec.name)
    if spec.card.parent and match:
        return match["root"]
    return spec.name


def versions_of(registry: Registry, name: str) -> list[ModelSpec]:
    """Every registered version of ``name``'s lineage: the root first, then by number."""
    root = lineage_root(registry, name)
    members = [s for s in registry if lineage_root(registry, s.name) == root]

    def number(spec: ModelSpec) -> tuple[int, str]:
        if spec.name == root:
            return (0, spec.name)
        match = _SUFFIX.match(spec.name)
        return (int(match["n"]) if match else 10**9, spec.name)

    return sorted(members, key=number)


def lineage(registry: Registry, name: str) -> list[ModelSpec]:
    """``name`` and its ancestors, oldest first (the path that made this version)."""
    chain = [registry.get(name)]
    while chain[-1].card.parent and chain[-1].card.parent in registry:
        parent = registry.get(chain[-1].card.parent)
        if parent in chain:
            break
        chain.append(parent)
    return chain[::-1]


def _next_number(registry: Registry, root: str, folder: Path) -> int:
    used = {1}
    for spec in registry:
        match = _SUFFIX.match(spec.name)
        if match and match["root"] == root:
            used.add(int(match["n"]))
    for path in folder.glob(f"{root}-v*.yaml"):
        match = _SUFFIX.match(path.stem)
        if match and match["root"] == root:
            used.add(int(match["n"]))
    return max(used) + 1


def _jsonable(value: Any) -> Any:
    """Plain YAML-able data (tuples → lists, paths → strings, floats kept)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def register_version(
    parent: ModelSpec,
    module: torch.nn.Module,
    *,
    training: Mapping[str, Any],
    metrics: Mapping[str, float],
    models_dir: str | Path | None = None,
    description: str = "",
) -> ModelSpec:
    """Save ``module``'s weights as a new version of ``parent``'s lineage and register it.

    Parameters
    ----------
    parent : ModelSpec
        The model that was fine-tuned.
    module : torch.nn.Module
        The trained network (``parent``'s architecture).
    training : mapping, keyword-only
        JSON-able record for ``card.training`` (config, data, run folder, before/after).
    metrics : mapping, keyword-only
        The new version's validation metrics (``card.metrics``).
    models_dir : str or Path, optional, keyword-only
        Registry folder; default `user_models_dir`.
    description : str, keyword-only
        Card description; default one naming the parent.

    Returns
    -------
    ModelSpec
        The new entry as the registry reads it back.

    Raises
    ------
    HistoAIError
        The folder is not writable, or the entry does not read back.
    """
    import yaml

    from ..atomic import write_atomic
    from ..models.loading import load_model
    from .common import save_weights, sha256

    folder = Path(models_dir) if models_dir is not None else user_models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HistoAIError(f"{folder}: cannot create the model folder ({exc})") from None
    registry = load_registry(user_dir=folder)
    if parent.name not in registry:
        registry.add(parent)
    root = lineage_root(registry, parent.name)
    number = _next_number(registry, root, folder)
    name = f"{root}-v{number}"
    weights = folder / f"{name}.safetensors"
    save_weights(module, weights, {"model": name, "parent": parent.name})
    entry = parent.to_dict()
    entry.pop("source", None)
    entry.update(name=name, version=f"{number}.0", format="safetensors", weights=weights.name)
    card = dict(entry["card"])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sources = ", ".join(str(s) for s in training.get("sources", ()))
    card.update(
        description=description
        or f"{parent.name} {parent.version} fine-tuned on reviewed corrections ({when}). "
        + (parent.card.description or ""),
        parent=parent.name,
        parent_version=parent.version,
        training_data=f"{sources}; parent trained on: {parent.card.training_data}",
        split="fixed validation split of the training data (see card.training)",
        metrics={k: float(v) for k, v in metrics.items() if v == v},  # drop NaN
        provenance=f"napari-histo-ai fine-tuning run {training.get('run_dir', '')}; "
        f"weights SHA-256 {sha256(weights)}",
        training=_jsonable(dict(training)),
    )
    entry["card"] = card
    text = yaml.safe_dump({"models": [_jsonable(entry)]}, sort_keys=False, allow_unicode=True)
    yaml_path = folder / f"{name}.yaml"

    def write_text(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(yaml_path, write_text)
    spec = ModelSpec.from_dict(
        yaml.safe_load(text)["models"][0], source=str(yaml_path), base_dir=folder
    )
    try:
        load_model(spec, device="cpu")
    except Exception as exc:
        yaml_path.unlink(missing_ok=True)
        raise HistoAIError(f"{yaml_path}: the new version does not load ({exc})") from exc
    return spec
