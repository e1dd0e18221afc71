"""The client over a real socket, against a server end the test drives frame by frame.

A thread accepts the connection and runs the authkey challenge and the hello
exchange as rpc's server does; then the test reads the requests and writes the
answers itself, in the order and shape each test means to check: answers out of
order, to ids never asked, cut off mid-frame, larger than the client's reusable
buffer, or the connection ending with calls in flight. Every wait is bounded
(HANG, far beyond the 0.2-0.3 s timeouts used here) only to catch a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import pytest

import rpc
from helpers import wait_for
from rpc import protocol, transport

AUTHKEY = b"client-wire-test-key"
HANG = 10.0  # seconds: a wait this long is a hang, not slowness


class WireServer:
    """One connection's server side: :meth:`connect` a client, then :meth:`request` and :meth:`reply`."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        self._listener = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        self._listener.bind(address)
        self._listener.listen()
        self._listener.settimeout(HANG)
        self.address = self._listener.getsockname()
        self.conn: Connection | None = None
        self._accepted = threading.Event()
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
            sock.settimeout(None)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock.detach())
            deliver_challenge(conn, AUTHKEY)
            answer_challenge(conn, AUTHKEY)
            conn.send_bytes(protocol.encode_hello({"server": "wire-test", "max_message_bytes": 1 << 26}))
            assert conn.poll(HANG), "the client sent no hello"
            protocol.decode_hello(conn.recv_bytes(1 << 16))
            self.conn = conn
        except BaseException as exc:  # raised again by connect()
            self._error = exc
        finally:
            self._accepted.set()

    def connect(self, **options: Any) -> rpc.Client:
        """A client connected to this server (the two ends of the handshake run at once)."""
        options.setdefault("timeout", HANG)
        client = rpc.connect(self.address, authkey=AUTHKEY, **options)
        assert self._accepted.wait(HANG), "the server's end of the handshake did not finish"
        if self._error is not None:
            raise self._error
        return client

    def request(self) -> protocol.Request:
        """The next request the client sent."""
        assert self.conn is not None
        assert self.conn.poll(HANG), "the client sent no request"
        return protocol.decode_request(self.conn.recv_bytes(1 << 26))

    def message(self) -> list[Any]:
        """The next message the client sent, whatever its kind."""
        assert self.conn is not None
        assert self.conn.poll(HANG), "the client sent nothing"
        return protocol.decode_value(self.conn.recv_bytes(1 << 26))

    def reply(self, request_id: int | None, result: Any) -> None:
        self.send_raw(framed(protocol.encode_response(request_id, result)))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are: frames, or parts of one."""
        assert self.conn is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.conn.fileno(), view) :]

    def answer(self, result: Callable[[protocol.Request], Any]) -> None:
        """From now on, a thread answers each request with ``result(request)``.

        It takes every request already waiting before it answers, and answers
        those last first, so the client sees answers out of order whenever
        requests are in flight together.
        """

        def run() -> None:
            assert self.conn is not None
            try:
                while True:
                    batch = [protocol.decode_request(self.conn.recv_bytes(1 << 26))]
                    while self.conn.poll(0):
                        batch.append(protocol.decode_request(self.conn.recv_bytes(1 << 26)))
                    for request in reversed(batch):
                        self.reply(request.id, result(request))
            except (EOFError, OSError):
                pass  # the client left, or the test hung up

        self._threads.append(threading.Thread(target=run, daemon=True))
        self._threads[-1].start()

    def hang_up(self) -> None:
        """End the connection, as a server that goes away does."""
        if self.conn is not None and not self.conn.closed:
            transport.shutdown(self.conn)  # wakes the answering thread too

    def close(self) -> None:
        self.hang_up()
        self._listener.close()
        for thread in self._threads:
            thread.join(HANG)
            assert not thread.is_alive(), "a thread of the test server did not end"
        if self.conn is not None:
            self.conn.close()


@pytest.fixture
def wire(tmp_path: Any) -> Iterator[Callable[..., WireServer]]:
    """Start a :class:`WireServer` on ``"unix"`` (the default) or ``"tcp"``; all are closed after the test."""
    servers: list[WireServer] = []

    def start(transport: str = "unix") -> WireServer:
        address = str(tmp_path / f"wire{len(servers)}.sock") if transport == "unix" else ("127.0.0.1", 0)
        servers.append(WireServer(address))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class Running:
    """An action running in its own thread; :meth:`outcome` waits for it (bounded)."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(action,), daemon=True)
        self._thread.start()

    def _run(self, action: Callable[[], Any]) -> None:
        try:
            self.result = action()
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> Running:
        self._thread.join(HANG)
        assert not self._thread.is_alive(), f"still waiting after {HANG} s"
        return self


def framed(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "rpc-client-reader"]


# -- one call at a time ---------------------------------------------------------------


@pytest.mark.parametrize("transport_name", ["unix", "tcp"])
@pytest.mark.parametrize("timeout", [None, HANG], ids=["no-timeout", "timeout"])
def test_sequential_calls_each_get_their_answer_and_start_no_thread(wire, transport_name, timeout):
    server = wire(transport_name)
    client = server.connect(timeout=timeout)
    server.answer(lambda request: [request.method, *request.args])
    for i in range(300):
        assert client.add(i, 1) == ["add", i, 1]
        assert client.call("math.hypot", i, timeout=HANG) == ["math.hypot", i]
    assert not reader_threads()  # each call read its own answer
    client.close()


def test_answers_larger_than_the_receive_buffer_arrive_whole_between_small_ones(wire):
    server = wire()
    client = server.connect()
    server.answer(lambda request: bytes([request.args[0] % 251]) * request.args[0])
    sizes = [0, 10, 65_531, 65_532, 65_536, 1 << 20, 3, 200_000, 5, (1 << 16) - 4, 70_000]
    for size in sizes:
        assert client.call("blob", size) == bytes([size % 251]) * size
    assert list(client.map("blob", sizes, max_in_flight=4)) == [bytes([size % 251]) * size for size in sizes]
    assert client.call("blob", 7) == bytes([7]) * 7


def test_an_answer_framed_with_the_long_header_is_read(wire):
    server = wire()
    client = server.connect()
    call = Running(lambda: client.call("long"))
    payload = protocol.encode_response(server.request().id, "long header")
    server.send_raw(struct.pack("!iQ", -1, len(payload)) + payload)
    assert call.outcome().result == "long header"


def test_answers_to_ids_never_asked_are_ignored(wire):
    server = wire()
    client = server.connect()
    call = Running(lambda: client.call("mine"))
    request = server.request()
    server.reply(request.id + 1000, "stray")
    server.reply(request.id, "mine")
    assert call.outcome().result == "mine"


def test_a_remote_error_is_raised_and_the_next_call_is_answered(wire):
    server = wire()
    client = server.connect()
    call = Running(lambda: client.call("fails"))
    error = protocol.ErrorInfo(code=rpc.RemoteError.code, type_name="ValueError", message="bad value")
    server.send_raw(framed(protocol.encode_error(server.request().id, error)))
    assert isinstance(call.outcome().error, ValueError) and isinstance(call.error, rpc.RemoteError)
    assert call.error.message == "bad value"
    call = Running(lambda: client.call("works"))
    server.reply(server.request().id, "fine")
    assert call.outcome().result == "fine"


def test_a_late_answer_is_dropped_and_the_next_call_gets_its_own(wire):
    server = wire()
    client = server.connect()
    late = Running(lambda: client.call("slow", timeout=0.2))
    request = server.request()
    assert isinstance(late.outcome().error, rpc.CallTimeout)
    server.reply(request.id, "too late")
    call = Running(lambda: client.call("next"))
    server.reply(server.request().id, "fresh")
    assert call.outcome().result == "fresh"


def test_a_timeout_in_the_middle_of_a_large_answer_leaves_the_connection_usable(wire):
    server = wire()
    client = server.connect()
    cut_off = Running(lambda: client.call("big", timeout=0.3))
    frame = framed(protocol.encode_response(server.request().id, b"x" * 200_000))
    server.send_raw(frame[:100_000])  # more than the client's receive buffer holds, less than the frame
    assert isinstance(cut_off.outcome().error, rpc.CallTimeout)
    server.send_raw(frame[100_000:])  # the rest of an answer nobody waits for any more
    call = Running(lambda: client.call("next"))
    server.reply(server.request().id, b"y" * 70_000)
    assert call.outcome().result == b"y" * 70_000


def test_a_connection_level_error_fails_the_call_and_closes_the_client(wire):
    server = wire()
    client = server.connect(reconnect=False)
    call = Running(lambda: client.call("any"))
    server.request()
    error = protocol.ErrorInfo(code=rpc.ProtocolError.code, type_name="ProtocolError", message="confused")
    server.send_raw(framed(protocol.encode_error(None, error)))
    assert isinstance(call.outcome().error, rpc.ProtocolError)
    assert client.closed
    with pytest.raises(rpc.ProtocolError, match="confused"):  # the connection's failure, for every later call
        client.call("again")


def test_a_call_interrupted_by_ctrl_c_is_cancelled_and_the_next_call_gets_its_own_answer(wire):
    server = wire()
    client = server.connect()
    main = threading.get_ident()

    def waiting_for_the_answer() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name == "_next_response":
                return True
            frame = frame.f_back
        return False

    def interrupt() -> protocol.Request:
        request = server.request()  # the call is in flight
        # Interrupted while it waits for the answer, not while its request is still being
        # sent (that closes the connection: part of a frame may have gone out).
        assert wait_for(waiting_for_the_answer, timeout=HANG)
        signal.pthread_kill(main, signal.SIGINT)
        return request

    interrupter = Running(interrupt)
    with pytest.raises(KeyboardInterrupt):
        client.call("interrupted")
    assert not client._calls._pending  # nothing left in flight, which would keep later calls off the fast path
    interrupted = interrupter.outcome().result
    assert server.message() == [protocol.CANCEL, interrupted.id]  # sent before the interrupt propagated
    server.reply(interrupted.id, "dropped")
    call = Running(lambda: client.call("next"))
    server.reply(server.request().id, "fresh")
    assert call.outcome().result == "fresh"


# -- several calls in flight ------------------------------------------------------------


@pytest.mark.parametrize("first", ["reader", "other"])
def test_the_thread_reading_its_own_answer_hands_another_thread_its_answer(wire, first):
    server = wire()
    client = server.connect()
    reader = Running(lambda: client.call("reader"))  # alone: its thread reads the answers
    reader_request = server.request()
    other = Running(lambda: client.call("other"))  # waits while the first call's thread reads
    other_request = server.request()
    order = [reader_request, other_request] if first == "reader" else [other_request, reader_request]
    for request in order:
        server.reply(request.id, request.method)
    assert reader.outcome().result == "reader"
    assert other.outcome().result == "other"


def test_when_the_reading_call_times_out_a_waiting_call_reads_its_own_answer(wire):
    server = wire()
    client = server.connect()
    gives_up = Running(lambda: client.call("gives up", timeout=0.3))
    given_up = server.request()
    waits = Running(lambda: client.call("waits"))
    waiting = server.request()
    assert isinstance(gives_up.outcome().error, rpc.CallTimeout)
    server.reply(given_up.id, "too late")
    server.reply(waiting.id, "waited")
    assert waits.outcome().result == "waited"


def test_futures_answered_in_reverse_order_get_their_own_results(wire):
    server = wire()
    client = server.connect()
    futures = [client.submit("n", i) for i in range(20)]
    requests = [server.request() for _ in futures]
    for request in reversed(requests):
        if request.args[0] == 10:  # one with the long header, one to an unknown id
            payload = protocol.encode_response(request.id, request.args[0])
            server.send_raw(struct.pack("!iQ", -1, len(payload)) + payload)
            server.reply(10_000, "stray")
        else:
            server.reply(request.id, request.args[0])
    assert [future.result(HANG) for future in futures] == list(range(20))


def test_a_call_in_flight_with_a_future_and_a_future_with_a_call(wire):
    server = wire()
    client = server.connect()
    future = client.submit("future")  # the background reader reads
    future_request = server.request()
    call = Running(lambda: client.call("call"))
    call_request = server.request()
    server.reply(call_request.id, "call")
    server.reply(future_request.id, "future")
    assert call.outcome().result == "call"
    assert future.result(HANG) == "future"

    call = Running(lambda: client.call("call"))  # alone again: its thread reads
    call_request = server.request()
    future = client.submit("future")
    future_request = server.request()
    server.reply(future_request.id, "future")
    assert future.result(HANG) == "future"  # handed over by the calling thread
    server.reply(call_request.id, "call")
    assert call.outcome().result == "call"


def test_threads_sharing_a_client_each_get_their_own_answers(wire):
    server = wire()
    client = server.connect()
    server.answer(lambda request: list(request.args))
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(100):
                if i % 10 == 0:
                    assert client.submit("echo", thread, i).result(HANG) == [thread, i]
                else:
                    assert client.call("echo", thread, i) == [thread, i]
        except BaseException as exc:
            errors.append(exc)

    threads = [Running(lambda t=t: work(t)) for t in range(8)]
    for thread in threads:
        thread.outcome()
    assert not errors, errors[:3]
    assert client.call("echo", "after") == ["after"]


def test_every_call_in_flight_fails_with_connection_closed_when_the_connection_ends(wire):
    server = wire()
    client = server.connect(reconnect=False)
    alone = Running(lambda: client.call("alone"))
    server.request()
    other = Running(lambda: client.call("other"))
    server.request()
    future = client.submit("future")
    server.request()
    server.hang_up()
    assert isinstance(alone.outcome().error, rpc.ConnectionClosed)
    assert isinstance(other.outcome().error, rpc.ConnectionClosed)
    with pytest.raises(rpc.ConnectionClosed):
        future.result(HANG)
    assert client.closed
    with pytest.raises(rpc.ConnectionClosed):
        client.call("after")


def test_closing_the_client_ends_a_call_waiting_for_its_answer(wire):
    server = wire()
    client = server.connect()
    call = Running(lambda: client.call("waits"))
    server.request()
    client.close()
    assert isinstance(call.outcome().error, rpc.ConnectionClosed)
    assert str(call.error) == "the client was closed"


def test_methods_looked_up_by_attribute_call_their_own_names(wire):
    server = wire()
    client = server.connect()
    server.answer(lambda request: request.method)
    for i in range(300):  # more names than the client keeps
        assert getattr(client, f"m{i}")() == f"m{i}"
    assert client.m0() == "m0"
    assert client.math.hypot() == "math.hypot"
    with pytest.raises(AttributeError):
        client._private  # noqa: B018
