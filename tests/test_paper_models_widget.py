"""The papers' shipped models run from the "Run model" widget on their matching real data.

One case per kind of image a user opens: a BraTS MRI volume (3D Labels + diameter
lines in mm), a mini-MIAS film (mass boxes with class and score + mask), a BreakHis
image (per-crop classes + the image-level aggregate) and the sample slide with the IDC
tumour map. Each goes through the same path a user takes: open with our reader, pick
the model, press Run, wait for the worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_histo_ai._napari.layers import add_layer_data, pyramid_to_layer_data
from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai.io import open_image

from .conftest import real

pytestmark = [pytest.mark.gui, pytest.mark.slow]

FLAIR = "brats2015_mri/validation/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"


def _mri_crop(tmp_path: Path) -> tuple[Path, float]:
    """12 slices through the tumour of the held-out BraTS case, as a small NIfTI file.

    Returns the file and the longest diameter (mm) of the true whole tumour in them.
    """
    import nibabel as nib

    from napari_histo_ai.inference.lesions import measure_lesions

    src = nib.load(real(FLAIR))
    label = np.asarray(
        nib.load(real(FLAIR.replace("Flair_subtrMeanDivStd", "OTMultiClass"))).dataobj
    )
    tumour_z = np.flatnonzero(label.sum(axis=(0, 1)) > 0)
    z = int(np.median(tumour_z))
    data = np.asarray(src.dataobj)[:, :, z - 6 : z + 6]
    out = tmp_path / "pat0003_crop.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), src.affine, src.header), out)
    # NIfTI (x, y, z) -> (z, y, x), 1 mm voxels
    truth = np.moveaxis(label[:, :, z - 6 : z + 6] > 0, -1, 0)
    lesions = measure_lesions(truth, (1.0, 1.0, 1.0))
    return out, max(lesion.length_mm for lesion in lesions)


def _run(viewer, qtbot, path: Path, model: str, tmp_path: Path, errors: list[str]):
    from napari_histo_ai.widgets.run_widget import RunModelWidget

    pyramid = open_image(path)
    (layer,) = add_layer_data(viewer, pyramid_to_layer_data(pyramid))
    if layer.ndim == 3:
        viewer.dims.set_current_step(0, layer.data.shape[0] // 2)
    widget = RunModelWidget(viewer, run_root=tmp_path / "runs")
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(layer.name)
    widget.model_combo.setCurrentText(model)
    assert model in widget.card.toPlainText()
    widget.region_combo.setCurrentText("Whole image")
    worker = widget.run()
    assert worker is not None, errors
    # the widget's state, not worker.finished (it may fire before a waitSignal connects)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=240_000)
    assert not errors, errors
    assert widget.result is not None and widget.result.complete
    return widget, layer


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    return shown


def test_mri_unet_gives_a_3d_mask_and_diameter_lines_in_mm(
    make_napari_viewer, qtbot, tmp_path, errors
):
    viewer = make_napari_viewer()
    path, true_length = _mri_crop(tmp_path)
    widget, layer = _run(viewer, qtbot, path, "mri-unet", tmp_path, errors)
    layers = widget.result_layers
    base = f"{layer.name} · mri-unet"
    mask = layers[f"{base} · tumour mask"]
    assert mask.ndim == 3 and mask._type_string == "labels"
    assert np.asarray(mask.data[0] if mask.multiscale else mask.data).max() >= 1
    # what napari shows is the finished result, not the empty slice it first sliced
    # (napari's dask cache served stale slices of the live layers before)
    prob = layers[f"{base} · tumour"]
    assert np.asarray(prob._data_view).max() > 0.5
    assert np.asarray(mask._data_view).max() >= 1
    lines = layers[f"{base} · tumour diameters"]
    assert lines._type_string == "shapes" and set(lines.shape_type) == {"line"}
    lengths = np.asarray(lines.features["length_mm"], dtype=float)
    # the main lesion's longest diameter is close to that of the true tumour
    assert lengths.max() == pytest.approx(true_length, rel=0.25)


def test_mammogram_detector_gives_classed_boxes_and_a_mask(
    make_napari_viewer, qtbot, tmp_path, errors
):
    viewer = make_napari_viewer()
    film = real("mini_mias/mdb001.pgm")
    widget, layer = _run(viewer, qtbot, film, "mias-mass-detector", tmp_path, errors)
    layers = widget.result_layers
    base = f"{layer.name} · mias-mass-detector"
    boxes = layers[f"{base} · masses"]
    assert boxes._type_string == "shapes" and len(boxes.data) >= 1
    assert set(boxes.shape_type) == {"rectangle"}
    assert set(boxes.features["class"]) <= {"benign", "malignant"}
    assert (np.asarray(boxes.features["score"]) >= 0.15).all()
    assert layers[f"{base} · mass mask"]._type_string == "labels"


def test_breakhis_resnet_classifies_crops_and_aggregates_the_image(
    make_napari_viewer, qtbot, tmp_path, errors
):
    viewer = make_napari_viewer()
    image = real("breakhis_resized/malignant/40X/SOB_M_DC-14-2980-40-001.png")
    widget, _layer = _run(viewer, qtbot, image, "breakhis-resnet", tmp_path, errors)
    (aggregate,) = widget.result.aggregates.values()
    assert aggregate["class"] in {"benign", "malignant"}
    assert aggregate["n_tiles"] > 10  # 96 px crops with 50 % overlap over 500 x 328
    assert "benign" in widget.status_label.text() or "malignant" in widget.status_label.text()


def test_idc_tumour_map_over_the_sample_slide(make_napari_viewer, qtbot, tmp_path, errors):
    viewer = make_napari_viewer()
    widget, layer = _run(viewer, qtbot, sample_path(), "idc-tumour", tmp_path, errors)
    aggregates = widget.result.aggregates
    assert aggregates and all(a["n_tiles"] > 0 for a in aggregates.values())
    images = [lay for lay in widget.result_layers.values() if lay._type_string == "image"]
    assert images, list(widget.result_layers)
    # the tumour map lies over the slide, in µm: one value per 40 µm step, centred on
    # its 200 µm patch (50 px at 4 µm/px), so its edge is within a patch of the slide's
    right, slide_right = images[0].extent.world[1][-1], layer.extent.world[1][-1]
    assert slide_right - 200 < right <= slide_right + 40
