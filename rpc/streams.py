"""Streamed results, the handler's side: a generator function's items sent under a window.

A registered generator function streams: the handler sends a stream start, then
one item message per value the generator yields, then the end (see "Streams" in
docs/protocol.md). It sends an item only while the stream's window is open
(:class:`~rpc.protocol.StreamWindow`: fewer than STREAM_WINDOW items, and under
STREAM_WINDOW_BYTES, not yet credited by the client), so a generator runs at
most a window ahead of its consumer; with the window shut it waits on its pipe
for the credit the router forwards. A cancel (the client closed the stream or
went away) closes the generator, so its ``finally`` blocks run, and ends the
stream: the handler lives on and takes the next call.

An ``async def`` generator streams the same way: each item is awaited on the
handler's own event loop (the one async functions run on), and closing the
stream closes it there (``aclose``), so its ``finally`` blocks run too.

Only names registered with a generator function stream (:func:`stream_names`);
the handler reports them in its hello, so the router never lends a socket for
them (see :mod:`rpc.lease`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import TYPE_CHECKING, Any

from . import handler, protocol
from .errors import MessageTooLarge, ProtocolError, SerializationError
from .registry import Registry

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = ["stream_names", "execute"]


def stream_names(registry: Registry) -> frozenset[str]:
    """The names whose function is a generator function (seen through functools.wraps)."""
    names = set()
    for name in registry:
        function = registry.get(name)
        try:
            unwrapped = inspect.unwrap(function) if function is not None else None
            if inspect.isgeneratorfunction(unwrapped) or inspect.isasyncgenfunction(unwrapped):
                names.add(name)
        except ValueError:  # a wrapper chain that loops
            continue
    return frozenset(names)


def execute(
    registry: Registry,
    frame: bytes | bytearray,
    settings: handler.HandlerSettings,
    note_method: Callable[[str], None] | None,
    streams: frozenset[str],
    conn: Connection,
    pipe: handler.PipeReader,
) -> bytes | None:
    """Run the call in ``frame``: the response to send, or None when it was streamed on ``conn``.

    Raises EOFError (the generator closed) if the supervisor closes the pipe mid-stream.
    """
    if protocol.stream_control(frame):
        return None  # a credit or close the router forwarded before it saw a stream end: stale
    try:
        request = protocol.decode_request(frame)
    except ProtocolError:
        return handler.execute(registry, frame, settings, note_method)  # answers the protocol error
    if request.method not in streams or request.id is None:
        return handler.execute_request(registry, request, settings, note_method)
    function = registry.get(request.method)
    assert function is not None
    if note_method is not None:
        note_method(request.method)
    try:
        result = function(*request.args, **request.kwargs)
    except BaseException as exc:  # a bad argument list, or a wrapper that raised
        return protocol.encode_error(request.id, handler._error_info("remote_error", exc, settings.tracebacks))
    if inspect.isasyncgen(result):
        result = _driven(result)
    elif not inspect.isgenerator(result):  # a wrapper that did not return the generator: a plain answer
        return _plain_answer(request, result, settings)
    conn.send_bytes(protocol.encode_stream_start(request.id))
    conn.send_bytes(_run(result, request, settings, conn, pipe))
    return None


def _run(
    generator: Generator[Any, Any, Any], request: protocol.Request, settings: handler.HandlerSettings, conn: Connection, pipe: handler.PipeReader
) -> bytes:
    """Send the generator's items under the window; the end message to send after them."""
    assert request.id is not None
    request_id, method = request.id, request.method
    window = protocol.StreamWindow()
    finished = False
    try:
        while True:
            # What the router sent meanwhile (credits, a close); with the window shut, wait for it.
            while (message := pipe.read() if not window.open() else pipe.read_ready()) is not None:
                if _closes(message, window, request_id):
                    return protocol.encode_stream_end(request_id)  # (closed in finally; the client is not listening)
            try:
                item = next(generator)
            except StopIteration:
                finished = True
                return protocol.encode_stream_end(request_id)
            except BaseException as exc:  # the caller gets every failure, at this point of its iteration
                finished = True
                return protocol.encode_stream_end(request_id, handler._error_info("remote_error", exc, settings.tracebacks))
            try:
                frame = protocol.encode_stream_item(request_id, item, method)
            except SerializationError as exc:
                return protocol.encode_stream_end(request_id, handler._error_info(exc.code, exc, False))
            except BaseException as exc:  # a user type's encoder raised SystemExit or KeyboardInterrupt
                error = SerializationError(f"cannot encode an item of {protocol.quote(method)}: {protocol.brief(exc)}")
                return protocol.encode_stream_end(request_id, handler._error_info(error.code, error, False))
            if len(frame) > settings.max_message_bytes:
                too_large = MessageTooLarge(
                    f"an item of {method!r} is {len(frame)} bytes, over the limit of {settings.max_message_bytes} bytes"
                )
                return protocol.encode_stream_end(request_id, handler._error_info(too_large.code, too_large, False))
            conn.send_bytes(frame)
            window.sent(len(frame))
    finally:
        if not finished:
            try:
                generator.close()  # its finally blocks run now
            except BaseException:  # noqa: S110 - what its finally raised: the stream ends anyway
                pass


def _driven(agen: AsyncGenerator[Any, Any]) -> Generator[Any, None, None]:
    """An async generator as a generator: each item awaited on the handler's loop; closing
    this one (or an error) closes the async generator there, so its ``finally`` runs."""
    try:
        while True:
            try:
                item = handler.run_coroutine(_next_item(agen))
            except StopAsyncIteration:
                return
            yield item
    finally:
        handler.run_coroutine(agen.aclose())


async def _next_item(agen: AsyncGenerator[Any, Any]) -> Any:
    return await agen.__anext__()


def _closes(message: Any, window: protocol.StreamWindow, request_id: int) -> bool:
    """Take a message the router forwarded during a stream: True for a close (a cancel)."""
    if not protocol.stream_control(message):
        return False  # (a RECALL for a lease that ended: nothing to do)
    fields = protocol.decode_value(message)
    if fields[1] != request_id:
        return False  # for a stream that has ended, sent before the router saw its end
    if fields[0] == protocol.CANCEL:
        return True
    if fields[0] == protocol.CREDIT:
        window.credit(fields[2])
    return False


def _plain_answer(request: protocol.Request, result: Any, settings: handler.HandlerSettings) -> bytes:
    try:
        reply = protocol.encode_response(request.id, result, request.method)
    except SerializationError as exc:
        return protocol.encode_error(request.id, handler._error_info(exc.code, exc, False))
    if len(reply) > settings.max_message_bytes:
        error = MessageTooLarge(f"the result of {request.method!r} is {len(reply)} bytes, over the limit")
        return protocol.encode_error(request.id, handler._error_info(error.code, error, False))
    return reply
