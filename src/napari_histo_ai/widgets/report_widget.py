"""The "Generate report" dock widget: a readable slide report from the models' results.

A thin view over `napari_histo_ai.reports.job.report_job`, driven by a napari thread
worker: the chosen models run over the whole image (complete runs in the output folder
are reused, partial ones resumed), then the report is measured, drawn and written as a
self-contained HTML file and a PDF. Results already in the viewer can be included as
they are, and the corrections of an open "Review & correct" session replace the model's
raw objects. When it is done the widget shows the plain-language summary and the
thumbnail, and opens the HTML or PDF in the system's viewer.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, QUrl
from qtpy.QtGui import QDesktopServices, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..errors import HistoAIError
from ._errors import ERROR_STYLE, guarded

if TYPE_CHECKING:
    import napari

    from ..models.registry import Registry
    from ..reports.job import ReportProgress, ReportResult

__all__ = ["ReportWidget"]

log = logging.getLogger(__name__)


class ReportWidget(QWidget):
    """Generate a slide report (HTML + PDF) without blocking the viewer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari injects it).
    registry : Registry, optional
        Models to offer; default packaged + entry points + the user folder.
    out_dir : Path, optional
        Where runs and reports go; default the user data folder's ``reports``.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        parent: QWidget | None = None,
        *,
        registry: Registry | None = None,
        out_dir: Path | None = None,
    ) -> None:
        super().__init__(parent)
        from .._napari.report import default_report_dir

        self._viewer = napari_viewer
        self._worker: Any = None
        self._cancel: threading.Event | None = None
        self.last_result: ReportResult | None = None
        if registry is None:
            from ..models.registry import load_registry

            registry = load_registry()
        self._registry = registry

        # -- what to report on
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The slide or image the report is about")
        self.models_list = QListWidget()
        self.models_list.setMaximumHeight(130)
        self.models_list.setToolTip(
            "Models run over the whole image; checked by default: the panel for this kind "
            "of image. A complete earlier run in the output folder is reused."
        )
        for name in registry.names():
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked)
            self.models_list.addItem(item)
        self.viewer_runs_check = QCheckBox("Include results shown in the viewer")
        self.viewer_runs_check.setChecked(True)
        self.viewer_runs_check.setToolTip(
            "Result layers of this image (e.g. a fine-tuned version's run) go into the "
            "report as they are; a run of a region reports on that region only"
        )
        self.corrections_check = QCheckBox("Use corrections from Review && correct")
        self.corrections_check.setChecked(True)
        self.corrections_check.setToolTip(
            "Count the reviewed objects (accepted and added, not rejected) instead of the "
            "model's raw detections, when a review session is open for this image"
        )
        # -- options
        self.hpf_spin = QDoubleSpinBox()
        self.hpf_spin.setDecimals(4)
        self.hpf_spin.setRange(0.01, 2.0)
        self.hpf_spin.setSingleStep(0.01)
        self.hpf_spin.setValue(0.237)
        self.hpf_spin.setSuffix(" mm²")
        self.hpf_spin.setToolTip(
            "Area of one high-power field of your microscope (π·(field number / objective "
            "/ 2)²; 0.237 mm² = field number 22 at 40×); mitoses are given per 10 HPF"
        )
        self.patient_edit = QLineEdit()
        self.patient_edit.setPlaceholderText("optional")
        self.html_check = QCheckBox("HTML")
        self.html_check.setChecked(True)
        self.pdf_check = QCheckBox("PDF")
        self.pdf_check.setChecked(True)
        self.out_edit = QLineEdit(str(out_dir or default_report_dir()))
        self.browse_button = QPushButton("…")
        self.browse_button.setMaximumWidth(32)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        # -- run
        self.generate_button = QPushButton("Generate report")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # -- result
        self.summary = QTextBrowser()
        self.summary.setMinimumHeight(120)
        self.thumbnail = QLabel()
        self.thumbnail.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.open_html_button = QPushButton("Open HTML")
        self.open_pdf_button = QPushButton("Open PDF")
        self.open_folder_button = QPushButton("Show folder")
        for button in (self.open_html_button, self.open_pdf_button, self.open_folder_button):
            button.setEnabled(False)

        source = QGroupBox("Report on")
        sform = QFormLayout(source)
        sform.addRow("Image", self.image_combo)
        sform.addRow("Models", self.models_list)
        sform.addRow(self.viewer_runs_check)
        sform.addRow(self.corrections_check)
        options = QGroupBox("Options")
        oform = QFormLayout(options)
        oform.addRow("High-power field", self.hpf_spin)
        oform.addRow("Patient", self.patient_edit)
        formats = QHBoxLayout()
        formats.addWidget(self.html_check)
        formats.addWidget(self.pdf_check)
        oform.addRow("Formats", formats)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit)
        out_row.addWidget(self.browse_button)
        oform.addRow("Folder", out_row)
        oform.addRow("Device", self.device_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        result = QGroupBox("Report")
        rlayout = QVBoxLayout(result)
        rlayout.addWidget(self.summary)
        rlayout.addWidget(self.thumbnail)
        open_row = QHBoxLayout()
        open_row.addWidget(self.open_html_button)
        open_row.addWidget(self.open_pdf_button)
        open_row.addWidget(self.open_folder_button)
        rlayout.addLayout(open_row)

        layout = QVBoxLayout(self)
        layout.addWidget(source)
        layout.addWidget(options)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(result)
        layout.addStretch(1)

        self.browse_button.clicked.connect(self._browse)
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button.clicked.connect(self.cancel)
        self.open_html_button.clicked.connect(lambda: self._open("html"))
        self.open_pdf_button.clicked.connect(lambda: self._open("pdf"))
        self.open_folder_button.clicked.connect(lambda: self._open("folder"))
        self.image_combo.currentTextChanged.connect(self._image_chosen)
        events = self._viewer.layers.events
        events.inserted.connect(self._refresh_images)
        events.removed.connect(self._refresh_images)
        self._refresh_images()

    # -- choices ---------------------------------------------------------------------
    def _refresh_images(self, *_: Any) -> None:
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [
            lyr.name
            for lyr in self._viewer.layers
            if isinstance(lyr, Image) and "run" not in lyr.metadata
        ]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != current:
            self._image_chosen(self.image_combo.currentText())

    def _image_chosen(self, name: str) -> None:
        """Check the default panel of models for the chosen image's kind."""
        if not name:
            return
        try:
            from .._napari.run import layer_pyramid
            from ..reports.job import panel_for

            models, notes = panel_for(layer_pyramid(self._viewer.layers[name]))
            panel = set(models)
            if notes:
                self._set_status("\n".join(notes))
        except (HistoAIError, KeyError, OSError, ValueError):
            return
        self.set_models(sorted(panel))

    def set_models(self, names: list[str] | tuple[str, ...]) -> None:
        """Check exactly these models in the list (unknown names are ignored)."""
        wanted = set(names)
        for i in range(self.models_list.count()):
            item = self.models_list.item(i)
            state = Qt.CheckState.Checked if item.text() in wanted else Qt.CheckState.Unchecked
            item.setCheckState(state)

    def models(self) -> tuple[str, ...]:
        """The checked models, in list order."""
        return tuple(
            self.models_list.item(i).text()
            for i in range(self.models_list.count())
            if self.models_list.item(i).checkState() == Qt.CheckState.Checked
        )

    def _browse(self) -> None:
        text = QFileDialog.getExistingDirectory(self, "Report folder", self.out_edit.text())
        if text:
            self.out_edit.setText(text)

    def _set_status(self, text: str, *, warn: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet(ERROR_STYLE if warn else "")

    def _show_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(message, warn=True)
        show_error(message)

    # -- the request -----------------------------------------------------------------
    def request(self) -> Any:
        """Gather the inputs into a `ReportRequest` (raises HistoAIError on bad input)."""
        from .._napari.report import image_file, run_model_name, viewer_runs, viewer_store
        from ..reports.content import ReportOptions
        from ..reports.job import ReportRequest

        name = self.image_combo.currentText()
        if not name:
            raise HistoAIError("no image to report on: open a slide first")
        layer = self._viewer.layers[name]
        image = image_file(layer)
        runs = tuple(viewer_runs(self._viewer, image)) if self.viewer_runs_check.isChecked() else ()
        # a model whose result is already in the viewer is not run again
        shown = {run_model_name(run) for run in runs}
        models = tuple(m for m in self.models() if m not in shown)
        if not models and not runs:
            raise HistoAIError(
                "no model is checked and no result of this image is in the viewer: check at "
                "least one model to run"
            )
        formats = tuple(
            fmt
            for fmt, check in (("html", self.html_check), ("pdf", self.pdf_check))
            if check.isChecked()
        )
        if not formats:
            raise HistoAIError("choose HTML, PDF or both")
        out_text = self.out_edit.text().strip()
        if not out_text:
            raise HistoAIError("choose a folder for the report")
        store = viewer_store(self._viewer, layer) if self.corrections_check.isChecked() else None
        patient = self.patient_edit.text().strip() or None
        options = ReportOptions(hpf_area_mm2=float(self.hpf_spin.value()), patient=patient)
        return ReportRequest(
            images=(image,),
            out_dir=Path(out_text).expanduser(),
            models=models,
            runs=runs,
            annotations=store,
            options=options,
            device=self.device_combo.currentText(),
            formats=formats,
        )

    # -- running ---------------------------------------------------------------------
    def generate(self) -> Any:
        """Start the report in a thread worker; returns the worker (None on bad input)."""
        from napari.qt.threading import create_worker

        from ..reports.job import report_job

        if self._worker is not None:
            return self._worker

        def start() -> Any:
            request = self.request()
            self._cancel = threading.Event()
            worker = create_worker(report_job, request, cancel=self._cancel, _start_thread=False)
            worker.yielded.connect(self._on_progress)
            worker.returned.connect(self._on_done)
            worker.errored.connect(self._on_error)
            worker.finished.connect(self._on_finished)
            self._worker = worker
            self.generate_button.setEnabled(False)
            self.cancel_button.setEnabled(True)
            self.progress.setRange(0, 0)
            self._set_status(f"reporting on {request.images[0].name}…")
            worker.start()
            return worker

        return guarded(start, self._show_error)

    def cancel(self) -> None:
        """Stop after the current batch; finished runs are kept and reused next time."""
        if self._cancel is not None and self._worker is not None:
            self._cancel.set()
            self.cancel_button.setEnabled(False)
            self._set_status("cancelling after this batch…")

    def _on_progress(self, progress: ReportProgress) -> None:
        steps = max(progress.n_steps, 1)
        within = progress.done / progress.total if progress.total else 0.0
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(1000 * min(1.0, (progress.index + within) / steps)))
        self._set_status(f"step {progress.index + 1}/{steps}: {progress.message or progress.step}")

    def _on_done(self, result: ReportResult | None) -> None:
        self.last_result = result
        if result is None or result.cancelled:
            self._set_status("cancelled: finished model runs are kept and reused next time")
            return
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        sentences = list(result.report.summary)
        self.summary.setPlainText("\n\n".join(sentences))
        png = result.files.get("thumbnail")
        if png is not None and Path(png).is_file():
            pixmap = QPixmap(str(png))
            if not pixmap.isNull():
                self.thumbnail.setPixmap(
                    pixmap.scaledToWidth(
                        min(360, pixmap.width()), Qt.TransformationMode.SmoothTransformation
                    )
                )
        self.open_html_button.setEnabled("html" in result.files)
        self.open_pdf_button.setEnabled("pdf" in result.files)
        self.open_folder_button.setEnabled(True)
        written = ", ".join(Path(p).name for k, p in result.files.items() if k in ("html", "pdf"))
        folder = next(iter(result.files.values())).parent if result.files else ""
        self._set_status(f"written: {written}\nin {folder}")

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, HistoAIError):
            self._show_error(str(exc))
        else:
            log.exception("report failed", exc_info=exc)
            self._show_error(f"the report failed: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        self.generate_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    def _open(self, what: str) -> None:
        """Open the HTML / PDF in the system's viewer, or show the folder."""
        result = self.last_result
        if result is None:
            return
        if what == "folder":
            target = next(iter(result.files.values())).parent
        else:
            target = result.files[what]
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(target)))
