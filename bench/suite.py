"""The measurements. Each compares rpc with a baseline measured in the same run.

Servers run in their own processes, as deployed; the client side runs here.
Figures are medians over rounds. Nothing here asserts a timing: the suite reports.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client as RawClient
from multiprocessing.connection import Listener
from multiprocessing.managers import BaseManager
from typing import Any

import rpc
from rpc import protocol

from . import services

AUTHKEY = b"bench-" + b"k" * 32
CTX = multiprocessing.get_context("spawn")


@dataclass
class Settings:
    rounds: int = 7
    calls: int = 2000  # per round, for latency
    seconds: float = 2.0  # per throughput run
    burn_ms: float = 20.0
    idle_connections: int = 500
    bulk_sizes: tuple[int, ...] = (1 << 20, 16 << 20)


@dataclass
class Row:
    section: str
    what: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(rounds))


def per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


# -- servers in their own processes ---------------------------------------------------


def _run_rpc_server(address: Any, workers: int, bound: Any, stop: Any) -> None:
    with rpc.Server(services.registry, address=address, authkey=AUTHKEY, workers=workers, log_level="warning") as server:
        bound.put((server.address, os.getpid(), server.handler_pids()))
        stop.wait()


class RpcServer:
    """An rpc server in its own process (2 handlers, the default on a 2-CPU machine, unless told)."""

    def __init__(self, address: Any, workers: int = 1) -> None:
        self._bound, self._stop = CTX.Queue(), CTX.Event()
        self.process = CTX.Process(target=_run_rpc_server, args=(address, workers, self._bound, self._stop))

    def __enter__(self) -> RpcServer:
        self.process.start()
        self.address, self.pid, self.handler_pids = self._bound.get(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()

    def client(self, **options: Any) -> rpc.Client:
        return rpc.connect(self.address, authkey=AUTHKEY, **options)


def _run_echo_server(address: Any, ready: Any) -> None:
    with Listener(address, authkey=AUTHKEY) as listener:
        ready.set()
        while True:
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: Any) -> None:
    _nodelay(conn)
    with conn:
        while True:
            try:
                conn.send_bytes(conn.recv_bytes(1 << 30))
            except (EOFError, OSError):
                return


def _nodelay(conn: Any) -> None:
    sock = socket.socket(fileno=conn.fileno())
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


class EchoServer:
    """The raw transport: a multiprocessing.connection echo server in its own process."""

    def __init__(self, address: Any) -> None:
        self.address = address
        self._ready = CTX.Event()
        self.process = CTX.Process(target=_run_echo_server, args=(address, self._ready), daemon=True)

    def __enter__(self) -> EchoServer:
        self.process.start()
        self._ready.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)

    def connect(self) -> Any:
        conn = RawClient(self.address, authkey=AUTHKEY)
        _nodelay(conn)
        return conn


class CalcManager(BaseManager):
    pass


CalcManager.register("Calc", services.Calc)


def free_tcp_address() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- sections --------------------------------------------------------------------------


def latency(s: Settings) -> list[Row]:
    rows = []
    frame = protocol.encode_request(1, "add", (1, 2), {}, None)
    with tempfile.TemporaryDirectory() as tmp:
        for name, raw_address, rpc_address in (
            ("tcp", free_tcp_address(), ("127.0.0.1", 0)),
            ("unix", os.path.join(tmp, "echo.sock"), os.path.join(tmp, "rpc.sock")),
        ):
            with EchoServer(raw_address) as echo:
                conn = echo.connect()
                raw = median_of(s.rounds, lambda: per_call(lambda: (conn.send_bytes(frame), conn.recv_bytes()), s.calls))
                conn.close()
            # 2 handlers, the default on this 2-CPU machine: one is spare, so the socket is lent
            with RpcServer(rpc_address, workers=2) as server, server.client() as client:
                per_call(lambda: client.add(1, 2), 200)  # warm up
                ours = median_of(s.rounds, lambda: per_call(lambda: client.add(1, 2), s.calls))
            rows.append(
                Row("latency", f"add(1, 2) sequential, {name}", ours * 1e6, "us/call",
                    f"raw echo, {name}", raw * 1e6, ours / raw, "<= 1.5x raw")
            )
    manager = CalcManager(address=("127.0.0.1", 0), authkey=AUTHKEY, ctx=CTX)
    manager.start()
    try:
        calc = manager.Calc()
        managers = median_of(s.rounds, lambda: per_call(lambda: calc.add(1, 2), s.calls))
    finally:
        manager.shutdown()
    tcp = rows[0]
    rows.append(Row("latency", "add(1, 2) sequential, tcp", tcp.value, "us/call",
                    "multiprocessing.managers", managers * 1e6, tcp.value / (managers * 1e6)))
    return rows


def pipelined(s: Settings) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        with RpcServer(os.path.join(tmp, "rpc.sock"), workers=2) as server, server.client() as client:
            sequential = 1 / median_of(s.rounds, lambda: per_call(lambda: client.add(1, 2), s.calls))
            n = s.calls * 4

            def rate() -> float:
                start = time.perf_counter()
                for _ in client.map("add", range(n), range(n), max_in_flight=64):
                    pass
                return n / (time.perf_counter() - start)

            piped = median_of(s.rounds, rate)
    return [Row("pipelined", "add via map(), 64 in flight, 2 handlers, unix", piped, "calls/s",
                "sequential calls, same client", sequential, piped / sequential, ">= 4x sequential")]


def _hammer(connect: Callable[[], Callable[[], Any]], start: Any, seconds: float, counts: Any, index: int) -> None:
    call = connect()
    call()
    start.wait()
    deadline = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < deadline:
        call()
        count += 1
    counts[index] = count


def _rpc_caller(address: Any) -> Callable[[], Any]:
    client = rpc.connect(address, authkey=AUTHKEY)
    return lambda: client.add(1, 2)


def _manager_caller(address: Any) -> Callable[[], Any]:
    manager = CalcManager(address=address, authkey=AUTHKEY)
    manager.connect()
    calc = manager.Calc()
    return lambda: calc.add(1, 2)


def _total_rate(make: Callable[[Any], Callable[[], Any]], address: Any, clients: int, seconds: float) -> float:
    start, counts = CTX.Event(), CTX.Array("q", clients)
    processes = [
        CTX.Process(target=_hammer, args=(_Bound(make, address), start, seconds, counts, i)) for i in range(clients)
    ]
    for p in processes:
        p.start()
    time.sleep(1.0 + clients * 0.1)  # let every client connect and warm up
    start.set()
    for p in processes:
        p.join(seconds + 60)
    return sum(counts) / seconds


class _Bound:
    """A picklable ``make(address)`` for client processes."""

    def __init__(self, make: Callable[[Any], Callable[[], Any]], address: Any) -> None:
        self.make, self.address = make, address

    def __call__(self) -> Callable[[], Any]:
        return self.make(self.address)


def many_clients(s: Settings, clients: int = 8) -> list[Row]:
    with RpcServer(("127.0.0.1", 0), workers=2) as server:
        ours = _total_rate(_rpc_caller, server.address, clients, s.seconds)
    manager = CalcManager(address=("127.0.0.1", 0), authkey=AUTHKEY, ctx=CTX)
    manager.start()
    try:
        theirs = _total_rate(_manager_caller, manager.address, clients, s.seconds)
    finally:
        manager.shutdown()
    return [Row("many clients", f"{clients} client processes calling add, 2 handlers, tcp", ours, "calls/s",
                "multiprocessing.managers", theirs, ours / theirs, ">= 1.5x managers")]


def cpu_scaling(s: Settings) -> list[Row]:
    n = _calibrate_burn(s.burn_ms / 1000)
    calls_each = max(4, 3 * s.rounds)
    times = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            with RpcServer(os.path.join(tmp, "rpc.sock"), workers=workers) as server:
                clients = [server.client() for _ in range(2)]
                for c in clients:
                    c.burn(1000)

                def run() -> float:
                    start = time.perf_counter()
                    threads = [threading.Thread(target=lambda c=c: [c.burn(n) for _ in range(calls_each)]) for c in clients]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    return time.perf_counter() - start

                times[workers] = median_of(max(3, s.rounds // 2), run)
                for c in clients:
                    c.close()
    return [Row("cpu scaling", f"2 clients calling a {s.burn_ms:g} ms function, 2 handlers", times[1] / times[2], "x speed-up",
                "1 handler", 1.0, times[1] / times[2], ">= 1.8x", {"seconds_1": times[1], "seconds_2": times[2]})]


def _calibrate_burn(seconds: float) -> int:
    n = 10_000
    while True:
        start = time.perf_counter()
        services.burn(n)
        elapsed = time.perf_counter() - start
        if elapsed > 0.005:
            return int(n * seconds / elapsed)
        n *= 4


def bulk(s: Settings) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with EchoServer(os.path.join(tmp, "echo.sock")) as echo, RpcServer(os.path.join(tmp, "rpc.sock"), workers=2) as server:
            conn, client = echo.connect(), server.client()
            for size in s.bulk_sizes:
                payload = os.urandom(size)
                repeat = max(2, (64 << 20) // size // 4)

                def raw() -> float:
                    return per_call(lambda: (conn.send_bytes(payload), conn.recv_bytes(1 << 30)), repeat)

                raw_mbs = size / median_of(s.rounds, raw) / 1e6
                ours_mbs = size / median_of(s.rounds, lambda: per_call(lambda: client.echo(payload), repeat)) / 1e6
                rows.append(Row("bulk", f"echo of {_size(size)} bytes, unix", ours_mbs, "MB/s",
                                "raw echo", raw_mbs, ours_mbs / raw_mbs, ">= 0.7x raw" if size == 1 << 20 else ""))
            conn.close()
            client.close()
    return rows


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def connect_time(s: Settings) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        with EchoServer(os.path.join(tmp, "echo.sock")) as echo, RpcServer(os.path.join(tmp, "rpc.sock"), workers=2) as server:

            def raw_once() -> None:
                conn = echo.connect()
                conn.send_bytes(b"x")
                conn.recv_bytes()
                conn.close()

            def ours_once() -> None:
                with server.client() as client:
                    client.add(1, 2)

            count = max(10, s.calls // 50)
            raw = median_of(s.rounds, lambda: per_call(raw_once, count))
            ours = median_of(s.rounds, lambda: per_call(ours_once, count))
    return [Row("connect", "connect + handshake + first call, unix", ours * 1e3, "ms",
                "raw Client() with authkey + echo", raw * 1e3, ours / raw)]


def memory(s: Settings) -> list[Row]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < s.idle_connections * 2 + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, s.idle_connections * 2 + 100), hard))
    with tempfile.TemporaryDirectory() as tmp:
        with RpcServer(os.path.join(tmp, "rpc.sock"), workers=2) as server:
            time.sleep(0.5)
            idle = rss_mb(server.pid)
            handler = max(rss_mb(pid) for pid in server.handler_pids)
            clients = [server.client() for _ in range(s.idle_connections)]
            clients[0].add(1, 2)
            time.sleep(0.5)
            loaded = rss_mb(server.pid)
            for c in clients:
                c.close()
    return [
        Row("memory", "supervisor RSS, idle", idle, "MB"),
        Row("memory", "handler RSS, idle", handler, "MB"),
        Row("memory", f"supervisor RSS with {s.idle_connections} idle connections", loaded, "MB",
            "idle supervisor", idle, None, "< +100 MB", {"added_mb": loaded - idle}),
    ]


def startup(s: Settings) -> list[Row]:
    from rpc.testing import _prepare_forkserver, serve

    def bare(method: str) -> float:
        ctx = multiprocessing.get_context(method)
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
    for method in ("spawn", "forkserver"):
        base = median_of(s.rounds, lambda: bare(method))
        ours = median_of(s.rounds, lambda: first_call(method))
        rows.append(Row("startup", f"test server to first call, {method}", ours * 1e3, "ms",
                        f"bare {method} process", base * 1e3, ours / base))
    return rows


def _send_hello(conn: Any) -> None:
    conn.send_bytes(b"hello")


SECTIONS: dict[str, Callable[[Settings], list[Row]]] = {
    "latency": latency,
    "pipelined": pipelined,
    "many_clients": many_clients,
    "cpu_scaling": cpu_scaling,
    "bulk": bulk,
    "connect": connect_time,
    "memory": memory,
    "startup": startup,
}
