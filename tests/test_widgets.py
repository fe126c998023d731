"""The "Open slide / volume" dock widget, driven through its buttons in a real viewer."""

from __future__ import annotations

import pytest

from napari_histo_ai._napari.layers import PYRAMID_KEY, scale_bar
from napari_histo_ai._napari.sample import sample_path
from napari_histo_ai._napari.summary import MPP_MISSING

from .conftest import real

pytestmark = pytest.mark.gui

SAMPLE = sample_path()


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages the widget sent to napari's notifications (show_error)."""
    import napari.utils.notifications

    shown: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_error", shown.append)
    return shown


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-histo-ai", "Open slide / volume")
    return viewer, widget


def _click(qtbot, button):
    from qtpy.QtCore import Qt

    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _table(widget) -> dict[str, str]:
    t = widget.info_table
    return {t.item(r, 0).text(): t.item(r, 1).text() for r in range(t.rowCount())}


def test_inspect_then_open_the_sample(viewer_and_widget, qtbot, errors):
    from napari_histo_ai.widgets.open_widget import OpenImageWidget

    viewer, widget = viewer_and_widget
    assert isinstance(widget, OpenImageWidget)
    assert widget.backend_combo.itemText(0) == "auto"

    widget.set_path(SAMPLE)
    _click(qtbot, widget.inspect_button)
    rows = _table(widget)
    assert rows["Format"] == "aperio-svs"
    assert rows["Backend"] == "tifffile"
    assert rows["Pixel size"].startswith("0.499 × 0.499 µm/px")
    assert rows["Objective"] == "20×"
    assert rows["Vendor"] == "aperio"
    assert rows["Associated images"] == "label, macro, thumbnail"
    assert rows["  level 0"].startswith("2967 × 2220 × 3")
    assert not widget.mpp_spin.isEnabled()
    assert len(viewer.layers) == 0, "Inspect reads metadata only"

    _click(qtbot, widget.open_button)
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "CMU-1-Small-Region.svs"
    assert layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.metadata[PYRAMID_KEY].path == str(SAMPLE)
    assert scale_bar(viewer).visible
    assert errors == []


def test_backend_choice_is_used(viewer_and_widget, qtbot, errors):
    viewer, widget = viewer_and_widget
    widget.set_path(SAMPLE)
    widget.backend_combo.setCurrentText("pillow")  # not a pillow file: a clear error
    _click(qtbot, widget.open_button)
    assert len(viewer.layers) == 0
    assert len(errors) == 1 and "CMU-1-Small-Region.svs" in errors[0]
    widget.backend_combo.setCurrentText("tifffile")
    _click(qtbot, widget.open_button)
    assert viewer.layers[0].metadata["backend"] == "tifffile"


def test_missing_mpp_can_be_set_after_opening(viewer_and_widget, qtbot, errors):
    viewer, widget = viewer_and_widget
    widget.set_path(real("wsi/TCGA-CR-7395-01A-01-TS1.svs"))
    _click(qtbot, widget.inspect_button)
    assert _table(widget)["Pixel size"] == MPP_MISSING
    assert widget.mpp_spin.isEnabled(), "the field is enabled when the file has no mpp"
    assert widget.mpp_hint.text() == MPP_MISSING
    assert widget.mpp_spin.styleSheet(), "and highlighted"

    _click(qtbot, widget.open_button)
    layer = viewer.layers[0]
    assert layer.multiscale
    assert tuple(layer.scale) == (1.0, 1.0)
    assert "set µm/px" in widget.status_label.text()

    widget.mpp_spin.setValue(0.2527)
    _click(qtbot, widget.apply_mpp_button)
    assert tuple(layer.scale) == pytest.approx((0.2527, 0.2527))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.metadata["mpp_source"] == "user"
    assert layer.metadata[PYRAMID_KEY].mpp == pytest.approx((0.2527, 0.2527))
    assert scale_bar(viewer).visible
    assert errors == []


def test_missing_mpp_set_before_opening(viewer_and_widget, qtbot, errors):
    viewer, widget = viewer_and_widget
    widget.set_path(real("wsi/TCGA-CR-7395-01A-01-TS1.svs"))
    _click(qtbot, widget.inspect_button)
    widget.mpp_spin.setValue(0.5)
    _click(qtbot, widget.open_button)
    assert tuple(viewer.layers[0].scale) == pytest.approx((0.5, 0.5))
    assert errors == []


def test_out_of_range_mpp_is_an_error_not_an_exception(viewer_and_widget, qtbot, errors):
    viewer, widget = viewer_and_widget
    widget.set_path(real("wsi/TCGA-CR-7395-01A-01-TS1.svs"))
    _click(qtbot, widget.open_button)
    widget.mpp_spin.setValue(0.001)
    _click(qtbot, widget.apply_mpp_button)
    assert tuple(viewer.layers[0].scale) == (1.0, 1.0)
    assert len(errors) == 1 and "out of range" in errors[0]


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty field"])
def test_bad_path_shows_an_error_and_adds_nothing(viewer_and_widget, qtbot, errors, tmp_path, kind):
    viewer, widget = viewer_and_widget
    if kind == "missing":
        widget.set_path(tmp_path / "no-such-slide.svs")
    elif kind == "garbage":
        junk = tmp_path / "junk.svs"
        junk.write_bytes(b"definitely not a TIFF" * 50)
        widget.set_path(junk)
    for button in (widget.inspect_button, widget.open_button):
        _click(qtbot, button)
    assert len(viewer.layers) == 0
    assert len(errors) == 2
    assert widget.status_label.text() == errors[-1]
    if kind != "empty field":
        assert str(tmp_path) in errors[-1]
