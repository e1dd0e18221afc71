"""Reconnecting: a client whose connection ended while nothing was in flight opens a new one
on its next call; a call in flight when it ends fails and is never sent again.

Servers here are real ones, stopped and started again on the same address (a Unix
socket, or the same TCP port), under clients of both kinds. What the server closes
is waited for through its log and ``client.closed``, never by sleeping.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import rpc
import rpc.aio
from helpers import wait_for

HANG = 60.0
REGISTRY = "async_services:registry"


class Restartable:
    """A real server that can be stopped and started again on the same address, with the same key."""

    def __init__(self, folder: Path, transport: str) -> None:
        self.folder = folder
        self.authkey = secrets.token_bytes(32)
        self.address: Any = str(folder / "rpc.sock") if transport == "unix" else ("127.0.0.1", 0)
        self.log_file = folder / "server.log"
        self.server: rpc.Server | None = None

    def start(self, authkey: bytes | None = None, **options: Any) -> Restartable:
        options = {"workers": 1, "log_file": str(self.log_file), "log_format": "console", "shutdown_grace": 5.0, **options}
        server = rpc.Server(REGISTRY, address=self.address, authkey=authkey or self.authkey, **options)
        server.start()
        self.address = server.address  # port 0 -> the real port, kept for the restarts
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def client(self, **options: Any) -> rpc.Client:
        options.setdefault("timeout", HANG)
        return rpc.connect(self.address, authkey=self.authkey, **options)

    def aio_client(self, **options: Any) -> Any:
        options.setdefault("timeout", HANG)
        return rpc.aio.connect(self.address, authkey=self.authkey, **options)


@pytest.fixture(params=["unix", "tcp"])
def server(request, tmp_path):
    restartable = Restartable(tmp_path, request.param)
    yield restartable
    restartable.stop()


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, HANG))


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# -- a restart under an idle client -----------------------------------------------------


def test_sync_a_server_restarted_under_an_idle_client_is_reconnected_to_on_the_next_call(server):
    server.start(max_message_bytes=1 << 20)
    with server.client() as client:
        assert client.add(2, 3) == 5
        assert client.submit("add", 1, 1).result(HANG) == 2  # the background reader, before
        assert client.server_info["max_message_bytes"] == 1 << 20
        server.stop()
        assert wait_for(lambda: client.closed)  # the server closed it: seen without a call
        server.start(max_message_bytes=2 << 20)
        assert client.add(2, 3) == 5
        assert not client.closed
        assert client.server_info["max_message_bytes"] == 2 << 20  # the new server's hello
        # Futures and their background reader, and map, work on the new connection.
        futures = [client.submit("add", i, 1) for i in range(50)]
        assert [f.result(HANG) for f in futures] == [i + 1 for i in range(50)]
        assert list(client.map("add", range(20), range(20))) == [2 * i for i in range(20)]
        client.notify("add", 1, 1)
        assert client.ping() > 0


def test_sync_a_restart_with_nothing_listening_for_a_while_is_waited_for_within_connect_timeout(server):
    """The first attempts find nothing listening; the call keeps trying (with backoff) until it is back."""
    server.start()
    with server.client(connect_timeout=HANG) as client:
        assert client.add(1, 1) == 2
        server.stop()
        restarted = threading.Event()

        def restart_once_tried() -> None:
            # Started only once the client has tried and failed to connect at least once.
            assert wait_for(lambda: not restarted.is_set() and client._calls._failure is not None, timeout=HANG)
            server.start()
            restarted.set()

        starter = threading.Thread(target=restart_once_tried)
        starter.start()
        assert client.add(2, 3) == 5
        starter.join(HANG)
        assert restarted.is_set()


def test_sync_threads_sharing_a_client_all_get_answers_after_a_restart(server):
    server.start(workers=2)
    with server.client() as client:
        assert client.add(0, 0) == 0
        server.stop()
        server.start(workers=2)
        results: list[Any] = []

        def calls(base: int) -> None:
            for i in range(50):
                results.append(client.add(base, i) == base + i)

        threads = [threading.Thread(target=calls, args=(n * 100,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
        assert results == [True] * 200


def test_aio_a_server_restarted_under_an_idle_client_is_reconnected_to_on_the_next_call(server):
    server.start(max_message_bytes=1 << 20)

    async def body() -> None:
        async with server.aio_client() as client:
            assert await client.add(2, 3) == 5
            assert client.server_info["max_message_bytes"] == 1 << 20
            await asyncio.to_thread(server.stop)
            await until(lambda: client.closed, "the client sees its connection end")
            await asyncio.to_thread(server.start, max_message_bytes=2 << 20)
            # Many calls at once: they share one reconnect, then each gets its own answer.
            assert await asyncio.gather(*(client.add(i, 1) for i in range(200))) == [i + 1 for i in range(200)]
            assert not client.closed
            assert client.server_info["max_message_bytes"] == 2 << 20
            await client.notify("add", 1, 1)
            assert [m.name for m in await client.methods()].count("add_async") == 1

    run(body())


# -- idle_timeout ---------------------------------------------------------------------------


IDLE_LINE = "idle for longer than idle_timeout"


def test_sync_a_connection_closed_by_idle_timeout_is_reopened_by_the_next_call(server):
    server.start(idle_timeout=0.3)
    with server.client() as client:
        assert client.add(1, 2) == 3
        assert wait_for(lambda: IDLE_LINE in server.log(), timeout=HANG)
        assert wait_for(lambda: client.closed, timeout=HANG)
        assert client.add(2, 3) == 5
        assert client.submit("add", 3, 4).result(HANG) == 7


def test_aio_a_connection_closed_by_idle_timeout_is_reopened_by_the_next_call(server):
    server.start(idle_timeout=0.3)

    async def body() -> None:
        async with server.aio_client() as client:
            assert await client.add(1, 2) == 3
            await until(lambda: IDLE_LINE in server.log(), "the server drops the idle client")
            await until(lambda: client.closed, "the client sees its connection end")
            assert await client.add(2, 3) == 5

    run(body())


# -- a call in flight -------------------------------------------------------------------------


def test_sync_a_call_in_flight_when_the_server_stops_fails_and_is_not_sent_again(server, tmp_path):
    server.start(shutdown_grace=0.5)
    marker, started, release = tmp_path / "runs", tmp_path / "started", tmp_path / "release"
    with server.client() as client:
        future = client.submit("count_and_hold", str(marker), str(started), str(release))
        assert wait_for(started.exists, timeout=HANG)
        server.stop()  # its grace passes: the handler is stopped, the connection closed
        with pytest.raises((rpc.ConnectionClosed, rpc.WorkerCrashed, rpc.ServerShuttingDown)):
            future.result(HANG)
        release.touch()
        server.start()
        assert client.add(2, 3) == 5  # with one handler, a call sent again would have run first
    assert marker.read_text().count("\n") == 1


# -- what does not reconnect --------------------------------------------------------------------


def test_sync_reconnect_false_keeps_the_connection_closed(server):
    server.start()
    with server.client(reconnect=False) as client:
        assert client.add(1, 1) == 2
        server.stop()
        server.start()
        with pytest.raises(rpc.ConnectionClosed):
            client.add(2, 3)
        assert client.closed
        with pytest.raises(rpc.ConnectionClosed):
            client.add(2, 3)


def test_aio_reconnect_false_keeps_the_connection_closed(server):
    server.start()

    async def body() -> None:
        async with server.aio_client(reconnect=False) as client:
            assert await client.add(1, 1) == 2
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            with pytest.raises(rpc.ConnectionClosed):
                await client.add(2, 3)
            assert client.closed
            with pytest.raises(rpc.ConnectionClosed):
                await client.add(2, 3)

    run(body())


def test_sync_close_is_final(server):
    server.start()
    client = server.client()
    assert client.add(1, 1) == 2
    client.close()
    with pytest.raises(rpc.ConnectionClosed, match="the client was closed"):
        client.add(2, 3)
    with pytest.raises(rpc.ConnectionClosed, match="the client was closed"):
        client.submit("add", 2, 3)
    # Closed after its connection had ended: still final.
    other = server.client()
    server.stop()
    assert wait_for(lambda: other.closed)
    other.close()
    server.start()
    with pytest.raises(rpc.ConnectionClosed, match="the client was closed"):
        other.add(2, 3)


def test_aio_close_is_final(server):
    server.start()

    async def body() -> None:
        client = await server.aio_client()
        assert await client.add(1, 1) == 2
        await client.close()
        with pytest.raises(rpc.ConnectionClosed, match="the client was closed"):
            await client.add(2, 3)
        other = await server.aio_client()
        await asyncio.to_thread(server.stop)
        await until(lambda: other.closed, "the client sees its connection end")
        await other.close()
        await asyncio.to_thread(server.start)
        with pytest.raises(rpc.ConnectionClosed, match="the client was closed"):
            await other.add(2, 3)

    run(body())


# -- a reconnect that fails ----------------------------------------------------------------------


def test_sync_a_failed_reconnect_raises_the_connect_error_and_the_next_call_tries_again(server):
    server.start()
    # connect_timeout bounds each handshake too, so it is long: a loaded machine can take more
    # than half a second for one. The call's own timeout ends the wait while nothing listens.
    with server.client(connect_timeout=HANG) as client:
        assert client.add(1, 1) == 2
        server.stop()
        with pytest.raises(rpc.ConnectionClosed, match="cannot connect: nothing is listening at"):
            client.call("add", 2, 3, timeout=0.5)  # tried until the call's deadline, with backoff
        server.start(authkey=b"another key")
        with pytest.raises(rpc.AuthenticationError, match="refused this authkey"):
            client.add(2, 3)
        server.stop()
        server.start()
        assert client.add(2, 3) == 5


def test_aio_a_failed_reconnect_raises_the_connect_error_and_the_next_call_tries_again(server):
    server.start()

    async def body() -> None:
        # As in the sync case: a long connect_timeout, as it bounds each handshake, and the
        # call's timeout ends its wait while nothing listens (the attempt goes on meanwhile, and
        # meets the next server's refusal of the key, or the call below shares it).
        async with server.aio_client(connect_timeout=HANG) as client:
            assert await client.add(1, 1) == 2
            await asyncio.to_thread(server.stop)
            with pytest.raises(rpc.ConnectionClosed, match="cannot connect: nothing is listening at"):
                await client.call("add", 2, 3, timeout=0.5)
            await asyncio.to_thread(server.start, authkey=b"another key")
            with pytest.raises(rpc.AuthenticationError, match="refused this authkey"):
                await client.add(2, 3)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            assert await client.add(2, 3) == 5

    run(body())
