"""What the "Generate report" widget reads from the viewer, without Qt.

The widget reports on an image layer backed by a file. Results already in the viewer
(layers of earlier runs, ``layer.metadata["run"]``) can be included as they are, and
the corrections of an open "Review & correct" session can replace the model's raw
objects; everything else (models to run, options, output folder) the widget gathers
itself and passes to `napari_histo_ai.reports.job.report_job`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HistoAIError

if TYPE_CHECKING:
    import napari

__all__ = [
    "default_report_dir",
    "image_file",
    "run_image",
    "run_model_name",
    "viewer_runs",
    "viewer_store",
]


def default_report_dir() -> Path:
    """``<user data>/napari-histo-ai/reports``: where reports go unless the user chooses."""
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-histo-ai")) / "reports"


def image_file(layer: napari.layers.Layer) -> Path:
    """The file behind an image layer (reports name it and re-read it at full resolution).

    Raises
    ------
    HistoAIError
        The layer was not opened from a file (pasted data, a computed layer).
    """
    from .run import layer_pyramid

    path = Path(str(layer_pyramid(layer).path))
    if not path.exists():
        raise HistoAIError(
            f"layer '{layer.name}' is not backed by a file, so no report can name or re-read "
            "it: open the slide from disk (File ▸ Open or the Open slide / volume widget)"
        )
    return path


def _summary(run: str | Path) -> dict[str, Any]:
    try:
        summary = json.loads((Path(run) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def run_image(run: str | Path) -> Path | None:
    """The image a run folder was computed on (its ``summary.json``), or ``None``."""
    image = _summary(run).get("image")
    return Path(str(image)) if image else None


def run_model_name(run: str | Path) -> str | None:
    """The model a run folder holds the results of (its ``summary.json``), or ``None``."""
    model = _summary(run).get("model")
    return str(model) if model else None


def viewer_runs(viewer: napari.viewer.Viewer, image: Path) -> list[Path]:
    """Run folders of the result layers in ``viewer`` that were computed on ``image``.

    Returns
    -------
    list of Path
        In layer order, each once; runs of other images are left out.
    """
    target = Path(image).resolve()
    runs: list[Path] = []
    for layer in viewer.layers:
        text = layer.metadata.get("run") if isinstance(layer.metadata, dict) else None
        if not text:
            continue
        run = Path(str(text))
        source = run_image(run)
        if source is None or source.resolve() != target or run in runs:
            continue
        runs.append(run)
    return runs


def viewer_store(viewer: napari.viewer.Viewer, layer: napari.layers.Layer) -> Path | None:
    """The annotation store a docked "Review & correct" widget has open for ``layer``."""
    window = getattr(viewer, "window", None)
    docked: dict[str, Any] = dict(getattr(window, "dock_widgets", {}) or {})
    for widget in docked.values():
        session = getattr(widget, "session", None)
        if session is not None and getattr(session, "image_layer", None) is layer:
            return Path(session.store.path)
    return None
