"""Startup failures end the process with one error log line saying what failed and where, and a
non-zero exit status: a journal or a terminal shows the cause, not a traceback (which is logged at
debug level, for `--log-level debug`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from paged.shared.logging import get_logger

log = get_logger("startup")

STARTUP_FAILURE_STATUS = 1


class StartupError(Exception):
    """A reason the daemon cannot start; the message names what and where, in one line."""


@contextlib.contextmanager
def exit_on_startup_failure(component: str, *errors: type[BaseException], **context: object) -> Iterator[None]:
    """Within: any of `errors` is a startup failure of `component`, said with its message, which
    those errors word for operators. Without `errors`, any exception is one, and its type is said
    too (a worker's model load can fail in torch or a driver in ways nobody worded)."""
    try:
        yield
    except errors or (Exception,) as exc:  # type: ignore[misc]
        log.debug("startup_traceback", component=component, exc_info=True)
        worded = bool(errors) or isinstance(exc, StartupError)
        log.error("startup_failed", component=component, error=str(exc) if worded else f"{type(exc).__name__}: {exc}", **context)
        raise SystemExit(STARTUP_FAILURE_STATUS) from None


def check_model_directory(model: str | None) -> None:
    """Fail before any worker starts when --model names no directory (None: the built-in model)."""
    if model is not None and not Path(model).is_dir():
        raise StartupError(f"model directory {model} not found")
