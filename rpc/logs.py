"""Logging: the one place rpc's structlog output is set up.

rpc builds its own logger rather than configuring structlog globally, so an
application that embeds a server keeps its own structlog settings. Output is
human-readable lines on a terminal and JSON lines otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "make_logger", "open_log_file", "Logger"]

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Logger = Any  # a structlog bound logger; structlog's own typing is looser than mypy likes


def open_log_file(path: str) -> TextIO:
    """A log file opened for appending, one line per write."""
    return open(path, "a", buffering=1, encoding="utf-8")


def make_logger(level: str = "info", fmt: str = "auto", stream: TextIO | None = None, **context: Any) -> Logger:
    """A logger writing to ``stream`` (default stderr) at ``level`` and above.

    ``fmt`` is ``console``, ``json``, or ``auto`` (console on a terminal, else JSON).
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    out = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "console" if _isatty(out) else "json"
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
    else:
        renderer = structlog.processors.JSONRenderer()
    logger = structlog.wrap_logger(
        # One write per line, so lines of the supervisor and handlers never interleave.
        structlog.WriteLogger(out),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_pid,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
    )
    return logger.bind(**context) if context else logger


def _add_pid(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Every line says which process it is about: the emitting one unless it names another."""
    event.setdefault("pid", os.getpid())
    return event


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
