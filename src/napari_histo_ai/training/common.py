"""What every training module shares: atomic files, the weights + record pair, and
driving a training generator to its end.

Each default model is written the same way: a float32 safetensors file (batch-norm
step counters dropped, written through a temporary file and ``os.replace``), then a JSON
record beside it (``<weights>.json``) that carries the weights' SHA-256, so a reader can
tell which record belongs to which file. A crash leaves the previous pair intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_write",
    "print_progress",
    "run_to_end",
    "save_weights",
    "save_weights_and_record",
    "sha256",
]

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in ``path``'s folder, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        Path(tmp).chmod(0o644)  # mkstemp creates 0600; a packaged file must be readable
        Path(tmp).replace(path)  # os.replace: atomic on one file system
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """float32 state dict (batch-norm counters dropped) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {
        key: value.detach().cpu().float().contiguous()
        for key, value in model.state_dict().items()
        if value.is_floating_point()
    }
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights_and_record(
    model: torch.nn.Module, path: Path, metadata: dict[str, str], record: dict[str, Any]
) -> None:
    """Write the weights, then ``record`` (with ``weights_sha256`` added) beside them.

    Parameters
    ----------
    model : torch.nn.Module
    path : Path
        The ``.safetensors`` file; the record goes to ``path.with_suffix(".json")``.
    metadata : dict of str to str
        Stored in the safetensors header.
    record : dict
        JSON-able; updated in place with the weights' hash and size.
    """
    save_weights(model, path, metadata)
    record["weights_sha256"] = sha256(path)
    record["weights_bytes"] = path.stat().st_size
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text, "utf-8"))


def run_to_end(
    generator: Generator[Any, None, T], progress: Callable[[Any], None] | None = None
) -> T:
    """Drive a training generator to its end; ``progress`` gets every record it yields.

    Returns
    -------
    The generator's return value (a training module's JSON record).
    """
    while True:
        try:
            record = next(generator)
        except StopIteration as stop:
            result: T = stop.value
            return result
        if progress is not None:
            progress(record)


def print_progress(record: Mapping[str, float], *fields: str) -> None:
    """One progress line on standard error, e.g. ``epoch 3  step 120/400  loss 0.1234``.

    ``step`` is shown against ``steps`` when the record has it; whole numbers are shown
    without decimals, others with four.
    """
    parts = []
    for name in fields:
        value = float(record[name])
        if name == "step" and "steps" in record:
            parts.append(f"step {value:.0f}/{float(record['steps']):.0f}")
        elif value.is_integer():
            parts.append(f"{name} {value:.0f}")
        else:
            parts.append(f"{name} {value:.4f}")
    print("  ".join(parts), file=sys.stderr, flush=True)
