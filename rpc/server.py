"""The server: the public object that owns a router thread and its handler processes.

``Server`` turns a config into running parts: a listening socket, one thread
running the router's event loop (:mod:`rpc.router`: every socket, every handler
pipe, every timer) and, through the router, the handler processes
(:mod:`rpc.arbiter`). Its methods are called from the user's threads and reach
the loop with thread-safe calls; nothing on a call's path goes through here.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
import weakref
from typing import Any

from . import __version__, protocol, transport
from .config import ServerConfig, check_registry_spec
from .errors import ConfigError, StartupError
from .handler import HandlerSettings
from .logs import make_logger, open_log_file
from .metrics import MetricsEndpoint
from .registry import Registry, import_string_of
from .router import Router

__all__ = ["Server"]

_SIGNAL_CHECK_SECONDS = 0.2

# Servers still running when the interpreter exits are closed first: their
# handler processes are not daemonic, and multiprocessing would wait for them.
_running_servers: weakref.WeakSet[Server] = weakref.WeakSet()


@atexit.register
def _close_running_servers() -> None:
    for server in list(_running_servers):
        server.close(grace=min(server.config.shutdown_grace, 2.0))


def new_event_loop(choice: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """The router's loop and its name: uvloop where installed (for "auto"), else asyncio's own.

    For "auto", the ``RPC_EVENT_LOOP`` variable may name the loop instead (tests run
    the whole suite on each loop this way).
    """
    if choice == "auto":
        choice = os.environ.get("RPC_EVENT_LOOP") or "auto"
        if choice not in ("auto", "uvloop", "asyncio"):
            raise ConfigError(f"RPC_EVENT_LOOP must be auto, uvloop or asyncio, not {choice!r}")
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event_loop is 'uvloop' but uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


class Server:
    """An rpc server: a listening socket, a router thread, and a pool of handler processes.

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
        handler_settings = HandlerSettings(
            self.registry_spec,
            config.max_message_bytes,
            config.tracebacks,
            config.log_level,
            config.log_format,
            config.log_file,
            config.handler_memory_limit,
            config.max_call_seconds,
            config.access_log,
            config.send_timeout or None,
            count_lent_calls=config.metrics_address is not None,
        )
        hello = protocol.encode_hello(
            {"server": "rpc", "version": __version__, "max_message_bytes": config.max_message_bytes}
        )
        self._router = Router(config, handler_settings, hello, self._log)
        self._listener: transport.ListeningSocket | None = None
        self._metrics_listener: transport.ListeningSocket | None = None
        self._metrics: MetricsEndpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def address(self) -> transport.Address:
        """The bound address: ``(host, port)`` with the real port, or the Unix socket path."""
        if self._listener is None:
            return self.config.address
        return self._listener.address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``/healthz`` and ``/metrics`` are served (the real port once started), or None."""
        if self._metrics_listener is None:
            return self.config.metrics_address
        address = self._metrics_listener.address
        assert not isinstance(address, str)
        return address

    def start(self) -> Server:
        """Listen, start the handlers, and begin accepting; returns when ready to serve."""
        with self._lock:
            if self._started:
                return self
            self._started = True
        config = self.config
        self._listener = transport.ListeningSocket(config.address, config.backlog, config.unix_socket_mode)
        try:
            if config.metrics_address is not None:
                # Bound before the handlers start, so a port in use fails the start at once.
                try:
                    self._metrics_listener = transport.ListeningSocket(config.metrics_address, 64)
                except StartupError as exc:
                    raise StartupError(f"{exc.message} (for /healthz and /metrics)") from exc.__cause__
            self._loop, loop_name = new_event_loop(config.event_loop)
            self._thread = threading.Thread(target=self._loop.run_forever, name="rpc-router", daemon=True)
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._router.start(self._listener.sock), self._loop).result()
            if self._metrics_listener is not None:
                self._metrics = MetricsEndpoint(self._router, self._closing.is_set, self._log)
                asyncio.run_coroutine_threadsafe(self._metrics.start(self._metrics_listener.sock), self._loop).result()
        except BaseException:
            self._stop_loop()
            self._listener.close()
            if self._metrics_listener is not None:
                self._metrics_listener.close()
            self._close_log()
            self._closing.set()
            self._closed.set()
            raise
        _running_servers.add(self)
        self._log.info(
            "listening",
            address=transport.format_address(self.address),
            workers=config.workers,
            registry=self.registry_spec,
            authenticated=config.authkey is not None,
            event_loop=loop_name,
        )
        if self._metrics_listener is not None:
            self._log.info(
                "metrics_listening",
                address=transport.format_address(self._metrics_listener.address),
                paths="/healthz /metrics",
                note="/metrics shows method names and call counts to whoever can reach it: keep it on a private network",
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
        with self._lock:
            closing = self._closing.is_set()
            self._closing.set()
        if closing:
            self._closed.wait()
            return
        if not self._started:
            self._close_log()
            self._closed.set()
            return
        grace = self.config.shutdown_grace if grace is None else grace
        self._log.info("shutdown_begun", grace=grace)
        assert self._loop is not None
        connections = len(self._router.connections)
        try:
            # /healthz answers 503 from now (self._closing is set) until the endpoint closes here.
            unfinished = asyncio.run_coroutine_threadsafe(self._router.close(grace), self._loop).result()
            if self._metrics is not None:
                asyncio.run_coroutine_threadsafe(self._metrics.close(), self._loop).result()
        finally:
            self._stop_loop()
            if self._listener is not None:
                self._listener.close()
            if self._metrics_listener is not None:
                self._metrics_listener.close()
        self._log.info("shutdown_finished", connections=connections, unfinished_calls=unfinished)
        _running_servers.discard(self)
        self._close_log()
        self._closed.set()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        if thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
        loop.close()

    def _close_log(self) -> None:
        if self._log_stream is not None:
            self._log_stream.close()

    def abort(self) -> None:
        """Make a :meth:`close` under way stop now: calls in flight are cut off."""
        self._log.warning("shutdown_forced")
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._router.hurry)

    def reload(self) -> bool:
        """Replace the handlers one at a time with freshly imported code; no call fails.

        Returns False (and keeps the running handlers) if the new code cannot be imported.
        """
        self._log.info("reload_begun")
        if self._loop is None or self._closing.is_set():
            return False
        done = asyncio.run_coroutine_threadsafe(self._router.arbiter.reload(), self._loop)
        while True:  # in steps: a close() meanwhile stops the loop, and the reload with it
            try:
                return done.result(timeout=_SIGNAL_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                if self._closed.is_set():
                    return False
            except concurrent.futures.CancelledError:
                return False

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def handler_pids(self) -> list[int]:
        """Process ids of the live handler processes."""
        return self._router.arbiter.pids()
