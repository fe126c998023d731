"""Annotation import / export formats: QuPath GeoJSON (and the engine's GeoJSON), CSV
points, COCO JSON with RLE masks, the mini-MIAS Info.txt; round trips, real files, bad
input and crash safety."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_histo_ai.annotations.formats import (
    FORMATS,
    detect_format,
    export_annotations,
    export_coco,
    export_csv_points,
    export_geojson,
    export_mias,
    import_annotations,
    import_coco,
    import_csv_points,
    import_geojson,
    import_mias,
    mask_to_rle,
    rle_to_mask,
    sniff_format,
)
from napari_histo_ai.annotations.formats.coco import rle_from_string, rle_to_string
from napari_histo_ai.annotations.formats.csv_points import sidecar_path
from napari_histo_ai.annotations.model import HUMAN, Annotation, ImageRef
from napari_histo_ai.errors import AnnotationError, HistoAIError

from .conftest import real

H, W = 600, 800
IMAGE = ImageRef(
    path="/data/slides/slide-1.svs", content_hash="sha256:feed", shape=(H, W), mpp=(0.25, 0.25)
)
VOLUME = ImageRef(
    path="/data/mri/case.nii.gz",
    content_hash="sha256:beef",
    shape=(5, H, W),
    axes="ZYX",
    spacing_mm=(2.0, 0.5, 0.5),
)
FILM_IMAGE = ImageRef(path="/data/mini_mias/mdb001.pgm", content_hash="", shape=(1024, 1024))
CLASSES = ("mitosis", "tumour", "mass", "stroma, other")
HYPO = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

coord = st.floats(min_value=0, max_value=1, allow_nan=False)


@st.composite
def annotations(draw: Any, kinds: tuple[str, ...], image: ImageRef = IMAGE) -> Annotation:
    kind = draw(st.sampled_from(kinds))
    h, w = image.shape[-2:]
    n = {"point": 1, "line": 2, "box": 2}.get(kind) or draw(
        st.integers(2 if kind == "polyline" else 3, 7)
    )
    pts = np.array([[draw(coord) * h, draw(coord) * w] for _ in range(n)])
    if kind == "box":
        lo = pts.min(axis=0)
        pts = np.stack([lo, lo + 1 + pts.max(axis=0) - lo])
        pts = np.minimum(pts, [h, w])
        pts[0] = np.minimum(pts[0], pts[1] - 0.5)
    model = draw(st.booleans())
    source = "mitosis-net" if model else HUMAN
    review = draw(
        st.sampled_from(
            ("unreviewed", "accepted", "corrected", "rejected") if model else ("added",)
        )
    )
    plane = tuple(draw(st.integers(0, s - 1)) for s in image.shape[:-2])
    return Annotation(
        kind,
        pts,
        class_name=draw(st.sampled_from(CLASSES)),
        plane=plane,
        source=source,
        model_version="2.1" if model else None,
        annotator=draw(st.sampled_from([None, "ana", "bo"])),
        created=draw(st.floats(1.6e9, 1.9e9)),
        modified=draw(st.floats(1.6e9, 1.9e9)),
        confidence=draw(st.floats(0, 1)) if model else None,
        review=review,
        measurements=draw(
            st.dictionaries(st.sampled_from(["grade", "n_cells"]), st.floats(-1e6, 1e6))
        ),
    )


def assert_same(got: Annotation, want: Annotation, *, measurements: bool = True) -> None:
    assert got.kind == want.kind
    np.testing.assert_allclose(got.coords, want.coords, atol=1e-6, rtol=0)
    assert got.class_name == want.class_name
    assert got.plane == want.plane
    assert (got.source, got.model_version, got.annotator, got.review) == (
        want.source,
        want.model_version,
        want.annotator,
        want.review,
    )
    assert got.confidence == pytest.approx(want.confidence)
    assert got.created == pytest.approx(want.created, abs=1e-6)
    assert got.modified == pytest.approx(want.modified, abs=1e-6)
    if measurements:
        assert got.measurements == pytest.approx(want.measurements)


# --------------------------------------------------------------------------- round trips


@HYPO
@given(
    st.lists(annotations(("point", "line", "polyline", "box", "polygon")), max_size=8),
    st.booleans(),
)
def test_geojson_round_trip(tmp_path_factory: Any, anns: list[Annotation], volume: bool) -> None:
    image = IMAGE
    if volume:
        image = VOLUME
        anns = [a.copy(plane=(i % 5,)) for i, a in enumerate(anns)]
    path = tmp_path_factory.mktemp("gj") / "objects.geojson"
    export_geojson(anns, path, image=image, classes=CLASSES)
    back = import_geojson(path, image=image, classes=CLASSES)
    assert len(back) == len(anns)
    for got, want in zip(back, anns, strict=True):
        assert_same(got, want)


@HYPO
@given(st.lists(annotations(("point", "box")), max_size=10), st.booleans())
def test_csv_round_trip(tmp_path_factory: Any, anns: list[Annotation], volume: bool) -> None:
    image = IMAGE
    if volume:
        image = VOLUME
        anns = [a.copy(plane=(i % 5,)) for i, a in enumerate(anns)]
    path = tmp_path_factory.mktemp("csv") / "points.csv"
    export_csv_points(anns, path, image=image, classes=CLASSES)
    back = import_csv_points(path, image=image, classes=CLASSES)
    points = [a for a in anns if a.kind == "point"]
    assert len(back) == len(points)
    for got, want in zip(back, points, strict=True):
        assert_same(got, want, measurements=False)
    side = json.loads(sidecar_path(path).read_text())
    assert side["count"] == len(points)
    assert side["skipped"] == ({"box": len(anns) - len(points)} if len(anns) > len(points) else {})


@HYPO
@given(st.lists(annotations(("point", "line", "box", "polygon")), max_size=8))
def test_coco_round_trip(tmp_path_factory: Any, anns: list[Annotation]) -> None:
    path = tmp_path_factory.mktemp("coco") / "objects.json"
    export_coco(anns, path, image=IMAGE, classes=CLASSES)
    back = import_coco(path, image=IMAGE, classes=CLASSES)
    kept = [a for a in anns if a.kind in ("box", "polygon")]
    assert len(back) == len(kept)
    for got, want in zip(back, kept, strict=True):
        assert_same(got, want)
    data = json.loads(path.read_text())
    skipped = data["info"]["histo_ai"]["skipped"]
    assert sum(skipped.values()) == len(anns) - len(kept)
    assert [c["name"] for c in data["categories"]][: len(CLASSES)] == list(CLASSES)


@HYPO
@given(
    st.lists(
        st.tuples(st.integers(60, 960), st.integers(60, 960), st.integers(1, 59), st.booleans()),
        max_size=4,
    ),
    st.sampled_from(("F", "G", "D")),
)
def test_mias_round_trip(
    tmp_path_factory: Any, circles: list[tuple[int, int, int, bool]], tissue: str
) -> None:
    anns = [
        Annotation(
            "box",
            [[1024 - y - r, x - r], [1024 - y + r, x + r]],
            class_name="SPIC",
            measurements={"severity": float(m)},
        )
        for x, y, r, m in circles
    ]
    path = tmp_path_factory.mktemp("mias") / "Info.txt"
    export_mias(anns, path, image=FILM_IMAGE, tissue=tissue)
    back = import_mias(path, image=FILM_IMAGE)
    assert len(back) == len(anns)
    for got, want, (x, y, _r, m) in zip(back, anns, circles, strict=True):
        np.testing.assert_allclose(got.coords, want.coords)
        assert got.class_name == "SPIC"
        assert got.measurements["severity"] == float(m)
        assert got.measurements["tissue"] == "FGD".index(tissue)
        assert (got.measurements["mias_x"], got.measurements["mias_y"]) == (x, y)
    if not anns:
        assert path.read_text() == f"mdb001 {tissue} NORM\n"


# --------------------------------------------------------------------------- provenance


def test_every_export_records_provenance(tmp_path: Path) -> None:
    anns = [
        Annotation("box", [[10, 10], [20, 30]], class_name="CIRC", annotator="ana"),
        Annotation(
            "box",
            [[40, 40], [60, 90]],
            class_name="CIRC",
            source="mass-det",
            model_version="0.3",
            confidence=0.7,
            review="accepted",
            annotator="bo",
        ),
        Annotation("point", [[5, 5]], class_name="mitosis", source="mit", model_version="1"),
    ]
    film = ImageRef(
        path=str(tmp_path / "mdb001.png"),
        content_hash="sha256:0a",
        shape=(1024, 1024),
        mpp=(200.0, 200.0),
    )
    records = {}
    for name, kw in (("geojson", {}), ("csv", {}), ("coco", {}), ("mias", {"tissue": "G"})):
        fmt = FORMATS[name]
        suffix = {"geojson": ".geojson", "csv": ".csv", "coco": ".json", "mias": ".txt"}[name]
        path = tmp_path / f"out{suffix}"
        export_annotations(
            [a.copy(measurements={"severity": 1.0}) for a in anns],
            path,
            image=film,
            format=name,
            provenance={"run": "run-7"},
            **kw,
        )
        if name == "geojson":
            records[name] = json.loads(path.read_text())["properties"]["histo_ai"]
        elif name == "coco":
            records[name] = json.loads(path.read_text())["info"]["histo_ai"]
        else:
            records[name] = json.loads(path.with_name(path.name + ".json").read_text())
        assert fmt.export_fn.__name__ == f"export_{'csv_points' if name == 'csv' else name}"
    import napari_histo_ai

    for record in records.values():
        assert record["mpp"] == [200.0, 200.0]
        assert record["image"]["path"] == film.path
        assert record["image"]["content_hash"] == "sha256:0a"
        assert record["version"] == napari_histo_ai.__version__
        assert record["exported"].endswith("Z")
        assert record["extra"] == {"run": "run-7"}
        assert {"source": "mass-det", "model_version": "0.3"} in record["models"]
        assert "ana" in record["annotators"] and "bo" in record["annotators"]
    assert records["csv"]["skipped"] == {"box": 2}
    assert records["coco"]["skipped"] == {"point": 1}


def test_geojson_export_is_qupath_layout(tmp_path: Path) -> None:
    anns = [
        Annotation("line", [[0, 0], [30, 40]], class_name="diameter"),
        Annotation("polygon", [[0, 0], [0, 10], [10, 10], [10, 0]], class_name="tumour"),
        Annotation("point", [[3, 4]], class_name="mitosis", source="m", review="unreviewed"),
    ]
    path = export_geojson(anns, tmp_path / "a.geojson", image=IMAGE)
    data = json.loads(path.read_text())
    line, poly, point = data["features"]
    assert line["geometry"] == {"type": "LineString", "coordinates": [[0.0, 0.0], [40.0, 30.0]]}
    assert line["properties"]["measurements"]["length_um"] == pytest.approx(50 * 0.25)
    assert poly["properties"]["measurements"]["area_um2"] == pytest.approx(100 * 0.0625)
    ring = poly["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    assert line["properties"]["objectType"] == "annotation"
    assert point["properties"]["objectType"] == "detection"
    colour = poly["properties"]["classification"]["color"]
    assert len(colour) == 3 and all(0 <= c <= 255 for c in colour)
    again = json.loads(export_geojson(anns[1:2], tmp_path / "b.geojson", image=IMAGE).read_text())
    assert again["features"][0]["properties"]["classification"]["color"] == colour  # stable
    # the computed measurements do not come back as the object's own
    assert import_geojson(path, image=IMAGE)[1].measurements == {}
    no_mpp = ImageRef(path="x.png", content_hash="", shape=(H, W))
    data = json.loads(export_geojson(anns, tmp_path / "c.geojson", image=no_mpp).read_text())
    assert data["features"][0]["properties"]["measurements"] == {"length_px": 50.0}


def test_include_rejected_false_leaves_them_out(tmp_path: Path) -> None:
    anns = [
        Annotation("point", [[3, 4]], source="m", review="rejected"),
        Annotation("point", [[5, 6]], source="m", review="accepted"),
    ]
    path = export_geojson(anns, tmp_path / "a.geojson", image=IMAGE, include_rejected=False)
    back = import_geojson(path, image=IMAGE)
    assert [a.review for a in back] == ["accepted"]
    props = json.loads(path.read_text())["properties"]["histo_ai"]
    assert props["skipped"] == {"rejected": 1}


# --------------------------------------------------------------------------- QuPath samples


QUPATH = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "0a3f7d4e-1b2c-4d5e-8f90-123456789abc",
            "geometry": {"type": "MultiPoint", "coordinates": [[100.5, 50.5], [200.0, 60.0]]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Mitosis", "color": [255, 0, 0]},
                "isLocked": False,
                "measurements": {"Num points": 2, "Missing": None},
            },
        },
        {
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[10, 10], [110, 10], [110, 90], [10, 90], [10, 10]],
                    [[40, 40], [50, 40], [50, 50], [40, 40]],
                ],
            },
            "properties": {
                "classification": {"name": "Tumor", "colorRGB": -3670016},
                "isLocked": True,
                "measurements": [{"name": "Area µm^2", "value": 500.0}],
            },
        },
        {
            "type": "Feature",
            "id": "PathDetectionObject",
            "geometry": {"type": "LineString", "coordinates": [[1, 2], [3, 4], [5, 6]]},
            "properties": {"classification": "Stroma", "measurements": []},
        },
        {
            "type": "Feature",
            "id": "4b0c",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[300, 300], [320, 300], [320, 330], [300, 300]]],
                    [[[400, 400], [420, 400], [410, 430], [400, 400]]],
                ],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"names": ["Tumor", "Positive"]},
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [[0, 0], [30, 40]]},
            "properties": {"objectType": "annotation"},
        },
    ],
}


def test_qupath_sample_imports(tmp_path: Path) -> None:
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(QUPATH, indent=2))
    assert detect_format(path) == "geojson"
    anns = import_geojson(path, image=IMAGE, annotator="ana")
    kinds = [a.kind for a in anns]
    assert kinds == ["point", "point", "polygon", "polyline", "polygon", "polygon", "line"]
    p0, p1 = anns[0], anns[1]
    np.testing.assert_allclose(p0.coords, [[50.5, 100.5]])
    np.testing.assert_allclose(p1.coords, [[60.0, 200.0]])
    assert p0.class_name == "Mitosis" and p0.source == HUMAN and p0.review == "added"
    assert p0.annotator == "ana"
    assert p0.measurements == {"Num points": 2.0}  # null dropped
    poly = anns[2]
    assert poly.class_name == "Tumor" and len(poly.coords) == 4  # closing vertex removed
    np.testing.assert_allclose(poly.coords[0], [10, 10])
    assert poly.measurements == {"Area µm^2": 500.0, "holes_dropped": 1.0}
    det = anns[3]
    assert det.class_name == "Stroma" and det.source == "qupath" and det.review == "unreviewed"
    assert det.annotator is None
    assert [a.class_name for a in anns[4:6]] == ["Tumor: Positive"] * 2
    assert all(a.measurements["multipolygon_parts"] == 2 for a in anns[4:6])
    assert anns[6].class_name == "" and anns[6].length_px() == pytest.approx(50)
    # a bare list of features and a single feature
    path.write_text(json.dumps(QUPATH["features"]))
    assert len(import_geojson(path, image=IMAGE)) == 7
    path.write_text(json.dumps(QUPATH["features"][1]))
    assert [a.kind for a in import_geojson(path, image=IMAGE)] == ["polygon"]
    # source= attributes foreign objects
    path.write_text(json.dumps(QUPATH))
    anns = import_geojson(path, image=IMAGE, source="qupath-cells", model_version="0.5")
    assert {(a.source, a.model_version, a.review) for a in anns} == {
        ("qupath-cells", "0.5", "unreviewed")
    }


def test_qupath_rectangle_stays_a_polygon_unless_ours(tmp_path: Path) -> None:
    rect = [[10, 10], [110, 10], [110, 90], [10, 90], [10, 10]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [rect]}}
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps(feature))
    assert import_geojson(path, image=IMAGE)[0].kind == "polygon"
    feature["properties"] = {"histo_ai": {"kind": "box"}}
    path.write_text(json.dumps(feature))
    box = import_geojson(path, image=IMAGE)[0]
    assert box.kind == "box"
    np.testing.assert_allclose(box.coords, [[10, 10], [90, 110]])


# --------------------------------------------------------------------------- engine GeoJSON


def test_engine_geojson_imports_as_model_objects(tmp_path: Path) -> None:
    from napari_histo_ai.inference.geojson import write_objects
    from napari_histo_ai.inference.objects import Objects

    points = Objects(
        "points",
        np.array([[10.5, 20.5], [300.0, 700.25]]),
        np.array([0.91, 0.42]),
        np.array([0, 1]),
        ("mitosis", "imposter"),
        features={"area_um2": np.array([12.0, np.nan])},
    )
    path = write_objects(tmp_path / "mitosis.geojson", points, pixel_size=(0.25, 0.25))
    anns = import_geojson(path, image=IMAGE, source="mitosis-unet", model_version="1.2.0")
    assert [a.kind for a in anns] == ["point", "point"]
    np.testing.assert_allclose(anns[1].coords, [[300.0, 700.25]])
    assert [a.class_name for a in anns] == ["mitosis", "imposter"]
    assert [a.confidence for a in anns] == [0.91, 0.42]
    assert {(a.source, a.model_version, a.review) for a in anns} == {
        ("mitosis-unet", "1.2.0", "unreviewed")
    }
    assert anns[0].measurements == {"area_um2": 12.0} and anns[1].measurements == {}

    boxes = Objects(
        "boxes",
        np.array([[2, 100, 200, 150, 260]], dtype=float),
        np.array([0.8]),
        np.array([0]),
        ("mass",),
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"model": "mass-det", "model_version": "0.3"}))
    path = write_objects(run / "masses.geojson", boxes)
    (box,) = import_geojson(path, image=VOLUME)
    assert box.kind == "box" and box.plane == (2,)
    np.testing.assert_allclose(box.coords, [[100, 200], [150, 260]])
    assert (box.source, box.model_version, box.confidence) == ("mass-det", "0.3", 0.8)


# --------------------------------------------------------------------------- CSV inputs


def test_csv_header_variants_and_headerless(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("Row,Col,Label,Score,Source\n10,20,mitosis,0.5,net\n11.5,21,mitosis,,\n")
    a, b = import_csv_points(path, image=IMAGE)
    np.testing.assert_allclose(a.coords, [[10, 20]])
    assert (a.class_name, a.confidence, a.source, a.review) == ("mitosis", 0.5, "net", "unreviewed")
    assert (b.confidence, b.source, b.review) == (None, HUMAN, "added")
    path.write_text("X;Y;class\n5;6;a\n")
    (c,) = import_csv_points(path, image=IMAGE)
    np.testing.assert_allclose(c.coords, [[6, 5]])
    path.write_text("10,20\n30,40\n")  # TUPAC16: row, col
    rows = import_csv_points(path, image=IMAGE)
    np.testing.assert_allclose([r.coords[0] for r in rows], [[10, 20], [30, 40]])
    rows = import_csv_points(path, image=IMAGE, headerless="xy", offset=0.5)
    np.testing.assert_allclose([r.coords[0] for r in rows], [[20.5, 10.5], [40.5, 30.5]])
    path.write_text("10,20,mitosis\n")
    assert import_csv_points(path, image=IMAGE)[0].class_name == "mitosis"
    vol = tmp_path / "v.csv"
    vol.write_text("x,y,z,class\n1,2,4,a\n")
    assert import_csv_points(vol, image=VOLUME)[0].plane == (4,)


def test_ami_br_csv_one_image() -> None:
    path = real("ami_br_mitosis/AMI-BR.csv")
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide"] == "002.tiff"]
    image = ImageRef(path="/data/midog/002.tiff", content_hash="", shape=(8000, 8000))
    anns = import_csv_points(path, image=image)  # the image's own name selects its rows
    assert len(anns) == len(rows) > 0
    for ann, row in zip(anns, rows, strict=True):
        np.testing.assert_allclose(ann.coords, [[float(row["y"]), float(row["x"])]])
        assert ann.class_name == ("atypical" if row["majority_atypical"] == "True" else "normal")
        assert ann.measurements["uid"] == float(row["uid"])
        assert ann.source == HUMAN
    other = ImageRef(path="/x/slide.svs", content_hash="", shape=(8000, 8000))
    by_id = import_csv_points(
        path, image=other, image_id="MIDOG21/002.tiff", label_column="expert1_label"
    )
    assert [a.class_name for a in by_id] == [r["expert1_label"] for r in rows]
    assert len(import_csv_points(path, image=other, image_id="002")) == len(rows)
    with pytest.raises(AnnotationError, match="pass image_id") as info:
        import_csv_points(path, image=other)
    assert str(path) in str(info.value) and "002.tiff" in str(info.value)


# --------------------------------------------------------------------------- MIAS


def test_mias_real_info_txt(tmp_path: Path) -> None:
    info = real("mini_mias/Info.txt")
    (box,) = import_mias(info, image=FILM_IMAGE)  # mdb001 G CIRC B 535 425 197
    assert box.kind == "box" and box.class_name == "CIRC"
    np.testing.assert_allclose(box.coords, [[599 - 197, 535 - 197], [599 + 197, 535 + 197]])
    assert box.measurements["severity"] == 0.0 and box.measurements["tissue"] == 1.0
    assert box.source == HUMAN
    assert import_mias(info, image=FILM_IMAGE, ref="mdb003") == []  # NORM
    assert import_mias(info, image=FILM_IMAGE, ref="mdb059") == []  # CIRC B, no centre
    with pytest.raises(AnnotationError, match="mdb999"):
        import_mias(info, image=FILM_IMAGE, ref="mdb999")
    # every located row of the real list imports inside the film (boxes clipped)
    from napari_histo_ai.io.mias import read_info

    refs = sorted({r.ref for r in read_info(info) if r.x is not None})
    total = sum(len(import_mias(info, image=FILM_IMAGE, ref=ref)) for ref in refs)
    assert total == sum(1 for r in read_info(info) if r.x is not None)
    # export writes the circle back exactly
    out = export_mias([box], tmp_path / "Info.txt", image=FILM_IMAGE)
    assert out.read_text() == "mdb001 G CIRC B 535 425 197\n"
    assert detect_format(out) == "mias" and detect_format(info) == "mias"


def test_mias_export_merge_and_detector_classes(tmp_path: Path) -> None:
    path = tmp_path / "Info.txt"
    path.write_text("mdb001 G CIRC B 535 425 197\nmdb002 G CIRC B 522 280 69\nmdb003 D NORM\n")
    film2 = ImageRef(path="/f/mdb002.png", content_hash="", shape=(1024, 1024))
    found = Annotation("box", [[100, 100], [140, 160]], class_name="malignant", source="det")
    export_mias([found], path, image=film2, merge=True, tissue="G", abnormality="MISC")
    assert path.read_text().splitlines() == [
        "mdb001 G CIRC B 535 425 197",
        "mdb002 G MISC M 130 904 30",
        "mdb003 D NORM",
    ]
    export_mias([], path, image=film2, merge=True, tissue="F")
    assert path.read_text().splitlines()[1] == "mdb002 F NORM"
    with pytest.raises(AnnotationError, match="abnormality="):
        export_mias([found], tmp_path / "b.txt", image=film2, tissue="G")
    with pytest.raises(AnnotationError, match="tissue"):
        export_mias([], tmp_path / "c.txt", image=film2)
    with pytest.raises(AnnotationError, match="1024"):
        import_mias(path, image=IMAGE, ref="mdb001")


def test_info_parser_moved_but_still_importable() -> None:
    from napari_histo_ai.io import mias
    from napari_histo_ai.training import mammogram

    assert mammogram.read_info is mias.read_info and mammogram.InfoRow is mias.InfoRow
    row = mias.InfoRow("mdb001", "G", "CIRC", "B", 535, 425, 197, 1)
    assert row.box() == (402.0, 338.0, 796.0, 732.0)
    assert row.to_line() == "mdb001 G CIRC B 535 425 197"


# --------------------------------------------------------------------------- COCO masks


@HYPO
@given(st.integers(1, 12), st.integers(1, 12), st.randoms(use_true_random=False))
def test_rle_round_trip(h: int, w: int, rnd: Any) -> None:
    mask = np.array([[rnd.random() < 0.4 for _ in range(w)] for _ in range(h)])
    rle = mask_to_rle(mask)
    assert rle["size"] == [h, w] and sum(rle["counts"]) == h * w
    np.testing.assert_array_equal(rle_to_mask(rle, (h, w)), mask)
    assert rle_from_string(rle_to_string(rle["counts"])) == rle["counts"]
    compressed = {"size": [h, w], "counts": rle_to_string(rle["counts"])}
    np.testing.assert_array_equal(rle_to_mask(compressed), mask)


def test_rle_is_column_major_like_pycocotools() -> None:
    mask = np.array([[0, 1], [1, 1]], dtype=bool)  # column-major 0, 1, 1, 1
    assert mask_to_rle(mask) == {"size": [2, 2], "counts": [1, 3]}
    assert mask_to_rle(np.ones((2, 3))) == {"size": [2, 3], "counts": [0, 6]}
    assert mask_to_rle(np.zeros((2, 3))) == {"size": [2, 3], "counts": [6]}
    assert rle_to_string([1, 3]) == "13"
    with pytest.raises(ValueError, match="add up"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_coco_instance_masks_round_trip(tmp_path: Path) -> None:
    labels = np.zeros((H, W), dtype=np.int32)
    labels[100:120, 200:230] = 1  # a 20 × 30 rectangle
    rr, cc = np.mgrid[:H, :W]
    labels[(rr - 300) ** 2 + (cc - 400) ** 2 < 15**2] = 2  # a disc
    path = export_coco(
        [Annotation("box", [[5, 5], [9, 9]], class_name="mass")],
        tmp_path / "masks.coco.json",
        image=IMAGE,
        classes=CLASSES,
        label_masks={1: labels},
    )
    data = json.loads(path.read_text())
    masks = [a for a in data["annotations"] if isinstance(a["segmentation"], dict)]
    assert len(masks) == 2 and data["info"]["histo_ai"]["masks"] == 2
    for record, label in zip(masks, (1, 2), strict=True):
        np.testing.assert_array_equal(rle_to_mask(record["segmentation"]), labels == label)
        assert record["area"] == float((labels == label).sum())
    assert masks[0]["bbox"] == [200.0, 100.0, 30.0, 20.0]
    back = import_coco(path, image=IMAGE)
    assert [a.kind for a in back] == ["box", "polygon", "polygon"]
    rect, disc = back[1], back[2]
    assert rect.class_name == "tumour" and rect.measurements["mask_area_px"] == 600
    np.testing.assert_allclose(rect.bounds(), (100, 200, 120, 230), atol=0.51)
    assert rect.area_px() == pytest.approx(600, rel=0.05)
    assert disc.area_px() == pytest.approx((labels == 2).sum(), rel=0.05)
    assert detect_format(path) == "coco"
    # the compressed RLE string (pycocotools' iscrowd masks) reads the same
    masks[1]["segmentation"]["counts"] = rle_to_string(masks[1]["segmentation"]["counts"])
    data["annotations"] = [masks[1]]
    compressed = _write(tmp_path / "compressed.json", json.dumps(data))
    (again,) = import_coco(compressed, image=IMAGE)
    np.testing.assert_allclose(again.coords, disc.coords)
    assert again.measurements["mask_area_px"] == (labels == 2).sum()


# --------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"type": "FeatureCollection", "features": [{"type": "Fea', "not valid JSON"),
        ('{"type": "Topology"}', "'Topology'"),
        ('{"type": "FeatureCollection", "features": {}}', "'features'"),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["a", "b"]}}]',
            "feature 0",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}}]',
            "unknown geometry type 'Circle'",
        ),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 2]}}]', "NaN"),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}},'
            ' {"type": "Feature", "geometry": {"type": "Point", "coordinates": [9000, 2]}}]',
            "feature 1: point at rows 2..2, cols 9000..9000 lies outside",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},'
            ' "properties": {"classification": {"name": "Necrosis"}}}]',
            "unknown class 'Necrosis'",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},'
            ' "properties": {"measurements": {"a": "big"}}}]',
            "measurement 'a'",
        ),
        ('[{"type": "Feature", "geometry": null}]', "feature 0: has no geometry"),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},'
            ' "properties": {"histo_ai": {"review": "maybe"}}}]',
            "review state 'maybe'",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 2], [3, 4],'
            " [1, 2]]]}}]",
            "polygon needs at least 3",
        ),
    ],
)
def test_bad_geojson(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path / "bad.geojson", text)
    with pytest.raises(AnnotationError) as info:
        import_geojson(path, image=IMAGE, classes=CLASSES)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_bad_geojson_plane(tmp_path: Path) -> None:
    text = json.dumps(
        [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [1, 2]},
                "properties": {"class": "a", "score": 0.5, "plane": [7]},
            }
        ]
    )
    path = _write(tmp_path / "p.geojson", text)
    with pytest.raises(AnnotationError, match=r"feature 0: plane \[7\]"):
        import_geojson(path, image=VOLUME)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("x,y,class\n1,2,mitosis\n3,oops,mitosis\n", "line 3: y 'oops' is not a number"),
        ("a,b\n1,2\n", "no x/y"),
        ("x,y,class\n1,2,mitosis\n5000,2,mitosis\n", "line 3: point at rows 2..2, cols 5000"),
        ("x,y,class\n1,2,necrosis\n", "line 2: unknown class 'necrosis'"),
        ("x,y,class\n1,nan,mitosis\n", "line 2: y is 'nan'"),
        ("x,y,review\n1,2,perhaps\n", "review state 'perhaps'"),
        ("1,2,3,4\n", "line 1: 4 columns"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(AnnotationError) as info:
        import_csv_points(path, image=IMAGE, classes=CLASSES)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_bad_csv_volume_needs_plane(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.csv", "x,y\n1,2\n")
    with pytest.raises(AnnotationError, match="no z column"):
        import_csv_points(path, image=VOLUME)
    path = _write(tmp_path / "v.csv", "x,y,z\n1,2,9\n")
    with pytest.raises(AnnotationError, match=r"line 2: plane \[9\]"):
        import_csv_points(path, image=VOLUME)


def _coco(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "images": [{"id": 1, "file_name": "slide-1.svs", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "mass"}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40]},
        ],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (None, "not valid JSON"),
        ({"images": []}, "'annotations' is missing"),
        (
            _coco(images=[{"id": 1, "file_name": "slide-1.svs", "width": 10, "height": 10}]),
            "is 10 × 10 px",
        ),
        (
            _coco(annotations=[{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4]}]),
            "annotation 0 (id 7): category_id 5",
        ),
        (
            _coco(annotations=[{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, "2", 3, 4]}]),
            "bbox value '2'",
        ),
        (
            _coco(
                annotations=[
                    {"id": 8, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3, 4]]}
                ]
            ),
            "segmentation polygon 0",
        ),
        (
            _coco(
                annotations=[
                    {
                        "id": 8,
                        "image_id": 1,
                        "category_id": 1,
                        "segmentation": {"size": [H, W], "counts": [5, 5]},
                    }
                ]
            ),
            "bad RLE",
        ),
        (
            _coco(
                annotations=[{"id": 8, "image_id": 1, "category_id": 1, "bbox": [790, 20, 300, 40]}]
            ),
            "lies outside",
        ),
        (_coco(categories=[{"id": 1, "name": "necrosis"}]), "unknown class 'necrosis'"),
        (
            _coco(images=[{"id": 1, "file_name": "a.svs"}, {"id": 2, "file_name": "b.svs"}]),
            "pass image_id=",
        ),
    ],
)
def test_bad_coco(tmp_path: Path, data: Any, needle: str) -> None:
    text = '{"images": [{"id": 1, ' if data is None else json.dumps(data)
    path = _write(tmp_path / "bad.json", text)
    with pytest.raises(AnnotationError) as info:
        import_coco(path, image=IMAGE, classes=CLASSES)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_bad_mias(tmp_path: Path) -> None:
    path = _write(tmp_path / "Info.txt", "mdb001 G CIRC B 535 425 197\nmdb002 G CIRC Q 1 2 3\n")
    with pytest.raises(AnnotationError) as info:
        import_mias(path, image=FILM_IMAGE)
    assert str(path) in str(info.value) and "line 2" in str(info.value)
    assert isinstance(info.value, HistoAIError)  # what training.mammogram callers catch
    path = _write(tmp_path / "Info.txt", "mdb001 G CIRC B 535 425 197\n")
    with pytest.raises(AnnotationError, match="unknown class 'CIRC'"):
        import_mias(path, image=FILM_IMAGE, classes=("CALC",))


def test_export_refuses_objects_outside_the_image(tmp_path: Path) -> None:
    anns = [Annotation("point", [[1, 1]]), Annotation("point", [[H + 50, 3]])]
    for name in ("geojson", "csv", "coco"):
        if name == "coco":
            anns = [Annotation("box", [[1, 1], [5, 5]]), Annotation("box", [[1, 1], [5, W + 9]])]
        path = tmp_path / f"out.{name}"
        with pytest.raises(AnnotationError, match=r"object 1 .* lies outside"):
            export_annotations(anns, path, image=IMAGE, format=name)
        assert not path.exists()


# --------------------------------------------------------------------------- crash safety


class _Exploding(Annotation):
    def ring(self) -> np.ndarray:
        raise RuntimeError("boom while serialising")


@pytest.mark.parametrize("name", ["geojson", "csv", "coco", "mias"])
def test_failed_export_leaves_the_old_file(tmp_path: Path, name: str) -> None:
    image = FILM_IMAGE
    path = (
        tmp_path / {"geojson": "a.geojson", "csv": "a.csv", "coco": "a.json", "mias": "a.txt"}[name]
    )
    kind = "point" if name == "csv" else "box"
    coords = [[10, 10]] if kind == "point" else [[10, 10], [50, 50]]
    good = [Annotation(kind, coords, class_name="CIRC", measurements={"severity": 0.0})]
    kw = {"tissue": "G"} if name == "mias" else {}
    export_annotations(good, path, image=image, format=name, **kw)
    before = path.read_bytes()
    files = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TypeError):  # the provenance cannot be serialised
        export_annotations(good, path, image=image, format=name, provenance={"x": object()}, **kw)
    if name in ("geojson", "coco"):
        bad = [*good, _Exploding("box", [[1, 1], [5, 5]], class_name="CIRC")]
        with pytest.raises(RuntimeError, match="boom"):
            export_annotations(bad, path, image=image, format=name)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no temporary left behind


# --------------------------------------------------------------------------- dispatch


def test_formats_table_and_detection(tmp_path: Path) -> None:
    assert set(FORMATS) == {"geojson", "csv", "coco", "mias"}
    for fmt in FORMATS.values():
        assert callable(fmt.import_fn) and callable(fmt.export_fn) and fmt.extensions
        assert fmt.description
    assert sniff_format(tmp_path / "new.geojson") == "geojson"
    assert sniff_format(tmp_path / "new.json") is None
    assert sniff_format(tmp_path / "x.unknown") is None
    with pytest.raises(AnnotationError, match="pass format="):
        detect_format(tmp_path / "x.unknown")
    headerless = _write(tmp_path / "t.txt", "10,20\n")
    assert detect_format(headerless) == "csv"
    anns = [Annotation("point", [[1.5, 2.5]], class_name="mitosis")]
    out = export_annotations(anns, tmp_path / "plain.json", image=IMAGE)
    assert detect_format(out) == "geojson"
    back = import_annotations(out, image=IMAGE)
    np.testing.assert_allclose(back[0].coords, [[1.5, 2.5]])
    assert math.isclose(back[0].created, anns[0].created)


def test_plain_json_is_sniffed_and_gc_restored(tmp_path: Path) -> None:
    import gc

    box = [Annotation("box", [[1, 2], [30, 40]], class_name="mass")]
    coco = export_coco(box, tmp_path / "objects.json", image=IMAGE)
    assert detect_format(coco) == "coco"
    # an existing COCO file keeps its format when overwritten through the dispatcher
    export_annotations(box, coco, image=IMAGE)
    assert detect_format(coco) == "coco"
    qupath = _write(tmp_path / "qp.json", json.dumps(QUPATH["features"]))
    assert detect_format(qupath) == "geojson"
    assert gc.isenabled()  # the bulk functions pause the collector and restore it


_SUFFIX = {"geojson": ".geojson", "csv": ".csv", "coco": ".json", "mias": ".txt"}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_contract(tmp_path: Path, name: str) -> None:
    """What every format does alike: an empty export reads back empty, a missing or
    empty file is an AnnotationError naming it, imports are pure (no file written)."""
    fmt = FORMATS[name]
    kw = {"tissue": "D"} if name == "mias" else {}
    path = fmt.export_fn([], tmp_path / f"empty{_SUFFIX[name]}", image=FILM_IMAGE, **kw)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert fmt.import_fn(path, image=FILM_IMAGE) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    missing = tmp_path / f"missing{_SUFFIX[name]}"
    with pytest.raises(AnnotationError) as info:
        fmt.import_fn(missing, image=FILM_IMAGE)
    assert str(missing) in str(info.value)
    if name != "csv":  # an empty CSV is an empty point list
        empty = _write(tmp_path / f"blank{_SUFFIX[name]}", "")
        with pytest.raises(AnnotationError) as info:
            fmt.import_fn(empty, image=FILM_IMAGE)
        assert str(empty) in str(info.value)
