"""rpc.aio against rpc's real server over Unix and TCP sockets, on asyncio's loop and uvloop.

Each test drives its coroutine with ``asyncio.run`` (or uvloop's runner) under a
bound that only catches a hang. Calls held open by ``services.hold`` are waited
on through their marker files, never by sleeping. The tests that need a server
to misbehave on cue (close mid-call, answer late, send half a frame) use a
peer that runs the real authkey handshake and hello on a loopback socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import pytest

import rpc
import rpc.aio
from helpers import Gate, queued_calls
from rpc import protocol, transport

HANG = 60.0  # seconds: a test still waiting after this long has hung
KEY = b"aio-test-key"

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop installs wherever the server's does
    uvloop = None  # type: ignore[assignment]


@pytest.fixture(scope="module", params=["unix", "tcp"])
def server(request, rpc_server_module):
    return rpc_server_module("services:registry", workers=2, transport=request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to its end on a fresh loop of the kind named, bounded by HANG."""
    if request.param == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")

    def runner(coroutine: Coroutine[Any, Any, Any]) -> Any:
        factory = uvloop.new_event_loop if request.param == "uvloop" else None
        with asyncio.Runner(loop_factory=factory) as loop:
            return loop.run(asyncio.wait_for(coroutine, HANG))

    return runner


def connect(server, **options: Any) -> Any:
    options.setdefault("timeout", HANG)
    return rpc.aio.connect(server.address, authkey=server.authkey, **options)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait, without blocking the loop, for a marker a call leaves (bounded)."""
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# -- calls ---------------------------------------------------------------------------


def test_calls_by_attribute_namespace_and_name_with_kwargs(server, run):
    async def body() -> None:
        async with connect(server) as client:
            assert await client.add(2, 3) == 5
            assert await client.math.hypot(3, 4) == 5.0
            assert await client.call("add", 2, 3, timeout=5) == 5
            assert await client.call("math.hypot", x=6, y=8) == 10.0
            assert await client.kwargs_echo(1, 2, a=3, timeout=4) == [[1, 2], {"a": 3, "timeout": 4}]
            assert await client.echo((1, {2}, b"x")) == (1, {2}, b"x")
            assert await client.call("add", 1, 1, timeout=None) == 2
            assert repr(client.math.hypot) == "<remote method 'math.hypot'>"
            assert not client.closed and client.server_info["server"] == "rpc"

    run(body())


def test_awaiting_connect_gives_an_open_client(server, run):
    async def body() -> None:
        client = await connect(server)
        try:
            assert await client.add(1, 2) == 3
            assert "open" in repr(client)
        finally:
            await client.aclose()
        assert client.closed and "closed" in repr(client)

    run(body())


def test_a_gather_of_1000_calls_is_pipelined_and_each_gets_its_own_answer(server, run):
    async def body() -> None:
        async with connect(server) as client:
            results = await asyncio.gather(*(client.add(i, 1) for i in range(1000)))
            assert results == [i + 1 for i in range(1000)]
            values = await asyncio.gather(*(client.echo([i, "x" * (i % 7)]) for i in range(1000)))
            assert values == [[i, "x" * (i % 7)] for i in range(1000)]
            assert await client.add(2, 2) == 4  # one call at a time again

    run(body())


def test_large_values_both_ways(server, run):
    async def body() -> None:
        async with connect(server) as client:
            for size in (0, (1 << 16) - 100, 1 << 16, (1 << 16) + 1, 3 << 20):
                assert await client.big(size) == b"x" * size
            value = bytes(range(256)) * 4000
            assert await client.echo(value) == value
            sizes = [10, 1 << 20, 1 << 16, 5]
            assert await asyncio.gather(*(client.big(n) for n in sizes)) == [b"x" * n for n in sizes]

    run(body())


def test_methods_ping_and_notify(server, run, tmp_path):
    marker = tmp_path / "notified"

    async def body() -> None:
        async with connect(server) as client:
            methods = {m.name: m for m in await client.methods()}
            assert methods["add"] == rpc.MethodInfo("add", "(x, y)", "Add two numbers.")
            assert "math.hypot" in methods
            assert 0 < await client.ping() < HANG
            assert await client.notify("touch", str(marker)) is None
            await until(marker.exists, "the notification ran")
            assert await client.add(1, 1) == 2

    run(body())


# -- errors --------------------------------------------------------------------------


def test_errors_arrive_as_the_sync_clients_classes(server, run):
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("fail", ("KeyError", "k")),
        ("fail", ("ValueError",)),
        ("fail_custom", ()),
        ("missing", ()),
        ("unencodable", ()),
        ("add", (1,)),
    ]
    with server.client() as sync:
        expected = []
        for name, args in calls:
            with pytest.raises(rpc.RPCError) as caught:
                sync.call(name, *args)
            expected.append((type(caught.value), str(caught.value)))

    async def body() -> None:
        async with connect(server) as client:
            for (name, args), (cls, text) in zip(calls, expected):
                with pytest.raises(rpc.RPCError) as caught:
                    await client.call(name, *args)
                assert type(caught.value) is cls and str(caught.value) == text
            with pytest.raises(KeyError) as key_error:
                await client.fail("KeyError", "k")
            assert isinstance(key_error.value, rpc.RemoteError) and key_error.value.type_name == "KeyError"
            assert "Traceback" in key_error.value.remote_traceback
            with pytest.raises(rpc.MethodNotFound):
                await client.math.nothing()
            with pytest.raises(rpc.SerializationError):
                await client.echo(object())  # refused before sending
            with pytest.raises(TypeError, match="method name must be a string"):
                await client.call(7)
            assert await client.add(2, 3) == 5  # call errors leave the client usable
            assert not client.closed

    run(body())


def test_bad_arguments_are_refused_where_they_are_given(server, run):
    with pytest.raises(ValueError, match="timeout must be"):
        rpc.aio.connect(server.address, authkey=server.authkey, timeout=0)
    with pytest.raises(ValueError, match="connect_timeout must be"):
        rpc.aio.connect(server.address, authkey=server.authkey, connect_timeout=float("nan"))
    with pytest.raises(rpc.ConfigError, match="authkey must be bytes, not str"):
        rpc.aio.connect(server.address, authkey="text")  # type: ignore[arg-type]
    with pytest.raises(rpc.ConfigError, match="address must be"):
        rpc.aio.connect(42)  # type: ignore[arg-type]

    async def body() -> None:
        async with connect(server) as client:
            with pytest.raises(ValueError, match="timeout must be"):
                client.call("add", 1, 2, timeout=-1)
            with pytest.raises(TypeError, match="timeout must be a number"):
                client.timeout = "5"  # type: ignore[assignment]
            client.timeout = 5
            assert client.timeout == 5

    run(body())


def test_an_argument_over_the_servers_limit_is_refused_before_sending(rpc_server, run):
    server = rpc_server("services:registry", workers=1, max_message_bytes=1 << 16)

    async def body() -> None:
        async with connect(server) as client:
            with pytest.raises(rpc.MessageTooLarge):
                await client.echo(b"x" * (1 << 17))
            assert await client.add(1, 2) == 3

    run(body())


# -- timeouts ------------------------------------------------------------------------


def test_a_timed_out_call_leaves_the_connection_usable_and_its_late_answer_is_dropped(server, run, tmp_path):
    gate = Gate(tmp_path)

    async def body() -> None:
        async with connect(server, timeout=0.5) as client:
            with pytest.raises(rpc.CallTimeout) as caught:
                await client.hold(*gate.args(), value="late")
            # The client's own timer, or the server's answer for the same deadline if it came first
            assert str(caught.value) in (
                "call 'hold' got no answer within its timeout of 0.5 s",
                "call 'hold' passed its deadline of 0.5 s",
                "the call passed its deadline",  # (served on a lent socket)
            )
            assert gate.started.exists()
            gate.open()  # the held call finishes now; its answer finds no call waiting
            results = await asyncio.gather(*(client.call("echo", i, timeout=HANG) for i in range(50)))
            assert results == list(range(50))
            assert await client.call("add", 1, 2, timeout=None) == 3
            assert not client.closed

    run(body())


def test_a_per_call_timeout_overrides_the_clients_and_gathered_calls_time_out_alone(server, run, tmp_path):
    gates = [Gate(tmp_path, f"gate{i}") for i in range(2)]

    async def body() -> None:
        async with connect(server) as client:
            held = [asyncio.ensure_future(client.call("hold", *gate.args(), timeout=0.5)) for gate in gates]
            quick = [client.echo(i) for i in range(20)]
            assert await asyncio.gather(*quick) == list(range(20))
            for outcome in await asyncio.gather(*held, return_exceptions=True):
                assert isinstance(outcome, rpc.CallTimeout), outcome
            for gate in gates:
                gate.open()
            assert await client.add(2, 2) == 4

    run(body())


def test_a_caller_that_gives_up_leaves_the_connection_usable(server, run, tmp_path):
    """asyncio.wait_for around a call: the call is forgotten and cancelled, its answer dropped."""
    gate = Gate(tmp_path)

    async def body() -> None:
        async with connect(server) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.hold(*gate.args()), 0.3)
            gate.open()
            assert await asyncio.gather(*(client.echo(i) for i in range(10))) == list(range(10))

    run(body())


def test_a_cancelled_task_stops_its_call_on_the_server(rpc_server, run, tmp_path):
    """Cancelling a task awaiting a call: a queued call never runs, a running one's handler is stopped."""
    own = rpc_server("services:registry", workers=1)
    gate, marker = Gate(tmp_path), tmp_path / "ran"  # the gate is never opened: only a cancel ends that call

    async def body() -> None:
        async with connect(own) as client:
            [pid] = own.handler_pids()
            running = asyncio.ensure_future(client.hold(*gate.args()))
            await until(gate.started.exists, "the call runs")
            queued = asyncio.ensure_future(client.touch(str(marker)))
            await until(lambda: queued_calls(own) == 1, "the second call waits in the server's queue")
            queued.cancel()
            running.cancel()
            outcomes = await asyncio.gather(running, queued, return_exceptions=True)
            assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
            await until(lambda: own.handler_pids() not in ([], [pid]), "the stopped handler is replaced")
            assert await client.add(1, 2) == 3
            await until(lambda: own.log_text().count("call_cancelled") == 2, "both cancels are logged")
        assert not marker.exists()

    run(body())


# -- the end of a connection ---------------------------------------------------------


def test_close_fails_the_calls_in_flight_with_connection_closed(server, run, tmp_path):
    gates = [Gate(tmp_path, f"gate{i}") for i in range(2)]

    async def body() -> None:
        client = await connect(server)
        held = [asyncio.ensure_future(client.hold(*gate.args())) for gate in gates]
        await until(lambda: all(gate.started.exists() for gate in gates), "both calls run")
        await client.close()
        for outcome in await asyncio.gather(*held, return_exceptions=True):
            assert isinstance(outcome, rpc.ConnectionClosed) and str(outcome) == "the client was closed"
        assert client.closed
        with pytest.raises(rpc.ConnectionClosed, match="the client was closed"):
            await client.add(1, 2)
        with pytest.raises(rpc.ConnectionClosed):
            await client.notify("add", 1, 2)
        await client.close()  # twice is harmless
        for gate in gates:
            gate.open()

    run(body())


def test_the_server_stopping_mid_call_fails_the_call_with_connection_closed(rpc_server, run, tmp_path):
    server = rpc_server("services:registry", workers=1, shutdown_grace=0.5)
    gate = Gate(tmp_path)

    async def body() -> None:
        async with connect(server, connect_timeout=1) as client:  # (the last call tries to reconnect for this long)
            held = asyncio.ensure_future(client.hold(*gate.args()))
            await until(gate.started.exists, "the call runs")
            # The server's close() waits for the running call (up to its grace): off the loop.
            stopping = threading.Thread(target=server.close)
            stopping.start()
            with pytest.raises((rpc.ConnectionClosed, rpc.WorkerCrashed, rpc.ServerShuttingDown)):
                await held
            await until(lambda: not stopping.is_alive(), "the server stopped")
            with pytest.raises(rpc.ConnectionClosed):
                await client.add(1, 2)
            assert client.closed

    run(body())


# -- connecting ----------------------------------------------------------------------


def test_a_wrong_authkey_is_refused_clearly(server, run):
    where = transport.format_address(server.address)

    async def body() -> None:
        with pytest.raises(rpc.AuthenticationError) as caught:
            await rpc.aio.connect(server.address, authkey=b"not the key")
        assert str(caught.value) == f"{where} refused this authkey: it is not the key the server was started with"
        with pytest.raises(rpc.AuthenticationError, match="requires an authkey and none was given"):
            await rpc.aio.connect(server.address)
        async with connect(server) as client:  # the server is none the worse
            assert await client.add(1, 1) == 2

    run(body())


def test_nothing_listening_is_named(run, tmp_path):
    path = str(tmp_path / "nobody.sock")

    async def body() -> None:
        with pytest.raises(rpc.ConnectionClosed, match="nothing is listening at .*no such socket file"):
            await rpc.aio.connect(path, authkey=KEY)

    run(body())


def test_a_server_that_accepts_and_says_nothing_ends_in_connect_timeout(run):
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    where = transport.format_address(silent.getsockname()[:2])

    async def body() -> None:
        with pytest.raises(rpc.ConnectTimeout) as caught:
            await rpc.aio.connect(silent.getsockname()[:2], authkey=KEY, connect_timeout=0.5)
        assert str(caught.value) == (
            f"connected to {where}, but nothing answered within 0.5 s: is an rpc server listening there? ({transport.TLS_HINT})"
        )

    try:
        run(body())
    finally:
        silent.close()


def test_a_connection_nobody_completes_says_connecting_took_too_long(run):
    # listen(0) queues one connection; with it taken, the kernel drops the next SYNs.
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(full.getsockname()[:2], timeout=HANG)
    address = full.getsockname()[:2]

    async def body() -> None:
        with pytest.raises(rpc.ConnectTimeout) as caught:
            await rpc.aio.connect(address, authkey=KEY, connect_timeout=0.5)
        assert str(caught.value) == f"connecting to {transport.format_address(address)} took longer than 0.5 s"

    try:
        run(body())
    finally:
        filler.close()
        full.close()


def test_text_addresses_are_read_as_the_sync_client_reads_them(rpc_server, run):
    server = rpc_server("services:registry", workers=1, transport="tcp")
    host, port = server.address

    async def body() -> None:
        async with rpc.aio.connect(f"{host}:{port}", authkey=server.authkey) as client:
            assert client.address == (host, port)
            assert await client.add(1, 2) == 3

    run(body())


# -- a peer that misbehaves on cue ---------------------------------------------------


def framed(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


class Peer:
    """One connection on a loopback socket: the real handshake and hello, then ``script``."""

    def __init__(self, script: Callable[[Peer, Connection], None], hello: bool = True) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(HANG)
        self.address = self._sock.getsockname()[:2]
        self.release = threading.Event()  # the test lets the script go on
        self.errors: list[BaseException] = []
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, args=(script, hello), daemon=True)
        self._thread.start()

    def _run(self, script: Callable[[Peer, Connection], None], hello: bool) -> None:
        try:
            sock, _ = self._sock.accept()
            sock.settimeout(None)
            conn = self._conn = Connection(sock.detach())
            deliver_challenge(conn, KEY)
            answer_challenge(conn, KEY)
            if hello:
                conn.send_bytes(protocol.encode_hello({"server": "peer", "max_message_bytes": 1 << 26}))
                protocol.decode_hello(conn.recv_bytes(65536))
            script(self, conn)
        except (EOFError, OSError):
            pass  # the client went away, or the test closed the connection
        except BaseException as exc:  # reported by close()
            self.errors.append(exc)

    def request(self, conn: Connection) -> protocol.Request:
        return protocol.decode_request(conn.recv_bytes(1 << 26))

    def close(self) -> None:
        self.release.set()
        if self._conn is not None:
            transport.shutdown(self._conn)
        self._thread.join(HANG)
        self._sock.close()
        if self._conn is not None:
            self._conn.close()
        assert not self._thread.is_alive(), "the peer's thread did not end"
        assert not self.errors, self.errors


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def start(script: Callable[[Peer, Connection], None], hello: bool = True) -> Peer:
        peers.append(Peer(script, hello))
        return peers[-1]

    yield start
    for started in peers:
        started.close()


def test_a_connection_lost_mid_call_fails_every_call_in_flight(peer, run):
    def read_three_then_hang_up(peer: Peer, conn: Connection) -> None:
        for _ in range(3):
            peer.request(conn)
        conn.close()

    server = peer(read_three_then_hang_up)

    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=KEY, timeout=HANG, reconnect=False) as client:
            outcomes = await asyncio.gather(*(client.add(i, 1) for i in range(3)), return_exceptions=True)
            for outcome in outcomes:
                assert isinstance(outcome, rpc.ConnectionClosed) and str(outcome) == "the server closed the connection"
            assert client.closed
            with pytest.raises(rpc.ConnectionClosed):
                await client.add(1, 2)

    run(body())


def test_a_late_answer_never_answers_a_later_call(peer, run):
    def answer_late(peer: Peer, conn: Connection) -> None:
        first = peer.request(conn)
        second = peer.request(conn)  # sent after the first timed out
        conn.send_bytes(protocol.encode_response(first.id, "late"))
        conn.send_bytes(protocol.encode_response(second.id, "fresh"))
        peer.request(conn)  # until the client leaves

    server = peer(answer_late)

    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=KEY) as client:
            with pytest.raises(rpc.CallTimeout):
                await client.call("slow", timeout=0.3)
            assert await client.call("quick", timeout=HANG) == "fresh"

    run(body())


def test_half_a_frame_then_silence_ends_in_call_timeout_and_the_rest_is_read_after(peer, run):
    def half_then_rest(peer: Peer, conn: Connection) -> None:
        request = peer.request(conn)
        frame = framed(protocol.encode_response(request.id, "x" * 1000))
        os.write(conn.fileno(), frame[:100])
        peer.release.wait(HANG)
        os.write(conn.fileno(), frame[100:])
        request = peer.request(conn)
        conn.send_bytes(protocol.encode_response(request.id, "fresh"))
        peer.request(conn)

    server = peer(half_then_rest)

    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=KEY) as client:
            with pytest.raises(rpc.CallTimeout):
                await client.call("first", timeout=0.3)
            server.release.set()
            assert await client.call("second", timeout=HANG) == "fresh"

    run(body())


def test_an_answer_over_max_message_bytes_is_refused_from_its_header(peer, run):
    def huge(peer: Peer, conn: Connection) -> None:
        peer.request(conn)
        os.write(conn.fileno(), struct.pack("!i", 1 << 30))
        peer.release.wait(HANG)

    server = peer(huge)

    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=KEY, max_message_bytes=1 << 20) as client:
            with pytest.raises(rpc.MessageTooLarge, match="1073741824 bytes exceeds the limit of 1048576"):
                await client.call("huge", timeout=HANG)
            assert client.closed  # the stream cannot be resynchronised after a refused frame

    run(body())


def test_an_oversized_hello_is_refused_from_its_header(peer, run):
    def huge_hello(peer: Peer, conn: Connection) -> None:
        os.write(conn.fileno(), struct.pack("!i", 1 << 30))
        peer.release.wait(HANG)

    server = peer(huge_hello, hello=False)
    where = transport.format_address(server.address)

    async def body() -> None:
        with pytest.raises(rpc.MessageTooLarge) as caught:
            await rpc.aio.connect(server.address, authkey=KEY)
        assert f"{where} sent a handshake message announcing 1073741824 bytes; at most 65536 are accepted there" in str(
            caught.value
        )

    run(body())


def test_a_hello_trickled_a_byte_at_a_time_ends_at_the_connect_timeout(peer, run):
    hello = framed(protocol.encode_hello({"server": "peer"}) + b"\0" * 200)

    def trickle(peer: Peer, conn: Connection) -> None:
        for byte in hello:  # a byte every 0.1 s would take 20 s to finish
            if peer.release.wait(0.1):
                return
            os.write(conn.fileno(), bytes([byte]))

    server = peer(trickle, hello=False)

    async def body() -> None:
        with pytest.raises(rpc.ConnectTimeout) as caught:
            await rpc.aio.connect(server.address, authkey=KEY, connect_timeout=0.5)
        assert str(caught.value) == f"{transport.format_address(server.address)} did not complete the handshake within 0.5 s"

    run(body())


def test_no_thread_is_started(server, run):
    async def body() -> None:
        before = threading.active_count()
        async with connect(server) as client:
            await asyncio.gather(*(client.add(i, 1) for i in range(100)))
            assert await client.add(1, 1) == 2
            assert threading.active_count() == before

    run(body())


def test_a_server_that_stops_reading_makes_calls_wait_for_room_within_their_timeout(peer, run):
    def read_one_then_stall(peer: Peer, conn: Connection) -> None:
        request = peer.request(conn)
        conn.send_bytes(protocol.encode_response(request.id, "first"))
        peer.release.wait(HANG)  # reads nothing more until released

    server = peer(read_one_then_stall)
    big = b"x" * (8 << 20)  # more than the socket buffers and the transport's high-water mark

    async def body() -> None:
        async with rpc.aio.connect(server.address, authkey=KEY) as client:
            assert await client.call("first", timeout=HANG) == "first"
            with pytest.raises(rpc.CallTimeout, match="got no answer"):
                await client.call("echo", big, timeout=0.5)  # taken into the transport's buffer
            with pytest.raises(rpc.CallTimeout) as caught:
                await client.call("echo", 1, timeout=0.5)
            assert str(caught.value) == (
                "call 'echo' could not be sent within its timeout of 0.5 s (the server is not reading)"
            )
            assert not client.closed

    run(body())
