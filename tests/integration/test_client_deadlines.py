"""A call's timeout bounds its whole wait, whatever a server sends, or fails to send.

The hostile servers here are real: a thread listens on a loopback socket,
runs the authkey challenge and the hello exchange as rpc's server does, then
misbehaves. Each call runs under a generous bound (10 s, for waits of 0.3-0.5 s)
that exists only to catch a hang.
"""

from __future__ import annotations

import builtins
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import pytest

import rpc
from helpers import wait_for
from rpc import errors, protocol, transport
from rpc.framing import FrameReader

AUTHKEY = b"hostile-server-key"
HANG = 10.0  # seconds: a wait this long is a hang, not slowness


class HostileServer:
    """One connection on a real socket: authenticate, exchange hellos, then run ``script``."""

    def __init__(self, script: Callable[[HostileServer, Connection], None], hello: bool = True) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(HANG)
        self.address = self._sock.getsockname()[:2]
        self.release = threading.Event()  # the test lets the script go on
        self.requests: list[protocol.Request] = []
        self.errors: list[BaseException] = []
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, args=(script, hello), daemon=True)
        self._thread.start()

    def _run(self, script: Callable[[HostileServer, Connection], None], hello: bool) -> None:
        try:
            sock, _ = self._sock.accept()
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self._conn = Connection(sock.detach())
            deliver_challenge(conn, AUTHKEY)
            answer_challenge(conn, AUTHKEY)
            if hello:
                conn.send_bytes(protocol.encode_hello({"server": "hostile", "max_message_bytes": 1 << 26}))
                protocol.decode_hello(conn.recv_bytes(65536))
            script(self, conn)
        except (EOFError, OSError):
            pass  # the client went away, or the test closed the connection: the script ends
        except BaseException as exc:  # reported by close()
            self.errors.append(exc)

    def request(self, conn: Connection) -> protocol.Request:
        request = protocol.decode_request(conn.recv_bytes(1 << 26))
        self.requests.append(request)
        return request

    def close(self) -> None:
        self.release.set()
        if self._conn is not None:
            transport.shutdown(self._conn)
        self._thread.join(HANG)
        self._sock.close()
        if self._conn is not None:
            self._conn.close()
        assert not self._thread.is_alive(), "the hostile server's thread did not end"
        assert not self.errors, self.errors


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    servers: list[HostileServer] = []

    def start(script: Callable[[HostileServer, Connection], None], hello: bool = True) -> HostileServer:
        servers.append(HostileServer(script, hello))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class Outcome:
    """What a call did: its result or error, and how long it took."""

    result: Any = None
    error: BaseException | None = None
    seconds: float = 0.0


def bounded(action: Callable[[], Any]) -> Outcome:
    """Run ``action`` in a thread; fail the test if it has not finished within HANG seconds."""
    outcome = Outcome()

    def run() -> None:
        start = time.monotonic()
        try:
            outcome.result = action()
        except BaseException as exc:
            outcome.error = exc
        outcome.seconds = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive(), f"still waiting after {HANG} s: the deadline did not bound the wait"
    return outcome


def framed(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def call(client: rpc.Client, how: str, name: str, timeout: float) -> Any:
    """A call made with ``call``, or with ``submit`` and waited for with ``result``."""
    if how == "call":
        return client.call(name, timeout=timeout)
    return client.submit(name, timeout=timeout).result()


def assert_timed_out(outcome: Outcome, name: str, timeout: float) -> None:
    assert isinstance(outcome.error, rpc.CallTimeout), outcome.error
    assert str(outcome.error) == f"call {name!r} got no answer within its timeout of {timeout:g} s"


# -- half a frame, then nothing -------------------------------------------------------


def half_a_frame_then_the_rest(server: HostileServer, conn: Connection) -> None:
    """Send a length header and part of the answer, stall until released, then finish it."""
    request = server.request(conn)
    frame = framed(protocol.encode_response(request.id, "x" * 1000))
    os.write(conn.fileno(), frame[:100])
    server.release.wait(HANG)
    os.write(conn.fileno(), frame[100:])
    request = server.request(conn)
    conn.send_bytes(protocol.encode_response(request.id, "fresh"))
    server.request(conn)  # until the client leaves


@pytest.mark.parametrize("how", ["call", "submit"])
def test_half_a_frame_then_silence_ends_in_call_timeout_and_the_connection_stays_usable(hostile, how):
    server = hostile(half_a_frame_then_the_rest)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        outcome = bounded(lambda: call(client, how, "stalled", 0.5))
        assert_timed_out(outcome, "stalled", 0.5)
        # The partial frame stays buffered: the stream is still in step.
        assert not client.closed
        server.release.set()
        # The late answer completes and is dropped; the next call gets its own answer.
        assert bounded(lambda: call(client, how, "next", HANG)).result == "fresh"


# -- answers to ids never used --------------------------------------------------------


def flood_of_unknown_ids(server: HostileServer, conn: Connection) -> None:
    """Answer ids nobody asked for, as fast as the client reads, until released."""
    request = server.request(conn)
    junk = request.id + 1_000_000
    while not server.release.is_set():
        conn.send_bytes(protocol.encode_response(junk, None))
        junk += 1
    request = server.request(conn)
    conn.send_bytes(protocol.encode_response(request.id, "fresh"))
    server.request(conn)


@pytest.mark.parametrize("how", ["call", "submit"])
def test_a_flood_of_answers_to_unknown_ids_does_not_extend_the_wait(hostile, how):
    server = hostile(flood_of_unknown_ids)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        outcome = bounded(lambda: call(client, how, "flooded", 0.5))
        assert_timed_out(outcome, "flooded", 0.5)
        assert not client.closed
        server.release.set()
        assert bounded(lambda: call(client, how, "next", HANG)).result == "fresh"


# -- answers that never come ----------------------------------------------------------


def never_answer(server: HostileServer, conn: Connection) -> None:
    while True:
        server.request(conn)


def test_a_submitted_call_without_an_answer_fails_at_its_deadline(hostile):
    server = hostile(never_answer)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        future = client.submit("lost", timeout=0.5)
        outcome = bounded(lambda: future.exception(timeout=HANG))
        assert isinstance(outcome.result, rpc.CallTimeout), outcome.result
        assert str(outcome.result) == "call 'lost' got no answer within its timeout of 0.5 s"
        assert not client.closed


def test_map_raises_call_timeout_when_answers_never_come(hostile):
    server = hostile(never_answer)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        outcome = bounded(lambda: list(client.map("lost", [1, 2, 3], timeout=0.5)))
        assert isinstance(outcome.error, rpc.CallTimeout), outcome.error


def test_the_background_reader_wakes_for_a_deadline_earlier_than_the_one_it_waits_for(hostile):
    server = hostile(never_answer)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        patient = client.submit("patient", timeout=600)
        assert wait_for(lambda: len(server.requests) == 1)  # the reader now sleeps towards +600 s
        hasty = client.submit("hasty", timeout=0.3)
        outcome = bounded(lambda: hasty.exception(timeout=HANG))
        assert isinstance(outcome.result, rpc.CallTimeout), outcome.result
        assert not patient.done()
    assert isinstance(patient.exception(timeout=HANG), rpc.ConnectionClosed)  # closing fails the rest


def test_a_future_fails_at_its_deadline_while_another_thread_reads(hostile):
    server = hostile(never_answer)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        waiting: Future[Any] = Future()

        def blocked_call() -> None:
            try:
                waiting.set_result(client.call("held", timeout=None))
            except BaseException as exc:
                waiting.set_exception(exc)

        threading.Thread(target=blocked_call, daemon=True).start()
        # That thread sent its request and reads replies, with no deadline of its own.
        assert wait_for(lambda: len(server.requests) == 1 and client._calls._reading)
        future = client.submit("lost", timeout=0.3)
        outcome = bounded(lambda: future.exception(timeout=HANG))
        assert isinstance(outcome.result, rpc.CallTimeout), outcome.result
        assert not waiting.done()
    assert isinstance(waiting.exception(timeout=HANG), rpc.ConnectionClosed)


# -- a server that does not read --------------------------------------------------------

BIG = b"x" * (32 << 20)  # more than the socket buffers of both ends hold


def never_read(server: HostileServer, conn: Connection) -> None:
    server.release.wait(HANG)


def test_a_request_the_server_does_not_read_ends_in_call_timeout_and_closes_the_connection(hostile):
    server = hostile(never_read)
    with rpc.connect(server.address, authkey=AUTHKEY, reconnect=False) as client:
        outcome = bounded(lambda: client.call("swallow", BIG, timeout=0.5))
        assert isinstance(outcome.error, rpc.CallTimeout), outcome.error
        assert str(outcome.error) == "call 'swallow' could not be sent within its timeout of 0.5 s (the server is not reading)"
        # Part of the request went out: the stream is mid-message, so the connection is closed.
        assert client.closed
        with pytest.raises(rpc.ConnectionClosed, match="cut off by its timeout"):
            client.call("next", timeout=HANG)


def test_a_call_waiting_behind_another_send_still_ends_at_its_deadline(hostile):
    server = hostile(never_read)
    with rpc.connect(server.address, authkey=AUTHKEY) as client:
        sending: Future[Any] = Future()

        def send_forever() -> None:
            try:
                sending.set_result(client.notify("swallow", BIG))  # no deadline: waits for the server
            except BaseException as exc:
                sending.set_exception(exc)

        threading.Thread(target=send_forever, daemon=True).start()
        assert wait_for(client._calls._send_lock.locked)  # that thread now holds the socket for sending
        outcome = bounded(lambda: client.call("small", timeout=0.5))
        assert isinstance(outcome.error, rpc.CallTimeout), outcome.error
        assert not client.closed  # nothing of this call was sent: the stream is intact
    assert isinstance(sending.exception(timeout=HANG), rpc.ConnectionClosed)  # closing ends the other send


# -- sizes: every read is bounded before anything is allocated -------------------------


@pytest.mark.parametrize("header", [struct.pack("!i", 1 << 30), struct.pack("!iQ", -1, 1 << 40)])
def test_an_answer_over_max_message_bytes_is_refused_from_its_header(hostile, header):
    def huge_answer(server: HostileServer, conn: Connection) -> None:
        server.request(conn)
        os.write(conn.fileno(), header)
        server.release.wait(HANG)

    server = hostile(huge_answer)
    with rpc.connect(server.address, authkey=AUTHKEY, max_message_bytes=1 << 20) as client:
        outcome = bounded(lambda: client.call("huge", timeout=HANG))
        assert isinstance(outcome.error, rpc.MessageTooLarge), outcome.error
        assert "max_message_bytes (1048576)" in str(outcome.error)
        assert client.closed  # the stream cannot be resynchronised after a refused frame


def test_a_hello_cut_off_halfway_ends_in_connect_timeout(hostile):
    def half_a_hello(server: HostileServer, conn: Connection) -> None:
        os.write(conn.fileno(), framed(protocol.encode_hello({"server": "hostile"}))[:6])
        server.release.wait(HANG)

    server = hostile(half_a_hello, hello=False)
    outcome = bounded(lambda: rpc.connect(server.address, authkey=AUTHKEY, connect_timeout=0.5))
    assert isinstance(outcome.error, rpc.ConnectTimeout), outcome.error


def test_an_oversized_hello_is_refused_from_its_header(hostile):
    def huge_hello(server: HostileServer, conn: Connection) -> None:
        os.write(conn.fileno(), struct.pack("!i", 1 << 30))
        server.release.wait(HANG)

    server = hostile(huge_hello, hello=False)
    outcome = bounded(lambda: rpc.connect(server.address, authkey=AUTHKEY, connect_timeout=HANG))
    assert isinstance(outcome.error, rpc.MessageTooLarge), outcome.error
    assert f"{transport.format_address(server.address)} sent a handshake message announcing 1073741824 bytes; " \
        "at most 65536 are accepted there" in str(outcome.error)
    assert outcome.seconds < HANG / 2  # refused at once, not after the connect timeout


def test_a_hello_trickled_a_byte_at_a_time_ends_at_the_connect_timeout(hostile):
    """connect_timeout bounds the whole handshake, not each read of it."""
    hello = framed(protocol.encode_hello({"server": "hostile"}) + b"\0" * 200)

    def trickle(server: HostileServer, conn: Connection) -> None:
        # The slow sender under test: a byte every 0.1 s would take 20 s (> HANG) to finish.
        for byte in hello:
            if server.release.wait(0.1):
                return
            os.write(conn.fileno(), bytes([byte]))

    server = hostile(trickle, hello=False)
    outcome = bounded(lambda: rpc.connect(server.address, authkey=AUTHKEY, connect_timeout=0.5))
    assert isinstance(outcome.error, rpc.ConnectTimeout), outcome.error
    where = transport.format_address(server.address)
    assert str(outcome.error) == f"{where} did not complete the handshake within 0.5 s"


def test_a_server_that_accepts_and_says_nothing_is_named_in_the_connect_timeout():
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    try:
        where = transport.format_address(silent.getsockname()[:2])
        outcome = bounded(lambda: rpc.connect(silent.getsockname()[:2], authkey=AUTHKEY, connect_timeout=0.5))
        assert isinstance(outcome.error, rpc.ConnectTimeout), outcome.error
        assert str(outcome.error) == (
            f"connected to {where}, but nothing answered within 0.5 s: is an rpc server listening there? ({transport.TLS_HINT})"
        )
    finally:
        silent.close()


def test_a_connection_nobody_completes_says_connecting_took_too_long():
    # listen(0) queues one connection; with it taken, the kernel drops the next SYNs.
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(full.getsockname()[:2], timeout=HANG)
    try:
        address = full.getsockname()[:2]
        outcome = bounded(lambda: rpc.connect(address, authkey=AUTHKEY, connect_timeout=0.5))
        assert isinstance(outcome.error, rpc.ConnectTimeout), outcome.error
        assert str(outcome.error) == f"connecting to {transport.format_address(address)} took longer than 0.5 s"
    finally:
        filler.close()
        full.close()


# -- the server's CallTimeout (the client's own is checked above) ---------------------


def test_the_server_side_call_timeout_names_the_deadline(rpc_server):
    running = rpc_server("services:registry", workers=1, max_call_seconds=0.5)
    with running.client(timeout=HANG) as client:
        with pytest.raises(rpc.CallTimeout, match=r"^call 'sleep' passed its deadline of 0\.5 s"):
            client.sleep(HANG)


# -- the cache of remote exception classes ---------------------------------------------


def test_the_remote_exception_class_cache_does_not_grow_with_names_a_server_invents():
    assert errors.remote_error_class("KeyError") is errors.remote_error_class("KeyError")
    limit = sum(isinstance(value, type) and issubclass(value, BaseException) for value in vars(builtins).values())
    for i in range(5000):
        assert errors.remote_error_class(f"myapp.errors.Error{i}") is rpc.RemoteError
    assert len(errors._remote_classes) <= limit


# -- the frame reader on a real socket pair -------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_frames_split_anywhere_are_reassembled(pair):
    left, right = pair
    payloads = [b"", b"a", b"hello" * 20_000, bytes(range(256))]
    stream = b"".join(framed(p) for p in payloads) + struct.pack("!iQ", -1, 3) + b"xyz"
    reader = FrameReader(right.fileno(), 1 << 20)
    got = []
    writer = threading.Thread(target=lambda: [left.sendall(stream[i : i + 7]) for i in range(0, len(stream), 7)])
    writer.start()
    for _ in range(len(payloads) + 1):
        got.append(reader.read(time.monotonic() + HANG))
    writer.join(HANG)
    assert got == payloads + [b"xyz"]
    assert not reader.buffered


def test_a_deadline_mid_frame_keeps_the_bytes_for_the_next_read(pair):
    left, right = pair
    reader = FrameReader(right.fileno(), 1 << 20)
    frame = framed(b"payload")
    left.sendall(frame[:2])
    assert reader.read(time.monotonic() + 0.05) is None  # the frame is incomplete
    left.sendall(frame[2:6])
    # (a read that finds its deadline already passed reads nothing, so try until the bytes are in)
    assert wait_for(lambda: reader.read(time.monotonic() + 0.01) is None and reader.buffered == 6)
    left.sendall(frame[6:] + framed(b"next"))
    assert reader.read(time.monotonic() + HANG) == b"payload"
    assert reader.read(None) == b"next"


def test_a_large_frame_arrives_whole(pair):
    left, right = pair
    payload = os.urandom(3 << 20)
    writer = threading.Thread(target=left.sendall, args=(framed(payload),))
    writer.start()
    assert FrameReader(right.fileno(), 4 << 20).read(time.monotonic() + HANG) == payload
    writer.join(HANG)


def test_negative_lengths_and_the_peer_closing_are_reported(pair):
    left, right = pair
    left.sendall(struct.pack("!i", -2))
    with pytest.raises(rpc.ProtocolError):
        FrameReader(right.fileno(), 1 << 20).read(None)
    left.close()
    with pytest.raises(EOFError):
        FrameReader(right.fileno(), 1 << 20).read(time.monotonic() + HANG)
