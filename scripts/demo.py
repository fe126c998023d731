"""Open napari with a slide and the "Open slide / volume" widget docked.

Usage::

    python scripts/demo.py                       # the packaged CMU-1 sample, interactive
    python scripts/demo.py SLIDE.svs             # any file napari-histo-ai reads
    python scripts/demo.py --screenshot out.png  # render, save a window screenshot, exit

Without a display (no ``DISPLAY``/``WAYLAND_DISPLAY`` on Linux) the script re-runs itself
under ``xvfb-run -a`` (or starts ``Xvfb`` itself) and saves a screenshot, by default to
``.demo/demo.png``; it says so clearly when neither is installed (``apt-get install
xvfb``).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HEADLESS_SHOT = ROOT / ".demo" / "demo.png"
SCREEN = "1600x1000x24"
_REEXEC_FLAG = "NAPARI_HISTO_AI_DEMO_UNDER_XVFB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "path", nargs="?", help="slide, volume or image to open (default: the CMU-1 sample)"
    )
    parser.add_argument(
        "--screenshot",
        metavar="PATH",
        type=Path,
        help="save a screenshot of the whole window (canvas and dock) to PATH and exit",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=1.5,
        help="seconds to let the canvas render before the screenshot (default 1.5)",
    )
    parser.add_argument(
        "--model",
        default="nuclei-unet",
        help="registered model to run on the image (default nuclei-unet; 'none' to skip)",
    )
    parser.add_argument(
        "--review",
        metavar="FOLDER",
        type=Path,
        help="after the run, dock 'Review & correct' with the model's points made editable "
        "(the annotation store goes to FOLDER); a few are accepted / rejected to show the "
        "review colours",
    )
    parser.add_argument(
        "--retrain",
        metavar="FOLDER",
        type=Path,
        help="with --review and a model with points (e.g. mitosis-fcn): reject up to 50 of "
        "its points in the left half of the sample (it has no mitoses), press Retrain "
        "(new versions are registered in FOLDER), then run the new version on the view",
    )
    parser.add_argument(
        "--retrain-data",
        metavar="DIR",
        nargs="*",
        default=[],
        help="further training data for --retrain (e.g. ../shared/data/ami_br_mitosis)",
    )
    parser.add_argument(
        "--open-widget",
        action="store_true",
        help="bring 'Open slide / volume' to the front and press Estimate magnification "
        "(the screenshot waits for it; docs/images/open.png uses it with --model none)",
    )
    parser.add_argument(
        "--export",
        metavar="FOLDER",
        type=Path,
        help="with --review: after the review, export the store as QuPath GeoJSON "
        "(FOLDER/annotations.geojson) and a training set (FOLDER/trainset) from the "
        "Review & correct widget; the screenshot waits for the training set",
    )
    parser.add_argument(
        "--report",
        metavar="FOLDER",
        type=Path,
        help="after the run, dock 'Generate report' and press it: the run in the viewer plus "
        "the default models of the image kind, report files in FOLDER; the screenshot waits "
        "for the report",
    )
    parser.add_argument(
        "--size",
        default="1400x900",
        help="window size WIDTHxHEIGHT for the screenshot (default 1400x900)",
    )
    return parser.parse_args(argv)


# -- headless support ---------------------------------------------------------------------
def _has_display() -> bool:
    if not sys.platform.startswith("linux"):
        return True  # macOS / Windows always have a window system
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _start_xvfb() -> None:
    """Start ``Xvfb`` on a free display for this process and stop it at exit."""
    xvfb = shutil.which("Xvfb")
    assert xvfb is not None
    for number in range(99, 200):
        if not Path(f"/tmp/.X{number}-lock").exists():
            break
    else:
        raise SystemExit("demo: no free X display number between :99 and :199")
    proc = subprocess.Popen(
        [xvfb, f":{number}", "-screen", "0", SCREEN, "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()

    atexit.register(stop)
    socket = Path(f"/tmp/.X11-unix/X{number}")
    for _ in range(100):
        if socket.exists():
            break
        if proc.poll() is not None:
            raise SystemExit(f"demo: Xvfb :{number} exited with status {proc.returncode}")
        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{number}"


def ensure_display(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Give the process a display: the real one, ``xvfb-run -a``, or our own ``Xvfb``.

    Headless runs cannot be interactive, so they always save a screenshot (to
    ``args.screenshot`` or ``.demo/demo.png``).
    """
    if _has_display():
        return args
    if args.screenshot is None:
        args.screenshot = DEFAULT_HEADLESS_SHOT
        argv = [*argv, "--screenshot", str(args.screenshot)]
        print(f"demo: no display; saving a screenshot to {args.screenshot} instead")
    xvfb_run = shutil.which("xvfb-run")
    if xvfb_run and not os.environ.get(_REEXEC_FLAG):
        env = {**os.environ, _REEXEC_FLAG: "1"}
        cmd = [xvfb_run, "-a", "-s", f"-screen 0 {SCREEN}", sys.executable, __file__, *argv]
        raise SystemExit(subprocess.call(cmd, env=env))
    if shutil.which("Xvfb"):
        _start_xvfb()
        return args
    raise SystemExit(
        "demo: no display (DISPLAY is not set) and neither xvfb-run nor Xvfb is installed.\n"
        "  Run it on a desktop, or install a virtual X server:\n"
        "    apt-get install -y xvfb libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 "
        "libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0 libegl1 libgl1 "
        "libglx-mesa0 libgl1-mesa-dri"
    )


# -- the demo -------------------------------------------------------------------------------
def open_image_layers(viewer: napari.Viewer, path: str | None) -> list[Layer]:
    """Open ``path`` (or the packaged sample) through napari-histo-ai's own contributions."""
    if path is None:
        return viewer.open_sample("napari-histo-ai", "cmu1_small_region")
    return viewer.open(path, plugin="napari-histo-ai")


def run_models(viewer: napari.Viewer, layers: list[Layer], args: argparse.Namespace) -> Any:
    """Dock the "Run model" widget and press Run with ``args.model`` on the opened image.

    Returns the thread worker (``None`` when no model runs), so the screenshot can wait
    for the run to finish. The run resumes from the user cache when the demo is run again.
    """
    if args.model == "none":
        return None
    _, widget = viewer.window.add_plugin_dock_widget("napari-histo-ai", "Run model")
    if args.model not in widget._registry:
        print(
            f"demo: model {args.model!r} is not registered; available: {widget._registry.names()}"
        )
        return None
    widget.model_combo.setCurrentText(args.model)
    widget.region_combo.setCurrentText("Viewport first, then whole image")
    worker = widget.run()
    if worker is not None:
        worker.finished.connect(lambda: print(f"demo: {widget.status_label.text()}"))
        if args.path is None:  # the sample: close in on the epidermis to show single nuclei
            worker.finished.connect(lambda: _show_nuclei(viewer, widget))
        if args.review is not None:
            worker.finished.connect(lambda: review(viewer, widget, args.review, args))
        elif args.report is not None:
            worker.finished.connect(lambda: report(viewer, widget, args))
    return worker


def report(viewer: napari.Viewer, run_widget: Any, args: Any) -> None:
    """Dock "Generate report" in front and press it (the run in the viewer plus the image
    kind's default models); ``args.ready`` callbacks run when the report is written."""
    from napari_histo_ai.widgets.report_widget import ReportWidget

    widget = ReportWidget(viewer, out_dir=args.report.expanduser().resolve())
    dock = viewer.window.add_dock_widget(widget, name="Generate report", tabify=True)
    widget.image_combo.setCurrentText(run_widget.image_combo.currentText())
    worker = widget.generate()
    if worker is None:
        print(f"demo: report: {widget.status_label.text()}")
        for callback in args.ready:
            callback()
        return

    def written() -> None:
        print(f"demo: report: {widget.status_label.text()}")
        dock.raise_()
        for callback in args.ready:
            callback()

    worker.finished.connect(written)


def review(viewer: napari.Viewer, run_widget: Any, folder: Path, args: Any = None) -> None:
    """Dock "Review & correct" on the image, make the run's points editable and review a
    few in the middle of the view (accept six, reject two), as an annotator starts; with
    ``--retrain``, reject false points instead and retrain (`retrain`)."""
    import numpy as np

    from napari_histo_ai.widgets.review_widget import ReviewWidget

    widget = ReviewWidget(viewer, store_root=folder)
    viewer.window.add_dock_widget(widget, name="Review & correct", tabify=True)
    image = run_widget.image_combo.currentText()
    widget.image_combo.setCurrentText(image)
    session = widget.open_session()
    if session is None:
        return
    points = [n for n in run_widget.result_layers if n.endswith(("centres", "mitoses", "points"))]
    if points and session.store.count() == 0:
        widget.source_combo.setCurrentText(points[0])
        widget.make_editable()
    widget.refresh_view()
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    layer = session.points_layer
    if args is not None and args.retrain is not None:
        retrain(viewer, run_widget, widget, args)
        return
    if session.store.count(reviews=("unreviewed",)) == session.store.count() and len(layer.data):
        # review the markers nearest the centre of the view: accept six, reject two
        world = np.asarray(layer.data) * np.asarray(layer.scale) + np.asarray(layer.translate)
        order = np.argsort(np.hypot(*(world - np.asarray(camera.center)[-2:]).T))
        for indices, action in ((order[:6], widget.accept), (order[6:8], widget.reject)):
            ids = set(int(v) for v in layer.features["annotation_id"].iloc[indices])
            rows = layer.features["annotation_id"].to_numpy()
            layer.selected_data = {i for i, v in enumerate(rows) if int(v) in ids}
            action()
        layer.selected_data = set()
    print(f"demo: review: {widget.status_label.text()}")
    if args is not None and getattr(args, "export", None) is not None:
        export(viewer, widget, args)


def export(viewer: napari.Viewer, review_widget: Any, args: Any) -> None:
    """Export the store as GeoJSON, then a training set, through the Review & correct
    widget's own buttons; ``args.ready`` callbacks run when the training set is written."""
    folder = args.export.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    review_widget.export_path.setText(str(folder / "annotations.geojson"))
    review_widget.export()
    print(f"demo: export: {review_widget.status_label.text()}")
    review_widget.training_dir.setText(str(folder / "trainset"))
    worker = review_widget.export_training_set()
    if worker is None:
        for callback in args.ready:
            callback()
        return
    worker.finished.connect(lambda: print(f"demo: export: {review_widget.status_label.text()}"))
    dock = review_widget.parent()  # napari's dock around the widget
    if hasattr(dock, "raise_"):  # in front of the Run model tab, raised after the run
        worker.finished.connect(dock.raise_)
    for callback in args.ready:
        worker.finished.connect(callback)


def retrain(viewer: napari.Viewer, run_widget: Any, review_widget: Any, args: Any) -> None:
    """Reject up to 50 model points in the left half (the sample has no mitoses), dock
    "Retrain", press Retrain, then run the new version on the view (Run model widget)."""
    from napari_histo_ai.widgets.train_widget import RetrainWidget

    session = review_widget.session
    viewer.reset_view()
    review_widget.refresh_view()
    layer = session.points_layer
    columns = layer.data[:, -1] * layer.scale[-1] + layer.translate[-1]  # µm
    half = float(layer.extent.world[1][-1]) / 2
    left = [i for i, c in enumerate(columns) if c < half][:50]
    if left and session.store.count(reviews=("rejected",)) == 0:
        layer.selected_data = set(left)
        review_widget.reject()
        layer.selected_data = set()
    widget = RetrainWidget(viewer, models_dir=args.retrain)
    viewer.window.add_dock_widget(widget, name="Retrain", tabify=True)
    widget.image_combo.setCurrentText(run_widget.image_combo.currentText())
    widget.model_combo.setCurrentText(run_widget.model_combo.currentText())
    widget.epochs_spin.setValue(4)
    for folder in args.retrain_data:
        widget.add_data(folder)
    worker = widget.retrain()
    if worker is None:
        return

    def trained() -> None:
        print(f"demo: retrain: {widget.status_label.text()}")
        run_worker = widget.run_on_view()
        if run_worker is not None:
            run_worker.finished.connect(lambda: print(f"demo: {widget.runner.status_label.text()}"))
            for callback in args.ready:
                run_worker.finished.connect(callback)

    worker.finished.connect(trained)


def _show_nuclei(viewer: napari.Viewer, widget: Any) -> None:
    for name, layer in widget.result_layers.items():
        if name.endswith("mask"):
            layer.visible = False  # probability + centres read better than the filled mask
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (1020.0, 560.0)  # µm on CMU-1-Small-Region
    camera.zoom = 2.2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = ensure_display(parse_args(argv), argv)

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_histo_ai._napari.layers import show_scale_bar
    from napari_histo_ai._napari.sample import sample_path

    viewer = napari.Viewer(title="napari-histo-ai demo")
    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer.window.resize(width, height)
    _, widget = viewer.window.add_plugin_dock_widget("napari-histo-ai", "Open slide / volume")
    layers = open_image_layers(viewer, args.path)
    widget.set_path(args.path or sample_path())
    widget.inspect_file()  # fill the metadata table beside the canvas
    if any(str(u) != "pixel" for layer in layers for u in layer.units):
        show_scale_bar(viewer)
    viewer.reset_view()
    args.ready = []  # called when the last step (the retrained run) is done
    worker = run_models(viewer, layers, args)
    if args.retrain is None:  # the retraining dock, ready for a press of Retrain
        from napari_histo_ai.widgets.train_widget import RetrainWidget

        retrain_widget = RetrainWidget(viewer)
        if args.model != "none":
            retrain_widget.model_combo.setCurrentText(args.model)
        viewer.window.add_dock_widget(retrain_widget, name="Retrain", tabify=True)
        if args.report is None:  # the report dock, ready for a press of Generate report
            from napari_histo_ai.widgets.report_widget import ReportWidget

            viewer.window.add_dock_widget(ReportWidget(viewer), name="Generate report", tabify=True)
        if worker is not None:  # keep the run's widget in front
            run_dock, _ = viewer.window.add_plugin_dock_widget("napari-histo-ai", "Run model")
            worker.finished.connect(run_dock.raise_)  # after the tab bar has settled
    estimate = None
    if args.open_widget:  # the Open widget in front, with its magnification check
        open_dock, _ = viewer.window.add_plugin_dock_widget(
            "napari-histo-ai", "Open slide / volume"
        )
        QTimer.singleShot(0, open_dock.raise_)
        estimate = widget.estimate_magnification()

    if args.screenshot is None:
        napari.run()
        return 0

    target = args.screenshot.expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    status = {"code": 1}

    def take_screenshot() -> None:
        try:
            for _ in range(10):  # flush pending paints (tiles, dock layout)
                QApplication.processEvents()
                time.sleep(0.02)
            viewer.screenshot(path=str(target), canvas_only=False, flash=False)
            print(f"demo: screenshot saved to {target}")
            status["code"] = 0
        finally:
            viewer.close()
            QApplication.quit()

    def later() -> None:
        QTimer.singleShot(int(args.delay * 1000), take_screenshot)

    if worker is not None and args.retrain is not None and args.review is not None:
        args.ready.append(later)  # after retraining and the new version's run
    elif worker is not None and args.report is not None and args.review is None:
        args.ready.append(later)  # after the report is written
    elif worker is not None and args.export is not None and args.review is not None:
        args.ready.append(later)  # after the GeoJSON and training-set export
    elif estimate is not None and worker is None:
        estimate.finished.connect(later)  # after the magnification estimate
    elif worker is not None:  # screenshot once the model's layers are complete
        worker.finished.connect(later)
    else:
        QTimer.singleShot(int(args.delay * 1000), take_screenshot)
    napari.run()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main())
