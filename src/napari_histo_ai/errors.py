"""Exception types of napari-histo-ai.

Every message names the offending value (a file, a key, a number), says what was
expected, and what the user can do about it. Widgets show them as napari
notifications; the CLI prints them as one line and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class HistoAIError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageReadError(HistoAIError):
    """A file could not be read as an image.

    Parameters
    ----------
    path : str or Path
        The file (or folder) that failed.
    problem : str
        What is wrong with it.
    hint : str, optional
        What the user can do.
    """

    def __init__(self, path: str | Path, problem: str, hint: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # picklable across processes
        return type(self), (self.path, self.problem, self.hint)


class UnsupportedFormatError(ImageReadError):
    """No backend recognises the file."""


class CorruptFileError(ImageReadError):
    """The file claims a known format but its content is damaged or truncated."""


class MissingDependencyError(HistoAIError):
    """An optional backend is needed but not installed."""

    def __init__(self, what: str, extra: str) -> None:
        self.what = what
        self.extra = extra
        super().__init__(
            f"{what} needs the optional '{extra}' extra: pip install 'napari-histo-ai[{extra}]'"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.what, self.extra)


class MetadataError(HistoAIError):
    """Metadata is missing or out of range (for example a negative mpp)."""


class ModelSpecError(HistoAIError):
    """A model description (registry entry, card, weights file) is invalid.

    Parameters
    ----------
    source : str
        Where the entry came from (a YAML file, an entry point, a weights file).
    model : str
        The model's name, or ``"?"`` when the entry has none.
    problem : str
        What is wrong, naming the field and the value.
    hint : str, optional
        What the user can do.
    """

    def __init__(self, source: str, model: str, problem: str, hint: str = "") -> None:
        self.source = str(source)
        self.model = model
        self.problem = problem
        self.hint = hint
        message = f"{self.source}: model '{model}': {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        return type(self), (self.source, self.model, self.problem, self.hint)


class ModelNotFoundError(HistoAIError):
    """No registered model has the requested name."""


class ModelInputError(HistoAIError):
    """An image does not fit what a model expects (channels, size, resolution)."""


class RunStateError(HistoAIError):
    """An output folder holds a run that cannot be resumed with these settings."""


class AnnotationError(HistoAIError):
    """An annotation file, store or mask cannot be used as it is.

    Parameters
    ----------
    path : str or Path
        The file (or store) concerned.
    problem : str
        What is wrong, naming the value (line, feature index, class, size).
    hint : str, optional
        What the user can do.
    """

    def __init__(self, path: str | Path, problem: str, hint: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        message = f"{path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)
