"""The mini-MIAS truth list ``Info.txt`` (Suckling et al. 1994).

One row per abnormality, whitespace-separated: ``ref tissue class [severity [x y
radius]]``. ``ref`` is the film (``mdb001``), ``tissue`` the background tissue (``F``
fatty, ``G`` fatty-glandular, ``D`` dense-glandular), ``class`` the abnormality
(``CALC``, ``CIRC``, ``SPIC``, ``MISC``, ``ARCH``, ``ASYM`` or ``NORM``), ``severity``
``B`` (benign) or ``M`` (malignant), and ``x y radius`` the centre and radius of a
circle enclosing the abnormality in **film pixels with the origin at the bottom-left**
of the 1024 × 1024 film (200 µm pixels), so ``row = 1024 − y`` and ``col = x``
(`InfoRow.box`). Some calcification clusters have ``*NOTE 3*`` instead of a centre.

Used by the mammogram trainer (`napari_histo_ai.training.mammogram`) and the annotation
import / export (`napari_histo_ai.annotations.formats.mias`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AnnotationError

__all__ = [
    "ABNORMALITIES",
    "FILM",
    "PIXEL_UM",
    "SEVERITY",
    "TISSUES",
    "InfoRow",
    "read_info",
]

#: side of a mini-MIAS film, px (200 µm each)
FILM = 1024
#: µm per film pixel
PIXEL_UM = 200.0
#: severity code -> class index of the mammogram detector (0 benign, 1 malignant)
SEVERITY = {"B": 0, "M": 1}
TISSUES = ("F", "G", "D")
ABNORMALITIES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM")


@dataclass(frozen=True)
class InfoRow:
    """One row of the MIAS ``Info.txt``.

    Parameters
    ----------
    ref : str
        Film, e.g. ``"mdb001"``.
    tissue : str
        Background tissue: ``F`` fatty, ``G`` fatty-glandular, ``D`` dense-glandular.
    abnormality : str
        ``CALC``, ``CIRC``, ``SPIC``, ``MISC``, ``ARCH``, ``ASYM`` or ``NORM``.
    severity : str or None
        ``B`` / ``M``; ``None`` for ``NORM``.
    x, y : int or None
        Centre, film px, origin bottom-left; ``None`` when not given.
    radius : int or None
        Radius of the enclosing circle, film px.
    line : int
        Line number in the file (1-based).
    """

    ref: str
    tissue: str
    abnormality: str
    severity: str | None
    x: int | None
    y: int | None
    radius: int | None
    line: int

    @property
    def located(self) -> bool:
        """Whether the row gives a centre and a radius."""
        return self.x is not None and self.y is not None and self.radius is not None

    def box(self, *, film: int = FILM) -> tuple[float, float, float, float] | None:
        """``(top, left, bottom, right)`` of the circle's bounding square in film pixels
        with the origin **top-left** (``row = film − y``, ``col = x``); ``None`` when the
        row has no centre. Not clipped to the film."""
        if self.x is None or self.y is None or self.radius is None:
            return None
        row, col, r = float(film - self.y), float(self.x), float(self.radius)
        return (row - r, col - r, row + r, col + r)

    def to_line(self) -> str:
        """The row as a line of ``Info.txt`` (no newline), e.g. ``mdb001 G CIRC B 535 425 197``."""
        fields = [self.ref, self.tissue, self.abnormality]
        if self.severity is not None:
            fields.append(self.severity)
        if self.x is not None and self.y is not None and self.radius is not None:
            fields += [str(self.x), str(self.y), str(self.radius)]
        return " ".join(fields)


def _info_error(path: Path, line: int, text: str, problem: str) -> AnnotationError:
    return AnnotationError(
        path,
        f"line {line}: {problem} in {text.strip()!r}",
        "expected 'ref tissue class [severity x y radius]' as in the MIAS Info.txt, e.g. "
        "'mdb001 G CIRC B 535 425 197'; fix or remove the line",
    )


def read_info(path: str | Path) -> list[InfoRow]:
    """Parse the MIAS ``Info.txt`` truth list.

    Parameters
    ----------
    path : str or Path
        The file: one abnormality per line, whitespace-separated ``ref tissue class
        [severity [x y radius | *NOTE n*]]``; blank lines are skipped; a header line
        starting with ``REF`` is allowed.

    Returns
    -------
    list of InfoRow
        In file order (a film with several abnormalities has several rows).

    Raises
    ------
    AnnotationError
        (a `HistoAIError`) The file is missing or unreadable, or a line is malformed
        (the message names the file, the line number, the line and what was expected).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            path,
            f"cannot read the MIAS truth list ({exc})",
            "expected the ASCII Info.txt of mini-MIAS",
        ) from exc
    rows: list[InfoRow] = []
    for n, text in enumerate(lines, start=1):
        tokens = text.split()
        if not tokens or (n == 1 and tokens[0].upper() == "REF"):
            continue

        def fail(problem: str, n: int = n, text: str = text) -> AnnotationError:
            return _info_error(path, n, text, problem)

        if len(tokens) < 3:
            raise fail(f"{len(tokens)} field(s)")
        ref, tissue, abnormality = tokens[0], tokens[1].upper(), tokens[2].upper()
        if not (ref.startswith("mdb") and ref[3:].isdigit()):
            raise fail(f"film reference {ref!r} is not 'mdbNNN'")
        if tissue not in TISSUES:
            raise fail(f"background tissue {tokens[1]!r} is not one of {', '.join(TISSUES)}")
        if abnormality not in ABNORMALITIES:
            raise fail(f"class {tokens[2]!r} is not one of {', '.join(ABNORMALITIES)}")
        rest = tokens[3:]
        if abnormality == "NORM":
            if rest:
                raise fail("a NORM row has extra fields")
            rows.append(InfoRow(ref, tissue, abnormality, None, None, None, None, n))
            continue
        if not rest:
            raise fail(f"class {abnormality} has no severity (B or M)")
        severity = rest[0].upper()
        if severity not in SEVERITY:
            raise fail(f"severity {rest[0]!r} is not B or M")
        numbers = rest[1:]
        if not numbers or numbers[0].startswith("*"):
            rows.append(InfoRow(ref, tissue, abnormality, severity, None, None, None, n))
            continue
        if len(numbers) != 3:
            raise fail(f"{len(numbers)} number(s) after the severity instead of x y radius")
        try:
            x, y, radius = (int(v) for v in numbers)
        except ValueError:
            raise fail(f"x y radius {' '.join(numbers)!r} are not integers") from None
        if not (0 <= x <= FILM and 0 <= y <= FILM):
            raise fail(f"centre ({x}, {y}) lies outside the {FILM} × {FILM} film")
        if radius <= 0:
            raise fail(f"radius {radius} is not positive")
        rows.append(InfoRow(ref, tissue, abnormality, severity, x, y, radius, n))
    return rows
