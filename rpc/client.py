"""The client: one authenticated connection, calls by attribute, many calls in flight.

Any number of threads may share a client. Each call registers its request id,
sends its frame, and waits; whichever waiting thread finds the socket free reads
replies and hands each to the call with its id, so concurrent callers are
pipelined on one connection. The common case, one call at a time, is the fast
path: a call that finds nothing else in flight takes the reading role as it
registers, sends its request in one write, and reads its own reply: a lock round
to start and one to finish, no condition, no other thread. After a
transport error every call in flight fails with :class:`ConnectionClosed` and the
connection is dropped, so a stale reply can never answer a later call.

A call's timeout bounds its whole wait, whatever arrives meanwhile: replies are
read by :class:`~rpc.framing.FrameReader` under the deadline, so half a frame
followed by silence, or a stream of answers to ids never asked, ends in
:class:`CallTimeout` when the deadline passes. A timeout does not break the
connection: the bytes of a frame cut off by it stay buffered for the next read,
and an answer arriving after its call gave up is dropped. Submitted calls keep
their deadlines too: the background reader wakes for the earliest one. Sending
is bounded as well: a request the server does not take in time fails with
:class:`CallTimeout`; if part of it went out, the stream is mid-message, so the
connection is closed and the other calls in flight get :class:`ConnectionClosed`.

Cancelling: ``future.cancel()`` on a submitted call, or a KeyboardInterrupt (any
exception that is not rpc's own) while a ``call`` waits, drops the call here and
sends the server a cancel message: a queued call never runs, and a running one's
handler is stopped. Its answer, if one was already on its way, is dropped.

Streams: a call of a generator function returns an :class:`Stream` (the server
answered with a stream start). Its items are read like replies, by whichever
thread reads, and queued on the stream; the window (see :mod:`rpc.protocol`)
bounds that queue, and the stream credits the server as its consumer takes them.

Reconnecting: a call made once the connection has ended first opens a new one
(:class:`_Fleet`: within connect_timeout, with backoff). With nothing in flight
nobody reads the socket, so before such a call one ``poll()`` tells whether the
server closed it meanwhile (then what came is read: late answers, the end). A
call that was in flight when the connection ended has failed and is never resent.

Several addresses (:class:`_Fleet`): the client is connected to one at a time,
from a random start, moving on to the next when a connect fails. A server that
drains says so with a go-away (see :mod:`rpc.protocol`): the connection is left
(no new call goes on it; its calls in flight finish there, its streams end there,
then it is closed) and new calls go to a new connection. A call that did not run
(answered server_shutting_down, or server_busy when there are other addresses; a
request the server had not read when it went away; one never sent whole) is made
again on the next connection within its deadline; one that may have run never is.

TLS (``tls=``): the connection's frames go through :class:`rpc.tls.ClientTLS`, read
and sent under the same deadlines; a request not sent whole by its deadline then
closes the connection even if none of it reached the socket, since once encrypted
it is part of the TLS stream.
"""

from __future__ import annotations

import concurrent.futures
import functools
import heapq
import itertools
import math
import os
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from . import __version__, framing, protocol, tls, transport
from .config import MAX_SECONDS
from .errors import (
    AuthenticationError,
    CallTimeout,
    ConfigError,
    ConnectionClosed,
    ConnectTimeout,
    ProtocolError,
    RemoteError,
    RPCError,
    ServerBusy,
    ServerShuttingDown,
    TLSError,
    TransportError,
    error_for_code,
    remote_error_class,
)
from .registry import MethodInfo
from .tls import TLSOption

__all__ = ["Client", "Stream", "connect"]

_DEFAULT: Any = object()
_CANCEL_SEND_SECONDS = 5.0  # how long a cancel message may wait for the socket
_MAX_ATTRIBUTES = 256  # remote methods looked up by attribute are kept on the client up to this many attributes
# Reconnecting: the waits between attempts start at this, double, and stop growing at
# the maximum; each is a random 50-100% of that, so clients of a restarted server spread out.
_BACKOFF_FIRST_SECONDS = 0.05
_BACKOFF_MAX_SECONDS = 1.0
_IDLE_READ_SECONDS = 0.01  # how long the check before a call waits for the rest of a frame it found
_IDLE_READ_FRAMES = 64  # the most frames that check reads (late answers) before the call goes on
# What the client says of itself after the handshake: "go_away" asks a draining server to say so.
HELLO = {"client": "rpc", "version": __version__, "go_away": True}

# An open connection: its socket, the server's hello info, and its TLS session (None without TLS).
_Link = tuple[socket.socket, dict[str, Any], "tls.ClientTLS | None"]


def _check_timeout(value: object, name: str = "timeout") -> float | None:
    """A timeout is None or a number of seconds > 0 and at most a year; anything else is refused.

    (Beyond a year, deadlines overflow what poll() and the socket timeouts accept.)
    """
    if value is None:
        return None
    if type(value) is not int and type(value) is not float:  # not bool, nor other subclasses
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if not 0 < value <= MAX_SECONDS:  # also refuses NaN and infinity
        raise ValueError(f"{name} must be a number of seconds > 0 and at most {MAX_SECONDS} (a year), or None, not {value!r}")
    seconds: float = value  # an int stays an int
    return seconds


def _check_authkey(authkey: Any) -> bytes | None:
    if authkey is None:
        return None
    if isinstance(authkey, str):
        raise ConfigError("authkey must be bytes, not str (use b'...' or .encode())")
    if not isinstance(authkey, (bytes, bytearray)):
        raise ConfigError(f"authkey must be bytes, not {type(authkey).__name__}")
    if not authkey:
        raise ConfigError("authkey must not be empty")
    return bytes(authkey)


class _NotRun(ConnectionClosed):
    """A call that did not run: its request was never sent whole, or the server had not read it
    when it went away. The client makes it again elsewhere; if it cannot, the caller gets this."""


class _Moves:
    """How a call that did not run goes on: its arguments (of a submitted call), its deadline, and
    what its moves so far allow."""

    __slots__ = ("args", "kwargs", "deadline", "until", "busy")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float | None) -> None:
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline
        self.until: float | None = None  # made again until then: its deadline, or connect_timeout from its first move
        self.busy = 0  # server_busy answers so far: after one from every address, it is the outcome


class _Pending:
    """A call waiting for its response; ``future`` is set for calls made with ``submit``."""

    __slots__ = ("id", "done", "result", "error", "future", "name", "timeout", "reads_own", "moves")

    def __init__(self, id: int, future: Future[Any] | None, name: str, timeout: float | None) -> None:
        self.id = id
        self.done = False
        self.result: Any = None
        self.error: RPCError | None = None
        self.future = future
        self.name = name
        self.timeout = timeout
        self.reads_own = False  # whether its own thread reads the replies until it is answered
        self.moves: _Moves | None = None  # of a submitted call: what it takes to make it again elsewhere

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result

    def settle_future(self) -> None:
        """Complete the future, outside any lock: it runs the caller's callbacks."""
        if self.future is not None:
            try:
                if self.error is not None:
                    self.future.set_exception(_public(self.error))
                else:
                    self.future.set_result(self.result)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled here meanwhile (while it started, or moved to another connection)

class _StreamState:
    """What a stream's consumer and the reading threads share (under the calls' lock)."""

    __slots__ = ("id", "name", "timeout", "items", "ended", "error", "closed", "consumed", "consumed_bytes")

    def __init__(self, id: int, name: str, timeout: float | None) -> None:
        self.id = id
        self.name = name
        self.timeout = timeout  # bounds the wait for each item
        self.items: deque[tuple[Any, int]] = deque()  # (value, size of its message), at most a window
        self.ended = False  # its end arrived (or the connection failed)
        self.error: RPCError | None = None  # what ended it, raised where the iteration reaches it
        self.closed = False  # closed here: the server was told, and what comes for it is dropped
        self.consumed = 0  # items taken and not yet credited to the server
        self.consumed_bytes = 0


class Stream:
    """The items of a remote generator, as it yields them: an iterator.

    Returned by a call of a generator function (``for row in client.rows("big.csv")``).
    The server's generator runs at most a window of items ahead of what is taken
    from here; ``timeout`` (the call's) bounds the wait for each item
    (:class:`CallTimeout`, and the stream is closed). An exception the generator
    raises is raised here, where the iteration reaches it. :meth:`close` (also at
    the end of a ``with`` block, or when the stream is garbage collected, such as
    after ``break`` out of a ``for`` loop) closes the generator on the server: its
    ``finally`` blocks run.
    """

    __slots__ = ("_calls", "_state", "__weakref__")

    def __init__(self, calls: _Calls, state: _StreamState) -> None:
        self._calls = calls
        self._state = state

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        return self._calls._next_item(self._state)

    def close(self) -> None:
        """Stop the stream: the generator on the server is closed (its ``finally`` blocks run)."""
        self._calls._close_stream(self._state)

    @property
    def closed(self) -> bool:
        """Whether it has ended or was closed."""
        return self._state.closed or (self._state.ended and not self._state.items)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._calls._abandon(self._state)
        except Exception:  # noqa: S110 - an interpreter shutting down: the server closes it with the connection
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<rpc.Stream {self._state.name!r} id={self._state.id} {state}>"


# A frame read and handled on the way (a stream's item or end): no call to hand it to.
_HANDLED = protocol.Response(-1, None, None)


class _CallFuture(Future[Any]):
    """The future of a submitted call: :meth:`cancel` stops the call on the server too."""

    def __init__(self) -> None:
        super().__init__()
        # The connection and request id of its call, in one attribute, so that a cancel never
        # pairs the id on one connection with another; None until it is registered, and while
        # it moves to another connection (then a cancel cancels it here, and the move stops it).
        self._sent: tuple[_Calls, int] | None = None

    def cancel(self) -> bool:
        """Cancel the call: True if it had not finished (then it never finishes here, and
        the server drops it from its queue or stops the handler running it)."""
        sent = self._sent
        if sent is None:
            return self._cancel_here()
        calls, request_id = sent
        if not calls._withdraw(request_id):
            return self.cancelled()  # answered (or failed) already; True if an earlier cancel() won
        self._cancel_here()
        calls._send_cancel(request_id)
        return True

    def _cancel_here(self) -> bool:
        """Cancel the future itself, and tell concurrent.futures.wait() and as_completed(), which
        count a cancelled future done only once notified (an executor's worker would do it)."""
        if self.cancelled():
            return True  # notified already
        if not super().cancel():
            return False
        self.set_running_or_notify_cancel()  # (False for a cancelled future: it only notifies)
        return True


class _Method:
    """A remote name: call it, or take an attribute for a name inside its namespace."""

    __slots__ = ("_fleet", "_name")

    def __init__(self, fleet: _Fleet, name: str) -> None:
        self._fleet = fleet
        self._name = name

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self._fleet, f"{self._name}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fleet = self._fleet
        return fleet.current._call(self._name, args, kwargs, fleet.timeout)

    def __repr__(self) -> str:
        return f"<remote method {self._name!r}>"


class Client:
    """A connection to an rpc server. Prefer :func:`connect`.

    ``address`` is ``(host, port)``, or text: ``"HOST:PORT"`` is TCP, a path (text
    with a ``/`` or without a ``:``) a Unix socket; or a list of addresses of
    servers that serve the same functions: the client is connected to one at a
    time, from a random start, and moves on to the next when a connect fails or
    the server goes away. ``timeout`` is the default deadline of each call in
    seconds (None: wait as long as it takes); ``connect_timeout`` bounds connecting
    and the whole handshake. Timeouts must be finite numbers > 0 (or None, for ``timeout``).
    ``tls``: see :func:`connect`.
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
        authkey = _check_authkey(authkey)
        checked_timeout = _check_timeout(timeout)
        if _check_timeout(connect_timeout, "connect_timeout") is None:
            raise ValueError("connect_timeout must be a number of seconds > 0 and at most a year, not None")
        if type(reconnect) is not bool:
            raise TypeError(f"reconnect must be True or False, not {reconnect!r}")
        #: Every address the client may connect to (one, unless it was given a list).
        self.addresses = check_addresses(address)
        context = _tls_context(tls, self.addresses)
        self._fleet = _Fleet(self.addresses, authkey, checked_timeout, connect_timeout, max_message_bytes, reconnect, context)

    # -- public API --------------------------------------------------------------------

    @property
    def address(self) -> transport.Address:
        """The address of the server that new calls go to."""
        return self._fleet.current.address

    @property
    def calls_made_again(self) -> int:
        """How many times, so far, a call that did not run where it was sent (a go-away,
        ``ServerShuttingDown``, ``ServerBusy`` with other addresses) was moved on to be made
        again on another connection (counted as it moves, even if no connection then opens)."""
        return self._fleet.made_again

    @property
    def _calls(self) -> _Calls:
        """The connection new calls go to."""
        return self._fleet.current

    @property
    def server_info(self) -> dict[str, Any]:
        """What the server said of itself in its hello (on the connection now open)."""
        return self._fleet.current.server_info

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call in seconds (None: none); checked when set."""
        return self._fleet.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._fleet.timeout = _check_timeout(value)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        method = _Method(self._fleet, name)
        if len(self.__dict__) < _MAX_ATTRIBUTES:
            # Kept, so the next lookup finds it at once, without the failed lookup (and the
            # AttributeError raised inside it) that precedes every call of __getattr__.
            self.__dict__[name] = method
        return method

    def call(self, name: str, /, *args: Any, timeout: float | None = _DEFAULT, **kwargs: Any) -> Any:
        """Call ``name`` with ``args`` and ``kwargs``; ``timeout`` overrides the client's default."""
        fleet = self._fleet
        return fleet.current._call(name, args, kwargs, fleet.timeout if timeout is _DEFAULT else _check_timeout(timeout))

    def notify(self, name: str, /, *args: Any, **kwargs: Any) -> None:
        """Run ``name`` on the server without waiting for, or getting, any answer."""
        calls = self._fleet.connection(None)
        frame = protocol.encode_notification(name, args, kwargs)
        protocol.check_size(frame, calls.server_limit)
        calls._send(frame)

    def submit(self, name: str, /, *args: Any, timeout: float | None = _DEFAULT, **kwargs: Any) -> Future[Any]:
        """Start a call and return a :class:`concurrent.futures.Future` of its result.

        Many submitted calls may be in flight on the connection at once; their
        replies are read by a background thread while any is outstanding.
        """
        fleet = self._fleet
        timeout = fleet.timeout if timeout is _DEFAULT else _check_timeout(timeout)
        future = _CallFuture()
        moves = _Moves(args, kwargs, None if timeout is None else time.monotonic() + timeout)
        fleet.submit(name, timeout, moves, future)
        return future

    def map(
        self,
        name: str,
        /,
        *iterables: Iterable[Any],
        timeout: float | None = _DEFAULT,
        max_in_flight: int = 64,
    ) -> Iterator[Any]:
        """Call ``name`` once per item of ``iterables`` (zipped, as positional arguments).

        Yields the results in order, keeping at most ``max_in_flight`` calls in
        flight; an error is raised when its result's turn comes. Bad arguments
        are refused here, before any call is made.
        """
        if type(max_in_flight) is not int or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a whole number >= 1, not {max_in_flight!r}")
        if timeout is not _DEFAULT:
            _check_timeout(timeout)
        return self._map(name, iterables, timeout, max_in_flight)

    def _map(self, name: str, iterables: tuple[Iterable[Any], ...], timeout: Any, max_in_flight: int) -> Iterator[Any]:
        in_flight: deque[Future[Any]] = deque()
        for args in zip(*iterables):
            if len(in_flight) >= max_in_flight:
                yield in_flight.popleft().result()
            in_flight.append(self.submit(name, *args, timeout=timeout))
        while in_flight:
            yield in_flight.popleft().result()

    def methods(self) -> list[MethodInfo]:
        """The methods the server exposes: name, signature text, first docstring line."""
        return [MethodInfo(**entry) for entry in self.call("_rpc.methods")]

    def ping(self) -> float:
        """Round-trip time in seconds of a message the server answers without a handler."""
        start = time.perf_counter()
        self.call("_rpc.ping")
        return time.perf_counter() - start

    @property
    def closed(self) -> bool:
        """Whether no connection is open: after :meth:`close`, or once the connection ended
        (until the next call opens a new one, unless made with ``reconnect=False``).

        With nothing in flight, it first reads what the server sent meanwhile, so a
        connection the server closed reads as closed.
        """
        calls = self._fleet.current
        if calls._failure is None and not calls._pending and not calls._reading and calls._input_waiting():
            calls._check_idle()
        return calls._failure is not None

    def close(self) -> None:
        """Close the connection for good; calls still waiting fail with :class:`ConnectionClosed`."""
        self._fleet.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<rpc.Client {transport.format_address(self.address)} {state}>"


class _Calls:
    """The calls on one connection: its socket, the calls in flight and who reads the replies.

    Apart from :class:`Client`, whose ``__getattr__`` (remote methods by attribute)
    would make every attribute lookup here slower, which the per-call path feels.
    """

    def __init__(self, fleet: _Fleet, link: _Link, address: transport.Address) -> None:
        self._fleet = fleet  # the client's connections: where calls go when they cannot go here
        self.address = address
        self._max_message_bytes = fleet.max_message_bytes
        self._reconnect = fleet.reconnect  # whether a call finding this connection ended opens another
        self._checking = False  # whether a thread reads what came while nothing was in flight
        self._leaving = False  # no new call goes here (the server is going away, or was busy)
        self._last_id: int | None = None  # from the server's go-away: a request with a higher id never runs
        self._use(link)
        self._ids = itertools.count(1)
        # The plain lock guards the state; the condition (on the same lock) is only for
        # threads that must wait, and is notified only when there are some.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._reading = False  # whether some thread is reading replies
        self._futures = 0  # submitted calls not yet answered
        self._reader_thread: threading.Thread | None = None
        # Deadlines of submitted calls, earliest first: (deadline, id); answered ones are skipped.
        self._deadlines: list[tuple[float, int]] = []
        self._reader_until = float("inf")  # when the background reader wakes up next at the latest
        self._reader_polling = False  # whether it waits on the socket (else on the condition)
        self._wake: tuple[socket.socket, socket.socket] | None = None  # wakes it out of poll()
        self._failure: RPCError | None = None  # set once the connection is unusable
        self._streams: dict[int, _StreamState] = {}  # open streams by request id
        self._abandoned: list[int] = []  # streams collected while the socket was busy: their close waits

    def _use(self, link: _Link) -> None:
        """Take the socket of ``link`` (authenticated, past the hello) as the connection."""
        sock, info, session = link
        self.server_info = info
        limit = info.get("max_message_bytes")
        self.server_limit = limit if type(limit) is int and limit > 0 else protocol.DEFAULT_MAX_MESSAGE_BYTES
        self._sock = sock
        self.tls = session  # the TLS session, or None
        # Sends one frame by a deadline (the caller holds the send lock).
        self._send_frame: Callable[[bytes, float | None], None] = (
            functools.partial(framing.send_frame, sock) if session is None else session.send_frame
        )
        self._frames = framing.FrameReader(sock.fileno(), self._max_message_bytes, session)  # used by the reading thread only
        # Polled before a call when nothing is in flight: did the server close meanwhile?
        self._input = select.poll()
        self._input.register(sock.fileno(), select.POLLIN)

    def _usable(self) -> bool:
        """Whether a new call may go on this connection: open and not left.

        With nothing in flight, nobody reads the socket, so first see whether the
        server closed it meanwhile (idle_timeout, a restart) or is going away: a
        call sent there would fail, or not run.
        """
        if (
            self._failure is None
            and not self._leaving
            and self._reconnect
            and not self._pending
            and not self._reading
            and self._input_waiting()
        ):
            self._check_idle()
        return self._failure is None and not self._leaving

    def _input_waiting(self) -> bool:
        """Whether input (or the connection's end) waits on the socket; a check that never blocks."""
        try:
            return bool(self._input.poll(0))
        except RuntimeError:  # another thread polls it at this moment: a poll object of its own
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))

    def _check_idle(self) -> None:
        """Read what arrived while no call was in flight: late answers (dropped), a go-away, the end.

        One thread checks; calls starting meanwhile wait for its outcome, so none is
        sent on a connection found closed or left.
        """
        with self._lock:
            mine = not (self._checking or self._reading or self._pending or self._failure is not None)
            if mine:
                self._checking = self._reading = True
            else:
                self._await_check()
        if not mine:
            return
        try:
            try:
                for _ in range(_IDLE_READ_FRAMES):
                    if not self._input_waiting() or not self._read_one(time.monotonic() + _IDLE_READ_SECONDS, None):
                        break
            finally:
                self._stop_reading()
        finally:
            with self._lock:
                self._checking = False
                if self._waiters:
                    self._cond.notify_all()

    def _await_check(self) -> None:
        """Under the lock: wait until no thread checks the idle connection."""
        if self._checking:
            self._waiters += 1
            try:
                while self._checking:
                    self._cond.wait()
            finally:
                self._waiters -= 1

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        if self._failure is not None or self._leaving or (
            self._reconnect and not self._pending and not self._reading and self._input_waiting()
        ):
            # (_usable, inlined: the per-call path) Ended, left, or to be checked: the fleet finds it a connection.
            return self._fleet.call(name, args, kwargs, timeout, None if timeout is None else time.monotonic() + timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._call_here(name, args, kwargs, timeout, deadline)
        except (ServerBusy, _NotRun) as exc:  # it did not run: it may be made again elsewhere
            error: RPCError = exc
        return self._fleet.call(name, args, kwargs, timeout, deadline, error, self)

    def _call_here(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        deadline: float | None,
        remaining: float | None = None,
    ) -> Any:
        """Make the call on this connection and wait for its outcome (``remaining``: the timeout
        the server is told, if not ``timeout``: what is left of it, for a call made again)."""
        pending = self._start(name, args, kwargs, timeout, deadline, None, remaining)
        try:
            if pending.reads_own:
                return self._read_own(pending, deadline)
            return self._wait(pending, deadline)
        except BaseException as exc:
            if not pending.done:
                # Interrupted (KeyboardInterrupt, say): forget the call, so its answer is dropped
                # and later calls, finding nothing in flight, take the fast path again; and stop
                # it on the server. (A timeout needs no cancel: the server has the deadline too.)
                self._forget(pending)
                if not isinstance(exc, RPCError):
                    self._send_cancel(pending.id)
            raise

    def _start(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        deadline: float | None,
        future: _CallFuture | None,
        remaining: float | None = None,
        moves: _Moves | None = None,
    ) -> _Pending:
        """Register a call under a fresh id and send its request by ``deadline``.

        A call made with ``call`` that finds no other call in flight and no thread
        reading replies takes the reading role at once (``reads_own``), in the same
        lock round. Only then: a thread blocked sending must not keep others' replies unread.
        :class:`_NotRun` if this connection ended or was left before the request went out whole.
        """
        if type(name) is not str:
            raise TypeError(f"method name must be a string, not {type(name).__name__}")
        request_id = next(self._ids)
        frame = protocol.encode_request(request_id, name, args, kwargs, timeout if remaining is None else remaining)
        if len(frame) > self.server_limit:
            protocol.check_size(frame, self.server_limit)
        pending = _Pending(request_id, future, name, timeout)
        with self._lock:
            self._await_check()  # (another thread is seeing whether the server closed the connection)
            if self._failure is not None or self._leaving:
                raise _NotRun(f"call {name!r} was not sent: {self._failure or 'the connection was left'}")
            if future is None and not self._pending and not self._reading:
                pending.reads_own = self._reading = True
            # Registered before sending, so the reply cannot arrive before it is expected.
            self._pending[request_id] = pending
            if future is not None:
                pending.moves = moves
                future._sent = (self, request_id)  # cancellable from now on
                self._futures += 1
                if deadline is not None:
                    self._add_deadline(deadline, request_id)
                if self._reader_thread is None:
                    if self._wake is None:
                        self._wake = _wake_pair()
                    self._reader_thread = threading.Thread(target=self._read_for_futures, name="rpc-client-reader", daemon=True)
                    self._reader_thread.start()
        try:
            self._send(frame, deadline, pending)
        except BaseException:
            self._forget(pending)  # not sent (whole): no answer will come
            if pending.reads_own:
                self._stop_reading()
            raise
        return pending

    def _add_deadline(self, deadline: float, request_id: int) -> None:
        """Under the lock: note a submitted call's deadline; wake the reader if it sleeps past it."""
        deadlines = self._deadlines
        if len(deadlines) > 2 * self._futures + 64:
            # Forget answered calls, so the heap stays proportional to the calls in flight.
            deadlines[:] = [entry for entry in deadlines if entry[1] in self._pending]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (deadline, request_id))
        if self._reader_thread is not None and deadline < self._reader_until:
            self._reader_until = deadline
            if self._reader_polling:
                assert self._wake is not None
                try:
                    os.write(self._wake[1].fileno(), b"\0")  # raw bytes on a socket pair: no pickle here
                except BlockingIOError:
                    pass  # a byte is already waiting to wake it
            elif self._waiters:
                self._cond.notify_all()

    def _expire_futures(self) -> list[_Pending]:
        """Under the lock: fail the submitted calls whose deadline has passed; settle them after."""
        deadlines = self._deadlines
        expired: list[_Pending] = []
        if deadlines:
            now = time.monotonic()
            while deadlines and deadlines[0][0] <= now:
                waiting = self._pending.pop(heapq.heappop(deadlines)[1], None)
                if waiting is not None:  # still unanswered
                    waiting.error = _call_timeout(waiting)
                    waiting.done = True
                    self._futures -= 1
                    expired.append(waiting)
        return expired

    def _send(self, frame: bytes, deadline: float | None = None, pending: _Pending | None = None) -> None:
        """Send one frame; a call's request must be out by its deadline, however the server reads."""
        lock = self._send_lock
        if not lock.acquire(False) and not lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0)):
            assert pending is not None
            raise self._unsent(pending, 0)  # other calls' frames held the socket until the deadline
        try:
            if self._failure is not None:
                if pending is None:
                    raise self._failure
                if self._forget(pending):
                    raise _NotRun(f"call {pending.name!r} was not sent: {self._failure}")
                return  # failed already, by the thread that ended the connection: its outcome is set
            self._send_frame(frame, deadline)
            if self._abandoned:
                self._close_abandoned(deadline)
        except framing.SendTimeout as exc:
            assert pending is not None
            raise self._unsent(pending, exc.sent) from None
        except OSError as exc:
            error = ConnectionClosed(f"connection lost while sending: {exc}")
            # Not sent whole, so it cannot have run: taken out of those the failure fails, to be made again
            # (unless another thread took it first: whoever takes a call off those in flight settles it).
            mine = pending is not None and self._forget(pending)
            self._fail_all(error)
            if pending is None:
                raise error from None
            if mine:
                raise _NotRun(f"call {pending.name!r} was not sent: {error}") from None
        except BaseException:
            # Interrupted (KeyboardInterrupt, say) while the frame went out: part of it may be
            # sent, and a stream mid-message cannot carry another.
            self._fail_all(ConnectionClosed("connection closed: sending a message was interrupted"))
            raise
        finally:
            lock.release()

    def _withdraw(self, request_id: int) -> bool:
        """Take a submitted call off those in flight before its answer: True if it was still there."""
        with self._lock:
            if self._pending.pop(request_id, None) is None:
                return False  # answered, failed or timed out: its future is (being) completed
            self._futures -= 1
            return True

    def _send_cancel(self, request_id: int) -> None:
        """Ask the server to stop ``request_id``; best effort: the call is given up here already."""
        self._send_control(protocol.encode_cancel(request_id))

    def _send_control(self, frame: bytes) -> None:
        """Send a cancel or a credit; best effort, within _CANCEL_SEND_SECONDS."""
        deadline = time.monotonic() + _CANCEL_SEND_SECONDS
        lock = self._send_lock
        if not lock.acquire(timeout=_CANCEL_SEND_SECONDS):
            return  # another frame holds the socket: the call runs on, its answer unread
        try:
            if self._failure is None:
                self._send_frame(frame, deadline)
        except framing.SendTimeout as exc:
            if exc.sent:
                self._fail_all(ConnectionClosed("connection closed: a cancel or credit message was cut off"))
        except OSError:
            pass  # the connection is gone: the server cancels the calls of a client that goes away
        except BaseException:
            self._fail_all(ConnectionClosed("connection closed: sending a cancel or credit message was interrupted"))
            raise
        finally:
            lock.release()

    def _forget(self, pending: _Pending) -> bool:
        """Take a call off those in flight: an answer to it, if one comes, is ignored.
        False if it was not there (answered, failed or withdrawn by another thread)."""
        with self._lock:
            if self._pending.pop(pending.id, None) is None:
                return False
            if pending.future is not None:
                self._futures -= 1
            return True

    def _unsent(self, pending: _Pending, sent: int) -> CallTimeout:
        """The error for a call whose request was not sent (whole) by its deadline."""
        self._forget(pending)
        if sent:
            # Part of the request went out: the stream is mid-message and cannot carry another.
            self._fail_all(
                ConnectionClosed(f"connection closed: the request of call {pending.name!r} was cut off by its timeout")
            )
        return CallTimeout(
            f"call {pending.name!r} could not be sent within its timeout of {pending.timeout:g} s (the server is not reading)"
        )

    def _wait(self, pending: _Pending, deadline: float | None) -> Any:
        while True:
            with self._lock:
                while True:
                    if pending.done:
                        return pending.outcome()
                    if deadline is not None and time.monotonic() >= deadline:
                        self._pending.pop(pending.id, None)  # a late reply is dropped
                        raise _call_timeout(pending)
                    if not self._reading:
                        self._reading = True
                        break
                    self._waiters += 1
                    try:
                        self._cond.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
                    finally:
                        self._waiters -= 1
            try:
                while not pending.done and self._read_one(deadline, None):
                    pass
            finally:
                self._stop_reading()

    def _read_for_futures(self) -> None:
        """The background reader: reads replies while submitted calls are outstanding.

        It also fails each submitted call whose deadline passes, waking for the
        earliest one whether it is reading or another thread is.
        """
        while True:
            stop = False
            with self._lock:
                expired = self._expire_futures()
                while True:
                    if not self._futures or self._failure is not None:
                        self._reader_thread = None
                        self._reader_until = float("inf")
                        self._deadlines.clear()  # nothing left in flight to time out
                        stop = True
                        break
                    deadline = self._deadlines[0][0] if self._deadlines else None
                    self._reader_until = float("inf") if deadline is None else deadline
                    if not self._reading:
                        self._reading = self._reader_polling = True
                        break
                    # Another thread reads: sleep until the earliest deadline, or until woken.
                    self._waiters += 1
                    try:
                        self._cond.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
                    finally:
                        self._waiters -= 1
                    expired += self._expire_futures()
                assert self._wake is not None
                wake = self._wake[0]
            for waiting in expired:
                waiting.settle_future()
            if stop:
                return
            try:
                # Returns at the earliest deadline, or when an earlier one is submitted.
                while self._futures and self._read_one(deadline, wake):
                    pass
            finally:
                self._stop_reading()

    def _read_own(self, pending: _Pending, deadline: float | None) -> Any:
        """The fast path: the only call in flight reads the replies itself until its own comes.

        No condition to wait on, no other thread involved, and one lock round at the end
        both takes the call off those in flight and gives up the reading role. A reply
        to a call another thread made meanwhile is handed to it on the way.
        """
        reading = True
        try:
            while True:
                response = self._next_response(deadline, None)
                if response is None:
                    break  # the deadline passed, or the connection failed
                if response.id != pending.id:
                    if response is not _HANDLED:
                        self._deliver(response)
                    continue
                with self._lock:
                    mine = self._pending.pop(pending.id, None) is not None
                    reading = False
                    self._release_reading()
                if not mine:
                    break  # failed meanwhile (the client was closed): that is its outcome
                if response.error is not None:
                    raise _exception(response.error)
                return response.result
        finally:
            if reading:
                self._stop_reading()
        if pending.done:  # (set once, after its outcome, so no lock is needed to read it)
            return pending.outcome()
        return self._wait(pending, deadline)  # the deadline passed: CallTimeout

    def _stop_reading(self) -> None:
        with self._lock:
            self._release_reading()

    def _release_reading(self) -> None:
        """Under the lock: give up the reading role, to a thread waiting for it if there is one."""
        self._reading = self._reader_polling = False
        if self._leaving and self._failure is None and not self._pending and not self._streams:
            self._end_left()
        if self._failure is not None:
            self._close_transport()
        if self._waiters:
            self._cond.notify_all()  # another waiting thread may take over reading

    def _read_one(self, deadline: float | None, wake: socket.socket | None) -> bool:
        """Read one response and hand it to its call.

        False: the deadline passed, ``wake`` got a byte, or the connection failed.
        """
        response = self._next_response(deadline, wake)
        if response is None:
            return False
        if response is not _HANDLED:
            self._deliver(response)
        return True

    def _next_response(self, deadline: float | None, wake: socket.socket | None) -> protocol.Response | None:
        """The next response with an id, or None if the deadline passed, ``wake`` got a byte, or the connection failed."""
        try:
            frame = self._frames.read_view(deadline, wake)  # valid until the next read: decoded at once
        except EOFError:
            self._fail_all(ConnectionClosed("the server closed the connection"))
            return None
        except (ProtocolError, TLSError) as exc:  # an oversized or malformed length, a TLS alert: the stream is lost
            self._fail_all(exc)
            return None
        except OSError as exc:
            self._fail_all(ConnectionClosed(f"connection lost: {exc}"))
            return None
        if frame is None:
            return None
        try:
            response = protocol.decode_answer(frame)
        except ProtocolError as exc:
            self._fail_all(exc)
            return None
        if type(response) is protocol.StreamMessage:
            return self._stream_message(response, len(frame))
        if type(response) is protocol.GoAway:
            self._went_away(response)
            return _HANDLED
        assert type(response) is protocol.Response
        if response.id is None:
            # A connection-level error from the server, which closes the connection.
            self._fail_all(_exception(response.error) if response.error else ConnectionClosed("bad response"))
            return None
        return response

    def _deliver(self, response: protocol.Response) -> None:
        """Hand ``response`` to the call with its id, waiting in another thread or as a future."""
        assert response.id is not None
        with self._lock:
            waiting = self._pending.pop(response.id, None)
            if waiting is None:
                return  # its caller timed out and left, or the server is confused
            if response.error is not None:
                waiting.error = _exception(response.error)
            else:
                waiting.result = response.result
            waiting.done = True
            if waiting.future is not None:
                self._futures -= 1
            elif self._waiters:
                self._cond.notify_all()  # wake its waiting thread
        if waiting.future is not None:
            self._settle(waiting)

    def _fail_all(self, error: RPCError) -> None:
        """Make the connection unusable and fail every call in flight with ``error``."""
        with self._lock:
            if self._failure is None:
                self._failure = error if isinstance(error, TransportError) else ConnectionClosed(str(error))
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading or sending
                except OSError:
                    pass  # not connected any more
                if not self._reading:
                    self._close_transport()
            failed = list(self._pending.values())
            last_id = self._last_id
            for waiting in failed:
                if last_id is not None and waiting.id > last_id and not self._fleet.closed:
                    # Read by the server only after its go-away, if at all: it did not run.
                    waiting.error = _NotRun(f"call {waiting.name!r} did not run: the server went away before reading it ({error})")
                else:
                    waiting.error = error
                waiting.done = True
            self._pending.clear()
            for stream in self._streams.values():
                stream.ended = True
                stream.error = error
            self._streams.clear()
            self._futures = 0
            self._deadlines.clear()
            self._cond.notify_all()
        for waiting in failed:
            self._settle(waiting)

    def _settle(self, waiting: _Pending) -> None:
        """Complete a submitted call's future, outside any lock; or, if it did not run here
        and may go on, make it again on the connection new calls go to (with the same future)."""
        if waiting.future is not None and isinstance(waiting.error, (ServerBusy, _NotRun)) and self._fleet.resubmit(waiting, self):
            return
        waiting.settle_future()

    def _went_away(self, go_away: protocol.GoAway) -> None:
        """The server drains: no new call here; those in flight finish, then the connection ends."""
        with self._lock:
            self._leaving = True
            self._last_id = -1 if go_away.last_id is None else go_away.last_id

    def _leave(self) -> None:
        """No new call here (the server is going away, or busy); the connection ends once idle."""
        with self._lock:
            self._leaving = True
            if not self._reading and not self._pending and not self._streams and self._failure is None:
                self._end_left()
                if self._failure is not None:
                    self._close_transport()

    def _end_left(self) -> None:
        """Under the lock, with nothing in flight: end a connection that was left.

        Only if no thread sends on it (a cancel, a credit, a notification): that
        thread's socket must not be closed under it; the server closes it then.
        """
        if not self._send_lock.acquire(False):
            return
        try:
            self._failure = ConnectionClosed("the connection was left: the server went away, or was busy")
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            self._send_lock.release()

    # -- streams --------------------------------------------------------------------------

    def _stream_message(self, message: protocol.StreamMessage, size: int) -> protocol.Response:
        """A stream's start (its call's answer: a Stream), or an item or end for an open stream."""
        kind, request_id = message.kind, message.id
        if kind == protocol.STREAM_START:
            with self._lock:
                pending = self._pending.get(request_id)
                state = _StreamState(request_id, pending.name if pending else "?", pending.timeout if pending else None)
                if pending is not None:
                    self._streams[request_id] = state
            stream = Stream(self, state)
            if pending is None:  # its caller gave up: nobody will read it
                state.closed = True
                self._send_cancel(request_id)
            return protocol.Response(request_id, None, stream)
        with self._lock:
            open_stream = self._streams.get(request_id)
            if open_stream is not None:
                if kind == protocol.STREAM_ITEM:
                    open_stream.items.append((message.value, size))
                else:
                    del self._streams[request_id]
                    open_stream.ended = True
                    open_stream.error = None if message.error is None else _exception(message.error)
                if self._waiters:
                    self._cond.notify_all()  # its consumer may wait in another thread
        return _HANDLED

    def _next_item(self, state: _StreamState) -> Any:
        """The stream's next item, reading for it if no other thread reads; StopIteration at its end."""
        deadline = None if state.timeout is None else time.monotonic() + state.timeout
        while True:
            credit = 0
            read = timed_out = False
            with self._lock:
                while True:
                    if state.items:
                        value, size = state.items.popleft()
                        state.consumed += 1
                        state.consumed_bytes += size
                        # Credit by half windows: few messages, and the server never waits on a full one.
                        if not state.ended and (
                            state.consumed >= protocol.STREAM_WINDOW // 2
                            or state.consumed_bytes >= protocol.STREAM_WINDOW_BYTES // 2
                        ):
                            credit, state.consumed, state.consumed_bytes = state.consumed, 0, 0
                        break
                    if state.closed:
                        raise StopIteration
                    if state.ended:
                        state.closed = True
                        error, state.error = state.error, None
                        if error is not None:
                            raise error
                        raise StopIteration
                    if deadline is not None and time.monotonic() >= deadline:
                        timed_out = True
                        break
                    if not self._reading:
                        self._reading = read = True
                        break
                    self._waiters += 1
                    try:
                        self._cond.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
                    finally:
                        self._waiters -= 1
            if read:
                try:
                    while not (state.items or state.ended or state.closed) and self._read_one(deadline, None):
                        pass
                finally:
                    self._stop_reading()
                continue
            if timed_out:
                self._close_stream(state)
                raise CallTimeout(f"stream {state.name!r} sent no item within its timeout of {state.timeout:g} s")
            if credit:
                self._send_control(protocol.encode_credit(state.id, credit))
            return value

    def _close_stream(self, state: _StreamState) -> None:
        with self._lock:
            if state.closed:
                return
            state.closed = True
            state.items.clear()
            if state.ended or self._streams.pop(state.id, None) is None:
                return  # it had ended: nothing to tell the server
        self._send_cancel(state.id)

    def _abandon(self, state: _StreamState) -> None:
        """A stream was garbage collected: close it, without waiting for any lock (this may run
        inside any code of this thread, even one holding a lock here)."""
        if state.closed or state.ended or self._failure is not None:
            return
        state.closed = True
        if self._streams.pop(state.id, None) is None:  # (one dict operation: atomic)
            return
        self._abandoned.append(state.id)
        if self._send_lock.acquire(False):
            try:
                self._close_abandoned(time.monotonic() + _CANCEL_SEND_SECONDS)
            except (OSError, framing.SendTimeout):
                pass  # the connection is failing: the server closes its streams with it
            finally:
                self._send_lock.release()
        # else: sent by whoever holds the socket, once its own frame is out

    def _close_abandoned(self, deadline: float | None) -> None:
        """Holding the send lock: send the closes of collected streams."""
        while self._abandoned:
            if self._failure is not None:
                self._abandoned.clear()
                return
            self._send_frame(protocol.encode_cancel(self._abandoned.pop()), deadline)

    def _close_transport(self) -> None:
        """Under the lock, once no thread reads: release the socket and the wake-up pair."""
        self._sock.close()
        if self._wake is not None:
            for end in self._wake:
                end.close()


class _Fleet:
    """The client's connections: the one new calls go to, those left that still finish their
    calls, and the addresses it moves through, one at a time, in turn from a random start.

    Calls that did not run where they were made are made again here (see :meth:`call`).
    """

    def __init__(
        self,
        addresses: list[transport.Address],
        authkey: bytes | None,
        timeout: float | None,
        connect_timeout: float,
        max_message_bytes: int,
        reconnect: bool,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.addresses = addresses
        self.context = context  # TLS (None: plain)
        self.authkey = authkey
        self.timeout = timeout  # the default deadline of calls, checked by Client
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.reconnect = reconnect
        self.closed = False  # by the user: final
        self._next = random.randrange(len(addresses))  # the address tried next
        self._opening = threading.Lock()  # one thread opens a connection; the others then take it
        self._left: list[_Calls] = []  # left connections whose calls were still in flight
        self.made_again = 0  # calls made again on another connection (Client.calls_made_again)
        self._counting = threading.Lock()  # calls move in whichever thread saw them not run
        self.current = self._open(None, rounds=False)

    # -- connections --------------------------------------------------------------------

    def connection(self, deadline: float | None) -> _Calls:
        """The connection for a new call: the current one, or, if it ended or was left, a new one
        (within connect_timeout and ``deadline``; the connect error if none can be opened)."""
        calls = self.current
        if calls._usable():
            return calls
        with self._opening:
            calls = self.current
            if calls._usable():
                return calls  # another thread opened it meanwhile
            if self.closed:
                raise ConnectionClosed("the client was closed")
            if not self.reconnect:
                raise calls._failure or ConnectionClosed("the server is going away, and this client does not reconnect")
            new = self._open(deadline, rounds=True)
            if self.closed:  # by the user, meanwhile
                new._fail_all(ConnectionClosed("the client was closed"))
                raise ConnectionClosed("the client was closed")
            self._left = [left for left in self._left if left._failure is None]
            if calls._failure is None:
                self._left.append(calls)  # it finishes its calls, then ends (closed with the client if not)
            self.current = new
            return new

    def _open(self, deadline: float | None, rounds: bool) -> _Calls:
        """A connection to the next address that takes one, trying each in turn.

        ``rounds``: after a round in which every address failed, wait (with backoff)
        and go round again, until connect_timeout (or ``deadline``) passes; else one
        round. A wrong key or protocol ends the rounds. Of one address, its own error.
        """
        addresses = self.addresses
        count = len(addresses)
        limit = time.monotonic() + self.connect_timeout
        if deadline is not None:
            limit = min(limit, deadline)
        wait = _BACKOFF_FIRST_SECONDS
        failures: list[tuple[transport.Address, RPCError]] = []
        while True:
            tried: list[tuple[transport.Address, RPCError]] = []
            for untried in range(count, 0, -1):
                left = limit - time.monotonic()
                if left <= 0:
                    break
                address = addresses[self._next]
                self._next = (self._next + 1) % count
                # A share of the time left, so one address that never answers cannot use up the others'.
                share = left / untried
                try:
                    link = _open(
                        address, self.authkey, self.connect_timeout if count == 1 else round(share, 3),
                        time.monotonic() + share, self.context,
                    )
                except (ConnectionClosed, ConnectTimeout, AuthenticationError, ProtocolError, TLSError) as exc:
                    if count == 1 and not isinstance(exc, ConnectionClosed):
                        raise  # (nothing listening yet is worth waiting for; the rest are not)
                    tried.append((address, exc))
                    continue
                return _Calls(self, link, address)
            failures = tried or failures
            pause = wait * random.uniform(0.5, 1.0)
            lasting = any(not isinstance(exc, (ConnectionClosed, ConnectTimeout)) for _, exc in failures)
            if not rounds or lasting or time.monotonic() + pause >= limit:
                raise _connect_error(failures, self.connect_timeout)
            time.sleep(pause)
            wait = min(wait * 2, _BACKOFF_MAX_SECONDS)

    def close(self) -> None:
        self.closed = True  # before failing: a connect under way gives up
        for calls in [self.current, *self._left]:
            calls._fail_all(ConnectionClosed("the client was closed"))
        self._left = []

    # -- calls that did not run ------------------------------------------------------------

    def call(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        deadline: float | None,
        error: RPCError | None = None,
        calls: _Calls | None = None,
    ) -> Any:
        """Make a call on the connection new calls go to: one that could not go on the connection
        it was made on (ended, left), or that did not run there (``error``, on ``calls``).

        A call that did not run is made again while :meth:`_goes_on` allows; once it does not,
        its last error is raised (a connect error, if no connection could be opened).
        """
        moves = _Moves(args, kwargs, deadline)
        while True:
            if error is not None:
                assert calls is not None
                if not self._goes_on(error, calls, moves):
                    raise _public(error)
            calls = self._moved_to(deadline, error, moves)
            remaining = None if error is None or deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return calls._call_here(name, args, kwargs, timeout, deadline, remaining)
            except (ServerBusy, _NotRun) as exc:
                error = exc

    def _moved_to(self, deadline: float | None, error: RPCError | None, moves: _Moves) -> _Calls:
        """The connection for a call (``error``: one that did not run, on its way): the connect
        error if none can be opened, or, for a call on its way, its own error saying so."""
        if error is None:
            return self.connection(deadline)
        try:
            return self.connection(moves.until)
        except RPCError as exc:
            raise _not_moved(error, exc) from None

    def submit(self, name: str, timeout: float | None, moves: _Moves, future: _CallFuture) -> None:
        """Send a submitted call on the connection new calls go to; its future gets its outcome."""
        calls: _Calls | None = None
        error: RPCError | None = None
        while True:
            if error is not None:
                assert calls is not None
                if not self._goes_on(error, calls, moves):
                    raise _public(error)
            calls = self._moved_to(moves.deadline, error, moves)
            remaining = None if error is None or moves.deadline is None else max(moves.deadline - time.monotonic(), 0.001)
            try:
                calls._start(name, moves.args, moves.kwargs, timeout, moves.deadline, future, remaining, moves)
                return
            except _NotRun as exc:
                future._sent = None
                error = exc

    def resubmit(self, waiting: _Pending, calls: _Calls) -> bool:
        """A submitted call did not run on ``calls``: make it again, with the same future, on the
        connection new calls go to. False if it may not go on: its error is then its outcome.

        Runs in whichever thread read its answer or saw its connection end, outside any lock.
        """
        future, moves = waiting.future, waiting.moves
        assert isinstance(future, _CallFuture) and moves is not None and waiting.error is not None
        future._sent = None  # moving: a cancel() meanwhile cancels it here, and is seen below
        error: RPCError = waiting.error
        while not future.cancelled():
            if not self._goes_on(error, calls, moves):
                return False
            deadline = moves.deadline
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                calls = self.connection(moves.until)
                pending = calls._start(waiting.name, moves.args, moves.kwargs, waiting.timeout, deadline, future, remaining, moves)
            except _NotRun as exc:
                future._sent = None
                error = exc
                continue
            except RPCError as exc:  # no connection could be opened: that is its outcome
                waiting.error = _not_moved(error, exc)
                return False
            except Exception as exc:  # (out of descriptors, say): the reading thread must go on
                waiting.error = _not_moved(error, ConnectionClosed(f"cannot connect: {exc}"))
                return False
            if future.cancelled() and calls._withdraw(pending.id):
                calls._send_cancel(pending.id)  # cancelled while it moved
            return True
        return True  # cancelled while it moved: nothing more to do

    def _goes_on(self, error: RPCError, calls: _Calls, moves: _Moves) -> bool:
        """Whether a call that did not run on ``calls`` (``error``) is made again elsewhere
        (see :func:`_next_move`); never once the client is closed or does not reconnect."""
        if self.closed or not self.reconnect:
            return False
        move = _next_move(error, moves, len(self.addresses), self.connect_timeout, time.monotonic())
        if move is None:
            return False
        if move == "leave":
            calls._leave()
        with self._counting:
            self.made_again += 1
        return True


def _next_move(error: RPCError, moves: _Moves, addresses: int, connect_timeout: float, now: float) -> str | None:
    """What becomes of a call that did not run (``error``): None, it is not made again (its error
    is its outcome); "leave": made again elsewhere, and its connection is left (no new call goes
    there); "again": made again (its connection has ended).

    server_shutting_down: the server drains, so its connection is left. server_busy: with other
    addresses, the client moves on to the next, until every address has answered the call so
    (with one address, the backpressure is the caller's at once). A call is made again only
    before its deadline, or connect_timeout after its first move if it has none.
    """
    if moves.until is None:
        moves.until = moves.deadline if moves.deadline is not None else now + connect_timeout
    if now >= moves.until:
        return None
    if isinstance(error, ServerShuttingDown):
        return "leave"
    if isinstance(error, ServerBusy):
        moves.busy += 1
        return "leave" if addresses > 1 and moves.busy < addresses else None
    return "again" if isinstance(error, _NotRun) else None


def check_addresses(address: Any) -> list[transport.Address]:
    """The addresses a client is given: one, or a list (a tuple of addresses is one too)."""
    if isinstance(address, list) or (isinstance(address, tuple) and not (len(address) == 2 and isinstance(address[1], int))):
        if not address:
            raise ConfigError("the list of addresses is empty: give at least one")
        return [transport._check_address(each) for each in address]
    return [transport._check_address(address)]


def _connect_error(failures: list[tuple[transport.Address, RPCError]], connect_timeout: float) -> RPCError:
    """Why no connection could be opened: of one address, its own error; of several, each one's."""
    if not failures:
        return ConnectTimeout(f"no connection could be opened within {connect_timeout:g} s")
    if len(failures) == 1:
        return failures[0][1]
    for _, exc in failures:
        if not isinstance(exc, (ConnectionClosed, ConnectTimeout)):
            return exc  # a wrong key or protocol: its message names the server
    reasons = "; ".join(f"{transport.format_address(address)}: {exc}" for address, exc in failures)
    return ConnectionClosed(f"cannot connect to any of {len(failures)} servers: {reasons}")


def _not_moved(error: RPCError, reason: RPCError) -> RPCError:
    """A call that did not run (``error``) and could not be made again (``reason``: no connection
    could be opened): its own error, so that the caller still sees that it did not run."""
    cls = ConnectionClosed if type(error) is _NotRun else type(error)
    return cls(f"{error.message}; it could not be made again: {reason.message}")


def _public(error: RPCError) -> RPCError:
    """The error a caller gets: a call that did not run and could not be made again is ConnectionClosed."""
    return ConnectionClosed(str(error)) if type(error) is _NotRun else error


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    for end in pair:
        end.setblocking(False)
    return pair


def server_hello(frame: bytes) -> protocol.Hello:
    """The server's hello, refused (ProtocolError) if it speaks another protocol version."""
    hello = protocol.decode_hello(frame)
    if hello.version != protocol.PROTOCOL_VERSION:
        raise ProtocolError(
            f"the server speaks protocol version {hello.version}; this client speaks {protocol.PROTOCOL_VERSION}"
        )
    return hello


def _tls_context(option: TLSOption, addresses: list[transport.Address]) -> ssl.SSLContext | None:
    """The context for ``tls=``, checked against every address before anything connects."""
    context = tls.client_context(option)
    if context is not None:
        for address in addresses:
            tls.server_hostname(address, context)  # a Unix socket has no hostname to check
    return context


def _open(
    address: transport.Address,
    authkey: bytes | None,
    connect_timeout: float,
    deadline: float,
    context: ssl.SSLContext | None = None,
) -> _Link:
    """Connect, authenticate and exchange hellos by ``deadline``: the socket, the server's hello
    and the TLS session (with ``context``)."""
    conn = transport.connect(address, max(deadline - time.monotonic(), 0.001), connect_timeout)
    if context is not None:
        return _open_tls(conn, address, authkey, connect_timeout, deadline, context)
    try:
        first = transport.client_handshake(conn, authkey, deadline, address, connect_timeout)
        conn.send_bytes(protocol.encode_hello(HELLO))
        hello = server_hello(first)
    except ProtocolError:
        conn.close()
        raise
    except TransportError:
        conn.close()
        raise
    except OSError as exc:
        conn.close()
        raise ConnectionClosed(f"connection lost during the handshake: {exc}") from None
    # A plain blocking socket from here on: frames are read and sent by rpc.framing.
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout() says
    return sock, hello.info, None


def _open_tls(
    conn: Connection,
    address: transport.Address,
    authkey: bytes | None,
    connect_timeout: float,
    deadline: float,
    context: ssl.SSLContext,
) -> _Link:
    """:func:`_open`'s steps inside TLS, on the socket the connection keeps from then on."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    sock.settimeout(None)  # blocking: rpc.tls waits with poll() under the deadline
    try:
        session = transport.start_tls(sock, context, address, deadline, connect_timeout)
        first = transport.client_handshake(sock, authkey, deadline, address, connect_timeout, session)
        session.send_frame(protocol.encode_hello(HELLO), deadline)
        hello = server_hello(first)
    except TransportError:
        sock.close()
        raise
    except (OSError, framing.SendTimeout) as exc:
        sock.close()
        raise ConnectionClosed(f"connection lost during the handshake: {exc}") from None
    return sock, hello.info, session


def _call_timeout(pending: _Pending) -> CallTimeout:
    return CallTimeout(f"call {pending.name!r} got no answer within its timeout of {pending.timeout:g} s")


def _exception(info: protocol.ErrorInfo) -> RPCError:
    if info.code == RemoteError.code:
        cls = remote_error_class(info.type_name)
        return cls(info.message, *info.args, type_name=info.type_name, remote_traceback=info.traceback)
    return error_for_code(info.code)(info.message)


def connect(
    address: transport.Address | Sequence[transport.Address],
    authkey: bytes | None = None,
    timeout: float | None = None,
    *,
    connect_timeout: float = 10.0,
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    reconnect: bool = True,
    tls: TLSOption = None,
) -> Client:
    """Connect and authenticate to the server at ``address``; returns a :class:`Client`.

    ``address`` is ``(host, port)``, ``"HOST:PORT"``, or a Unix socket path; or a
    list of them, for several servers of the same functions: the client is connected
    to one at a time, starting at a random one, and moves on to the next when a
    connect fails, the server goes away (it drains) or answers ``ServerBusy``.
    ``authkey`` is the server's key as bytes (:func:`rpc.read_authkey` reads the
    key file ``rpc serve`` uses). ``timeout`` is each call's default deadline in
    seconds (None: no deadline); ``connect_timeout`` bounds connecting and the
    whole handshake. A timeout that is not a finite number > 0 raises ValueError.
    ``reconnect`` (default True): a call made after the connection ended (the server
    closed it, or restarted) first opens a new one, within ``connect_timeout`` and
    the call's timeout; and a call that did not run (``ServerShuttingDown``; a request
    the server had not read when it went away; ``ServerBusy``, with other addresses)
    is made again on the next connection within its timeout. A call that may have
    run is never made again: it fails with ``ConnectionClosed``.

    ``tls`` connects with TLS (the server's ``tls_cert_file``): True trusts the
    system's CAs; a path names a CA file (PEM) to trust instead; an
    :class:`ssl.SSLContext` is used as given (for a client certificate, or other
    settings). The server's certificate must hold the address's host (a name, or an
    IP address), unless a given context has ``check_hostname`` off. The authkey
    handshake then runs inside TLS. A certificate that does not verify, or a server
    without TLS, raises :class:`TLSError` saying which.
    """
    return Client(
        address,
        authkey=authkey,
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_message_bytes=max_message_bytes,
        reconnect=reconnect,
        tls=tls,
    )
