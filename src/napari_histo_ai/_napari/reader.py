"""The npe2 reader: ``get_reader(path)`` sniffs cheaply; the reader it returns opens lazily.

Two-step contract (npe2): ``get_reader`` returns a function or ``None`` and never raises;
the function returns layer data tuples and raises :class:`ImageReadError` with the file,
the problem and what to do (napari shows it as a notification).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HistoAIError, ImageReadError

if TYPE_CHECKING:
    from napari.types import LayerDataTuple

__all__ = ["get_reader", "read_paths"]

log = logging.getLogger(__name__)

PathOrPaths = str | Path | Sequence[str | Path]
ReaderFunction = Callable[[PathOrPaths], list["LayerDataTuple"]]


def _as_list(path: PathOrPaths) -> list[str]:
    if isinstance(path, (str, Path)):
        return [str(path)]
    return [str(p) for p in path]


def get_reader(path: PathOrPaths) -> ReaderFunction | None:
    """Return :func:`read_paths` if every path is an image we read, else ``None``.

    Parameters
    ----------
    path : str, Path or list of them
        What napari was asked to open (files, or OME-Zarr folders).

    Returns
    -------
    callable or None
        Only magic bytes / folder layout are read to decide. Never raises.
    """
    try:
        from ..io import detect_backend
        from .results import is_run_folder

        paths = _as_list(path)
        if not paths:
            return None
        if all(is_run_folder(p) for p in paths):
            return read_runs
        for p in paths:
            if detect_backend(p) is None:
                return None
    except Exception:  # the contract: a reader that cannot tell says None
        log.debug("get_reader(%r) failed", path, exc_info=True)
        return None
    return read_paths


def read_runs(path: PathOrPaths) -> list[LayerDataTuple]:
    """Layers of run folders written by the engine (``napari-histo-ai predict``)."""
    from .results import run_folder_layers

    layers: list[LayerDataTuple] = []
    for p in _as_list(path):
        try:
            layers.extend(run_folder_layers(p))
        except HistoAIError:
            raise
        except Exception as exc:
            raise ImageReadError(
                p,
                f"could not read this run folder: {type(exc).__name__}: {exc}",
                "run the model again into a new folder",
            ) from exc
    return layers


def read_paths(path: PathOrPaths) -> list[LayerDataTuple]:
    """Open each path lazily and return its layer data tuples.

    Raises
    ------
    ImageReadError
        A file is missing, damaged or not a format we read; the message names it.
    """
    from ..io import open_image
    from .layers import pyramid_to_layer_data

    layers: list[LayerDataTuple] = []
    for p in _as_list(path):
        try:
            layers.extend(pyramid_to_layer_data(open_image(p)))
        except HistoAIError:
            raise
        except Exception as exc:  # not ours (a damaged tile, a codec): name file and cause
            raise ImageReadError(
                p, f"{type(exc).__name__}: {exc}", "the file may be damaged; try another copy"
            ) from exc
    return layers
