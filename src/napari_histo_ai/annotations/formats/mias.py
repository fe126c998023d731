"""The mini-MIAS truth list ``Info.txt`` as boxes on one film.

Import (`import_mias`)
----------------------
The rows of one film (``ref=``, default the image file's stem, e.g. ``mdb001``) are read
with `napari_histo_ai.io.mias.read_info`. Each located abnormality becomes a **box**
around its circle (centre ± radius, `InfoRow.box`: MIAS's origin is the bottom-left of
the 1024 × 1024 film, so ``row = 1024 − y``), clipped to the film, with

* ``class_name`` = the abnormality code (``"CIRC"``, ``"CALC"``, ``"SPIC"``, ``"MISC"``,
  ``"ARCH"``, ``"ASYM"``);
* ``measurements``: ``severity`` 0 (B, benign) / 1 (M, malignant), ``tissue`` 0 / 1 / 2
  (F / G / D, the background tissue), and the row's own ``mias_x``, ``mias_y``,
  ``mias_radius`` (film px) so an export writes the circle back exactly even where the
  box was clipped;
* ``source="human"`` (the MIAS radiologists), review ``"added"``.

A ``NORM`` film gives an empty list; so does an abnormality without a centre (``*NOTE
3*`` calcification clusters, ``mdb059``), which is logged. A film the list does not
mention is an error.

Export (`export_mias`)
----------------------
Boxes → rows ``ref tissue class severity x y radius`` (centre rounded to film px with
the y flip, radius = half the box's larger side, rounded; the imported circle when the
box is unchanged), one ``NORM`` row when there are no boxes. Class: the MIAS code, or
``benign`` / ``malignant`` (the mammogram detector's classes) with ``abnormality=``
giving the code. Severity from the class (benign / malignant) or
``measurements["severity"]``; tissue from ``tissue=``, else the objects'
``measurements["tissue"]``. ``merge=True`` replaces this film's rows in an existing
``Info.txt`` and keeps every other film's. Other kinds are skipped. MIAS has no place
for comments: the provenance goes to the sidecar ``<file>.json`` (as for CSV).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import atomic_open, json_default
from ...errors import AnnotationError
from ...io.mias import ABNORMALITIES, FILM, SEVERITY, TISSUES, InfoRow, read_info
from ..model import HUMAN, Annotation, ImageRef
from ._common import Checker, check_export, file_provenance, materialise

__all__ = ["export_mias", "import_mias"]

log = logging.getLogger(__name__)

_CODES = tuple(a for a in ABNORMALITIES if a != "NORM")
_SEVERITY_NAMES = {"benign": "B", "malignant": "M"}


def _check_film(path: Path, image: ImageRef) -> None:
    if tuple(image.shape[-2:]) != (FILM, FILM) or image.n_plane:
        raise AnnotationError(
            path,
            f"MIAS coordinates are film pixels of a {FILM} × {FILM} film, but the image is "
            f"{tuple(image.shape)}",
            "open the mini-MIAS film itself (mdbNNN.pgm / .png)",
        )


def import_mias(
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    allow_new_classes: bool = False,
    source: str | None = None,
    model_version: str | None = None,
    annotator: str | None = None,
    ref: str | None = None,
) -> list[Annotation]:
    """The located abnormalities of one film in ``Info.txt`` as boxes (pure).

    Parameters
    ----------
    path : str or Path
        The MIAS ``Info.txt``.
    image : ImageRef
        The 1024 × 1024 film.
    classes, allow_new_classes
        As in `napari_histo_ai.annotations.formats.import_annotations`.
    source, model_version, annotator : str, optional
        Provenance (default: human, no annotator).
    ref : str, optional
        The film, default ``Path(image.path).stem``.

    Returns
    -------
    list of Annotation
        One box per located abnormality (empty for a NORM film).

    Raises
    ------
    AnnotationError
        A malformed line (file and line number), a film the list does not mention, an
        image that is not a 1024² film, or an unknown class.
    """
    path = Path(path)
    _check_film(path, image)
    checker = Checker(path, image=image, classes=classes, allow_new_classes=allow_new_classes)
    ref = ref or Path(image.path).stem
    rows = read_info(path)
    mine = [r for r in rows if r.ref == ref]
    if not mine:
        refs = sorted({r.ref for r in rows})
        shown = f"{refs[0]}..{refs[-1]}" if refs else "no film"
        raise AnnotationError(
            path,
            f"no row for film {ref!r} (the list has {len(refs)} films, {shown})",
            "pass ref= the film's reference, e.g. 'mdb001'",
        )
    src = source or HUMAN
    for row in mine:
        box = row.box(film=FILM)
        if row.abnormality == "NORM":
            continue
        if box is None:
            log.info(
                "%s, line %d: %s %s has no centre; no box imported",
                path,
                row.line,
                ref,
                row.abnormality,
            )
            continue
        top, left, bottom, right = box
        coords = np.clip(np.array([[top, left], [bottom, right]]), 0.0, float(FILM))
        assert row.severity is not None and row.radius is not None
        ann = Annotation(
            "box",
            coords,
            class_name=row.abnormality,
            source=src,
            model_version=model_version if source else None,
            annotator=annotator,
            review="added" if src == HUMAN else "unreviewed",
            measurements={
                "severity": float(SEVERITY[row.severity]),
                "tissue": float(TISSUES.index(row.tissue)),
                "mias_x": float(row.x or 0),
                "mias_y": float(row.y or 0),
                "mias_radius": float(row.radius),
            },
        )
        checker.check(ann, f"line {row.line}")
    return checker.finish()


def export_mias(
    annotations: Iterable[Annotation],
    path: str | Path,
    *,
    image: ImageRef,
    classes: Sequence[str] = (),
    provenance: dict[str, Any] | None = None,
    ref: str | None = None,
    tissue: str | None = None,
    abnormality: str | None = None,
    merge: bool = False,
) -> Path:
    """Write one film's boxes as ``Info.txt`` rows (atomically) and a provenance sidecar.

    Parameters
    ----------
    annotations : iterable of Annotation
        Boxes are written (rejected ones are not: they are no abnormality); others
        skipped.
    path : str or Path
        The ``Info.txt`` to write.
    image : ImageRef
        The 1024 × 1024 film.
    classes : sequence of str
        Recorded in the sidecar.
    provenance : dict, optional
        Extra sidecar keys.
    ref : str, optional
        The film, default the image file's stem.
    tissue : {"F", "G", "D"}, optional
        Background tissue; default the objects' ``measurements["tissue"]``.
    abnormality : str, optional
        The MIAS code for boxes classed ``benign`` / ``malignant``.
    merge : bool
        Keep the other films' rows of an existing ``path``, replacing this film's.

    Returns
    -------
    Path

    Raises
    ------
    AnnotationError
        A box outside the film, a class that is no MIAS code, no severity, no tissue, or
        (``merge``) a malformed existing file. Nothing is written then.
    """
    path = Path(path)
    _check_film(path, image)
    ref = ref or Path(image.path).stem
    anns = materialise(annotations)
    skipped: dict[str, int] = {}
    boxes: list[tuple[int, Annotation]] = []
    for index, ann in enumerate(anns):
        if ann.kind != "box" or ann.review == "rejected":
            key = ann.kind if ann.kind != "box" else "rejected"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        check_export(ann, index, path=path, image=image)
        boxes.append((index, ann))
    tissue_code = _tissue(path, tissue, [a for _, a in boxes])
    rows = [_row(path, ref, tissue_code, index, ann, abnormality) for index, ann in boxes]
    if not rows:
        rows = [InfoRow(ref, tissue_code, "NORM", None, None, None, None, 0)]
    lines = [r.to_line() for r in rows]
    if merge and path.exists():
        others = [r for r in read_info(path) if r.ref != ref]
        merged = sorted([*others, *rows], key=lambda r: (r.ref, r.line if r.ref != ref else 0))
        lines = [r.to_line() for r in merged]
    record = file_provenance(anns, image=image, fmt="mias", provenance=provenance, skipped=skipped)
    record.update(
        file=path.name,
        ref=ref,
        classes=list(classes),
        units="MIAS film px, origin bottom-left (row = 1024 - y)",
    )
    sidecar = json.dumps(record, indent=2, default=json_default, ensure_ascii=False)
    with atomic_open(path, "w", encoding="ascii", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")
    with atomic_open(path.with_name(path.name + ".json"), "w", encoding="utf-8") as fh:
        fh.write(sidecar)
    return path


def _tissue(path: Path, tissue: str | None, boxes: list[Annotation]) -> str:
    if tissue is not None:
        code = tissue.upper()
        if code not in TISSUES:
            raise AnnotationError(
                path,
                f"tissue {tissue!r} is not one of {TISSUES}",
                "F fatty, G fatty-glandular, D dense-glandular",
            )
        return code
    found = {a.measurements["tissue"] for a in boxes if "tissue" in a.measurements}
    if len(found) == 1:
        value = next(iter(found))
        if value in (0.0, 1.0, 2.0):
            return TISSUES[int(value)]
    raise AnnotationError(
        path,
        "the background tissue is not known"
        + (f" (the objects say {sorted(found)})" if found else ""),
        "pass tissue='F', 'G' or 'D'",
    )


def _row(
    path: Path, ref: str, tissue: str, index: int, ann: Annotation, abnormality: str | None
) -> InfoRow:
    where = f"object {index} (id {ann.id})"
    name = ann.class_name
    severity: str | None = _SEVERITY_NAMES.get(name.lower())
    if severity is not None:
        code = (abnormality or "").upper()
        if code not in _CODES:
            raise AnnotationError(
                path,
                f"{where}: class {name!r} needs a MIAS abnormality code",
                f"pass abnormality= one of {_CODES}",
            )
    else:
        code = name.upper()
        if code not in _CODES:
            raise AnnotationError(
                path,
                f"{where}: class {name!r} is not a MIAS abnormality",
                f"expected one of {_CODES} (or benign / malignant with abnormality=)",
            )
        value = ann.measurements.get("severity")
        if value not in (0.0, 1.0):
            raise AnnotationError(
                path,
                f"{where}: severity {value!r} is not 0 (B) or 1 (M)",
                "set measurements['severity'] or class it benign / malignant",
            )
        severity = "B" if value == 0.0 else "M"
    (top, left), (bottom, right) = ann.coords
    m = ann.measurements
    if {"mias_x", "mias_y", "mias_radius"} <= m.keys():
        x, y, r = int(m["mias_x"]), int(m["mias_y"]), int(m["mias_radius"])
        circle = InfoRow(ref, tissue, code, severity, x, y, r, 0).box(film=FILM)
        assert circle is not None
        clipped = np.clip(np.array(circle, dtype=float), 0.0, float(FILM))
        if np.allclose(clipped, [top, left, bottom, right], atol=1e-6):
            return InfoRow(ref, tissue, code, severity, x, y, r, 0)
    x = min(max(round(float(left + right) / 2), 0), FILM)
    y = min(max(round(FILM - float(top + bottom) / 2), 0), FILM)
    radius = max(1, round(float(max(bottom - top, right - left)) / 2))
    return InfoRow(ref, tissue, code, severity, x, y, radius, 0)
