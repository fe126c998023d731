"""The "Retrain" dock widget: corrections → fine-tune → compare versions → re-run.

A thin view over `napari_histo_ai.training.retrain.retrain` (export the image's
reviewed corrections, then `finetune`), driven by a napari thread worker: the viewer
keeps working while torch trains. Every finished epoch redraws the loss and validation
curves (`napari_histo_ai.plots.training_curves_figure` on a matplotlib Qt canvas).
Cancel stops after the current batch and keeps the last epoch's checkpoint; Resume
continues it. A finished run registers a new version (``<model>-vN``); the Versions
group compares two versions on the same validation items (numbers and a plot, PNGs in
the run folder) and runs the chosen version on the visible region through the Run model
widget, so its layers appear beside the old ones.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
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

    from ..models.registry import Registry
    from ..training.finetune import FinetuneResult, TrainProgress

__all__ = ["RetrainWidget"]

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_IMAGE = "(none: data folders only)"


class RetrainWidget(QWidget):
    """Fine-tune a model on the corrections of an image, compare, switch versions.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari injects it).
    registry : Registry, optional
        Models to offer; default packaged + entry points + the user folder (re-read
        after every run, so new versions appear).
    models_dir : Path, optional
        Where new versions are registered; default the user model folder.
    runs_root : Path, optional
        Where run folders go; default the user data folder's ``training-runs``.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        parent: QWidget | None = None,
        *,
        registry: Registry | None = None,
        models_dir: Path | None = None,
        runs_root: Path | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = napari_viewer
        self._fixed_registry = registry
        self._models_dir = models_dir
        self._runs_root = runs_root
        self._worker: Any = None
        self._cancel: threading.Event | None = None
        self._last_request: Any = None
        self.last_result: FinetuneResult | None = None
        self.last_comparison: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self._registry = self._load_registry()

        # -- data
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image whose reviewed corrections are exported")
        self.data_list = QListWidget()
        self.data_list.setMaximumHeight(70)
        self.data_list.setToolTip("Training-set folders and folders of real data (AMi-Br)")
        self.add_data_button = QPushButton("Add folder…")
        self.remove_data_button = QPushButton("Remove")
        # -- model and options
        self.model_combo = QComboBox()
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(6)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(3e-4)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(16)
        self.patience_spin = QSpinBox()
        self.patience_spin.setRange(0, 100)
        self.patience_spin.setValue(3)
        self.patience_spin.setSpecialValueText("never stop early")
        self.loss_combo = QComboBox()
        self.flips_check = QCheckBox("Flips")
        self.flips_check.setChecked(True)
        self.rotations_check = QCheckBox("90° rotations")
        self.rotations_check.setChecked(True)
        self.noise_spin = QDoubleSpinBox()
        self.noise_spin.setDecimals(3)
        self.noise_spin.setRange(0.0, 1.0)
        self.noise_spin.setSingleStep(0.01)
        self.noise_spin.setValue(0.02)
        self.stain_spin = QDoubleSpinBox()
        self.stain_spin.setDecimals(3)
        self.stain_spin.setRange(0.0, 1.0)
        self.stain_spin.setSingleStep(0.01)
        self.stain_spin.setValue(0.05)
        self.balanced_check = QCheckBox("Balanced batches (⅓ positives)")
        self.balanced_check.setChecked(True)
        self.feed_check = QCheckBox("Negative feed (re-train on mistakes)")
        self.feed_check.setChecked(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.threads_spin = QSpinBox()
        self.threads_spin.setRange(0, 256)
        self.threads_spin.setValue(1)
        self.threads_spin.setSpecialValueText("torch default")
        self.threads_spin.setToolTip(
            "CPU threads while training (restored afterwards); on a busy 2-core machine "
            "1 thread trains fastest"
        )
        # -- run
        self.retrain_button = QPushButton("Retrain")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # -- versions
        self.version_combo = QComboBox()
        self.compare_button = QPushButton("Compare with parent")
        self.run_view_button = QPushButton("Run on view")
        self.version_label = QLabel("")
        self.version_label.setWordWrap(True)
        self.version_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(5, 3.2), dpi=90, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(240)

        data_box = QGroupBox("Corrections and data")
        data_form = QFormLayout(data_box)
        data_form.addRow("Image", self.image_combo)
        data_form.addRow(self.data_list)
        data_buttons = QHBoxLayout()
        data_buttons.addWidget(self.add_data_button)
        data_buttons.addWidget(self.remove_data_button)
        data_form.addRow(data_buttons)

        options = QGroupBox("Model and training")
        form = QFormLayout(options)
        form.addRow("Model", self.model_combo)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Early stop after", self.patience_spin)
        form.addRow("Loss", self.loss_combo)
        augment_row = QHBoxLayout()
        augment_row.addWidget(self.flips_check)
        augment_row.addWidget(self.rotations_check)
        form.addRow("Augment", augment_row)
        form.addRow("Noise σ", self.noise_spin)
        form.addRow("Stain jitter σ", self.stain_spin)
        form.addRow(self.balanced_check)
        form.addRow(self.feed_check)
        form.addRow("Device", self.device_combo)
        form.addRow("CPU threads", self.threads_spin)

        buttons = QHBoxLayout()
        buttons.addWidget(self.retrain_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.resume_button)

        versions = QGroupBox("Versions")
        vform = QFormLayout(versions)
        vform.addRow("Version", self.version_combo)
        vbuttons = QHBoxLayout()
        vbuttons.addWidget(self.compare_button)
        vbuttons.addWidget(self.run_view_button)
        vform.addRow(vbuttons)
        vform.addRow(self.version_label)

        layout = QVBoxLayout(self)
        layout.addWidget(data_box)
        layout.addWidget(options)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.canvas)
        layout.addWidget(versions)
        layout.addStretch(1)

        self.add_data_button.clicked.connect(self._add_data_dialog)
        self.remove_data_button.clicked.connect(self._remove_data)
        self.retrain_button.clicked.connect(self.retrain)
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button.clicked.connect(self.resume)
        self.compare_button.clicked.connect(self.compare)
        self.run_view_button.clicked.connect(self.run_on_view)
        self.model_combo.currentTextChanged.connect(self._model_chosen)
        self.version_combo.currentTextChanged.connect(self._show_version)
        events = self._viewer.layers.events
        events.inserted.connect(self._refresh_images)
        events.removed.connect(self._refresh_images)
        self._fill_models()
        self._refresh_images()
        self._draw_history()

    # -- helpers ---------------------------------------------------------------------
    def _load_registry(self) -> Registry:
        if self._fixed_registry is not None and self._models_dir is None:
            return self._fixed_registry
        from ..models.registry import load_registry

        return load_registry(user_dir=self._models_dir)

    def _guard(self, action: Any) -> Any:
        return guarded(action, self._show_error)

    def _show_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self._set_status(message, warn=True)
        show_error(message)

    def _set_status(self, text: str, *, warn: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet(ERROR_STYLE if warn else "")

    def _fill_models(self, select: str | None = None) -> None:
        from ..training.datasets import training_task
        from ..training.versions import lineage_root

        current = select or self.model_combo.currentText()
        roots = []
        for spec in self._registry:
            try:
                training_task(spec)
            except HistoAIError:
                continue
            root = lineage_root(self._registry, spec.name)
            if root not in roots:
                roots.append(root)
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems(roots)
        if current:
            root = lineage_root(self._registry, current) if current in self._registry else ""
            if root in roots:
                self.model_combo.setCurrentText(root)
        self.model_combo.blockSignals(False)
        self._model_chosen(self.model_combo.currentText(), select=select)

    def _model_chosen(self, name: str, *, select: str | None = None) -> None:
        from ..training.datasets import training_task
        from ..training.finetune import LOSSES
        from ..training.versions import versions_of

        self.loss_combo.clear()
        self.version_combo.blockSignals(True)
        self.version_combo.clear()
        if name:
            self.loss_combo.addItems(list(LOSSES[training_task(self._registry.get(name)).kind]))
            names = [s.name for s in versions_of(self._registry, name)]
            self.version_combo.addItems(names)
            self.version_combo.setCurrentText(select if select in names else names[-1])
        self.version_combo.blockSignals(False)
        self._show_version(self.version_combo.currentText())

    def _show_version(self, name: str) -> None:
        if not name:
            self.version_label.setText("")
            return
        spec = self._registry.get(name)
        lines = [f"{spec.name} {spec.version}"]
        if spec.card.parent:
            lines[0] += f" (from {spec.card.parent} {spec.card.parent_version})"
        before = dict(spec.card.training.get("before") or {})
        after = dict(spec.card.training.get("after") or {})
        shown = ("f1", "auc", "hard_negative_fp_rate", "recall", "precision")
        for key in shown:
            if key in after:
                old = f"{before[key]:.3f} → " if key in before else ""
                lines.append(f"  validation {key}: {old}{after[key]:.3f}")
        if not spec.card.parent and spec.card.metrics:
            first = list(spec.card.metrics.items())[:3]
            lines.append("  " + ", ".join(f"{k} {v:g}" for k, v in first))
        self.version_label.setText("\n".join(lines))
        self.compare_button.setEnabled(bool(spec.card.parent))

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
        self.image_combo.addItems([*names, NO_IMAGE])
        if current in names or current == NO_IMAGE:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def add_data(self, path: str | Path) -> None:
        """Add a training-set or data folder to train on."""
        text = str(path)
        existing = [self.data_list.item(i).text() for i in range(self.data_list.count())]
        if text not in existing:
            self.data_list.addItem(text)

    def _add_data_dialog(self) -> None:
        text = QFileDialog.getExistingDirectory(self, "Training-set or data folder")
        if text:
            self.add_data(text)

    def _remove_data(self) -> None:
        for item in self.data_list.selectedItems():
            self.data_list.takeItem(self.data_list.row(item))

    def _store_for(self, layer: Any) -> Path | None:
        """The store the Review widget has open for ``layer``, if it is docked."""
        window = getattr(self._viewer, "window", None)
        docked = getattr(window, "dock_widgets", {}) if window is not None else {}
        for widget in dict(docked).values():
            session = getattr(widget, "session", None)
            if session is not None and getattr(session, "image_layer", None) is layer:
                return Path(session.store.path)
        return None

    def config(self) -> Any:
        """The options as a `FinetuneConfig`."""
        from ..training.finetune import FinetuneConfig

        return FinetuneConfig(
            epochs=self.epochs_spin.value(),
            learning_rate=float(self.lr_spin.value()),
            batch_size=self.batch_spin.value(),
            flips=self.flips_check.isChecked(),
            rotations=self.rotations_check.isChecked(),
            noise_sigma=float(self.noise_spin.value()),
            stain_jitter=float(self.stain_spin.value()),
            balanced=self.balanced_check.isChecked(),
            negative_feed=self.feed_check.isChecked(),
            loss=self.loss_combo.currentText() or "auto",
            patience=self.patience_spin.value(),
            device=self.device_combo.currentText(),
            threads=self.threads_spin.value() or None,
        )

    def request(self, *, resume: bool = False) -> Any:
        """Gather the inputs into a `RetrainRequest` (raises HistoAIError on bad input)."""
        from .._napari.run import layer_pyramid
        from ..training.finetune import default_run_dir
        from ..training.retrain import RetrainRequest

        if resume:
            if self._last_request is None:
                raise HistoAIError("nothing to resume: press Retrain first")
            return replace(self._last_request, resume=True)
        model = self.model_combo.currentText()
        if not model:
            raise HistoAIError("no model here can be fine-tuned (see 'napari-histo-ai models')")
        spec = self._registry.get(self.version_combo.currentText() or model)
        image = store = None
        name = self.image_combo.currentText()
        if name and name != NO_IMAGE:
            layer = self._viewer.layers[name]
            pyramid = layer_pyramid(layer)
            image = Path(str(pyramid.path))
            if not image.exists():
                raise HistoAIError(
                    f"layer '{name}' is not backed by a file, so it has no annotation store; "
                    "choose '(none)' and add a training-set folder"
                )
            store = self._store_for(layer)
        sources = [self.data_list.item(i).text() for i in range(self.data_list.count())]
        run_dir = default_run_dir(spec.name)
        if self._runs_root is not None:
            run_dir = self._runs_root / run_dir.name
        return RetrainRequest(
            spec,
            image=image,
            store=store,
            sources=tuple(sources),
            config=self.config(),
            run_dir=run_dir,
            models_dir=self._models_dir,
        )

    # -- training --------------------------------------------------------------------
    def retrain(self) -> Any:
        """Start a run in a thread worker; returns the worker (None on bad input)."""
        return self._start(resume=False)

    def resume(self) -> Any:
        """Continue the last cancelled run from its checkpoint."""
        return self._start(resume=True)

    def _start(self, *, resume: bool) -> Any:
        from napari.qt.threading import create_worker

        from ..training.retrain import retrain

        if self._worker is not None:
            return self._worker

        def start() -> Any:
            request = self.request(resume=resume)
            self._last_request = request
            self._cancel = threading.Event()
            if not resume:
                self.history = []
                self._draw_history()
            worker = create_worker(retrain, request, self._cancel, _start_thread=False)
            worker.yielded.connect(self._on_progress)
            worker.returned.connect(self._on_done)
            worker.errored.connect(self._on_error)
            worker.finished.connect(self._on_finished)
            self._worker = worker
            self.retrain_button.setEnabled(False)
            self.resume_button.setEnabled(False)
            self.cancel_button.setEnabled(True)
            self.progress.setRange(0, 0)
            verb = "resuming" if resume else "fine-tuning"
            self._set_status(f"{verb} {request.spec.name}…")
            worker.start()
            return worker

        return self._guard(start)

    def cancel(self) -> None:
        """Stop after the current batch; the last finished epoch's checkpoint stays."""
        if self._cancel is not None and self._worker is not None:
            self._cancel.set()
            self.cancel_button.setEnabled(False)
            self._set_status("cancelling after this batch…")

    def _on_progress(self, progress: TrainProgress) -> None:
        self.progress.setRange(0, 1000)
        if progress.phase == "export":
            self.progress.setValue(int(1000 * progress.step / max(progress.steps, 1)))
        else:
            self.progress.setValue(int(1000 * progress.fraction))
        text = progress.message or progress.phase
        if progress.phase in ("train", "feed"):
            text = (
                f"epoch {progress.epoch}/{progress.epochs} · batch {progress.step}/"
                f"{progress.steps} · loss {progress.loss:.4f}"
                + (" · negative feed" if progress.phase == "feed" else "")
            )
        self._set_status(text)
        if progress.phase == "epoch" and len(progress.history) != len(self.history):
            self.history = [dict(h) for h in progress.history]
            self._draw_history()

    def _draw_history(self) -> None:
        from .. import plots
        from ..training.finetune import plotted_history

        plots.training_curves_figure(
            plotted_history(self.history), title="fine-tuning", figure=self.figure
        )
        self.canvas.draw_idle()

    def _on_done(self, result: FinetuneResult | None) -> None:
        self.last_result = result
        if result is None:
            self._set_status("cancelled during the export: press Retrain to start again")
            return
        self.history = list(result.history)
        self._draw_history()
        if result.cancelled:
            self.resume_button.setEnabled(bool(result.history))
            self._set_status(
                f"cancelled after {len(result.history)} epoch(s); press Resume to continue "
                f"({result.run_dir})"
            )
            return
        if result.spec is None:
            loss = result.before.get("loss")
            shown = f" (validation loss {loss:.4f})" if loss is not None else ""
            self._set_status(
                f"no epoch beat {self._last_request.spec.name}{shown} on the validation "
                "items, so no version was registered: review more objects, train longer "
                f"or raise the learning rate\nplots: {result.run_dir}",
                warn=True,
            )
            return
        self._registry = self._load_registry()
        self._fill_models(select=result.spec.name)
        before, after = result.before, result.after
        parts = []
        for key in ("f1", "auc", "hard_negative_fp_rate"):
            if key in after and key in before:
                parts.append(f"{key} {before[key]:.3f} → {after[key]:.3f}")
        stop = " (stopped early)" if result.stopped_early else ""
        self._set_status(
            f"registered {result.spec.name} in {result.seconds:.0f} s: best epoch "
            f"{result.best_epoch}{stop}\nvalidation: {', '.join(parts) or 'no validation items'}"
            f"\nplots: {result.run_dir}"
        )

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, HistoAIError):
            self._show_error(str(exc))
        else:
            log.exception("retraining failed", exc_info=exc)
            self._show_error(f"retraining failed: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        self.retrain_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    # -- versions --------------------------------------------------------------------
    def compare(self) -> Any:
        """Score the chosen version and its parent on the same validation items (worker)."""
        from napari.qt.threading import create_worker

        from ..training.finetune import evaluate_version

        if self._worker is not None:
            return self._worker

        def start() -> Any:
            spec = self._registry.get(self.version_combo.currentText())
            if not spec.card.parent or spec.card.parent not in self._registry:
                raise HistoAIError(f"{spec.name} has no registered parent to compare with")
            parent = self._registry.get(spec.card.parent)
            sources = list(spec.card.training.get("sources") or ())
            if not sources:
                raise HistoAIError(f"{spec.name}'s card names no training data to compare on")
            run_dir = Path(str(spec.card.training.get("run_dir") or "."))
            worker = create_worker(
                lambda: evaluate_version([parent, spec], sources), _start_thread=False
            )
            worker.returned.connect(lambda result: self._on_compared(result, run_dir))
            worker.errored.connect(self._on_error)
            worker.finished.connect(self._on_finished)
            self._worker = worker
            self.retrain_button.setEnabled(False)
            self.progress.setRange(0, 0)
            self._set_status(f"comparing {parent.name} and {spec.name}…")
            worker.start()
            return worker

        return self._guard(start)

    def _on_compared(self, result: dict[str, Any], run_dir: Path) -> None:
        from .. import plots
        from ..training.finetune import PLOTTED_METRICS

        self.last_comparison = result
        rates = {
            name: {k: v for k, v in m.items() if k in PLOTTED_METRICS}
            for name, m in result["metrics"].items()
        }
        curves = {k: (v["y_true"], v["scores"]) for k, v in result["curves"].items()}
        written: list[Path] = []
        try:
            figure = plots.comparison_figure(rates, curves=curves, title="validation items")
            written.append(plots.save_figure(figure, run_dir / "compare_metrics.png"))
            written += plots.evaluation_plots(result, run_dir, stem="compare")
        except (OSError, HistoAIError) as exc:
            self._show_error(f"the comparison plots were not saved: {exc}")
        plots.comparison_figure(rates, curves=curves, title="validation items", figure=self.figure)
        self.canvas.draw_idle()
        lines = []
        for name, m in result["metrics"].items():
            shown = ", ".join(
                f"{k} {m[k]:.3f}" for k in ("f1", "auc", "hard_negative_fp_rate") if k in m
            )
            lines.append(f"{name}: {shown}")
        where = f"\nplots: {written[0].parent}" if written else ""
        self._set_status(f"{result['items']} validation items\n" + "\n".join(lines) + where)

    def run_on_view(self) -> Any:
        """Run the chosen version on the visible region through the Run model widget."""

        def run() -> Any:
            name = self.image_combo.currentText()
            if not name or name == NO_IMAGE:
                raise HistoAIError("choose the image to run on")
            version = self.version_combo.currentText()
            if not version:
                raise HistoAIError("no version to run")
            from .run_widget import RunModelWidget

            window = self._viewer.window
            runners = [
                w for w in dict(window.dock_widgets).values() if isinstance(w, RunModelWidget)
            ]
            if runners:
                runner = runners[0]
            else:
                runner = RunModelWidget(self._viewer, registry=self._registry)
                window.add_dock_widget(runner, name="Run model", area="right")
            self.runner = runner
            return runner.run_version(name, version, registry=self._registry)

        return self._guard(run)
