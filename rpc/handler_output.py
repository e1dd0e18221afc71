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

Events from the thread that runs calls carry the ``method``; those from threads
a function started carry ``thread`` (its name) and no method, as such a thread
may outlive its call. A call's unfinished line is logged when the call returns.
A line is cut to MAX_LINE_CHARS (with a marker saying how much was left out).
``sys.stdout.buffer`` takes bytes, decoded as UTF-8 (invalid bytes become U+FFFD).
Printing from a signal handler is safe: its text follows what the interrupted
code had written, and may so land in the middle of a line it was printing (as on
a terminal), but never inside a log line, and never waits for a lock its own
thread holds.

Writes to file descriptor 2 itself (C extensions, ``faulthandler`` crash reports,
``os.write(2, ...)``) cannot be structured and stay raw.
"""

from __future__ import annotations

import codecs
import io
import logging
import sys
import threading
import warnings
from typing import Any, TextIO

from .logs import MAX_FIELD_CHARS, Logger, cut_text

__all__ = ["OutputRouter"]

# A longer line is cut (its start kept, with a marker saying how much was left
# out), and what follows is not held in memory until its newline comes.
MAX_LINE_CHARS = MAX_FIELD_CHARS


class OutputRouter:
    """Routes this process's stdout, stderr, logging and warnings to a structured logger."""

    def __init__(self, log: Logger, raw_log: Logger) -> None:
        """``log`` filters by level; ``raw_log`` takes every level (printed output has none)."""
        self.log = log
        self.raw_log = raw_log
        self.method: str | None = None  # the method running now; a handler runs one at a time
        # Calls run on the thread that made the router; other threads are ones they started.
        self.call_thread = threading.get_ident()
        self._writers: list[_LineWriter] = []

    def note_method(self, name: str) -> None:
        """The handler is about to run ``name``: what it prints or logs now names it."""
        self.method = name

    def end_call(self) -> None:
        """The call has returned: log its unfinished lines, with its method, and forget the method."""
        for writer in self._writers:
            writer.finish(calls_only=True)
        self.method = None

    def label(self, thread: str | None) -> dict[str, Any]:
        """How an event is labelled: the running method, or for another thread, its name and no method.

        A thread a function started may outlive the call, so the method running when
        it writes says nothing about it.
        """
        if thread is None:
            return {"method": self.method}
        return {"method": None, "thread": thread}

    def label_thread(self, ident: int | None, name: str | None) -> dict[str, Any]:
        """The label for the thread with id ``ident`` and ``name``."""
        return self.label(None if ident == self.call_thread else str(name))

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
            **self.label_thread(threading.get_ident(), threading.current_thread().name),
        )


class _Pending:
    """What one thread wrote to one stream and is not logged yet."""

    __slots__ = ("chunks", "size", "line", "cut", "busy", "thread")

    def __init__(self, thread: str | None) -> None:
        self.chunks: list[str] = []  # written since the last look, split into lines later
        self.size = 0  # characters in chunks (a hint: a signal handler may make it a little off)
        self.line = ""  # the start of the unfinished line, at most MAX_LINE_CHARS
        self.cut = 0  # characters of the unfinished line left out past MAX_LINE_CHARS
        self.busy = False  # its lines are being logged now
        self.thread = thread  # the thread's name, None for the thread that runs calls


class _LineWriter(io.TextIOBase):
    """A text stream that logs each complete line it is given.

    A write only appends to its thread's list of chunks; lines are split and logged
    when a newline or MAX_LINE_CHARS arrive, so many tiny writes stay cheap. A
    signal handler that prints while its thread is logging a line only appends:
    the interrupted thread logs that text too, after what was written before it.
    """

    def __init__(self, router: OutputRouter, name: str, level: str, original: TextIO) -> None:
        super().__init__()
        self._router = router
        self._name = name
        self._emit = getattr(router.raw_log, level)
        self._original = original
        self._pending: dict[int, _Pending] = {}  # by thread id
        # Taken only to log lines, never per write; reentrant for signal handlers.
        self._lock = threading.RLock()
        self.buffer = _BytesWriter(self)

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
        pending = self._pending.get(threading.get_ident())
        if pending is None:
            pending = self._pending_for_this_thread()
        pending.chunks.append(text)
        pending.size += len(text)
        if pending.size >= MAX_LINE_CHARS or "\n" in text:
            self._log_lines(pending, threading.get_ident())
        return len(text)

    def finish(self, calls_only: bool = False) -> None:
        """Log unfinished lines too: the call thread's, and unless ``calls_only``, every thread's."""
        if not self._pending:
            return  # nothing was written (the usual end of a call): no lock to take
        with self._lock:
            for ident, pending in list(self._pending.items()):
                if not calls_only or pending.thread is None:
                    self._log_lines(pending, ident, final=True)

    def _pending_for_this_thread(self) -> _Pending:
        thread = threading.current_thread()
        ident = threading.get_ident()
        pending = _Pending(None if ident == self._router.call_thread else thread.name)
        self._pending[ident] = pending
        return pending

    def _log_lines(self, pending: _Pending, ident: int, final: bool = False) -> None:
        with self._lock:
            if pending.busy:  # a signal handler interrupted this very method: text waits in chunks
                return
            pending.busy = True
            try:
                # A signal handler's writes land in the chunks meanwhile: loop until none is left.
                while pending.chunks:
                    chunks, pending.chunks = pending.chunks, []
                    pending.size = 0
                    first, *lines = "".join(chunks).split("\n")
                    self._extend(pending, first)
                    for line in lines:
                        self._end_line(pending)
                        self._extend(pending, line)
                if final and (pending.line or pending.cut):
                    self._end_line(pending)
            finally:
                pending.busy = False
            if pending.thread is not None and not (pending.line or pending.cut or pending.chunks):
                self._pending.pop(ident, None)  # threads come and go: keep only unfinished lines

    @staticmethod
    def _extend(pending: _Pending, text: str) -> None:
        """Add ``text`` to the unfinished line, keeping at most MAX_LINE_CHARS of it."""
        room = MAX_LINE_CHARS - len(pending.line)
        if room > 0:
            pending.line += text[:room]
        pending.cut += max(0, len(text) - max(room, 0))

    def _end_line(self, pending: _Pending) -> None:
        line = cut_text(pending.line, MAX_LINE_CHARS, pending.cut)
        pending.line, pending.cut = "", 0
        self._emit("handler_output", stream=self._name, line=line, **self._router.label(pending.thread))


class _BytesWriter(io.BufferedIOBase):
    """``sys.stdout.buffer``: bytes, decoded as UTF-8 (invalid bytes become U+FFFD), go to the text stream."""

    def __init__(self, text: _LineWriter) -> None:
        super().__init__()
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._text.fileno()

    def write(self, data: Any) -> int:
        data = bytes(data)  # bytes, bytearray, memoryview
        # A character split between two writes is held back by the decoder until it is whole.
        self._text.write(self._decoder.decode(data))
        return len(data)


class _ForwardHandler(logging.Handler):
    """A ``logging`` handler that turns each record into one structured event."""

    def __init__(self, router: OutputRouter) -> None:
        super().__init__()
        self._router = router

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, **self._router.label_thread(record.thread, record.threadName)}
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
