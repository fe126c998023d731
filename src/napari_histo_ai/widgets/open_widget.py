"""The "Open slide / volume" dock widget: pick a file, inspect its metadata, open it.

A thin view: it gathers the path, backend and pixel size, calls
:func:`napari_histo_ai.io.open_image` (metadata only, lazy) and
:mod:`napari_histo_ai._napari.layers`, and adds the layers. Errors are shown once, as a
napari notification and in the status line; no traceback dialog.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import HistoAIError, MetadataError
from ..io import BACKENDS, EXTENSIONS, open_image
from ._errors import ERROR_STYLE, guarded

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from ..io.pyramid import Pyramid
    from ..models.magnification import MagnificationEstimate

__all__ = ["OpenImageWidget"]


T = TypeVar("T")

#: style of the pixel-size field while the slide has none
_MISSING_STYLE = "QDoubleSpinBox { border: 2px solid #e8a33d; }"
_WARN_STYLE = "color: #e8a33d;"
_MPP_HINT = "no pixel size in the file: set µm/px and press Apply µm/px"


def _file_filter() -> str:
    patterns = sorted({f"*{ext}" for exts in EXTENSIONS.values() for ext in exts})
    return f"Slides, volumes and images ({' '.join(patterns)});;All files (*)"


class OpenImageWidget(QWidget):
    """Open a slide, volume or image lazily, with its physical pixel size.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer the layers are added to (napari injects it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._viewer = napari_viewer
        self._pyramid: Pyramid | None = None
        self._pyramid_key: tuple[str, str] | None = None
        self._opened: list[Layer] = []
        self._estimate: MagnificationEstimate | None = None
        self._estimate_worker: Any = None
        # the estimated µm/px may fill in a pixel size the file lacks, never replace one
        self._estimate_may_fill = False

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("slide, volume or image file, or OME-Zarr folder")
        self.browse_button = QPushButton("Browse…")
        self.browse_button.setToolTip("Choose a file")
        self.folder_button = QPushButton("Folder…")
        self.folder_button.setToolTip("Choose an OME-Zarr folder")
        self.backend_combo = QComboBox()
        self.backend_combo.addItems(["auto", *BACKENDS])
        self.backend_combo.setToolTip("auto: sniff the file's content")
        self.inspect_button = QPushButton("Inspect")
        self.open_button = QPushButton("Open")

        self.info_table = QTableWidget(0, 2)
        self.info_table.setHorizontalHeaderLabels(["Field", "Value"])
        self.info_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.info_table.verticalHeader().setVisible(False)
        self.info_table.horizontalHeader().setSectionResizeMode(
            0, QHeaderView.ResizeMode.ResizeToContents
        )
        self.info_table.horizontalHeader().setStretchLastSection(True)

        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.0, 1000.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setSpecialValueText("not set")
        self.mpp_spin.setToolTip(
            "Level-0 pixel size in micrometres per pixel (0.25 at 40×, 0.5 at 20×)"
        )
        self.mpp_spin.setEnabled(False)
        self.apply_mpp_button = QPushButton("Apply µm/px")
        self.apply_mpp_button.setToolTip(
            "Set this pixel size on the selected (or last opened) layer"
        )
        self.apply_mpp_button.setEnabled(False)
        self.mpp_hint = QLabel("")
        self.mpp_hint.setWordWrap(True)

        self.estimate_button = QPushButton("Estimate magnification")
        self.estimate_button.setToolTip(
            "Estimate the objective from nucleus sizes in a few tissue regions (H&E; no "
            "model needed) and compare it with the file's metadata"
        )
        self.use_estimate_button = QPushButton("Use estimated µm/px")
        self.use_estimate_button.setToolTip(
            "Fill the pixel size with 10 µm/px ÷ estimated magnification (20× → 0.5)"
        )
        self.use_estimate_button.setEnabled(False)
        self.magnification_label = QLabel("")
        self.magnification_label.setWordWrap(True)

        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(self.browse_button)
        path_row.addWidget(self.folder_button)
        mpp_row = QHBoxLayout()
        mpp_row.addWidget(self.mpp_spin, 1)
        mpp_row.addWidget(self.apply_mpp_button)
        button_row = QHBoxLayout()
        button_row.addWidget(self.inspect_button)
        button_row.addWidget(self.open_button)
        estimate_row = QHBoxLayout()
        estimate_row.addWidget(self.estimate_button)
        estimate_row.addWidget(self.use_estimate_button)
        form = QFormLayout()
        form.addRow("File", path_row)
        form.addRow("Backend", self.backend_combo)
        form.addRow("Pixel size", mpp_row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.mpp_hint)
        layout.addLayout(button_row)
        layout.addLayout(estimate_row)
        layout.addWidget(self.magnification_label)
        layout.addWidget(self.info_table, 1)
        layout.addWidget(self.status_label)

        self.browse_button.clicked.connect(self._browse_file)
        self.folder_button.clicked.connect(self._browse_folder)
        self.path_edit.returnPressed.connect(self.inspect_file)
        self.inspect_button.clicked.connect(self.inspect_file)
        self.open_button.clicked.connect(self.open_file)
        self.apply_mpp_button.clicked.connect(self.apply_mpp)
        self.estimate_button.clicked.connect(self.estimate_magnification)
        self.use_estimate_button.clicked.connect(self.use_estimated_mpp)

    # -- inputs --------------------------------------------------------------------
    def set_path(self, path: str | Path) -> None:
        """Put ``path`` in the file field (as Browse… does)."""
        self.path_edit.setText(str(path))

    def _browse_file(self) -> None:
        start = (
            str(Path(self.path_edit.text()).expanduser().parent) if self.path_edit.text() else ""
        )
        path, _ = QFileDialog.getOpenFileName(
            self, "Open slide, volume or image", start, _file_filter()
        )
        if path:
            self.set_path(path)
            self.inspect_file()

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(
            self, "Open an OME-Zarr folder", self.path_edit.text()
        )
        if path:
            self.set_path(path)
            self.inspect_file()

    def _inputs(self) -> tuple[str, str]:
        text = self.path_edit.text().strip()
        if not text:
            raise HistoAIError("no file chosen: type a path or press Browse…")
        return text, self.backend_combo.currentText()

    # -- actions (each guarded: errors become notifications) -----------------------------
    def inspect_file(self) -> Pyramid | None:
        """Open the chosen file's metadata and show it; ``None`` (and a message) on error."""
        return self._guard(self._inspect)

    def open_file(self) -> list[Layer]:
        """Add the chosen file to the viewer as lazy layers at physical scale."""
        return self._guard(self._open) or []

    def apply_mpp(self) -> list[Layer]:
        """Set the µm/px field's value on the selected (or last opened) layer."""
        return self._guard(self._apply_mpp) or []

    def estimate_magnification(self) -> Any:
        """Estimate the magnification in a thread worker; returns the worker (or None).

        Runs `napari_histo_ai.models.magnification.estimate_slide_magnification` (about
        a second: a few 512² regions are read and segmented) off the GUI thread.
        """
        from napari.qt.threading import create_worker

        from ..models.magnification import estimate_slide_magnification

        if self._estimate_worker is not None:
            return self._estimate_worker
        pyramid = self._guard(self._load)
        if pyramid is None:
            return None
        worker = create_worker(estimate_slide_magnification, pyramid, _start_thread=False)
        worker.returned.connect(self._on_estimate)
        worker.errored.connect(self._on_estimate_error)
        worker.finished.connect(self._on_estimate_finished)
        self._estimate_worker = worker
        self._estimate_may_fill = pyramid.mpp_source != "file" and pyramid.spacing_mm is None
        self.use_estimate_button.setEnabled(False)
        self.estimate_button.setEnabled(False)
        self.magnification_label.setStyleSheet("")
        self.magnification_label.setText(
            f"estimating the magnification of {Path(pyramid.path).name}…"
        )
        worker.start()
        return worker

    def use_estimated_mpp(self) -> list[Layer]:
        """Put the estimate's µm/px in the pixel-size field (and on an opened layer).

        Only for a file without a pixel size of its own; µm/px = 10 / magnification.
        """
        return self._guard(self._use_estimate) or []

    def _on_estimate(self, estimate: MagnificationEstimate) -> None:
        from napari.utils.notifications import show_warning

        self._estimate = estimate
        self.magnification_label.setText(estimate.describe())
        self.magnification_label.setStyleSheet(_WARN_STYLE if estimate.warning else "")
        self.use_estimate_button.setEnabled(estimate.mpp is not None and self._estimate_may_fill)
        if estimate.warning:
            show_warning(estimate.warning)

    def _on_estimate_error(self, exc: BaseException) -> None:
        self._show_error(
            str(exc) if isinstance(exc, HistoAIError) else f"{type(exc).__name__}: {exc}"
        )

    def _on_estimate_finished(self) -> None:
        self._estimate_worker = None
        self.estimate_button.setEnabled(True)

    def _use_estimate(self) -> list[Layer]:
        estimate = self._estimate
        if estimate is None or estimate.mpp is None:
            raise MetadataError("no magnification estimate yet: press Estimate magnification")
        if not self._estimate_may_fill:
            raise MetadataError(
                "the file records its own pixel size; the estimate only fills in a missing one"
            )
        self.mpp_spin.setEnabled(True)
        self.apply_mpp_button.setEnabled(True)
        self.mpp_spin.setValue(estimate.mpp)
        hint = (
            f"estimated from nuclei: {estimate.magnification:g}× → {estimate.mpp:.3g} µm/px "
            "(10 µm/px ÷ magnification)"
        )
        self.mpp_hint.setStyleSheet(_WARN_STYLE)
        self.mpp_hint.setText(hint + "; Open or Apply µm/px uses it")
        opened = [layer for layer in self._opened if layer in self._viewer.layers]
        if opened:
            return self._apply_mpp()
        return []

    def _guard(self, action: Callable[[], T]) -> T | None:
        return guarded(action, self._show_error)

    def _show_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(message, ERROR_STYLE)
        show_error(message)

    def _set_status(self, message: str, style: str = "") -> None:
        self.status_label.setStyleSheet(style)
        self.status_label.setText(message)

    # -- implementation ----------------------------------------------------------------
    def _load(self) -> Pyramid:
        key = self._inputs()
        if self._pyramid is None or self._pyramid_key != key:
            self._pyramid, self._pyramid_key = None, None
            self._pyramid = open_image(key[0], backend=key[1])
            self._pyramid_key = key
        return self._pyramid

    def _inspect(self) -> Pyramid:
        from .._napari.summary import info_rows

        pyramid = self._load()
        rows = info_rows(pyramid.info())
        self.info_table.setRowCount(len(rows))
        for i, (field, value) in enumerate(rows):
            self.info_table.setItem(i, 0, QTableWidgetItem(field))
            item = QTableWidgetItem(value)
            item.setToolTip(pyramid.path if field == "File" else value)
            self.info_table.setItem(i, 1, item)
        self._show_mpp_state(pyramid)
        self._set_status(
            f"{Path(pyramid.path).name}: metadata read (nothing decoded); Open adds it lazily"
        )
        return pyramid

    def _show_mpp_state(self, pyramid: Pyramid) -> None:
        from .._napari.summary import MPP_MISSING

        is_volume = pyramid.spacing_mm is not None
        missing = pyramid.mpp is None and not is_volume
        self.mpp_spin.setEnabled(missing)
        self.apply_mpp_button.setEnabled(missing)
        self.mpp_spin.setStyleSheet(_MISSING_STYLE if missing else "")
        if pyramid.mpp is not None:
            self.mpp_spin.setValue(pyramid.mpp[1])
        elif not missing:
            self.mpp_spin.setValue(0.0)
        self.mpp_hint.setStyleSheet(_WARN_STYLE if missing else "")
        if missing:
            self.mpp_hint.setText(MPP_MISSING)
        elif is_volume:
            self.mpp_hint.setText("volume: voxel spacing in mm from the file")
        elif pyramid.mpp_source == "file":
            self.mpp_hint.setText("pixel size from the file")
        else:
            self.mpp_hint.setText(f"pixel size: {pyramid.mpp_source}")

    def _open(self) -> list[Layer]:
        from .._napari.layers import add_layer_data, pyramid_to_layer_data

        pyramid = self._inspect()
        if pyramid.mpp is None and pyramid.spacing_mm is None and self.mpp_spin.value() > 0:
            pyramid.set_mpp(self.mpp_spin.value(), source="user")
        layers = add_layer_data(self._viewer, pyramid_to_layer_data(pyramid))
        self._opened = layers
        # the next Open of the same file gets its own Pyramid (its own mpp)
        self._pyramid, self._pyramid_key = None, None
        self._show_mpp_state(pyramid)
        # keep the field usable after opening a slide without a pixel size
        if pyramid.mpp_source == "user":
            self.mpp_spin.setEnabled(True)
            self.apply_mpp_button.setEnabled(True)
        name = Path(pyramid.path).name
        if pyramid.units == "pixel":
            self._set_status(f"Opened {name} in pixels: {_MPP_HINT}", _WARN_STYLE)
        else:
            levels = len(pyramid.levels)
            self._set_status(
                f"Opened {name}: {levels} level{'s' * (levels > 1)}, scale in {pyramid.units}"
            )
        return layers

    def _target_layer(self) -> Layer:
        from .._napari.layers import pyramid_of

        active = self._viewer.layers.selection.active
        if active is not None and pyramid_of(active) is not None:
            return active
        for layer in reversed(self._opened):
            if layer in self._viewer.layers:
                return layer
        raise MetadataError(
            "no layer opened by napari-histo-ai is selected: open a slide, then set its µm/px"
        )

    def _apply_mpp(self) -> list[Layer]:
        from .._napari.layers import set_layer_mpp

        if self.mpp_spin.value() <= 0:
            raise MetadataError("the pixel size is not set: type µm/px (0.25 at 40×, 0.5 at 20×)")
        layer = self._target_layer()
        changed = set_layer_mpp(layer, self.mpp_spin.value(), viewer=self._viewer)
        self._set_status(f"{layer.name}: {self.mpp_spin.value():.4g} µm/px (set by you)")
        self.mpp_spin.setStyleSheet("")
        self.mpp_hint.setStyleSheet("")
        self.mpp_hint.setText("set by you")
        return changed
