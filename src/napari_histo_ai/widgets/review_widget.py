"""The "Review & correct" dock widget: correct model outputs, every edit saved at once.

A thin view over `napari_histo_ai._napari.annotations.AnnotationSession`: each button
and key is one call into the session; the session writes every edit to the image's
annotation store (SQLite, one transaction per edit), so nothing needs saving. Errors
become napari notifications with our message, never a traceback.

Keys on the review layers: A accept, R reject, 1–9 class, N next unreviewed,
Shift+N / Shift+P next / previous region of the uncertainty queue,
Ctrl+Z undo, Ctrl+Shift+Z / Ctrl+Y redo (these replace napari's own layer shortcuts
on those keys, e.g. R for rectangles: use the layer controls to pick a drawing tool).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import HistoAIError
from ._errors import ERROR_STYLE, guarded

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from .._napari.annotations import AnnotationSession

__all__ = ["ReviewWidget"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: export formats offered: label -> format name of `export_annotations`
FORMATS = {
    "QuPath GeoJSON (.geojson)": ("geojson", ".geojson"),
    "CSV points (.csv)": ("csv", ".csv"),
    "COCO JSON (.json)": ("coco", ".json"),
}
#: milliseconds between the last camera move and the viewport reload
VIEW_DEBOUNCE_MS = 200
#: milliseconds between the last paint stroke and the label write-back
PAINT_DEBOUNCE_MS = 500


class ReviewWidget(QWidget):
    """Review, correct and export the annotations of an image layer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari injects it).
    store_root : Path, optional
        Folder for the stores (``<image name>.annotations.sqlite``); default beside the
        image (`napari_histo_ai.annotations.store_paths.default_store_path`).
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        parent: QWidget | None = None,
        *,
        store_root: Path | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = napari_viewer
        self._store_root = Path(store_root) if store_root is not None else None
        self.session: AnnotationSession | None = None
        self._worker: Any = None
        self._cancel: threading.Event | None = None
        self._timers: dict[str, QTimer] = {}
        self.last_manifest: Any = None

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image whose annotations you review")
        self.open_button = QPushButton("Review this image")
        self.source_combo = QComboBox()
        self.source_combo.setToolTip("A model's points, boxes or lines (Run model results)")
        self.editable_button = QPushButton("Make editable")
        self.import_path = QLineEdit()
        self.import_path.setPlaceholderText("GeoJSON / CSV / COCO / Info.txt / run folder")
        self.import_button = QPushButton("Import…")
        self.import_button.setToolTip(
            "Add the objects of a file (QuPath GeoJSON, CSV points, COCO, mini-MIAS "
            "Info.txt) or of a run folder to this image's annotations (one undo step)"
        )
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("Class of what you draw; keys 1-9 set the selected class")
        self.class_edit = QLineEdit()
        self.class_edit.setPlaceholderText("new class")
        self.add_class_button = QPushButton("Add class")
        self.accept_button = QPushButton("Accept (A)")
        self.reject_button = QPushButton("Reject (R)")
        self.next_button = QPushButton("Next unreviewed (N)")
        self.undo_button = QPushButton("Undo (Ctrl+Z)")
        self.redo_button = QPushButton("Redo (Ctrl+Shift+Z)")
        self.counts_label = QLabel("")
        self.view_label = QLabel("")
        self.view_label.setWordWrap(True)

        self.labels_button = QPushButton("Open labels")
        self.labels_button.setToolTip("Open or create the label pyramid beside the store")
        self.edit_labels_button = QPushButton("Edit labels here")
        self.edit_labels_button.setToolTip(
            "Paint at full resolution in a window of at most 2048 × 2048 pixels around the "
            "centre of the view; it is written back when you stop painting"
        )

        self.format_combo = QComboBox()
        self.format_combo.addItems(list(FORMATS))
        self.export_path = QLineEdit()
        self.export_path.setPlaceholderText("file to write (Export… asks when empty)")
        self.export_button = QPushButton("Export…")

        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.05, 5000.0)
        self.mpp_spin.setDecimals(3)
        self.mpp_spin.setValue(0.5)
        self.mpp_spin.setSuffix(" µm/px")
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(8, 8192)
        self.patch_spin.setValue(256)
        self.patch_spin.setSuffix(" px")
        self.training_dir = QLineEdit()
        self.training_dir.setPlaceholderText("output folder (asks when empty)")
        self.training_button = QPushButton("Export training set…")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)

        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow(self.open_button)
        source_row = QHBoxLayout()
        source_row.addWidget(self.source_combo, 1)
        source_row.addWidget(self.editable_button)
        form.addRow("Model output", source_row)
        import_row = QHBoxLayout()
        import_row.addWidget(self.import_path, 1)
        import_row.addWidget(self.import_button)
        form.addRow("Import", import_row)
        form.addRow("Class", self.class_combo)
        class_row = QHBoxLayout()
        class_row.addWidget(self.class_edit, 1)
        class_row.addWidget(self.add_class_button)
        form.addRow(class_row)
        review = QGridLayout()
        review.addWidget(self.accept_button, 0, 0)
        review.addWidget(self.reject_button, 0, 1)
        review.addWidget(self.next_button, 1, 0, 1, 2)
        review.addWidget(self.undo_button, 2, 0)
        review.addWidget(self.redo_button, 2, 1)
        labels_row = QHBoxLayout()
        labels_row.addWidget(self.labels_button)
        labels_row.addWidget(self.edit_labels_button)
        export_box = QGroupBox("Export")
        export_form = QFormLayout(export_box)
        export_form.addRow("Format", self.format_combo)
        export_form.addRow("File", self.export_path)
        export_form.addRow(self.export_button)
        training_form = QFormLayout()
        training_form.addRow("Patch µm/px", self.mpp_spin)
        training_form.addRow("Patch size", self.patch_spin)
        training_form.addRow("Folder", self.training_dir)
        export_form.addRow(training_form)
        training_buttons = QHBoxLayout()
        training_buttons.addWidget(self.training_button)
        training_buttons.addWidget(self.cancel_button)
        export_form.addRow(training_buttons)
        export_form.addRow(self.progress)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(review)
        layout.addWidget(self.counts_label)
        layout.addWidget(self.view_label)
        layout.addLayout(labels_row)
        layout.addWidget(export_box)
        layout.addWidget(self._build_uncertainty_group())
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.open_button.clicked.connect(self.open_session)
        self.editable_button.clicked.connect(self.make_editable)
        self.import_button.clicked.connect(self.import_file)
        self.add_class_button.clicked.connect(self.add_class)
        self.class_combo.currentTextChanged.connect(self._class_chosen)
        self.accept_button.clicked.connect(self.accept)
        self.reject_button.clicked.connect(self.reject)
        self.next_button.clicked.connect(self.next_unreviewed)
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        self.labels_button.clicked.connect(self.open_labels)
        self.edit_labels_button.clicked.connect(self.edit_labels_here)
        self.export_button.clicked.connect(self.export)
        self.training_button.clicked.connect(self.export_training_set)
        self.cancel_button.clicked.connect(self.cancel)
        events = self._viewer.layers.events
        events.inserted.connect(self._refresh_layer_choices)
        events.removed.connect(self._refresh_layer_choices)
        camera = self._viewer.scene.camera if hasattr(self._viewer, "scene") else None
        camera = camera or self._viewer.camera
        camera.events.center.connect(self._view_moved)
        camera.events.zoom.connect(self._view_moved)
        self._viewer.dims.events.current_step.connect(self._view_moved)
        self._refresh_layer_choices()
        self._show_state()

    # -- choices ---------------------------------------------------------------------
    def _refresh_layer_choices(self, *_: Any) -> None:
        from napari.layers import Image, Points, Shapes

        def fill(combo: QComboBox, names: list[str]) -> None:
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

        layers = list(self._viewer.layers)
        images = [
            lyr.name for lyr in layers if isinstance(lyr, Image) and "run" not in lyr.metadata
        ]
        sources = [
            lyr.name
            for lyr in layers
            if isinstance(lyr, (Points, Shapes)) and lyr.metadata.get("kind") != "review"
        ]
        fill(self.image_combo, images)
        fill(self.source_combo, sources)
        from .._napari.uncertainty import is_result_layer

        fill(self.result_combo, [lyr.name for lyr in layers if is_result_layer(lyr)])
        if self.session is not None and self.session.image_layer not in layers:
            self._close_session()

    def _fill_classes(self) -> None:
        session = self.session
        classes = list(session.store.classes) if session is not None else []
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(classes)
        if session is not None and session.current_class in classes:
            self.class_combo.setCurrentText(session.current_class)
        self.class_combo.blockSignals(False)

    # -- the GUI edge ------------------------------------------------------------------
    def _guard(self, action: Callable[[], T]) -> T | None:
        return guarded(action, self._show_error)

    def _show_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(message, warn=True)
        show_error(message)

    def _set_status(self, text: str, *, warn: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet(ERROR_STYLE if warn else "")

    def _need_session(self) -> AnnotationSession:
        if self.session is None:
            self._open_session()
        assert self.session is not None
        return self.session

    # -- session -------------------------------------------------------------------------
    def open_session(self) -> AnnotationSession | None:
        """Open the chosen image's store and show its editable layers."""
        return self._guard(self._open_session)

    def _open_session(self) -> AnnotationSession:
        from .._napari.annotations import AnnotationSession

        name = self.image_combo.currentText()
        if not name:
            raise HistoAIError("no image layer: open a slide or image first")
        layer = self._viewer.layers[name]
        if self.session is not None:
            if self.session.image_layer is layer:
                return self.session
            self._close_session()
        path = None
        if self._store_root is not None:
            from .._napari.annotations import image_ref_of
            from ..annotations.store_paths import STORE_SUFFIX

            image = image_ref_of(layer)
            stem = Path(image.path).name if not image.path.startswith("napari layer:") else name
            path = self._store_root / f"{stem}{STORE_SUFFIX}"
        session = AnnotationSession.open(layer, viewer=self._viewer, path=path, defer=self._defer)
        session.on_change.append(self._edited)
        session.on_error.append(lambda exc: self._show_error(f"edit not saved: {exc}"))
        self.session = session
        for edit_layer in (session.points_layer, session.shapes_layer):
            self._bind_keys(edit_layer)
        pixel = session.store.image.pixel_um
        if pixel is not None:  # training patches at the image's own resolution by default
            self.mpp_spin.setValue(float(pixel[0]))
        self._fill_classes()
        self._refresh_layer_choices()
        self._show_state()
        self._set_status(f"annotations of '{name}': {session.store.path}")
        return session

    def _close_session(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            session.close()
        except Exception:
            log.exception("closing the annotation store failed")
        for layer in (
            session.points_layer,
            session.shapes_layer,
            session.labels_layer,
            session.label_window_layer,
        ):
            if layer is not None and layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self._fill_classes()
        self._show_state()

    def closeEvent(self, event: Any) -> None:
        self._close_session()
        super().closeEvent(event)

    def _bind_keys(self, layer: Layer) -> None:
        bindings: dict[str, Callable[[], Any]] = {
            "a": self.accept,
            "r": self.reject,
            "n": self.next_unreviewed,
            "Shift-n": self.next_region,
            "Shift-p": self.previous_region,
            "Control-z": self.undo,
            "Control-Shift-z": self.redo,
            "Control-y": self.redo,
        }
        for number in range(1, 10):
            bindings[str(number)] = lambda n=number: self.set_class_number(n)
        for key, action in bindings.items():
            layer.bind_key(key, lambda _layer, action=action: action(), overwrite=True)
        # napari pastes points without a data event: save what was pasted
        layer.bind_key("Control-v", lambda _layer: self._paste(_layer), overwrite=True)

    def _paste(self, layer: Layer) -> None:
        def run() -> None:
            layer._paste_data()
            self._need_session().save_new_rows(layer)

        self._guard(run)

    # -- actions (one call into the session each) --------------------------------------
    def make_editable(self) -> int | None:
        """Copy the chosen model output into the store as unreviewed objects."""

        def run() -> int:
            name = self.source_combo.currentText()
            if not name:
                raise HistoAIError("no model output: run a detector with 'Run model' first")
            session = self._need_session()
            n = session.make_editable(self._viewer.layers[name])
            self._fill_classes()
            self._set_status(f"{n} objects of '{name}' are now editable · {self._saved_text()}")
            return n

        return self._guard(run)

    def import_file(self) -> int | None:
        """Add the objects of an annotation file or run folder (asks when empty)."""

        def run() -> int | None:
            text = self.import_path.text().strip()
            if not text:
                text, _ = QFileDialog.getOpenFileName(
                    self, "Import annotations", "", "Annotations (*.geojson *.json *.csv *.txt)"
                )
                if not text:
                    return None
                self.import_path.setText(text)
            session = self._need_session()
            n = session.make_editable(Path(text))
            self._fill_classes()
            self._set_status(f"imported {n} objects from {Path(text).name} · {self._saved_text()}")
            return n

        return self._guard(run)

    def add_class(self) -> str | None:
        def run() -> str:
            session = self._need_session()
            name = session.add_class(self.class_edit.text())
            session.set_current_class(name)  # what you add is what you draw next
            self.class_edit.clear()
            self._fill_classes()
            self.class_combo.setCurrentText(name)
            return name

        return self._guard(run)

    def _class_chosen(self, name: str) -> None:
        if self.session is not None and name:
            self._guard(lambda: self.session.set_current_class(name))  # type: ignore[union-attr]

    def set_class_number(self, number: int) -> int | None:
        """Give the selected objects the ``number``-th class (keys 1–9)."""

        def run() -> int:
            session = self._need_session()
            name = session.class_by_number(number)
            n = session.set_class_selected(name)
            self.class_combo.setCurrentText(name)
            return n

        return self._guard(run)

    def accept(self) -> int | None:
        return self._guard(lambda: self._need_session().accept_selected())

    def reject(self) -> int | None:
        return self._guard(lambda: self._need_session().reject_selected())

    def next_unreviewed(self) -> Any:
        def run() -> Any:
            ann = self._need_session().next_unreviewed()
            if ann is None:
                self._set_status("nothing left to review")
            return ann

        return self._guard(run)

    def undo(self) -> str | None:
        def run() -> str | None:
            label = self._need_session().undo()
            self._set_status(f"undone: {label}" if label else "nothing to undo")
            return label

        return self._guard(run)

    def redo(self) -> str | None:
        def run() -> str | None:
            label = self._need_session().redo()
            self._set_status(f"redone: {label}" if label else "nothing to redo")
            return label

        return self._guard(run)

    def open_labels(self) -> Any:
        def run() -> Any:
            session = self._need_session()
            pyramid = session.open_labels(session.default_labels_path())
            self._set_status(f"labels: {pyramid.path}")
            return pyramid

        return self._guard(run)

    def edit_labels_here(self) -> Any:
        def run() -> Any:
            session = self._need_session()
            if session.label_pyramid is None:
                session.open_labels(session.default_labels_path())
            box = session.edit_labels_here()
            layer = session.label_window_layer
            layer.bind_key("Control-z", lambda _l: self._label_history("undo"), overwrite=True)
            layer.bind_key(
                "Control-Shift-z", lambda _l: self._label_history("redo"), overwrite=True
            )
            layer.bind_key("Control-y", lambda _l: self._label_history("redo"), overwrite=True)
            self._viewer.layers.selection.active = layer
            top, left, bottom, right = box
            self._set_status(
                f"painting rows {top}–{bottom}, columns {left}–{right} at full resolution "
                "(at most 2048 × 2048 px); saved when you pause"
            )
            return box

        return self._guard(run)

    def _label_history(self, which: str) -> None:
        session = self._need_session()
        label = session.undo_labels() if which == "undo" else session.redo_labels()
        self._set_status(f"labels {which}: {label}" if label else f"nothing to {which}")

    def export(self) -> Path | None:
        """Write the annotations in the chosen format (asks for the file when empty)."""

        def run() -> Path | None:
            session = self._need_session()
            fmt, suffix = FORMATS[self.format_combo.currentText()]
            text = self.export_path.text().strip()
            if not text:
                text, _ = QFileDialog.getSaveFileName(self, "Export annotations", "", f"*{suffix}")
                if not text:
                    return None
                self.export_path.setText(text)
            out = session.export(Path(text), format=fmt)
            self._set_status(f"exported {session.store.count()} objects to {out}")
            return out

        return self._guard(run)

    def export_training_set(self) -> Any:
        """Write the training set in a worker (progress bar, Cancel)."""
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return self._worker

        def start() -> Any:
            session = self._need_session()
            text = self.training_dir.text().strip()
            if not text:
                text = QFileDialog.getExistingDirectory(self, "Training set folder")
                if not text:
                    return None
                self.training_dir.setText(text)
            self._cancel = threading.Event()
            generator = session.training_set(
                Path(text),
                mpp=float(self.mpp_spin.value()),
                patch_size=int(self.patch_spin.value()),
                cancel=self._cancel,
            )
            worker = create_worker(lambda: (yield from generator), _start_thread=False)
            worker.yielded.connect(self._on_training_progress)
            worker.returned.connect(self._on_training_done)
            worker.errored.connect(self._on_worker_error)
            worker.finished.connect(self._on_worker_finished)
            self._worker = worker
            self.training_button.setEnabled(False)
            self.cancel_button.setEnabled(True)
            self.progress.setRange(0, 0)
            self._set_status(f"writing the training set to {text}…")
            worker.start()
            return worker

        return self._guard(start)

    def cancel(self) -> None:
        if self._cancel is not None and self._worker is not None:
            self._cancel.set()
            self._worker.quit()
            self.cancel_button.setEnabled(False)
            self._set_status("cancelling after this sample…")

    def _on_training_progress(self, progress: Any) -> None:
        self.progress.setRange(0, max(1, int(progress.total)))
        self.progress.setValue(int(progress.done))
        self._set_status(f"training set: {progress.done}/{progress.total} samples")

    def _on_training_done(self, manifest: Any) -> None:
        self.last_manifest = manifest
        complete = getattr(manifest, "complete", True)
        n = len(getattr(manifest, "samples", ()) or ())
        path = getattr(manifest, "path", None) or self.training_dir.text()
        state = "done" if complete else "cancelled (no manifest written)"
        if complete:  # the last progress record precedes the manifest: show it full
            self.progress.setValue(self.progress.maximum())
        self._set_status(f"training set {state}: {n} samples in {path}")

    def _on_worker_error(self, exc: BaseException) -> None:
        if isinstance(exc, HistoAIError):
            self._show_error(str(exc))
        else:
            log.exception("training-set export failed", exc_info=exc)
            self._show_error(f"the training-set export failed: {type(exc).__name__}: {exc}")

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.training_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    # -- uncertainty: ranked regions to review (active learning) ----------------------
    def _build_uncertainty_group(self) -> QGroupBox:
        self.result_combo = QComboBox()
        self.result_combo.setToolTip(
            "A probability layer of a Run-model result: its entropy (or MC-dropout "
            "uncertainty) is mapped and the most uncertain regions are queued"
        )
        self.region_spin = QDoubleSpinBox()
        self.region_spin.setRange(8.0, 100_000.0)
        self.region_spin.setValue(256.0)
        self.region_spin.setSuffix(" µm")
        self.region_spin.setToolTip("Side of a region (pixels when the image has no µm/px)")
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 10_000)
        self.top_spin.setValue(20)
        self.mc_spin = QSpinBox()
        self.mc_spin.setRange(0, 64)
        self.mc_spin.setValue(0)
        self.mc_spin.setSpecialValueText("off: the run's entropy")
        self.mc_spin.setToolTip(
            "MC-dropout: run the result's model this many times per tile over the visible "
            "region with dropout on, and rank by the spread (models with dropout only)"
        )
        self.rank_button = QPushButton("Rank regions")
        self.rank_cancel_button = QPushButton("Cancel")
        self.rank_cancel_button.setEnabled(False)
        self.rank_progress = QProgressBar()
        self.rank_progress.setRange(0, 1)
        self.rank_progress.setValue(0)
        self.previous_region_button = QPushButton("Previous region (Shift+P)")
        self.next_region_button = QPushButton("Next region (Shift+N)")
        box = QGroupBox("Uncertainty")
        form = QFormLayout(box)
        form.addRow("Result", self.result_combo)
        form.addRow("Region", self.region_spin)
        form.addRow("Top", self.top_spin)
        form.addRow("MC-dropout passes", self.mc_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.rank_button)
        buttons.addWidget(self.rank_cancel_button)
        form.addRow(buttons)
        form.addRow(self.rank_progress)
        moves = QHBoxLayout()
        moves.addWidget(self.previous_region_button)
        moves.addWidget(self.next_region_button)
        form.addRow(moves)
        self.rank_button.clicked.connect(self.rank_regions)
        self.rank_cancel_button.clicked.connect(self.cancel)
        self.previous_region_button.clicked.connect(self.previous_region)
        self.next_region_button.clicked.connect(self.next_region)
        self.last_ranking: Any = None
        return box

    def rank_regions(self) -> Any:
        """Map the chosen result's uncertainty and rank regions, in a worker (progress,
        Cancel); the map and the queue are added as layers and the queue is saved."""
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return self._worker

        def start() -> Any:
            from .._napari.uncertainty import rank_job

            name = self.result_combo.currentText()
            if not name:
                raise HistoAIError(
                    "no result layer: run a model with 'Run model' first (its probability "
                    "layer is what gets ranked)"
                )
            passes = int(self.mc_spin.value())
            if passes == 1:
                raise HistoAIError("MC-dropout needs at least 2 passes (0: the run's entropy)")
            image = name.split(" · ")[0]
            self._cancel = threading.Event()
            worker = create_worker(
                rank_job,
                self._viewer,
                self._viewer.layers[name],
                passes=passes,
                region_um=float(self.region_spin.value()),
                top_k=int(self.top_spin.value()),
                cancel=self._cancel,
                _start_thread=False,
            )
            worker.yielded.connect(self._on_rank_progress)
            worker.returned.connect(lambda out: self._on_ranked(out, image))
            worker.errored.connect(self._on_rank_error)
            worker.finished.connect(self._on_rank_finished)
            self._worker = worker
            self.rank_button.setEnabled(False)
            self.rank_cancel_button.setEnabled(True)
            self.rank_progress.setRange(0, 0)
            how = f"MC-dropout ({passes} passes over the view)" if passes else "entropy"
            self._set_status(f"ranking regions of '{name}' by {how}…")
            worker.start()
            return worker

        return self._guard(start)

    def _on_rank_progress(self, progress: Any) -> None:
        self.rank_progress.setRange(0, max(1, int(progress.total)))
        self.rank_progress.setValue(int(progress.done))

    def _on_ranked(self, out: Any, image: str) -> None:
        def show() -> None:
            from .._napari.layers import add_layer_data
            from .._napari.uncertainty import regions_layer, uncertainty_layer

            if out is None:
                self._set_status("MC-dropout run cancelled: Rank regions again resumes it")
                return
            ranking, umap = out
            self.last_ranking = ranking
            if not ranking.complete:
                self._set_status("ranking cancelled")
                return
            tuples = [
                uncertainty_layer(umap, image=image),
                regions_layer(ranking.regions, umap, image=image),
            ]
            for _, kwargs, _ in tuples:  # ranking again replaces the layers
                if kwargs["name"] in self._viewer.layers:
                    self._viewer.layers.remove(kwargs["name"])
            add_layer_data(self._viewer, tuples)
            session = self._need_session()
            n = session.set_region_queue(ranking.regions, source=str(umap.run))
            self._set_status(
                f"{n} regions queued by {umap.method} ({ranking.statistic} per region, "
                f"level {ranking.level}); Next region (Shift+N) goes to the first"
            )

        self._guard(show)

    def _on_rank_error(self, exc: BaseException) -> None:
        if isinstance(exc, HistoAIError):
            self._show_error(str(exc))
        else:
            log.exception("ranking regions failed", exc_info=exc)
            self._show_error(f"ranking regions failed: {type(exc).__name__}: {exc}")

    def _on_rank_finished(self) -> None:
        self._worker = None
        self.rank_button.setEnabled(True)
        self.rank_cancel_button.setEnabled(False)
        if self.rank_progress.maximum() == 0:
            self.rank_progress.setRange(0, 1)

    def next_region(self) -> Any:
        """Show the next region of the queue (zoomed to fit)."""
        return self._guard(lambda: self._show_region(self._need_session().next_region()))

    def previous_region(self) -> Any:
        """Show the previous region of the queue."""
        return self._guard(lambda: self._show_region(self._need_session().previous_region()))

    def _show_region(self, region: Any) -> Any:
        session = self._need_session()
        n = len(session.region_queue)
        if region is None:
            self._set_status(
                "no region queue: press 'Rank regions' first"
                if not n
                else "end of the region queue"
                if session.region_index >= n - 1
                else "start of the region queue"
            )
            return None
        self._set_status(f"region {region.rank} of {n}: uncertainty {region.score:.3f}")
        return region

    # -- viewport and state ------------------------------------------------------------
    def _defer(self, key: str, function: Callable[[], None]) -> None:
        """Run ``function`` once, ``PAINT_DEBOUNCE_MS`` after the last call with ``key``."""
        timer = self._timers.get(key)
        if timer is None:
            timer = QTimer(self)
            timer.setSingleShot(True)
            self._timers[key] = timer
        try:
            timer.timeout.disconnect()
        except (TypeError, RuntimeError):
            pass
        timer.timeout.connect(lambda: self._guard(function))
        timer.start(PAINT_DEBOUNCE_MS)

    def _view_moved(self, *_: Any) -> None:
        if self.session is None:
            return
        timer = self._timers.get("view")
        if timer is None:
            timer = QTimer(self)
            timer.setSingleShot(True)
            timer.timeout.connect(self.refresh_view)
            self._timers["view"] = timer
        timer.start(VIEW_DEBOUNCE_MS)

    def refresh_view(self) -> None:
        """Reload the review layers for the viewport (called debounced on camera moves)."""
        if self.session is not None:
            session = self.session
            self._guard(lambda: session.refresh(force=False))
            self._show_state()

    def _saved_text(self) -> str:
        session = self.session
        if session is None or session.last_saved is None:
            return "saved automatically"
        return "saved " + time.strftime("%H:%M:%S", time.localtime(session.last_saved))

    def _edited(self) -> None:
        self._show_state()
        self._set_status(self._saved_text())

    def _show_state(self) -> None:
        session = self.session
        enabled = session is not None
        for button in (
            self.accept_button,
            self.reject_button,
            self.next_button,
            self.undo_button,
            self.redo_button,
            self.export_button,
            self.edit_labels_button,
            self.labels_button,
        ):
            button.setEnabled(enabled)
        if session is None:
            self.counts_label.setText("")
            self.view_label.setText("")
            return
        counts = session.counts()
        self.counts_label.setText(" · ".join(f"{k}: {v}" for k, v in counts.items()))
        if session.truncated:
            self.view_label.setText(
                f"{session.shown} of {'~' if session.in_view_estimated else ''}"
                f"{session.in_view} objects shown — zoom in to see all"
            )
        else:
            self.view_label.setText(f"{session.shown} objects shown")
        self.undo_button.setEnabled(bool(session.store.can_undo))
        self.redo_button.setEnabled(bool(session.store.can_redo))
