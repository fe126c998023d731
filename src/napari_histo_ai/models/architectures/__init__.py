"""Networks a registry entry can name in ``architecture:``, resolved lazily.

`ARCHITECTURES` maps a name to a ``"module:callable"`` string; nothing is imported
(no torch) until `build_architecture` builds one. Other packages add networks through
the entry-point group ``napari_histo_ai.architectures`` (name → callable returning a
``torch.nn.Module``), read on first need; code can call `register_architecture`.

Examples
--------
>>> from napari_histo_ai.models.architectures import build_architecture
>>> net = build_architecture("tiny_fcn", in_channels=3, out_channels=2)
>>> type(net).__name__
'TinyFCN'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ...errors import ModelSpecError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "ENTRY_POINT_GROUP",
    "architecture_names",
    "build_architecture",
    "register_architecture",
]

#: entry-point group other packages use to contribute networks (name → callable)
ENTRY_POINT_GROUP = "napari_histo_ai.architectures"

#: name → ``"module:callable"``; the built-in networks (imported only when built)
ARCHITECTURES: dict[str, str] = {
    "tiny_fcn": "napari_histo_ai.models.architectures.tiny:TinyFCN",
    "tiny_classifier": "napari_histo_ai.models.architectures.tiny:TinyClassifier",
    "tiny_detector": "napari_histo_ai.models.architectures.tiny:TinyDetector",
    "unet": "napari_histo_ai.models.architectures.unet:UNet",
    # the papers' networks (one module per paper task)
    "mitosis_convnet": "napari_histo_ai.models.architectures.mitosis:BasicConvNet",
    "mitosis_fcn": "napari_histo_ai.models.architectures.mitosis:MitosisFCN",
    "tissue_fcn": "napari_histo_ai.models.architectures.tissue:TissueFCN",
    "patch_classifier": "napari_histo_ai.models.architectures.tissue:PatchClassifier",
    "breakhis_resnet": "napari_histo_ai.models.architectures.resnet:BreakHisResNet",
    "mass_detector": "napari_histo_ai.models.architectures.detector:MassDetector",
    "shallownet": "napari_histo_ai.models.architectures.shallownet:ShallowNet",
    "shallownet_fusion": "napari_histo_ai.models.architectures.shallownet:MagnificationFusion",
    "slice_unet": "napari_histo_ai.models.architectures.mri:SliceUNet",
}

# name → callable registered from code, or loaded from a target / an entry point
_CALLABLES: dict[str, Callable[..., Any]] = {}
# name → entry point object, filled once by _discover()
_ENTRY_POINTS: dict[str, Any] = {}
_discovered = False

_SOURCE = "architectures"


def register_architecture(
    name: str, target: str | Callable[..., Any], *, replace: bool = False
) -> None:
    """Make a network buildable by name (and so usable in ``architecture:``).

    Parameters
    ----------
    name : str
        Name used in registry entries.
    target : str or callable
        ``"package.module:callable"`` (imported on first build) or the callable itself;
        called with the entry's ``kwargs`` it must return a ``torch.nn.Module``.
    replace : bool
        Allow replacing an existing name (otherwise a `ValueError`).

    Raises
    ------
    ValueError
        ``name`` is taken, or ``target`` is a string without ``module:callable`` form.
    """
    if not replace and (name in ARCHITECTURES or name in _CALLABLES):
        raise ValueError(
            f"architecture {name!r} is already registered; pass replace=True to replace it"
        )
    if isinstance(target, str):
        if target.count(":") != 1 or not all(target.split(":")):
            raise ValueError(f"architecture target {target!r} is not 'module:callable'")
        _CALLABLES.pop(name, None)
        ARCHITECTURES[name] = target
    elif callable(target):
        ARCHITECTURES.pop(name, None)
        _CALLABLES[name] = target
    else:
        raise ValueError(f"architecture target for {name!r} must be 'module:callable' or callable")


def _discover() -> None:
    """Read the entry-point group once; built-in and registered names win over it."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    try:
        found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution's metadata must not break the built-ins
        return
    for ep in found:
        _ENTRY_POINTS.setdefault(ep.name, ep)


def architecture_names() -> list[str]:
    """Every buildable name: built-in, registered and from entry points, sorted."""
    _discover()
    return sorted(set(ARCHITECTURES) | set(_CALLABLES) | set(_ENTRY_POINTS))


def _resolve(name: str) -> Callable[..., Any]:
    if name in _CALLABLES:
        return _CALLABLES[name]
    if name in ARCHITECTURES:
        target = ARCHITECTURES[name]
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
            builder = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(
                _SOURCE, "?", f"architecture '{name}' ({target}) cannot be imported: {exc}"
            ) from exc
    else:
        _discover()
        if name not in _ENTRY_POINTS:
            known = ", ".join(architecture_names())
            raise ModelSpecError(
                _SOURCE,
                "?",
                f"unknown architecture '{name}'; known: {known}",
                f"install the package that provides it (entry-point group "
                f"'{ENTRY_POINT_GROUP}') or use a TorchScript / ONNX file",
            )
        ep = _ENTRY_POINTS[name]
        try:
            builder = ep.load()
        except Exception as exc:
            raise ModelSpecError(
                _SOURCE,
                "?",
                f"architecture '{name}' from entry point '{ep.value}' failed to load: "
                f"{type(exc).__name__}: {exc}",
            ) from exc
    if not callable(builder):
        raise ModelSpecError(_SOURCE, "?", f"architecture '{name}' is not callable: {builder!r}")
    _CALLABLES[name] = builder
    return builder


def build_architecture(name: str, /, **kwargs: Any) -> torch.nn.Module:
    """Build a network by name with freshly initialised weights.

    Parameters
    ----------
    name : str
        A name from `architecture_names` (``tiny_fcn``, ``unet``, ...).
    **kwargs
        Passed to the network's constructor (a registry entry's ``kwargs``).

    Returns
    -------
    torch.nn.Module
        In training mode, on the CPU.

    Raises
    ------
    ModelSpecError
        Unknown name (the message lists the known ones), a constructor that rejects
        ``kwargs`` (the message names them and quotes the constructor's complaint), or
        a builder that does not return a ``torch.nn.Module``.
    """
    builder = _resolve(name)
    try:
        module = builder(**kwargs)
    except (TypeError, ValueError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no kwargs"
        raise ModelSpecError(
            _SOURCE,
            "?",
            f"architecture '{name}' does not accept {given}: {exc}",
            "check the entry's 'kwargs' against the network's constructor",
        ) from exc
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelSpecError(
            _SOURCE,
            "?",
            f"architecture '{name}' returned {type(module).__name__}, not a torch.nn.Module",
        )
    return module
