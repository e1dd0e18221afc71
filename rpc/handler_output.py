"""A handler process's own output, routed into its structured log.

With JSON logs, whatever a registered function prints, logs with the standard
``logging`` module or warns with ``warnings`` becomes one log event per line,
carrying the handler's pid and the method running, so the log stays one JSON
object per line:

- ``print`` to ``sys.stderr`` or ``sys.stdout``: a ``handler_output`` event per
  line (``stream``, ``line``), at level ``warning`` for stderr and ``info`` for
  stdout, whatever the log level, as the raw output was always shown;
- ``logging`` records: an event named by the message, with ``logger`` and the
  record's level (and ``exception`` text), when the function's code has not
  configured logging itself (the root logger has no handler);
- ``warnings``: a ``python_warning`` event (``category``, ``message``, ``file``, ``lineno``).

Writes to file descriptor 2 itself (C extensions, ``faulthandler`` crash reports,
``os.write(2, ...)``) cannot be structured and stay raw.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import warnings
from typing import Any, TextIO

from .logs import Logger

__all__ = ["OutputRouter"]

# A "line" without a newline is cut here, so a function that never ends its
# line cannot grow the buffer without bound.
MAX_LINE_CHARS = 64 * 1024


class OutputRouter:
    """Routes this process's stdout, stderr, logging and warnings to a structured logger."""

    def __init__(self, log: Logger, raw_log: Logger) -> None:
        """``log`` filters by level; ``raw_log`` takes every level (printed output has none)."""
        self.log = log
        self.raw_log = raw_log
        self.method: str | None = None  # the method running now; a handler runs one at a time
        self._writers: list[_LineWriter] = []

    def note_method(self, name: str) -> None:
        """The handler is about to run ``name``: what it prints or logs now names it."""
        self.method = name

    def install_streams(self) -> None:
        """Replace ``sys.stdout``/``sys.stderr`` and the warnings hook (before importing user code)."""
        sys.stdout = self._writer("stdout", "info", sys.stdout)
        sys.stderr = self._writer("stderr", "warning", sys.stderr)
        warnings.showwarning = self._show_warning

    def install_logging(self) -> None:
        """Forward ``logging`` records, unless the user's code configured logging already."""
        root = logging.getLogger()
        if not root.handlers:
            root.addHandler(_ForwardHandler(self))

    def close(self) -> None:
        """Emit what is left of unfinished lines."""
        for writer in self._writers:
            writer.finish()

    def _writer(self, name: str, level: str, original: TextIO) -> _LineWriter:
        writer = _LineWriter(self, name, level, original)
        self._writers.append(writer)
        return writer

    def _show_warning(
        self, message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
    ) -> None:
        self.log.warning(
            "python_warning",
            category=category.__name__,
            message=str(message),
            file=filename,
            lineno=lineno,
            method=self.method,
        )


class _LineWriter(io.TextIOBase):
    """A text stream that logs each complete line it is given."""

    def __init__(self, router: OutputRouter, name: str, level: str, original: TextIO) -> None:
        super().__init__()
        self._router = router
        self._name = name
        self._emit = getattr(router.raw_log, level)
        self._original = original
        self._pending = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # What asks for the descriptor (faulthandler, subprocess) writes raw to it.
        return self._original.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            if len(self._pending) > MAX_LINE_CHARS:
                lines.append(self._pending)
                self._pending = ""
            for line in lines:
                self._emit("handler_output", stream=self._name, line=line, method=self._router.method)
        return len(text)

    def finish(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, ""
            if pending:
                self._emit("handler_output", stream=self._name, line=pending, method=self._router.method)


class _ForwardHandler(logging.Handler):
    """A ``logging`` handler that turns each record into one structured event."""

    def __init__(self, router: OutputRouter) -> None:
        super().__init__()
        self._router = router

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "method": self._router.method}
            if record.exc_info:
                fields["exception"] = logging.Formatter().formatException(record.exc_info)
            _method_for(self._router.log, record.levelno)(record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def _method_for(log: Logger, levelno: int) -> Any:
    for floor, name in ((logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"), (logging.INFO, "info")):
        if levelno >= floor:
            return getattr(log, name)
    return log.debug
