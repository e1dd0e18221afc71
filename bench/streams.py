"""The ``streams`` section: a streamed result against the same data returned as one list.

A generator function yields ``n`` byte strings; the sync client iterates it
(``for row in client.rows(n, size)``) and rpc.aio does ``async for``; the
baseline is one call of a plain function returning the same rows as one list,
in the same run. Throughput, unpinned; items/s and MB/s of payload, with the CPU
time per item of each process.
"""

from __future__ import annotations

import asyncio
import tempfile
from contextlib import ExitStack
from typing import Any

import rpc
import rpc.aio

from .report import Row, compare
from .servers import AUTHKEY, RpcServer

# (rows per round, bytes per row): many small items, then fewer larger ones (each round's
# list stays well under max_message_bytes).
CASES = ((100_000, 100), (5_000, 10_000))


def streams(s: Any) -> list[Row]:
    from .aio import _in_turn

    quick = s.rounds == 1 and s.calls < 1000
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        from .suite import _address

        server = stack.enter_context(RpcServer(_address("unix", tmp, "rpc"), workers=2))
        groups = server.groups()
        sync = stack.enter_context(rpc.connect(server.address, authkey=AUTHKEY))
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        aio = loop.run_until_complete(rpc.aio.connect(server.address, authkey=AUTHKEY))
        stack.callback(lambda: loop.run_until_complete(aio.close()))
        for n, size in CASES:
            if quick:
                n = max(10, n // 1000)

            def streamed(n: int = n, size: int = size) -> int:
                count = 0
                for _ in sync.rows(n, size):
                    count += 1
                return count

            async def streamed_aio(n: int, size: int) -> int:
                count = 0
                async for _ in await aio.rows(n, size):
                    count += 1
                return count

            def listed(n: int = n, size: int = size) -> int:
                return len(sync.rows_list(n, size))

            timings = _in_turn(max(1, s.rounds // 2), {
                "stream": (streamed, groups),
                "aio": (lambda n=n, size=size: loop.run_until_complete(streamed_aio(n, size)), groups),
                "list": (listed, groups),
            })
            listed_rate = timings["list"].rate
            for name, label in (("stream", "sync client, for row in stream"), ("aio", "rpc.aio, async for")):
                mine = timings[name]
                what = f"{n:,} rows of {size:,} bytes, {label}, unix, unpinned"
                extra = {"MB/s": round(mine.rate * size / 1e6, 1), "baseline MB/s": round(listed_rate * size / 1e6, 1)}
                rows.append(compare("streams", what, mine.rate, "items/s", "the same rows returned as one list",
                                    listed_rate, cpu=mine.cpu_us(), baseline_cpu=timings["list"].cpu_us(), extra=extra,
                                    note=f"{extra['MB/s']} MB/s streamed, {extra['baseline MB/s']} MB/s as one list"))
    return rows
