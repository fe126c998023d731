"""The review queue of the "Review & correct" widget: rank the regions of a run by
uncertainty in a worker, then step through them (Next / Previous region, Shift+N / P)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_ai._napari.layers import add_layer_data, pyramid_to_layer_data
from napari_histo_ai._napari.results import run_folder_layers
from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai.inference.engine import RunConfig, run_model_sync
from napari_histo_ai.io import open_image
from napari_histo_ai.models.architectures.tiny import TinyFCN
from napari_histo_ai.models.loading import TorchPredictor
from napari_histo_ai.models.spec import ModelSpec

pytestmark = pytest.mark.gui

torch.set_num_threads(1)


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    return shown


def press(layer, key: str) -> None:
    from app_model.types import KeyBinding

    layer.keymap[KeyBinding.from_str(key)](layer)


def tiny_run(out: Path) -> Path:
    """A tiny sigmoid net over the sample slide at 8 µm/px (the real engine)."""
    spec = ModelSpec.from_dict(
        {
            "name": "tiny-net",
            "task": "test",
            "version": "1",
            "format": "builtin",
            "architecture": "tiny_fcn",
            "activation": "sigmoid",
            "io": {"patch_size": 64, "halo": 4, "overlap": 8, "mpp": 8.0},
            "outputs": [{"name": "p", "kind": "probability", "channels": [0]}],
        },
        source="test",
    )
    pyramid = open_image(sample_path())
    try:
        net = TinyFCN(3, 1, width=4, depth=2, seed=5)
        run_model_sync(
            pyramid, TorchPredictor(net, spec, torch.device("cpu")), out, config=RunConfig()
        )
    finally:
        pyramid.close()
    return out


def test_rank_regions_and_step_through_them(make_napari_viewer, qtbot, tmp_path, errors):
    from napari_histo_ai.widgets.review_widget import ReviewWidget

    viewer = make_napari_viewer()
    (slide,) = add_layer_data(viewer, pyramid_to_layer_data(open_image(sample_path())))
    run = tiny_run(tmp_path / "run.zarr")
    (prob,) = add_layer_data(viewer, run_folder_layers(run))
    widget = ReviewWidget(viewer, store_root=tmp_path)
    viewer.window.add_dock_widget(widget)
    assert widget.result_combo.findText(prob.name) >= 0  # offered as a result layer
    widget.image_combo.setCurrentText(slide.name)
    widget.result_combo.setCurrentText(prob.name)
    widget.region_spin.setValue(200.0)
    widget.top_spin.setValue(4)
    widget.rank_regions()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert not errors, errors
    names = [layer.name for layer in viewer.layers]
    umap_layer = viewer.layers[f"{slide.name} · tiny-net · uncertainty"]
    queue = viewer.layers[f"{slide.name} · tiny-net · review queue"]
    assert umap_layer.multiscale == prob.multiscale
    np.testing.assert_allclose(umap_layer.scale, prob.scale)
    np.testing.assert_allclose(umap_layer.translate, prob.translate)
    assert len(queue.data) == 4 and list(queue.features["rank"]) == [1, 2, 3, 4], names
    session = widget.session
    assert session is not None and len(session.region_queue) == 4
    # Next region: the camera centre lands inside the first region (world µm)
    unit = np.asarray(slide.scale[-2:])
    origin = np.asarray(slide.translate[-2:])

    def inside(region) -> bool:
        centre_px = (np.asarray(viewer.scene.camera.center[-2:]) - origin) / unit + 0.5
        return bool(
            region.top <= centre_px[0] <= region.top + region.height
            and region.left <= centre_px[1] <= region.left + region.width
        )

    first = widget.next_region()
    assert first is not None and first.rank == 1 and inside(first)
    press(session.points_layer, "Shift-n")
    assert session.region_index == 1 and inside(session.region_queue[1])
    press(session.points_layer, "Shift-p")
    assert session.region_index == 0 and inside(first)
    # zoomed to fit: the region's longer side spans most of the canvas, and fits in it
    canvas = np.asarray(viewer.window._qt_viewer.canvas.size[-2:], dtype=float)
    on_screen = np.asarray([first.height, first.width]) * unit * viewer.scene.camera.zoom
    assert (on_screen <= canvas + 1).all() and (on_screen / canvas).max() > 0.8
    # the position is saved in the store: a new session resumes it
    path = session.store.path
    widget._close_session()
    from napari_histo_ai.annotations.store import AnnotationStore

    store = AnnotationStore.open(path)
    try:
        assert store.metadata["region_queue"]["index"] == 0
        assert len(store.metadata["region_queue"]["regions"]) == 4
    finally:
        store.close()
    # reopening the image's session brings the queue back where it was
    widget.open_session()
    assert widget.session.region_index == 0 and len(widget.session.region_queue) == 4
    assert widget.previous_region() is None  # before the first: stays put
    assert "start of the region queue" in widget.status_label.text()


def test_mc_dropout_ranks_the_visible_region(make_napari_viewer, qtbot, tmp_path, errors):
    """MC-dropout passes > 0: the run's model (the packaged mitosis-fcn, dropout 0.1) is
    run again over the view with dropout on, and its spread is what gets ranked."""
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry
    from napari_histo_ai.widgets.review_widget import ReviewWidget

    viewer = make_napari_viewer()
    (slide,) = add_layer_data(viewer, pyramid_to_layer_data(open_image(sample_path())))
    spec = load_registry(user_dir=tmp_path).get("mitosis-fcn")
    pyramid = open_image(sample_path())
    try:
        run = tmp_path / "mitosis.zarr"
        roi = RunConfig(roi=(1200.0, 600.0, 512.0, 512.0))
        run_model_sync(pyramid, load_model(spec, device="cpu"), run, config=roi)
    finally:
        pyramid.close()
    layers = add_layer_data(viewer, run_folder_layers(run))
    prob = next(layer for layer in layers if layer.metadata.get("kind") == "probability")
    # look at the computed region only
    unit = float(slide.scale[-1])
    viewer.scene.camera.center = (1456.0 * unit, 856.0 * unit)
    viewer.scene.camera.zoom = 2.0
    widget = ReviewWidget(viewer, store_root=tmp_path)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(slide.name)
    widget.result_combo.setCurrentText(prob.name)
    widget.region_spin.setValue(32.0)
    widget.top_spin.setValue(3)
    widget.mc_spin.setValue(4)
    widget.rank_regions()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert not errors, errors
    assert "mc-dropout" in widget.status_label.text()
    ranking = widget.last_ranking
    assert ranking is not None and ranking.complete and len(ranking.regions) == 3
    assert (tmp_path / "mitosis.mc4.zarr").is_dir()
    from napari_histo_ai._napari.run import layer_pyramid, viewport_box

    top, left, height, width = viewport_box(viewer, layer_pyramid(slide), slide)
    margin = spec.io.patch_size  # the run computes whole tiles over the view's edges
    for region in ranking.regions:  # where the MC-dropout run went: the view
        assert top - margin <= region.top + region.height / 2 <= top + height + margin
        assert left - margin <= region.left + region.width / 2 <= left + width + margin
    assert ranking.regions[0].score >= ranking.regions[-1].score > 0
    assert f"{slide.name} · mitosis-fcn-mc4 · review queue" in viewer.layers
