"""Training-set export: patches at an exact mpp around reviewed objects, hard-negative
flags, negatives away from objects, targets, crash-safe manifests (real AnnotationStore)."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from napari_histo_ai.annotations.model import HUMAN, Annotation, ImageRef
from napari_histo_ai.annotations.store import AnnotationStore
from napari_histo_ai.annotations.store_paths import (
    STORE_SUFFIX,
    default_labels_path,
    default_store_path,
)
from napari_histo_ai.annotations.training_set import (
    MANIFEST_CSV,
    MANIFEST_JSON,
    _grid,
    _resample,
    export_training_set,
    export_training_set_sync,
    read_manifest,
)
from napari_histo_ai.errors import AnnotationError
from napari_histo_ai.io.pyramid import Pyramid

SAMPLE_SVS = Path(__file__).resolve().parents[1] / "src/napari_histo_ai/data/CMU-1-Small-Region.svs"


def memory_pyramid(
    arr: np.ndarray, *, mpp: float | None, n_levels: int = 1, chunk: int = 128
) -> Pyramid:
    """A lazy in-memory pyramid (2x2 mean levels) over a (H, W[, C]) array."""
    axes = "YXS" if arr.ndim == 3 else "YX"
    levels = [da.from_array(arr, chunks=(chunk, chunk, *arr.shape[2:]))]
    cur = arr
    for _ in range(1, n_levels):
        c = cur.astype(np.float64)
        cur = (0.25 * (c[::2, ::2] + c[1::2, ::2] + c[::2, 1::2] + c[1::2, 1::2])).astype(arr.dtype)
        levels.append(da.from_array(cur, chunks=(chunk, chunk, *arr.shape[2:])))
    return Pyramid(
        levels, axes, "image", "memory.tif", "test", "test", mpp=(mpp, mpp) if mpp else None
    )


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Tissue-like uint8 RGB noise (mean ~ 150, std ~ 40)."""
    rng = np.random.default_rng(seed)
    return rng.normal(150, 40, (h, w, 3)).clip(0, 255).astype(np.uint8)


def make_store(tmp_path: Path, pyramid: Pyramid, classes=("mitosis",)) -> AnnotationStore:
    ref = ImageRef.from_pyramid(pyramid, hash_content=False)
    return AnnotationStore.create(tmp_path / "a.annotations.sqlite", ref, classes=classes)


def point(r: float, c: float, review: str, *, source: str = "mitosis-net", cls="mitosis"):
    return Annotation(
        "point",
        [[r, c]],
        cls,
        source=source,
        model_version=None if source == HUMAN else "1.2",
        annotator=None if review == "unreviewed" else "ann",
        confidence=None if source == HUMAN else 0.9,
        review=review,
    )


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / MANIFEST_CSV, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- flags
@pytest.fixture
def reviewed(tmp_path):
    pyr = memory_pyramid(texture(1024, 1024), mpp=0.5)
    store = make_store(tmp_path, pyr)
    ids = store.add(
        [
            point(200.5, 200.5, "accepted"),
            point(300.5, 700.5, "corrected"),
            point(700.5, 300.5, "added", source=HUMAN),
            point(800.5, 800.5, "rejected"),  # model false positive -> hard negative
            point(500.5, 500.5, "unreviewed"),  # never a positive, still avoided
            point(100.5, 900.5, "rejected", source=HUMAN),  # a person's own mistake
        ]
    )
    yield pyr, store, ids
    store.close()


def test_positives_hard_negatives_and_added_misses_are_flagged(reviewed, tmp_path):
    pyr, store, ids = reviewed
    out = tmp_path / "ts"
    m = export_training_set_sync(
        store, pyr, out, mpp=0.5, patch_size=64, targets="points", negatives_per_positive=2.0
    )
    assert m.complete
    assert m.counts["positive"] == 3 and m.counts["hard_negative"] == 1
    assert m.counts["negative"] == 8 and m.counts["negative_shortfall"] == 0  # 2 x (3 + 1)
    assert m.counts["unreviewed_skipped"] == 1 and m.counts["rejected_human_skipped"] == 1
    table = rows(out)
    assert len(table) == 12  # 3 positives, 1 hard negative, 8 negatives
    by_id = {r["object_id"]: r for r in table if r["object_id"]}
    assert set(by_id) == {str(i) for i in ids[:4]}
    assert by_id[str(ids[3])]["kind"] == "hard_negative"
    assert by_id[str(ids[3])]["hard_negative"] == "1"
    assert by_id[str(ids[3])]["model_version"] == "1.2"
    assert by_id[str(ids[2])]["added_miss"] == "1" and by_id[str(ids[2])]["source"] == HUMAN
    assert by_id[str(ids[0])]["hard_negative"] == "0" and by_id[str(ids[0])]["added_miss"] == "0"
    assert float(by_id[str(ids[1])]["x"]) == 700.5 and float(by_id[str(ids[1])]["y"]) == 300.5
    assert m.model_versions == ["mitosis-net:1.2"] and m.annotators == ["ann"]
    # negatives: the whole patch (32 level-0 px each side) meets no object at all
    objects = np.array([a.coords[0] for a in store.iter_all()])
    for r in table:
        if r["kind"] == "negative":
            d = np.abs(objects - [float(r["y"]), float(r["x"])]).max(axis=1)
            assert d.min() >= 32
            assert r["object_id"] == "" and r["hard_negative"] == "0"
    # the manifest JSON carries the provenance and the exact parameters
    data = json.loads((out / MANIFEST_JSON).read_text())
    assert data["schema_version"] == 1 and data["mpp"] == 0.5 and data["patch_size"] == 64
    assert data["image"]["shape"] == [1024, 1024] and "content_hash" in data["image"]
    assert data["store"] == str(store.path.resolve())
    assert data["parameters"]["negatives_per_positive"] == 2.0
    assert len(data["samples"]) == 12
    back = read_manifest(out)
    assert back.samples == m.samples and back.counts == m.counts


def test_point_targets_peak_at_the_object_and_skip_rejected(reviewed, tmp_path):
    pyr, store, ids = reviewed
    m = export_training_set_sync(
        store, pyr, tmp_path / "ts", mpp=1.0, patch_size=33, targets="points", sigma_um=4.0
    )
    # mpp=None: the image's own 0.5 µm/px
    native = export_training_set_sync(store, pyr, tmp_path / "n", mpp=None, patch_size=16)
    assert native.mpp == 0.5 and native.parameters["level"] == 0
    pos = next(s for s in m.samples if s.object_id == ids[0])
    target = tifffile.imread(m.path / pos.target)
    assert target.shape == (33, 33) and target.dtype == np.float32
    # an odd patch centred on the object: the middle pixel's centre is the object, peak 1
    assert target[16, 16] == 1.0 and target.max() == 1.0
    # sigma 4 µm = 4 patch px at 1 µm/px: exp(-1/2) one sigma away
    assert target[16, 20] == pytest.approx(np.exp(-0.5), rel=1e-6)
    assert target[12, 16] == pytest.approx(np.exp(-0.5), rel=1e-6)
    hard = next(s for s in m.samples if s.kind == "hard_negative")
    assert tifffile.imread(m.path / hard.target).max() == 0.0
    image = np.asarray(Image.open(m.path / pos.image))
    assert image.shape == (33, 33, 3) and image.dtype == np.uint8


# --------------------------------------------------------------------------- resolution
def ramp(h: int, w: int) -> np.ndarray:
    """value = 3 * row + col: linear, so every level and every bilinear sample is exact."""
    r, c = np.mgrid[0:h, 0:w]
    return (3.0 * r + c).astype(np.float32)


def expected_ramp(centre, patch, step):
    """Ramp value at the centre of each patch pixel (level-0 index = continuous - 0.5)."""
    i = np.arange(patch) + 0.5
    rows = centre[0] - patch * step / 2 + i * step - 0.5
    cols = centre[1] - patch * step / 2 + i * step - 0.5
    return 3 * rows[:, None] + cols[None, :]


@pytest.mark.parametrize("mpp", [0.25, 0.375, 0.5, 0.75, 1.3])
def test_patches_are_at_exactly_the_requested_mpp(tmp_path, mpp):
    pyr = memory_pyramid(ramp(1024, 1024), mpp=0.25, n_levels=3)
    store = make_store(tmp_path, pyr)
    store.add([point(512.0, 500.0, "accepted")])
    m = export_training_set_sync(
        store,
        pyr,
        tmp_path / "ts",
        mpp=mpp,
        patch_size=48,
        targets="points",
        negatives_per_positive=0,
        image_format="tif",
    )
    store.close()
    (s,) = m.samples
    patch = tifffile.imread(m.path / s.image)
    assert patch.shape == (48, 48) and patch.dtype == np.float32
    want = expected_ramp((512.0, 500.0), 48, mpp / 0.25)
    np.testing.assert_allclose(patch, want, atol=0.05)
    assert m.parameters["level"] == {0.25: 0, 0.375: 0, 0.5: 1, 0.75: 1, 1.3: 2}[mpp]


@settings(max_examples=30, deadline=None)
@given(
    mpp=st.floats(0.25, 1.6),
    cy=st.floats(200, 800),
    cx=st.floats(200, 800),
)
def test_resampling_is_exact_on_a_linear_pattern(mpp, cy, cx):
    pyr = memory_pyramid(ramp(1024, 1024), mpp=0.25, n_levels=3)
    grid = _grid(pyr, mpp, 16)
    from napari_histo_ai.annotations.training_set import _read_level_window

    def read(top, left, h, w):
        return _read_level_window(pyr, grid.level, (), top, left, h, w)

    patch = _resample(read, grid, (cy, cx), order=1, dtype=np.dtype(np.float32))
    np.testing.assert_allclose(patch, expected_ramp((cy, cx), 16, mpp / 0.25), atol=0.05)


# --------------------------------------------------------------------------- targets
def test_mask_targets_from_polygons_and_boxes(tmp_path):
    pyr = memory_pyramid(texture(512, 512), mpp=0.5)
    store = make_store(tmp_path, pyr, classes=("tumour", "stroma"))
    square = [[200.0, 200.0], [200.0, 240.0], [240.0, 240.0], [240.0, 200.0]]
    store.add(
        [
            Annotation("polygon", square, "stroma", review="added"),
            Annotation("box", [[100.0, 300.0], [120.0, 340.0]], "tumour", review="added"),
        ]
    )
    m = export_training_set_sync(
        store, pyr, tmp_path / "ts", mpp=1.0, patch_size=64, negatives_per_positive=0
    )
    store.close()
    assert m.targets == "mask" and m.mask_values == {"1": "tumour", "2": "stroma"}
    poly = next(s for s in m.samples if s.class_name == "stroma")
    mask = np.asarray(Image.open(m.path / poly.target))
    assert mask.dtype == np.uint8 and mask.shape == (64, 64)
    # 40 x 40 level-0 px at 0.5 µm/px = 20 x 20 patch px of 1 µm, centred
    assert set(np.unique(mask)) == {0, 2}
    assert (mask == 2).sum() == 400
    assert mask[22:42, 22:42].min() == 2 and mask[21, 32] == 0 and mask[42, 32] == 0
    box = next(s for s in m.samples if s.class_name == "tumour")
    bmask = np.asarray(Image.open(m.path / box.target))
    assert (bmask == 1).sum() == 10 * 20


def test_mask_targets_from_a_label_pyramid(tmp_path):
    from napari_histo_ai.annotations.labels import LabelPyramid

    pyr = memory_pyramid(texture(512, 512), mpp=0.5)
    store = make_store(tmp_path, pyr, classes=("tumour",))
    ref = store.image
    mask = np.zeros((512, 512), dtype=np.uint16)
    mask[200:240, 200:240] = 2
    mask[0:20, 0:512] = 1  # a band at the top edge: negatives must avoid labelled pixels
    labels = LabelPyramid.from_array(
        tmp_path / "l.labels.zarr", mask, image=ref, chunk=128, classes={1: "edge", 2: "tumour"}
    )
    square = [[200.0, 200.0], [200.0, 240.0], [240.0, 240.0], [240.0, 200.0]]
    store.add([Annotation("polygon", square, "tumour", review="accepted")])
    m = export_training_set_sync(
        store,
        pyr,
        tmp_path / "ts",
        mpp=1.0,
        patch_size=64,
        labels=labels,
        negatives_per_positive=3,
    )
    store.close()
    assert m.targets == "mask" and m.mask_values == {"1": "edge", "2": "tumour"}
    target = np.asarray(Image.open(m.path / m.samples_of("positive")[0].target))
    assert target.dtype == np.uint16 and (target == 2).sum() == 400
    assert target[22:42, 22:42].min() == 2
    assert len(m.samples_of("negative")) == 3
    for s in m.samples_of("negative"):
        assert s.y - 64 >= 20 - 2  # the labelled band stays outside every negative patch
        assert not np.asarray(Image.open(m.path / s.target)).any()


def test_box_targets_in_patch_pixels(tmp_path):
    pyr = memory_pyramid(texture(512, 512), mpp=0.5)
    store = make_store(tmp_path, pyr, classes=("mass",))
    store.add([Annotation("box", [[100.0, 300.0], [120.0, 340.0]], "mass", review="accepted")])
    m = export_training_set_sync(
        store, pyr, tmp_path / "ts", mpp=1.0, patch_size=64, negatives_per_positive=1
    )
    store.close()
    assert m.targets == "boxes"
    pos = m.samples_of("positive")[0]
    data = json.loads((m.path / pos.target).read_text())
    (b,) = data["boxes"]
    # centre (110, 320) at patch px 32: the box spans 10 x 20 patch px around it
    assert b["box"] == [27.0, 22.0, 37.0, 42.0] and b["class"] == "mass"
    neg = m.samples_of("negative")[0]
    assert json.loads((m.path / neg.target).read_text())["boxes"] == []


def test_negatives_reject_white_background(tmp_path):
    arr = texture(512, 1024)
    arr[:, :512] = 250  # left half: empty glass
    pyr = memory_pyramid(arr, mpp=0.5)
    store = make_store(tmp_path, pyr)
    store.add([point(256.5, 768.5, "accepted"), point(100.5, 900.5, "accepted")])
    m = export_training_set_sync(
        store, pyr, tmp_path / "ts", mpp=0.5, patch_size=32, negatives_per_positive=3
    )
    store.close()
    negatives = m.samples_of("negative")
    assert len(negatives) == 6
    assert all(s.x >= 512 - 16 for s in negatives)
    for s in negatives:
        assert np.asarray(Image.open(m.path / s.image)).std() > 12


def test_volume_patches_come_from_the_object_plane(tmp_path):
    z = np.arange(6, dtype=np.float32)[:, None, None]
    vol = np.broadcast_to(z * 1000 + ramp(128, 128)[None], (6, 128, 128)).copy()
    pyr = Pyramid(
        [da.from_array(vol, chunks=(1, 64, 64))],
        "ZYX",
        "volume",
        "vol.nii",
        "nifti",
        "nibabel",
        spacing_mm=(2.0, 0.5, 0.5),
    )
    store = make_store(tmp_path, pyr, classes=("tumour",))
    line = Annotation("line", [[60.0, 50.0], [70.0, 80.0]], "tumour", plane=(3,), review="added")
    store.add([line])
    m = export_training_set_sync(
        store,
        pyr,
        tmp_path / "ts",
        mpp=500.0,
        patch_size=48,
        negatives_per_positive=2,
        image_format="tif",
    )
    store.close()
    assert m.targets == "mask"
    for s in m.samples:
        assert s.plane == (3,)
        patch = tifffile.imread(m.path / s.image)
        assert patch.min() >= 3000 and patch.max() < 4000
    pos = m.samples_of("positive")[0]
    mask = tifffile.imread(m.path / pos.target)
    assert mask.sum() >= 30 and set(np.unique(mask)) == {0, 1}  # a 1-px line, 31 px long
    with open(m.path / MANIFEST_CSV, newline="") as fh:
        assert next(csv.DictReader(fh))["plane"] == "3"


# --------------------------------------------------------------------------- safety
def test_cancel_leaves_no_manifest_and_a_rerun_replaces_it(reviewed, tmp_path):
    pyr, store, _ = reviewed
    out = tmp_path / "ts"
    cancel = threading.Event()
    gen = export_training_set(store, pyr, out, mpp=0.5, patch_size=32, cancel=cancel)
    next(gen)
    cancel.set()
    with pytest.raises(StopIteration) as stop:
        next(gen)
    partial = stop.value.value
    assert not partial.complete and len(partial.samples) == 1
    assert not (out / MANIFEST_JSON).exists() and not (out / MANIFEST_CSV).exists()
    with pytest.raises(AnnotationError, match="cancelled or crashed"):
        read_manifest(out)
    stale = out / "images" / "stale.png"
    stale.write_bytes(b"old")
    m = export_training_set_sync(store, pyr, out, mpp=0.5, patch_size=32)
    assert m.complete and not stale.exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(s.image).name for s in m.samples
    )
    assert read_manifest(out / MANIFEST_JSON).counts == m.counts


def test_bad_input_is_refused_with_a_clear_message(reviewed, tmp_path):
    pyr, store, _ = reviewed
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(AnnotationError, match="not empty"):
        export_training_set_sync(store, pyr, foreign, mpp=0.5)
    nompp = memory_pyramid(texture(1024, 1024), mpp=None)
    with pytest.raises(AnnotationError, match="no pixel size"):
        export_training_set_sync(store, nompp, tmp_path / "a", mpp=0.5)
    other = memory_pyramid(texture(512, 512), mpp=0.5)
    with pytest.raises(AnnotationError, match="shape"):
        export_training_set_sync(store, other, tmp_path / "b", mpp=0.5)
    with pytest.raises(AnnotationError, match="targets"):
        export_training_set_sync(store, pyr, tmp_path / "c", mpp=0.5, targets="heatmap")
    with pytest.raises(AnnotationError, match="PNG"):
        export_training_set_sync(
            store, memory_pyramid(ramp(1024, 1024), mpp=0.5), tmp_path / "d", mpp=0.5
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_nothing_reviewed_is_refused(tmp_path):
    pyr = memory_pyramid(texture(256, 256), mpp=0.5)
    store = make_store(tmp_path, pyr)
    store.add([point(100.5, 100.5, "unreviewed")])
    with pytest.raises(AnnotationError, match="1 unreviewed"):
        export_training_set_sync(store, pyr, tmp_path / "ts", mpp=0.5)
    store.close()


def test_read_manifest_validates(reviewed, tmp_path):
    pyr, store, _ = reviewed
    out = tmp_path / "ts"
    export_training_set_sync(store, pyr, out, mpp=0.5, patch_size=32)
    good = json.loads((out / MANIFEST_JSON).read_text())

    def broken(change):
        data = json.loads(json.dumps(good))
        change(data)
        (out / MANIFEST_JSON).write_text(json.dumps(data))
        with pytest.raises(AnnotationError) as info:
            read_manifest(out)
        return str(info.value)

    assert "schema version 99" in broken(lambda d: d.update(schema_version=99))
    assert "'mpp'" in broken(lambda d: d.pop("mpp"))
    assert "sample 2" in broken(lambda d: d["samples"][2].update(kind="maybe"))
    assert "counts say" in broken(lambda d: d["counts"].update(positive=7))
    (out / MANIFEST_JSON).write_text(json.dumps(good))
    lines = (out / MANIFEST_CSV).read_text().splitlines()
    (out / MANIFEST_CSV).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AnnotationError, match="different exports"):
        read_manifest(out)
    (out / MANIFEST_JSON).write_text("{not json")
    with pytest.raises(AnnotationError, match="not readable JSON"):
        read_manifest(out)
    (out / MANIFEST_JSON).write_text(json.dumps(good))
    (out / good["samples"][0]["image"]).unlink()
    with pytest.raises(AnnotationError, match="does not exist"):
        read_manifest(out)


def test_default_store_path(tmp_path, monkeypatch):
    image = tmp_path / "slide.svs"
    image.write_bytes(b"x")
    assert default_store_path(image) == tmp_path / ("slide.svs" + STORE_SUFFIX)
    locked = tmp_path / "ro"
    locked.mkdir()
    (locked / "b.svs").write_bytes(b"x")
    monkeypatch.setenv("HISTO_AI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("os.access", lambda *a, **k: False)
    fallback = default_store_path(locked / "b.svs")
    assert fallback.parent == tmp_path / "home" / "annotations"
    assert fallback.suffix == ".sqlite" and fallback == default_store_path(locked / "b.svs")
    store = tmp_path / ("slide.svs" + STORE_SUFFIX)
    assert default_labels_path(store) == tmp_path / "slide.svs.labels.zarr"
    assert default_labels_path(tmp_path / "x.sqlite") == tmp_path / "x.labels.zarr"


# --------------------------------------------------------------------------- real slides
def test_real_sample_slide_and_synthetic_pyramid(tmp_path):
    from napari_histo_ai.io import open_image
    from napari_histo_ai.io.synthetic import make_slide

    if not SAMPLE_SVS.exists():
        pytest.skip(f"{SAMPLE_SVS} is not present")
    # a 2-level synthetic slide of real pixels at 0.5 µm/px: 1.0 µm/px is level 1 exactly
    path = make_slide(tmp_path / "big.tif", width=2048, height=2048, source=SAMPLE_SVS, mpp=0.5)
    pyr = open_image(path)
    try:
        assert len(pyr.levels) == 2
        store = make_store(tmp_path, pyr)
        store.add([point(1000.0, 1000.0, "accepted"), point(400.0, 1600.0, "rejected")])
        m = export_training_set_sync(
            store, pyr, tmp_path / "ts", mpp=1.0, patch_size=64, negatives_per_positive=2
        )
        store.close()
        pos = m.samples_of("positive")[0]
        patch = np.asarray(Image.open(m.path / pos.image))
        np.testing.assert_array_equal(patch, pyr.read_region((468, 468), (64, 64), level=1))
        assert m.counts["hard_negative"] == 1 and m.counts["negative"] == 4  # 2 x (1 + 1)
    finally:
        pyr.close()
    # the bundled CMU-1 slide itself (mpp 0.499, one level): resampled to 2 µm/px
    pyr = open_image(SAMPLE_SVS)
    try:
        store = AnnotationStore.create(
            tmp_path / "cmu.sqlite", ImageRef.from_pyramid(pyr), classes=("mitosis",)
        )
        store.add([point(1500.5, 1100.5, "accepted"), point(900.5, 700.5, "added", source=HUMAN)])
        m = export_training_set_sync(
            store, pyr, tmp_path / "cmu", mpp=2.0, patch_size=64, negatives_per_positive=3
        )
        store.close()
        assert m.counts["positive"] == 2 and m.counts["negative"] == 6
        assert m.image["content_hash"].startswith("sha256")
        for s in m.samples:
            patch = np.asarray(Image.open(m.path / s.image))
            assert patch.shape == (64, 64, 3)
            if s.kind == "negative":
                assert not (patch.mean() > 220 and patch.std() < 12)
        assert read_manifest(m.path).image["path"] == str(SAMPLE_SVS.resolve())
    finally:
        pyr.close()


def test_real_mri_volume_slice_patches(tmp_path):
    from napari_histo_ai.io import open_image

    from .conftest import real

    path = real("brats2015_mri/train/brats_2013_pat0005_1/Flair_subtrMeanDivStd.nii.gz")
    vol = open_image(path)
    try:
        store = AnnotationStore.create(
            tmp_path / "v.sqlite", ImageRef.from_pyramid(vol), classes=("tumour",)
        )
        # a longest-diameter line on slice 80 (1 mm voxels)
        store.add(
            [
                Annotation(
                    "line", [[100.0, 90.0], [130.0, 140.0]], "tumour", plane=(80,), review="added"
                )
            ]
        )
        m = export_training_set_sync(
            store, vol, tmp_path / "ts", mpp=1000.0, patch_size=96, image_format="tif"
        )
        store.close()
        pos = m.samples_of("positive")[0]
        patch = tifffile.imread(m.path / pos.image)
        want = np.asarray(vol.levels[0][80, 115 - 48 : 115 + 48, 115 - 48 : 115 + 48])
        np.testing.assert_array_equal(patch, want)  # 1 mm = the voxel: an exact copy
        mask = tifffile.imread(m.path / pos.target)
        assert mask[100 - 67, 90 - 67] == 1 and mask[129 - 67, 139 - 67] == 1
        assert all(s.plane == (80,) for s in m.samples) and m.counts["negative"] == 1
    finally:
        vol.close()
