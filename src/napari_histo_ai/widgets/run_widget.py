"""The "Run model" dock widget: pick an image layer and a model, Run, watch tiles fill in.

A thin view: it gathers a `JobRequest`, hands `napari_histo_ai._napari.run.run_job`
(a generator) to a napari thread worker, and turns progress records into layers
(`napari_histo_ai._napari.results`). Cancel sets an event the engine checks after
every batch; pressing Run again on the same image and model resumes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..errors import HistoAIError

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

    from ..inference.engine import Progress, RunResult
    from ..models.registry import Registry
    from ..models.spec import ModelSpec

__all__ = ["RunModelWidget"]

log = logging.getLogger(__name__)

REGIONS = {
    "Viewport first, then whole image": "viewport-first",
    "Whole image": "whole",
    "Viewport only": "viewport",
    "Drawn shape": "shape",
}


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunModelWidget(QWidget):
    """Run a registered model over an image layer without blocking the viewer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (napari injects it).
    registry : Registry, optional
        Models to offer; default: packaged + entry points + user folder.
    run_root : Path, optional
        Where run folders go; default: the user cache folder.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        parent: QWidget | None = None,
        *,
        registry: Registry | None = None,
        run_root: Path | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = napari_viewer
        self._run_root = run_root
        self._worker: Any = None
        self._cancel: threading.Event | None = None
        self._job_layers: dict[str, Layer] = {}
        self._job: dict[str, Any] = {}
        self._last_refresh = 0.0
        if registry is None:
            from ..models.registry import load_registry

            registry = load_registry()
        self._registry = registry

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image layer to run the model on")
        self.model_combo = QComboBox()
        self.model_combo.addItems(list(registry.names()))
        self.card = QTextBrowser()
        self.card.setMaximumHeight(180)
        self.region_combo = QComboBox()
        self.region_combo.addItems(list(REGIONS))
        self.shapes_combo = QComboBox()
        self.shapes_combo.setToolTip("Shapes layer whose selected (or last) shape is the region")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 1024)
        self.batch_spin.setSpecialValueText("auto")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 1.0)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setSpecialValueText("model default")
        self.tissue_check = QCheckBox("Skip background tiles")
        self.tissue_check.setChecked(True)
        self.restart_check = QCheckBox("Start again (discard a previous run)")
        self.run_button = QPushButton("Run")
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
        form.addRow("Model", self.model_combo)
        form.addRow(self.card)
        form.addRow("Region", self.region_combo)
        form.addRow("Shape layer", self.shapes_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Threshold", self.threshold_spin)
        form.addRow(self.tissue_check)
        form.addRow(self.restart_check)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.model_combo.currentTextChanged.connect(self._show_card)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        layers = self._viewer.layers.events
        layers.inserted.connect(self._refresh_layer_choices)
        layers.removed.connect(self._refresh_layer_choices)
        self._refresh_layer_choices()
        self._show_card(self.model_combo.currentText())
        if registry.problems:
            self._set_status(
                "Some models could not be registered:\n" + "\n".join(registry.problems), warn=True
            )

    # -- choices ---------------------------------------------------------------------
    def _refresh_layer_choices(self, *_: Any) -> None:
        from napari.layers import Image, Shapes

        for combo, kind in ((self.image_combo, Image), (self.shapes_combo, Shapes)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            names = [lyr.name for lyr in self._viewer.layers if isinstance(lyr, kind)]
            if kind is Image:  # results of earlier runs are not images to run on
                names = [n for n in names if "run" not in self._viewer.layers[n].metadata]
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _show_card(self, name: str) -> None:
        if not name:
            self.card.setPlainText("No models registered.")
            return
        from ..models.registry import format_card

        self.card.setPlainText(format_card(self._registry.get(name)))

    def reload_models(self, registry: Registry | None = None) -> None:
        """Offer the models of ``registry`` (default: read the registry again), keeping
        the current choice when it is still registered (new fine-tuned versions appear)."""
        if registry is None:
            from ..models.registry import load_registry

            registry = load_registry()
        self._registry = registry
        current = self.model_combo.currentText()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems(list(registry.names()))
        if current in registry:
            self.model_combo.setCurrentText(current)
        self.model_combo.blockSignals(False)
        self._show_card(self.model_combo.currentText())

    def run_version(self, image: str, model: str, *, registry: Registry | None = None) -> Any:
        """Run ``model`` (e.g. a new fine-tuned version) on the visible part of layer
        ``image``; returns the worker (None on bad input). The Retrain widget's "Run on
        view" button."""
        self.reload_models(registry)
        if model not in self._registry:
            self._error(HistoAIError(f"model {model!r} is not registered"))
            return None
        self._refresh_layer_choices()
        self.image_combo.setCurrentText(image)
        self.model_combo.setCurrentText(model)
        self.region_combo.setCurrentText("Viewport only")
        return self.run()

    def _set_status(self, text: str, *, warn: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet("color: #e8a33d;" if warn else "")

    # -- running ---------------------------------------------------------------------
    def request(self) -> Any:
        """Gather the inputs into a `JobRequest` (raises HistoAIError on bad input)."""
        from .._napari.run import (
            JobRequest,
            default_run_folder,
            layer_pyramid,
            shape_polygon,
            viewport_box,
        )
        from ..inference.engine import RunConfig

        name = self.image_combo.currentText()
        if not name:
            raise HistoAIError("no image layer: open a slide or image first")
        layer = self._viewer.layers[name]
        pyramid = layer_pyramid(layer)
        model = self.model_combo.currentText()
        if not model:
            raise HistoAIError("no model registered: see 'napari-histo-ai models'")
        spec = self._registry.get(model)
        region = REGIONS[self.region_combo.currentText()]
        roi = priority = polygon = None
        if region in ("viewport", "viewport-first"):
            box = viewport_box(self._viewer, pyramid, layer)
            if box is None and region == "viewport":
                raise HistoAIError(
                    f"the view does not show '{name}': pan to it or pick another region"
                )
            if region == "viewport":
                roi = box
            else:
                priority = box
        elif region == "shape":
            shapes_name = self.shapes_combo.currentText()
            if not shapes_name:
                raise HistoAIError("region 'Drawn shape' needs a Shapes layer with a shape in it")
            polygon = shape_polygon(self._viewer.layers[shapes_name], layer)
            if polygon is None:
                raise HistoAIError(f"Shapes layer '{shapes_name}' is empty: draw the region first")
        threshold = self.threshold_spin.value() or None
        config = RunConfig(
            batch_size=self.batch_spin.value() or None,
            tissue=self.tissue_check.isChecked(),
            roi=roi,
            polygon=polygon,
            priority=priority,
            threshold=threshold,
            resume=not self.restart_check.isChecked(),
        )
        out = default_run_folder(pyramid, spec, root=self._run_root)
        if roi is not None or polygon is not None:
            out = out.with_name(out.name.replace(".zarr", ".region.zarr"))
        return JobRequest(pyramid, spec, out, config, self.device_combo.currentText()), layer

    def run(self) -> Any:
        """Start a run in a thread worker; returns the worker (None on bad input)."""
        from napari.qt.threading import create_worker

        from .._napari.run import run_job

        if self._worker is not None:
            return self._worker
        try:
            request, layer = self.request()
        except HistoAIError as exc:
            self._error(exc)
            return None
        self._cancel = threading.Event()
        self._job = {
            "request": request,
            "source": layer,
            "image": layer.name,
            "started": time.perf_counter(),
        }
        self._job_layers = {}
        worker = create_worker(run_job, request, self._cancel, _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the plan is known
        self._set_status(f"loading {request.spec.name}…")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop after the current batch; what is written stays and a new Run resumes."""
        if self._cancel is not None and self._worker is not None:
            self._cancel.set()
            self._set_status("cancelling after this batch…")
            self.cancel_button.setEnabled(False)

    #: seconds between two refreshes of the live layers (each costs the GUI thread a
    #: re-slice and a redraw, so not after every batch)
    REFRESH_S = 1.0
    #: seconds between two updates of the object layers (all points are re-set)
    OBJECTS_S = 3.0

    def _on_progress(self, progress: Progress) -> None:
        if progress.path is not None:
            self._add_result_layers(progress)
        waiting = self._job.setdefault("waiting_objects", {})
        for name, objs in progress.new_objects.items():
            if name in waiting:
                waiting[name].extend(objs)
            else:
                waiting[name] = objs
        self.progress.setRange(0, max(1, progress.total))
        self.progress.setValue(progress.done)
        now = time.perf_counter()
        finished = progress.done >= progress.total
        if now - self._job.get("objects_at", 0.0) > self.OBJECTS_S or finished:
            self._job["objects_at"] = now
            self._add_objects(self._job.pop("waiting_objects"))
        if now - self._last_refresh > self.REFRESH_S or finished:
            self._last_refresh = now
            for layer in self._job_layers.values():
                if layer.metadata.get("kind") in ("probability", "mask"):
                    layer.refresh()
        self._set_status(
            f"{progress.done}/{progress.total} tiles · {progress.tiles_per_s:.1f} tiles/s · "
            f"{_fmt_time(progress.eta_s)} left\n{progress.message}"
        )

    def _add_result_layers(self, progress: Progress) -> None:
        from .._napari.results import dense_layers

        request = self._job["request"]
        spec: ModelSpec = request.spec
        self._job["geometry"] = progress.geometry
        self._job["planes"] = progress.planes
        self._job["path"] = progress.path
        source = self._job["source"]
        plane_scale = tuple(source.scale[: len(progress.planes)]) if progress.planes else ()
        self._job["plane_scale"] = plane_scale
        n = len(progress.planes)
        self._job["plane_units"] = tuple(str(u) for u in source.units[:n]) if n else ()
        if spec.dense:
            for data, kwargs, kind in dense_layers(
                progress.path,
                spec,
                progress.geometry,
                image=self._job["image"],
                plane_scale=plane_scale,
                plane_units=self._job["plane_units"],
                threshold=request.config.threshold,
            ):
                self._replace_layer(data, kwargs, kind)

    def _replace_layer(self, data: Any, kwargs: dict[str, Any], kind: str) -> Layer:
        name = kwargs["name"]
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        add = getattr(self._viewer, f"add_{kind}")
        if kind in ("image", "labels"):
            # the run writes into these arrays while they are shown: napari's dask cache
            # would keep serving the slices computed before the tiles arrived
            kwargs = {**kwargs, "cache": False}
        layer = add(data, **kwargs)
        self._job_layers[name] = layer
        return layer

    def _add_objects(self, new_objects: dict[str, Any]) -> None:
        if not new_objects:
            return
        import numpy as np

        from .._napari.results import object_features, object_layer

        request = self._job["request"]
        spec = request.spec
        found = self._job.setdefault("objects", {})
        for out in spec.outputs:
            objs = new_objects.get(out.name)
            if objs is None or not len(objs):
                continue
            if out.name in found:
                found[out.name].extend(objs)
            else:
                found[out.name] = objs
            every = found[out.name]
            data, kwargs, kind = object_layer(
                every,
                spec,
                out,
                self._job["geometry"][out.name],
                image=self._job["image"],
                plane_scale=self._job.get("plane_scale", ()),
                plane_units=self._job.get("plane_units", ()),
                run=self._job.get("path"),
            )
            layer = self._job_layers.get(kwargs["name"])
            if layer is not None and kind == "points":
                layer.data = data
                layer.features = object_features(every)
                layer.face_color = np.asarray(kwargs["face_color"])
                layer.refresh()
            else:  # new layer, or rectangles (replaced whole: simplest correct update)
                self._replace_layer(data, kwargs, kind)

    def _on_done(self, result: RunResult) -> None:
        from .._napari.results import describe_aggregates, tile_layers

        self._add_objects(self._job.pop("waiting_objects", {}))
        spec = result.spec
        if not spec.dense and self._job.get("geometry"):
            for data, kwargs, kind in tile_layers(
                result.path,
                spec,
                self._job["geometry"],
                result.aggregates,
                image=self._job["image"],
                plane_scale=self._job.get("plane_scale", ()),
                plane_units=self._job.get("plane_units", ()),
            ):
                self._replace_layer(data, kwargs, kind)
        for layer in self._job_layers.values():
            layer.refresh()
        state = "cancelled: press Run to resume" if result.cancelled else "done"
        text = (
            f"{spec.name}: {state} · {result.tiles_done}/{result.tiles_total} tiles "
            f"({result.tiles_skipped} background skipped) in {result.summary['wall_s']:.1f} s"
        )
        counts = ", ".join(f"{k}: {len(v)}" for k, v in result.objects.items())
        if counts:
            text += f"\nobjects: {counts}"
        if result.aggregates:
            text += "\n" + describe_aggregates(result.aggregates)
        text += f"\nresults: {result.path}"
        self._set_status(text)
        self.progress.setRange(0, max(1, result.tiles_total))
        self.progress.setValue(result.tiles_done)
        self._job["result"] = result

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    def _error(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        if isinstance(exc, HistoAIError):
            message = str(exc)
        else:
            log.exception("run failed", exc_info=exc)
            message = f"the run failed: {type(exc).__name__}: {exc}"
        self._set_status(message, warn=True)
        show_error(message)

    @property
    def result(self) -> RunResult | None:
        """The last finished run's result (tests and scripts)."""
        return self._job.get("result")

    @property
    def result_layers(self) -> dict[str, Layer]:
        return dict(self._job_layers)
