"""The asyncio client: the sync client's surface, every call a coroutine, any number in flight.

``await rpc.aio.connect(...)`` (or ``async with rpc.aio.connect(...) as client``)
opens one authenticated connection; calls register a future under a fresh id,
write their request and await it, and one asyncio protocol reads the replies
(framed by :class:`rpc.framing.FrameDecoder`) and hands each to the future with
its id. No thread at all: the authkey handshake is rpc.handshake's
:class:`~rpc.handshake.ClientHandshake`, fed by the same protocol, so it never
blocks the loop; the hello, requests and replies go through rpc.protocol with the
sync client's limits. Errors and timeouts are the sync client's: a call that
times out forgets its id, so a late reply is dropped and the connection stays
usable; a connection that ends fails every call in flight with
:class:`ConnectionClosed` (never sent again), and the next call opens a new
connection in its place (unless ``reconnect=False``), once for all the calls
waiting for it. Given several addresses, it is connected to one at a time and
moves through them as the sync client does: a server's go-away leaves its
connection (its calls and streams finish there, then it is closed) and new calls
go to a new one; a call that did not run there is made again on the next
connection within its deadline (see :mod:`rpc.client`). A call whose task is cancelled sends the server a cancel
message: a queued call never runs, and a running one's handler is stopped. A
call of a generator function returns a :class:`Stream`, an async iterator over
its items (``async for row in await client.rows(...)``), crediting the server as
they are taken.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Coroutine, Generator, Sequence
from typing import Any, cast

from . import framing, protocol, transport
from .client import (
    _BACKOFF_FIRST_SECONDS,
    _BACKOFF_MAX_SECONDS,
    HELLO,
    _check_authkey,
    _check_timeout,
    _connect_error,
    _exception,
    _Moves,
    _next_move,
    _not_moved,
    _NotRun,
    _public,
    _tls_context,
    check_addresses,
    server_hello,
)
from .errors import (
    AuthenticationError,
    CallTimeout,
    ConnectionClosed,
    ConnectTimeout,
    MessageTooLarge,
    ProtocolError,
    RPCError,
    ServerBusy,
    TLSError,
    TransportError,
)
from .handshake import ClientHandshake
from .registry import MethodInfo
from .tls import TLSOption, client_error, server_hostname, speaks_tls, tls_server_error

__all__ = ["Client", "Stream", "connect"]

_DEFAULT: Any = object()
_MAX_ATTRIBUTES = 256  # remote methods looked up by attribute are kept on the client up to this many attributes


class _Method:
    """A remote name: call it for a coroutine, or take an attribute for a name inside its namespace."""

    __slots__ = ("_client", "_name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self._client, f"{self._name}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        client = self._client
        return client._call(self._name, args, kwargs, client._timeout)

    def __repr__(self) -> str:
        return f"<remote method {self._name!r}>"


class _Connection(asyncio.BufferedProtocol):
    """One connection: the handshake, then requests out and replies to their calls' futures.

    Apart from the client so that the protocol's method names (``get_buffer``, ...)
    never shadow remote names on the client, and so that a new connection can
    take the place of a closed one.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        authkey: bytes | None,
        where: str,
        max_message_bytes: int,
        client: Client,
        address: transport.Address,
    ) -> None:
        self._loop = loop
        self._where = where
        self._client = client  # where calls go that cannot go here, or did not run here
        self.address = address
        self._handshake: ClientHandshake | None = ClientHandshake(authkey, where)
        self._decoder = framing.FrameDecoder(self._handshake.limit)
        self._max_message_bytes = max_message_bytes
        self._transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[protocol.Hello] = loop.create_future()  # the server's, once authenticated
        self._lost: asyncio.Future[None] = loop.create_future()  # done once the transport is closed
        self._pending: dict[int, asyncio.Future[Any]] = {}  # calls in flight by request id
        self._streams: dict[int, Stream] = {}  # open streams by request id
        self._ids = itertools.count(1)
        # Frames written together at the end of this turn of the loop: a gather of many
        # calls goes out in a few writes, not one system call each.
        self._outbox: list[bytes] = []
        self._writable = asyncio.Event()  # cleared while the transport's write buffer is full
        self._writable.set()
        self.heard = False  # whether the server has sent anything at all
        self.server_limit = protocol.DEFAULT_MAX_MESSAGE_BYTES
        self.failure: RPCError | None = None  # set once the connection is unusable
        self.leaving = False  # no new call goes here (the server is going away, or was busy)
        self._last_id: int | None = None  # from the server's go-away: a request with a higher id never runs

    # -- asyncio's side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are not its subclasses)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.heard = True
        decoder = self._decoder
        try:
            frame = decoder.buffer_updated(nbytes)
            if frame is not None:
                self._received(frame)
            while self.failure is None and (frame := decoder.next()) is not None:
                self._received(frame)
        except MessageTooLarge as exc:
            if self._handshake is not None:
                size = getattr(exc, "size", "too many")
                if speaks_tls(size) and self._transport is not None and self._transport.get_extra_info("ssl_object") is None:
                    self._fail(tls_server_error(self._where))
                    return
                exc = MessageTooLarge(
                    f"{self._where} sent a handshake message announcing {size} bytes; at most "
                    f"{decoder.max_bytes} are accepted there: is an rpc server listening there?"
                )
            self._fail(exc)
        except RPCError as exc:  # a malformed frame or reply, a failed handshake: the stream is lost
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close: the server will send nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        error: RPCError
        if isinstance(exc, ssl.SSLError):  # an alert from the server (a client certificate it requires, say)
            error = client_error(exc, self._where)
        elif self._handshake is not None:
            error = ConnectionClosed(f"the server closed the connection during the handshake: {exc or 'EOF'}")
        elif exc is None:
            error = ConnectionClosed("the server closed the connection")
        else:
            error = ConnectionClosed(f"connection lost: {exc}")
        self._fail(error)
        self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- frames in ---------------------------------------------------------------------

    def _received(self, frame: framing.Frame) -> None:
        if self._handshake is not None:
            self._handshake_step(bytes(frame))
            return
        response = protocol.decode_answer(memoryview(frame))
        if type(response) is protocol.StreamMessage:
            self._stream_message(response, len(frame))
            return
        if type(response) is protocol.GoAway:
            # The server drains: no new call here; those in flight finish, then the connection ends.
            self._last_id = -1 if response.last_id is None else response.last_id
            self.leave()
            return
        assert type(response) is protocol.Response
        if response.id is None:
            # A connection-level error from the server, which closes the connection.
            self._fail(_exception(response.error) if response.error else ConnectionClosed("bad response"))
            return
        future = self._pending.pop(response.id, None)
        if future is None or future.done():
            return  # its caller timed out or was cancelled, or the server is confused
        if response.error is not None:
            future.set_exception(_exception(response.error))
        else:
            future.set_result(response.result)

    def _stream_message(self, message: protocol.StreamMessage, size: int) -> None:
        request_id = message.id
        if message.kind == protocol.STREAM_ITEM:
            stream = self._streams.get(request_id)
            if stream is not None:  # (else closed here: dropped)
                stream._items.append((message.value, size))
                stream._wake()
        elif message.kind == protocol.STREAM_START:
            future = self._pending.pop(request_id, None)
            if future is None or future.done():  # its caller gave up: nobody will read it
                self._send(protocol.encode_cancel(request_id), False)
                return
            stream = Stream(self, request_id)
            self._streams[request_id] = stream
            future.set_result(stream)
        else:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._ended = True
                stream._error = None if message.error is None else _exception(message.error)
                stream._wake()
                self._end_if_left()

    def close_stream(self, stream: Stream) -> None:
        """Stop ``stream`` here and close its generator on the server."""
        if self._streams.pop(stream._id, None) is not None and self.failure is None:
            self._send(protocol.encode_cancel(stream._id), False)
            self._end_if_left()

    def leave(self) -> None:
        """No new call here (the server is going away, or busy); the connection ends once idle."""
        self.leaving = True
        self._end_if_left()

    def _end_if_left(self) -> None:
        if self.leaving and self.failure is None and not self._pending and not self._streams:
            self._fail(ConnectionClosed("the connection was left: the server went away, or was busy"), graceful=True)

    def _handshake_step(self, frame: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None
        try:
            replies = handshake.receive(frame)
        except AuthenticationError:
            if handshake.farewell is not None:
                self._write(handshake.farewell)
            raise
        for reply in replies:
            self._write(reply)
        if not handshake.done:
            self._decoder.max_bytes = handshake.limit
            return
        assert handshake.hello is not None
        hello = server_hello(handshake.hello)
        self._handshake = None
        self._decoder.max_bytes = self._max_message_bytes
        limit = hello.info.get("max_message_bytes")
        self.server_limit = limit if type(limit) is int and limit > 0 else protocol.DEFAULT_MAX_MESSAGE_BYTES
        self._write(protocol.encode_hello(HELLO))
        if not self.hello.done():  # (cancelled if connect() gave up meanwhile)
            self.hello.set_result(hello)

    # -- frames out --------------------------------------------------------------------

    def _write(self, payload: bytes) -> None:
        """Write one frame now, after any still in the outbox."""
        assert self._transport is not None
        if self._outbox:
            self._flush()
        self._transport.write(framing.frame_header(len(payload)) + payload)

    def _send(self, payload: bytes, alone: bool) -> None:
        """Send one frame: at once if it is ``alone`` in flight, else with the others of this turn."""
        if not self._outbox:
            if alone:  # one call at a time: no reason to wait
                assert self._transport is not None
                self._transport.write(framing.frame_header(len(payload)) + payload)
                return
            self._loop.call_soon(self._flush)
        self._outbox.append(framing.frame_header(len(payload)) + payload)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox and self.failure is None:
            assert self._transport is not None
            self._transport.write(b"".join(outbox))

    async def _room(self, name: str, timeout: float | None, deadline: float | None) -> None:
        """Wait for room in the write buffer (the server is slow to read) until the call's deadline."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._writable.wait()
        except TimeoutError:
            raise CallTimeout(
                f"call {name!r} could not be sent within its timeout of {timeout:g} s (the server is not reading)"
            ) from None
        if self.failure is not None:
            raise self.failure

    # -- calls -------------------------------------------------------------------------

    async def call(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        deadline: float | None = None,
        remaining: float | None = None,
        again: bool = False,
    ) -> Any:
        """Make a call here. ``remaining`` (with ``deadline``): what is left of its timeout, for a
        call that started elsewhere. ``again``: made by Client._retry, which the errors of a call
        that did not run go back to; else such a call is made again from here."""
        if type(name) is not str:
            raise TypeError(f"method name must be a string, not {type(name).__name__}")
        loop = self._loop
        if remaining is None:
            deadline = None if timeout is None else loop.time() + timeout
        if self.failure is not None or self.leaving:  # (ended or left since the call was made): not sent
            if again:
                raise _NotRun(f"call {name!r} was not sent: {self.failure or 'the connection was left'}")
            return await self._client._retry(name, args, kwargs, timeout, deadline)
        request_id = next(self._ids)
        frame = protocol.encode_request(request_id, name, args, kwargs, timeout if remaining is None else remaining)
        protocol.check_size(frame, self.server_limit)
        if not self._writable.is_set():
            await self._room(name, timeout, deadline)
        future = loop.create_future()
        # Registered before sending, so the reply cannot arrive before it is expected.
        self._pending[request_id] = future
        self._send(frame, len(self._pending) == 1)
        timer = None if deadline is None else loop.call_at(deadline, self._expire, request_id, name, timeout)
        try:
            result = await future
            if type(result) is Stream:
                result._name, result._timeout = name, timeout
            return result
        except asyncio.CancelledError:
            # Cancelled by its caller: forget it, so its reply is dropped when it comes, and
            # stop it on the server (a queued call never runs; a running one's handler is stopped).
            if self._pending.pop(request_id, None) is not None and self.failure is None:
                self._send(protocol.encode_cancel(request_id), False)
            raise
        except (ServerBusy, _NotRun) as exc:  # it did not run: it may be made again elsewhere
            if again:
                raise
            error: RPCError = exc
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(request_id, None)
            if self.leaving:
                self._end_if_left()
        return await self._client._retry(name, args, kwargs, timeout, deadline, error, self)

    def _expire(self, request_id: int, name: str, timeout: float | None) -> None:
        future = self._pending.pop(request_id, None)  # a late reply finds no call: dropped
        if future is not None and not future.done():
            future.set_exception(CallTimeout(f"call {name!r} got no answer within its timeout of {timeout:g} s"))

    async def notify(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if type(name) is not str:
            raise TypeError(f"method name must be a string, not {type(name).__name__}")
        if self.failure is not None:
            raise self.failure
        frame = protocol.encode_notification(name, args, kwargs)
        protocol.check_size(frame, self.server_limit)
        if not self._writable.is_set():
            await self._room(name, None, None)
        self._send(frame, not self._pending)

    # -- the end -----------------------------------------------------------------------

    def _fail(self, error: RPCError, graceful: bool = False) -> None:
        """Make the connection unusable, fail every call in flight with ``error``, close it.

        ``graceful``: send what the outbox holds first (notifications the caller
        awaited), if the socket takes it at once; what the server is not reading is dropped.
        """
        if self.failure is None:
            self.failure = error if isinstance(error, TransportError) else ConnectionClosed(str(error))
        pending, self._pending = self._pending, {}
        last_id = self._last_id
        for request_id, future in pending.items():
            if not future.done():
                if last_id is not None and request_id > last_id and not self._client._closed:
                    # Read by the server only after its go-away, if at all: it did not run.
                    future.set_exception(_NotRun(f"the call did not run: the server went away before reading it ({error})"))
                else:
                    future.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._ended, stream._error = True, error
            stream._wake()
        if not self.hello.done():
            self.hello.set_exception(error)
        self._writable.set()  # calls waiting for room see the failure
        transport, outbox, self._outbox = self._transport, self._outbox, []
        if transport is not None and not transport.is_closing():
            if graceful and outbox:
                transport.write(b"".join(outbox))
            if graceful and not transport.get_write_buffer_size():
                transport.close()
            else:
                transport.abort()

    async def close(self) -> None:
        self._fail(ConnectionClosed("the client was closed"), graceful=True)
        if self._transport is not None:
            await asyncio.shield(self._lost)  # connection_lost always follows close() and abort()


class Stream:
    """The items of a remote generator as it yields them: an async iterator.

    Returned by awaiting a call of a generator function: ``async for row in await
    client.rows("big.csv")``. As :class:`rpc.Stream`: the server's generator runs
    at most a window ahead of what is taken from here; the call's ``timeout``
    bounds the wait for each item (:class:`CallTimeout`, and the stream is
    closed); the generator's exception is raised where the iteration reaches it;
    :meth:`aclose` (or the end of an ``async with`` block, or garbage collection)
    closes the generator on the server, so its ``finally`` blocks run.
    """

    def __init__(self, conn: _Connection, request_id: int) -> None:
        self._conn = conn
        self._id = request_id
        self._name = "?"
        self._timeout: float | None = None
        self._items: deque[tuple[Any, int]] = deque()  # (value, size of its message), at most a window
        self._ended = False
        self._error: RPCError | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._consumed = 0  # taken and not yet credited
        self._consumed_bytes = 0

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            if self._ended:
                self._closed = True
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._waiter = self._conn._loop.create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._waiter
            except TimeoutError:
                self.close()
                raise CallTimeout(f"stream {self._name!r} sent no item within its timeout of {self._timeout:g} s") from None
            finally:
                self._waiter = None
        value, size = self._items.popleft()
        self._consumed += 1
        self._consumed_bytes += size
        # Credit by half windows: few messages, and the server never waits on a full one.
        if not self._ended and (
            self._consumed >= protocol.STREAM_WINDOW // 2 or self._consumed_bytes >= protocol.STREAM_WINDOW_BYTES // 2
        ):
            if self._conn.failure is None:
                self._conn._send(protocol.encode_credit(self._id, self._consumed), False)
            self._consumed = self._consumed_bytes = 0
        return value

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop the stream: the generator on the server is closed (its ``finally`` blocks run)."""
        if not self._closed:
            self._closed = True
            self._items.clear()
            self._conn.close_stream(self)
            self._wake()

    async def aclose(self) -> None:
        """:meth:`close`, awaitable (as async generators have it)."""
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed or (self._ended and not self._items)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._closed or self._ended:
            return
        try:  # garbage collection may run in any thread: close on the loop's
            self._conn._loop.call_soon_threadsafe(self.close)
        except RuntimeError:  # noqa: S110 - the loop is closed: so is the connection
            pass

    def __repr__(self) -> str:
        return f"<rpc.aio.Stream {self._name!r} id={self._id} {'closed' if self.closed else 'open'}>"


class Client:
    """A connection to an rpc server, for asyncio. Made by :func:`connect`.

    The sync :class:`rpc.Client`'s surface with every call a coroutine:
    ``await client.add(2, 3)``, ``await client.math.hypot(3, 4)``,
    ``await client.call("add", 2, 3, timeout=1)``, ``notify``, ``methods``,
    ``ping``, ``close``. Any number of calls may be in flight at once (from
    ``asyncio.gather`` or many tasks); each gets its own reply. A client belongs
    to the event loop it connected on. Given a list of addresses, it moves through
    them as :class:`rpc.Client` does.
    """

    def __init__(
        self,
        address: transport.Address | Sequence[transport.Address],
        authkey: bytes | None = None,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        reconnect: bool = True,
        tls: TLSOption = None,
    ) -> None:
        self._authkey = _check_authkey(authkey)
        self._timeout = _check_timeout(timeout)
        if _check_timeout(connect_timeout, "connect_timeout") is None:
            raise ValueError("connect_timeout must be a number of seconds > 0 and at most a year, not None")
        if type(reconnect) is not bool:
            raise TypeError(f"reconnect must be True or False, not {reconnect!r}")
        self._connect_timeout = connect_timeout
        #: Every address the client may connect to (one, unless it was given a list).
        self.addresses = check_addresses(address)
        self._next = random.randrange(len(self.addresses))  # the address tried next
        self._tls = _tls_context(tls, self.addresses)
        self._max_message_bytes = max_message_bytes
        self._reconnect = reconnect
        self._conn: _Connection | None = None
        self._left: list[_Connection] = []  # left connections whose calls were still in flight
        self._closed = False  # by the user: final
        self._made_again = 0  # see calls_made_again
        self._reopening: asyncio.Future[None] | None = None  # the reconnect under way, awaited by every call
        self._failures: list[tuple[transport.Address, RPCError]] = []  # of the last round of connects
        self.server_info: dict[str, Any] = {}

    @property
    def address(self) -> transport.Address:
        """The address of the server that new calls go to."""
        return self.addresses[0] if self._conn is None else self._conn.address

    @property
    def calls_made_again(self) -> int:
        """How many times, so far, a call that did not run where it was sent (a go-away,
        ``ServerShuttingDown``, ``ServerBusy`` with other addresses) was moved on to be made
        again on another connection (counted as it moves, even if no connection then opens)."""
        return self._made_again

    async def _open(self) -> Client:
        """Connect and authenticate within ``connect_timeout``, without blocking the loop."""
        if self._conn is not None:
            raise RuntimeError("this client is connected already: await rpc.aio.connect(...) once")
        self._conn, self.server_info = await self._connect_next(rounds=False)
        return self

    async def _connect_next(self, rounds: bool) -> tuple[_Connection, dict[str, Any]]:
        """A connection to the next address that takes one, trying each in turn, within
        connect_timeout; ``rounds``: go round again (with backoff) while all fail, as
        the sync client does (see rpc.client._Fleet._open)."""
        loop = asyncio.get_running_loop()
        addresses = self.addresses
        count = len(addresses)
        limit = loop.time() + self._connect_timeout
        wait = _BACKOFF_FIRST_SECONDS
        self._failures = []
        while True:
            tried: list[tuple[transport.Address, RPCError]] = []
            for untried in range(count, 0, -1):
                left = limit - loop.time()
                if left <= 0:
                    break
                address = addresses[self._next]
                self._next = (self._next + 1) % count
                share = left / untried  # so one address that never answers cannot use up the others' time
                try:
                    return await self._connect(address, loop.time() + share, self._connect_timeout if count == 1 else round(share, 3))
                except (ConnectionClosed, ConnectTimeout, AuthenticationError, ProtocolError, TLSError) as exc:
                    if count == 1 and not isinstance(exc, ConnectionClosed):
                        raise  # (nothing listening yet is worth waiting for; the rest are not)
                    tried.append((address, exc))
            self._failures = tried or self._failures
            pause = wait * random.uniform(0.5, 1.0)
            lasting = any(not isinstance(exc, (ConnectionClosed, ConnectTimeout)) for _, exc in self._failures)
            if not rounds or lasting or loop.time() + pause >= limit:
                raise _connect_error(self._failures, self._connect_timeout)
            await asyncio.sleep(pause)
            wait = min(wait * 2, _BACKOFF_MAX_SECONDS)

    async def _connect(self, address: transport.Address, deadline: float, timeout: float) -> tuple[_Connection, dict[str, Any]]:
        """A connection authenticated by ``deadline`` (the loop's time), and the server's hello
        (``timeout``: the seconds the errors name)."""
        loop = asyncio.get_running_loop()
        where = transport.format_address(address)
        sock = socket.socket(transport._family(address), socket.SOCK_STREAM)
        sock.setblocking(False)
        conn: _Connection | None = None
        connected = False
        context = self._tls
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    raise ConnectionClosed(f"cannot connect: {transport._connect_failure(address, exc)}") from None
                transport.set_stream_options(sock)
                conn = _Connection(loop, self._authkey, where, self._max_message_bytes, self, address)
                opened = conn  # (a name mypy knows is not None, for the factory)
                if context is not None:
                    await self._start_tls(loop, opened, sock, context, deadline, address)
                elif transport.is_unix(address):
                    await loop.create_unix_connection(lambda: opened, sock=sock)
                else:
                    await loop.create_connection(lambda: opened, sock=sock)
                hello = await conn.hello
                connected = True
        except TimeoutError:
            if conn is None:
                raise ConnectTimeout(f"connecting to {where} took longer than {timeout:g} s") from None
            if conn._transport is None and context is not None:
                raise ConnectTimeout(
                    f"connected to {where}, but it did not complete the TLS handshake within {timeout:g} s: "
                    "is an rpc server with TLS listening there?"
                ) from None
            if not conn.heard:
                raise ConnectTimeout(
                    f"connected to {where}, but nothing answered within {timeout:g} s: is an rpc server listening there? "
                    f"({transport.TLS_HINT})"
                ) from None
            raise ConnectTimeout(f"{where} did not complete the handshake within {timeout:g} s") from None
        finally:
            if not connected:  # failed, timed out or cancelled: nothing may stay open
                if conn is not None and conn._transport is not None:
                    conn._transport.abort()
                else:
                    sock.close()
        assert conn is not None
        return conn, hello.info

    async def _start_tls(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        sock: socket.socket,
        context: ssl.SSLContext,
        deadline: float,
        address: transport.Address,
    ) -> None:
        """The connection over TLS (asyncio's): the TLS handshake, under the connect deadline."""
        where = conn._where
        hostname = server_hostname(address, context) or ""  # ("": no name to send or check)
        within = max(deadline - loop.time(), 0.001) + 1.0  # (the deadline ends it first, with its own error)
        try:
            if transport.is_unix(address):
                await loop.create_unix_connection(
                    lambda: conn, sock=sock, ssl=context, server_hostname=hostname, ssl_handshake_timeout=within
                )
            else:
                await loop.create_connection(
                    lambda: conn, sock=sock, ssl=context, server_hostname=hostname, ssl_handshake_timeout=within
                )
        except ssl.SSLError as exc:
            raise client_error(exc, where) from None
        except OSError as exc:
            raise ConnectionClosed(f"{where} closed the connection during the TLS handshake: {exc}") from None

    async def _reopen(self) -> None:
        """Connect again (the next address) within ``connect_timeout``, going round with backoff
        while nothing listens yet; the connect error if it cannot."""
        try:
            conn, info = await self._connect_next(rounds=True)
            if self._closed:  # by the user, meanwhile
                await conn.close()
                raise ConnectionClosed("the client was closed")
            old = self._conn
            if old is not None and old.failure is None:
                self._left = [left for left in self._left if left.failure is None] + [old]  # it finishes its calls
            self._conn, self.server_info = conn, info
        finally:
            self._reopening = None

    async def _ready(self, deadline: float | None = None) -> _Connection:
        """The open connection; a new one in place of one that ended or was left, if the client
        reconnects (waited for until ``deadline``, the loop's time, at the latest).

        Calls made while a reconnect is under way wait for that one attempt and share its outcome.
        """
        conn = self._conn
        if conn is None:
            raise ConnectionClosed("not connected: make clients with `await rpc.aio.connect(...)`")
        if conn.failure is None and not conn.leaving:
            return conn
        if self._closed:
            raise ConnectionClosed("the client was closed")
        if not self._reconnect:
            raise conn.failure or ConnectionClosed("the server is going away, and this client does not reconnect")
        reopening = self._reopening
        if reopening is None:
            self._reopening = reopening = asyncio.ensure_future(self._reopen())
            # (retrieved here, so an attempt whose callers all gave up logs no "never retrieved")
            reopening.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(reopening)
        except asyncio.CancelledError:
            if reopening.cancelled() and self._closed:  # stopped by close(), not this caller cancelled
                raise ConnectionClosed("the client was closed") from None
            raise
        except TimeoutError:  # the call's deadline passed first (the attempt goes on for others)
            raise _connect_error(self._failures, self._connect_timeout) if self._failures else ConnectTimeout(
                "no connection could be opened within the call's timeout"
            ) from None
        assert self._conn is not None
        return self._conn  # (if it ended already, its call says so: one attempt per call)

    async def _call_reopened(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return await self._retry(name, args, kwargs, timeout, deadline)

    async def _retry(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        deadline: float | None,
        error: RPCError | None = None,
        conn: _Connection | None = None,
    ) -> Any:
        """Make a call on the connection new calls go to: one whose connection ended or was left
        before it was sent, or one that did not run on ``conn`` (``error``), made again as the
        sync client does (rpc.client._next_move says whether); else its last error."""
        moves = _Moves(args, kwargs, deadline)
        loop = asyncio.get_running_loop()
        while True:
            if error is not None:
                move = None if self._closed or not self._reconnect else _next_move(error, moves, len(self.addresses), self._connect_timeout, loop.time())
                if move is None:
                    raise _public(error)
                self._made_again += 1
                if move == "leave" and conn is not None:
                    conn.leave()
            if error is None:
                conn = await self._ready(deadline)
            else:
                try:
                    conn = await self._ready(moves.until)
                except RPCError as exc:
                    raise _not_moved(error, exc) from None
            remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
            try:
                return await conn.call(name, args, kwargs, timeout, deadline, remaining, again=True)
            except (ServerBusy, _NotRun) as exc:
                error = exc

    # -- public API --------------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call in seconds (None: none); checked when set."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = _check_timeout(value)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        method = _Method(self, name)
        if len(self.__dict__) < _MAX_ATTRIBUTES:
            self.__dict__[name] = method  # found at once next time, without a failed lookup first
        return method

    def call(self, name: str, /, *args: Any, timeout: float | None = _DEFAULT, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Call ``name`` with ``args`` and ``kwargs`` (a coroutine); ``timeout`` overrides the client's default."""
        return self._call(name, args, kwargs, self._timeout if timeout is _DEFAULT else _check_timeout(timeout))

    async def notify(self, name: str, /, *args: Any, **kwargs: Any) -> None:
        """Run ``name`` on the server without waiting for, or getting, any answer."""
        await (await self._ready()).notify(name, args, kwargs)

    async def methods(self) -> list[MethodInfo]:
        """The methods the server exposes: name, signature text, first docstring line."""
        return [MethodInfo(**entry) for entry in await self.call(protocol.METHODS)]

    async def ping(self) -> float:
        """Round-trip time in seconds of a message the server answers without a handler."""
        start = time.perf_counter()
        await self.call(protocol.PING)
        return time.perf_counter() - start

    @property
    def closed(self) -> bool:
        """Whether no connection is open: after :meth:`close`, or once the connection ended
        (until the next call opens a new one, unless made with ``reconnect=False``)."""
        return self._conn is None or self._conn.failure is not None

    async def close(self) -> None:
        """Close the connection for good; calls still waiting fail with :class:`ConnectionClosed`."""
        self._closed = True
        if self._reopening is not None:
            self._reopening.cancel()
        left, self._left = self._left, []
        for conn in [*left, *([self._conn] if self._conn is not None else [])]:
            await conn.close()

    aclose = close

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<rpc.aio.Client {transport.format_address(self.address)} {state}>"

    # -- calls -------------------------------------------------------------------------

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Coroutine[Any, Any, Any]:
        conn = self._conn
        if conn is None or conn.failure is not None or conn.leaving:
            return self._call_reopened(name, args, kwargs, timeout)  # not connected, or the connection ended or was left
        return conn.call(name, args, kwargs, timeout)  # the connection's coroutine itself: no extra layer


class _Connecting:
    """What :func:`connect` returns: await it for the client, or use it as an async context manager."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client._open().__await__()

    async def __aenter__(self) -> Client:
        return await self._client._open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()


def connect(
    address: transport.Address | Sequence[transport.Address],
    authkey: bytes | None = None,
    timeout: float | None = None,
    *,
    connect_timeout: float = 10.0,
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    reconnect: bool = True,
    tls: TLSOption = None,
) -> _Connecting:
    """Connect and authenticate to the server at ``address``, from a running event loop.

    ``client = await rpc.aio.connect(...)``, or ``async with rpc.aio.connect(...) as
    client:`` (closed at the end of the block). The arguments are those of
    :func:`rpc.connect`, checked here, before anything is awaited: ``address`` is
    ``(host, port)``, ``"HOST:PORT"`` or a Unix socket path, or a list of them
    (several servers: see :func:`rpc.connect`); ``authkey`` the
    server's key as bytes; ``timeout`` each call's default deadline in seconds
    (None: no deadline); ``connect_timeout`` bounds connecting and the whole handshake;
    ``reconnect`` (default True): a call made after the connection ended first opens a
    new one, within ``connect_timeout``; a call that did not run is made again on the
    next connection, within its timeout, as :func:`rpc.connect` says; ``tls`` connects
    with TLS, as for :func:`rpc.connect` (True, a CA file's path, or an :class:`ssl.SSLContext`).
    """
    return _Connecting(
        Client(
            address,
            authkey=authkey,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_message_bytes=max_message_bytes,
            reconnect=reconnect,
            tls=tls,
        )
    )
