"""A report as PDF (reportlab platypus): the same content as the HTML page, the
thumbnail embedded, written atomically."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .content import DISCLAIMER, EXPLAINER, Measure, Report, SlideSection

__all__ = ["render_pdf", "write_pdf"]


def _p(text: Any) -> str:
    """Escape text for a reportlab Paragraph (its mini-markup is XML)."""
    return escape(str(text))


def _styles() -> dict[str, Any]:
    from reportlab.lib import colors
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet

    base = getSampleStyleSheet()
    font = "DejaVuSans" if _dejavu() else "Helvetica"
    bold = "DejaVuSans-Bold" if _dejavu() else "Helvetica-Bold"
    body = ParagraphStyle(
        "body", parent=base["BodyText"], fontName=font, fontSize=9.5, leading=12.5
    )
    return {
        "title": ParagraphStyle(
            "title", parent=base["Title"], fontName=bold, fontSize=18, alignment=0, spaceAfter=4
        ),
        "h2": ParagraphStyle(
            "h2", parent=base["Heading2"], fontName=bold, fontSize=13, spaceBefore=10, spaceAfter=4
        ),
        "h3": ParagraphStyle(
            "h3", parent=base["Heading3"], fontName=bold, fontSize=11, spaceBefore=8, spaceAfter=3
        ),
        "body": body,
        "meta": ParagraphStyle(
            "meta", parent=body, textColor=colors.HexColor("#5b6474"), fontSize=8.5
        ),
        "note": ParagraphStyle(
            "note", parent=body, textColor=colors.HexColor("#5b6474"), fontSize=8, leftIndent=8
        ),
        "cell": ParagraphStyle("cell", parent=body, fontSize=8, leading=10),
        "summary": ParagraphStyle(
            "summary",
            parent=body,
            spaceAfter=5,
            backColor=colors.HexColor("#eef3fb"),
            borderPadding=4,
            fontSize=10,
            leading=13.5,
        ),
        "warn": ParagraphStyle("warn", parent=body, textColor=colors.HexColor("#9a4b00")),
        "disclaimer": ParagraphStyle(
            "disclaimer",
            parent=body,
            backColor=colors.HexColor("#fff6e0"),
            borderPadding=4,
            fontSize=8.5,
        ),
        "font": font,
        "bold": bold,
    }


_FONT_STATE: dict[str, bool] = {}


def _dejavu() -> bool:
    """Register DejaVu Sans when the system has it (µ, ², × and ≥ in every viewer)."""
    if "ok" in _FONT_STATE:
        return _FONT_STATE["ok"]
    ok = False
    try:
        from reportlab.pdfbase import pdfmetrics
        from reportlab.pdfbase.ttfonts import TTFont

        for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
            regular = Path(folder) / "DejaVuSans.ttf"
            bold = Path(folder) / "DejaVuSans-Bold.ttf"
            if regular.is_file() and bold.is_file():
                pdfmetrics.registerFont(TTFont("DejaVuSans", str(regular)))
                pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(bold)))
                ok = True
                break
    except Exception:  # a broken font file: fall back to Helvetica
        ok = False
    _FONT_STATE["ok"] = ok
    return ok


def _table(rows: Sequence[Sequence[str]], st: dict[str, Any], width: float) -> Any:
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

    data = [[Paragraph(_p(c), st["cell"]) for c in row] for row in rows]
    n = max(len(r) for r in rows)
    widths = [width * 0.42] + [width * 0.58 / (n - 1)] * (n - 1) if n > 1 else [width]
    if n > 3:
        widths = [width / n] * n
    t = Table(data, colWidths=widths, repeatRows=1)
    t.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#d8dce3")),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#f3f5f8")),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    return t


def _measure(m: Measure, st: dict[str, Any], width: float) -> list[Any]:
    from reportlab.platypus import Paragraph, Spacer

    out: list[Any] = [Paragraph(_p(m.title), st["h3"])]
    out += [Paragraph(_p(s), st["body"]) for s in m.sentences]
    if m.table:
        out += [Spacer(1, 3), _table(m.table, st, width)]
    out += [Paragraph("• " + _p(n), st["note"]) for n in m.notes]
    return out


def _legend(items: Sequence[dict[str, Any]], st: dict[str, Any]) -> list[Any]:
    from reportlab.platypus import Paragraph

    out = []
    for item in items:
        colour = str(item.get("colour", "#000000"))
        if not colour.startswith("#"):
            colour = "#3366cc"  # the heatmap: a colour map, shown as a blue square
        mark = "■" if item.get("kind") in ("heatmap", "boxes", "hotspot") else "●"
        out.append(
            Paragraph(
                f'<font color="{_p(colour)}">{mark}</font> {_p(item.get("label", ""))}', st["meta"]
            )
        )
    return out


def _slide(
    s: SlideSection, png: bytes | None, st: dict[str, Any], width: float, several: bool
) -> list[Any]:
    from reportlab.platypus import Image, Paragraph, Spacer

    out: list[Any] = [Paragraph(_p(s.name), st["h2"])]
    ident = [f"{s.shape[1]:,} × {s.shape[0]:,} px" if len(s.shape) >= 2 else ""]
    ident.append(f"{s.mpp[0]:.4g} µm/px ({s.mpp_source})" if s.mpp else "pixel size missing")
    if s.objective_power:
        ident.append(f"{s.objective_power:g}× objective")
    out.append(Paragraph(_p(" · ".join(x for x in ident if x)), st["meta"]))
    out.append(Paragraph(_p(s.image), st["meta"]))
    if several:
        out += [Paragraph(_p(x), st["body"]) for x in s.summary]
    if png:
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(png)) as im:
            w, h = im.size
        draw_w = min(width, 17.0 * 28.35)
        draw_h = draw_w * h / w
        max_h = 15.0 * 28.35
        if draw_h > max_h:
            draw_w, draw_h = draw_w * max_h / draw_h, max_h
        out += [Spacer(1, 4), Image(io.BytesIO(png), width=draw_w, height=draw_h)]
        out += _legend(s.thumbnail_legend, st)
        if s.thumbnail_caption:
            out.append(Paragraph(_p(s.thumbnail_caption), st["meta"]))
    out += [Paragraph(_p(w), st["warn"]) for w in s.warnings]
    for m in s.measures:
        out += _measure(m, st, width)
    if s.models:
        out.append(Paragraph("Models used", st["h3"]))
        rows = [["Model", "Version", "Weights (sha256)", "Run", "Intended use / limitations"]]
        for me in s.models:
            version = me.version + (f" (retrained from {me.parent})" if me.parent else "")
            run = ", ".join(
                x
                for x in (
                    me.run_date,
                    me.device,
                    f"{me.wall_s:.1f} s" if me.wall_s is not None else "",
                    me.tiles,
                    "" if me.complete else "INCOMPLETE",
                )
                if x
            )
            weights = f"{me.weights} ({me.weights_sha256})" if me.weights else "built-in"
            use = me.intended_use + (f" Limitations: {me.limitations}" if me.limitations else "")
            rows.append([f"{me.name}: {me.task}", version, weights, run, use])
        out.append(_models_table(rows, st, width))
    return out


def _models_table(rows: list[list[str]], st: dict[str, Any], width: float) -> Any:
    from reportlab.lib import colors
    from reportlab.platypus import Paragraph, Table, TableStyle

    data = [[Paragraph(_p(c), st["cell"]) for c in row] for row in rows]
    widths = [width * f for f in (0.2, 0.1, 0.16, 0.16, 0.38)]
    t = Table(data, colWidths=widths, repeatRows=1)
    t.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#d8dce3")),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#f3f5f8")),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ]
        )
    )
    return t


def render_pdf(report: Report, thumbnails: dict[int, bytes] | None = None) -> bytes:
    """The report as PDF bytes (A4)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    thumbnails = thumbnails or {}
    st = _styles()
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
        title=report.title,
        author="napari-histo-ai",
        subject="; ".join(s.name for s in report.slides),
    )
    width = doc.width
    story: list[Any] = [Paragraph(_p(report.title), st["title"])]
    o = report.options
    if o.patient:
        story.append(Paragraph(_p(f"Patient: {o.patient}"), st["meta"]))
    names = ", ".join(s.name for s in report.slides)
    story.append(
        Paragraph(_p(f"Slide{'s' if len(report.slides) > 1 else ''}: {names}"), st["meta"])
    )
    story.append(Paragraph(_p(f"Report made {report.created}"), st["meta"]))
    story.append(Paragraph("Summary", st["h2"]))
    story += [Paragraph(_p(s), st["summary"]) for s in report.summary]
    story += [Spacer(1, 6), Paragraph(_p(DISCLAIMER), st["disclaimer"])]
    if report.patient:
        story.append(Paragraph("Patient level", st["h2"]))
        for m in report.patient:
            story += _measure(m, st, width)
    for i, s in enumerate(report.slides):
        story += _slide(s, thumbnails.get(i), st, width, len(report.slides) > 1)
    story.append(Paragraph("About this report", st["h2"]))
    story.append(Paragraph(_p(DISCLAIMER), st["body"]))
    story.append(Paragraph(_p(EXPLAINER), st["body"]))

    def footer(canvas: Any, document: Any) -> None:
        canvas.saveState()
        canvas.setFont(st["font"], 7.5)
        canvas.drawString(15 * mm, 8 * mm, f"{report.title} · research use only, not a diagnosis")
        canvas.drawRightString(A4[0] - 15 * mm, 8 * mm, f"page {document.page}")
        canvas.restoreState()

    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()


def write_pdf(report: Report, thumbnails: dict[int, bytes] | None, path: str | Path) -> Path:
    """Render and write the PDF atomically (a failed render leaves the old file)."""
    from ..atomic import atomic_open

    data = render_pdf(report, thumbnails)
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)
