"""The ``aio`` section: rpc.aio against the sync client and the raw echo, in the same run.

Sequential latency (one ``await client.add(1, 2)`` at a time) is measured with
every process pinned to one CPU, unpinned beside it; throughput with 1,000 calls
in flight (``asyncio.gather``) against the sync client's ``map`` with as many in
flight and a raw echo sent 1,000 frames at a time. The aio client runs on
asyncio's own loop and, where installed, on uvloop: one row each.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from multiprocessing.connection import Client as RawClient
from typing import Any

import rpc
import rpc.aio
from rpc import protocol

from .callers import connect
from .procs import SELF, pinned
from .report import Row, compare
from .servers import AUTHKEY, EchoServer, RpcServer, nodelay

IN_FLIGHT = 1000


def _loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return loops
    loops["uvloop"] = uvloop.new_event_loop
    return loops


async def _sequential(client: rpc.aio.Client, calls: int) -> int:
    add = client.add
    for _ in range(calls):
        await add(1, 2)
    return calls


async def _gathered(client: rpc.aio.Client, calls: int) -> int:
    for _ in range(calls // IN_FLIGHT):
        await asyncio.gather(*(client.add(1, 2) for _ in range(IN_FLIGHT)))
    return calls // IN_FLIGHT * IN_FLIGHT


def _raw_pipelined(address: Any, calls: int) -> tuple[Callable[[], int], Callable[[], None]]:
    """The echo server sent IN_FLIGHT request frames at a time while their echoes are read.

    The frames are sent from a thread: sent before any echo is read, the echoes of a
    thousand small frames fill the socket buffers (each small segment is charged far
    more than its bytes) and both ends block sending.
    """
    conn = RawClient(address, authkey=AUTHKEY)
    nodelay(conn)
    frame = protocol.encode_request(1, "add", (1, 2), {}, None)

    def send() -> None:
        for _ in range(IN_FLIGHT):
            conn.send_bytes(frame)

    def run() -> int:
        for _ in range(calls // IN_FLIGHT):
            sender = threading.Thread(target=send)
            sender.start()
            for _ in range(IN_FLIGHT):
                conn.recv_bytes()
            sender.join()
        return calls // IN_FLIGHT * IN_FLIGHT

    return run, conn.close


Runs = dict[str, tuple[Callable[[], int], dict[str, list[int]]]]


def _in_turn(rounds: int, runs: Runs) -> dict[str, Any]:
    """Rounds of each run, taken in turn so drift hits all alike; a warm-up round first."""
    from .suite import Timing  # (suite imports this module for SECTIONS)

    timings = {name: Timing(groups) for name, (_, groups) in runs.items()}
    for run, _ in runs.values():
        run()
    for _ in range(rounds):
        for name, (run, _) in runs.items():
            timings[name].measure(run)
    return timings


def aio(s: Any) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("tcp", "unix"):
            rows.extend(_aio_over(s, transport, tmp))
    return rows


def _aio_over(s: Any, transport: str, tmp: str) -> list[Row]:
    from .suite import _address, _pin_label, repeat

    n = max(s.calls, IN_FLIGHT)
    with ExitStack() as stack:
        ours = stack.enter_context(RpcServer(_address(transport, tmp, "rpc")))
        echo = stack.enter_context(EchoServer(_address(transport, tmp, "echo")))
        rpc_groups, raw_groups = ours.groups(), echo.groups()
        everyone = [SELF, *ours.pids(), *echo.pids()]
        sequential: Runs = {}
        gathered: Runs = {}
        for name, factory in _loops().items():
            loop = factory()
            stack.callback(loop.close)
            client = loop.run_until_complete(rpc.aio.connect(ours.address, authkey=AUTHKEY))
            stack.callback(lambda loop=loop, client=client: loop.run_until_complete(client.close()))
            sequential[f"aio {name}"] = (_on(loop, _sequential, client, n), rpc_groups)
            gathered[f"aio {name}"] = (_on(loop, _gathered, client, n), rpc_groups)
        sync = stack.enter_context(rpc.connect(ours.address, authkey=AUTHKEY))
        raw = connect("raw", echo.address)
        stack.callback(raw.close)
        raw_many, close_raw_many = _raw_pipelined(echo.address, n)
        stack.callback(close_raw_many)

        def mapped() -> int:
            for _ in sync.map("add", range(n), range(n), max_in_flight=IN_FLIGHT):
                pass
            return n

        sequential["sync"] = (repeat(lambda: sync.add(1, 2), n), rpc_groups)
        sequential["raw"] = (repeat(raw.call, n), raw_groups)
        gathered["sync"] = (mapped, rpc_groups)
        gathered["raw"] = (raw_many, raw_groups)
        mapped()  # starts the sync client's reader thread, before any pinning
        rows = []
        for pin in (True, False):
            with pinned(everyone, pin):
                one = _in_turn(s.rounds, sequential)
                many = _in_turn(max(1, s.rounds // 2), gathered)
            for name in (key for key in sequential if key.startswith("aio ")):
                mine = one[name]
                what = f"await add(1, 2) sequential, {name[4:]} loop, {transport}, {_pin_label(pin)}"
                for base, label in (("sync", "sync client"), ("raw", f"raw echo, {transport}")):
                    rows.append(compare("aio", what, mine.us, "us/call", label, one[base].us,
                                        cpu=mine.cpu_us(), baseline_cpu=one[base].cpu_us()))
                mine = many[name]
                what = f"gather of {IN_FLIGHT} add calls, {name[4:]} loop, {transport}, " + (
                    "pinned, for information" if pin else "unpinned")
                for base, label in (("sync", f"sync client map(), {IN_FLIGHT} in flight"),
                                    ("raw", f"raw echo, {IN_FLIGHT} frames in flight")):
                    rows.append(compare("aio", what, mine.rate, "calls/s", label, many[base].rate,
                                        cpu=mine.cpu_us(), baseline_cpu=many[base].cpu_us()))
        return rows


def _on(loop: asyncio.AbstractEventLoop, step: Callable[[rpc.aio.Client, int], Coroutine[Any, Any, int]],
        client: rpc.aio.Client, calls: int) -> Callable[[], int]:
    return lambda: loop.run_until_complete(step(client, calls))
