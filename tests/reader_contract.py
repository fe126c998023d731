"""The conformance suite every reader backend passes (subclass ``ReaderContract``).

A subclass provides ``path`` (a fixture or attribute) and the expectations about it;
every test here then runs for that file.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_histo_ai.io import detect_backend, open_image


class ReaderContract:
    """Subclass and set these; ``path`` may be overridden as a fixture."""

    #: backend expected by auto-detection
    backend: str = ""
    #: "slide" | "volume" | "image"
    kind: str = "slide"
    #: number of levels expected (None: don't check)
    n_levels: int | None = None
    #: level-0 shape expected (None: don't check)
    shape0: tuple[int, ...] | None = None
    #: expected mpp (row, col) or None when the file has none
    mpp: tuple[float, float] | None = None
    #: expected spacing in mm for volumes
    spacing_mm: tuple[float, ...] | None = None
    #: expected objective power or None
    objective_power: float | None = None

    @pytest.fixture
    def path(self) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError("subclass must provide a 'path' fixture")

    @pytest.fixture
    def pyramid(self, path):
        pyr = open_image(path)
        yield pyr
        pyr.close()

    def test_detected(self, path):
        assert detect_backend(path) == self.backend

    def test_backend_and_kind(self, pyramid):
        assert pyramid.backend == self.backend
        assert pyramid.kind == self.kind

    def test_levels_are_lazy_and_shrinking(self, pyramid):
        import dask.array as da

        assert pyramid.levels, "a pyramid has at least one level"
        sizes = []
        for i, lv in enumerate(pyramid.levels):
            assert isinstance(lv, da.Array)
            assert lv.ndim == len(pyramid.axes)
            assert lv.dtype == pyramid.levels[0].dtype
            sizes.append(math.prod(pyramid.spatial_shape(i)))
        assert sizes == sorted(sizes, reverse=True)
        if self.n_levels is not None:
            assert len(pyramid.levels) == self.n_levels
        if self.shape0 is not None:
            assert tuple(pyramid.levels[0].shape) == tuple(self.shape0)

    def test_chunks_are_bounded(self, pyramid):
        """No chunk of level 0 is the whole of a large level (that would read it all)."""
        lv = pyramid.levels[0]
        chunk_bytes = math.prod(max(c) for c in lv.chunks) * lv.dtype.itemsize
        if lv.nbytes > 64 * 2**20:
            assert chunk_bytes <= 32 * 2**20

    def test_metadata(self, pyramid):
        if self.mpp is None:
            if self.kind == "slide":
                assert pyramid.mpp is None
                assert pyramid.mpp_source == "missing"
        else:
            assert pyramid.mpp is not None
            assert pyramid.mpp == pytest.approx(self.mpp, rel=1e-3)
        if self.spacing_mm is not None:
            assert pyramid.spacing_mm == pytest.approx(self.spacing_mm, rel=1e-4)
        assert pyramid.objective_power == self.objective_power

    def test_level_scale_matches_downsample(self, pyramid):
        ds = pyramid.downsamples
        assert ds[0] == 1
        assert all(b > a for a, b in itertools.pairwise(ds))
        if pyramid.mpp is not None:
            for i in range(len(pyramid.levels)):
                lm = pyramid.level_mpp(i)
                assert lm[1] == pytest.approx(pyramid.mpp[1] * ds[i], rel=0.02)

    def test_region_read_matches_level(self, pyramid):
        """A small region read through dask is the same pixels at every level."""
        for lv in pyramid.levels:
            sl = tuple(slice(0, min(64, s)) for s in lv.shape)
            region = np.asarray(lv[sl])
            assert region.shape == tuple(min(64, s) for s in lv.shape)
            assert region.dtype == pyramid.dtype

    def test_not_blank(self, pyramid):
        """The smallest level holds real image content, not a constant."""
        small = np.asarray(pyramid.levels[-1][tuple(slice(0, 512) for _ in pyramid.axes)])
        assert float(np.nanstd(small.astype(np.float64))) > 0

    def test_info_is_json(self, pyramid):
        info = pyramid.info()
        text = json.dumps(info)
        for key in (
            "format",
            "backend",
            "levels",
            "downsamples",
            "mpp",
            "objective_power",
            "spacing_mm",
            "dtype",
            "axes",
        ):
            assert key in info
        assert json.loads(text)["backend"] == self.backend
        assert len(info["levels"]) == len(pyramid.levels)
        if self.kind != "volume":
            assert all(len(lv) == 3 for lv in info["levels"])

    def test_layer_scale_units(self, pyramid):
        scale = pyramid.layer_scale()
        assert len(scale) == len(pyramid.axes.replace("S", ""))
        if pyramid.kind == "volume":
            assert pyramid.units == "mm"
        elif pyramid.mpp is not None:
            assert pyramid.units == "um"
            assert scale[-1] == pytest.approx(pyramid.mpp[1])
