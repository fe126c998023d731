"""The "Run model" dock widget in a real viewer: run, live layers, cancel and resume."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_histo_ai._napari.layers import add_layer_data, pyramid_to_layer_data
from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai.io import open_image
from napari_histo_ai.models.registry import Registry
from napari_histo_ai.models.spec import ModelSpec

pytestmark = pytest.mark.gui


def tiny_spec(name: str = "tiny-nuclei") -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": name,
            "task": "segmentation",
            "version": "0",
            "format": "builtin",
            "architecture": "tiny_fcn",
            "kwargs": {"in_channels": 3, "out_channels": 1, "width": 4, "depth": 2},
            "io": {"patch_size": 96, "halo": 4, "overlap": 8, "mpp": 1.0},
            "outputs": [
                {"name": "probability", "kind": "probability"},
                {"name": "mask", "kind": "mask", "threshold": 0.5},
                {"name": "centres", "kind": "points", "threshold": 0.5, "min_distance_um": 8},
            ],
        },
        source="test",
    )


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    return shown


@pytest.fixture
def setup(make_napari_viewer, tmp_path):
    from napari_histo_ai.widgets.run_widget import RunModelWidget

    viewer = make_napari_viewer()
    pyramid = open_image(sample_path())
    (layer,) = add_layer_data(viewer, pyramid_to_layer_data(pyramid))
    widget = RunModelWidget(viewer, registry=Registry([tiny_spec()]), run_root=tmp_path)
    viewer.window.add_dock_widget(widget)
    return viewer, widget, layer


def test_run_keeps_the_gui_responsive_and_fills_layers(setup, qtbot, errors):
    from qtpy.QtCore import QTimer

    viewer, widget, layer = setup
    assert widget.image_combo.currentText() == layer.name
    assert "tiny-nuclei" in widget.card.toPlainText()
    widget.region_combo.setCurrentText("Whole image")
    widget.batch_spin.setValue(4)
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(5)
    yielded: list[object] = []
    worker = widget.run()
    assert worker is not None
    worker.yielded.connect(yielded.append)
    ticks_at_start = len(ticks)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    timer.stop()
    assert not errors, errors
    result = widget.result
    assert result is not None and result.complete
    # the event loop kept running while the model ran in its thread
    assert len(yielded) >= 3
    assert len(ticks) - ticks_at_start >= len(yielded)
    names = set(widget.result_layers)
    base = f"{layer.name} · tiny-nuclei"
    assert {f"{base} · probability", f"{base} · mask"} <= names
    prob = viewer.layers[f"{base} · probability"]
    mask = viewer.layers[f"{base} · mask"]
    assert prob.multiscale and mask.multiscale
    # outputs are at 1 µm/px over a 0.499 µm/px slide, aligned with it
    assert prob.scale[-1] == pytest.approx(1.0, rel=1e-3)
    assert prob.extent.world[1][-1] == pytest.approx(layer.extent.world[1][-1], abs=1.5)
    values = np.asarray(prob.data[0][:64, :64])
    assert values.max() > 0 and values.max() <= 1
    assert "done" in widget.status_label.text()


def test_cancel_then_run_again_resumes(setup, qtbot, errors):
    from qtpy.QtCore import Qt

    _viewer, widget, _layer = setup
    widget.region_combo.setCurrentText("Whole image")
    widget.batch_spin.setValue(2)
    worker = widget.run()
    # The tiny model can finish the whole image before the GUI thread handles its first
    # progress event (CI is slow and loaded), so the worker thread is held at its first
    # finished batch until Cancel has been pressed; the engine then stops before the next.
    reached, pressed = threading.Event(), threading.Event()

    def hold(p) -> None:
        if p.done > 0 and not reached.is_set():
            reached.set()
            pressed.wait(60)

    worker.yielded.connect(hold, Qt.ConnectionType.DirectConnection)
    qtbot.waitUntil(reached.is_set, timeout=60_000)
    widget.cancel()
    pressed.set()
    # the widget's own state, not worker.finished (it may fire before a waitSignal connects)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    partial = widget.result
    assert partial is not None and partial.cancelled
    assert 0 < partial.tiles_done < partial.tiles_total
    assert "press Run to resume" in widget.status_label.text()
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert not errors, errors
    resumed = widget.result
    assert resumed.complete and resumed.path == partial.path
    assert resumed.tiles_total == partial.tiles_total


def test_bad_input_is_a_notification_not_a_traceback(setup, qtbot, errors):
    viewer, widget, _layer = setup
    widget.region_combo.setCurrentText("Drawn shape")
    assert widget.run() is None
    assert errors and "Shapes layer" in errors[-1]
    viewer.add_shapes(name="empty")
    assert widget.run() is None
    assert "empty" in errors[-1]
