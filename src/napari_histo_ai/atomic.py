"""Writes that never leave a half-written file behind: a temporary file beside the
target, flushed and fsynced, then renamed over it (``os.replace`` is atomic on POSIX and
Windows). A crash or an exception leaves the previous file untouched."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def json_default(value: Any) -> Any:
    """`json.dump` fallback for numpy scalars and arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", *, fsync: bool = True, **kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``.

    ``fsync=False`` skips the flush to disk (still atomic against exceptions and a
    killed process, not against power loss): for progress files rewritten every batch.

    Examples
    --------
    >>> with atomic_open(tmp / "points.csv") as fh:  # doctest: +SKIP
    ...     fh.write("x,y,class\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(
    path: str | Path, data: Any, *, indent: int | None = 2, fsync: bool = True
) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8") as fh:
        json.dump(data, fh, indent=indent, default=json_default)
    return Path(path)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp_path)`` write a file (e.g. a library's ``save``), then rename it.

    For writers that want a file name rather than a handle (nibabel, tifffile). The
    temporary name keeps ``path``'s suffixes so format sniffing by extension works.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
