"""``napari-histo-ai import / annotations / export / training-set``: a round trip on the
real sample slide, and one clear line with exit 2 on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_histo_ai.annotations.store import AnnotationStore
from napari_histo_ai.annotations.store_paths import STORE_SUFFIX, default_labels_path
from napari_histo_ai.annotations.training_set import read_manifest
from napari_histo_ai.cli import main

SAMPLE_SVS = Path(__file__).resolve().parents[1] / "src/napari_histo_ai/data/CMU-1-Small-Region.svs"

#: (x, y) level-0 px of tissue in CMU-1-Small-Region (2220 x 2967)
POINTS = [(1100.5, 1500.5), (700.5, 900.5), (1600.5, 2200.5), (400.5, 2600.5)]


@pytest.fixture
def slide(tmp_path) -> Path:
    if not SAMPLE_SVS.exists():
        pytest.skip(f"{SAMPLE_SVS} is not present")
    copy = tmp_path / "cmu.svs"
    shutil.copyfile(SAMPLE_SVS, copy)
    return copy


def qupath_geojson(path: Path, *, rejected: tuple[float, float] | None = None) -> Path:
    """A QuPath-style FeatureCollection of mitosis points (human annotations)."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {"objectType": "annotation", "classification": {"name": "mitosis"}},
        }
        for x, y in POINTS
    ]
    if rejected is not None:  # a model false positive an annotator rejected
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": list(rejected)},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": "mitosis"},
                    "histo_ai": {
                        "kind": "point",
                        "source": "mitosis-net",
                        "model_version": "1.0",
                        "review": "rejected",
                        "confidence": 0.8,
                    },
                },
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    try:
        data = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        data = None
    return code, data, err


def test_import_annotations_export_training_set_round_trip(slide, tmp_path, capsys):
    src = qupath_geojson(tmp_path / "points.geojson", rejected=(1800.5, 600.5))
    code, data, err = run(capsys, "import", src, "--image", slide, "--classes", "mitosis")
    assert code == 0, err
    store_path = slide.with_name(slide.name + STORE_SUFFIX)  # the default: beside the image
    assert data["store"] == str(store_path) and store_path.exists()
    assert data["imported"] == 5 and data["by_kind"] == {"point": 5}
    assert data["by_review"] == {"added": 4, "rejected": 1}
    with AnnotationStore.open(store_path) as store:
        assert store.can_undo and store.undo() == "import points.geojson" and len(store) == 0
        assert store.redo() == "import points.geojson" and len(store) == 5

    code, summary, err = run(capsys, "annotations", store_path)
    assert code == 0, err
    assert summary["total"] == 5 and summary["classes"] == ["mitosis"]
    assert summary["by_review"] == {"added": 4, "rejected": 1}
    assert summary["by_class"] == {"mitosis": 5}
    assert summary["image"]["mpp"] == [0.499, 0.499]

    out = tmp_path / "out.geojson"
    code, data, err = run(capsys, "export", "--image", slide, "--format", "geojson", "--out", out)
    assert code == 0, err
    assert data["objects"] == 5 and out.exists()
    # re-import what was exported into a fresh store: same objects and provenance
    other = tmp_path / "other.sqlite"
    code, data, err = run(capsys, "import", out, "--image", slide, "--store", other)
    assert code == 0, err
    assert data["imported"] == 5 and data["by_review"] == {"added": 4, "rejected": 1}
    with AnnotationStore.open(store_path) as a, AnnotationStore.open(other) as b:
        first = sorted(tuple(x.coords[0]) for x in a.iter_all())
        second = sorted(tuple(x.coords[0]) for x in b.iter_all())
        np.testing.assert_allclose(first, second, atol=1e-6)

    csv_out = tmp_path / "points.csv"
    code, data, err = run(
        capsys, "export", "--store", store_path, "--format", "csv", "--out", csv_out
    )
    assert code == 0, err
    assert csv_out.exists()

    ts = tmp_path / "ts"
    json_out = tmp_path / "ts.json"
    code, data, err = run(
        capsys,
        "training-set",
        "--image",
        slide,
        "--out",
        ts,
        "--mpp",
        "2",
        "--patch-size",
        "32",
        "--json-out",
        json_out,
    )
    assert code == 0, err
    assert data["complete"] and data["targets"] == "points"
    assert data["counts"]["positive"] == 4 and data["counts"]["hard_negative"] == 1
    assert data["counts"]["negative"] == 5  # 1 x (4 positives + 1 hard negative)
    assert json.loads(json_out.read_text()) == data
    manifest = read_manifest(ts)
    assert manifest.counts == data["counts"]
    hard = manifest.samples_of("hard_negative")[0]
    assert hard.hard_negative and hard.model_version == "1.0" and hard.source == "mitosis-net"
    assert all(s.added_miss for s in manifest.samples_of("positive"))


def test_model_objects_import_unreviewed_and_are_not_positives(slide, tmp_path, capsys):
    src = qupath_geojson(tmp_path / "detections.geojson")
    data = json.loads(src.read_text())
    for f in data["features"]:
        f["properties"]["objectType"] = "detection"
    src.write_text(json.dumps(data))
    store = tmp_path / "s.sqlite"
    code, out, err = run(
        capsys,
        "import",
        src,
        "--image",
        slide,
        "--store",
        store,
        "--source",
        "mitosis-net",
        "--model-version",
        "2.1",
    )
    assert code == 0, err
    assert out["by_review"] == {"unreviewed": 4}
    code, summary, _ = run(capsys, "annotations", store)
    assert summary["by_source"] == {"mitosis-net:2.1": 4}
    # nothing reviewed yet: the training set is refused, naming the store
    code, _, err = run(
        capsys,
        "training-set",
        "--image",
        slide,
        "--store",
        store,
        "--out",
        tmp_path / "t",
        "--mpp",
        "2",
    )
    assert code == 2 and str(store) in err and "unreviewed" in err


def test_export_labels_as_ome_zarr(slide, tmp_path, capsys):
    from napari_histo_ai.annotations.labels import LabelPyramid

    store = tmp_path / "s.sqlite"
    assert (
        main(
            [
                "import",
                str(qupath_geojson(tmp_path / "p.geojson")),
                "--image",
                str(slide),
                "--store",
                str(store),
            ]
        )
        == 0
    )
    capsys.readouterr()
    with AnnotationStore.open(store) as s:
        ref = s.image
    mask = np.zeros(ref.shape, dtype=np.uint16)
    mask[1000:1100, 500:700] = 1
    labels = LabelPyramid.from_array(tmp_path / "m.labels.zarr", mask, image=ref, chunk=512)
    out = tmp_path / "labels.zarr"
    code, data, err = run(
        capsys,
        "export",
        "--store",
        store,
        "--image",
        slide,
        "--format",
        "ome-zarr",
        "--labels",
        labels.path,
        "--out",
        out,
    )
    assert code == 0, err
    assert Path(data["out"]).is_dir() and (Path(data["out"]) / "zarr.json").exists()
    # without --labels: the label pyramid beside the store
    shutil.move(labels.path, default_labels_path(store))
    code, data, err = run(
        capsys, "export", "--store", store, "--format", "ome-zarr", "--out", tmp_path / "b.zarr"
    )
    assert code == 0, err
    assert Path(data["out"]).is_dir()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_input_exits_2_naming_the_file(slide, tmp_path, capsys):
    missing = tmp_path / "nothing.geojson"
    code, _, err = run(capsys, "import", missing, "--image", slide, "--store", tmp_path / "a.db")
    assert code == 2 and "nothing.geojson" in one_error_line(err)

    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", ')
    code, _, err = run(capsys, "import", broken, "--image", slide, "--store", tmp_path / "b.db")
    assert code == 2 and "broken.geojson" in one_error_line(err)
    assert not (tmp_path / "b.db").exists()  # nothing half-made

    not_store = tmp_path / "notes.sqlite"
    not_store.write_text("hello")
    code, _, err = run(capsys, "annotations", not_store)
    assert code == 2 and "notes.sqlite" in one_error_line(err)

    code, _, err = run(capsys, "annotations", tmp_path / "absent.sqlite")
    assert code == 2 and "absent.sqlite" in one_error_line(err)

    bad_image = tmp_path / "fake.svs"
    bad_image.write_bytes(b"not a slide")
    code, _, err = run(
        capsys,
        "import",
        qupath_geojson(tmp_path / "p.geojson"),
        "--image",
        bad_image,
        "--store",
        tmp_path / "c.db",
    )
    assert code == 2 and "fake.svs" in one_error_line(err)

    store = tmp_path / "s.sqlite"
    assert (
        main(
            [
                "import",
                str(qupath_geojson(tmp_path / "q.geojson")),
                "--image",
                str(slide),
                "--store",
                str(store),
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, _, err = run(
        capsys, "export", "--store", store, "--format", "nifti", "--out", tmp_path / "x.nii"
    )
    assert code == 2 and "--labels" in one_error_line(err)

    foreign = tmp_path / "holiday"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"x")
    code, _, err = run(
        capsys, "training-set", "--image", slide, "--store", store, "--out", foreign, "--mpp", "1"
    )
    assert code == 2 and "holiday" in one_error_line(err)

    code, _, err = run(
        capsys,
        "training-set",
        "--image",
        slide,
        "--store",
        store,
        "--out",
        tmp_path / "t2",
        "--mpp",
        "-1",
    )
    assert code == 2 and "--mpp" in one_error_line(err)

    # a store made for another image is refused, naming both
    other = tmp_path / "other.svs"
    shutil.copyfile(SAMPLE_SVS, other)
    with open(other, "r+b") as fh:  # same size and header, different pixels' bytes
        fh.seek(-100, 2)
        fh.write(b"\x00" * 100)
    code, _, err = run(
        capsys,
        "export",
        "--store",
        store,
        "--image",
        other,
        "--format",
        "geojson",
        "--out",
        tmp_path / "o.geojson",
    )
    assert code == 2 and "s.sqlite" in one_error_line(err)


def test_mini_mias_film_import_export_and_box_training_set(tmp_path, capsys):
    from .conftest import real

    film = tmp_path / "mdb005.pgm"
    shutil.copyfile(real("mini_mias/mdb005.pgm"), film)
    info = real("mini_mias/Info.txt")
    code, data, err = run(capsys, "import", info, "--image", film)
    assert code == 0, err
    assert data["imported"] == 2 and data["by_kind"] == {"box": 2}  # mdb005's two masses
    store = film.with_name(film.name + STORE_SUFFIX)
    for fmt, name in (("coco", "m.coco.json"), ("mias", "m.txt"), ("geojson", "m.geojson")):
        code, data, err = run(
            capsys, "export", "--image", film, "--format", fmt, "--out", tmp_path / name
        )
        assert code == 0, err
        assert data["objects"] == 2
        back = tmp_path / f"{fmt}.sqlite"
        code, data, err = run(
            capsys, "import", tmp_path / name, "--image", film, "--store", back, "--format", fmt
        )
        assert code == 0, err
        with AnnotationStore.open(store) as a, AnnotationStore.open(back) as b:
            boxes_a = sorted(tuple(x.coords.ravel()) for x in a.iter_all())
            boxes_b = sorted(tuple(x.coords.ravel()) for x in b.iter_all())
            np.testing.assert_allclose(boxes_a, boxes_b, atol=1.0)
    # the film has no pixel size in the file: the mini-MIAS 200 µm/px is given
    code, _, err = run(
        capsys, "training-set", "--image", film, "--out", tmp_path / "x", "--mpp", "400"
    )
    assert code == 2 and "mdb005.pgm" in one_error_line(err) and "mpp" in err
    code, data, err = run(
        capsys,
        "training-set",
        "--image",
        film,
        "--out",
        tmp_path / "ts",
        "--mpp",
        "400",
        "--image-mpp",
        "200",
        "--patch-size",
        "64",
        "--negatives-per-positive",
        "3",
    )
    assert code == 0, err
    assert data["targets"] == "boxes" and data["counts"]["positive"] == 2
    manifest = read_manifest(tmp_path / "ts")
    from PIL import Image

    for s in manifest.samples_of("negative"):  # never the black air around the breast
        patch = np.asarray(Image.open(manifest.path / s.image), dtype=np.float32)
        assert patch.mean() >= 35 or patch.std() >= 12
    for s in manifest.samples_of("positive"):
        boxes = json.loads((manifest.path / s.target).read_text())["boxes"]
        assert any(b["object_id"] == s.object_id for b in boxes)
