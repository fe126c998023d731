"""Point lists as CSV (``x, y, class``), as the TUPAC16 / AMi-Br mitosis lists.

Coordinates are level-0 pixels, continuous (pixel ``i`` spans ``[i, i + 1)``), ``x`` =
column, ``y`` = row.

Export (`export_csv_points`)
----------------------------
A header line, then one row per point::

    x,y,class[,z | t,z],confidence,source,model_version,review,annotator,created,modified

Plane columns are the image's plane axes in lower case (``z`` for a ZYX volume); times
are seconds since the epoch (UTC); empty cells mean "none". Only points are written:
other kinds are skipped and counted in the sidecar's ``skipped``. Comment lines are not
valid CSV for many tools, so the **file provenance goes to a sidecar**
``<file>.json`` (``points.csv`` → ``points.csv.json``: image path and content hash, mpp,
models, annotators, time, package version, the columns), written atomically after the
CSV.

Import (`import_csv_points`)
----------------------------
* With a header (case-insensitive): ``x`` / ``y`` or ``col`` (``column``) / ``row``;
  optional ``class`` (``label``, ``classification``), ``confidence`` (``score``,
  ``probability``), ``source``, ``model_version``, ``review``, ``annotator``,
  ``created``, ``modified``, plane columns (``z``, ``t`` or ``plane``); other numeric
  columns become measurements. A column ``slide`` / ``image`` / ``image_id`` / ``file``
  / ``filename`` selects the rows of one image (``image_id=``; default: the image's file
  name or stem, or every row when the file names one image only).
* The **AMi-Br** list (``slide, dataset, uid, x, y, expert1_label, ...,
  majority_atypical``) is recognised by its ``majority_atypical`` column: class =
  ``"atypical"`` / ``"normal"`` by the majority vote (the dataset's label), or the text
  of ``label_column=`` (e.g. ``"expert1_label"``); ``uid`` becomes a measurement;
  ``image_id`` may be the slide name (``"002.tiff"``), its stem (``"002"``) or the
  ``index.csv`` case id ``"MIDOG21/002.tiff"``.
* Headerless numeric files (TUPAC16 ground truth): two columns ``row, col``
  (``headerless="rowcol"``, the TUPAC order) or ``x, y`` (``headerless="xy"``), an
  optional third column is the class.
* ``offset=0.5`` converts integer pixel indices to pixel centres (the lists give the
  pixel a mitosis lies in; without it the point sits at that pixel's corner, within one
  pixel).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ...atomic import atomic_open, json_default
from ...errors import AnnotationError
from ..model import HUMAN, Annotation, ImageRef
from ._common import (
    Checker,
    check_exports,
    default_review,
    file_provenance,
    materialise,
    without_gc,
)

__all__ = ["export_csv_points", "import_csv_points", "sidecar_path"]

_ALIASES = {
    "x": "x",
    "col": "col",
    "column": "col",
    "y": "y",
    "row": "row",
    "class": "class",
    "label": "class",
    "classification": "class",
    "class_name": "class",
    "confidence": "confidence",
    "score": "confidence",
    "probability": "confidence",
    "source": "source",
    "model_version": "model_version",
    "review": "review",
    "annotator": "annotator",
    "created": "created",
    "modified": "modified",
    "plane": "plane",
    "z": "z",
    "t": "t",
    "slide": "image",
    "image": "image",
    "image_id": "image",
    "file": "image",
    "filename": "image",
    "file_name": "image",
}
_TEXT_COLUMNS = {"dataset"}


def sidecar_path(path: str | Path) -> Path:
    """The provenance file of a CSV export: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------- export


@without_gc
def export_csv_points(
    annotations: Iterable[Annotation],
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the points as CSV with a header, and the provenance to ``<file>.json``.

    Parameters
    ----------
    annotations : iterable of Annotation
        Points are written; other kinds are skipped (counted in the sidecar).
    path : str or Path
        The ``.csv`` file (replaced atomically).
    image : ImageRef
    classes : sequence of str
        Recorded in the sidecar.
    provenance : dict, optional
        Extra keys for the sidecar's ``extra``.

    Returns
    -------
    Path
        The CSV file.

    Raises
    ------
    AnnotationError
        A point is invalid or outside the image (nothing is written).
    """
    path = Path(path)
    anns = materialise(annotations)
    plane_columns = [a.lower() for a in image.axes[: image.n_plane]]
    columns = [
        "x",
        "y",
        "class",
        *plane_columns,
        "confidence",
        "source",
        "model_version",
        "review",
        "annotator",
        "created",
        "modified",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    skipped: dict[str, int] = {}
    for ann in anns:
        if ann.kind != "point":
            skipped[ann.kind] = skipped.get(ann.kind, 0) + 1
    indices = [i for i, a in enumerate(anns) if a.kind == "point"]
    points = [anns[i] for i in indices]
    check_exports(points, indices, path=path, image=image)
    for ann in points:
        row, col = ann.coords[0].tolist()
        writer.writerow(
            [
                repr(col),
                repr(row),
                ann.class_name,
                *ann.plane,
                "" if ann.confidence is None else repr(float(ann.confidence)),
                ann.source,
                ann.model_version or "",
                ann.review,
                ann.annotator or "",
                repr(float(ann.created)),
                repr(float(ann.modified)),
            ]
        )
    record = file_provenance(anns, image=image, fmt="csv", provenance=provenance, skipped=skipped)
    record["file"] = path.name
    record["columns"] = columns
    record["units"] = "level-0 pixels, continuous; x = column, y = row"
    record["classes"] = list(dict.fromkeys([*classes, *(a.class_name for a in points)]))
    sidecar = json.dumps(record, indent=2, default=json_default, ensure_ascii=False)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(buffer.getvalue())
    with atomic_open(sidecar_path(path), "w", encoding="utf-8") as fh:
        fh.write(sidecar)
    return path


# --------------------------------------------------------------------------- import


@without_gc
def import_csv_points(
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    allow_new_classes: bool = False,
    source: str | None = None,
    model_version: str | None = None,
    annotator: str | None = None,
    image_id: str | None = None,
    label_column: str | None = None,
    headerless: Literal["rowcol", "xy"] = "rowcol",
    offset: float = 0.0,
) -> list[Annotation]:
    """Read a CSV point list as point annotations (pure: nothing is stored).

    Parameters
    ----------
    path : str or Path
        Comma-, semicolon- or tab-separated; blank lines and lines starting with ``#``
        are skipped.
    image : ImageRef
        The image the points must fit.
    classes, allow_new_classes
        As in `napari_histo_ai.annotations.formats.import_annotations`.
    source, model_version : str, optional
        Provenance of rows without a ``source`` column (default ``"human"``).
    annotator : str, optional
        Annotator of human rows without an ``annotator`` column.
    image_id : str, optional
        The image's rows in a multi-image list (see the module docstring).
    label_column : str, optional
        The column to read the class from (case-insensitive), e.g. ``"expert1_label"``.
    headerless : {"rowcol", "xy"}
        Column order of a file without a header.
    offset : float
        Pixels added to both coordinates (``0.5`` for integer pixel indices).

    Returns
    -------
    list of Annotation
        Points in file order.

    Raises
    ------
    AnnotationError
        Unreadable file, missing coordinate columns, a non-numeric or NaN coordinate, a
        point outside the image, a missing or invalid plane, an unknown class or review
        state, or an ``image_id`` the file does not list. Names the file and line.
    """
    path = Path(path)
    checker = Checker(path, image=image, classes=classes, allow_new_classes=allow_new_classes)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            path, f"cannot be read as UTF-8 text ({exc})", "expected a CSV point list"
        ) from exc
    lines = content.splitlines()
    first = next((s for s in lines if s.strip() and not s.lstrip().startswith("#")), None)
    if first is None:
        return []
    delimiter = max((",", ";", "\t"), key=first.count) if any(d in first for d in ",;\t") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    for cells in reader:
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        rows.append((reader.line_num, [c.strip() for c in cells]))
    if not rows:
        return []
    header = rows[0][1]
    if _is_number(header[0]) and len(header) > 1 and _is_number(header[1]):
        return _read_headerless(rows, checker, headerless, offset, source, model_version, annotator)
    return _read_with_header(
        rows,
        checker,
        offset=offset,
        source=source,
        model_version=model_version,
        annotator=annotator,
        image_id=image_id,
        label_column=label_column,
    )


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _coordinate(value: str, what: str, where: str, checker: Checker) -> float:
    try:
        v = float(value)
    except ValueError:
        raise checker.fail(
            where, f"{what} {value!r} is not a number", "expected level-0 pixel coordinates"
        ) from None
    if not math.isfinite(v):
        raise checker.fail(where, f"{what} is {value!r}", "expected a finite number")
    return v


def _read_headerless(
    rows: list[tuple[int, list[str]]],
    checker: Checker,
    order: str,
    offset: float,
    source: str | None,
    model_version: str | None,
    annotator: str | None,
) -> list[Annotation]:
    if order not in ("rowcol", "xy"):
        raise ValueError(f"headerless must be 'rowcol' or 'xy', got {order!r}")
    src = source or HUMAN
    if checker.image.n_plane:
        raise checker.fail(
            "line 1",
            f"a headerless 2-D point list for an image with plane "
            f"axes {checker.image.axes[: checker.image.n_plane]}",
            "add a header with x, y and the plane column (e.g. z)",
        )
    for line, cells in rows:
        where = f"line {line}"
        if len(cells) not in (2, 3):
            raise checker.fail(
                where,
                f"{len(cells)} columns in a headerless list",
                "expected 'row,col' or 'row,col,class'; add a header (x,y,class) for other layouts",
            )
        a = _coordinate(cells[0], "first coordinate", where, checker)
        b = _coordinate(cells[1], "second coordinate", where, checker)
        row, col = (a, b) if order == "rowcol" else (b, a)
        ann = Annotation(
            "point",
            np.array([[row + offset, col + offset]]),
            class_name=cells[2] if len(cells) == 3 else "",
            source=src,
            model_version=model_version if source else None,
            annotator=annotator if src == HUMAN else None,
            review=default_review(src),
        )
        checker.check(ann, where)
    return checker.finish()


def _read_with_header(
    rows: list[tuple[int, list[str]]],
    checker: Checker,
    *,
    offset: float,
    source: str | None,
    model_version: str | None,
    annotator: str | None,
    image_id: str | None,
    label_column: str | None,
) -> list[Annotation]:
    header_line, header = rows[0]
    names = [h.strip().lower() for h in header]
    role: dict[str, int] = {}
    for i, name in enumerate(names):
        key = _ALIASES.get(name)
        if key is not None and key not in role:
            role[key] = i
    if "x" in role and "y" in role:
        ix, iy = role["x"], role["y"]
    elif "col" in role and "row" in role:
        ix, iy = role["col"], role["row"]
    else:
        raise checker.fail(
            f"line {header_line}",
            f"header {header} has no x/y (or col/row) columns",
            "expected a header such as 'x,y,class'",
        )
    ami_br = "majority_atypical" in names
    label_index: int | None = role.get("class")
    if label_column is not None:
        if label_column.lower() not in names:
            raise checker.fail(
                f"line {header_line}",
                f"no column {label_column!r} in {header}",
                "pass label_column= one of the header's names",
            )
        label_index = names.index(label_column.lower())
    elif ami_br:
        label_index = None
    vote = names.index("majority_atypical") if ami_br else None
    plane_index = _plane_columns(names, role, checker, header_line)
    used = {ix, iy, *plane_index, *(i for k, i in role.items() if k != "image")}
    if label_index is not None:
        used.add(label_index)
    if vote is not None:
        used.add(vote)
    extra = [
        (i, header[i])
        for i, n in enumerate(names)
        if i not in used and n and n not in _TEXT_COLUMNS and _ALIASES.get(n) != "image"
    ]
    body = _select_image(rows[1:], names, role.get("image"), image_id, checker)
    for line, cells in body:
        where = f"line {line}"
        if len(cells) < len(header):
            cells = cells + [""] * (len(header) - len(cells))
        x = _coordinate(cells[ix], header[ix], where, checker)
        y = _coordinate(cells[iy], header[iy], where, checker)
        if vote is not None and label_index is None:
            class_name = "atypical" if cells[vote].lower() in ("true", "1", "yes") else "normal"
        else:
            class_name = cells[label_index] if label_index is not None else ""
        plane = tuple(int(_plane_number(cells[i], header[i], where, checker)) for i in plane_index)
        src = (
            source
            if source is not None
            else (cells[role["source"]] if "source" in role and cells[role["source"]] else HUMAN)
        )
        kwargs: dict[str, Any] = {
            "class_name": class_name,
            "plane": plane,
            "source": src,
            "model_version": model_version if source is not None else None,
            "annotator": annotator if src == HUMAN else None,
            "review": default_review(src),
        }
        for key in ("model_version", "annotator", "review"):
            if key in role and cells[role[key]]:
                kwargs[key] = cells[role[key]]
        for key in ("confidence", "created", "modified"):
            if key in role and cells[role[key]]:
                kwargs[key] = _coordinate(cells[role[key]], header[role[key]], where, checker)
        measurements = {}
        for i, name in extra:
            if cells[i] and _is_number(cells[i]) and math.isfinite(float(cells[i])):
                measurements[name] = float(cells[i])
        ann = Annotation(
            "point", np.array([[y + offset, x + offset]]), measurements=measurements, **kwargs
        )
        checker.check(ann, where)
    return checker.finish()


def _plane_columns(
    names: list[str], role: dict[str, int], checker: Checker, header_line: int
) -> list[int]:
    """Column indices of the image's plane axes, in the image's axis order."""
    n_plane = checker.image.n_plane
    if n_plane == 0:
        return []
    axes = checker.image.axes[:n_plane].lower()
    found = [role[a] for a in axes if a in role]
    if len(found) == n_plane:
        return found
    if n_plane == 1 and "plane" in role:
        return [role["plane"]]
    raise checker.fail(
        f"line {header_line}",
        f"the image has plane axes {axes.upper()} but the header {names} has no "
        f"{' / '.join(axes)} column",
        "add the plane column(s) (e.g. z) so every point lands on its slice",
    )


def _plane_number(value: str, what: str, where: str, checker: Checker) -> float:
    v = _coordinate(value, what, where, checker)
    if v != int(v):
        raise checker.fail(
            where, f"{what} {value!r} is not an integer", "expected the plane index (0-based)"
        )
    return v


def _select_image(
    body: list[tuple[int, list[str]]],
    names: list[str],
    column: int | None,
    image_id: str | None,
    checker: Checker,
) -> list[tuple[int, list[str]]]:
    """The rows of one image in a multi-image list."""
    if column is None:
        if image_id is not None:
            raise checker.fail(
                "line 1",
                f"image_id={image_id!r} given but the file has no slide / image column",
                "leave image_id out for this file",
            )
        return body
    dataset = names.index("dataset") if "dataset" in names else None

    def keys(cells: list[str]) -> set[str]:
        value = cells[column] if column < len(cells) else ""
        found = {value, Path(value).stem}
        if dataset is not None and dataset < len(cells):
            found.add(f"{cells[dataset]}/{value}")
        return found

    listed = list(dict.fromkeys(c[column] for _, c in body if column < len(c)))
    if image_id is not None:
        wanted = {image_id}
    else:
        own = Path(checker.image.path)
        wanted = {own.name, own.stem}
    selected = [(line, cells) for line, cells in body if keys(cells) & wanted]
    if selected:
        return selected
    if image_id is None and len(listed) <= 1:
        return body
    shown = ", ".join(listed[:8]) + (f" … ({len(listed)} in all)" if len(listed) > 8 else "")
    raise checker.fail(
        f"column {names[column]!r}",
        f"no rows for image {image_id or Path(checker.image.path).name!r}; the file lists {shown}",
        "pass image_id= one of the listed images",
    )
