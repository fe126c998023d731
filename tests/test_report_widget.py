"""The "Generate report" dock widget in a real viewer: the issue's "Done when" for reports.

A pathologist opens the sample slide, runs mitosis-fcn (Run model), rejects false
mitoses in Review & correct, and presses Generate report: the viewer's run and the
corrections go into the report with two more models run in the worker, and the widget
shows the plain-language summary, the thumbnail and the written HTML / PDF.
"""

from __future__ import annotations

import json
import shutil

import pytest
from qtpy.QtCore import QTimer

from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai.models.registry import load_registry

from .test_review_widget import errors, open_in  # noqa: F401  (errors is a fixture)

pytestmark = pytest.mark.gui


def test_run_correct_and_report_in_napari(make_napari_viewer, qtbot, tmp_path, errors):  # noqa: F811
    from napari_histo_ai.widgets.report_widget import ReportWidget
    from napari_histo_ai.widgets.review_widget import ReviewWidget
    from napari_histo_ai.widgets.run_widget import RunModelWidget

    slide_path = tmp_path / "CMU-1-Small-Region.svs"
    shutil.copyfile(sample_path(), slide_path)
    registry = load_registry(user_dir=tmp_path / "models")
    viewer = make_napari_viewer()
    slide = open_in(viewer, slide_path)

    runner = RunModelWidget(viewer, registry=registry, run_root=tmp_path / "runs")
    viewer.window.add_dock_widget(runner, name="Run model")
    runner.model_combo.setCurrentText("mitosis-fcn")
    runner.region_combo.setCurrentText("Whole image")
    assert runner.run() is not None
    qtbot.waitUntil(lambda: runner._worker is None, timeout=120_000)
    points = runner.result_layers[f"{slide.name} · mitosis-fcn · mitoses"]
    n_model = len(points.data)
    assert n_model > 100

    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(review, name="Review & correct")
    review.image_combo.setCurrentText(slide.name)
    review.source_combo.setCurrentText(points.name)
    assert review.make_editable() == n_model, errors
    review.session.points_layer.selected_data = set(range(40))
    assert review.reject() == 40, errors

    widget = ReportWidget(viewer, registry=registry, out_dir=tmp_path / "reports")
    viewer.window.add_dock_widget(widget, name="Generate report")
    widget.image_combo.setCurrentText(slide.name)
    # the default panel of an H&E slide is checked; keep two fast models besides the run
    assert {"mitosis-fcn", "idc-tumour", "breakhis-resnet"} <= set(widget.models())
    widget.set_models(["idc-tumour", "magnification-shallownet"])
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    assert widget.generate() is not None, errors
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    timer.stop()
    assert not errors, errors
    assert len(ticks) > 10  # the viewer kept processing events while the models ran

    result = widget.last_result
    assert result is not None and not result.cancelled
    assert {"html", "pdf", "json", "thumbnail"} <= set(result.files)
    assert all(path.is_file() for path in result.files.values())
    (section,) = result.report.slides
    used = {m.name for m in section.models}
    assert used == {"mitosis-fcn", "idc-tumour", "magnification-shallownet"}
    # the corrections replace the raw detections: the rejected 40 are not counted
    mitosis = section.measure("mitosis")
    assert mitosis is not None and mitosis.values["count"] == n_model - 40
    assert section.measure("tumour") is not None
    assert section.measure("magnification") is not None
    saved = json.loads(result.files["json"].read_text(encoding="utf-8"))
    assert saved["slides"][0]["name"] == slide_path.name
    # what the widget shows: the summary, the thumbnail, buttons to open the files
    assert "mitos" in widget.summary.toPlainText().lower()
    assert widget.thumbnail.pixmap() is not None and not widget.thumbnail.pixmap().isNull()
    assert widget.open_html_button.isEnabled() and widget.open_pdf_button.isEnabled()
    assert "report.html" in widget.status_label.text()


def test_nothing_to_report_is_one_message(make_napari_viewer, tmp_path, errors):  # noqa: F811
    from napari_histo_ai.widgets.report_widget import ReportWidget

    viewer = make_napari_viewer()
    widget = ReportWidget(viewer, registry=load_registry(user_dir=tmp_path), out_dir=tmp_path)
    assert widget.generate() is None
    assert errors == ["no image to report on: open a slide first"]
    slide = open_in(viewer, sample_path())
    widget.image_combo.setCurrentText(slide.name)
    widget.set_models([])
    widget.viewer_runs_check.setChecked(False)
    assert widget.generate() is None
    assert "check at least one model" in errors[-1]
    widget.set_models(["idc-tumour"])
    widget.html_check.setChecked(False)
    widget.pdf_check.setChecked(False)
    assert widget.generate() is None
    assert errors[-1] == "choose HTML, PDF or both"
