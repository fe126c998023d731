"""How long the Qt event loop stalls while the engine runs in a napari thread worker.

The widgets run `napari_histo_ai.inference.engine.run_model` with
``napari.qt.threading.create_worker``; the viewer stays responsive only if the engine's
threads leave the GIL to the GUI thread often enough. This module measures it the way
the widgets run it, without a viewer (no OpenGL): a bare ``QApplication``, the worker,
and a precise ``QTimer`` every ``interval_ms`` that records when it fires. The stall is
the longest gap between two ticks minus the interval.

Run by the inference benchmark in a subprocess (``QT_QPA_PLATFORM=offscreen``)::

    python -m napari_histo_ai.widgets._stall SLIDE --model NAME --tiles 256

It prints one JSON line. When Qt or napari cannot be imported it prints
``{"max_gui_stall_ms": null, "error": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _gap_stats(ticks: list[float], interval_ms: int) -> dict[str, Any]:
    """Longest stall (gap minus the timer interval), p99 and median gap of timer ticks."""
    import numpy as np

    gaps = np.diff(np.asarray(ticks)) * 1e3 if len(ticks) > 1 else np.zeros(1)
    return {
        "max_gui_stall_ms": round(max(0.0, float(gaps.max()) - interval_ms), 2),
        "p99_gap_ms": round(float(np.percentile(gaps, 99)), 2),
        "median_gap_ms": round(float(np.median(gaps)), 2),
        "n_ticks": len(ticks),
    }


def measure_gui_stall(
    path: str | os.PathLike[str],
    model: str,
    *,
    n_tiles: int = 256,
    device: str = "auto",
    batch_size: int | None = None,
    interval_ms: int = 5,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Longest Qt event-loop gap while `run_model` runs in a napari thread worker.

    Parameters
    ----------
    path : str or Path
        The slide; the run covers a centre region of about ``n_tiles`` tiles
        (`napari_histo_ai.bench.infer.region_for_tiles`), ``tissue=False``.
    model : str
        A registered model's name.
    n_tiles : int, keyword-only
    device : str, keyword-only
    batch_size : int, optional, keyword-only
    interval_ms : int, keyword-only
        Timer interval, milliseconds.
    timeout_s : float, keyword-only
        Give up (quit the worker) after this long.

    Returns
    -------
    dict
        ``max_gui_stall_ms`` (longest gap minus the interval, ms), ``p99_gap_ms``,
        ``median_gap_ms``, ``n_ticks``, ``run_s``, ``tiles``, ``progress_events``,
        ``interval_ms``, ``qt_api``.

    Raises
    ------
    RuntimeError
        The run failed in the worker, or did not end within ``timeout_s``.
    """
    from napari.qt.threading import create_worker
    from qtpy import API_NAME
    from qtpy.QtCore import QEventLoop, Qt, QTimer
    from qtpy.QtWidgets import QApplication

    from ..bench.infer import region_for_tiles
    from ..inference.engine import RunConfig, RunResult, run_model
    from ..io import open_image
    from ..models.loading import load_model
    from ..models.registry import load_registry

    app = QApplication.instance() or QApplication([])
    spec = load_registry().get(model)
    predictor = load_model(spec, device=device)
    pyramid = open_image(path)
    ticks: list[float] = []
    progress_events = [0]
    outcome: dict[str, Any] = {}
    try:
        roi = region_for_tiles(pyramid, spec, n_tiles)
        config = RunConfig(roi=roi, tissue=False, batch_size=batch_size, resume=False)
        with tempfile.TemporaryDirectory(prefix="histo-stall-") as tmp:
            worker = create_worker(
                run_model,
                pyramid,
                predictor,
                Path(tmp) / "run.zarr",
                config=config,
                _start_thread=False,
            )
            loop = QEventLoop()
            timer = QTimer()
            timer.setTimerType(Qt.TimerType.PreciseTimer)
            timer.setInterval(interval_ms)
            timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

            def on_yield(_: Any) -> None:  # what a progress bar would do
                progress_events[0] += 1

            def on_return(result: RunResult) -> None:
                outcome["result"] = result

            def on_error(exc: BaseException) -> None:
                outcome["error"] = exc

            worker.yielded.connect(on_yield)
            worker.returned.connect(on_return)
            worker.errored.connect(on_error)
            worker.finished.connect(loop.quit)
            QTimer.singleShot(int(timeout_s * 1000), loop.quit)
            start = time.perf_counter()
            timer.start()
            worker.start()
            loop.exec()
            run_s = time.perf_counter() - start
            timer.stop()
            if "result" not in outcome and "error" not in outcome:
                worker.quit()  # stops at the next batch; the process ends anyway
                raise RuntimeError(f"the run did not end within {timeout_s:g} s")
            app.processEvents()
    finally:
        pyramid.close()
    if "error" in outcome:
        exc = outcome["error"]
        raise RuntimeError(f"the run failed in the worker: {type(exc).__name__}: {exc}")
    result: RunResult = outcome["result"]
    return {
        **_gap_stats(ticks, interval_ms),
        "run_s": round(run_s, 3),
        "tiles": result.tiles_done,
        "progress_events": progress_events[0],
        "interval_ms": interval_ms,
        "qt_api": API_NAME,
    }


def measure_viewer_stall(
    path: str | os.PathLike[str],
    model: str,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    interval_ms: int = 5,
    pan_ms: int = 100,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """The same measurement with the real app: a napari viewer showing the slide, the
    "Run model" widget running the whole slide, its layers refreshing, and the camera
    panning every ``pan_ms`` (what a user does while tiles fill in). Needs a display
    (run under Xvfb on a headless machine).
    """
    import napari
    import numpy as np
    from qtpy import API_NAME
    from qtpy.QtCore import QEventLoop, Qt, QTimer

    from .run_widget import RunModelWidget

    viewer = napari.Viewer(show=True)
    ticks: list[float] = []
    try:
        viewer.window.resize(1400, 900)
        viewer.open(str(path), plugin="napari-histo-ai")
        with tempfile.TemporaryDirectory(prefix="histo-stall-") as tmp:
            widget = RunModelWidget(viewer, run_root=Path(tmp))
            viewer.window.add_dock_widget(widget)
            widget.model_combo.setCurrentText(model)
            widget.region_combo.setCurrentText("Whole image")
            widget.device_combo.setCurrentText(device)
            widget.batch_spin.setValue(batch_size or 0)
            loop = QEventLoop()
            timer = QTimer()
            timer.setTimerType(Qt.TimerType.PreciseTimer)
            timer.setInterval(interval_ms)
            timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
            extent = np.asarray(viewer.layers[0].extent.world)
            rng = np.random.default_rng(0)

            camera = getattr(viewer, "scene", viewer).camera

            def pan() -> None:
                lo, hi = extent[0][-2:], extent[1][-2:]
                camera.center = tuple(lo + rng.random(2) * (hi - lo))
                camera.zoom = float(rng.choice([0.5, 1.0, 2.0, 4.0]))

            panner = QTimer()
            panner.setInterval(pan_ms)
            panner.timeout.connect(pan)
            start = time.perf_counter()
            timer.start()
            if pan_ms > 0:
                panner.start()
            worker = widget.run()
            if worker is None:
                raise RuntimeError(widget.status_label.text())
            worker.finished.connect(loop.quit)
            QTimer.singleShot(int(timeout_s * 1000), loop.quit)
            loop.exec()
            run_s = time.perf_counter() - start
            timer.stop()
            panner.stop()
            result = widget.result
            if result is None:
                raise RuntimeError(f"the run did not finish: {widget.status_label.text()}")
    finally:
        viewer.close()
    return {
        **_gap_stats(ticks, interval_ms),
        "run_s": round(run_s, 3),
        "tiles": result.tiles_done,
        "interval_ms": interval_ms,
        "pan_ms": pan_ms,
        "qt_api": API_NAME,
        "mode": "viewer",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_histo_ai.widgets._stall PATH --model NAME``: print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m napari_histo_ai.widgets._stall")
    parser.add_argument("path", metavar="PATH")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--interval-ms", type=int, default=5)
    parser.add_argument(
        "--pan-ms", type=int, default=100, help="viewer mode: pan every N ms (0: never)"
    )
    parser.add_argument(
        "--viewer",
        action="store_true",
        help="measure with a real viewer and the Run model widget on the whole slide, "
        "panning while it runs (needs a display or xvfb-run)",
    )
    args = parser.parse_args(argv)
    try:
        import napari.qt.threading  # noqa: F401
        import qtpy.QtWidgets  # noqa: F401
    except Exception as exc:  # no Qt binding, no display plugin, no napari
        message = f"Qt is not available: {type(exc).__name__}: {exc}"
        print(json.dumps({"max_gui_stall_ms": None, "error": message}))
        return 0
    if args.viewer:
        print(
            json.dumps(
                measure_viewer_stall(
                    args.path,
                    args.model,
                    device=args.device,
                    batch_size=args.batch_size,
                    interval_ms=args.interval_ms,
                    pan_ms=args.pan_ms,
                )
            )
        )
        return 0
    result = measure_gui_stall(
        args.path,
        args.model,
        n_tiles=args.tiles,
        device=args.device,
        batch_size=args.batch_size,
        interval_ms=args.interval_ms,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
