"""The handler process: import the registry, then run one call at a time.

A handler reads request frames from its pipe, decodes them, calls the function and
writes back the encoded response. It knows nothing of sockets or clients, so the
same loop serves whatever hands it frames. Success and failure both travel back as
data; only the process dying is left for the supervisor to notice.
"""

from __future__ import annotations

import array
import dataclasses
import difflib
import importlib
import os
import resource
import signal
import socket
import threading
import time
import traceback
import types
from dataclasses import dataclass
from multiprocessing import parent_process
from collections import deque
from multiprocessing.connection import Connection, wait
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from . import lease, metrics, protocol, streams
from .framing import Frame, FrameDecoder
from .handler_output import OutputRouter
from .logs import Logger, make_logger, open_log_file, report_dropped, resolve_format
from .errors import MessageTooLarge, MethodNotFound, ProtocolError, RPCError, SerializationError, wire_type_name
from .protocol import ErrorInfo
from .registry import Registry, load_registry

__all__ = ["HandlerSettings", "run", "execute", "execute_request"]

# Names answered by rpc itself; user names never start with "_", so these cannot clash.
METHODS = protocol.METHODS


@dataclass(frozen=True)
class HandlerSettings:
    """What a handler process needs to know, handed over when it starts."""

    registry: str
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    tracebacks: bool = True
    log_level: str = "info"
    log_format: str = "auto"
    log_file: str | None = None
    memory_limit: int | None = None
    max_call_seconds: float | None = None
    access_log: bool = False
    send_timeout: float | None = 30.0  # for replies it writes on a lent socket
    count_lent_calls: bool = False  # post the calls it serves on lent sockets for /metrics (rpc.metrics)


def run(conn: Connection, settings: HandlerSettings, call_state: Any = None) -> None:
    """Entry point of a handler process: serve the requests that come on ``conn``.

    ``call_state`` is the shared array where it posts a call run on a lent socket (see rpc.lease).
    """
    # Ctrl-C reaches the whole process group; the supervisor decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A log reader that went away must not kill the handler (failed log lines are dropped).
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _exit_with_parent()
    stream = None
    if settings.log_file is not None:
        stream = open_log_file(settings.log_file)
        # What the functions print to stderr (and any crash report) lands in the log too.
        os.dup2(stream.fileno(), 2)
    log = make_logger(settings.log_level, settings.log_format, stream, component="rpc.handler")
    output = _route_output(settings, stream, log)
    if settings.memory_limit is not None:
        # A call that decodes or builds something huge gets MemoryError, not the OOM killer.
        resource.setrlimit(resource.RLIMIT_AS, (settings.memory_limit, settings.memory_limit))
    try:
        registry = load_registry(settings.registry)
    except BaseException as exc:  # report why, whatever the import raised
        # The supervisor reports it once, with this traceback, not once per handler.
        info = _error_info("startup_error", exc, False)
        info = dataclasses.replace(info, traceback=_import_traceback(exc))
        conn.send_bytes(protocol.encode_error(None, info))
        return
    if output is not None:
        output.install_logging()  # after the import: a module that configures logging keeps its own
    note_method = output.note_method if output is not None else None
    stream_names = streams.stream_names(registry)
    names = [protocol.METHODS, *registry]
    # The router never lends a socket for a stream (see rpc.streams); it counts calls by these
    # method names (and a call on a lent socket by its number among them: see rpc.metrics).
    conn.send_bytes(protocol.encode_hello({"pid": os.getpid(), "streams": sorted(stream_names), "methods": names}))
    log.debug("handler_ready", registry=settings.registry, methods=len(registry))
    pipe = PipeReader(conn.fileno(), settings.max_message_bytes + protocol.ENVELOPE_MARGIN)
    numbers = {name: i for i, name in enumerate(names)}
    state = lease.CallState(call_state, numbers) if call_state is not None else None
    lent_calls = lease.LentCalls(call_state) if call_state is not None else None
    if lent_calls is not None:
        lent_calls.reset()
    # Calls on lent sockets are posted to lent_calls for the router to count; these counts
    # hold only those served while it was full (the router behind), until they are sent.
    overflow = metrics.CallCounts(names)
    asked = False  # the router was asked to catch up since lent_calls filled

    def run_call(request: protocol.Request) -> bytes:
        try:
            return execute_request(registry, request, settings, note_method)
        finally:
            if output is not None:
                output.end_call()

    def lent_call(request: protocol.Request, reply: bytes, started: float) -> None:
        """A call served on a lent socket: posted for the router to count (it is asked to take
        them once half the ring waits), and logged."""
        nonlocal asked
        seconds = time.monotonic() - started
        failed = protocol.response_is_error(reply)
        assert lent_calls is not None
        waiting = lent_calls.post(numbers.get(request.method, -1), failed, seconds) if settings.count_lent_calls else 0
        if waiting >= 0:
            asked, nudge = False, waiting == lease.LentCalls.RING // 2
        else:  # full: the router is behind; count the call here and ask it, once, to catch up
            overflow.call(request.method, "error" if failed else "ok", seconds)
            asked, nudge = True, not asked
        if nudge:
            conn.send_bytes(metrics.tally_message(overflow))
            overflow.clear()
        if settings.access_log:
            outcome = "error" if failed else "ok"
            log.info("call", method=request.method, id=request.id, ms=round(seconds * 1000, 3), outcome=outcome, leased=True)

    try:
        while True:
            try:
                frame = pipe.read()
            except EOFError:
                return  # the supervisor closed the pipe: stop
            except (OSError, RPCError) as exc:
                log.error("handler_pipe_failed", error=str(exc))  # (its supervisor reports the exit)
                return
            kind = protocol.internal_kind(frame)
            if kind is None:
                if stream_names:
                    try:
                        answer = streams.execute(registry, frame, settings, note_method, stream_names, conn, pipe)
                    except (EOFError, OSError, RPCError):
                        return  # the supervisor closed the pipe mid-stream (the generator is closed): stop
                else:
                    answer = execute(registry, frame, settings, note_method)
                if output is not None:
                    output.end_call()
                if answer is not None:  # (None: it was streamed)
                    conn.send_bytes(answer)
            elif kind == protocol.LEASE:
                lent = lease.Lease.decode(frame)
                if not pipe.descriptors or state is None:
                    os._exit(1)  # no socket came with it: the router, seeing nothing started, runs the call
                sock = socket.socket(fileno=pipe.descriptors.popleft())
                end = lease.serve_lease(
                    sock, conn.fileno(), lent.frame, run_call, state, settings.max_call_seconds,
                    lent_call if settings.access_log or settings.count_lent_calls else None,
                    settings.send_timeout, stream_names,
                )
                conn.send_bytes(dataclasses.replace(end, tally=overflow.export() if overflow.calls else None).encode())
                overflow.clear()
            # a RECALL that arrives after its lease ended needs nothing
    finally:
        if output is not None:
            output.close()
        report_dropped(log)


class PipeReader:
    """Frames from the supervisor's pipe, and the descriptors that come with them (a lent socket).

    Frames come from the server, which already held them to max_message_bytes; each
    is read into the decoder's buffer (a large one straight into its own).
    """

    def __init__(self, fd: int, max_bytes: int) -> None:
        self._sock = socket.socket(fileno=os.dup(fd))
        self._frames = FrameDecoder(max_bytes)
        self._ancillary = socket.CMSG_SPACE(4 * _MAX_DESCRIPTORS)
        self.descriptors: deque[int] = deque()

    def read(self) -> Frame:
        frames = self._frames
        while (frame := frames.next()) is None:
            frame = frames.buffer_updated(self._receive(0))
            if frame is not None:
                return frame
        return frame

    def read_ready(self) -> Frame | None:
        """The next frame if it is here whole already; never waits (a stream checks between items)."""
        frames = self._frames
        while (frame := frames.next()) is None:
            try:
                count = self._receive(socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            frame = frames.buffer_updated(count)
            if frame is not None:
                return frame
        return frame

    def _receive(self, flags: int) -> int:
        count, ancillary, _flags, _ = self._sock.recvmsg_into([self._frames.get_buffer()], self._ancillary, flags)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.descriptors.extend(fds)
        if not count:
            raise EOFError("the supervisor closed the pipe")
        return count


_MAX_DESCRIPTORS = 4


def _route_output(settings: HandlerSettings, stream: TextIO | None, log: Logger) -> OutputRouter | None:
    """With JSON logs, make print, logging and warnings log events (see rpc.handler_output).

    On a console, raw output reads best as it is, so it is left alone.
    """
    if resolve_format(settings.log_format, stream) != "json":
        return None
    # Printed lines have no level, so the log level does not hide them, as before.
    raw_log = make_logger("debug", "json", stream, component="rpc.handler")
    output = OutputRouter(log, raw_log)
    output.install_streams()
    return output


def _import_traceback(exc: BaseException) -> str:
    """The traceback of a failed registry import, from the user's code on (none for rpc's own errors)."""
    cause = exc.__cause__ if isinstance(exc, RPCError) else exc  # an ImportError inside the module
    if cause is None or isinstance(cause, RPCError):
        return ""  # rpc's message says it all (no such module, no such attribute)
    exc = cause
    machinery = (os.path.dirname(__file__), os.path.dirname(importlib.__file__), "<frozen importlib")
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith(machinery)]
    if not frames:
        return ""  # the module itself was not found
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    return "".join(lines + traceback.format_exception_only(type(exc), exc))


def _exit_with_parent() -> None:
    """Exit at once if the supervisor dies, even in the middle of a call."""
    parent = parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="rpc-parent-watch", daemon=True).start()


def execute(
    registry: Registry, frame: bytes | bytearray, settings: HandlerSettings, note_method: Callable[[str], None] | None = None
) -> bytes:
    """Run the call in ``frame`` and return the encoded response, success or failure."""
    try:
        request = protocol.decode_request(frame)
    except ProtocolError as exc:
        return protocol.encode_error(_id_of(frame), _error_info(exc.code, exc, False))
    return execute_request(registry, request, settings, note_method)


def execute_request(
    registry: Registry,
    request: protocol.Request,
    settings: HandlerSettings,
    note_method: Callable[[str], None] | None = None,
) -> bytes:
    """Run a decoded call and return the encoded response, success or failure.

    ``note_method`` is told the method's name just before it runs (so what it
    prints or logs can name it).
    """
    if request.method == METHODS:
        function: Any = lambda: [vars(info) for info in registry.describe()]  # noqa: E731
    else:
        function = registry.get(request.method)
    if note_method is not None:
        note_method(request.method)
    if function is None:
        error: RPCError = MethodNotFound(_not_found(registry, request.method))
        return protocol.encode_error(request.id, _error_info(error.code, error, False))
    try:
        result = function(*request.args, **request.kwargs)
        if type(result) is types.CoroutineType:  # an async def: run it to its end here
            result = run_coroutine(result)
    except BaseException as exc:  # the caller gets every failure, even SystemExit
        return protocol.encode_error(request.id, _error_info("remote_error", exc, settings.tracebacks))
    try:
        reply = protocol.encode_response(request.id, result, request.method)
    except SerializationError as exc:
        return protocol.encode_error(request.id, _error_info(exc.code, exc, False))
    except BaseException as exc:  # a user type's encoder raised SystemExit or KeyboardInterrupt
        error = SerializationError(f"cannot encode the result of {protocol.quote(request.method)}: {protocol.brief(exc)}")
        return protocol.encode_error(request.id, _error_info(error.code, error, False))
    if len(reply) > settings.max_message_bytes:
        error = MessageTooLarge(
            f"the result of {request.method!r} is {len(reply)} bytes, over the limit of "
            f"{settings.max_message_bytes} bytes"
        )
        return protocol.encode_error(request.id, _error_info(error.code, error, False))
    return reply


_loop: Any = None  # the handler's event loop for async functions, made by the first one


def run_coroutine(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run an async function's coroutine on the handler's own event loop, to its end.

    One loop per handler process, kept across calls, so what a call leaves on it (a
    client session, a lock, a task it started) is there for the next; it runs only
    while a call does. asyncio is imported by the first async call, not before.
    """
    global _loop
    if _loop is None:
        import asyncio

        _loop = asyncio.new_event_loop()  # the policy's: a registry may install uvloop's
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(coroutine)


_NOT_USER_CODE = (__file__, os.path.join(os.path.dirname(os.__file__), "asyncio", ""))


def _not_found(registry: Registry, name: str) -> str:
    """The MethodNotFound text: the name, the closest registered names, where to list them all."""
    close = difflib.get_close_matches(name, list(registry), n=3) if len(name) <= 100 else []
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"no method named {protocol.quote(name)}{hint} (client.methods() or `rpc methods` lists them)"


def _id_of(frame: bytes | bytearray) -> int | None:
    try:
        return protocol.parse_envelope(frame).id
    except ProtocolError as exc:
        return exc.request_id


def _error_info(code: str, exc: BaseException, with_traceback: bool) -> ErrorInfo:
    """The failure as it travels; never raises, whatever the exception's str, args or traceback do."""
    cls = type(exc)
    type_name = wire_type_name(cls)
    try:
        message = exc.message if isinstance(exc, RPCError) else str(exc)
    except BaseException:
        message = f"<{cls.__name__} whose str() failed>"
    text = ""
    if with_traceback:
        try:
            # Skip this module's frames and the event loop's (an async function's): the
            # user's function is where the story starts.
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_NOT_USER_CODE):
                tb = tb.tb_next
            text = "".join(traceback.format_exception(cls, exc, tb))
        except BaseException:
            text = f"<the traceback of {cls.__name__} could not be formatted>"
    try:
        args = tuple(exc.args) if code == "remote_error" else ()
    except BaseException:
        args = ()  # an args property that raises: the message still travels
    # Texts are made valid UTF-8 and cut to size by protocol.encode_error.
    return ErrorInfo(code, type_name, message, text, args)
