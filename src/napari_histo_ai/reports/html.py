"""A report as one self-contained HTML file: inline CSS, images as data URIs, no script,
no external URL. Every piece of text is escaped (`html.escape`). The page reads top to
bottom: title and identity, the plain-language summary, the picture with its legend,
one section per result with its table, then the models used and the caveats. The CSS
prints on A4 / Letter without cut tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from .content import DISCLAIMER, EXPLAINER, Measure, Report, SlideSection

__all__ = ["render_html"]

_CSS = """
:root { --ink: #1d2330; --muted: #5b6474; --line: #d8dce3; --accent: #2a5db0; }
* { box-sizing: border-box; }
body { font-family: "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 60rem; padding: 1.5rem 2rem 3rem; line-height: 1.45;
       font-size: 15px; background: #fff; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 1rem; padding-bottom: .5rem; }
h1 { font-size: 1.7rem; margin: 0 0 .3rem; }
h2 { font-size: 1.25rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line);
     padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; }
.meta { color: var(--muted); font-size: .9rem; margin: 0; }
.summary { background: #eef3fb; border-left: 5px solid var(--accent); padding: .7rem 1rem;
           margin: 1rem 0; }
.summary p { margin: .25rem 0; }
.disclaimer { background: #fff6e0; border: 1px solid #e8c26a; padding: .5rem .8rem;
              font-size: .9rem; margin: 1rem 0; }
figure { margin: .8rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); display: block; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: .3rem; }
.legend { list-style: none; padding: 0; margin: .4rem 0; display: flex; flex-wrap: wrap;
          gap: .3rem 1.2rem; font-size: .85rem; }
.swatch { display: inline-block; width: .9rem; height: .9rem; border-radius: 50%;
          vertical-align: -.15rem; margin-right: .35rem; border: 2px solid; }
.swatch.box, .swatch.hotspot { border-radius: 0; }
.swatch.heatmap { border-radius: 0; border: none; width: 2.4rem;
  background: linear-gradient(90deg,#30123b,#4686fb,#1ae4b6,#a2fc3c,#fabb39,#e4460a,#7a0403); }
table { border-collapse: collapse; width: 100%; margin: .4rem 0 .6rem; font-size: .9rem;
        page-break-inside: avoid; }
th, td { border: 1px solid var(--line); padding: .3rem .5rem; text-align: left;
         vertical-align: top; }
th { background: #f3f5f8; }
td.num { text-align: right; white-space: nowrap; }
.measure p { margin: .3rem 0; }
.notes { color: var(--muted); font-size: .85rem; margin: .2rem 0 .8rem 1.1rem; padding: 0; }
.warn { color: #9a4b00; }
section.slide { page-break-before: auto; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  .summary, .disclaimer, th { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2, h3 { page-break-after: avoid; }
  figure { page-break-inside: avoid; }
}
@page { size: A4; margin: 15mm; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    head, *body = rows
    out = ["<table>", "<thead><tr>", *(f"<th>{_e(c)}</th>" for c in head), "</tr></thead><tbody>"]
    for row in body:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="num"' if i > 0 and len(row) > 2 and _numeric(cell) else ""
            out.append(f"<td{cls}>{_e(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _numeric(cell: str) -> bool:
    s = str(cell).replace(",", "").replace("%", "").split(" ")[0]
    try:
        float(s)
    except ValueError:
        return False
    return True


def _measure(m: Measure) -> str:
    parts = [f'<div class="measure"><h3>{_e(m.title)}</h3>']
    parts += [f"<p>{_e(s)}</p>" for s in m.sentences]
    parts.append(_table(m.table))
    if m.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in m.notes) + "</ul>")
    parts.append("</div>")
    return "".join(parts)


def _legend(items: Sequence[dict[str, Any]]) -> str:
    if not items:
        return ""
    out = ['<ul class="legend">']
    for item in items:
        kind = str(item.get("kind", ""))
        colour = str(item.get("colour", "#000"))
        style = "" if kind == "heatmap" else f' style="border-color:{_e(colour)}"'
        cls = {"boxes": "box", "hotspot": "hotspot", "heatmap": "heatmap"}.get(kind, "point")
        out.append(f'<li><span class="swatch {cls}"{style}></span>{_e(item.get("label", ""))}</li>')
    out.append("</ul>")
    return "".join(out)


def _identity(s: SlideSection) -> str:
    bits = [f"{s.shape[1]:,} × {s.shape[0]:,} px" if len(s.shape) >= 2 else ""]
    if s.mpp:
        bits.append(f"{s.mpp[0]:.4g} µm/px ({s.mpp_source})")
    else:
        bits.append("pixel size missing")
    if s.objective_power:
        bits.append(f"{s.objective_power:g}× objective")
    if s.vendor:
        bits.append(str(s.vendor))
    return " · ".join(b for b in bits if b)


def _models(s: SlideSection) -> str:
    if not s.models:
        return ""
    rows = [["Model", "Version (lineage)", "Weights (sha256)", "Run", "Intended use / limitations"]]
    for m in s.models:
        version = m.version + (f" (retrained from {m.parent})" if m.parent else "")
        weights = f"{m.weights} ({m.weights_sha256})" if m.weights else "built-in"
        run = ", ".join(
            x
            for x in (
                m.run_date,
                m.device,
                f"{m.wall_s:.1f} s" if m.wall_s is not None else "",
                m.tiles,
                "" if m.complete else "INCOMPLETE",
            )
            if x
        )
        use = m.intended_use + (f" Limitations: {m.limitations}" if m.limitations else "")
        rows.append([f"{m.name} — {m.task}", version, weights, run, use])
    return _table(rows)


def render_html(report: Report, thumbnails: dict[int, bytes] | None = None) -> str:
    """The report as a self-contained HTML document.

    Parameters
    ----------
    report : Report
    thumbnails : dict of int to bytes, optional
        PNG bytes per slide index, embedded as data URIs.

    Returns
    -------
    str
    """
    thumbnails = thumbnails or {}
    o = report.options
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(report.title)}</h1>",
    ]
    ident = []
    if o.patient:
        ident.append(f"Patient: {o.patient}")
    names = ", ".join(s.name for s in report.slides)
    ident.append(f"Slide{'s' if len(report.slides) > 1 else ''}: {names}")
    ident.append(f"Report made {report.created}")
    out += [f'<p class="meta">{_e(x)}</p>' for x in ident]
    out.append("</header>")
    out.append('<section class="summary"><h2 style="border:none;margin-top:0">Summary</h2>')
    out += [f"<p>{_e(s)}</p>" for s in report.summary]
    out.append("</section>")
    out.append(f'<p class="disclaimer">{_e(DISCLAIMER)}</p>')
    if report.patient:
        out.append("<section><h2>Patient level</h2>")
        out += [_measure(m) for m in report.patient]
        out.append("</section>")
    for i, s in enumerate(report.slides):
        out.append(f'<section class="slide"><h2>{_e(s.name)}</h2>')
        out.append(f'<p class="meta">{_e(_identity(s))}</p>')
        out.append(f'<p class="meta">{_e(s.image)}</p>')
        if len(report.slides) > 1 and s.summary:
            out += [f"<p>{_e(x)}</p>" for x in s.summary]
        png = thumbnails.get(i)
        if png:
            data = base64.b64encode(png).decode("ascii")
            alt = f"Slide {s.name} with the model results drawn over it"
            out.append(f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">')
            out.append(_legend(s.thumbnail_legend))
            if s.thumbnail_caption:
                out.append(f"<figcaption>{_e(s.thumbnail_caption)}</figcaption>")
            out.append("</figure>")
        for w in s.warnings:
            out.append(f'<p class="warn">{_e(w)}</p>')
        out += [_measure(m) for m in s.measures]
        out.append("<h3>Models used</h3>")
        out.append(_models(s))
        out.append("</section>")
    out.append("<section><h2>About this report</h2>")
    out.append(f"<p>{_e(DISCLAIMER)}</p>")
    out.append(f"<p>{_e(EXPLAINER)}</p>")
    out.append(
        "<p>"
        + _e(
            "Areas are computed at the slide's recorded pixel size; where it is missing, "
            "per-area numbers are not given. Each model's intended use and limitations are "
            "listed with it above; results outside that use are unreliable."
        )
        + "</p></section>"
    )
    out.append("</body></html>")
    return "\n".join(out)
