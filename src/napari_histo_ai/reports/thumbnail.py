"""The report's picture: the slide small, with the models' results drawn over it.

`draw_thumbnail` reads the coarsest pyramid level that still has at least the wanted
size (never a full-resolution read of a large slide), scales it to at most
``thumbnail_px`` on its longest side and draws, in this order:

* one **heatmap** (a tumour / probability map), colour-mapped and semi-transparent
  (more opaque where the probability is higher), with a colour bar;
* **detections** as rings coloured by class, their size and opacity growing with the
  model's confidence; **boxes** as rectangles; lesion **diameters** as lines;
* the mitosis **hotspot** window as a dashed rectangle;
* a **scale bar** in µm / mm (when the pixel size is known).

Only numpy and Pillow (and matplotlib's colour maps, imported here) are used.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid
    from .measures import RunData

__all__ = ["HEATMAP_CMAP", "Overlay", "Thumbnail", "draw_thumbnail", "overlays_of"]

#: the heatmap's colour map (matplotlib name)
HEATMAP_CMAP = "turbo"
#: probabilities below this are not painted (the slide stays visible where nothing is)
HEATMAP_MIN = 0.1
#: images smaller than this (longest side, px) are enlarged for the picture
MIN_SIDE = 512
#: colour of the hotspot window
HOTSPOT_COLOUR = "#00e5ff"


@dataclass
class Overlay:
    """One thing to draw over the slide.

    Parameters
    ----------
    kind : str
        ``heatmap``, ``points``, ``boxes``, ``lines`` or ``hotspot``.
    label : str
        Legend text ("tumour probability (idc-tumour)", "mitosis (mitosis-fcn)").
    colour : str
        ``#rrggbb`` (points / boxes / lines / hotspot; per class in ``colours``).
    data : dict
        heatmap: ``grid`` (h, w) float in [0, 1] (NaN = none), ``origin`` and ``pixel``
        (level-0 px of output pixel 0 and per output pixel, per row / column);
        points: ``coords`` (N, 2) rows / cols, ``scores`` (N,), ``labels`` (N,);
        boxes / lines: ``coords`` (N, 4); hotspot: ``box`` (top, left, bottom, right).
    classes, colours : tuple of str
        Class names and their colours (objects).
    """

    kind: str
    label: str
    colour: str = "#ffffff"
    data: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()


@dataclass
class Thumbnail:
    """A drawn thumbnail.

    Attributes
    ----------
    png : bytes
    size : (int, int)
        (width, height), pixels.
    level : int
        Pyramid level read.
    downsample : float
        Level-0 pixels per thumbnail pixel.
    legend : list of dict
        ``{"label", "colour", "kind"}`` per item drawn (for the HTML / PDF legend).
    scale_bar : str
        The scale bar's label ("500 µm"), ``""`` without a pixel size.
    """

    png: bytes
    size: tuple[int, int]
    level: int
    downsample: float
    legend: list[dict[str, Any]]
    scale_bar: str


def _hex(colour: str, alpha: int = 255) -> tuple[int, int, int, int]:
    c = colour.lstrip("#")
    if len(c) < 6:
        return (255, 255, 255, alpha)
    return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), alpha)


def read_overview(
    pyramid: Pyramid, max_side: int, *, plane: tuple[int, ...] = ()
) -> tuple[np.ndarray, int, float]:
    """The slide as (h, w, 3) uint8 at most ``max_side`` long, from a coarse level.

    Uses the coarsest level whose longest side is still ≥ ``max_side`` (or level 0),
    reading it with a stride when it is more than twice too large.

    Returns
    -------
    (rgb, level, downsample)
        ``downsample``: level-0 pixels per returned pixel (rows).
    """
    shapes = [pyramid.spatial_shape(i)[-2:] for i in range(len(pyramid.levels))]
    level = 0
    for i, shape in enumerate(shapes):
        if max(shape) >= max_side:
            level = i
    h0 = shapes[0][0]
    lv = pyramid.levels[level]
    axes = pyramid.axes
    key: list[Any] = []
    step = max(1, int(max(shapes[level]) // (2 * max_side)))
    pi = 0
    for a in axes:
        if a in ("Y", "X"):
            key.append(slice(None, None, step))
        elif a == "S":
            key.append(slice(None))
        else:  # a plane axis (Z, T, C without S)
            key.append(plane[pi] if pi < len(plane) else 0)
            pi += 1
    part = lv[tuple(key)]
    arr = np.asarray(part.compute(scheduler="threads") if hasattr(part, "compute") else part)
    kept = [a for a in axes if a in ("Y", "X", "S")]
    order = [kept.index("Y"), kept.index("X")] + ([kept.index("S")] if "S" in kept else [])
    arr = np.transpose(arr, order)
    rgb = _to_rgb(arr)
    return rgb, level, h0 / rgb.shape[0]


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 RGB of an RGB(A) or greyscale array (greyscale stretched to 0.5-99.5 %)."""
    if arr.ndim == 3 and arr.shape[-1] >= 3:
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            hi = float(np.nanmax(rgb)) or 1.0
            rgb = np.clip(rgb.astype(np.float32) / hi * 255, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)
    grey = arr[..., 0] if arr.ndim == 3 else arr
    g = grey.astype(np.float32)
    finite = g[np.isfinite(g)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1
    g8 = np.clip((g - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    return np.repeat(g8[..., None], 3, axis=-1)


def _nice_length(um: float) -> float:
    """A round length (1, 2, 5 × 10^k µm) at most ``um``."""
    if um <= 0:
        return 0.0
    k = math.floor(math.log10(um))
    for m in (5, 2, 1):
        if m * 10**k <= um:
            return float(m * 10**k)
    return float(10**k)


_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
)


def _font(size: int) -> Any:
    """A TrueType font with µ when the system has one, else Pillow's own."""
    from PIL import ImageFont

    for path in _FONTS:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _has_micro(font: Any) -> bool:
    return hasattr(font, "path")  # a TrueType font; the bitmap default lacks µ


def heatmap_rgba(grid: np.ndarray, cmap: str = HEATMAP_CMAP) -> np.ndarray:
    """(h, w) probabilities -> (h, w, 4) uint8; alpha 0 where NaN or below `HEATMAP_MIN`,
    else growing with the value up to 200 (opaque enough to read) at 0.5 and above."""
    from matplotlib import colormaps

    g = np.asarray(grid, dtype=np.float32)
    ok = np.isfinite(g)
    v = np.clip(np.nan_to_num(g, nan=0.0), 0, 1)
    rgba = (colormaps[cmap](v) * 255).astype(np.uint8)
    alpha = np.clip(200.0 * v / 0.5, 0, 200).astype(np.uint8)
    rgba[..., 3] = np.where(ok & (v >= HEATMAP_MIN), alpha, 0)
    return rgba


def _resample_grid(
    grid: np.ndarray,
    origin: tuple[float, float],
    pixel: tuple[float, float],
    shape: tuple[int, int],
    downsample: tuple[float, float],
) -> np.ndarray:
    """Nearest-neighbour values of an output grid at each thumbnail pixel centre."""
    rows, cols = shape
    yc = (np.arange(rows) + 0.5) * downsample[0]
    xc = (np.arange(cols) + 0.5) * downsample[1]
    iy = np.floor((yc - origin[0]) / pixel[0]).astype(np.int64)
    ix = np.floor((xc - origin[1]) / pixel[1]).astype(np.int64)
    out = np.full(shape, np.nan, dtype=np.float32)
    oky = (iy >= 0) & (iy < grid.shape[0])
    okx = (ix >= 0) & (ix < grid.shape[1])
    sub = grid[np.clip(iy, 0, grid.shape[0] - 1)][:, np.clip(ix, 0, grid.shape[1] - 1)]
    ok = oky[:, None] & okx[None, :]
    out[ok] = sub[ok]
    return out


def draw_thumbnail(
    pyramid: Pyramid,
    overlays: list[Overlay],
    *,
    max_px: int = 1024,
    mpp: tuple[float, float] | None = None,
    plane: tuple[int, ...] = (),
) -> Thumbnail:
    """Draw the slide at ≤ ``max_px`` with ``overlays`` and a scale bar; PNG bytes.

    Parameters
    ----------
    pyramid : Pyramid
    overlays : list of Overlay
        Drawn in order (put the heatmap first).
    max_px : int
        Longest side of the picture.
    mpp : (float, float), optional
        µm per level-0 pixel for the scale bar (none drawn without it).
    plane : tuple of int
        The plane of a stack to show (a volume's slice).
    """
    from PIL import Image, ImageDraw

    rgb, level, _ = read_overview(pyramid, max_px, plane=plane)
    h0, w0 = pyramid.spatial_shape(0)[-2:]
    img = Image.fromarray(rgb, "RGB")
    scale = min(1.0, max_px / max(img.size))
    if scale < 1.0:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.LANCZOS,
        )
    elif max(img.size) < min(MIN_SIDE, max_px):  # a small image (an MRI slice): enlarge
        k = max(1, min(MIN_SIDE, max_px) // max(img.size))
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    w, h = img.size
    ds = (h0 / h, w0 / w)  # level-0 px per thumbnail px
    base = img.convert("RGBA")
    legend: list[dict[str, Any]] = []
    heat_label = ""
    for ov in overlays:
        if ov.kind != "heatmap":
            continue
        grid = _resample_grid(ov.data["grid"], ov.data["origin"], ov.data["pixel"], (h, w), ds)
        layer = Image.fromarray(heatmap_rgba(grid), "RGBA")
        base = Image.alpha_composite(base, layer)
        legend.append({"label": ov.label, "colour": HEATMAP_CMAP, "kind": "heatmap"})
        heat_label = ov.label
        break  # one heatmap: several would hide each other
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    r_base = max(3.0, max(w, h) / 220)
    for ov in overlays:
        if ov.kind == "points":
            coords = np.asarray(ov.data.get("coords", np.zeros((0, 2))), dtype=float)
            scores = np.asarray(ov.data.get("scores", np.ones(len(coords))), dtype=float)
            labels = np.asarray(ov.data.get("labels", np.zeros(len(coords), int)), dtype=int)
            for (r, c), s, lab in zip(coords, scores, labels, strict=True):
                colour = ov.colours[lab] if lab < len(ov.colours) else ov.colour
                s = float(np.clip(s, 0, 1))
                rad = r_base * (0.8 + 0.8 * s)
                y, x = r / ds[0], c / ds[1]
                alpha = int(150 + 105 * s)
                draw.ellipse(
                    (x - rad - 1, y - rad - 1, x + rad + 1, y + rad + 1),
                    outline=(0, 0, 0, alpha),
                    width=1,
                )
                draw.ellipse(
                    (x - rad, y - rad, x + rad, y + rad), outline=_hex(colour, alpha), width=2
                )
        elif ov.kind in ("boxes", "hotspot"):
            coords = np.asarray(ov.data.get("coords", [ov.data.get("box")]), dtype=float)
            scores = np.asarray(ov.data.get("scores", np.ones(len(coords))), dtype=float)
            labels = np.asarray(ov.data.get("labels", np.zeros(len(coords), int)), dtype=int)
            for box, s, lab in zip(coords, scores, labels, strict=True):
                top, left, bottom, right = box[-4:]
                colour = ov.colours[lab] if lab < len(ov.colours) else ov.colour
                xy = (left / ds[1], top / ds[0], right / ds[1], bottom / ds[0])
                if ov.kind == "hotspot":
                    _dashed_rect(draw, xy, _hex(colour), width=3)
                else:
                    a = int(150 + 105 * float(np.clip(s, 0, 1)))
                    draw.rectangle(xy, outline=_hex(colour, a), width=3)
                    draw.text((xy[0] + 3, xy[1] + 2), f"{s:.2f}", fill=_hex(colour), font=_font(12))
        elif ov.kind == "lines":
            for line in np.asarray(ov.data.get("coords", np.zeros((0, 4))), dtype=float):
                r0, c0, r1, c1 = line[-4:]
                draw.line(
                    (c0 / ds[1], r0 / ds[0], c1 / ds[1], r1 / ds[0]), fill=_hex(ov.colour), width=3
                )
        if ov.kind in ("points", "boxes", "lines", "hotspot"):
            if ov.classes and ov.kind != "hotspot":
                for cls, col in zip(
                    ov.classes, ov.colours or (ov.colour,) * len(ov.classes), strict=False
                ):
                    legend.append({"label": f"{cls} ({ov.label})", "colour": col, "kind": ov.kind})
            else:
                legend.append({"label": ov.label, "colour": ov.colour, "kind": ov.kind})
    base = Image.alpha_composite(base, layer)
    draw = ImageDraw.Draw(base)
    bar_text = _scale_bar(draw, w, h, ds[1], mpp)
    if heat_label:
        _colour_bar(base, draw, w, h)
    buf = io.BytesIO()
    base.convert("RGB").save(buf, format="PNG", optimize=True)
    return Thumbnail(buf.getvalue(), (w, h), level, ds[0], legend, bar_text)


def _dashed_rect(draw: Any, xy: tuple[float, ...], colour: tuple[int, ...], width: int) -> None:
    x0, y0, x1, y1 = xy
    dash = 8
    for a, b, horizontal, fixed in (
        (x0, x1, True, y0),
        (x0, x1, True, y1),
        (y0, y1, False, x0),
        (y0, y1, False, x1),
    ):
        t = a
        while t < b:
            e = min(b, t + dash)
            seg = (t, fixed, e, fixed) if horizontal else (fixed, t, fixed, e)
            draw.line(seg, fill=colour, width=width)
            t += 2 * dash


def _scale_bar(draw: Any, w: int, h: int, ds_x: float, mpp: tuple[float, float] | None) -> str:
    if mpp is None:
        return ""
    um_per_px = ds_x * mpp[1]
    length = _nice_length(um_per_px * w / 4)
    if length <= 0:
        return ""
    px = length / um_per_px
    font = _font(max(11, min(18, w // 60)))
    micro = "µm" if _has_micro(font) else "um"
    text = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} {micro}"
    x0, y0 = 12, h - 18
    draw.rectangle((x0 - 6, y0 - 22, x0 + px + 6, y0 + 10), fill=(255, 255, 255, 200))
    draw.rectangle((x0, y0, x0 + px, y0 + 5), fill=(0, 0, 0, 255))
    draw.text((x0, y0 - 19), text, fill=(0, 0, 0, 255), font=font)
    return text


def _colour_bar(base: Any, draw: Any, w: int, h: int) -> None:
    """The heatmap's colour bar, bottom right: "probability" above, 0 and 1 below."""
    from PIL import Image

    font = _font(11)
    bw, bh = max(90, w // 6), 10
    x0, y0 = w - bw - 14, h - 34
    ramp = np.linspace(0, 1, bw, dtype=np.float32)[None, :].repeat(bh, axis=0)
    rgba = heatmap_rgba(ramp)
    rgba[..., 3] = 255
    draw.rectangle((x0 - 8, y0 - 17, x0 + bw + 8, y0 + bh + 16), fill=(255, 255, 255, 220))
    base.paste(Image.fromarray(rgba, "RGBA"), (x0, y0))
    black = (0, 0, 0, 255)
    draw.text((x0 + bw // 2, y0 - 3), "probability", fill=black, font=font, anchor="md")
    draw.text((x0, y0 + bh + 2), "0", fill=black, font=font, anchor="ma")
    draw.text((x0 + bw, y0 + bh + 2), "1", fill=black, font=font, anchor="ma")


# ----------------------------------------------------------------------------- from runs
def overlays_of(
    runs: list[RunData],
    *,
    hotspot: tuple[float, float, float, float] | None = None,
    annotations: dict[str, dict[str, list[tuple[float, float, float]]]] | None = None,
    plane: tuple[int, ...] | None = None,
    hotspot_label: str = "mitosis hotspot (10 HPF window)",
    shape: tuple[int, int] | None = None,
) -> list[Overlay]:
    """The overlays of a report's runs: one heatmap (tumour map first, then a cancer
    mask, then any probability map), every detection, box and line output, and the
    mitosis hotspot window (unless it covers the whole image of level-0 ``shape``).

    ``annotations`` (reviewed objects per class) replace a points output of the same
    class. ``plane`` keeps only the objects and the heatmap of that plane (volumes).
    """
    from .measures import _origin

    heat: list[tuple[int, Overlay]] = []
    objects: list[Overlay] = []
    for run in runs:
        spec = run.spec
        origin = _origin(run.geometry)
        pixel = run.geometry.pixel
        for o in spec.outputs:
            if o.kind == "class" and not spec.dense and o.smoothing_um == 0:
                tiles = run.tiles()
                if tiles is None or tiles.ndim != 3:
                    continue
                k = len(o.channels) - 1
                grid = tiles[o.channels[k]]
                rank = 0 if "tumour" in o.classes else (2 if "malignant" in o.classes else 3)
                label = f"{o.classes[k]} probability ({spec.name})"
                heat.append(
                    (
                        rank,
                        Overlay(
                            "heatmap", label, data={"grid": grid, "origin": origin, "pixel": pixel}
                        ),
                    )
                )
            elif o.kind == "probability" and spec.dense and "probability" in run.group:
                prob, level = run.probability_level(2048)
                chans = [run.channel_index(c) for c in o.channels]
                k = o.classes.index("cancer") if "cancer" in o.classes else 0
                block = prob[chans[k]]
                if block.ndim == 3:  # a volume: the shown plane
                    block = block[(plane or (0,))[0]]
                grid = block.astype(np.float32) / 255.0
                rank = 1 if "cancer" in o.classes else 4
                name = o.classes[k] if o.classes else o.name
                heat.append(
                    (
                        rank,
                        Overlay(
                            "heatmap",
                            f"{name} probability ({spec.name})",
                            data={
                                "grid": grid,
                                "origin": origin,
                                "pixel": (pixel[0] * 2**level, pixel[1] * 2**level),
                            },
                        ),
                    )
                )
            elif o.kind in ("points", "boxes", "lines"):
                objs = run.objects(o)
                if objs is None:
                    continue
                coords, scores, labels = objs.coords, objs.scores, objs.labels
                n_plane = coords.shape[1] - (2 if o.kind == "points" else 4)
                if plane is not None and n_plane:
                    keep = np.all(coords[:, :n_plane] == np.asarray(plane[:n_plane]), axis=1)
                    coords, scores, labels = coords[keep], scores[keep], labels[keep]
                coords = coords[:, n_plane:]
                if o.kind == "points" and annotations is not None:
                    cls = o.classes[0] if o.classes else ""
                    if cls in annotations:
                        counted = annotations[cls].get("counted", [])
                        coords = np.asarray([[r, c] for r, c, _ in counted], float).reshape(-1, 2)
                        scores = np.asarray([s for _, _, s in counted], float)
                        labels = np.zeros(len(coords), dtype=int)
                colours = tuple(o.colours) or ("#ffe119",)
                objects.append(
                    Overlay(
                        o.kind,
                        spec.name,
                        colours[0],
                        data={"coords": coords, "scores": scores, "labels": labels},
                        classes=tuple(o.classes),
                        colours=colours,
                    )
                )
    out = [min(heat, key=lambda t: t[0])[1]] if heat else []
    out += objects
    drawn = {c for ov in objects if ov.kind == "points" for c in ov.classes}
    for cls, groups in (annotations or {}).items():
        counted = groups.get("counted", [])
        if cls in drawn or not counted:
            continue
        out.append(
            Overlay(
                "points",
                "reviewed annotations",
                "#ffe119",
                data={
                    "coords": np.asarray([[r, c] for r, c, _ in counted], float).reshape(-1, 2),
                    "scores": np.asarray([sc for _, _, sc in counted], float),
                    "labels": np.zeros(len(counted), dtype=int),
                },
                classes=(cls,),
                colours=("#ffe119",),
            )
        )
    if (
        hotspot is not None
        and shape is not None
        and not (
            hotspot[0] <= 0
            and hotspot[1] <= 0
            and hotspot[2] >= shape[0]
            and hotspot[3] >= shape[1]
        )
    ):  # a window as large as the image shows nothing: not drawn
        out.append(Overlay("hotspot", hotspot_label, HOTSPOT_COLOUR, data={"box": hotspot}))
    return out
