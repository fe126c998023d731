"""Where an image's annotation store lives when nobody says: one rule for the CLI and
the widget.

The store sits **beside the image**, as ``<image file name>.annotations.sqlite`` (for
``slide.svs``: ``slide.svs.annotations.sqlite``; for an OME-Zarr folder ``a.zarr``:
``a.zarr.annotations.sqlite`` next to the folder), so it travels with the image and is
found again when the image is reopened. The whole file name is kept (extension
included) so ``a.svs`` and ``a.tif`` in one folder never share a store.

When the image's folder is not writable (a read-only share, a CD, a packaged sample),
the store goes to ``~/.napari-histo-ai/annotations/<hash>.sqlite`` instead, ``<hash>``
being the first 16 hex digits of the SHA-256 of the image's absolute path (the same
image path always finds the same store). ``HISTO_AI_HOME`` replaces
``~/.napari-histo-ai``. A store that already exists beside the image is always used,
writable folder or not.

The image's label pyramid (painted masks) sits beside its store, as
``<image file name>.labels.zarr`` (`default_labels_path`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = [
    "LABELS_SUFFIX",
    "STORE_SUFFIX",
    "default_labels_path",
    "default_store_path",
    "user_store_dir",
]

#: what is appended to the image's file name
STORE_SUFFIX = ".annotations.sqlite"
#: the label pyramid beside a store: ``<image name>.labels.zarr``
LABELS_SUFFIX = ".labels.zarr"


def user_store_dir() -> Path:
    """The fallback folder for stores of images in read-only folders."""
    home = os.environ.get("HISTO_AI_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".napari-histo-ai"
    return base / "annotations"


def default_store_path(image_path: str | os.PathLike[str]) -> Path:
    """The annotation store of ``image_path`` when none is given (see the module doc).

    Parameters
    ----------
    image_path : str or Path
        The image file or folder (OME-Zarr), as opened.

    Returns
    -------
    Path
        ``<folder>/<name>.annotations.sqlite`` when it exists or the folder is
        writable, else ``~/.napari-histo-ai/annotations/<hash>.sqlite``.
    """
    image = Path(image_path).expanduser().resolve()
    beside = image.with_name(image.name + STORE_SUFFIX)
    if beside.exists() or os.access(image.parent, os.W_OK | os.X_OK):
        return beside
    digest = hashlib.sha256(str(image).encode("utf-8")).hexdigest()[:16]
    return user_store_dir() / f"{digest}.sqlite"


def default_labels_path(store_path: str | os.PathLike[str]) -> Path:
    """The label pyramid that goes with a store: ``<image name>.labels.zarr`` beside it
    (``slide.svs.annotations.sqlite`` → ``slide.svs.labels.zarr``; a store of another
    name ``x.sqlite`` → ``x.labels.zarr``)."""
    store = Path(store_path)
    name = store.name
    stem = name[: -len(STORE_SUFFIX)] if name.endswith(STORE_SUFFIX) else store.stem
    return store.with_name(stem + LABELS_SUFFIX)
