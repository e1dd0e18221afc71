"""Logging: the one place rpc's structlog output is set up.

rpc builds its own logger rather than configuring structlog globally, so an
application that embeds a server keeps its own structlog settings. Output is
human-readable lines on a terminal and JSON lines otherwise.

Logging never takes a process down: a line that cannot be written (a closed
terminal, a pipe whose reader went away, a full disk, a closed file) is dropped
and counted, and the count is logged as ``log_lines_dropped`` as soon as a line
can be written again, and at shutdown (:func:`report_dropped`).

Lines stay bounded and whole: a text field longer than :data:`MAX_FIELD_CHARS` is
cut (with a marker saying how much), a line logged from a signal handler while its
thread is writing one follows that line instead of deadlocking or splitting it, and
a warning that can repeat without limit can be throttled (:class:`Throttle`).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "make_logger",
    "open_log_file",
    "resolve_format",
    "dropped_lines",
    "report_dropped",
    "Logger",
    "MAX_FIELD_CHARS",
    "cut_text",
    "Throttle",
]

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Logger = Any  # a structlog bound logger; structlog's own typing is looser than mypy likes

# The most characters a text field of a log event keeps: a 20 MiB message is not a log line.
MAX_FIELD_CHARS = 64 * 1024
_MARKER_ROOM = 40  # characters kept free for the marker, so a cut text stays within the limit


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
            _cut_long_texts,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
    )
    logger = logger.bind(**context) if context else logger
    sink.reporter = logger
    return logger


def cut_text(text: str, limit: int = MAX_FIELD_CHARS, more: int = 0) -> str:
    """``text`` in at most ``limit`` characters: its start and a marker saying how many were cut.

    ``more`` counts characters left out before (the rest of a line already thrown away).
    A text that fits, with nothing left out, is returned unchanged.
    """
    if len(text) <= limit and more == 0:
        return text
    keep = max(0, min(len(text), limit - _MARKER_ROOM))
    return f"{text[:keep]}... [{len(text) - keep + more} characters cut]"


class Throttle:
    """One warning that may repeat without limit, logged at most once per ``interval`` seconds.

    The first occurrence is logged at once with ``count=1``; later ones are counted, and
    a summary (the fields of the last one, and ``count``: how many since the previous
    line) is logged when the interval has passed, by the next occurrence or by a timer,
    so a burst that stops is still reported. :meth:`flush` logs what is counted now.
    Thread-safe; ``log`` may differ per call (the summary uses the last one).
    """

    def __init__(self, event: str, interval: float = 1.0, level: str = "warning") -> None:
        self.event = event
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        self._next = 0.0  # the monotonic time when a line may be logged again
        self._count = 0  # occurrences not logged yet
        self._last: tuple[Logger, dict[str, Any]] | None = None
        self._timer: threading.Timer | None = None

    def __call__(self, log: Logger, **fields: Any) -> None:
        with self._lock:
            self._count += 1
            self._last = (log, fields)
            now = time.monotonic()
            due = now >= self._next
            if due:
                self._next = now + self.interval
            elif self._timer is None:
                self._start_timer(self._next - now)
        if due:
            self.flush()

    def flush(self) -> None:
        """Log the occurrences counted so far, if any (a server calls this as it shuts down)."""
        with self._lock:
            count, last, timer = self._count, self._last, self._timer
            self._count, self._timer = 0, None
        if timer is not None:
            timer.cancel()
        if count and last is not None:
            log, fields = last
            getattr(log, self.level)(self.event, **fields, count=count)

    def _start_timer(self, delay: float) -> None:
        timer = threading.Timer(max(delay, 0.0), self._on_timer)
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:  # no thread to be had: the next occurrence or flush() reports
            return
        self._timer = timer

    def _on_timer(self) -> None:
        with self._lock:
            self._next = time.monotonic() + self.interval
        self.flush()


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
    """One stream shared by every logger that writes to it: one lock, one count of drops.

    The lock is reentrant because a signal handler runs on the thread it interrupts,
    maybe in the middle of a write: a line it logs then is held back and written
    right after the interrupted one, never inside it (and never waits for a lock
    its own thread holds, which would hang that thread for good).
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.RLock()
        self.reporting = threading.Lock()  # one report of drops at a time
        self.dropped = 0
        self.reported = 0
        self.error = ""  # the last write error, for the report
        self.writing = False  # the lock's holder is in the middle of a line
        self.held_back: deque[tuple[str, bool]] = deque()  # lines a signal handler logged meanwhile

    def write_line(self, line: str, count: bool = True) -> bool:
        """Write and flush one line (one write, so processes sharing the stream never interleave)."""
        with self.lock:
            if self.writing:  # only this thread can be here: a signal handler interrupted it
                self.held_back.append((line, count))
                return True
            written = self._write(line, count)
            while self.held_back:
                self._write(*self.held_back.popleft())
            return written

    def _write(self, line: str, count: bool) -> bool:
        self.writing = True
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
            return True
        except (OSError, ValueError) as exc:  # ValueError: a closed file, or an unencodable line
            if count:
                self.dropped += 1
                self.error = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self.writing = False


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


def _add_pid(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Every line says which process it is about: the emitting one unless it names another."""
    event.setdefault("pid", os.getpid())
    return event


def _cut_long_texts(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Every text field (the event name too) within MAX_FIELD_CHARS, so no line is huge."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            event[key] = cut_text(value)
    return event


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
