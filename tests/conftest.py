"""Shared fixtures: paths to the real data beside the checkout and small synthetic files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTO_AI_DATA", ROOT.parent / "shared" / "data"))
WSI = DATA / "wsi"


def real(relative: str) -> Path:
    """Path of a file in ``../shared/data``; skips the test (with the reason) if absent."""
    p = DATA / relative
    if not p.exists():
        pytest.skip(f"real data file {p} is not present (set HISTO_AI_DATA)")
    return p


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"real data folder {DATA} is not present (set HISTO_AI_DATA)")
    return DATA
