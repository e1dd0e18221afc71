"""The servers under test, each in its own process as deployed: rpc and its baselines.

- :class:`RpcServer`: ``rpc.Server``. Its own process is the supervisor (the
  "router"); its handler processes are that process's descendants.
- :class:`EchoServer`: the raw transport, a ``multiprocessing.connection``
  ``send_bytes``/``recv_bytes`` echo, a thread per connection.
- :class:`MsgpackServer`: the plain thread-per-connection ``Listener`` that decodes
  a msgpack request, calls the function and sends a msgpack reply.
- :class:`ManagersServer`: ``multiprocessing.managers`` serving :class:`services.Calc`.

Each reports its bound address and pid; every wait on it is bounded, and a server
whose parent has gone stops by itself.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener
from multiprocessing.managers import BaseManager
from typing import Any, Protocol, Self

import msgpack  # type: ignore[import-untyped]

import rpc

from . import services
from .procs import descendants, raise_nofile

AUTHKEY = b"bench-" + b"k" * 32
# Client processes and baseline servers fork from a forkserver that has imported rpc
# and the bench already, so each starts in milliseconds, not a tenth of a second.
# rpc servers start as deployed, in a fresh interpreter (spawn), and start their
# handlers with rpc's own start method.
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["bench.load"])
SPAWN = multiprocessing.get_context("spawn")
START_TIMEOUT = 120.0  # seconds for a server to start on a loaded machine
STOP_TIMEOUT = 30.0  # seconds for a server to stop before it is killed


class BenchError(Exception):
    """A measurement could not be made; the message says why."""


def nodelay(conn: Connection) -> None:
    """TCP_NODELAY on a Connection's socket: without it, small frames may wait ~40 ms (Nagle)."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


def wait_for_report(reports: Any, processes: list[Any], timeout: float) -> Any:
    """The next report from ``processes`` within ``timeout`` s (else queue.Empty).

    ChildProcessError if one of them has ended without a report: nothing is
    waited for that cannot come.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return reports.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        except queue.Empty:
            ended = [p.exitcode for p in processes if p.exitcode is not None]
            if ended:
                try:
                    return reports.get(timeout=1.0)  # its last words may still be in the pipe
                except queue.Empty:
                    raise ChildProcessError(f"process ended (exit code {ended[0]}) without a report") from None
            if time.monotonic() >= deadline:
                raise


def _wait_for_stop(stop: Any, parent: int) -> None:
    """Until told to stop, or until ``parent`` (our parent when we started) has gone."""
    while not stop.wait(1.0):
        if os.getppid() != parent:
            return


def _main(serve: Callable[..., None], bound: Any, stop: Any, *args: Any) -> None:
    """A server process: ``serve`` puts (address, pid) on ``bound``; a failure to start is put there as text."""
    try:
        serve(bound, stop, os.getppid(), *args)
    except Exception:
        bound.put(traceback.format_exc())
        raise SystemExit(1) from None


class ServerProcess:
    """A server in a child process. Use as a context manager."""

    address: Any
    pid: int

    def __init__(self, serve: Callable[..., None], *args: Any, daemon: bool = True, context: Any = CTX) -> None:
        self._bound: Any = context.Queue()
        self._stop = context.Event()
        self.process = context.Process(target=_main, args=(serve, self._bound, self._stop, *args), daemon=daemon)

    def __enter__(self) -> Self:
        self.process.start()
        try:
            got = wait_for_report(self._bound, [self.process], START_TIMEOUT)
        except queue.Empty:
            self.stop()
            raise BenchError(f"{type(self).__name__} did not start within {START_TIMEOUT:g} s") from None
        except ChildProcessError as exc:
            self.stop()
            raise BenchError(f"{type(self).__name__} {exc}") from None
        if isinstance(got, str):
            self.stop()
            raise BenchError(f"{type(self).__name__} failed to start:\n{got}")
        self.address, self.pid = got
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask it to stop; kill it (and its children) if it has not within STOP_TIMEOUT."""
        children = descendants(self.process.pid) if self.process.pid and self.process.is_alive() else []
        self._stop.set()
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        for pid in children:  # handlers of a server that was killed, or that left them behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pids(self) -> list[int]:
        """Every process of the server: itself and its descendants."""
        return [self.pid, *descendants(self.pid)]

    def groups(self) -> dict[str, list[int]]:
        """Its processes, named as the CPU table names them."""
        return {"server": [self.pid]}


# -- rpc ---------------------------------------------------------------------------------


def _serve_rpc(bound: Any, stop: Any, parent: int, address: Any, options: dict[str, Any], nofile: int | None) -> None:
    if nofile:
        raise_nofile(nofile)
    with rpc.Server(services.registry, address=address, authkey=AUTHKEY, log_level="warning", **options) as server:
        bound.put((server.address, os.getpid()))
        _wait_for_stop(stop, parent)


class RpcServer(ServerProcess):
    """``rpc.Server`` in its own process. ``options`` are ServerConfig fields (workers, event_loop, ...).

    ``nofile``: raise the process's RLIMIT_NOFILE towards this first, as the daemon would.
    """

    kind = "rpc"

    def __init__(self, address: Any, nofile: int | None = None, **options: Any) -> None:
        options.setdefault("workers", os.cpu_count() or 1)
        self.workers: int = options["workers"]
        # Not daemonic: a daemonic process may not start the handler processes.
        super().__init__(_serve_rpc, address, options, nofile, daemon=False, context=SPAWN)

    def groups(self) -> dict[str, list[int]]:
        return {"router": [self.pid], "handlers": descendants(self.pid)}


# -- the raw transport ---------------------------------------------------------------------


def _accept_forever(listener: Listener, serve_one: Callable[[Connection], None]) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:
            continue  # a client that failed the handshake
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def _echo(conn: Connection) -> None:
    nodelay(conn)
    with conn:
        while True:
            try:
                conn.send_bytes(conn.recv_bytes())
            except (EOFError, OSError):
                return


def _serve_listener(bound: Any, stop: Any, parent: int, address: Any, serve_one: Callable[[Connection], None]) -> None:
    listener = Listener(address, authkey=AUTHKEY, backlog=1024)
    threading.Thread(target=_accept_forever, args=(listener, serve_one), daemon=True).start()
    bound.put((listener.address, os.getpid()))
    _wait_for_stop(stop, parent)


class EchoServer(ServerProcess):
    """The raw transport: a multiprocessing.connection echo, a thread per connection."""

    kind = "raw"

    def __init__(self, address: Any) -> None:
        super().__init__(_serve_listener, address, _echo)


# -- a plain Listener + msgpack RPC server -------------------------------------------------------


def _answer_msgpack(conn: Connection) -> None:
    nodelay(conn)
    with conn:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            _, request_id, method, args, kwargs, _ = msgpack.unpackb(data)
            try:
                reply = [1, request_id, None, services.FUNCTIONS[method](*args, **kwargs)]
            except Exception as exc:
                reply = [1, request_id, {"type": type(exc).__name__, "message": str(exc)}, None]
            try:
                conn.send_bytes(msgpack.packb(reply))
            except OSError:
                return


class MsgpackServer(ServerProcess):
    """What a user might write instead of rpc: Listener, a thread per connection, msgpack."""

    kind = "msgpack"

    def __init__(self, address: Any) -> None:
        super().__init__(_serve_listener, address, _answer_msgpack)


# -- multiprocessing.managers --------------------------------------------------------------------


class CalcManager(BaseManager):
    pass


CalcManager.register("Calc", services.Calc)


class ManagersServer:
    """multiprocessing.managers serving Calc, in the process the manager starts."""

    kind = "managers"

    def __init__(self, address: Any) -> None:
        self.manager = CalcManager(address=address, authkey=AUTHKEY, ctx=CTX)

    def __enter__(self) -> ManagersServer:
        self.manager.start()
        self.address: Any = self.manager.address
        process = self.manager._process  # type: ignore[attr-defined]  # the server's process, for its CPU time
        self.pid: int = process.pid
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.shutdown()  # bounded: joins, then terminates

    def pids(self) -> list[int]:
        return [self.pid]

    def groups(self) -> dict[str, list[int]]:
        return {"server": [self.pid]}


class Server(Protocol):
    """What the sections use of any of the servers above."""

    kind: str  # how a client talks to it: see callers.connect
    address: Any
    pid: int

    def pids(self) -> list[int]: ...

    def groups(self) -> dict[str, list[int]]: ...
