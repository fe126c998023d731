"""The GUI edge: run a widget action and turn any error into one readable message."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from ..errors import HistoAIError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: status-line style of an error message
ERROR_STYLE = "color: #ff6b6b;"


def guarded(action: Callable[[], T], show_error: Callable[[str], None]) -> T | None:
    """``action()``, or ``None`` after ``show_error(message)`` if it raised.

    Our errors (`HistoAIError`) are shown as they are: they name the value, what was
    expected and what to do. Anything else is logged with its traceback and shown as
    "unexpected error: <type>: <text>", never as a traceback dialog.
    """
    try:
        return action()
    except HistoAIError as exc:
        show_error(str(exc))
    except Exception as exc:
        log.exception("napari-histo-ai: unexpected error")
        show_error(f"unexpected error: {type(exc).__name__}: {exc}")
    return None
