"""Handler processes: start, watch, replace, reload, stop. Never touches request bytes.

Each of the ``workers`` slots holds one handler process at a time. A slot's task
(:meth:`Arbiter._run_slot`) starts a handler, hands its pipe to the router, waits
until the router reports the pipe closed (the handler exited or was killed),
collects the process and starts the next one. Blocking steps (starting a process
and waiting for its hello, joining it) run on a small thread pool, off the
router's loop; signals are sent from the loop, and never to a process whose
slot task has begun collecting it, so a recycled pid is never signalled.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any

from . import handler, lease, protocol
from .errors import RPCError, StartupError
from .framing import FrameReader
from .logs import Logger

__all__ = ["ArbiterSettings", "Handler", "Arbiter"]

_HELLO_LIMIT = 1 << 20  # a handler's hello, or its report of why the registry failed to import
_PIPE_BUFFER = 4 << 20  # bytes the kernel may hold each way on a handler's pipe (capped by net.core.*mem_max)
_KILL_AFTER = 1.0  # seconds between SIGTERM and SIGKILL for a handler being stopped


class _Processes:
    """Starts and reaps handler processes for the arbiter's threads, one thread at a time.

    multiprocessing is not safe here across threads: ``Process.start()`` polls every
    child not yet joined, and a forkserver child's poll reads its exit status from its
    sentinel descriptor. Polled while another thread closes that process, the number
    can be reused meanwhile (by a new handler's pipe, say), and the poll then reads, or
    blocks reading, someone else's bytes: a new handler lost the first 8 bytes of a
    request that way. So each call into a Process runs under one lock, and waiting for
    an exit is done outside it, on the sentinel, which only :meth:`reap` closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def start(self, process: Any) -> None:
        with self._lock:
            process.start()

    def kill(self, process: Any) -> None:
        with self._lock:
            process.kill()

    def exited(self, process: Any, timeout: float | None) -> bool:
        """Whether ``process`` exits within ``timeout`` seconds (None: however long it takes)."""
        return bool(wait([process.sentinel], timeout))

    def reap(self, process: Any) -> int | None:
        """Collect a process that has exited (see :meth:`exited`): its exit code. Its
        descriptors are closed now, rather than whenever it is garbage collected."""
        with self._lock:
            process.join()  # it has exited: this only takes its status
            code: int | None = process.exitcode
            process.close()
        return code


@dataclass(frozen=True)
class ArbiterSettings:
    workers: int
    start_method: str
    startup_timeout: float


class Handler:
    """One handler process in a slot."""

    def __init__(self, slot: int, process: Any, pipe: socket.socket, call_state: Any) -> None:
        self.slot = slot
        self.call_state = call_state  # shared memory: a call it runs on a lent socket (rpc.lease)
        self.process = process
        self.pid: int = process.pid
        self.pipe = pipe  # the supervisor's end; the router reads and writes it
        self.kill_reason: str | None = None  # set when the supervisor stops it
        self.pipe_error: Exception | None = None  # why the supervisor's end of its pipe failed, if it did
        self.reaping = False  # being collected: signal it no more
        self.retired = False  # replaced by a reload
        # The id of the call on a lent socket it was stopped to cancel (the kill may land on the next one).
        self.cancelled: int | None = None
        self.streams: frozenset[str] = frozenset()  # its generator functions' names: never lent (rpc.streams)
        self.methods: tuple[str, ...] = ()  # the names its registry has, as its hello listed them (rpc.metrics)
        self.end_input: Callable[[], None] = self._shutdown_pipe  # the router's way, once it serves the pipe

    def _shutdown_pipe(self) -> None:
        try:
            self.pipe.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def signal(self, signum: int) -> None:
        if self.reaping:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


# What the router does with a ready handler: serve its pipe until it closes.
Attach = Callable[[Handler], Awaitable[None]]


class Arbiter:
    """The handler processes of one server."""

    def __init__(
        self,
        settings: ArbiterSettings,
        handler_settings: handler.HandlerSettings,
        log: Logger,
        attach: Attach,
        retire: Callable[[int], None],
        lost: Callable[[Handler, str], None],
    ) -> None:
        self._settings = settings
        self._handler_settings = handler_settings
        self._log = log
        self._attach = attach
        self._retire = retire  # the router stops giving the slot calls and lets its handler exit
        self._lost = lost  # the router fails the call a collected handler held
        # Handlers never fork the supervisor, which runs threads (config refuses "fork").
        self._context: SpawnContext | ForkServerContext
        if settings.start_method == "forkserver":
            self._context = multiprocessing.get_context("forkserver")
        else:
            self._context = multiprocessing.get_context("spawn")
        self._threads = ThreadPoolExecutor(max_workers=min(settings.workers + 2, 32), thread_name_prefix="rpc-arbiter")
        self._processes = _Processes()  # every call into a handler's Process, from those threads
        self.handlers: list[Handler | None] = [None] * settings.workers
        # One per slot, kept across replacements: a dead handler's state is read after it is gone.
        self._call_states = [self._context.RawArray("q", lease.SHARED_SIZE) for _ in range(settings.workers)]
        self._tasks: list[asyncio.Task[None]] = []
        self._replaced: list[asyncio.Event] = []
        self._stopping = False

    # -- start and run ------------------------------------------------------------------

    async def start(self) -> None:
        """Start every slot's handler; raises StartupError (with every handler stopped) if one fails."""
        first: list[asyncio.Future[str | None]] = []
        loop = asyncio.get_running_loop()
        for slot in range(self._settings.workers):
            ready: asyncio.Future[str | None] = loop.create_future()
            first.append(ready)
            self._replaced.append(asyncio.Event())
            self._tasks.append(asyncio.create_task(self._run_slot(slot, ready), name=f"rpc-slot-{slot}"))
        errors = [error for error in await asyncio.gather(*first) if error is not None]
        if errors:
            await self.stop(0)
            raise StartupError(errors[0])

    async def _run_slot(self, slot: int, ready: asyncio.Future[str | None]) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not self._stopping:
            started = await loop.run_in_executor(self._threads, self._start, slot)
            if isinstance(started, str):
                if not ready.done():
                    ready.set_result(started)
                    return
                if self._stopping:
                    return
                self._log.error("handler_start_failed", slot=slot, error=started)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            self.handlers[slot] = started
            if self._stopping:
                started.end_input()  # stop() began while it started: let it exit
            if not ready.done():
                ready.set_result(None)
            self._log.info("handler_started", slot=slot, pid=started.pid)
            self._replaced[slot].set()
            try:
                await self._attach(started)  # returns once its pipe has closed
            except Exception:  # the handler is still collected and replaced
                self._log.exception("handler_attach_failed", slot=slot, pid=started.pid)
                started.signal(signal.SIGKILL)
            started.reaping = True
            code = await loop.run_in_executor(self._threads, self._collect, started.process)
            self.handlers[slot] = None
            # A retired handler that exits by itself was reloaded; one that crashed is reported as such.
            reason = started.kill_reason or ("reload" if started.retired and code == 0 else _exit_reason(code))
            if reason == "exited with code 0" and not self._stopping:
                # Unasked: its function called os._exit(0), or its pipe failed (said, to find out why).
                failed = started.pipe_error
                reason += " without being asked to" + (f" (the supervisor's end of its pipe failed: {failed!r})" if failed else "")
            try:
                self._lost(started, reason)
            except Exception:  # the slot must be refilled whatever answering its call raised
                self._log.exception("handler_lost_failed", slot=slot, pid=started.pid)
            if self._stopping:
                return
            if reason == "reload":
                self._log.info("handler_reloading", slot=slot, pid=started.pid)
            else:
                self._log.warning("handler_replaced", slot=slot, pid=started.pid, reason=reason)

    def _start(self, slot: int, log: bool = True) -> Handler | str:
        """Start a handler and wait for its hello (on a pool thread); the handler, or why it failed."""
        try:
            return self._start_process(slot)
        except Exception as exc:  # out of descriptors or memory for its pipe, say: retried with a backoff
            return f"cannot start a handler process: {exc}"

    def _start_process(self, slot: int) -> Handler | str:
        call_state = self._call_states[slot] if slot >= 0 else None
        parent, child = socket.socketpair()
        for end in (parent, child):
            # Room for a large request or reply in one write, rather than many wake-ups per frame.
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _PIPE_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _PIPE_BUFFER)
        child_conn = Connection(child.detach())
        process = self._context.Process(
            target=handler.run,
            args=(child_conn, self._handler_settings, call_state),
            name=f"rpc-handler-{slot}",
            # Not daemonic, so exposed functions may start processes of their own. A
            # handler exits by itself when the supervisor dies (see rpc.handler).
            daemon=False,
        )
        try:
            self._processes.start(process)
        except Exception as exc:
            parent.close()
            child_conn.close()
            return f"cannot start a handler process: {exc}"
        child_conn.close()  # so the supervisor reads EOF when the handler dies
        error = None
        reaped = False
        streams: frozenset[str] = frozenset()
        methods: tuple[str, ...] = ()
        try:
            deadline = time.monotonic() + self._settings.startup_timeout
            first = FrameReader(parent.fileno(), _HELLO_LIMIT).read(deadline)
            if first is None:
                error = f"handler did not start within {self._settings.startup_timeout:g} s"
            else:
                try:
                    hello = protocol.decode_hello(first).info
                    names = hello.get("streams")
                    streams = frozenset(name for name in names if type(name) is str) if type(names) is list else frozenset()
                    names = hello.get("methods")
                    methods = tuple(name for name in names if type(name) is str) if type(names) is list else ()
                except RPCError:
                    info = protocol.decode_response(first).error
                    error = _import_failure(self._handler_settings.registry, info) if info else "bad hello"
        except (EOFError, OSError):
            reaped = self._processes.exited(process, 1.0)
            code = self._processes.reap(process) if reaped else None
            error = (
                f"handler exited while starting ({_exit_reason(code)}); its traceback is on stderr. "
                "Handlers import the main module first: run from a file whose server starts under "
                "`if __name__ == '__main__':`"
            )
        if error is not None:
            parent.close()
            if not reaped:
                self._processes.kill(process)
                self._processes.exited(process, None)
                self._processes.reap(process)
            return error
        parent.setblocking(False)
        started = Handler(slot, process, parent, call_state)
        started.streams = streams
        started.methods = methods
        return started

    def _collect(self, process: Any, patience: float = 5.0) -> int | None:
        """Reap a handler whose pipe closed (on a pool thread), killed if it has not exited
        within ``patience`` seconds; its exit code."""
        if not self._processes.exited(process, patience):
            self._processes.kill(process)
            self._processes.exited(process, None)
        return self._processes.reap(process)

    # -- stopping one -------------------------------------------------------------------

    def kill(self, slot: int, reason: str) -> None:
        """Stop the slot's handler for ``reason``: SIGTERM now, SIGKILL if it lingers."""
        target = self.handlers[slot]
        if target is None or target.kill_reason is not None:
            return
        target.kill_reason = reason
        target.signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(_KILL_AFTER, target.signal, signal.SIGKILL)

    def pids(self) -> list[int]:
        return [h.pid for h in self.handlers if h is not None]

    # -- reload and stop ----------------------------------------------------------------

    async def reload(self) -> bool:
        """Replace the handlers one at a time with processes that import the code afresh.

        A probe handler imports the registry first; if that fails, nothing is
        replaced. Each handler finishes its current call before it is replaced,
        and the others keep serving meanwhile, so no call fails.
        """
        loop = asyncio.get_running_loop()
        error = await loop.run_in_executor(self._threads, self._probe)
        if error is not None:
            self._log.error("reload_failed", error=error)
            return False
        for slot in range(self._settings.workers):
            if self._stopping:
                return False
            old = self.handlers[slot]
            if old is None:
                continue  # being replaced already: the new one imports the new code
            old.retired = True
            self._replaced[slot].clear()
            self._retire(slot)
            try:
                await asyncio.wait_for(self._replaced[slot].wait(), self._settings.startup_timeout + 10)
            except asyncio.TimeoutError:
                self._log.error("reload_failed", error=f"handler {slot} was not replaced in time")
                return False
            if self._stopping:
                return False
        self._log.info("reload_finished", workers=self._settings.workers)
        return True

    def _probe(self) -> str | None:
        """Start a throwaway handler to check that the registry imports; an error or None."""
        probe = self._start(-1)
        if isinstance(probe, str):
            return probe
        probe.pipe.close()
        self._collect(probe.process, 10.0)
        return None

    async def stop(self, grace: float) -> None:
        """Stop every handler: end its pipe (it exits after its call), then SIGTERM, then SIGKILL."""
        self._stopping = True
        for replaced in self._replaced:
            replaced.set()  # a reload waiting for a replacement gives up
        for target in self.handlers:
            if target is not None:
                target.end_input()
        tasks = [task for task in self._tasks if not task.done()]
        for signum, wait_seconds in ((None, grace), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
            if signum is not None:
                for target in self.handlers:
                    if target is not None:
                        target.signal(signum)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=max(wait_seconds, 0.01))
                tasks = list(pending)
            if not tasks:
                break
        self._threads.shutdown(wait=False)




def _import_failure(registry: str, info: protocol.ErrorInfo) -> str:
    """Why handlers cannot import the registry, with the traceback that says where."""
    text = f"handlers cannot import the registry {registry!r}: {info.message}"
    return f"{text}\n{info.traceback.rstrip()}" if info.traceback else text


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
