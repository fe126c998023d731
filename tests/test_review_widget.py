"""The "Review & correct" dock widget in a real viewer, as an annotator uses it.

The issue's "Done when": correct a model's mitosis points on the sample slide (move one,
reject one, add one), undo and redo, close and reopen with nothing lost, export a QuPath
GeoJSON and a training set; draw a longest-diameter line on a BraTS slice (mm) and a
mass box on a mini-MIAS film. The model points are the layer the Run-model widget makes
(`object_layer`); keys are pressed through the layers' key maps (what napari's key
dispatch calls).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from napari.layers.base._base_constants import ActionType

from napari_histo_ai._napari.layers import add_layer_data, pyramid_to_layer_data
from napari_histo_ai._napari.results import object_layer
from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai.annotations.store import AnnotationStore
from napari_histo_ai.inference.engine import Geometry
from napari_histo_ai.inference.objects import Objects
from napari_histo_ai.io import open_image
from napari_histo_ai.models.spec import ModelSpec

from .conftest import real

pytestmark = pytest.mark.gui

FLAIR = "brats2015_mri/validation/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"
MITOSES = [(400.5, 300.5), (900.5, 1200.5), (1500.5, 700.5), (2500.5, 1800.5)]


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    return shown


def press(layer, key: str) -> None:
    """A key press on a layer, as napari dispatches it (the layer's own key map first)."""
    from app_model.types import KeyBinding

    layer.keymap[KeyBinding.from_str(key)](layer)


def drag(layer, index: int, position) -> None:
    """A point dragged in select mode: the data, then one "changed" event on release."""
    layer.data[index] = position
    layer.events.data(
        value=layer.data, action=ActionType.CHANGED, data_indices=(index,), vertex_indices=((),)
    )


def open_in(viewer, path: Path):
    (layer,) = add_layer_data(viewer, pyramid_to_layer_data(open_image(path)))
    return layer


def mitosis_layer(viewer, image_name: str, mpp: float):
    """The Points layer the Run-model widget shows for a mitosis detector's output."""
    spec = ModelSpec.from_dict(
        {
            "name": "mitosis-fcn",
            "task": "detection",
            "version": "2",
            "format": "builtin",
            "architecture": "tiny_fcn",
            "kwargs": {"in_channels": 3, "out_channels": 1, "width": 4, "depth": 2},
            "io": {"patch_size": 96, "halo": 4, "overlap": 8, "mpp": 1.0},
            "outputs": [
                {"name": "mitoses", "kind": "points", "classes": ["mitosis"], "threshold": 0.5}
            ],
        },
        source="test",
    )
    objs = Objects(
        "points",
        np.asarray(MITOSES),
        np.asarray([0.9, 0.8, 0.7, 0.6]),
        np.zeros(4, dtype=np.int64),
        ("mitosis",),
    )
    pixel = 1.0 / mpp
    geometry = Geometry((1.0, 1.0), (0.0, 0.0), (pixel, pixel), "um")
    data, kwargs, _ = object_layer(objs, spec, spec.outputs[0], geometry, image=image_name)
    return viewer.add_points(data, **kwargs)


def test_correct_model_mitoses_undo_redo_reopen_and_export(
    make_napari_viewer, qtbot, tmp_path, errors
):
    from napari_histo_ai.annotations.training_set import read_manifest
    from napari_histo_ai.widgets.review_widget import ReviewWidget

    viewer = make_napari_viewer()
    slide = open_in(viewer, sample_path())
    model = mitosis_layer(viewer, slide.name, mpp=float(slide.scale[-1]))
    widget = ReviewWidget(viewer, store_root=tmp_path)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(slide.name)
    widget.source_combo.setCurrentText(model.name)
    assert widget.make_editable() == 4, errors
    session = widget.session
    points, store = session.points_layer, session.store
    assert points in viewer.layers and not model.visible
    assert "unreviewed: 4" in widget.counts_label.text()
    assert widget.class_combo.currentText() == "mitosis"
    # the editable points lie on the model's points (world µm)
    np.testing.assert_allclose(
        np.sort(points.data * points.scale + points.translate, axis=0),
        np.sort(model.data * model.scale + model.translate, axis=0),
    )
    # N selects the first of the review queue, A accepts it
    press(points, "N")
    assert len(points.selected_data) == 1
    press(points, "A")
    assert "accepted: 1" in widget.counts_label.text()
    # N zoomed in on it (level of detail: only what is in view is loaded); zoom out
    assert len(points.data) < 4
    viewer.reset_view()
    widget.refresh_view()
    assert len(points.data) == 4
    # move one, reject one (R), add one
    order = list(points.features["annotation_id"])
    moved_id = int(order[1])
    drag(points, 1, [905.0, 1210.0])
    rejected_id = int(order[2])
    points.selected_data = {2}
    press(points, "R")
    points.add([1200.5, 1500.5])
    assert not errors, errors
    assert store.get(moved_id).review == "corrected"
    assert store.get(rejected_id).review == "rejected"
    assert widget.status_label.text().startswith("saved ")
    counts = widget.counts_label.text()
    assert "corrected: 1" in counts and "rejected: 1" in counts and "added: 1" in counts
    # undo the add and the reject, redo the reject
    press(points, "Ctrl+Z")
    press(points, "Ctrl+Z")
    assert store.count(reviews=["added"]) == 0
    assert store.get(rejected_id).review == "unreviewed"
    press(points, "Ctrl+Shift+Z")
    assert store.get(rejected_id).review == "rejected"
    press(points, "Ctrl+Y")
    assert store.count(reviews=["added"]) == 1
    # QuPath GeoJSON: every object, the rejected one marked as a hard negative
    widget.format_combo.setCurrentText("QuPath GeoJSON (.geojson)")
    widget.export_path.setText(str(tmp_path / "mitoses.geojson"))
    out = widget.export()
    record = json.loads(Path(out).read_text())
    reviews = sorted(f["properties"]["histo_ai"]["review"] for f in record["features"])
    assert reviews == ["accepted", "added", "corrected", "rejected", "unreviewed"]
    # napari's File > Save Selected Layer(s) with our writer: the whole store too
    viewer.layers.selection = {points}
    saved = str(tmp_path / "saved.geojson")
    assert viewer.layers.save(saved, selected=True, plugin="napari-histo-ai") == [saved]
    assert len(json.loads(Path(saved).read_text())["features"]) == 5
    # training set, in a worker
    widget.mpp_spin.setValue(0.5)
    widget.patch_spin.setValue(64)
    widget.training_dir.setText(str(tmp_path / "training"))
    assert widget.export_training_set() is not None, errors
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert not errors, errors
    manifest = read_manifest(tmp_path / "training" / "manifest.json")
    kinds = {s.kind for s in manifest.samples}
    assert {"positive", "hard_negative"} <= kinds, kinds
    assert "training set done" in widget.status_label.text()
    # close napari's review (the store file stays), open the slide again: all there
    store_path = store.path
    widget._close_session()
    assert points not in viewer.layers
    again = make_napari_viewer()
    slide2 = open_in(again, sample_path())
    widget2 = ReviewWidget(again, store_root=tmp_path)
    again.window.add_dock_widget(widget2)
    widget2.image_combo.setCurrentText(slide2.name)
    session2 = widget2.open_session()
    assert session2 is not None and session2.store.path == store_path
    assert sorted(session2.points_layer.features["review"]) == [
        "accepted",
        "added",
        "corrected",
        "unreviewed",
    ]
    assert [905.0, 1210.0] in session2.points_layer.data.tolist()
    assert "rejected: 1" in widget2.counts_label.text()
    assert session2.store.can_undo


def test_a_line_on_a_brats_slice_and_a_box_on_a_mias_film(
    make_napari_viewer, qtbot, tmp_path, errors
):
    from napari_histo_ai.widgets.review_widget import ReviewWidget

    viewer = make_napari_viewer()
    flair = open_in(viewer, real(FLAIR))
    viewer.dims.set_point(0, 80.0)  # slice 80 (1 mm slices)
    widget = ReviewWidget(viewer, store_root=tmp_path)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(flair.name)
    session = widget.open_session()
    assert session is not None, errors
    widget.class_edit.setText("tumour")
    widget.add_class()
    widget.refresh_view()
    assert session.plane == (80,)
    shapes = session.shapes_layer
    # the longest diameter, drawn on the slice: 30 px at 1 mm/px = 30 mm
    shapes.add([[[80, 100, 100], [80, 118, 124]]], shape_type="line")
    (line,) = session.store.iter_all()
    assert (line.kind, line.plane, line.class_name) == ("line", (80,), "tumour")
    assert shapes.features["length"][0] == "30.0 mm"
    assert shapes.features["length_um"][0] == pytest.approx(30_000)
    # the line stays on its slice
    viewer.dims.set_point(0, 81.0)
    widget.refresh_view()
    assert len(shapes.data) == 0
    viewer.dims.set_point(0, 80.0)
    widget.refresh_view()
    assert len(shapes.data) == 1
    # paint the tumour on this slice: the window is the whole 240 × 240 slice at z = 80
    box = widget.edit_labels_here()
    window = session.label_window_layer
    assert box == (0, 0, 240, 240) and window.data.shape == (1, 240, 240)
    assert window.translate[0] == pytest.approx(80.0)
    window.brush_size = 5
    with window.block_history():  # one stroke, as the paint brush makes it
        window.paint((0, 120, 120), 1)
    labels = session.label_pyramid
    # written back by the widget's debounce timer, only on slice 80
    qtbot.waitUntil(lambda: labels.read_window(box, plane=(80,)).max() == 1, timeout=10_000)
    assert labels.read_window(box, plane=(79,)).max() == 0
    press(window, "Ctrl+Z")
    assert labels.read_window(box, plane=(80,)).max() == 0 and window.data.max() == 0

    film = open_in(viewer, real("mini_mias/mdb001.pgm"))
    viewer.reset_view()  # frame the film (only what is in view is loaded)
    widget.image_combo.setCurrentText(film.name)
    session = widget.open_session()
    assert session is not None and session.image_layer is film, errors
    # the film's truth from Info.txt, through the Import button (one undo step)
    widget.import_path.setText(str(real("mini_mias/Info.txt")))
    assert widget.import_file() == 1, errors
    (truth,) = session.store.iter_all()
    assert truth.kind == "box" and truth.class_name == "CIRC"
    boxes = session.shapes_layer
    assert len(boxes.data) == 1
    boxes.add([[[500, 400], [500, 520], [640, 520], [640, 400]]], shape_type="rectangle")
    box = max(session.store.iter_all(), key=lambda a: a.id)
    assert box.kind == "box" and box.review == "added"
    # a box off the film is refused with a notification, not a traceback
    boxes.add([[[-50, -50], [-50, -10], [-10, -10], [-10, -50]]], shape_type="rectangle")
    assert len(errors) == 1 and errors[0].startswith("edit not saved") and "outside" in errors[0]
    assert len(boxes.data) == 2 and session.store.count() == 2
    errors.clear()
    np.testing.assert_allclose(box.coords, [[500, 400], [640, 520]])
    widget.format_combo.setCurrentText("COCO JSON (.json)")
    widget.export_path.setText(str(tmp_path / "film.coco.json"))
    out = widget.export()
    assert out is not None and not errors, errors
    coco = json.loads(Path(out).read_text())
    assert len(coco["annotations"]) == 2
    # the first image's store is closed and kept
    assert AnnotationStore.open(tmp_path / f"{Path(FLAIR).name}.annotations.sqlite").count() == 1
