"""Logging: the one place rpc's structlog output is set up.

rpc builds its own logger rather than configuring structlog globally, so an
application that embeds a server keeps its own structlog settings. Output is
human-readable lines on a terminal and JSON lines otherwise.

Logging never takes a process down: a line that cannot be written (a closed
terminal, a pipe whose reader went away, a full disk, a closed file) is dropped
and counted, and the count is logged as ``log_lines_dropped`` as soon as a line
can be written again, and at shutdown (:func:`report_dropped`).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import weakref
from typing import Any, TextIO

import structlog

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "make_logger",
    "open_log_file",
    "resolve_format",
    "dropped_lines",
    "report_dropped",
    "Logger",
]

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Logger = Any  # a structlog bound logger; structlog's own typing is looser than mypy likes


def open_log_file(path: str) -> TextIO:
    """A log file opened for appending, one line per write.

    Unbuffered below the text layer, like ``sys.stderr``: a write that fails (a full
    disk) loses that line only, instead of leaving it to fail again at every later
    flush and when the file is closed.
    """
    return io.TextIOWrapper(open(path, "ab", buffering=0), encoding="utf-8", write_through=True)


def resolve_format(fmt: str, stream: TextIO | None = None) -> str:
    """``console`` or ``json``: what ``fmt`` means for ``stream`` (default stderr)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        return "console" if _isatty(sys.stderr if stream is None else stream) else "json"
    return fmt


def make_logger(level: str = "info", fmt: str = "auto", stream: TextIO | None = None, **context: Any) -> Logger:
    """A logger writing to ``stream`` (default stderr) at ``level`` and above.

    ``fmt`` is ``console``, ``json``, or ``auto`` (console on a terminal, else JSON).
    Writing never raises: failed lines are dropped and counted (see the module docstring).
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    out = sys.stderr if stream is None else stream
    fmt = resolve_format(fmt, out)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
    else:
        renderer = structlog.processors.JSONRenderer()
    sink = _SafeWriteLogger(_output_for(out))
    logger = structlog.wrap_logger(
        sink,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_pid,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
    )
    logger = logger.bind(**context) if context else logger
    sink.reporter = logger
    return logger


def dropped_lines(log: Logger) -> int:
    """How many lines this logger's output has dropped so far (all loggers sharing the stream)."""
    return _sink_of(log).output.dropped


def report_dropped(log: Logger) -> None:
    """Log ``log_lines_dropped`` if lines were dropped since the last report; never raises.

    If the output still fails, the report is dropped too: there is nowhere left to say it.
    """
    _sink_of(log).report_if_due()


# -- output that never raises -------------------------------------------------------------


class _Output:
    """One stream shared by every logger that writes to it: one lock, one count of drops."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.reporting = threading.Lock()  # one report of drops at a time
        self.dropped = 0
        self.reported = 0
        self.error = ""  # the last write error, for the report

    def write_line(self, line: str, count: bool = True) -> bool:
        """Write and flush one line (one write, so processes sharing the stream never interleave)."""
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
                return True
            except (OSError, ValueError) as exc:  # ValueError: a closed file, or an unencodable line
                if count:
                    self.dropped += 1
                    self.error = f"{type(exc).__name__}: {exc}"
                return False


_outputs: weakref.WeakKeyDictionary[Any, _Output] = weakref.WeakKeyDictionary()
_outputs_lock = threading.Lock()


def _output_for(stream: TextIO) -> _Output:
    with _outputs_lock:
        try:
            output = _outputs.get(stream)
            if output is None:
                output = _outputs[stream] = _Output(stream)
            return output
        except TypeError:  # a stream that takes no weak reference: its own output
            return _Output(stream)


class _SafeWriteLogger:
    """structlog's WriteLogger, but a failed write is counted, not raised."""

    def __init__(self, output: _Output) -> None:
        self.output = output
        self.reporter: Logger = None  # the bound logger that reports drops
        self._report = threading.local()  # set while this thread writes a report

    def msg(self, message: str) -> None:
        if getattr(self._report, "writing", False):
            self._report.written = self.output.write_line(message, count=False)
        elif self.output.write_line(message) and self.output.dropped > self.output.reported:
            self.report_if_due()  # the stream works again: say what was lost

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def report_if_due(self) -> None:
        """Log how many lines were dropped since the last report that got through."""
        output = self.output
        if self.reporter is None or not output.reporting.acquire(blocking=False):
            return
        try:
            count = output.dropped - output.reported
            if count <= 0:
                return
            self._report.writing, self._report.written = True, False
            try:
                self.reporter.warning("log_lines_dropped", count=count, error=output.error)
            except Exception:  # noqa: S110 - reporting must never raise either
                pass
            finally:
                self._report.writing = False
            if self._report.written:
                output.reported += count
        finally:
            output.reporting.release()


def _sink_of(log: Logger) -> _SafeWriteLogger:
    sink = getattr(log, "_logger", None)
    if not isinstance(sink, _SafeWriteLogger):
        raise TypeError("not a logger made by rpc.logs.make_logger")
    return sink


def _add_pid(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Every line says which process it is about: the emitting one unless it names another."""
    event.setdefault("pid", os.getpid())
    return event


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
