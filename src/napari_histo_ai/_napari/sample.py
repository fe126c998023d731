"""Sample data contributions: small, openly redistributable files shipped in ``data/``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari.types import LayerDataTuple

__all__ = ["CMU1_SMALL_REGION", "cmu1_small_region", "sample_path"]

#: file name of the packaged Aperio slide (see ``data/README.md`` for source and licence)
CMU1_SMALL_REGION = "CMU-1-Small-Region.svs"


def sample_path(name: str = CMU1_SMALL_REGION) -> Path:
    """Path of a packaged sample file (``data/<name>``)."""
    return Path(str(files("napari_histo_ai").joinpath("data", name)))


def cmu1_small_region() -> list[LayerDataTuple]:
    """CMU-1 small region: an H&E Aperio SVS, 2967×2220 RGB at 0.499 µm/px, 20×."""
    from .reader import read_paths

    return read_paths(sample_path(CMU1_SMALL_REGION))
