"""The measurements: one section per row of the targets of issue 10, and two more.

Every figure is compared with a baseline measured in the same run on the same
machine. Servers run in their own processes, as deployed. Latency is measured
with every process of the measurement pinned to one CPU (and unpinned beside it,
for information): on these VMs a wake-up that crosses CPUs costs 30-70 us and
varies, so an unpinned sequential loop measures the scheduler. Throughput with
many clients is measured unpinned, over every CPU. Nothing here asserts a timing.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import rpc

from . import services
from .aio import aio
from .streams import streams
from .haproxy import haproxy
from .tls import tls
from .callers import Caller, connect
from .load import IdleConnections, Load, run_clients
from .machine import calibrate_burn
from .procs import SELF, descendants, has_loaded, open_files_limit, pinned, read_cpu, rss_mb, thread_count
from .report import Row, compare
from .servers import AUTHKEY, EchoServer, ManagersServer, MsgpackServer, RpcServer, Server

TCP = ("127.0.0.1", 0)
WARM_UP_CALLS = 200


@dataclass
class Settings:
    rounds: int = 7  # rounds of each sequential measure, taken in turn across systems; medians are reported
    calls: int = 5000  # calls per round of a sequential measure
    seconds: float = 2.0  # length of one throughput run
    load_rounds: int = 3  # throughput runs per system, taken in turn; the median is reported
    clients: int = 8  # client processes of the throughput runs
    burn_ms: float = 20.0  # run time of the CPU-bound function
    burn_calls: int = 10  # calls of it per client per round
    connections: int = 5000  # idle connections held open
    connection_processes: int = 4  # client processes holding them (more if RLIMIT_NOFILE needs it)
    connection_seconds: float = 120.0  # bound on opening them, and again on calling on each
    bulk_sizes: tuple[int, ...] = (1 << 20, 16 << 20)
    bulk_bytes: int = 64 << 20  # bytes echoed per round of a bulk measure


# Tiny rounds: checks that every section runs; the figures mean nothing.
QUICK = Settings(
    rounds=1, calls=50, seconds=0.3, load_rounds=1, clients=2, burn_ms=2, burn_calls=2,
    connections=20, connection_processes=2, connection_seconds=60, bulk_sizes=(1 << 20,), bulk_bytes=2 << 20,
)


def _address(transport: str, tmp: str, name: str) -> Any:
    return TCP if transport == "tcp" else os.path.join(tmp, f"{name}.sock")


def _pin_label(pin: bool) -> str:
    return "pinned" if pin else "unpinned, for information"


# -- timing sequential calls, with each process's CPU ---------------------------------------------


class Timing:
    """Rounds of calls from this process, timed, with the CPU time of each group of processes."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {"client": [SELF], **groups}
        self.per_round: list[float] = []  # seconds per call, one figure per round
        self.calls = 0
        self.cpu = dict.fromkeys(self.groups, 0.0)

    def measure(self, run: Callable[[], int]) -> None:
        """One round: ``run()`` makes some calls and says how many."""
        before = read_cpu(self.groups)
        start = time.perf_counter()
        calls = run()
        elapsed = time.perf_counter() - start
        after = read_cpu(self.groups)
        self.per_round.append(elapsed / calls)
        self.calls += calls
        for name in self.cpu:
            self.cpu[name] += after[name] - before[name]

    @property
    def us(self) -> float:
        """Microseconds per call: the median round."""
        return statistics.median(self.per_round) * 1e6

    @property
    def rate(self) -> float:
        return 1e6 / self.us

    def cpu_us(self) -> dict[str, float]:
        """Microseconds of CPU per call, by group, over every round."""
        return {name: seconds / self.calls * 1e6 for name, seconds in self.cpu.items()}


def repeat(call: Callable[[], Any], calls: int) -> Callable[[], int]:
    def run() -> int:
        for _ in range(calls):
            call()
        return calls

    return run


def _time_in_turn(s: Settings, callers: dict[str, Caller], groups: dict[str, dict[str, list[int]]], calls: int) -> dict[str, Timing]:
    """Rounds of ``calls`` sequential calls through each caller, taken in turn so drift hits all alike."""
    timings = {name: Timing(groups[name]) for name in callers}
    for caller in callers.values():
        repeat(caller.call, min(calls, WARM_UP_CALLS))()
    for _ in range(s.rounds):
        for name, caller in callers.items():
            timings[name].measure(repeat(caller.call, calls))
    return timings


@contextmanager
def _connected(callers: dict[str, Caller]) -> Iterator[dict[str, Caller]]:
    try:
        yield callers
    finally:
        for caller in callers.values():
            caller.close()


# -- 1, 2: many clients, and the CPU each process spends per call ------------------------------------


@dataclass
class Throughput:
    rate: float  # calls/s, the median run
    cpu_us: dict[str, float]  # CPU microseconds per call by group, over every run


def _throughput(s: Settings, servers: dict[str, Server]) -> dict[str, Throughput]:
    """Each server loaded by ``s.clients`` client processes for ``s.seconds``, in turn, ``s.load_rounds`` times."""
    loads: dict[str, list[Load]] = {name: [] for name in servers}
    for _ in range(s.load_rounds):
        for name, server in servers.items():
            loads[name].append(run_clients(server.kind, server.address, s.clients, s.seconds, server.groups()))
    result = {}
    for name, runs in loads.items():
        calls = sum(run.calls for run in runs)
        cpu = {group: sum(run.cpu[group] for run in runs) / calls * 1e6 for group in runs[0].cpu}
        result[name] = Throughput(statistics.median(run.rate for run in runs), cpu)
    return result


def _ceiling(us: float) -> float:
    """The serial bound of a process that spends ``us`` of CPU on each call (0: too little to measure)."""
    return 1e6 / us if us > 0 else 0.0


def many_clients(s: Settings) -> list[Row]:
    with RpcServer(TCP) as ours, ManagersServer(TCP) as managers, MsgpackServer(TCP) as plain:
        got = _throughput(s, {"rpc": ours, "managers": managers, "msgpack": plain})
    mine, theirs, listener = got["rpc"], got["managers"], got["msgpack"]
    what = f"{s.clients} client processes calling add, {ours.workers} handlers, tcp"
    router, server = mine.cpu_us["router"], theirs.cpu_us["server"]
    return [
        compare("many clients", what, mine.rate, "calls/s", "multiprocessing.managers", theirs.rate,
                target=">= 1.2x", cpu=mine.cpu_us, baseline_cpu=theirs.cpu_us),
        compare("many clients", what, mine.rate, "calls/s", "Listener + msgpack, thread per connection", listener.rate,
                cpu=mine.cpu_us, baseline_cpu=listener.cpu_us),
        compare("cpu per call", f"router (supervisor process), {s.clients} clients", router, "us/call",
                "managers' server process", server, target="<= 12 us"),
        Row("cpu per call", f"handlers, the sum of {ours.workers}", mine.cpu_us["handlers"], "us/call"),
        compare("cpu per call", "each client", mine.cpu_us["clients"], "us/call", "each managers client",
                theirs.cpu_us["clients"]),
        compare("cpu per call", "router's serial ceiling, 1e6 / router us", _ceiling(router), "calls/s",
                "managers' server, 1e6 / its us", _ceiling(server), target=">= 2x",
                note="the most calls/s one router process could serve with cores to spare"),
    ]


# -- 3: sequential latency, pinned -----------------------------------------------------------------


def latency(s: Settings) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("tcp", "unix"):
            rows.extend(_latency_over(s, transport, tmp))
    return rows


def _latency_over(s: Settings, transport: str, tmp: str) -> list[Row]:
    with (
        RpcServer(_address(transport, tmp, "rpc")) as ours,
        EchoServer(_address(transport, tmp, "echo")) as echo,
        ManagersServer(_address(transport, tmp, "managers")) as managers,
    ):
        servers: dict[str, Server] = {"rpc": ours, "raw": echo, "managers": managers}
        groups = {name: server.groups() for name, server in servers.items()}
        everyone = [SELF, *(pid for server in servers.values() for pid in server.pids())]
        with _connected({name: connect(name, server.address) for name, server in servers.items()}) as callers:
            timings = {}
            for pin in (True, False):
                with pinned(everyone, pin):
                    timings[pin] = _time_in_turn(s, callers, groups, s.calls)
    rows = []
    for pin, t in timings.items():
        what = f"add(1, 2) sequential, {transport}, {_pin_label(pin)}"
        mine = t["rpc"]
        for name, baseline, target in (("raw", f"raw echo, {transport}", "<= 1.5x"), ("managers", "multiprocessing.managers", "<= 1.0x")):
            rows.append(compare("latency", what, mine.us, "us/call", baseline, t[name].us, target=target if pin else "",
                                cpu=mine.cpu_us(), baseline_cpu=t[name].cpu_us()))
    return rows


# -- 4: pipelining ---------------------------------------------------------------------------------------


def pipelined(s: Settings) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, RpcServer(_address("unix", tmp, "rpc")) as server:
        with rpc.connect(server.address, authkey=AUTHKEY) as client:
            n = s.calls * 4

            def sequential() -> int:
                for _ in range(s.calls):
                    client.add(1, 2)
                return s.calls

            def mapped() -> int:
                for _ in client.map("add", range(n), range(n), max_in_flight=64):
                    pass
                return n

            mapped()  # starts the client's reader thread, before any pinning
            for pin in (False, True):
                one, many = Timing(server.groups()), Timing(server.groups())
                with pinned([SELF, *server.pids()], pin):
                    sequential()
                    for _ in range(s.rounds):
                        one.measure(sequential)
                        many.measure(mapped)
                rows.append(compare("pipelined", f"add via map(), 64 in flight, {server.workers} handlers, unix, "
                                    + ("unpinned" if not pin else "pinned, for information"),
                                    many.rate, "calls/s", "sequential calls, same client", one.rate,
                                    target="" if pin else ">= 3x", cpu=many.cpu_us(), baseline_cpu=one.cpu_us()))
    return rows


# -- 5: CPU-bound calls from several clients ----------------------------------------------------------------


def _parallel_rate(callers: list[Caller], calls_each: int) -> float:
    """Calls/s of every caller calling ``calls_each`` times at once, each from its own thread."""
    threads = [threading.Thread(target=repeat(c.call, calls_each)) for c in callers]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(callers) * calls_each / (time.perf_counter() - start)


def cpu_bound(s: Settings, clients: int = 4) -> list[Row]:
    n = calibrate_burn(s.burn_ms / 1000)
    with (
        tempfile.TemporaryDirectory() as tmp,
        RpcServer(_address("unix", tmp, "rpc")) as ours,
        RpcServer(_address("unix", tmp, "rpc1"), workers=1) as one,
        ManagersServer(_address("unix", tmp, "managers")) as managers,
    ):
        servers: dict[str, Server] = {"rpc": ours, "one handler": one, "managers": managers}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        callers = {name: [connect(server.kind, server.address, "burn", (n,)) for _ in range(clients)]
                   for name, server in servers.items()}
        try:
            for caller in (c for group in callers.values() for c in group):
                caller.call()  # warm up
            for _ in range(max(1, s.rounds // 2)):
                for name, group in callers.items():
                    rates[name].append(_parallel_rate(group, s.burn_calls))
        finally:
            for caller in (c for group in callers.values() for c in group):
                caller.close()
    rate = {name: statistics.median(r) for name, r in rates.items()}
    what = f"{clients} clients calling a {s.burn_ms:g} ms CPU-bound function, {ours.workers} handlers, unix"
    return [
        compare("cpu-bound", what, rate["rpc"], "calls/s", "multiprocessing.managers", rate["managers"], target=">= 1.8x"),
        compare("cpu-bound", what, rate["rpc"], "calls/s", "rpc with 1 handler", rate["one handler"]),
    ]


# -- 6: bulk ---------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def bulk(s: Settings) -> list[Row]:
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        EchoServer(_address("unix", tmp, "echo")) as echo,
        RpcServer(_address("unix", tmp, "rpc")) as ours,
    ):
        servers: dict[str, Server] = {"rpc": ours, "raw": echo}
        groups = {name: server.groups() for name, server in servers.items()}
        everyone = [SELF, *ours.pids(), *echo.pids()]
        for size in s.bulk_sizes:
            payload = os.urandom(size)
            calls = max(2, s.bulk_bytes // size)
            with _connected({name: connect(name, server.address, "echo", (payload,)) for name, server in servers.items()}) as callers:
                for pin in (True, False):
                    with pinned(everyone, pin):
                        t = _time_in_turn(s, callers, groups, calls)
                    rows.append(compare("bulk", f"echo of {_size(size)} bytes, unix, {_pin_label(pin)}",
                                        size / t["rpc"].us, "MB/s", "raw echo", size / t["raw"].us,
                                        target=">= 0.7x" if pin and size == 1 << 20 else "",
                                        cpu=t["rpc"].cpu_us(), baseline_cpu=t["raw"].cpu_us()))
    return rows


# -- 7: many idle connections ------------------------------------------------------------------------------


def _rss_or_nan(pid: int) -> float:
    try:
        return rss_mb(pid)
    except OSError:  # the process has gone
        return math.nan


def connections(s: Settings) -> list[Row]:
    total = s.connections
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One client process per (hard limit - headroom) sockets, if one cannot hold them all.
    per_process = total if hard == resource.RLIM_INFINITY else max(1, hard - 64)
    processes = max(s.connection_processes, -(-total // per_process))
    with tempfile.TemporaryDirectory() as tmp, RpcServer(_address("unix", tmp, "rpc"), nofile=total + 256) as server:
        first = connect("rpc", server.address)
        first.call()
        first.close()
        idle, idle_threads = rss_mb(server.pid), thread_count(server.pid)
        server_nofile = open_files_limit(server.pid)
        handler = max((rss_mb(pid) for pid in descendants(server.pid)), default=math.nan)
        with IdleConnections(server.address, total, processes, s.connection_seconds) as held:
            opened = held.opened()
            alive = server.process.is_alive()
            loaded = _rss_or_nan(server.pid)
            threads = thread_count(server.pid) if alive else 0
            answered = held.call_each() if alive else None
            after_calls = _rss_or_nan(server.pid)
    count = answered.count if answered else 0
    story = [
        f"asked for {total} connections from {processes} client processes",
        f"RLIMIT_NOFILE {opened.nofile} in each client, {server_nofile} in the server",
        f"opened {opened.count}" + (f", {opened.failures} attempts failed" if opened.failures else ""),
    ]
    if opened.why:
        story.append(f"why not all: {opened.why}")
    if not alive:
        story.append("the server process died")
    story.append(f"supervisor threads {idle_threads} idle, {threads} with the connections open")
    story.append(f"{count} answered a call" + (f" ({answered.why})" if answered and answered.why else ""))
    story.append(f"supervisor RSS after those calls {after_calls:.1f} MB")
    return [
        Row("connections", "supervisor RSS, idle", idle, "MB"),
        Row("connections", "one handler's RSS, idle", handler, "MB"),
        Row("connections", f"supervisor RSS added by {opened.count} idle connections", loaded - idle, "MB",
            "idle supervisor's RSS", idle, target="< +150 MB", note="; ".join(story),
            extra={"asked": total, "opened": opened.count, "answered": count, "threads": threads}),
        compare("connections", "of those connections, each then calls add once", count, "answered",
                "connections asked for", total, target="all answer"),
    ]


# -- 8: the stdlib event loop against uvloop ----------------------------------------------------------------


def event_loop(s: Settings) -> list[Row]:
    with RpcServer(TCP, event_loop="asyncio") as stdlib, RpcServer(TCP, event_loop="uvloop") as uv:
        got = _throughput(s, {"asyncio": stdlib, "uvloop": uv})
        loaded = {name: has_loaded(server.pid, "uvloop") for name, server in (("asyncio", stdlib), ("uvloop", uv))}
    note = (f"uvloop is loaded in the event_loop=uvloop server: {'yes' if loaded['uvloop'] else 'no'}; "
            f"in the event_loop=asyncio one: {'yes' if loaded['asyncio'] else 'no'}")
    if not loaded["uvloop"]:
        note += " (this core does not run an event loop, so both runs measure the same server)"
    mine, base = got["asyncio"], got["uvloop"]
    what = f"{s.clients} client processes calling add, event_loop=asyncio, tcp"
    return [
        compare("event loop", what, mine.rate, "calls/s", "event_loop=uvloop", base.rate, target="reported",
                cpu=mine.cpu_us, baseline_cpu=base.cpu_us, note=note),
        compare("event loop", "router CPU per call, event_loop=asyncio", mine.cpu_us["router"], "us/call",
                "event_loop=uvloop", base.cpu_us["router"], target="reported"),
    ]


# -- issue 12: what counting for /metrics costs -----------------------------------------------------------------


def metrics(s: Settings) -> list[Row]:
    """The same server with and without a metrics_address (only then are calls counted), in the same run."""
    with RpcServer(TCP, metrics_address=TCP) as counted, RpcServer(TCP) as plain:
        got = _throughput(s, {"counted": counted, "plain": plain})
        servers: dict[str, Server] = {"counted": counted, "plain": plain}
        groups = {name: server.groups() for name, server in servers.items()}
        everyone = [SELF, *(pid for server in servers.values() for pid in server.pids())]
        with _connected({name: connect("rpc", server.address) for name, server in servers.items()}) as callers:
            with pinned(everyone):  # a sequential caller is served on a lent socket: the handler counts
                timings = _time_in_turn(s, callers, groups, s.calls)
    mine, base = got["counted"], got["plain"]
    lent, routed = timings["counted"], timings["plain"]
    return [
        compare("metrics", f"router CPU per call, {s.clients} clients, metrics_address set", mine.cpu_us["router"],
                "us/call", "no metrics_address", base.cpu_us["router"], target="reported"),
        compare("metrics", f"{s.clients} client processes calling add, metrics_address set", mine.rate, "calls/s",
                "no metrics_address", base.rate, target="reported", cpu=mine.cpu_us, baseline_cpu=base.cpu_us),
        compare("metrics", "add(1, 2) sequential, tcp, pinned, metrics_address set", lent.us, "us/call",
                "no metrics_address", routed.us, target="reported", cpu=lent.cpu_us(), baseline_cpu=routed.cpu_us()),
        compare("metrics", "handler CPU per sequential call (a lent socket), metrics_address set",
                lent.cpu_us()["handlers"], "us/call", "no metrics_address", routed.cpu_us()["handlers"], target="reported"),
    ]


# -- not in the targets: connect and start-up times ------------------------------------------------------------


def connect_time(s: Settings) -> list[Row]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        EchoServer(_address("unix", tmp, "echo")) as echo,
        RpcServer(_address("unix", tmp, "rpc")) as ours,
    ):

        def once(kind: str, address: Any) -> Callable[[], None]:
            def run() -> None:
                caller = connect(kind, address)
                caller.call()
                caller.close()

            return run

        count = max(10, s.calls // 100)
        callers = {"rpc": Caller(once("rpc", ours.address), lambda: None), "raw": Caller(once("raw", echo.address), lambda: None)}
        t = _time_in_turn(s, callers, {"rpc": ours.groups(), "raw": echo.groups()}, count)
    return [compare("connect", "connect + handshake + first call, unix", t["rpc"].us / 1e3, "ms",
                    "raw Client() with authkey + echo", t["raw"].us / 1e3)]


def startup(s: Settings) -> list[Row]:
    from rpc.testing import _prepare_forkserver, serve

    def bare(method: str) -> float:
        ctx: Any = multiprocessing.get_context(method)
        parent, child = ctx.Pipe()
        start = time.perf_counter()
        process = ctx.Process(target=_send_hello, args=(child,))
        process.start()
        parent.recv_bytes()
        elapsed = time.perf_counter() - start
        process.join()
        return elapsed

    def first_call(method: str) -> float:
        start = time.perf_counter()
        with serve(services.registry, workers=1, start_method=method, log_level="warning") as server:
            with server.client() as client:
                client.add(1, 2)
                return time.perf_counter() - start

    _prepare_forkserver()
    first_call("forkserver")  # the first one also starts the forkserver
    rows = []
    rounds = max(1, s.rounds // 2)
    for method in ("spawn", "forkserver"):
        base = statistics.median(bare(method) for _ in range(rounds))
        ours = statistics.median(first_call(method) for _ in range(rounds))
        rows.append(compare("startup", f"test server to first call, {method}", ours * 1e3, "ms",
                            f"bare {method} process", base * 1e3))
    return rows


def _send_hello(conn: Any) -> None:
    conn.send_bytes(b"hello")


SECTIONS: dict[str, Callable[[Settings], list[Row]]] = {
    "many_clients": many_clients,  # target rows 1 and 2
    "latency": latency,  # 3
    "pipelined": pipelined,  # 4
    "cpu_bound": cpu_bound,  # 5
    "bulk": bulk,  # 6
    "connections": connections,  # 7
    "event_loop": event_loop,  # 8
    "aio": aio,  # issue 11: the asyncio client
    "streams": streams,  # issue 11: streamed results
    "tls": tls,  # issue 12: the cost of TLS
    "metrics": metrics,  # issue 12: counting for /metrics
    "connect": connect_time,
    "startup": startup,
}

# Sections that run only when named with --only: they need more than a plain run may assume.
ON_REQUEST: dict[str, Callable[[Settings], list[Row]]] = {
    "haproxy": haproxy,  # issue 12: root, `ip` and haproxy, for a lab of network namespaces
}
