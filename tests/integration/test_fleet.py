"""A client of several servers, and the go-away a draining server sends.

Real servers on loopback, several at once with one authkey, under clients of both
kinds. A call records each run of itself in a marker file as it starts, so a call
that ran twice shows two lines. What a test waits for is a marker file or the
state of a server or client, never a sleep; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import rpc
import rpc.aio
from helpers import Gate, wait_for

HANG = 60.0
REGISTRY = "fleet_services:registry"


class Fleet:
    """Several real servers of the same functions, sharing one authkey."""

    def __init__(self, folder: Path, count: int, transport: str, options: list[dict[str, Any]]) -> None:
        self.authkey = secrets.token_bytes(32)
        self.servers: list[rpc.Server] = []
        for i in range(count):
            address: Any = str(folder / f"rpc{i}.sock") if transport == "unix" else ("127.0.0.1", 0)
            settings = {
                "workers": 2,
                "log_file": str(folder / f"server{i}.log"),
                "log_format": "console",
                "shutdown_grace": 30.0,
                **(options[i] if i < len(options) else {}),
            }
            self.servers.append(rpc.Server(REGISTRY, address=address, authkey=self.authkey, **settings).start())
        self.addresses = [server.address for server in self.servers]

    def client(self, **options: Any) -> rpc.Client:
        options.setdefault("timeout", HANG)
        return rpc.connect(self.addresses, authkey=self.authkey, **options)

    def aio_client(self, **options: Any) -> Any:
        options.setdefault("timeout", HANG)
        return rpc.aio.connect(self.addresses, authkey=self.authkey, **options)

    def server_of(self, client: Any) -> rpc.Server:
        """The server a client's new calls go to."""
        return self.servers[self.addresses.index(client.address)]

    def handler_pids(self) -> dict[int, int]:
        """Handler pid -> index of its server."""
        return {pid: i for i, server in enumerate(self.servers) for pid in server.handler_pids()}

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture(params=["tcp", "unix"])
def fleet(request, tmp_path):
    made: list[Fleet] = []

    def make(count: int = 3, options: list[dict[str, Any]] | None = None) -> Fleet:
        made.append(Fleet(tmp_path, count, request.param, options or []))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def marks(tmp_path) -> Path:
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


def runs(marks: Path) -> dict[str, int]:
    """Call name -> how many times it ran."""
    return {path.name: path.read_text().count("\n") for path in marks.iterdir()}


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, HANG))


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(int(HANG / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def first_address(monkeypatch) -> None:
    """Make clients start at the first address of their list (else a random one)."""
    monkeypatch.setattr(random, "randrange", lambda n: 0)


# -- one address at a time, from a random start -----------------------------------------------


def test_clients_of_three_servers_start_at_random_addresses(fleet):
    servers = fleet(3)
    clients = [servers.client() for _ in range(60)]
    try:
        assert [client.add(i, 1) for i, client in enumerate(clients)] == [i + 1 for i in range(60)]
        seen = {client.address for client in clients}
    finally:
        for client in clients:
            client.close()
    # 60 random starts: the odds that one of three addresses is never picked are 3 * (2/3)**60, about 1e-10.
    assert seen == set(servers.addresses)


def test_aio_clients_of_three_servers_start_at_random_addresses(fleet):
    servers = fleet(3)

    async def body() -> set[Any]:
        clients = [await servers.aio_client() for _ in range(60)]
        try:
            assert await asyncio.gather(*(client.add(i, 1) for i, client in enumerate(clients))) == [i + 1 for i in range(60)]
            return {client.address for client in clients}
        finally:
            for client in clients:
                await client.close()

    assert run(body()) == set(servers.addresses)


def test_a_connect_that_fails_moves_to_the_next_address(fleet, monkeypatch):
    servers = fleet(2)
    servers.servers[0].close()  # the first address refuses connections
    first_address(monkeypatch)
    with servers.client() as client:
        assert client.address == servers.addresses[1]
        assert client.add(2, 3) == 5


# -- a server going away under its clients ------------------------------------------------------


def test_stopping_the_server_a_client_is_on_fails_no_call_and_runs_none_twice(fleet, marks):
    servers = fleet(3)
    server_of_pid = servers.handler_pids()
    with servers.client() as client:
        first = servers.server_of(client)
        outcomes: dict[str, Any] = {}

        def sequential(n: int) -> None:
            for i in range(40):
                name = f"seq{n}-{i}"
                try:
                    outcomes[name] = client.mark(str(marks), name, 0.01)
                except Exception as exc:
                    outcomes[name] = exc

        threads = [threading.Thread(target=sequential, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        # Many more in flight at once, on the same connection: most wait in the server's queue.
        futures = {f"sub{i}": client.submit("mark", str(marks), f"sub{i}", 0.01) for i in range(200)}
        assert wait_for(lambda: len(runs(marks)) >= 30, timeout=HANG)
        first.close()  # drains: running calls finish, queued ones are answered server_shutting_down
        for thread in threads:
            thread.join(HANG)
        for name, future in futures.items():
            try:
                outcomes[name] = future.result(HANG)
            except Exception as exc:
                outcomes[name] = exc
        assert client.add(1, 1) == 2
        assert client.address != first.address
        made_again = client.calls_made_again

    failed = {name: outcome for name, outcome in outcomes.items() if not isinstance(outcome, int)}
    assert failed == {}
    assert len(outcomes) == 360
    assert runs(marks) == {name: 1 for name in outcomes}  # each ran, once
    where = {server_of_pid[pid] for pid in outcomes.values()}
    assert servers.servers.index(first) in where and len(where) >= 2  # they went on at another server
    # Every submitted call was sent to the first server: those that ran elsewhere were made again
    # there. A sequential call begun after the go-away went elsewhere at once, and was not.
    moved = sum(server_of_pid[outcomes[f"sub{i}"]] != servers.servers.index(first) for i in range(200))
    assert 1 <= moved <= made_again <= moved + 160


def test_aio_stopping_the_server_a_client_is_on_fails_no_call_and_runs_none_twice(fleet, marks):
    servers = fleet(3)
    server_of_pid = servers.handler_pids()

    async def body() -> tuple[list[Any], rpc.Server, int]:
        async with servers.aio_client() as client:
            first = servers.server_of(client)
            calls = [asyncio.ensure_future(client.mark(str(marks), f"a{i}", 0.01)) for i in range(200)]
            await until(lambda: len(runs(marks)) >= 30, "some calls ran")
            await asyncio.to_thread(first.close)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            made_again = client.calls_made_again
            outcomes += await asyncio.gather(*(client.mark(str(marks), f"b{i}") for i in range(20)), return_exceptions=True)
            assert client.address != first.address
            assert client.calls_made_again == made_again  # calls begun after the move are not made again
            return outcomes, first, made_again

    outcomes, first, made_again = run(body())
    assert [outcome for outcome in outcomes if not isinstance(outcome, int)] == []
    assert runs(marks) == {name: 1 for name in [f"a{i}" for i in range(200)] + [f"b{i}" for i in range(20)]}
    where = {server_of_pid[pid] for pid in outcomes}
    assert servers.servers.index(first) in where and len(where) >= 2
    # Each of the first 200 was sent to the first server: those that ran elsewhere were made again.
    assert 1 <= sum(server_of_pid[pid] != servers.servers.index(first) for pid in outcomes[:200]) <= made_again


def test_a_pipelining_client_gets_the_go_away_with_calls_in_flight(fleet, marks, tmp_path):
    servers = fleet(2)
    with servers.client() as client:
        first = servers.server_of(client)
        # Both handlers of the first server held: one by another client, one by this one's own call;
        # the calls of the map then wait in its queue, in flight, when it begins to stop.
        gates = [Gate(tmp_path, f"gate{i}") for i in range(2)]
        other = rpc.connect(first.address, authkey=servers.authkey, timeout=HANG)
        others_call = other.submit("hold", *gates[0].args())
        gates[0].wait_started()
        own_call = client.submit("hold", *gates[1].args(), "own")
        gates[1].wait_started()
        on_first = client._calls
        results: list[Any] = []

        def mapped() -> None:
            results.extend(client.map("mark", [str(marks)] * 300, [f"m{i}" for i in range(300)], max_in_flight=64))

        mapper = threading.Thread(target=mapped)
        mapper.start()
        closer = threading.Thread(target=first.close)
        try:
            assert wait_for(lambda: len(first._router.table.queue) == 64, timeout=HANG)
            closer.start()
            mapper.join(HANG)  # answered server_shutting_down there, they went on at the other server
            assert not mapper.is_alive()
            assert on_first._leaving  # no new call went there
        finally:
            for gate in gates:
                gate.open()
        # The 64 queued there were answered server_shutting_down, and made again at the other.
        assert 64 <= client.calls_made_again <= 300
        assert own_call.result(HANG) == "own"  # the call running there finished there
        # The go-away came before that answer; then, nothing in flight, the client closed the connection.
        assert on_first._last_id is not None
        assert wait_for(lambda: on_first._failure is not None, timeout=HANG)
        others_call.result(HANG)
        other.close()
        closer.join(HANG)
        assert client.address == servers.addresses[1 - servers.servers.index(first)]
    assert len(results) == 300
    assert runs(marks) == {f"m{i}": 1 for i in range(300)}


def test_a_quiet_sequential_client_on_a_lent_socket_gets_the_go_away(fleet, tmp_path):
    servers = fleet(2)
    with servers.client() as client:
        first = servers.server_of(client)
        router = first._router
        assert client.add(1, 1) == 2  # (a first request is never lent)
        gate = Gate(tmp_path)
        held: list[Any] = []
        holder = threading.Thread(target=lambda: held.append(client.hold(*gate.args(), value="held")))
        holder.start()
        gate.wait_started()
        assert wait_for(lambda: len(router.lent) == 1, timeout=HANG)  # a handler serves the socket itself
        on_first = client._calls
        closer = threading.Thread(target=first.close)
        closer.start()
        assert wait_for(lambda: router.closing, timeout=HANG)
        # The drain recalls the lent socket in the same turn of the router's loop as it begins:
        # once a later turn has run, the recall is in the handler's pipe before its call ends.
        # (Without it, a handler that finishes first may serve the next call on the lent socket,
        # as it may any request sent before the go-away, and the go-away comes after it.)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), router.loop).result(HANG)
        gate.open()  # the handler answers, gives the socket back, and the router sends the go-away
        holder.join(HANG)
        assert held == ["held"]
        assert client.add(2, 3) == 5
        assert on_first._last_id is not None  # the go-away reached it
        assert client.address != first.address
        closer.join(HANG)
        assert not closer.is_alive()


def test_a_stream_under_way_ends_on_its_connection_and_new_calls_go_elsewhere(fleet):
    servers = fleet(2)
    with servers.client() as client:
        first = servers.server_of(client)
        stream = client.count(1000)
        assert next(stream) == 0
        first.close()  # a drain ends every stream it runs
        with pytest.raises(rpc.ServerShuttingDown):
            list(stream)
        assert client.add(2, 3) == 5
        assert client.address != first.address


# -- server_busy, and no server at all ------------------------------------------------------------


def _busy(server: rpc.Server, authkey: bytes, gate: Gate) -> rpc.Client:
    """Hold the only handler of ``server`` (made with max_pending=0), so it answers server_busy."""
    holder = rpc.connect(server.address, authkey=authkey, timeout=HANG)
    holder.submit("hold", *gate.args())
    gate.wait_started()
    return holder


def test_a_server_answering_server_busy_moves_calls_to_the_next(fleet, tmp_path, monkeypatch):
    servers = fleet(2, [{"workers": 1, "max_pending": 0}])
    gate = Gate(tmp_path)
    holder = _busy(servers.servers[0], servers.authkey, gate)
    try:
        first_address(monkeypatch)
        with servers.client() as client:
            assert client.address == servers.addresses[0]
            assert client.add(2, 3) == 5  # answered server_busy there, then run on the second
            assert client.address == servers.addresses[1]
            futures = [client.submit("add", i, 1) for i in range(20)]
            assert [future.result(HANG) for future in futures] == [i + 1 for i in range(20)]
    finally:
        gate.open()
        holder.close()


def test_aio_a_server_answering_server_busy_moves_calls_to_the_next(fleet, tmp_path, monkeypatch):
    servers = fleet(2, [{"workers": 1, "max_pending": 0}])
    gate = Gate(tmp_path)
    holder = _busy(servers.servers[0], servers.authkey, gate)
    first_address(monkeypatch)

    async def body() -> None:
        async with servers.aio_client() as client:
            assert client.address == servers.addresses[0]
            assert await asyncio.gather(*(client.add(i, 1) for i in range(20))) == [i + 1 for i in range(20)]
            assert client.address == servers.addresses[1]

    try:
        run(body())
    finally:
        gate.open()
        holder.close()


def test_every_server_answering_server_busy_is_the_callers_server_busy(fleet, tmp_path):
    servers = fleet(2, [{"workers": 1, "max_pending": 0}] * 2)
    gates = [Gate(tmp_path, f"gate{i}") for i in range(2)]
    holders = [_busy(server, servers.authkey, gate) for server, gate in zip(servers.servers, gates)]
    try:
        with servers.client() as client:
            with pytest.raises(rpc.ServerBusy):
                client.add(2, 3)
    finally:
        for gate in gates:
            gate.open()
        for holder in holders:
            holder.close()


def test_with_every_server_down_a_call_fails_clearly_within_its_deadline(fleet):
    servers = fleet(3)
    with servers.client(connect_timeout=HANG) as client:
        assert client.add(1, 1) == 2
        servers.close()
        started = time.monotonic()
        with pytest.raises(rpc.ConnectionClosed, match="cannot connect to any of 3 servers") as caught:
            client.call("add", 2, 3, timeout=1.0)
        assert time.monotonic() - started < HANG / 2  # a hang check: the call's deadline is 1 s
    for address in servers.addresses:
        assert rpc.transport.format_address(address) in str(caught.value)
    with pytest.raises(rpc.ConnectionClosed, match="cannot connect to any of 3 servers"):
        servers.client()


def test_aio_with_every_server_down_a_call_fails_clearly_within_its_deadline(fleet):
    servers = fleet(3)

    async def body() -> None:
        async with servers.aio_client(connect_timeout=HANG) as client:
            assert await client.add(1, 1) == 2
            await asyncio.to_thread(servers.close)
            started = time.monotonic()
            with pytest.raises(rpc.ConnectionClosed, match="cannot connect to any of 3 servers"):
                await client.call("add", 2, 3, timeout=1.0)
            assert time.monotonic() - started < HANG / 2  # a hang check: the call's deadline is 1 s

    run(body())


# -- one address, restarted --------------------------------------------------------------------------


def test_a_client_of_one_address_goes_on_through_its_server_restarting(tmp_path, marks):
    authkey = secrets.token_bytes(32)
    address: Any = str(tmp_path / "rpc.sock")

    def start() -> rpc.Server:
        return rpc.Server(REGISTRY, address=address, authkey=authkey, workers=2, log_file=str(tmp_path / "server.log")).start()

    server = start()
    outcomes: dict[str, Any] = {}
    with rpc.connect(address, authkey=authkey, timeout=HANG, connect_timeout=HANG) as client:

        def sequential(n: int) -> None:
            for i in range(60):
                name = f"s{n}-{i}"
                try:
                    outcomes[name] = client.mark(str(marks), name, 0.01)
                except Exception as exc:
                    outcomes[name] = exc

        threads = [threading.Thread(target=sequential, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        try:
            assert wait_for(lambda: len(runs(marks)) >= 20, timeout=HANG)
            server.close()
            server = start()  # the same address
            for thread in threads:
                thread.join(HANG)
        finally:
            server.close()
    assert {name: outcome for name, outcome in outcomes.items() if not isinstance(outcome, int)} == {}
    assert runs(marks) == {name: 1 for name in outcomes} and len(outcomes) == 180


def test_a_call_refused_by_a_server_that_stops_for_good_says_it_did_not_run(tmp_path):
    authkey = secrets.token_bytes(32)
    server = rpc.Server(REGISTRY, address=str(tmp_path / "rpc.sock"), authkey=authkey, workers=1, lease=False, log_file=str(tmp_path / "server.log")).start()
    gate = Gate(tmp_path)
    closer = threading.Thread(target=server.close)
    try:
        with rpc.connect(server.address, authkey=authkey, timeout=HANG, connect_timeout=0.5) as client:
            running = client.submit("hold", *gate.args(), "held")
            gate.wait_started()
            queued = client.submit("add", 1, 2)
            assert wait_for(lambda: len(server._router.table.queue) == 1, timeout=HANG)
            closer.start()
            # Refused (queued when the drain began); made again, but nothing listens there any more.
            with pytest.raises(rpc.ServerShuttingDown, match="did not run; it could not be made again: cannot connect"):
                queued.result(HANG)
            gate.open()
            assert running.result(HANG) == "held"
    finally:
        gate.open()
        if closer.is_alive():
            closer.join(HANG)
        server.close()
