"""The server: listen, authenticate, read requests, hand them to the handler pool.

Threads of the supervisor process: one accepts connections; one per connection
authenticates it (under a deadline) and then reads its frames; one per handler
slot routes replies (see :mod:`rpc.supervisor`); one housekeeper enforces
handshake and call deadlines. The server reads only each request's envelope and
forwards the frame to a handler untouched.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
import time
import weakref
from multiprocessing.connection import wait
from typing import Any

from . import __version__, protocol, transport
from .config import ServerConfig, check_registry_spec
from .errors import (
    AuthenticationError,
    ConfigError,
    MessageTooLarge,
    ProtocolError,
    RPCError,
    ServerBusy,
)
from .connection import ClientConnection
from .handler import HandlerSettings
from .logs import Throttle, make_logger, open_log_file
from .registry import Registry, import_string_of
from .supervisor import Call, HandlerPool, PoolSettings

__all__ = ["Server"]

PING = "_rpc.ping"
_SIGNAL_CHECK_SECONDS = 0.2
HOUSEKEEPING_INTERVAL = 0.05  # seconds: the resolution of handshake and call deadlines
_DESCRIPTOR_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Servers still running when the interpreter exits are closed first: their
# handler processes are not daemonic, and multiprocessing would wait for them.
_running_servers: weakref.WeakSet[Server] = weakref.WeakSet()


@atexit.register
def _close_running_servers() -> None:
    for server in list(_running_servers):
        server.close(grace=min(server.config.shutdown_grace, 2.0))


class Server:
    """An rpc server: a listening socket and a pool of handler processes.

    ``registry`` is a :class:`Registry` defined at module level, or its import
    string ``"pkg.module:registry"``. Other keywords are :class:`ServerConfig`
    fields. Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        registry: Registry | str,
        address: transport.Address = ("127.0.0.1", 0),
        *,
        config: ServerConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ConfigError("pass either config= or server options, not both")
        self.config = config if config is not None else ServerConfig.build(address=address, **options)
        # A malformed import string fails here, once, not in every handler as it starts.
        self.registry_spec = check_registry_spec(registry) if isinstance(registry, str) else import_string_of(registry)
        config = self.config
        self._log_stream = open_log_file(config.log_file) if config.log_file else None
        self._log = make_logger(config.log_level, config.log_format, self._log_stream, component="rpc.server")
        # A client can send notifications faster than anything can log each one dropped.
        self._notification_dropped = Throttle("notification_dropped")
        self._pool = HandlerPool(
            PoolSettings(
                workers=config.workers,
                max_pending=config.max_pending,
                max_call_seconds=config.max_call_seconds,
                start_method=config.start_method,
                startup_timeout=config.startup_timeout,
                access_log=config.access_log,
                lease=config.lease,
            ),
            HandlerSettings(
                self.registry_spec,
                config.max_message_bytes,
                config.tracebacks,
                config.log_level,
                config.log_format,
                config.log_file,
                config.handler_memory_limit,
                config.max_call_seconds,
                config.access_log,
            ),
            self._log,
        )
        self._listener: transport.ListeningSocket | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._connections: set[ClientConnection] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._handlers_stopped = threading.Event()
        self._started = False
        self._hello = protocol.encode_hello(
            {"server": "rpc", "version": __version__, "max_message_bytes": config.max_message_bytes}
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def address(self) -> transport.Address:
        """The bound address: ``(host, port)`` with the real port, or the Unix socket path."""
        if self._listener is None:
            return self.config.address
        return self._listener.address

    def start(self) -> Server:
        """Listen, start the handlers, and begin accepting; returns when ready to serve."""
        if self._started:
            return self
        self._started = True
        self._listener = transport.ListeningSocket(self.config.address, self.config.backlog, self.config.unix_socket_mode)
        try:
            self._pool.start()
        except BaseException:
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._close_log()
            self._closing.set()
            self._closed.set()
            raise
        _running_servers.add(self)
        self._spawn(self._accept_loop, "rpc-accept")
        self._spawn(self._housekeeping, "rpc-housekeeping")
        self._log.info(
            "listening",
            address=transport.format_address(self.address),
            workers=self.config.workers,
            registry=self.registry_spec,
            authenticated=self.config.authkey is not None,
        )
        return self

    def serve_forever(self) -> None:
        """Start if needed, then block until :meth:`close` is called (from another thread).

        Ctrl-C (SIGINT) raises KeyboardInterrupt here, as in any Python program.
        """
        self.start()
        # Wait in short steps: the kernel may deliver a signal to any of the server's
        # threads, and a wait with no timeout would not wake to run its Python handler.
        while not self._closed.wait(_SIGNAL_CHECK_SECONDS):
            pass

    def close(self, grace: float | None = None) -> None:
        """Stop accepting, let calls in flight finish within ``grace`` s, stop the handlers."""
        if self._closing.is_set():
            self._closed.wait()
            return
        self._closing.set()
        if not self._started:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._close_log()
            self._closed.set()
            return
        grace = self.config.shutdown_grace if grace is None else grace
        self._log.info("shutdown_begun", grace=grace)
        os.write(self._wake_w, b"x")
        unfinished = self._pool.drain(grace)
        with self._lock:
            clients = list(self._connections)
        for client in clients:
            client.drop("the server is shutting down", level="info")
        self._pool.stop()
        self._handlers_stopped.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(5.0)
        if self._listener is not None:
            self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._notification_dropped.flush()
        self._log.info("shutdown_finished", connections=len(clients), unfinished_calls=unfinished)
        _running_servers.discard(self)
        self._close_log()
        self._closed.set()

    def _close_log(self) -> None:
        if self._log_stream is not None:
            self._log_stream.close()

    def abort(self) -> None:
        """Make a :meth:`close` under way stop now: calls in flight are cut off."""
        self._log.warning("shutdown_forced")
        self._pool.hurry()

    def reload(self) -> bool:
        """Replace the handlers one at a time with freshly imported code; no call fails.

        Returns False (and keeps the running handlers) if the new code cannot be imported.
        """
        self._log.info("reload_begun")
        return self._pool.reload()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def handler_pids(self) -> list[int]:
        """Process ids of the live handler processes."""
        return self._pool.pids()

    # -- threads -----------------------------------------------------------------------

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        """Run ``target`` on a tracked thread; RuntimeError if no thread can be started."""
        thread = threading.Thread(target=self._tracked, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.discard(thread)  # never started: close() must not join it
            raise

    def _tracked(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        backoff = 0.05
        while not self._closing.is_set():
            ready = wait([listener, self._wake_r])  # type: ignore[list-item]
            if self._wake_r in ready or self._closing.is_set():
                return
            try:
                accepted = listener.accept()
            except OSError as exc:
                if exc.errno in _DESCRIPTOR_ERRORS:
                    # Out of descriptors or memory: back off rather than spin, then retry.
                    self._log.error("accept_failed", error=os.strerror(exc.errno or 0), retry_in=backoff)
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                else:
                    self._log.warning("accept_failed", error=str(exc))
                continue
            if accepted is not None:
                conn, peer = accepted
                client = ClientConnection(conn, peer, self.config.max_outbox_bytes)
                client.handshake_deadline = time.monotonic() + self.config.handshake_timeout
                with self._lock:
                    self._connections.add(client)
                try:
                    self._spawn(self._serve_connection, f"rpc-conn-{peer}", client)
                except RuntimeError as exc:
                    # No thread to be had (a pids or memory limit): refuse this client, keep
                    # accepting, and back off as when descriptors run out.
                    with self._lock:
                        self._connections.discard(client)
                    client.close()
                    self._log.error("accept_failed", peer=peer, error=f"cannot start a thread: {exc}", retry_in=backoff)
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05

    def _housekeeping(self) -> None:
        while not self._closing.wait(HOUSEKEEPING_INTERVAL):
            try:
                self._housekeeping_step()
            except Exception:  # deadlines must keep being enforced whatever went wrong once
                self._log.exception("housekeeping_failed")
        # Deadlines still apply while calls drain during shutdown.
        while not self._handlers_stopped.wait(HOUSEKEEPING_INTERVAL):
            self._pool.check_deadlines()

    def _housekeeping_step(self) -> None:
        self._pool.check_deadlines()
        now = time.monotonic()
        with self._lock:
            late = [c for c in self._connections if c.handshake_deadline is not None and now >= c.handshake_deadline]
            for client in late:
                client.handshake_deadline = None
                client.timed_out = True
        for client in late:
            transport.shutdown(client.conn)  # wakes the handshake's blocked read
        if self.config.idle_timeout:
            self._drop_idle(now - self.config.idle_timeout)

    def _drop_idle(self, cutoff: float) -> None:
        """Close connections with nothing in flight and no request since ``cutoff``."""
        with self._lock:
            clients = [c for c in self._connections if c.handshake_deadline is None]
        for client in clients:
            since = client.idle_since()
            if since is not None and since < cutoff:
                client.drop(f"idle for longer than idle_timeout ({self.config.idle_timeout:g} s)", level="info")

    # -- one connection ---------------------------------------------------------------

    def _serve_connection(self, client: ClientConnection) -> None:
        log = self._log.bind(peer=client.peer)
        try:
            if self._handshake(client, log):
                self._read_requests(client, log)
        except Exception as exc:  # a bug; the connection still ends with its reason logged
            log.exception("client_dropped", reason=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            client.close()
            self._pool.forget(client)
            with self._lock:
                self._connections.discard(client)

    def _handshake(self, client: ClientConnection, log: Any) -> bool:
        conn = client.conn
        try:
            transport.server_handshake(conn, self.config.authkey)
            conn.send_bytes(self._hello)
            hello = protocol.decode_hello(conn.recv_bytes(65536))
        except (AuthenticationError, ProtocolError, EOFError, OSError) as exc:
            with self._lock:
                timed_out = client.timed_out
                client.handshake_deadline = None
            reason = "handshake timed out" if timed_out else (client.drop_reason or _reason(exc))
            # A peer that closes without a word (a port probe, `rpc serve` checking a socket in
            # use) went away: info. A stalled or wrong handshake is a fault: warning.
            gone = not timed_out and client.drop_reason is None and isinstance(exc, _GONE)
            (log.info if gone else log.warning)("client_rejected", reason=reason)
            return False
        with self._lock:
            client.handshake_deadline = None
        if hello.version != protocol.PROTOCOL_VERSION:
            error = ProtocolError(
                f"protocol version {hello.version} is not supported; this server speaks {protocol.PROTOCOL_VERSION}"
            )
            client.reply(_error_frame(None, error))
            log.warning("client_rejected", reason=error.message)
            return False
        # A client that stops reading its replies must not hold a handler slot forever.
        transport.set_io_timeout(conn, self.config.send_timeout or None, read=False)
        log.debug("client_connected")
        return True

    def _read_requests(self, client: ClientConnection, log: Any) -> None:
        conn = client.conn
        limit = self.config.max_message_bytes
        submit = self._pool.submit
        unserved: bytes | None = None  # the lent request, handed back by a handler that did not run it
        # Lending pays off over repeated calls, so never for: a connection's first call (a
        # one-shot client would only pay for the hand-over), a frame a handler handed back,
        # or the frame after a lease that ended because the client pipelines.
        may_lend = False
        while True:
            client.wait_for_room()  # backpressure: stop reading while its replies pile up unread
            if client.end_reason() is not None:
                _log_end(client, log)  # buffered requests of a dropped client are not served
                return
            lend_this, may_lend = may_lend and unserved is None, True
            try:
                frame = unserved if unserved is not None else conn.recv_bytes(limit)
                unserved = None
            except EOFError:
                _log_end(client, log)
                return
            except OSError as exc:
                if "bad message length" in str(exc) and client.end_reason() is None:
                    # The frame body was not read, so the stream cannot be resynchronised.
                    error = MessageTooLarge(f"message exceeds the server's limit of {limit} bytes")
                    client.reply(_error_frame(None, error))
                    log.warning("client_dropped", reason="message too large", limit=limit)
                    transport.close_after_error(conn)
                else:
                    _log_end(client, log, _reason(exc))
                return
            client.last_read = time.monotonic()
            try:
                envelope = protocol.parse_envelope(frame)
            except ProtocolError as exc:
                client.reply(_error_frame(exc.request_id, exc))
                if exc.request_id is None:
                    log.warning("client_dropped", reason=exc.message)
                    transport.close_after_error(conn)
                    return
                continue
            kind = envelope.kind
            if kind == protocol.REQUEST:
                if envelope.method == PING:
                    client.reply(protocol.encode_response(envelope.id, "pong"))
                    continue
                deadline = None if envelope.timeout is None else time.monotonic() + envelope.timeout
                call = Call(client, envelope.id, envelope.method, frame, deadline)
                if lend_this and client.pending == 0 and self._pool.try_lease(call, client):
                    # A handler serves this socket directly for now; resume when it is back.
                    reason, unserved = client.wait_lease()
                    # A frame the handler left unread is not lent again: it is one the server handles.
                    may_lend = reason not in ("pipelined", "frame")
                    if reason == "broken":
                        client.drop("it stopped reading its replies, or went away: a send on the lent socket failed")
                    elif reason == "closed":
                        log.debug("client_disconnected")
                        return
                    continue
                client.expect_answer(+1)  # before submitting: the answer may come back at once
                try:
                    submit(call)
                except ServerBusy as exc:
                    client.expect_answer(-1)
                    client.reply(_error_frame(envelope.id, exc))
            elif kind == protocol.NOTIFICATION:
                try:
                    submit(Call(None, None, envelope.method, frame, None))
                except ServerBusy:
                    self._notification_dropped(log, method=envelope.method, reason="server busy")
            # Cancel is reserved in this protocol version, and a second hello means nothing.


def _error_frame(request_id: int | None, error: RPCError) -> bytes:
    return protocol.encode_error(request_id, protocol.ErrorInfo(error.code, type(error).__name__, error.message))


def _log_end(client: ClientConnection, log: Any, error: str | None = None) -> None:
    """Log why a connection ended: the server's reason if it dropped the client, else a disconnect."""
    ended = client.end_reason()
    if ended is None:
        log.debug("client_disconnected", **({"reason": error} if error else {}))
    else:
        reason, level = ended
        getattr(log, level)("client_dropped", reason=reason)


_GONE = (EOFError, BrokenPipeError, ConnectionResetError)  # the peer closed its end


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "closed during handshake"
    return str(exc) or type(exc).__name__
