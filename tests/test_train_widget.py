"""The Retrain dock widget in a real viewer: the issue's "Done when".

A researcher runs mitosis-fcn on the sample slide (Run model), rejects false points in
Review & correct, presses Retrain (cancels after one epoch, presses Resume), watches the
curves while the viewer keeps processing events, compares the new version with its
parent, and runs the new version on the view: its layer appears on the slide.
"""

from __future__ import annotations

import shutil

import pytest
from qtpy.QtCore import QTimer

from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai.models.registry import load_registry

from .test_review_widget import errors, open_in  # noqa: F401  (errors is a fixture)

pytestmark = pytest.mark.gui


def test_correct_retrain_compare_and_rerun_in_napari(
    make_napari_viewer,
    qtbot,
    tmp_path,
    monkeypatch,
    errors,  # noqa: F811
):
    import napari_histo_ai.training.retrain as retrain_module
    from napari_histo_ai.widgets.review_widget import ReviewWidget
    from napari_histo_ai.widgets.run_widget import RunModelWidget
    from napari_histo_ai.widgets.train_widget import RetrainWidget

    models = tmp_path / "models"
    slide_path = tmp_path / "CMU-1-Small-Region.svs"
    shutil.copyfile(sample_path(), slide_path)
    viewer = make_napari_viewer()
    slide = open_in(viewer, slide_path)

    # 1. the model's mitoses on the (mitosis-free) sample slide
    runner = RunModelWidget(viewer, registry=load_registry(user_dir=models), run_root=tmp_path)
    viewer.window.add_dock_widget(runner, name="Run model")
    runner.model_combo.setCurrentText("mitosis-fcn")
    runner.region_combo.setCurrentText("Whole image")
    assert runner.run() is not None
    qtbot.waitUntil(lambda: runner._worker is None, timeout=120_000)
    points_layer = runner.result_layers[f"{slide.name} · mitosis-fcn · mitoses"]
    assert len(points_layer.data) > 100

    # 2. the annotator selects 40 of them and rejects them (R)
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review & correct")
    review.image_combo.setCurrentText(slide.name)
    review.source_combo.setCurrentText(points_layer.name)
    assert review.make_editable() == len(points_layer.data), errors
    editable = review.session.points_layer
    editable.selected_data = set(range(40))
    assert review.reject() == 40, errors
    assert review.session.store.count(reviews=["rejected"]) == 40

    # 3. Retrain: cancelled after the first epoch (in the worker, deterministic), resumed
    original = retrain_module.retrain

    def stop_after_first_epoch(request, cancel):
        generator = original(request, cancel)
        while True:
            try:
                record = next(generator)
            except StopIteration as stop:
                return stop.value
            if record.phase == "epoch" and not request.resume:
                cancel.set()
            yield record

    monkeypatch.setattr(retrain_module, "retrain", stop_after_first_epoch)
    widget = RetrainWidget(viewer, models_dir=models, runs_root=tmp_path / "runs")
    viewer.window.add_dock_widget(widget, name="Retrain")
    widget.image_combo.setCurrentText(slide.name)
    widget.model_combo.setCurrentText("mitosis-fcn")
    widget.epochs_spin.setValue(3)
    widget.patience_spin.setValue(0)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    widget.retrain_button.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    assert not errors, errors
    assert widget.last_result is not None and widget.last_result.cancelled
    assert len(widget.history) == 1 and widget.resume_button.isEnabled()
    assert "press Resume" in widget.status_label.text()
    widget.resume_button.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    timer.stop()
    assert not errors, errors
    result = widget.last_result
    assert result is not None and not result.cancelled
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert len(ticks) > 10  # the GUI kept processing events while torch trained
    # the live plot: the curves of all three epochs
    lines = [line for ax in widget.figure.axes for line in ax.get_lines()]
    assert lines and max(len(line.get_xdata()) for line in lines) == 3
    # the new version, selected, with its before/after on the validation items
    assert widget.version_combo.currentText() == "mitosis-fcn-v2"
    assert "registered mitosis-fcn-v2" in widget.status_label.text()
    assert "from mitosis-fcn 1.0" in widget.version_label.text()
    counts = result.counts
    assert counts["train_hard_negative"] + counts.get("val_hard_negative", 0) == 40

    # 4. compare with the parent (same validation items, numbers and a plot)
    widget.compare_button.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert not errors, errors
    assert set(widget.last_comparison["metrics"]) == {"mitosis-fcn 1.0", "mitosis-fcn-v2 2.0"}
    assert (result.run_dir / "compare_metrics.png").is_file()

    # 5. the new version on the visible region, through the Run model widget
    viewer.reset_view()
    assert widget.run_view_button.click() is None
    qtbot.waitUntil(
        lambda: (
            runner._worker is None
            and runner.result is not None
            and runner.result.spec.name == "mitosis-fcn-v2"
        ),
        timeout=120_000,
    )
    assert not errors, errors
    assert widget.runner is runner
    assert f"{slide.name} · mitosis-fcn-v2 · mitosis" in viewer.layers
