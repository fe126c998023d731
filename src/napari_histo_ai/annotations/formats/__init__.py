"""Vector annotation formats: import and export as pure functions on `Annotation` lists.

========== ============================== ===================== ===============================
name       what                           extensions            module
========== ============================== ===================== ===============================
``geojson`` QuPath GeoJSON (both ways),   ``.geojson``, ``.json`` `formats.geojson`
            the engine's run GeoJSON
``csv``    points ``x, y, class``         ``.csv``, ``.tsv``    `formats.csv_points`
            (TUPAC16 / AMi-Br lists)
``coco``   COCO JSON: boxes, polygons,    ``.json``             `formats.coco`
            RLE masks
``mias``   mini-MIAS ``Info.txt``         ``.txt``              `formats.mias`
========== ============================== ===================== ===============================

Every importer is ``import_<fmt>(path, *, image, classes=(), allow_new_classes=False,
source=None, model_version=None, annotator=None, ...) -> list[Annotation]``: pure (nothing
stored), level-0 pixel ``(row, col)`` geometry, and an `AnnotationError` naming the file,
the line / feature and the value on any malformed input. Every exporter is
``export_<fmt>(annotations, path, *, image, classes=(), provenance=None, ...) -> Path``,
written atomically, recording at the file level (or in a ``<file>.json`` sidecar for CSV
and MIAS, which have no place for it) the image's mpp and identity (path, content hash),
the models and annotators of the objects, the time and the package version.

Use `import_annotations` / `export_annotations` to pick the format from the path
(`detect_format`), as the CLI and the napari writers do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from ...errors import AnnotationError
from ..model import Annotation, ImageRef
from .coco import export_coco, import_coco, mask_to_rle, rle_to_mask
from .csv_points import export_csv_points, import_csv_points
from .geojson import export_geojson, import_geojson
from .mias import export_mias, import_mias

__all__ = [
    "FORMATS",
    "Format",
    "detect_format",
    "export_annotations",
    "export_coco",
    "export_csv_points",
    "export_geojson",
    "export_mias",
    "import_annotations",
    "import_coco",
    "import_csv_points",
    "import_geojson",
    "import_mias",
    "mask_to_rle",
    "rle_to_mask",
    "sniff_format",
]


class Format(NamedTuple):
    """One row of `FORMATS`: the reader, the writer, file name endings, a description."""

    import_fn: Callable[..., list[Annotation]]
    export_fn: Callable[..., Path]
    extensions: tuple[str, ...]
    description: str


#: format name -> (import fn, export fn, extensions, description)
FORMATS: dict[str, Format] = {
    "geojson": Format(
        import_geojson,
        export_geojson,
        (".geojson", ".json"),
        "QuPath GeoJSON (points, lines, boxes, polygons; classifications, measurements)",
    ),
    "csv": Format(
        import_csv_points,
        export_csv_points,
        (".csv", ".tsv"),
        "CSV point list x, y, class (TUPAC16 / AMi-Br), provenance in <file>.json",
    ),
    "coco": Format(
        import_coco,
        export_coco,
        (".coco.json", ".json"),
        "COCO JSON: boxes, polygons and instance masks (RLE) of one image",
    ),
    "mias": Format(
        import_mias,
        export_mias,
        (".txt",),
        "mini-MIAS Info.txt: abnormality circles as boxes on a film",
    ),
}

_SNIFF_BYTES = 64 * 1024
_MIAS_LINE = re.compile(r"^\s*mdb\d{3}\s+[FGDfgd]\s+[A-Za-z]{4}\b")


def sniff_format(path: str | Path) -> str | None:
    """The format name of a file from its name and its first 64 KiB, or ``None``.

    Never raises (for napari's reader contract): an unreadable or unknown file gives
    ``None``. A file that does not exist yet is judged by its name alone, with ``.json``
    ambiguous (``None``) and ``.coco.json`` COCO.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".geojson"):
        return "geojson"
    if name.endswith(".coco.json"):
        return "coco"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        head = None
    if name.endswith(".json"):
        if head is None:
            return None
        if re.search(r'"type"\s*:\s*"(FeatureCollection|Feature)"', head):
            return "geojson"
        if re.search(r'"(images|annotations|categories)"\s*:\s*\[', head):
            return "coco"
        if head.lstrip().startswith("[") and '"Feature"' in head:
            return "geojson"
        return None
    if name.endswith(".txt"):
        if head is None:
            return "mias" if name.startswith("info") else None
        first = next((s for s in head.splitlines() if s.strip()), "")
        if _MIAS_LINE.match(first) or first.strip().upper().startswith("REF"):
            return "mias"
        if re.match(r"^\s*-?[\d.]+\s*[,;\t]\s*-?[\d.]+", first):
            return "csv"
    return None


def detect_format(path: str | Path) -> str:
    """The format name of ``path`` (`sniff_format`), or `AnnotationError` saying which
    formats exist and to pass ``format=``."""
    found = sniff_format(path)
    if found is None:
        listed = "; ".join(f"{k} ({', '.join(v.extensions)})" for k, v in FORMATS.items())
        raise AnnotationError(
            path,
            "cannot tell the annotation format from the name or the first bytes",
            f"pass format= one of: {listed}",
        )
    return found


def _pick(path: str | Path, format: str | None) -> Format:
    name = format if format is not None else detect_format(path)
    if name not in FORMATS:
        raise AnnotationError(
            path, f"unknown annotation format {name!r}", f"expected one of {sorted(FORMATS)}"
        )
    return FORMATS[name]


def import_annotations(
    path: str | Path, *, image: ImageRef, format: str | None = None, **kwargs: Any
) -> list[Annotation]:
    """Read annotations from ``path`` in ``format`` (default: `detect_format`).

    Parameters
    ----------
    path : str or Path
    image : ImageRef
        The image the objects must fit.
    format : str, optional
        A key of `FORMATS`.
    **kwargs
        The format's options: ``classes``, ``allow_new_classes``, ``source``,
        ``model_version``, ``annotator`` for all, plus e.g. ``image_id`` (csv, coco),
        ``ref`` (mias).

    Returns
    -------
    list of Annotation
    """
    return _pick(path, format).import_fn(path, image=image, **kwargs)


def export_annotations(
    annotations: Iterable[Annotation],
    path: str | Path,
    *,
    image: ImageRef,
    format: str | None = None,
    **kwargs: Any,
) -> Path:
    """Write annotations to ``path`` in ``format`` (default: from the name; a plain
    ``.json`` is GeoJSON unless ``format="coco"``).

    Parameters
    ----------
    annotations : iterable of Annotation
    path : str or Path
    image : ImageRef
    format : str, optional
        A key of `FORMATS`.
    **kwargs
        ``classes``, ``provenance`` for all, plus the format's own options.

    Returns
    -------
    Path
    """
    if (
        format is None
        and Path(path).name.lower().endswith(".json")
        and not Path(path).name.lower().endswith(".coco.json")
    ):
        format = sniff_format(path) if Path(path).exists() else "geojson"
        format = format or "geojson"
    elif format is None and Path(path).suffix.lower() == ".txt" and not Path(path).exists():
        format = "mias"
    return _pick(path, format).export_fn(annotations, path, image=image, **kwargs)
