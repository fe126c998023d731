"""Human-readable rows of a Pyramid's metadata, for the "Inspect" table (no Qt here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MPP_MISSING", "info_rows"]

#: what the widget says when a slide has no pixel size
MPP_MISSING = "no pixel size in the file: set µm/px"

_DASH = "—"


def _num(v: float) -> str:
    return f"{v:.4g}"


def info_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows of :meth:`Pyramid.info` for display.

    Parameters
    ----------
    info : dict
        The output of :meth:`napari_histo_ai.io.Pyramid.info`.

    Returns
    -------
    list of (str, str)
        File, format, backend, kind, one row per level (shape and downsample), pixel
        size (µm/px and where it came from, or :data:`MPP_MISSING`), objective, vendor,
        spacing (mm), orientation, data type and axes, associated images.
    """
    rows: list[tuple[str, str]] = [
        ("File", Path(str(info.get("path", ""))).name or str(info.get("path", ""))),
        ("Format", str(info.get("format") or _DASH)),
        ("Backend", str(info.get("backend") or _DASH)),
        ("Kind", str(info.get("kind") or _DASH)),
    ]
    levels = info.get("levels") or []
    downsamples = info.get("downsamples") or [1.0] * len(levels)
    rows.append(("Levels", str(len(levels))))
    for i, (shape, ds) in enumerate(zip(levels, downsamples, strict=False)):
        rows.append((f"  level {i}", f"{' × '.join(str(int(s)) for s in shape)}  ({_num(ds)}×)"))
    mpp = info.get("mpp")
    if mpp:
        rows.append(
            ("Pixel size", f"{_num(mpp[0])} × {_num(mpp[1])} µm/px ({info.get('mpp_source')})")
        )
    elif info.get("spacing_mm"):
        rows.append(("Pixel size", f"{_DASH} (a volume: see spacing)"))
    else:
        rows.append(("Pixel size", MPP_MISSING))
    objective = info.get("objective_power")
    rows.append(("Objective", f"{_num(objective)}×" if objective else _DASH))
    rows.append(("Vendor", str(info.get("vendor") or _DASH)))
    spacing = info.get("spacing_mm")
    rows.append(("Spacing", " × ".join(_num(s) for s in spacing) + " mm" if spacing else _DASH))
    rows.append(("Orientation", str(info.get("orientation") or _DASH)))
    rows.append(("Data type", f"{info.get('dtype', _DASH)}, axes {info.get('axes', _DASH)}"))
    associated = info.get("associated_images") or []
    rows.append(("Associated images", ", ".join(associated) if associated else _DASH))
    return rows
