"""Slide / patient reports: the measures against hand computation (mitoses per mm², per
10 HPF and the hotspot; tumour fraction; the benign / malignant vote explained;
magnification verdicts; missing mpp), run folders of another image refused, corrections
counted from an annotation store, `up_to_date`, atomic writes, the CLI, and one run of
the default panel on the real sample checked against the runs' own summaries."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from napari_histo_ai.cli import main
from napari_histo_ai.errors import HistoAIError
from napari_histo_ai.inference.tissue import TissueMask
from napari_histo_ai.models.spec import ModelSpec
from napari_histo_ai.reports import (
    ReportOptions,
    ReportRequest,
    make_report,
    report_job,
    up_to_date,
)
from napari_histo_ai.reports.content import fmt_number
from napari_histo_ai.reports.measures import (
    SlideContext,
    check_run_image,
    hotspot,
    measure_magnification,
    measure_run,
    open_run,
)

TINY = "tiny-mitosis"

MODEL_YAML = f"""
models:
  - name: {TINY}
    task: mitosis detection (test)
    version: "1"
    format: safetensors
    architecture: tiny_fcn
    kwargs: {{in_channels: 3, out_channels: 1, depth: 2}}
    weights: tiny.safetensors
    activation: sigmoid
    io:
      mpp: 1.0
      patch_size: 128
      halo: 4
      overlap: 16
      normalisation: {{method: scale, scale: 255}}
    outputs:
      - {{name: mitosis, kind: probability, channels: [0], classes: [mitosis],
         colours: ["#f032e6"]}}
      - {{name: mitoses, kind: points, channels: [0], classes: [mitosis],
         colours: ["#ffe119"], threshold: 0.3, min_distance_um: 6}}
    card:
      intended_use: testing the reports
      limitations: untrained
      parent: tiny-parent
      parent_version: "0"
"""


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from napari_histo_ai.models.architectures import build_architecture

    folder = tmp_path_factory.mktemp("models")
    net = build_architecture("tiny_fcn", in_channels=3, out_channels=1, depth=2, seed=5)
    save_file(net.state_dict(), str(folder / "tiny.safetensors"))
    (folder / "tiny.yaml").write_text(MODEL_YAML, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def user_models(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(model_dir))
    return model_dir


@pytest.fixture(scope="module")
def sample() -> Path:
    from importlib.resources import files

    return Path(str(files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory, sample: Path) -> Path:
    """A 768 × 640 px pyramidal TIFF of real H&E pixels at 0.499 µm/px."""
    from napari_histo_ai.io.synthetic import make_slide

    folder = tmp_path_factory.mktemp("slides")
    return make_slide(folder / "alpha.tif", width=768, height=640, source=sample)


def _spec(entry: dict[str, Any]) -> dict[str, Any]:
    base = {
        "version": "1",
        "format": "safetensors",
        "weights": "hand.safetensors",
        "architecture": "tiny_fcn",
        "io": {"patch_size": 64},
    }
    return ModelSpec.from_dict({**base, **entry}).to_dict()


def write_run(
    path: Path,
    *,
    spec: dict[str, Any],
    image: Path | str,
    shape: tuple[int, ...],
    mpp: float | None,
    pixel: float = 1.0,
    prob: np.ndarray | None = None,
    tiles: np.ndarray | None = None,
    objects: dict[str, list[dict[str, Any]]] | None = None,
    aggregates: dict[str, Any] | None = None,
    complete: bool = True,
    planes: tuple[int, ...] = (),
) -> Path:
    """A run folder as the engine writes it, by hand (record, summary, arrays, GeoJSON)."""
    import zarr

    s = mpp or 1.0
    geometry = {
        "scale": [pixel * s, pixel * s],
        "translate": [(pixel - 1) / 2 * s] * 2,
        "pixel": [pixel, pixel],
        "unit": "um" if mpp else "pixel",
    }
    chans = sorted({c for o in spec["outputs"] for c in o["channels"]}) if prob is not None else []
    record = {
        "engine_version": 1,
        "model": spec["name"],
        "model_version": spec["version"],
        "fingerprint": "hand-written",
        "image": str(image),
        "image_shape": list(shape),
        "image_mpp": [mpp, mpp] if mpp else None,
        "level": 0,
        "factor": [1.0, 1.0],
        "dense": spec["dense"],
        "grid": [spec["io"]["patch_size"], 0, 0, 1],
        "prob_channels": chans,
        "size_channels": [],
        "planes": list(planes),
        "geometry": geometry,
        "spec": spec,
    }
    group = zarr.open_group(str(path), mode="w")
    group.attrs["napari_histo_ai"] = record
    if prob is not None:
        p = group.create_group("probability")
        p.create_array("0", data=prob.astype(np.uint8))
    if tiles is not None:
        t = group.create_group("tiles")
        t.create_array("0", data=tiles.astype(np.float32))
    for name, feats in (objects or {}).items():
        (path / f"{name}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": feats}), encoding="utf-8"
        )
    summary = {
        "model": spec["name"],
        "model_version": spec["version"],
        "image": str(image),
        "image_shape": list(shape),
        "complete": complete,
        "cancelled": False,
        "tiles_done": 10 if complete else 4,
        "tiles_total": 10,
        "device": "cpu",
        "wall_s": 1.0,
        "aggregates": aggregates or {},
        "warnings": [],
    }
    (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return path


def point(row: float, col: float, score: float = 0.9, cls: str = "mitosis") -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [col, row]},
        "properties": {"class": cls, "score": score},
    }


MITOSIS_SPEC = {
    "name": "hand-mitosis",
    "task": "mitosis detection (hand-written run)",
    "outputs": [
        {"name": "mitosis", "kind": "probability", "channels": [0], "classes": ["mitosis"]},
        {"name": "mitoses", "kind": "points", "channels": [0], "classes": ["mitosis"]},
    ],
}


def context(
    shape: tuple[int, int], mpp: float | None, mask: np.ndarray | None = None, **opts: Any
) -> SlideContext:
    m = np.ones((shape[0] // 100, shape[1] // 100), bool) if mask is None else mask
    tissue = TissueMask(m, (shape[0] / m.shape[0], shape[1] / m.shape[1]), "test mask")
    return SlideContext(
        (mpp, mpp) if mpp else None,
        "file" if mpp else "missing",
        shape,
        tissue,
        ReportOptions(**opts),
    )


def fake_pyramid(objective: float | None, mpp: float | None) -> Any:
    return SimpleNamespace(
        objective_power=objective,
        mpp=(mpp, mpp) if mpp else None,
        mpp_source="file" if mpp else "missing",
        kind="slide",
    )


# ----------------------------------------------------------------------------- mitoses
def test_hotspot_counts_the_densest_window():
    rows = np.array([100, 150, 180, 900, 950])
    cols = np.array([100, 120, 160, 900, 910])
    count, box = hotspot(rows, cols, (1000, 1000), (320.0, 320.0), cells=16)
    assert count == 3  # the three near (100, 100); the two near (900, 900) are 800 px away
    assert box[0] <= 100 and box[2] >= 180 and box[2] - box[0] == pytest.approx(320)
    # a window larger than the image covers all of it
    count, box = hotspot(rows, cols, (1000, 1000), (5000.0, 5000.0))
    assert count == 5 and box == (0.0, 0.0, 1000.0, 1000.0)


def test_mitoses_per_mm2_per_10hpf_and_hotspot_by_hand(tmp_path):
    # 4000 × 4000 px at 0.5 µm/px = 2 × 2 mm = 4 mm² of tissue (all tissue)
    shape = (4000, 4000)
    cluster = [point(400 + 20 * i, 450 + 15 * i, 0.55 + 0.04 * i) for i in range(10)]
    far = [point(3900, 3900, 0.95), point(3900, 100, 0.8)]
    run = write_run(
        tmp_path / "a.hand-mitosis.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="a.tif",
        shape=(*shape, 3),
        mpp=0.5,
        objects={"mitoses": cluster + far},
    )
    ctx = context(shape, 0.5)
    assert ctx.tissue_mm2 == pytest.approx(4.0)
    (m,) = [x for x in measure_run(open_run(run), None, ctx) if x.kind == "mitosis"]  # type: ignore[arg-type]
    v = m.values
    assert v["count"] == 12
    assert v["per_mm2"] == pytest.approx(3.0)
    assert v["per_hpf"] == pytest.approx(3.0 * 10 * 0.237)
    # the 10-HPF window is sqrt(2.37) mm = 3079 px: it holds the cluster, not the far points
    assert v["hotspot_side_mm"] == pytest.approx(math.sqrt(2.37))
    assert v["hotspot_count"] == 10
    assert (
        "12 mitoses in 4 mm² of tissue (3 per mm²; 7.11 per 10 HPF of 0.237 mm²)"
        in (m.sentences[0])
    )
    assert "holds 10 mitoses (hotspot)" in m.sentences[1]
    table = dict((r[0], r[1]) for r in m.table[1:])
    assert table["0.9 and above"] == "2"  # 0.95 and the cluster's last, 0.91
    assert v["scores"]["max"] == pytest.approx(0.95)


def test_hpf_area_option_changes_the_rate(tmp_path):
    run = write_run(
        tmp_path / "a.hand-mitosis.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="a.tif",
        shape=(4000, 4000, 3),
        mpp=0.5,
        objects={"mitoses": [point(100, 100)] * 8},
    )
    ctx = context((4000, 4000), 0.5, hpf_area_mm2=0.5, hpf_count=10)
    (m,) = [x for x in measure_run(open_run(run), None, ctx) if x.kind == "mitosis"]  # type: ignore[arg-type]
    assert m.values["per_hpf"] == pytest.approx(8 / 4 * 5.0)
    assert "per 10 HPF of 0.5 mm²" in m.sentences[0]


def test_tissue_smaller_than_10_hpf_is_said(tmp_path):
    # 1000 × 1000 px at 0.5 µm/px: 0.25 mm², far less than 10 HPF (2.37 mm²)
    run = write_run(
        tmp_path / "s.hand-mitosis.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="s.tif",
        shape=(1000, 1000, 3),
        mpp=0.5,
        objects={"mitoses": [point(100, 100), point(800, 900), point(500, 500)]},
    )
    (m,) = [
        x
        for x in measure_run(open_run(run), None, context((1000, 1000), 0.5))  # type: ignore[arg-type]
        if x.kind == "mitosis"
    ]
    assert m.values["hotspot_count"] == 3  # the window covers the whole (small) image
    assert m.values["hotspot_note"] == "tissue smaller than the hotspot window"
    assert "smaller than 10 HPF" in m.sentences[1] and "extrapolated" in m.sentences[1]


def test_missing_mpp_gives_the_count_only_and_says_why(tmp_path):
    run = write_run(
        tmp_path / "n.hand-mitosis.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="n.png",
        shape=(1000, 1000, 3),
        mpp=None,
        objects={"mitoses": [point(10, 10), point(20, 20)]},
    )
    ctx = context((1000, 1000), None)
    measures = measure_run(open_run(run), None, ctx)  # type: ignore[arg-type]
    (m,) = [x for x in measures if x.kind == "mitosis"]
    assert m.values["count"] == 2
    assert m.values["per_mm2"] is None and m.values["per_hpf"] is None
    assert m.values["hotspot_count"] is None
    assert "cannot be computed" in m.sentences[0] and "pixel size" in m.sentences[0]
    assert ctx.tissue_mm2 is None


def test_reviewed_annotations_replace_the_model_points(tmp_path):
    run = write_run(
        tmp_path / "a.hand-mitosis.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="a.tif",
        shape=(4000, 4000, 3),
        mpp=0.5,
        objects={"mitoses": [point(10, 10)] * 7},
    )
    ctx = context((4000, 4000), 0.5)
    ctx.annotations = {
        "mitosis": {
            "counted": [(100, 100, 0.9), (200, 200, 1.0), (300, 300, 0.7)],
            "rejected": [(1, 1, 0.5)] * 4,
            "unreviewed": [(2, 2, 0.5)],
        }
    }
    ctx.annotations_path = "a.sqlite"
    (m,) = [x for x in measure_run(open_run(run), None, ctx) if x.kind == "mitosis"]  # type: ignore[arg-type]
    # what stands after review: 3 confirmed + 1 model call not yet reviewed; 4 rejected
    assert m.values["count"] == 4
    assert m.values["reviewed"] == {"counted": 4, "confirmed": 3, "unreviewed": 1, "rejected": 4}
    assert m.sentences[0].startswith("After review (some detections still unchecked) there are 4")
    assert any("4 rejected by a reviewer are not counted" in n for n in m.notes)
    assert any("1 of the 4 counted objects have not been reviewed" in n for n in m.notes)
    ctx.annotations["mitosis"]["unreviewed"] = []
    (m,) = [x for x in measure_run(open_run(run), None, ctx) if x.kind == "mitosis"]  # type: ignore[arg-type]
    assert m.values["count"] == 3
    assert m.sentences[0].startswith("The reviewers counted 3 mitoses")


# ----------------------------------------------------------------------------- tumour
def test_tumour_fraction_from_a_tile_class_map_by_hand(tmp_path):
    spec = _spec(
        {
            "name": "hand-idc",
            "task": "tumour tiles",
            "dense": False,
            "activation": "softmax",
            "outputs": [
                {
                    "name": "tumour",
                    "kind": "class",
                    "channels": [0, 1],
                    "classes": ["not tumour", "tumour"],
                    "aggregate": "vote",
                }
            ],
        }
    )
    tiles = np.zeros((2, 4, 4), np.float32)
    tiles[0] = 0.9
    tiles[1] = 0.1
    tiles[:, 0:2, 0:2] = np.array([0.2, 0.8])[:, None, None]  # 4 tumour tiles, top-left
    tiles[:, 3, 3] = np.nan  # not computed
    run = write_run(
        tmp_path / "a.hand-idc.zarr",
        spec=spec,
        image="a.tif",
        shape=(4000, 4000, 3),
        mpp=0.5,
        pixel=1000.0,
        tiles=tiles,
    )
    ctx = context((4000, 4000), 0.5)
    (m,) = [x for x in measure_run(open_run(run), None, ctx) if x.kind == "tumour"]  # type: ignore[arg-type]
    # 4 tiles of 1000 px = 0.5 mm side: 1 mm² of 4 mm²
    assert m.values["tumour_mm2"] == pytest.approx(1.0)
    assert m.values["fraction"] == pytest.approx(0.25)
    assert "About 25% of the tissue looks like tumour" in m.sentences[0]
    assert m.model == "hand-idc"
    # tissue only in the left half: the tumour is half of it
    mask = np.zeros((40, 40), bool)
    mask[:, :20] = True
    (m,) = [
        x
        for x in measure_run(open_run(run), None, context((4000, 4000), 0.5, mask))  # type: ignore[arg-type]
        if x.kind == "tumour"
    ]
    assert m.values["fraction"] == pytest.approx(0.5)
    assert m.values["tissue_mm2"] == pytest.approx(2.0)


def test_cancer_fraction_from_a_tissue_mask(tmp_path):
    classes = ["cancer", "non-tumour tissue", "background"]
    spec = _spec(
        {
            "name": "hand-tissue-fcn",
            "task": "tissue classes",
            "activation": "softmax",
            "outputs": [
                {
                    "name": "tissue",
                    "kind": "probability",
                    "channels": [0, 1, 2],
                    "classes": classes,
                },
                {
                    "name": "tissue classes",
                    "kind": "mask",
                    "channels": [0, 1, 2],
                    "classes": classes,
                    "threshold": 0.5,
                },
            ],
        }
    )
    prob = np.zeros((3, 100, 100), np.uint8)
    prob[2] = 255  # background everywhere...
    prob[:, :50, :] = np.array([0, 255, 0], np.uint8)[:, None, None]  # ...but tissue on top
    prob[:, :50, :20] = np.array([255, 0, 0], np.uint8)[:, None, None]  # 20 % of it cancer
    run = write_run(
        tmp_path / "a.hand-tissue-fcn.zarr",
        spec=spec,
        image="a.tif",
        shape=(400, 400, 3),
        mpp=0.5,
        pixel=4.0,
        prob=prob,
    )
    measures = measure_run(open_run(run), None, context((400, 400), 0.5))  # type: ignore[arg-type]
    (m,) = [x for x in measures if x.kind == "tumour"]
    assert m.values["fraction"] == pytest.approx(0.2)
    assert m.values["tumour_mm2"] == pytest.approx(50 * 20 * 16 * 0.25e-6)
    assert m.values["class"] == "cancer"
    assert not [x for x in measures if x.kind == "generic"]  # both outputs were used


# ----------------------------------------------------------------------------- malignancy
def _malignancy_run(tmp_path: Path, method: str) -> Path:
    spec = _spec(
        {
            "name": f"hand-bm-{method}",
            "task": "benign / malignant",
            "dense": False,
            "activation": "softmax",
            "outputs": [
                {
                    "name": "malignancy",
                    "kind": "class",
                    "channels": [0, 1],
                    "classes": ["benign", "malignant"],
                    "aggregate": method,
                }
            ],
        }
    )
    tiles = np.full((2, 2, 2), np.nan, np.float32)
    p_mal = np.array([[0.9, 0.8], [0.7, 0.2]], np.float32)
    tiles[1] = p_mal
    tiles[0] = 1 - p_mal
    return write_run(
        tmp_path / f"a.{method}.zarr",
        spec=spec,
        image="a.tif",
        shape=(200, 200, 3),
        mpp=0.5,
        pixel=100.0,
        tiles=tiles,
    )


def test_vote_is_explained_in_words_with_the_mean_crop_probability(tmp_path):
    run = open_run(_malignancy_run(tmp_path, "vote"))
    (m,) = measure_run(run, None, context((200, 200), 0.5))  # type: ignore[arg-type]
    assert m.kind == "malignancy"
    assert m.values["call"] == "malignant"
    assert m.values["malignant_score"] == pytest.approx(0.75)
    assert m.values["mean_probability"] == pytest.approx(0.65)
    assert "vote: 75% of 4 image crops" in m.sentences[0]
    assert "called malignant" in m.sentences[0]
    assert "0.65" in m.sentences[1]


def test_average_is_explained_as_a_mean(tmp_path):
    run = open_run(_malignancy_run(tmp_path, "average"))
    (m,) = measure_run(run, None, context((200, 200), 0.5))  # type: ignore[arg-type]
    assert m.values["method"] == "average"
    assert m.values["malignant_score"] == pytest.approx(0.65)
    assert "the mean of the crops' probabilities: 0.65 malignant over 4 crops" in m.sentences[0]


# ----------------------------------------------------------------------------- magnification
def _mag_run(tmp_path: Path, value: float) -> Any:
    spec = _spec(
        {
            "name": "hand-mag",
            "task": "magnification",
            "dense": False,
            "activation": "none",
            "outputs": [
                {
                    "name": "magnification",
                    "kind": "magnification",
                    "channels": [0],
                    "aggregate": "median",
                }
            ],
        }
    )
    path = write_run(
        tmp_path / f"m{value}.zarr",
        spec=spec,
        image="a.tif",
        shape=(200, 200, 3),
        mpp=0.5,
        pixel=100.0,
        tiles=np.full((1, 2, 2), value, np.float32),
        aggregates={"magnification": {"method": "median", "value": value, "n_tiles": 4}},
    )
    return open_run(path)


@pytest.mark.parametrize(
    ("objective", "mpp", "estimate", "verdict"),
    [
        (20.0, 0.5, 21.0, "consistent"),
        (40.0, 0.25, 29.0, "disagrees by 1 class"),  # classes 5, 8, 10, 15, 20, 30, 40
        (40.0, 0.25, 9.0, "disagrees by 4 classes"),
        (None, None, 20.0, "metadata missing"),
        (None, 0.25, 40.0, "consistent"),  # no objective: 10 µm/px ÷ mpp = 40×
    ],
)
def test_magnification_verdicts(tmp_path, objective, mpp, estimate, verdict):
    ctx = context((200, 200), mpp)
    m = measure_magnification(
        _mag_run(tmp_path, estimate), fake_pyramid(objective, mpp), ctx, classical=False
    )
    assert m.values["verdict"] == verdict
    if verdict == "metadata missing":
        assert "neither the objective power nor the pixel size" in m.sentences[0]
    elif verdict == "consistent":
        assert "which agree" in m.sentences[0]
    elif verdict == "disagrees by 1 class":
        assert "mild disagreement" in m.sentences[0]
    else:
        assert "check the scanner metadata" in m.sentences[0]


# ----------------------------------------------------------------------------- other kinds
def test_boxes_table_in_mm_and_generic_fallback(tmp_path):
    spec = _spec(
        {
            "name": "hand-mass",
            "task": "mass detection",
            "io": {"patch_size": 64, "channels": 1},
            "outputs": [
                {
                    "name": "masses",
                    "kind": "boxes",
                    "size_channels": [3, 4],
                    "channels": [0, 1],
                    "classes": ["benign", "malignant"],
                },
                {
                    "name": "calcifications",
                    "kind": "points",
                    "channels": [2],
                    "classes": ["calcification"],
                },
            ],
        }
    )
    ring = [[100, 200], [300, 200], [300, 250], [100, 250], [100, 200]]  # x 100-300, y 200-250
    boxes = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"class": "malignant", "score": 0.8},
        },
    ]
    run = write_run(
        tmp_path / "m.zarr",
        spec=spec,
        image="m.pgm",
        shape=(1000, 1000),
        mpp=200.0,
        objects={"masses": boxes, "calcifications": [point(5, 5, 0.6, "calcification")] * 3},
    )
    measures = measure_run(open_run(run), None, context((1000, 1000), 200.0))  # type: ignore[arg-type]
    (b,) = [m for m in measures if m.kind == "boxes"]
    assert b.values["count"] == 1
    # centre x 200 px, y 225 px at 0.2 mm/px = 40, 45 mm; 200 × 50 px = 40 × 10 mm
    assert b.table[1] == ["1", "malignant", "0.80", "40.0, 45.0 mm", "40.0 × 10.0 mm"]
    (g,) = [m for m in measures if m.kind == "generic"]
    assert g.values["calcifications"] == {"calcification": 3}  # not dropped silently


def test_volume_report_lesions_in_mm_and_the_slice_of_the_largest(tmp_path):
    import nibabel as nib

    vol = np.zeros((64, 48, 8), np.float32)  # NIfTI x, y, z: 8 slices of 48 × 64
    vol[10:30, 10:20, 5] = 1.0
    image = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.5, 2.0, 1.0])), str(image))
    from napari_histo_ai.io import open_image

    pyramid = open_image(image)
    shape = tuple(int(v) for v in pyramid.levels[0].shape)
    pyramid.close()
    spec = _spec(
        {
            "name": "hand-mri",
            "task": "tumour segmentation",
            "io": {"patch_size": 64, "channels": 1},
            "outputs": [
                {"name": "tumour", "kind": "probability", "channels": [0], "classes": ["tumour"]},
                {
                    "name": "tumour diameters",
                    "kind": "lines",
                    "channels": [0],
                    "classes": ["tumour"],
                },
            ],
        }
    )
    line = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [[10, 10], [20, 30]]},
        "properties": {
            "class": "tumour",
            "score": 0.9,
            "plane": [5],
            "length_mm": 11.2,
            "volume_mm3": 100.0,
        },
    }
    small = {
        "type": "Feature",
        "geometry": {"type": "LineString", "coordinates": [[1, 1], [2, 2]]},
        "properties": {
            "class": "tumour",
            "score": 0.6,
            "plane": [2],
            "length_mm": 0.7,
            "volume_mm3": 0.5,
        },
    }
    prob = np.zeros((1, shape[0], shape[1], shape[2]), np.uint8)
    prob[0, 5, 10:30, 10:20] = 255
    run = write_run(
        tmp_path / "brain.hand-mri.zarr",
        spec=spec,
        image=image,
        shape=shape,
        mpp=None,
        prob=prob,
        objects={"tumour diameters": [line, small]},
        planes=(shape[0],),
    )
    result = make_report(ReportRequest(images=(image,), out_dir=tmp_path / "out", runs=(run,)))
    (s,) = result.report.slides
    assert s.kind == "volume" and s.measure("tissue") is None
    les = s.measure("lesions")
    assert les.values["count"] == 2
    assert "2 lesions; the largest measures 11.2 mm across" in les.sentences[0]
    assert "slice 5" in les.sentences[0] and "slice 5" in s.thumbnail_caption
    assert s.mpp == [500.0, 500.0] and s.mpp_source == "voxel spacing"
    assert [row[1] for row in les.table[1:]] == ["11.2 mm", "0.7 mm"]
    assert result.files["thumbnail"].read_bytes().startswith(b"\x89PNG")


def test_run_folder_of_another_image_is_refused(tmp_path):
    run = write_run(
        tmp_path / "r.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="/slides/other.svs",
        shape=(500, 400, 3),
        mpp=0.5,
    )
    with pytest.raises(HistoAIError) as info:
        check_run_image(open_run(run), "/slides/mine.svs", (500, 400, 3))
    text = str(info.value)
    assert "other.svs" in text and "mine.svs" in text and str(run) in text
    with pytest.raises(HistoAIError, match="shape"):
        check_run_image(open_run(run), "/elsewhere/other.svs", (600, 400, 3))
    check_run_image(open_run(run), "/moved/other.svs", (500, 400, 3))  # moved: same name


def test_not_a_run_folder_is_refused(tmp_path):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(HistoAIError, match="not a napari-histo-ai run folder"):
        open_run(tmp_path / "x.zarr")


def test_fmt_number():
    assert fmt_number(1224) == "1,224"
    assert fmt_number(2.37) == "2.37"
    assert fmt_number(0.465) == "0.465"
    assert fmt_number(57.83) == "57.8"
    assert fmt_number(None) == "n/a"
    assert fmt_number(float("nan")) == "n/a"


# ----------------------------------------------------------------------------- the job
def test_report_job_runs_reuses_and_writes_every_file(slide, tmp_path):
    out = tmp_path / "out"
    req = ReportRequest(images=(slide,), out_dir=out, models=(TINY,), device="cpu")
    steps = []
    result = make_report(req, on_progress=steps.append)
    names = [s.step for s in steps]
    assert names[0] == f"run {TINY}" and names[-1] == "json"
    assert any(s.total > 0 and s.done == s.total for s in steps)  # tile progress
    assert {s.n_steps for s in steps} == {6}
    fractions = [s.fraction for s in steps]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and fractions[-1] <= 1
    for key in ("html", "pdf", "json", "thumbnail"):
        assert result.files[key].is_file(), key
    assert result.files["pdf"].read_bytes().startswith(b"%PDF")
    assert result.files["thumbnail"].read_bytes().startswith(b"\x89PNG")
    data = json.loads(result.files["json"].read_text())
    assert data["complete"] is True
    assert result.runs == (out / f"alpha.{TINY}.zarr",)
    # the report's count is the run's
    summary = json.loads((result.runs[0] / "summary.json").read_text())
    (section,) = result.report.slides
    assert section.measure("mitosis").values["count"] == summary["objects"]["mitoses"]
    entry = section.models[0]
    assert entry.parent == "tiny-parent 0" and len(entry.weights_sha256) == 12
    page = result.files["html"].read_text()
    assert "Research use only, not a diagnosis" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # up to date: same request; a second call reuses the run
    assert up_to_date(req)["complete"] is True
    again = []
    make_report(req, on_progress=again.append)
    assert "reusing the complete run" in again[0].message
    assert (
        up_to_date(
            ReportRequest(
                images=(slide,),
                out_dir=out,
                models=(TINY,),
                options=ReportOptions(hpf_area_mm2=0.3),
            )
        )
        is None
    )
    assert (
        up_to_date(ReportRequest(images=(slide,), out_dir=tmp_path / "other", models=(TINY,)))
        is None
    )


def test_given_runs_and_refused_runs(slide, sample, tmp_path):
    out = tmp_path / "out"
    first = make_report(
        ReportRequest(images=(slide,), out_dir=out, models=(TINY,), device="cpu", formats=("html",))
    )
    assert "pdf" not in first.files
    again = make_report(
        ReportRequest(images=(slide,), out_dir=tmp_path / "b", runs=first.runs, formats=("html",))
    )
    assert again.runs == first.runs
    with pytest.raises(HistoAIError) as info:
        make_report(ReportRequest(images=(sample,), out_dir=tmp_path / "c", runs=first.runs))
    assert "alpha.tif" in str(info.value) and sample.name in str(info.value)


def test_cancel_writes_nothing_and_leaves_the_run_resumable(slide, tmp_path):
    cancel = threading.Event()
    out = tmp_path / "out"
    gen = report_job(
        ReportRequest(
            images=(slide,), out_dir=out, models=(TINY,), device="cpu", config=_config(batch_size=1)
        ),
        cancel=cancel,
    )
    seen = 0
    result = None
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        if p.done > 0:
            seen += 1
            cancel.set()
    assert result is not None and result.cancelled and result.files == {}
    assert not (out / "alpha.report.json").exists()
    summary = json.loads((out / f"alpha.{TINY}.zarr" / "summary.json").read_text())
    assert summary["cancelled"] and not summary["complete"]
    done = make_report(ReportRequest(images=(slide,), out_dir=out, models=(TINY,), device="cpu"))
    assert not done.cancelled and done.files["json"].is_file()


def _config(**kw: Any) -> Any:
    from napari_histo_ai.inference.engine import RunConfig

    return RunConfig(**kw)


def test_a_failed_write_keeps_the_previous_report(slide, tmp_path, monkeypatch):
    out = tmp_path / "out"
    req = ReportRequest(images=(slide,), out_dir=out, models=(TINY,), device="cpu")
    first = make_report(req)
    before = {k: p.read_bytes() for k, p in first.files.items()}

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("disk full")

    import napari_histo_ai.reports.pdf as pdf

    monkeypatch.setattr(pdf, "render_pdf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_report(
            ReportRequest(
                images=(slide,),
                out_dir=out,
                models=(TINY,),
                options=ReportOptions(title="New title"),
            )
        )
    assert first.files["pdf"].read_bytes() == before["pdf"]
    assert first.files["json"].read_bytes() == before["json"]  # the json is written last
    assert not list(out.glob(".*.tmp*"))  # no temporary file left behind


def test_corrections_from_an_annotation_store(slide, tmp_path):
    from napari_histo_ai.annotations.model import Annotation, ImageRef
    from napari_histo_ai.annotations.store import AnnotationStore
    from napari_histo_ai.io import open_image

    pyramid = open_image(slide)
    ref = ImageRef.from_pyramid(pyramid)
    pyramid.close()
    store_path = tmp_path / "alpha.annotations.sqlite"
    store = AnnotationStore.create(store_path, ref, classes=["mitosis"])
    pts = [
        ("accepted", 100),
        ("accepted", 200),
        ("added", 300),
        ("corrected", 350),
        ("rejected", 400),
        ("rejected", 450),
        ("unreviewed", 500),
    ]
    store.add(
        [
            Annotation(
                "point",
                np.array([[r, r]], float),
                "mitosis",
                source=TINY,
                review=review,
                confidence=0.8,
            )
            for review, r in pts
        ]
    )
    store.close()
    result = make_report(
        ReportRequest(
            images=(slide,),
            out_dir=tmp_path / "out",
            models=(TINY,),
            annotations=store_path,
            device="cpu",
            formats=("html",),
        )
    )
    m = result.report.slides[0].measure("mitosis")
    assert m.values["count"] == 5  # 4 confirmed + 1 unreviewed model call; 2 rejected
    assert m.values["reviewed"] == {"counted": 5, "confirmed": 4, "unreviewed": 1, "rejected": 2}
    assert m.model == TINY
    # without a mitosis run in the report, the reviewed objects are counted on their own
    tiles = np.full((1, 2, 2), 20.0, np.float32)
    mag_spec = {
        "name": "hand-mag",
        "task": "magnification",
        "dense": False,
        "activation": "none",
        "outputs": [{"name": "magnification", "kind": "magnification", "channels": [0]}],
    }
    mag = write_run(
        tmp_path / "alpha.hand-mag.zarr",
        spec=_spec(mag_spec),
        image=slide,
        shape=(640, 768, 3),
        mpp=0.499,
        pixel=384.0,
        tiles=tiles,
    )
    alone = make_report(
        ReportRequest(
            images=(slide,),
            out_dir=tmp_path / "alone",
            runs=(mag,),
            annotations=store_path,
            formats=(),
        )
    )
    m = alone.report.slides[0].measure("mitosis")
    assert m is not None and m.model is None and m.values["count"] == 5
    assert m.sentences[0].startswith("After review (some detections still unchecked) there are 5")


def test_patient_report_of_two_slides(slide, sample, tmp_path):
    from napari_histo_ai.io.synthetic import make_slide

    other = make_slide(tmp_path / "beta.tif", width=512, height=512, source=sample)
    result = make_report(
        ReportRequest(
            images=(slide, other),
            out_dir=tmp_path / "out",
            models=(TINY,),
            device="cpu",
            options=ReportOptions(patient="P-007"),
            formats=("html",),
        )
    )
    report = result.report
    assert len(report.slides) == 2 and report.title == "Patient report"
    (pm,) = [m for m in report.patient if m.kind == "mitosis"]
    counts = [s.measure("mitosis").values["count"] for s in report.slides]
    assert pm.values["count"] == sum(counts)
    assert report.summary[0] == "2 slides of patient P-007."
    rows = report.rows()
    assert [r["name"] for r in rows] == ["alpha.tif", "beta.tif"]
    assert all(r["patient"] == "P-007" for r in rows)
    assert "thumbnail_1" in result.files


def test_rows_and_json_are_plain(slide, tmp_path):
    result = make_report(
        ReportRequest(images=(slide,), out_dir=tmp_path, models=(TINY,), device="cpu", formats=())
    )
    (row,) = result.report.rows()
    assert row["mpp"] == pytest.approx(0.499)
    assert row["mitoses"] == result.report.slides[0].measure("mitosis").values["count"]
    assert all(v is None or isinstance(v, str | int | float) for v in row.values())
    json.dumps(result.report.to_dict(), allow_nan=False)


def test_unknown_model_and_format_are_bad_input(slide, tmp_path):
    with pytest.raises(HistoAIError, match="no-such-model"):
        make_report(ReportRequest(images=(slide,), out_dir=tmp_path, models=("no-such-model",)))
    with pytest.raises(HistoAIError, match="docx"):
        make_report(ReportRequest(images=(slide,), out_dir=tmp_path, formats=("docx",)))


# ----------------------------------------------------------------------------- CLI
def test_cli_report_prints_files_and_summary(slide, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "report",
            str(slide),
            "--model",
            TINY,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--hpf-area",
            "0.25",
            "--format",
            "html",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert set(data["files"]) == {"html", "json", "thumbnail"}
    assert Path(data["files"]["html"]).is_file()
    assert data["summary"] and data["summary"][0] in captured.err
    assert "per 10 HPF of 0.25 mm²" in data["summary"][0]


def test_cli_report_errors_are_one_line(slide, tmp_path, capsys):
    bad = write_run(
        tmp_path / "x.zarr",
        spec=_spec(MITOSIS_SPEC),
        image="/a/other.tif",
        shape=(9, 9, 3),
        mpp=0.5,
    )
    code = main(["report", str(slide), "--run", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "other.tif" in err[0]
    code = main(["report", str(slide), "--out", str(tmp_path / "o"), "--format", "docx"])
    assert code == 2
    assert "--format" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real sample
@pytest.mark.slow
def test_default_panel_on_the_sample_matches_the_runs(sample, tmp_path):
    """The H&E panel (4 models, ≈ 25 s on 2 CPU cores) on the real CMU-1 sample."""
    result = make_report(ReportRequest(images=(sample,), out_dir=tmp_path, device="cpu"))
    (s,) = result.report.slides
    runs = {open_run(r).model: open_run(r) for r in result.runs}
    assert set(runs) == {"mitosis-fcn", "idc-tumour", "breakhis-resnet", "magnification-shallownet"}
    assert all(r.complete for r in runs.values())
    assert s.mpp == [0.499, 0.499] and s.objective_power == 20
    tissue = s.measure("tissue").values["area_mm2"]
    assert 0 < tissue < 2220 * 2967 * 0.499**2 * 1e-6
    mit = s.measure("mitosis").values
    assert mit["count"] == runs["mitosis-fcn"].summary["objects"]["mitoses"]
    assert mit["per_mm2"] == pytest.approx(mit["count"] / tissue)
    assert mit["per_hpf"] == pytest.approx(mit["count"] / tissue * 2.37)
    assert mit["hotspot_count"] <= mit["count"]
    mal = s.measure("malignancy").values
    agg = runs["breakhis-resnet"].summary["aggregates"]["malignancy"]
    assert mal["malignant_score"] == pytest.approx(agg["scores"]["malignant"])
    assert mal["n_tiles"] == agg["n_tiles"] and mal["call"] == agg["class"]
    mag = s.measure("magnification").values
    est = runs["magnification-shallownet"].summary["aggregates"]["magnification"]["value"]
    assert mag["estimate"] == pytest.approx(est)
    assert mag["metadata"] == 20 and mag["verdict"] in ("consistent", "disagrees by 1 class")
    tum = s.measure("tumour").values
    assert 0 <= tum["fraction"] <= 1
    assert tum["tumour_mm2"] == pytest.approx(tum["fraction"] * tissue)
    assert 3 <= len(result.report.summary) <= 6
    assert len(s.models) == 4 and all(m.weights_sha256 for m in s.models)


def test_the_default_panel_leaves_field_classifiers_out_of_large_slides():
    import dask.array as da

    from napari_histo_ai.io.pyramid import Pyramid
    from napari_histo_ai.reports.job import default_panel, panel_for

    def rgb(side: int) -> Pyramid:
        level = da.zeros((side, side, 3), dtype="uint8", chunks=(256, 256, 3))
        return Pyramid([level], "YXS", "image", "x.tif", "tiff", "tifffile", mpp=(0.5, 0.5))

    assert "breakhis-resnet" in default_panel("slide")
    models, notes = panel_for(rgb(512))
    assert models == default_panel("slide") and notes == ()
    models, notes = panel_for(rgb(4096))
    assert "breakhis-resnet" not in models and "mitosis-fcn" in models
    (note,) = notes
    assert note.startswith("breakhis-resnet was not run") and "17 megapixels" in note
