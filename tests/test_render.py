"""The sample slide really renders: a screenshot of the OpenGL canvas shows H&E tissue."""

from __future__ import annotations

import numpy as np
import pytest

from napari_histo_ai._napari.sample import sample_path


@pytest.mark.gui
@pytest.mark.render
def test_sample_slide_renders_as_tissue(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1000, 800)
    viewer.open(str(sample_path()), plugin="napari-histo-ai")
    viewer.reset_view()
    qtbot.wait(300)  # let the canvas draw (and load the visible tiles)

    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4
    rgb = shot[..., :3].astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert rgb.std() > 20, "the canvas is blank"
    # eosin pink / haematoxylin purple: red and blue above green, not background white
    stained = (r - g > 20) & (b - g > 5) & (g < 215)
    assert stained.mean() > 0.1, f"only {stained.mean():.1%} of the canvas is H&E-coloured"
