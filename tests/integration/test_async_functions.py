"""Exposed ``async def`` functions: each handler runs them on an event loop of its own.

Every test runs against calls routed through the server and against a lent socket
(a one-call-at-a-time client's later calls are served by a spare handler directly).
"""

from __future__ import annotations

import asyncio

import pytest

import async_services
import rpc
import rpc.aio
from helpers import Gate, log_has, wait_for

ROUTES = {"routed": {"lease": False}, "lent": {"lease": True}}


@pytest.fixture(scope="module", params=[(route, transport) for route in ROUTES for transport in ("unix", "tcp")], ids="-".join)
def server(request, rpc_server_module):
    route, transport = request.param
    return rpc_server_module("async_services:registry", workers=2, access_log=True, transport=transport, **ROUTES[route])


@pytest.fixture
def fresh(request, rpc_server):
    """A server of its own (its handlers get stopped), on each route."""
    return lambda **options: rpc_server("async_services:registry", workers=2, access_log=True, **ROUTES[request.param], **options)


def test_an_async_function_returns_raises_and_awaits(server):
    with server.client(timeout=30) as client:
        for i in range(20):  # sequential: on the lent route, served by a lent handler after the first
            assert client.add_async(i, 1) == i + 1
        assert client.nap(0.01, value={"a": (1, 2)}) == {"a": (1, 2)}
        assert client.gather_squares(10) == [i * i for i in range(10)]
        with pytest.raises(ValueError, match="bad input") as raised:
            client.fail_async("bad input")
        assert isinstance(raised.value, rpc.RemoteError)
        # Its traceback starts in the user's function, as a plain function's does: no event loop frames.
        lines = raised.value.remote_traceback.splitlines()
        assert lines[0].startswith("Traceback") and "async_services.py" in lines[1] and "fail_async" in lines[1]
        assert "asyncio" not in raised.value.remote_traceback
        assert client.add(2, 3) == 5  # plain functions beside them
    if server.server.config.lease:
        assert wait_for(lambda: any("leased=True" in line and "add_async" in line for line in server.log_text().splitlines()))


def test_methods_lists_async_functions_like_any_other(server):
    with server.client(timeout=30) as client:
        methods = {info.name: info for info in client.methods()}
    assert methods["add_async"].signature == "(x, y)"
    assert methods["add_async"].doc == "Add two numbers, asynchronously."
    assert methods["nap"].signature == "(seconds, value=None)"


def test_each_handler_keeps_one_loop_across_calls(server):
    """A task, a queue and the loop made by one call are there for the next on the same handler."""
    seen: dict[int, list[int]] = {}
    with server.client(timeout=30) as client:
        for _ in range(30):
            pid, same_loop, calls, item = client.loop_state()
            assert same_loop
            assert item == calls  # the first call's task fed the queue one item per call since
            seen.setdefault(pid, []).append(calls)
    for counts in seen.values():
        assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_the_aio_client_calls_async_functions(server):
    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=server.authkey, timeout=30) as client:
            assert await client.add_async(2, 3) == 5
            assert await asyncio.gather(*(client.add_async(i, i) for i in range(100))) == [2 * i for i in range(100)]
            with pytest.raises(ValueError, match="bad"):
                await client.fail_async("bad")

    asyncio.run(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("fresh", list(ROUTES), indirect=True)
def test_a_deadline_stops_a_hanging_async_function(fresh, tmp_path, monkeypatch, request):
    options = {}
    if request.node.callspec.params["fresh"] == "lent":
        # The lease lasts however slowly this test runs (a loaded machine could end it between
        # calls, and route the hanging call); spawn: handlers start from this environment.
        monkeypatch.setenv(async_services.LEASE_STAYS, "1")
        options["start_method"] = "spawn"
    server = fresh(**options)
    gate = Gate(tmp_path)
    with server.client(timeout=30) as client:
        for i in range(5):
            assert client.add_async(i, 0) == i
        before = set(server.handler_pids())
        with pytest.raises(rpc.CallTimeout):
            client.call("hang_async", str(gate.started), timeout=1)
        assert gate.started.exists()
        assert wait_for(lambda: len(server.handler_pids()) == 2 and set(server.handler_pids()) != before, timeout=30)
        assert client.add_async(2, 3) == 5
    if server.server.config.lease:
        assert log_has(server, "a call on a lent socket passed its deadline")


@pytest.mark.parametrize("fresh", list(ROUTES), indirect=True)
def test_cancelling_a_running_async_call_stops_its_handler(fresh, tmp_path):
    server = fresh()
    gate = Gate(tmp_path)
    with server.client(timeout=30) as client:
        for i in range(5):
            assert client.add_async(i, 0) == i
        before = set(server.handler_pids())
        future = client.submit("hang_async", str(gate.started))
        gate.wait_started()
        assert future.cancel() is True
        assert wait_for(lambda: len(server.handler_pids()) == 2 and set(server.handler_pids()) != before, timeout=30)
        assert client.add_async(2, 3) == 5
    assert log_has(server, "call_cancelled")
    if server.server.config.lease:
        assert any("call_cancelled" in line and "leased=True" in line for line in server.log_text().splitlines())


@pytest.mark.parametrize("fresh", list(ROUTES), indirect=True)
def test_cancelling_an_aio_task_stops_a_running_async_call(fresh, tmp_path):
    server = fresh()
    gate = Gate(tmp_path)

    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=server.authkey, timeout=30) as client:
            for i in range(5):
                assert await client.add_async(i, 0) == i
            before = set(server.handler_pids())
            task = asyncio.create_task(client.hang_async(str(gate.started)))
            for _ in range(3000):
                if gate.started.exists():
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(3000):
                pids = server.handler_pids()
                if len(pids) == 2 and set(pids) != before:
                    break
                await asyncio.sleep(0.01)
            assert await client.add_async(2, 3) == 5

    asyncio.run(asyncio.wait_for(body(), 60))
    assert log_has(server, "call_cancelled")
