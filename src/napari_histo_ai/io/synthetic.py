"""Large synthetic slides made of real pixels, for benchmarks and demos.

:func:`make_slide` tiles a crop of a real slide into a pyramidal, JPEG-tiled BigTIFF of
any size (100 000 × 80 000 pixels in well under a minute). The crop is mirrored into a
seamless period image, the period is repeated over the whole level, and every distinct
tile is JPEG-encoded once and written many times, pre-encoded.

The file is a plain tiled TIFF that both tifffile (our ``tifffile`` backend) and
OpenSlide (its ``generic-tiff`` format) read:

- one page per level, level 0 first, reduced levels marked ``subfiletype=1`` (OpenSlide
  wants pages, not SubIFDs);
- JPEG tiles in YCbCr with 2×2 chroma subsampling (``PhotometricInterpretation=YCbCr``,
  the standard for JPEG-in-TIFF that libtiff, OpenSlide and tifffile decode);
- the pixel size in ``XResolution``/``YResolution`` with ``ResolutionUnit=CENTIMETER``
  (pixels per cm = 10 000 / mpp) and, again, as ``"mpp"`` in a JSON ImageDescription on
  level 0 together with the source and the crop.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["make_slide"]

log = logging.getLogger(__name__)

#: the pyramid stops at the first level whose width and height fit in this many pixels
SMALLEST_LEVEL = 1024
#: at most this many source pixels (per side) go into the period image
MAX_SOURCE_CROP = 4096
#: what the file says made it
GENERATOR = "napari-histo-ai make-slide"


def make_slide(
    out: str | os.PathLike[str],
    *,
    width: int = 100_000,
    height: int = 80_000,
    source: str | os.PathLike[str],
    tile_size: int = 256,
    quality: int = 80,
    mpp: float | None = None,
) -> Path:
    """Write a large pyramidal JPEG-tiled BigTIFF by tiling real pixels of a slide.

    Parameters
    ----------
    out : str or Path
        The TIFF to write; its folder must exist. Written to a temporary file in the
        same folder and renamed at the end, so ``out`` is never left half-written.
    width, height : int, keyword-only
        Level-0 size in pixels (at least ``tile_size`` each).
    source : str or Path, keyword-only
        A real slide (anything :func:`napari_histo_ai.io.open_image` reads, RGB or
        grayscale). Up to 4096 × 4096 pixels from the centre of its level 0, cropped
        to a multiple of ``tile_size``, are mirrored into a seamless (2h, 2w) period
        image that repeats over the slide.
    tile_size : int, keyword-only
        TIFF tile edge in pixels, a multiple of 16.
    quality : int, keyword-only
        JPEG quality, 1 (smallest) to 100 (best).
    mpp : float, optional, keyword-only
        Level-0 pixel size to record, micrometres per pixel. Default: the source's;
        when neither is known the file records none.

    Returns
    -------
    Path
        ``out``. Level ``k`` is the periodic mosaic downsampled by ``2**k`` (2×2 area
        averages, repeated), shape ``(height >> k, width >> k, 3)``; levels are added
        until both sides fit in 1024 pixels.

    Raises
    ------
    ValueError
        An argument is out of range (the message names it and the range).
    ImageReadError
        The source cannot be read, or is too small for one tile.
    """
    import numpy as np
    import tifffile

    from ..errors import ImageReadError

    out = Path(out).expanduser()
    _validate(out, width=width, height=height, tile_size=tile_size, quality=quality, mpp=mpp)
    source = Path(source).expanduser()
    crop, region, source_mpp, source_objective = _read_source(source, tile_size)
    if mpp is None:
        mpp = source_mpp
    period = _mirror(crop)
    del crop

    shapes = _level_shapes(height, width)
    description: dict[str, Any] = {
        "generator": GENERATOR,
        "mpp": mpp,
        "source": str(source),
        "source_region": region,  # [row, column, height, width] of the source level 0
        "tile_size": tile_size,
        "quality": quality,
    }
    if source_objective is not None and (mpp is None or mpp == source_mpp):
        description["objective_power"] = source_objective
    if mpp is None:
        log.info("%s has no mpp and none was given; %s records no pixel size", source, out)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as writer:
            for k, shape in enumerate(shapes):
                if k > 0:
                    period = _halve(period)
                options: dict[str, Any] = {}
                if mpp is not None:
                    ppcm = (1e4 / (mpp * height / shape[0]), 1e4 / (mpp * width / shape[1]))
                    options = {"resolution": (ppcm[1], ppcm[0]), "resolutionunit": "CENTIMETER"}
                writer.write(
                    _encoded_tiles(period, shape, tile_size, quality),
                    shape=(*shape, 3),
                    dtype=np.uint8,
                    tile=(tile_size, tile_size),
                    compression="jpeg",
                    photometric="rgb",
                    subsampling=(2, 2),
                    subfiletype=1 if k else 0,
                    description=json.dumps(description) if k == 0 else None,
                    software=GENERATOR if k == 0 else None,
                    metadata=None,
                    **options,
                )
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not out.stat().st_size:  # pragma: no cover - defensive
        raise ImageReadError(out, "was written empty", "check the free disk space")
    return out


def _validate(
    out: Path, *, width: int, height: int, tile_size: int, quality: int, mpp: float | None
) -> None:
    """Refuse arguments out of range, naming the value and the expected range."""
    if not isinstance(tile_size, int) or tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size {tile_size!r} is invalid: expected a multiple of 16 ≥ 16")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < tile_size:
            raise ValueError(
                f"{name} {value!r} is too small: expected an integer ≥ tile_size ({tile_size})"
            )
    if width >= 2**31 or height >= 2**31:
        raise ValueError(f"{width}x{height} is too large: expected sides below 2**31 pixels")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality {quality!r} is out of range: expected an integer 1-100")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(
            f"mpp {mpp!r} is invalid: expected micrometres per pixel > 0 (0.25 at 40x, 0.5 at 20x)"
        )
    if not out.parent.is_dir():
        raise ValueError(f"{out}: the folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise ValueError(f"{out} is a folder: expected the path of a .tif file to write")


def _read_source(
    source: Path, tile_size: int
) -> tuple[np.ndarray, list[int], float | None, float | None]:
    """Centre crop (h, w, 3) uint8 of the source level 0, sides multiples of ``tile_size``.

    Returns the crop, its [row, column, height, width] in the source, and the source's
    mpp (mean of rows and columns) and objective power.
    """
    import numpy as np

    from ..errors import ImageReadError
    from . import open_image

    pyramid = open_image(source)
    try:
        level = pyramid.levels[0]
        axes = pyramid.axes
        if axes not in ("YXS", "YX") or (axes == "YXS" and level.shape[2] not in (1, 3, 4)):
            raise ImageReadError(
                source,
                f"has axes {axes!r} and shape {level.shape}",
                "expected a 2D RGB or grayscale slide as the source",
            )
        h0, w0 = int(level.shape[0]), int(level.shape[1])
        h = min(h0, MAX_SOURCE_CROP) // tile_size * tile_size
        w = min(w0, MAX_SOURCE_CROP) // tile_size * tile_size
        if h == 0 or w == 0:
            raise ImageReadError(
                source,
                f"level 0 is {w0}x{h0} pixels, smaller than one {tile_size}px tile",
                "use a larger source slide or a smaller tile_size",
            )
        y, x = (h0 - h) // 2, (w0 - w) // 2
        crop = np.asarray(level[y : y + h, x : x + w])
        mpp = None if pyramid.mpp is None else float(sum(pyramid.mpp) / 2)
        objective = pyramid.objective_power
    finally:
        pyramid.close()
    if crop.dtype != np.uint8:
        raise ImageReadError(source, f"has {crop.dtype} pixels", "expected an 8-bit slide")
    if crop.ndim == 2:
        crop = crop[..., None]
    if crop.shape[2] == 1:
        crop = np.repeat(crop, 3, axis=2)
    crop = np.ascontiguousarray(crop[..., :3])
    return crop, [y, x, h, w], mpp, objective


def _mirror(crop: np.ndarray) -> np.ndarray:
    """The (2h, 2w, 3) period ``[[A, A⇆], [A⇅, A⇆⇅]]``: repeated, it has no seams."""
    import numpy as np

    top = np.concatenate([crop, crop[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def _halve(period: np.ndarray) -> np.ndarray:
    """The period of the mosaic downsampled by 2 (2×2 area average, rounded).

    An odd side is first doubled (two periods), so the halved image is still exactly
    one period of the halved mosaic.
    """
    import numpy as np

    reps = (1 + period.shape[0] % 2, 1 + period.shape[1] % 2, 1)
    if reps != (1, 1, 1):
        period = np.tile(period, reps)
    total = period[0::2, 0::2].astype(np.uint16)
    total += period[1::2, 0::2]
    total += period[0::2, 1::2]
    total += period[1::2, 1::2]
    total += 2  # round half up
    total >>= 2
    return total.astype(np.uint8)


def _level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) per level: halved (floor) until both fit in SMALLEST_LEVEL."""
    shapes = [(height, width)]
    while max(shapes[-1]) > SMALLEST_LEVEL and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
    return shapes


def _encoded_tiles(
    period: np.ndarray, shape: tuple[int, int], tile_size: int, quality: int
) -> Iterator[bytes]:
    """JPEG bytes of every tile of the level in row-major order, each distinct tile once.

    Tile (r, c) of the level shows the periodic mosaic at rows ``r*T …`` and columns
    ``c*T …``; its content depends only on those offsets modulo the period, which key
    the cache. Tiles reaching past the level edge hold the mosaic's continuation.
    """
    import imagecodecs
    import numpy as np

    ph, pw = period.shape[:2]
    rows_per_level = math.ceil(shape[0] / tile_size)
    cols_per_level = math.ceil(shape[1] / tile_size)
    steps = np.arange(tile_size)
    cache: dict[tuple[int, int], bytes] = {}
    for r in range(rows_per_level):
        oy = r * tile_size % ph
        for c in range(cols_per_level):
            key = (oy, c * tile_size % pw)
            if key not in cache:
                tile = period.take((oy + steps) % ph, axis=0).take((key[1] + steps) % pw, axis=1)
                cache[key] = bytes(
                    imagecodecs.jpeg_encode(
                        tile,
                        level=quality,
                        colorspace="RGB",
                        outcolorspace="YCBCR",
                        subsampling=(2, 2),
                    )
                )
            yield cache[key]
