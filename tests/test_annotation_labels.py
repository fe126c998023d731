"""Label pyramids painted in windows: dirty-tile rebuilds, undo/redo, crash rollback,
mask import checks and OME-Zarr / NIfTI round trips."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_histo_ai.annotations.label_formats import (
    export_nifti_labels,
    export_ome_zarr_labels,
    import_mask,
    import_nifti_labels,
    read_miccai_mask,
)
from napari_histo_ai.annotations.labels import LabelPyramid, downsample_labels, level_shapes
from napari_histo_ai.annotations.model import ImageRef
from napari_histo_ai.errors import AnnotationError
from tests.conftest import real

SLIDE = ImageRef(
    path="/data/slide.svs", content_hash="sha256:slide", shape=(300, 500), mpp=(0.5, 0.25)
)


def oracle_levels(level0: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Every level rebuilt from scratch from level 0."""
    out = [level0]
    for _ in level_shapes(level0.shape[-2:], chunk)[1:]:
        out.append(downsample_labels(out[-1]))
    return out


def assert_levels(pyr: LabelPyramid, expected0: np.ndarray) -> None:
    for k, (got, want) in enumerate(
        zip(pyr.levels(), oracle_levels(expected0, pyr.chunk), strict=True)
    ):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"level {k}")


def chunk_files(folder: Path) -> dict[str, int]:
    """Stored chunk files (relative name -> mtime_ns) of every level."""
    return {
        str(f.relative_to(folder)): f.stat().st_mtime_ns
        for f in folder.rglob("*")
        if f.is_file() and "/c/" in f.as_posix() and not f.name.endswith(".partial")
    }


# ------------------------------------------------------------------------- downsampling
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_downsample_is_the_mode_of_non_zero_values(h, w, seed):
    a = np.random.default_rng(seed).integers(0, 4, (h, w)).astype(np.uint16)
    got = downsample_labels(a)
    assert got.shape == (-(-h // 2), -(-w // 2))
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            block = a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel().tolist()
            values = [v for v in block if v]
            if not values:
                assert got[i, j] == 0
                continue
            best = max(values.count(v) for v in values)
            first = next(v for v in values if values.count(v) == best)
            assert got[i, j] == first


def test_a_thin_line_survives_every_level():
    a = np.zeros((256, 256), np.uint16)
    a[:, 77] = 3  # a one-pixel vessel: stride subsampling keeps it on odd levels only
    for level in oracle_levels(a, 16)[1:]:
        assert (level == 3).any(axis=0).sum() == 1


# ----------------------------------------------------------------- window writes/reads
paint = st.tuples(
    st.integers(-40, 320),
    st.integers(-40, 520),
    st.integers(1, 150),
    st.integers(1, 150),
    st.integers(0, 5),
)


@settings(max_examples=15, deadline=None)
@given(st.lists(paint, min_size=1, max_size=4))
def test_paints_equal_a_numpy_oracle_and_lower_levels_a_full_rebuild(paints):
    with tempfile.TemporaryDirectory() as tmp:
        pyr = LabelPyramid.create(Path(tmp) / "l.zarr", image=SLIDE, chunk=64)
        assert pyr.shapes == [(300, 500), (150, 250), (75, 125), (38, 63)]
        expected = np.zeros((300, 500), np.uint16)
        for top, left, h, w, value in paints:
            data = np.full((h, w), value, np.uint16)
            data[::3] = (value + 1) % 6
            pyr.write_window((top, left, top + h, left + w), data)
            t, lf = max(0, top), max(0, left)
            b, r = max(t, min(300, top + h)), max(lf, min(500, left + w))
            expected[t:b, lf:r] = data[t - top : b - top, lf - left : r - left]
            window = pyr.read_window((top, left, top + h, left + w))
            np.testing.assert_array_equal(window, expected[t:b, lf:r])
        assert_levels(pyr, expected)
        np.testing.assert_array_equal(pyr.read_window((-5, -5, 1000, 1000)), expected)


def test_bad_window_data_is_refused_and_nothing_written(tmp_path):
    pyr = LabelPyramid.create(tmp_path / "l.zarr", image=SLIDE, chunk=64)
    with pytest.raises(ValueError, match=r"\(10, 10\)"):
        pyr.write_window((0, 0, 10, 10), np.ones((5, 5), np.uint16))
    with pytest.raises(AnnotationError, match="label value -1 is negative"):
        pyr.write_window((0, 0, 2, 2), np.array([[1, -1], [0, 0]]))
    with pytest.raises(AnnotationError, match="70000 does not fit uint16"):
        pyr.write_window((0, 0, 1, 1), np.array([[70000]]))
    with pytest.raises(AnnotationError, match="whole numbers"):
        pyr.write_window((0, 0, 1, 2), np.array([[1.5, 0.0]]))
    assert not pyr.can_undo and not pyr.read_window((0, 0, 300, 500)).any()


def test_only_dirty_chunks_are_rewritten_on_a_100k_pyramid(tmp_path):
    image = ImageRef(path="/big.svs", content_hash="h", shape=(100_000, 100_000), mpp=(0.25, 0.25))
    folder = tmp_path / "big.zarr"
    pyr = LabelPyramid.create(folder, image=image)  # no chunk is stored until written
    assert pyr.n_levels == 9 and pyr.shapes[-1] == (391, 391)
    assert chunk_files(folder) == {}
    pyr.write_window((40_100, 51_300, 40_612, 51_812), np.ones((512, 512), np.uint16))
    rebuilt = pyr.last_rebuilt
    assert rebuilt[0] == [(78, 100), (78, 101), (79, 100), (79, 101)]
    assert all(1 <= len(rebuilt[k]) <= 4 for k in range(9))
    first = chunk_files(folder)
    # every stored chunk is one the write reported, and it reported no more
    assert sorted(first) == sorted(
        f"{k}/c/{i}/{j}" for k, chunks in rebuilt.items() for i, j in chunks
    )
    assert len(first) <= 20
    np.testing.assert_array_equal(pyr.read_window((40_099, 51_299, 40_613, 51_813))[1:-1, 1:-1], 1)
    assert pyr.read_window((40_099, 51_299, 40_613, 51_813))[0].max() == 0

    pyr.write_window((5_000, 90_000, 5_512, 90_512), np.full((512, 512), 2, np.uint16))
    second = chunk_files(folder)
    untouched = {name: t for name, t in first.items() if name.startswith("0/")}
    assert all(second[name] == t for name, t in untouched.items())  # level 0 not rewritten
    assert len(second) - len(first) <= 20


# ---------------------------------------------------------------------- undo and redo
def test_undo_redo_sequences_persist_across_reopen(tmp_path):
    folder = tmp_path / "l.zarr"
    pyr = LabelPyramid.create(folder, image=SLIDE, chunk=64, classes={1: "tumour"})
    states = [pyr.read_window((0, 0, 300, 500))]
    for i, (box, value) in enumerate(
        [((10, 10, 100, 200), 1), ((50, 150, 250, 450), 2), ((0, 0, 300, 20), 3)]
    ):
        h, w = box[2] - box[0], box[3] - box[1]
        pyr.write_window(box, np.full((h, w), value), label=f"paint {i}")
        states.append(pyr.read_window((0, 0, 300, 500)))
    assert [op["label"] for op in pyr.history()] == ["paint 0", "paint 1", "paint 2"]
    assert pyr.undo() == "paint 2"
    assert_levels(pyr, states[2])
    assert pyr.undo() == "paint 1"
    assert_levels(pyr, states[1])
    assert pyr.redo() == "paint 1"
    assert_levels(pyr, states[2])
    assert pyr.can_redo

    reopened = LabelPyramid.open(folder, image=SLIDE)
    assert reopened.can_undo and reopened.can_redo
    assert_levels(reopened, states[2])
    assert reopened.redo() == "paint 2"
    assert_levels(reopened, states[3])
    assert reopened.undo() == "paint 2"
    # a new write drops the redo branch, and its history file
    reopened.write_window((200, 300, 210, 310), np.full((10, 10), 4), label="paint 3")
    assert not reopened.can_redo
    assert [op["label"] for op in reopened.history()] == ["paint 0", "paint 1", "paint 3"]
    assert len(list((folder / "history").glob("op-*.npz"))) == 3
    while reopened.undo():
        pass
    assert_levels(reopened, states[0])
    assert reopened.undo() is None
    assert reopened.classes == {1: "tumour"}


def test_unchanged_window_is_not_an_op(tmp_path):
    pyr = LabelPyramid.create(tmp_path / "l.zarr", image=SLIDE, chunk=64)
    pyr.write_window((0, 0, 10, 10), np.zeros((10, 10), np.uint16))
    assert not pyr.can_undo and pyr.last_rebuilt == {}


# ----------------------------------------------------------------------- crash safety
def test_a_crash_inside_the_chunk_write_is_rolled_back_on_open(tmp_path, monkeypatch):
    folder = tmp_path / "l.zarr"
    pyr = LabelPyramid.create(folder, image=SLIDE, chunk=64)
    pyr.write_window((0, 0, 100, 100), np.full((100, 100), 1))
    before = pyr.read_window((0, 0, 300, 500))
    real_write = LabelPyramid._write_level0

    dead = []

    def crash(self, plane, box, values):  # half the rows reach disk, then the process dies
        if dead:  # nothing runs after the kill (not even the in-process rollback)
            raise KeyboardInterrupt("killed")
        dead.append(True)
        t, lf, b, r = box
        real_write(self, plane, (t, lf, (t + b) // 2, r), values[: (b - t) // 2])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(LabelPyramid, "_write_level0", crash)
    with pytest.raises(KeyboardInterrupt):
        pyr.write_window((50, 50, 250, 450), np.full((200, 400), 7))
    monkeypatch.undo()
    assert (pyr.read_window((50, 50, 150, 450)) == 7).all()  # half-written on disk

    reopened = LabelPyramid.open(folder, image=SLIDE)
    assert_levels(reopened, before)
    assert [op["label"] for op in reopened.history()] == ["paint"]
    assert len(list((folder / "history").glob("op-*.npz"))) == 1
    assert reopened.undo() == "paint"
    assert not reopened.read_window((0, 0, 300, 500)).any()


def test_a_failed_write_is_rolled_back_at_once(tmp_path, monkeypatch):
    pyr = LabelPyramid.create(tmp_path / "l.zarr", image=SLIDE, chunk=64)
    pyr.write_window((0, 0, 100, 100), np.full((100, 100), 1))
    before = pyr.read_window((0, 0, 300, 500))
    real_write = LabelPyramid._write_level0
    calls = []

    def full_once(self, plane, box, values):  # the first chunk write fails half-way
        calls.append(box)
        if len(calls) == 1:
            real_write(self, plane, box, values)
            raise OSError("disk full")
        real_write(self, plane, box, values)

    monkeypatch.setattr(LabelPyramid, "_write_level0", full_once)
    with pytest.raises(OSError, match="disk full"):
        pyr.write_window((50, 50, 250, 450), np.full((200, 400), 7))
    assert_levels(pyr, before)
    assert len(pyr.history()) == 1 and not pyr.can_redo


def test_a_crash_during_undo_is_completed_on_open(tmp_path, monkeypatch):
    folder = tmp_path / "l.zarr"
    pyr = LabelPyramid.create(folder, image=SLIDE, chunk=64)
    pyr.write_window((0, 0, 100, 100), np.full((100, 100), 1))
    monkeypatch.setattr(LabelPyramid, "_write_level0", lambda *a: (_ for _ in ()).throw(OSError))
    with pytest.raises(OSError):
        pyr.undo()
    monkeypatch.undo()
    reopened = LabelPyramid.open(folder)
    assert not reopened.read_window((0, 0, 300, 500)).any()
    assert not reopened.can_undo and reopened.can_redo


# ------------------------------------------------------------- identity and metadata
def test_open_refuses_another_image_and_create_an_existing_path(tmp_path):
    folder = tmp_path / "l.zarr"
    LabelPyramid.create(folder, image=SLIDE, chunk=64)
    other = ImageRef(path="/data/other.svs", content_hash="sha256:other", shape=(300, 500))
    with pytest.raises(AnnotationError, match=r"other\.svs"):
        LabelPyramid.open(folder, image=other)
    with pytest.raises(AnnotationError, match=r"\(300, 501\)"):
        LabelPyramid.open(folder, image=ImageRef("/data/slide.svs", "", (300, 501)))
    with pytest.raises(AnnotationError, match="already exists"):
        LabelPyramid.create(folder, image=SLIDE)
    with pytest.raises(AnnotationError, match="not a label pyramid"):
        LabelPyramid.open(tmp_path)


def test_classes_and_provenance_are_saved(tmp_path):
    folder = tmp_path / "l.zarr"
    pyr = LabelPyramid.create(
        folder,
        image=SLIDE,
        chunk=64,
        classes={1: "tumour"},
        annotator="ann",
        source="tissue-unet",
        model_version="1.2",
    )
    created = pyr.provenance["created"]
    pyr.set_class(2, "stroma")
    pyr.set_class(1, None)
    reopened = LabelPyramid.open(folder, annotator="bob")
    assert reopened.classes == {2: "stroma"}
    prov = reopened.provenance
    assert (prov["source"], prov["model_version"], prov["annotator"]) == (
        "tissue-unet",
        "1.2",
        "ann",
    )
    assert prov["modified"] >= created
    reopened.write_window((0, 0, 1, 1), np.ones((1, 1)))
    assert LabelPyramid.open(folder).provenance["annotator"] == "bob"
    meta = json.loads((folder / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["image-label"]["properties"] == [{"label-value": 2, "class": "stroma"}]


# ----------------------------------------------------------------- from_array, volumes
def test_from_array_takes_a_downsampled_dask_mask(tmp_path):
    import dask.array as da

    rng = np.random.default_rng(3)
    small = rng.integers(0, 3, (75, 125)).astype(np.uint8)
    pyr = LabelPyramid.from_array(
        tmp_path / "l.zarr", da.from_array(small, chunks=32), image=SLIDE, scale=4, chunk=64
    )
    assert pyr.dtype == np.uint16
    up = np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)
    assert_levels(pyr, up)
    assert not pyr.can_undo
    with pytest.raises(AnnotationError, match=r"\(70, 125\).*\(300, 500\).*\(75, 125\)"):
        LabelPyramid.from_array(tmp_path / "bad.zarr", small[:70], image=SLIDE, scale=4)
    with pytest.raises(AnnotationError, match=r"neg\.zarr: mask block at \(0, 0\).* negative"):
        LabelPyramid.from_array(tmp_path / "neg.zarr", -np.ones((300, 500)), image=SLIDE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.zarr"]  # nothing half-made


def test_volume_planes_are_separate_pyramids_over_y_x(tmp_path):
    vol = ImageRef(
        "/data/t1.nii.gz", "sha256:v", (3, 200, 150), axes="ZYX", spacing_mm=(2.0, 0.5, 0.5)
    )
    pyr = LabelPyramid.create(tmp_path / "v.zarr", image=vol, chunk=32)
    assert [a.shape for a in pyr.levels()] == [
        (3, 200, 150),
        (3, 100, 75),
        (3, 50, 38),
        (3, 25, 19),
    ]
    pyr.write_window((10, 20, 60, 90), np.full((50, 70), 5), plane=(1,))
    expected = np.zeros((3, 200, 150), np.uint16)
    expected[1, 10:60, 20:90] = 5
    assert_levels(pyr, expected)
    assert not pyr.read_window((0, 0, 200, 150), plane=(0,)).any()
    with pytest.raises(ValueError, match="plane"):
        pyr.read_window((0, 0, 1, 1), plane=(3,))
    ome = json.loads((tmp_path / "v.zarr" / "zarr.json").read_text())["attributes"]["ome"]
    ms = ome["multiscales"][0]
    assert [a["unit"] for a in ms["axes"]] == ["millimeter"] * 3
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [2.0, 2.0, 2.0]


# ------------------------------------------------------------------------ mask import
def miccai_ref(name: str) -> ImageRef:
    from napari_histo_ai.io import open_image

    return ImageRef.from_pyramid(open_image(real(f"miccai_nuclei_seg/{name}")))


def test_miccai_mask_imports_with_its_image():
    image = miccai_ref("image02.png")
    mask = import_mask(real("miccai_nuclei_seg/image02_mask.txt"), image=image)
    assert mask.shape == image.shape == (490, 488) and mask.dtype == np.uint16
    assert len(np.unique(mask)) - 1 == 127  # nuclei of image02 (README)


def test_a_mask_of_another_image_is_refused_naming_both_sizes_and_the_match():
    # the data set holds no image04/05 (the pair swapped in the source), so pair two
    # real files the same way: image01 with image02's mask
    image = miccai_ref("image01.png")
    with pytest.raises(AnnotationError) as err:
        import_mask(real("miccai_nuclei_seg/image02_mask.txt"), image=image)
    text = str(err.value)
    assert "490 × 488" in text and "488 × 643" in text
    assert "image02.png" in text and "swapped" in text


def test_transposed_and_downsampled_masks_are_explained(tmp_path):
    image = miccai_ref("image02.png")
    mask = read_miccai_mask(real("miccai_nuclei_seg/image02_mask.txt"))
    np.save(tmp_path / "t.npy", mask.T)
    with pytest.raises(AnnotationError, match="transposed"):
        import_mask(tmp_path / "t.npy", image=image)
    np.save(tmp_path / "half.npy", mask[::2, ::2])
    with pytest.raises(AnnotationError, match=r"divided by 2.*scale=2"):
        import_mask(tmp_path / "half.npy", image=image)
    with pytest.raises(AnnotationError, match=r"label values \[1, 2, 3"):
        import_mask(real("miccai_nuclei_seg/image02_mask.txt"), image=image, classes={})


def test_png_and_tiff_masks_and_bad_files(tmp_path):
    import tifffile
    from PIL import Image

    image = ImageRef("/data/x.png", "", (20, 30))
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 3:12] = 2
    Image.fromarray(mask).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m.tif", mask.astype(np.uint16) * 300)
    np.testing.assert_array_equal(import_mask(tmp_path / "m.png", image=image), mask)
    assert import_mask(tmp_path / "m.tif", image=image).max() == 600
    rgb = np.stack([mask, mask, mask * 0], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(AnnotationError, match="colour"):
        import_mask(tmp_path / "rgb.png", image=image)
    (tmp_path / "bad_mask.txt").write_text("3 2\n0\n1\nx\n0\n0\n0\n")
    with pytest.raises(AnnotationError, match="'x' on line 4"):
        read_miccai_mask(tmp_path / "bad_mask.txt")
    (tmp_path / "short_mask.txt").write_text("3 2\n0\n1\n")
    with pytest.raises(AnnotationError, match="6 pixels but the file holds 2"):
        read_miccai_mask(tmp_path / "short_mask.txt")


# ----------------------------------------------------------------- OME-Zarr and NIfTI
def test_ome_zarr_labels_round_trip_and_a_failed_export_keeps_the_old(tmp_path, monkeypatch):
    import zarr

    from napari_histo_ai.io import open_image

    pyr = LabelPyramid.create(
        tmp_path / "l.zarr", image=SLIDE, chunk=64, classes={1: "tumour", 2: "stroma"}
    )
    pyr.write_window((10, 20, 110, 220), np.full((100, 200), 2))
    pyr.write_window((50, 60, 70, 80), np.full((20, 20), 1))
    target = export_ome_zarr_labels(pyr, tmp_path / "out.zarr", name="tissue")
    assert target == tmp_path / "out.zarr" / "labels" / "tissue"
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["tissue"]
    ome = root["labels/tissue"].attrs["ome"]
    assert ome["image-label"]["properties"] == [
        {"label-value": 1, "class": "tumour"},
        {"label-value": 2, "class": "stroma"},
    ]
    assert [c["label-value"] for c in ome["image-label"]["colors"]] == [1, 2]
    ms = ome["multiscales"][0]
    assert ms["axes"][0]["unit"] == "micrometer"
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 0.5]
    assert (
        root["labels/tissue"].attrs["napari_histo_ai_labels"]["image"]["content_hash"]
        == "sha256:slide"
    )
    read = open_image(target)
    assert read.mpp == (0.5, 0.25) and len(read.levels) == pyr.n_levels
    for got, want in zip(read.levels, pyr.levels(), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    pyr.write_window((0, 0, 5, 5), np.full((5, 5), 1))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("shutil.copytree", broken)
    with pytest.raises(OSError, match="disk full"):
        export_ome_zarr_labels(pyr, tmp_path / "out.zarr", name="tissue")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out.zarr" / "labels").iterdir()) == [
        "tissue",
        "zarr.json",
    ]
    assert np.asarray(open_image(target).levels[0])[0, 0] == 0  # the old export, whole
    export_ome_zarr_labels(pyr, tmp_path / "out.zarr", name="tissue")
    assert np.asarray(open_image(target).levels[0])[0, 0] == 1

    # into an NGFF 0.5 image: its attributes stay, the label points back at it
    image_root = tmp_path / "image.zarr"
    image_root.mkdir()
    image_meta = {"ome": {"version": "0.5", "multiscales": [{"name": "he"}]}}
    (image_root / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": image_meta})
    )
    export_ome_zarr_labels(pyr, image_root, name="a")
    export_ome_zarr_labels(pyr, image_root, name="b")
    assert json.loads((image_root / "zarr.json").read_text())["attributes"] == image_meta
    labels_meta = json.loads((image_root / "labels" / "zarr.json").read_text())
    assert labels_meta["attributes"]["ome"]["labels"] == ["a", "b"]
    label_meta = json.loads((image_root / "labels" / "b" / "zarr.json").read_text())
    assert label_meta["attributes"]["ome"]["image-label"]["source"] == {"image": "../../"}
    (tmp_path / "v2.zarr").mkdir()
    (tmp_path / "v2.zarr" / ".zattrs").write_text("{}")
    with pytest.raises(AnnotationError, match=r"NGFF 0\.4"):
        export_ome_zarr_labels(pyr, tmp_path / "v2.zarr")


def test_nifti_labels_round_trip_on_brats_with_the_volume_affine(tmp_path):
    import nibabel

    from napari_histo_ai.io import open_image

    case = "brats2015_mri/train/brats_2013_pat0005_1"
    volume = open_image(real(f"{case}/Flair_subtrMeanDivStd.nii.gz"))
    image = ImageRef.from_pyramid(volume)
    labels = import_nifti_labels(real(f"{case}/OTMultiClass.nii.gz"), image=image)
    assert labels.shape == (155, 240, 240)
    assert [int((labels == v).sum()) for v in (1, 2, 3, 4)] == [23030, 35416, 3882, 18354]
    classes = {1: "necrosis", 2: "oedema", 3: "non-enhancing", 4: "enhancing"}
    pyr = LabelPyramid.from_array(tmp_path / "v.zarr", labels, image=image, classes=classes)
    pyr.write_window((100, 100, 110, 110), np.full((10, 10), 4), plane=(77,))
    labels[77, 100:110, 100:110] = 4
    out = export_nifti_labels(pyr, tmp_path / "labels.nii.gz")
    nii = nibabel.load(out)
    np.testing.assert_allclose(nii.affine, np.asarray(image.affine))
    np.testing.assert_array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), labels)
    np.testing.assert_array_equal(import_nifti_labels(out, image=image), labels)
    # the provenance NIfTI's header cannot hold: image identity, spacing, classes
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["image"]["content_hash"] == image.content_hash
    assert sidecar["spacing_mm"] == list(image.spacing_mm)
    assert sidecar["classes"]["4"] == "enhancing" and "annotator" in sidecar["provenance"]

    from napari_histo_ai.io.nifti import write_labels

    shifted = np.asarray(image.affine, dtype=float).copy()
    shifted[0, 3] += 5.0
    write_labels(labels, tmp_path / "shifted.nii.gz", affine=shifted)
    with pytest.raises(AnnotationError, match="affine"):
        import_nifti_labels(tmp_path / "shifted.nii.gz", image=image)
    write_labels(labels[:, :, :200], tmp_path / "cut.nii", affine=image.affine)
    with pytest.raises(AnnotationError, match=r"155 × 240 × 200.*155 × 240 × 240"):
        import_nifti_labels(tmp_path / "cut.nii", image=image)
    with pytest.raises(AnnotationError, match="ZYX volumes"):
        export_nifti_labels(
            LabelPyramid.create(tmp_path / "s.zarr", image=SLIDE), tmp_path / "s.nii"
        )
