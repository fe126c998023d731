"""The review session without Qt: model outputs → store → editable layers → edits → store.

Layers are built without a viewer (or with a Qt-free ``ViewerModel``); edits are made
with napari's own layer methods (``add``, ``remove_selected``) or, for drags and vertex
edits, by changing the data and emitting the ``data`` event exactly as napari's mouse
bindings do (``action="changed"`` with the moved rows' ``data_indices``, once, on release).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from napari.layers import Image
from napari.layers.base._base_constants import ActionType

from napari_histo_ai._napari.annotations import (
    REVIEW_COLOURS,
    AnnotationSession,
    Placement,
    layer_to_annotations,
)
from napari_histo_ai._napari.results import object_layer
from napari_histo_ai.annotations.model import Annotation, ImageRef
from napari_histo_ai.annotations.store import AnnotationStore
from napari_histo_ai.errors import AnnotationError
from napari_histo_ai.inference.engine import Geometry
from napari_histo_ai.inference.objects import Objects
from napari_histo_ai.models.spec import ModelSpec

MPP = 0.5
SHAPE = (2000, 1600)


def detector_spec() -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": "tiny-mitosis",
            "task": "detection",
            "version": "3",
            "format": "builtin",
            "architecture": "tiny_fcn",
            "kwargs": {"in_channels": 3, "out_channels": 1, "width": 4, "depth": 2},
            "io": {"patch_size": 96, "halo": 4, "overlap": 8, "mpp": 1.0},
            "outputs": [
                {
                    "name": "mitoses",
                    "kind": "points",
                    "threshold": 0.5,
                    "classes": ["mitosis"],
                    "min_distance_um": 8,
                }
            ],
        },
        source="test",
    )


def model_points(coords: list[tuple[float, float]], scores: list[float]) -> tuple:
    """A Points layer exactly as the Run-model widget makes it (`object_layer`)."""
    from napari.layers import Points

    spec = detector_spec()
    objs = Objects(
        "points",
        np.asarray(coords, dtype=float).reshape(-1, 2),
        np.asarray(scores, dtype=float),
        np.zeros(len(coords), dtype=np.int64),
        ("mitosis",),
    )
    # a 1 µm/px model over a 0.5 µm/px slide: output pixel = 2 level-0 px
    geometry = Geometry(scale=(1.0, 1.0), translate=(0.25, 0.25), pixel=(2.0, 2.0), unit="um")
    data, kwargs, kind = object_layer(objs, spec, spec.outputs[0], geometry, image="slide.tif")
    assert kind == "points"
    return Points(data, **kwargs)


@pytest.fixture
def slide(tmp_path: Path):
    image = Image(
        np.zeros(SHAPE, np.uint8), scale=(MPP, MPP), units=("micrometer",) * 2, name="slide.tif"
    )
    ref = ImageRef(str(tmp_path / "slide.tif"), "", SHAPE, mpp=(MPP, MPP))
    store = AnnotationStore.create(tmp_path / "slide.annotations.sqlite", ref, classes=["mitosis"])
    session = AnnotationSession(image, store)
    yield session
    session.close()


def drag(layer, index: int, vertices, *, new_type=None) -> None:
    """Move a point / shape (or edit its vertices) as napari's mouse bindings do: the
    data, then one ``changed`` event (``new_type``: what napari's vertex removal turns
    a rectangle into)."""
    if layer._type_string == "points":
        layer.data[index] = vertices
    else:
        layer._data_view.edit(index, np.asarray(vertices, dtype=float), new_type=new_type)
    layer.events.data(
        value=layer.data,
        action=ActionType.CHANGED,
        data_indices=(index,),
        vertex_indices=((),),
    )


def world(layer, data) -> np.ndarray:
    return np.asarray(data, dtype=float) * layer.scale + layer.translate


def test_model_points_become_unreviewed_rows_once_and_sit_where_they_were(slide) -> None:
    source = model_points([(100.5, 200.5), (400.5, 300.5), (1500.5, 900.5)], [0.9, 0.6, 0.7])
    assert slide.make_editable(source) == 3
    store = slide.store
    rows = sorted(store.iter_all(), key=lambda a: a.id)
    assert [a.source for a in rows] == ["tiny-mitosis"] * 3
    assert {a.review for a in rows} == {"unreviewed"}
    assert [a.confidence for a in rows] == pytest.approx([0.9, 0.6, 0.7])
    np.testing.assert_allclose(rows[0].coords, [[100.5, 200.5]])
    assert rows[0].class_name == "mitosis"
    # the editable points lie on the model's points in the world (µm)
    points = slide.points_layer
    np.testing.assert_allclose(
        np.sort(world(points, points.data), axis=0),
        np.sort(world(source, source.data), axis=0),
        atol=1e-9,
    )
    assert list(points.features["review"]) == ["unreviewed"] * 3
    assert list(points.features["source"]) == ["tiny-mitosis"] * 3
    np.testing.assert_allclose(points.face_color, [REVIEW_COLOURS["unreviewed"]] * 3)
    assert not source.visible  # the editable layer replaces it
    # once per run: the same model output again is refused, and the store remembers it
    with pytest.raises(AnnotationError, match="already made editable"):
        slide.make_editable(source)
    assert len(store) == 3
    assert store.metadata["imported_runs"]
    # an undone import can be made again
    assert slide.undo().startswith("import") and len(store) == 0
    assert slide.make_editable(source) == 3


def test_edits_are_saved_at_once_and_undo_redo_them(slide) -> None:
    slide.make_editable(model_points([(100.5, 200.5), (400.5, 300.5)], [0.9, 0.6]))
    store, points = slide.store, slide.points_layer
    ids = list(points.features["annotation_id"])
    # move a model point: new coords, review "corrected"
    drag(points, 0, [110.0, 210.0])
    moved = store.get(int(ids[0]))
    np.testing.assert_allclose(moved.coords, [[110.0, 210.0]])
    assert moved.review == "corrected"
    assert points.features["review"][0] == "corrected"
    # delete a model point: kept in the store as rejected, hidden from the layer
    points.selected_data = {1}
    points.remove_selected()
    assert store.get(int(ids[1])).review == "rejected"
    assert len(points.data) == 1
    # add a point (as an add-mode click does): a human object of the current class
    points.add([700.5, 800.5])
    added = [a for a in store.iter_all() if a.source == "human"]
    assert len(added) == 1 and added[0].review == "added" and added[0].class_name == "mitosis"
    assert points.features["annotation_id"][1] == added[0].id
    np.testing.assert_allclose(points.face_color[1], REVIEW_COLOURS["added"])
    # delete the human point: gone from the store
    points.selected_data = {1}
    points.remove_selected()
    assert store.count(reviews=["added"]) == 0
    # undo the four edits, one by one, newest first
    assert slide.undo() is not None  # delete of the human point
    assert store.count(reviews=["added"]) == 1
    assert slide.undo() is not None  # add
    assert store.count(reviews=["added"]) == 0
    assert slide.undo() is not None  # reject
    assert store.get(int(ids[1])).review == "unreviewed" and len(points.data) == 2
    assert slide.undo() is not None  # move
    np.testing.assert_allclose(store.get(int(ids[0])).coords, [[100.5, 200.5]])
    assert slide.undo().startswith("import")
    assert len(points.data) == 0 and slide.undo() is None
    for _ in range(3):
        slide.redo()
    assert store.get(int(ids[1])).review == "rejected"
    assert store.get(int(ids[0])).review == "corrected"
    assert len(points.data) == 1


def test_accept_reject_relabel_and_the_review_queue(slide) -> None:
    slide.make_editable(model_points([(100.5, 200.5), (100.5, 1500.5), (1800.5, 100.5)], [0.9] * 3))
    store, points = slide.store, slide.points_layer
    with pytest.raises(AnnotationError, match="nothing is selected"):
        slide.accept_selected()
    # the queue goes region by region (1024 px squares, row-major)
    first = slide.next_unreviewed()
    assert first is not None
    np.testing.assert_allclose(first.coords, [[100.5, 200.5]])
    assert points.selected_data == {0}
    assert slide.accept_selected() == 1
    assert store.get(first.id).review == "accepted"
    second = slide.next_unreviewed()
    np.testing.assert_allclose(second.coords, [[100.5, 1500.5]])
    assert slide.reject_selected() == 1
    assert store.get(second.id).review == "rejected"
    third = slide.next_unreviewed()
    np.testing.assert_allclose(third.coords, [[1800.5, 100.5]])
    assert slide.set_class_selected("atypical mitosis") == 1
    relabelled = store.get(third.id)
    assert relabelled.class_name == "atypical mitosis" and relabelled.review == "corrected"
    assert "atypical mitosis" in store.classes
    assert slide.class_by_number(2) == "atypical mitosis"
    assert slide.next_unreviewed() is None
    assert slide.counts() == {
        "unreviewed": 0, "accepted": 1, "corrected": 1, "rejected": 1, "added": 0
    }  # fmt: skip


def test_lines_boxes_and_polygons_on_a_volume_slice_with_lengths_in_mm(tmp_path: Path) -> None:
    # a 20-slice MRI-like volume, 1 × 0.9 × 0.9 mm voxels
    image = Image(
        np.zeros((20, 240, 240), np.float32),
        scale=(1.0, 0.9, 0.9),
        units=("millimeter",) * 3,
        name="flair.nii.gz",
    )
    ref = ImageRef(str(tmp_path / "f.nii.gz"), "", (20, 240, 240), "ZYX", spacing_mm=(1, 0.9, 0.9))
    store = AnnotationStore.create(tmp_path / "f.sqlite", ref, classes=["tumour"])
    session = AnnotationSession(image, store)
    session.plane = (7,)
    shapes = session.shapes_layer
    shapes.add([[[7, 10, 10], [7, 10, 110]]], shape_type="line")
    (line,) = store.iter_all()
    assert line.kind == "line" and line.plane == (7,) and line.review == "added"
    np.testing.assert_allclose(line.coords, [[10, 10], [10, 110]])
    assert shapes.features["length_um"][0] == pytest.approx(90_000)  # 100 px × 0.9 mm
    assert shapes.features["length"][0] == "90.0 mm"
    shapes.add([[[7, 50, 50], [7, 50, 80], [7, 90, 80], [7, 90, 50]]], shape_type="rectangle")
    box = store.get(int(shapes.features["annotation_id"][1]))
    assert box.kind == "box"
    np.testing.assert_allclose(box.coords, [[50, 50], [90, 80]])
    # redraw the line's end: the same object, new geometry
    drag(shapes, 0, [[7, 10, 10], [7, 60, 130]])
    np.testing.assert_allclose(store.get(line.id).coords, [[10, 10], [60, 130]])
    # a box that lost a corner is a polygon now (napari turns it into one)
    from napari.layers.shapes._shapes_models import Polygon

    drag(shapes, 1, [[7, 50, 50], [7, 50, 80], [7, 90, 80]], new_type=Polygon)
    kinds = sorted(a.kind for a in store.iter_all())
    assert kinds == ["line", "polygon"]
    # objects of other slices are not in the layers
    session.plane = (8,)
    session.refresh()
    assert len(shapes.data) == 0
    session.plane = (7,)
    session.refresh()
    assert len(shapes.data) == 2
    session.close()


def test_the_viewport_limits_what_is_shown(tmp_path: Path) -> None:
    from napari.components import ViewerModel

    viewer = ViewerModel()
    image = viewer.add_image(
        np.zeros(SHAPE, np.uint8), scale=(MPP, MPP), units=("micrometer",) * 2, name="s"
    )
    ref = ImageRef(str(tmp_path / "s.tif"), "", SHAPE, mpp=(MPP, MPP))
    store = AnnotationStore.create(tmp_path / "s.sqlite", ref, classes=["mitosis"])
    rng = np.random.default_rng(0)
    coords = rng.uniform(1, 1599, size=(3000, 2))
    store.add(
        [Annotation("point", [c], "mitosis", source="m", review="unreviewed") for c in coords]
    )
    session = AnnotationSession(image, store, viewer=viewer, limit=500)
    assert session.points_layer in viewer.layers and session.shapes_layer in viewer.layers
    viewer.reset_view()
    session.refresh()
    assert session.truncated and session.shown == 500 and session.in_view == 3000
    # zoom on a 100 × 100 µm corner: only what is there
    camera = viewer.scene.camera
    camera.center = (50.0, 50.0)
    camera.zoom = min(viewer.canvas.size) / 100.0
    session.refresh()
    assert not session.truncated
    box, _plane = session.viewport()
    top, left, bottom, right = box
    # the visible 100 µm (200 px) around the centre, a margin, nothing far beyond
    assert top == left == 0 and min(bottom, right) >= 200 and max(bottom, right) < 400
    inside = (
        (coords[:, 0] >= top) & (coords[:, 0] <= bottom) & (coords[:, 1] >= left)
        & (coords[:, 1] <= right)
    )  # fmt: skip
    assert session.shown == inside.sum() > 0
    np.testing.assert_allclose(
        np.sort(session.points_layer.data, axis=0), np.sort(coords[inside], axis=0)
    )
    session.close()


def test_zoomed_out_views_show_a_subsample_of_the_shapes(tmp_path: Path) -> None:
    from napari.components import ViewerModel

    viewer = ViewerModel()
    image = viewer.add_image(
        np.zeros(SHAPE, np.uint8), scale=(MPP, MPP), units=("micrometer",) * 2, name="s"
    )
    ref = ImageRef(str(tmp_path / "s.tif"), "", SHAPE, mpp=(MPP, MPP))
    store = AnnotationStore.create(tmp_path / "s.sqlite", ref, classes=["tumour"])
    rng = np.random.default_rng(1)
    corners = rng.uniform(10, 1500, size=(300, 2))
    store.add(
        [Annotation("box", [c, c + 20], "tumour", source="m", review="unreviewed") for c in corners]
        + [Annotation("point", [c], "tumour", source="m") for c in corners[:50] + 5]
    )
    session = AnnotationSession(image, store, viewer=viewer, limit=1000, shapes_limit=40)
    viewer.reset_view()
    session.refresh()
    # every point, 40 of the 300 boxes spread over the image, and "zoom in" is said
    assert len(session.points_layer.data) == 50 and len(session.shapes_layer.data) == 40
    assert session.truncated and session.shown == 90 and session.in_view == 350
    tops = np.asarray([np.asarray(v)[:, 0].min() for v in session.shapes_layer.data])
    assert tops.min() < 400 and tops.max() > 1100  # not one corner of the slide
    ids = set(session.shapes_layer.features["annotation_id"].astype(int))
    assert len(ids) == 40 and ids <= {a.id for a in store.iter_all() if a.kind == "box"}
    session.close()


def test_a_reopened_store_shows_everything(tmp_path: Path) -> None:
    image = Image(np.zeros(SHAPE, np.uint8), scale=(MPP, MPP), units=("micrometer",) * 2)
    path = tmp_path / "s.sqlite"
    ref = ImageRef(str(tmp_path / "s.tif"), "", SHAPE, mpp=(MPP, MPP))
    session = AnnotationSession(image, AnnotationStore.create(path, ref, classes=["mitosis"]))
    session.make_editable(model_points([(100.5, 200.5), (400.5, 300.5)], [0.9, 0.6]))
    drag(session.points_layer, 0, [120.0, 220.0])
    session.points_layer.add([900.5, 900.5])
    session.close()
    again = AnnotationSession.open(image, path=path)
    points = again.points_layer
    assert sorted(points.features["review"]) == ["added", "corrected", "unreviewed"]
    assert [120.0, 220.0] in points.data.tolist()
    assert again.store.can_undo  # the history survives too
    again.close()


def test_the_paint_window_writes_back_and_undoes(slide, tmp_path: Path) -> None:
    from napari_histo_ai.annotations.labels import LabelPyramid

    slide.open_labels(tmp_path / "slide.labels.zarr")
    assert slide.labels_layer is not None and not slide.labels_layer.editable
    box = slide.edit_labels_here(size=512)
    assert box == (744, 544, 1256, 1056)  # centred on the image (no viewer)
    window = slide.label_window_layer
    # the window sits on its pixels: its corner at the world position of pixel (744, 544)
    assert tuple(window.translate) == pytest.approx((744 * MPP, 544 * MPP))
    window.brush_size = 9
    # one stroke, as napari's paint mouse binding makes it: the history is held while
    # the mouse moves and committed on release -> one paint event after the pixels
    with window.block_history():
        window.paint((100, 200), 1)
    reopened = LabelPyramid.open(tmp_path / "slide.labels.zarr")
    patch = reopened.read_window((744 + 90, 544 + 190, 744 + 111, 544 + 211))
    assert patch.max() == 1 and patch[10, 10] == 1
    # the lower levels were rebuilt where it changed
    assert np.asarray(reopened.levels()[1][(744 + 100) // 2, (544 + 200) // 2]) == 1
    assert slide.undo_labels() is not None
    assert np.asarray(window.data).max() == 0
    assert LabelPyramid.open(tmp_path / "slide.labels.zarr").read_window(box).max() == 0
    assert slide.redo_labels() is not None
    assert np.asarray(window.data).max() == 1


def test_a_model_layer_converts_with_its_own_placement() -> None:
    source = model_points([(10.5, 20.5)], [0.5])
    placement = Placement((), (), (MPP, MPP), (0.0, 0.0), ("micrometer",) * 2)
    (ann,) = layer_to_annotations(source, placement, source="m")
    np.testing.assert_allclose(ann.coords, [[10.5, 20.5]])
    assert ann.confidence == pytest.approx(0.5) and ann.review == "unreviewed"


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    # no shrinking: napari layers make each example slow to replay; a failure still
    # prints its example
    phases=[Phase.reuse, Phase.generate],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["point", "line", "box", "polygon"]),
            st.lists(st.tuples(st.floats(1, 1999), st.floats(1, 1599)), min_size=4, max_size=6),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_store_to_layers_and_back_keeps_geometry(slide, objects) -> None:
    anns = []
    for kind, vertices in objects:
        v = np.asarray(vertices)
        if kind == "point":
            v = v[:1]
        elif kind == "line":
            v = v[:2]
        elif kind == "box":
            v = np.stack([v.min(axis=0), v.max(axis=0)])
            if (v[1] - v[0]).min() < 1:
                continue
        anns.append(Annotation(kind, v, "mitosis", source="m", review="unreviewed"))
    if not anns:
        return
    ids = slide.store.add(anns)
    slide.refresh()
    # read back as an edit reads the layers (a self-crossing polygon napari cannot fill
    # is shown as its closed outline and still read as a polygon)
    by_id = {}
    for which, layer in (("points", slide.points_layer), ("shapes", slide.shapes_layer)):
        for i, id_ in enumerate(layer.features["annotation_id"]):
            by_id[int(id_)] = slide._layer_vertices(which, i)
    for id_, ann in zip(ids, anns, strict=True):
        kind, coords, _plane = by_id[id_]
        assert kind == ann.kind
        # shapes hold float32 vertices: well under a thousandth of a pixel off on a slide
        np.testing.assert_allclose(coords, ann.coords, atol=1e-3)
    slide.store.delete(ids)


def test_writers_export_review_layers_and_foreign_layers(slide, tmp_path: Path) -> None:
    from napari.layers import Points

    from napari_histo_ai._napari.writers import (
        write_points_csv,
        write_points_geojson,
        write_shapes_geojson,
    )

    slide.make_editable(model_points([(100.5, 200.5), (400.5, 300.5)], [0.9, 0.6]))
    points = slide.points_layer
    points.selected_data = {1}
    slide.reject_selected()
    data, meta, _ = points.as_layer_data_tuple()
    (out,) = write_points_geojson(str(tmp_path / "review"), data, meta)
    record = json.loads(Path(out).read_text())
    assert out.endswith(".geojson")
    # the whole store, rejected objects marked (hard negatives)
    reviews = sorted(f["properties"]["histo_ai"]["review"] for f in record["features"])
    assert reviews == ["rejected", "unreviewed"]
    assert record["properties"]["histo_ai"]["mpp"] == [MPP, MPP]
    # shapes: a line drawn on the review layer, its length in µm as a measurement
    slide.shapes_layer.add([[[10, 10], [10, 110]]], shape_type="line")
    data, meta, _ = slide.shapes_layer.as_layer_data_tuple()
    (out,) = write_shapes_geojson(str(tmp_path / "lines.geojson"), data, meta)
    (feature,) = json.loads(Path(out).read_text())["features"]
    assert feature["geometry"]["type"] == "LineString"
    assert feature["properties"]["measurements"]["length_um"] == pytest.approx(50.0)
    # a hand-made layer with no image reference: pixels as they are, mpp null
    plain = Points([[5.0, 6.0]], features={"class": ["cell"]})
    data, meta, _ = plain.as_layer_data_tuple()
    files = write_points_csv(str(tmp_path / "plain.csv"), data, meta)
    assert files[0].endswith("plain.csv")
    lines = Path(files[0]).read_text().splitlines()
    assert lines[1].split(",")[:3] == ["6.0", "5.0", "cell"]
    assert json.loads(Path(files[0] + ".json").read_text())["mpp"] is None


def test_an_exported_file_is_made_editable_once(slide, tmp_path: Path) -> None:
    slide.make_editable(model_points([(100.5, 200.5), (400.5, 300.5)], [0.9, 0.6]))
    slide.points_layer.add([900.5, 900.5])
    out = slide.export(tmp_path / "all.geojson")
    image = Image(np.zeros(SHAPE, np.uint8), scale=(MPP, MPP), units=("micrometer",) * 2)
    store = AnnotationStore.create(tmp_path / "other.sqlite", slide.store.image)
    other = AnnotationSession(image, store)
    assert other.make_editable(out) == 3
    rows = sorted(store.iter_all(), key=lambda a: a.coords[0, 0])
    assert [(a.source, a.review) for a in rows] == [
        ("tiny-mitosis", "unreviewed"), ("tiny-mitosis", "unreviewed"), ("human", "added")
    ]  # fmt: skip
    assert rows[0].confidence == pytest.approx(0.9)
    assert other.make_editable(out) == 0  # already in the store
    other.close()


def test_an_edit_the_store_refuses_is_reported_and_undone_on_the_layer(slide) -> None:
    slide.make_editable(model_points([(100.5, 200.5)], [0.9]))
    errors: list[BaseException] = []
    slide.on_error.append(errors.append)
    points = slide.points_layer
    points.add([-500.0, 50.0])  # outside the slide
    assert len(errors) == 1 and isinstance(errors[0], AnnotationError)
    assert "outside the image" in str(errors[0])
    assert len(slide.store) == 1 and len(points.data) == 1  # the layer shows the store again
    drag(points, 0, [150.0, 250.0])  # and editing goes on
    np.testing.assert_allclose(
        slide.store.get(int(points.features["annotation_id"][0])).coords, [[150.0, 250.0]]
    )


def test_each_user_action_is_one_undo_step(slide) -> None:
    """Reject, relabel and Delete of a selection mixing model and human objects, and a
    box redrawn as a polygon, are each one store operation: one Ctrl+Z undoes all."""
    from napari.layers.shapes._shapes_models import Polygon

    slide.make_editable(model_points([(100.5, 200.5), (400.5, 300.5)], [0.9, 0.6]))
    store, points = slide.store, slide.points_layer
    points.add([700.5, 800.5])  # a human point
    model_id, human_id = (
        int(points.features["annotation_id"][0]),
        int(points.features["annotation_id"][2]),
    )
    ops = len(store.history())
    points.selected_data = {0, 2}
    assert slide.reject_selected() == 2
    assert len(store.history()) == ops + 1
    assert store.get(model_id).review == "rejected" and store.count(reviews=["added"]) == 0
    assert slide.undo() == "reject 1, delete 1"
    assert store.get(model_id).review == "unreviewed" and store.get(human_id).review == "added"
    assert len(points.data) == 3
    # relabel both: the model point becomes "corrected", one undo restores both classes
    points.selected_data = {0, 2}
    assert slide.set_class_selected("mimic") == 2
    assert {store.get(model_id).review, store.get(human_id).class_name} == {"corrected", "mimic"}
    assert slide.undo() == "class mimic"
    assert store.get(model_id).class_name == store.get(human_id).class_name == "mitosis"
    assert store.get(model_id).review == "unreviewed"
    # the Delete key on both
    points.selected_data = {0, 2}
    points.remove_selected()
    assert store.get(model_id).review == "rejected" and store.count(reviews=["added"]) == 0
    assert slide.undo() == "reject 1, delete 1" and len(points.data) == 3
    # a box that lost a corner: the same object, now a polygon; one undo makes it a box
    shapes = slide.shapes_layer
    shapes.add([[[50, 50], [50, 80], [90, 80], [90, 50]]], shape_type="rectangle")
    box_id = int(shapes.features["annotation_id"][0])
    ops = len(store.history())
    drag(shapes, 0, [[50, 50], [50, 80], [90, 80]], new_type=Polygon)
    assert len(store.history()) == ops + 1
    polygon = store.get(box_id)
    assert polygon.kind == "polygon" and int(shapes.features["annotation_id"][0]) == box_id
    np.testing.assert_allclose(polygon.coords, [[50, 50], [50, 80], [90, 80]], atol=1e-3)
    assert slide.undo() == "as polygon"
    assert store.get(box_id).kind == "box" and shapes.shape_type == ["rectangle"]
    np.testing.assert_allclose(store.get(box_id).coords, [[50, 50], [90, 80]])
    assert store.integrity_check() == "ok"


def _layer_matches_store(session) -> None:
    """Every row of both layers shows its store object: geometry, features, colour."""
    store = session.store
    for which, layer in (("points", session.points_layer), ("shapes", session.shapes_layer)):
        ids = [int(i) for i in layer.features["annotation_id"]]
        assert len(ids) == len(layer.data) == len(set(ids))
        colours = layer.face_color if which == "points" else layer.edge_color
        for i, id_ in enumerate(ids):
            ann = store.get(id_)
            kind, coords, _plane = session._layer_vertices(which, i)
            assert kind == ann.kind
            np.testing.assert_allclose(coords, ann.coords, atol=1e-3)
            row = layer.features.iloc[i]
            assert (row["class"], row["review"], row["source"]) == (
                ann.class_name,
                ann.review,
                ann.source,
            )
            want = np.nan if ann.confidence is None else ann.confidence
            np.testing.assert_allclose(row["confidence"], want)
            np.testing.assert_allclose(colours[i], REVIEW_COLOURS[ann.review])
            if ann.kind == "line":
                assert row["length_um"] == pytest.approx(ann.length_um((MPP, MPP)))
                assert row["length"] == f"{ann.length_um((MPP, MPP)):.1f} µm"


def test_reloaded_rows_map_every_edit_back_to_its_id(slide) -> None:
    """A reload keeps columns, not Annotations: drags, removals and additions in any
    order still reach the right store objects, and the features stay aligned."""
    rng = np.random.default_rng(3)
    store = slide.store
    store.add_class("mimic")
    anns = [
        Annotation(
            "point",
            [rng.uniform(1, 1599, 2)],
            ["mitosis", "mimic"][k % 2],
            source="m" if k % 3 else "human",
            confidence=0.5 if k % 3 else None,
            review=["unreviewed", "accepted", "added"][k % 3],
        )
        for k in range(30)
    ]
    anns += [
        Annotation("line", [[10, 10 + k], [40, 90 + k]], "mitosis", review="added")
        for k in range(3)
    ]
    store.add(anns)
    slide.refresh()
    points = slide.points_layer
    assert len(points.data) == 30 and len(slide.shapes_layer.data) == 3
    _layer_matches_store(slide)
    before = [int(i) for i in points.features["annotation_id"]]
    drag(points, 5, [300.0, 400.0])
    np.testing.assert_allclose(store.get(before[5]).coords, [[300.0, 400.0]])
    drag(points, 12, [310.0, 410.0])  # an edited row that stays, moving up by 3 rows
    points.selected_data = {2, 5, 9}
    points.remove_selected()
    left = [i for k, i in enumerate(before) if k not in (2, 5, 9)]
    assert [int(i) for i in points.features["annotation_id"]] == left
    _layer_matches_store(slide)
    np.testing.assert_allclose(points.data[9], [310.0, 410.0])
    drag(points, 5, [500.0, 600.0])  # old row 7
    np.testing.assert_allclose(store.get(before[7]).coords, [[500.0, 600.0]])
    points.add([700.5, 800.5])
    new_id = int(points.features["annotation_id"].iloc[-1])
    assert store.get(new_id).review == "added"
    points.selected_data = {0, len(points.data) - 1}  # a reloaded row and the new one
    assert slide.reject_selected() == 2
    with pytest.raises(AnnotationError, match="does not exist"):
        store.get(new_id)
    _layer_matches_store(slide)
    points.selected_data = {3, 4}
    assert slide.accept_selected() + slide.set_class_selected("mimic") >= 1
    _layer_matches_store(slide)
    slide.undo()
    _layer_matches_store(slide)


def test_a_reload_keeps_the_unchanged_shapes_and_shows_the_store(slide) -> None:
    """A reload after edits and undos re-adds only the shapes whose geometry changed
    (napari triangulates every shape it is given); the layer still shows the store."""
    store, shapes = slide.store, slide.shapes_layer
    anns = [
        Annotation("box", [[10, 10], [50, 80]], "mitosis", source="m", review="unreviewed"),
        Annotation("polygon", [[100, 100], [100, 160], [150, 130]], "mitosis"),
        Annotation("line", [[200, 10], [260, 90]], "mitosis", source="m", review="unreviewed"),
        # self-crossing: napari shows its closed outline
        Annotation("polygon", [[300, 300], [360, 360], [300, 360], [360, 300]], "mitosis"),
        Annotation("polyline", [[400, 10], [420, 50], [400, 90]], "mitosis"),
    ]
    ids = store.add(anns)
    slide.refresh()
    _layer_matches_store(slide)

    def shown() -> dict[int, object]:
        return dict(
            zip(
                (int(i) for i in shapes.features["annotation_id"]),
                shapes._data_view.shapes,
                strict=True,
            )
        )

    before = shown()
    store.update(ids[0], coords=[[12, 12], [55, 85]], review="corrected")
    store.update(ids[2], review="accepted")  # a colour change only
    store.delete(ids[4])
    (new,) = store.add([Annotation("line", [[500, 10], [500, 60]], "mitosis")])
    slide.refresh()
    _layer_matches_store(slide)
    after = shown()
    assert set(after) == {ids[0], ids[1], ids[2], ids[3], new}
    for id_ in (ids[1], ids[2], ids[3]):  # unchanged geometry: the same napari shapes
        assert after[id_] is before[id_]
    assert after[ids[0]] is not before[ids[0]]
    # undo and a drag on the layer, then reloads: still the store's state
    assert slide.undo() is not None and slide.undo() is not None
    _layer_matches_store(slide)
    row = [int(i) for i in shapes.features["annotation_id"]].index(ids[1])
    drag(shapes, row, [[100, 100], [100, 170], [150, 130]])
    slide.refresh()
    _layer_matches_store(slide)
    np.testing.assert_allclose(store.get(ids[1]).coords, [[100, 100], [100, 170], [150, 130]])
    shapes.selected_data = {row}
    assert slide.reject_selected() == 1
    _layer_matches_store(slide)
    assert ids[1] not in shown()
