"""Streamed results from rpc.aio, against real servers over Unix and TCP sockets, on
asyncio's loop and uvloop: ``async for item in await client.gen(...)``."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import rpc
import rpc.aio
from rpc.protocol import STREAM_WINDOW

from helpers import wait_for

HANG = 120.0  # seconds: a test still waiting after this long has hung

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


@pytest.fixture(scope="module", params=["unix", "tcp"])
def server(request, rpc_server_module):
    return rpc_server_module("stream_services:registry", workers=2, transport=request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    if request.param == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")

    def runner(coroutine: Coroutine[Any, Any, Any]) -> Any:
        factory = uvloop.new_event_loop if request.param == "uvloop" else None
        with asyncio.Runner(loop_factory=factory) as loop:
            return loop.run(asyncio.wait_for(coroutine, HANG))

    return runner


def connect(server, **options: Any) -> Any:
    options.setdefault("timeout", 30)
    return rpc.aio.connect(server.address, authkey=server.authkey, **options)


def test_a_generator_streams_to_an_async_for(server, run):
    async def main() -> None:
        async with connect(server) as client:
            stream = await client.count(5000)
            assert isinstance(stream, rpc.aio.Stream)
            assert [item async for item in stream] == list(range(5000))
            assert stream.closed
            assert await client.add(2, 3) == 5

    run(main())


def test_the_generator_stays_a_window_ahead_of_an_async_consumer(server, run, tmp_path):
    async def main() -> None:
        async with connect(server) as client:
            consumed = 0
            async for item in await client.tracked(20_000, 100, str(tmp_path)):
                consumed += 1
                assert item[0] == consumed - 1
                if consumed % 1000 == 0:
                    assert int((tmp_path / "produced").read_text()) + 1 - consumed <= STREAM_WINDOW
            assert consumed == 20_000

    run(main())


@pytest.mark.parametrize("how", ["break", "aclose", "with", "gc", "disconnect"])
def test_closing_an_async_stream_runs_the_generators_finally(server, run, tmp_path, how):
    pids = set(server.handler_pids())

    async def main() -> None:
        async with connect(server) as client:
            stream = await client.count_marked(10**9, str(tmp_path))
            if how == "break":
                async for item in stream:
                    if item == 3:
                        break
                stream.close()  # (async for does not close an iterator that is not an async generator)
            elif how == "aclose":
                assert await anext(stream) == 0
                await stream.aclose()
                with pytest.raises(StopAsyncIteration):
                    await anext(stream)
            elif how == "with":
                async with stream:
                    assert await anext(stream) == 0
            elif how == "gc":
                assert await anext(stream) == 0
                del stream
                gc.collect()
                await asyncio.sleep(0)  # (the close is made on the loop, after this turn)
            else:
                assert await anext(stream) == 0
                await client.close()
                with pytest.raises(rpc.ConnectionClosed):
                    async for _ in stream:
                        pass
                return
            assert await client.add(1, 1) == 2

    run(main())
    assert wait_for(lambda: (tmp_path / "finally").exists(), timeout=30)
    assert set(server.handler_pids()) == pids


def test_an_exception_in_the_generator_reaches_the_async_for(server, run):
    async def main() -> None:
        async with connect(server) as client:
            seen = []
            with pytest.raises(ValueError, match="bad row"):
                async for item in await client.fail_after(3, "bad row"):
                    seen.append(item)
            assert seen == [0, 1, 2]

    run(main())


def test_many_streams_and_calls_at_once_on_one_connection(server, run):
    async def consume(client: Any, n: int) -> list[int]:
        return [item async for item in await client.count(n)]

    async def main() -> None:
        async with connect(server) as client:
            results = await asyncio.gather(
                *(consume(client, 1000 + i) for i in range(6)), *(client.add(i, 1) for i in range(50))
            )
            assert results[:6] == [list(range(1000 + i)) for i in range(6)]
            assert results[6:] == [i + 1 for i in range(50)]

    run(main())


def test_timeout_bounds_each_item_of_an_async_stream(server, run, tmp_path):
    async def main() -> None:
        async with connect(server) as client:
            assert [i async for i in await client.call("sleep_between", 3, 0.5, timeout=1.4)] == [0, 1, 2]
            stream = await client.call("wait_after", 1, str(tmp_path / "release"), timeout=0.5)
            assert await anext(stream) == 0
            with pytest.raises(rpc.CallTimeout, match="no item within its timeout"):
                await anext(stream)
            (tmp_path / "release").touch()
            assert await client.add(2, 2) == 4

    run(main())
