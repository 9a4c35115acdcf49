"""structlog set-up: one event per line; JSON for services (journald), key=value on a terminal.

Progress: an event logged with `progress="loading model …"` (the steps of start-up) is one step of
something long. A terminal shows it as that sentence alone, prefixed with the worker it comes from
(`worker 0: loading model …`), so that start-up reads as what it is doing; JSON keeps the event
and its fields as they are, without the sentence.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
PROGRESS = "progress"


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for this process. `json=None` picks JSON unless stderr is a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _drop_progress if json else _progress_sentence,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line: atomic on a pipe shared by processes
        cache_logger_on_first_use=False,
    )


def _progress_sentence(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    sentence = event_dict.pop(PROGRESS, None)
    if sentence is None:
        return event_dict
    source = f"worker {event_dict['worker_id']}: " if "worker_id" in event_dict else ""
    return {"timestamp": event_dict.get("timestamp"), "level": event_dict.get("level"), "event": source + sentence}


def _drop_progress(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.pop(PROGRESS, None)
    return event_dict


def set_log_level(level: str) -> None:
    """Change the level of a running process (admin API, SIGHUP) without losing the renderer."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
