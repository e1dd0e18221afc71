"""The router's handshake state machine against hostile peers, on both event loops.

Each peer here speaks the wire format by hand over a raw socket, so it can do
what no well-behaved client does: pipeline every step of the handshake with its
hello and a request, split every frame at every byte, send frames over the
handshake's limit, nest its hello deeply, keep talking after a ``#FAILURE#``.
"""

from __future__ import annotations

import hmac
import os
import socket
import struct

import msgpack
import pytest

from conftest import Baseline, settled_baseline, still_serves
from helpers import framed, request, wait_for
from rpc import protocol

CHALLENGE, WELCOME, FAILURE = b"#CHALLENGE#", b"#WELCOME#", b"#FAILURE#"


class Peer:
    """A raw client socket: bytes out exactly as the test writes them, frames in."""

    def __init__(self, server) -> None:
        address = server.address
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.authkey = server.authkey
        self.buffer = bytearray()
        self.own_challenge = b"{sha256}" + os.urandom(40)

    def send(self, data: bytes, one_byte_at_a_time: bool = False) -> None:
        if not one_byte_at_a_time:
            self.sock.sendall(data)
            return
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])

    def frame(self) -> bytes:
        """The next whole frame (EOFError if the server closed first)."""
        while True:
            if len(self.buffer) >= 4:
                size = struct.unpack_from("!i", self.buffer)[0]
                if len(self.buffer) >= 4 + size:
                    payload = bytes(self.buffer[4 : 4 + size])
                    del self.buffer[: 4 + size]
                    return payload
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the server closed the connection")
            self.buffer += data

    def sees_eof(self, timeout: float = 10.0) -> bool:
        """Read (and drop) whatever comes until the server closes; False if it did not within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except socket.timeout:
            return False
        except ConnectionResetError:
            pass
        return True

    def authentication(self, challenge: bytes, key: bytes | None = None) -> bytes:
        """Everything the client side of the handshake sends, pipelined: the answer to ``challenge``,
        our own challenge, and the #WELCOME# that would follow the server's answer."""
        assert challenge.startswith(CHALLENGE)
        digest = hmac.new(key or self.authkey, challenge[len(CHALLENGE) :], "sha256").digest()
        return framed(b"{sha256}" + digest) + framed(CHALLENGE + self.own_challenge) + framed(WELCOME)

    def check_server_answer(self, answer: bytes) -> None:
        expected = b"{sha256}" + hmac.new(self.authkey, self.own_challenge, "sha256").digest()
        assert hmac.compare_digest(answer, expected), "the server's answer to our challenge is wrong"

    def close(self) -> None:
        self.sock.close()


def hello() -> bytes:
    return framed(protocol.encode_hello({"client": "hostile"}))


def read_admission(peer: Peer) -> None:
    """The server's side after a pipelined authentication: #WELCOME#, its answer, its hello."""
    assert peer.frame() == WELCOME
    peer.check_server_answer(peer.frame())
    assert protocol.decode_hello(peer.frame()).info["server"] == "rpc"


@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["one-write", "byte-by-byte"])
def test_handshake_hello_and_requests_pipelined_are_all_served(rpc_server, loop_name, one_byte_at_a_time):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name)
    baseline = settled_baseline(server)
    peer = Peer(server)
    challenge = peer.frame()
    stream = peer.authentication(challenge) + hello() + request(1, "add", 2, 3) + request(2, "_rpc.ping") + request(3, "add", 4, 5)
    peer.send(stream, one_byte_at_a_time)
    read_admission(peer)
    answers = {}
    for _ in range(3):
        response = protocol.decode_response(peer.frame())
        assert response.id not in answers
        answers[response.id] = response.result
    assert answers == {1: 5, 2: "pong", 3: 9}
    peer.close()
    still_serves(server)
    baseline.assert_restored()


@pytest.mark.parametrize(
    "header",
    [struct.pack("!i", 257), struct.pack("!i", 2**31 - 1), struct.pack("!iQ", -1, 2**62), struct.pack("!i", -5)],
    ids=["257", "2^31-1", "2^62", "negative"],
)
def test_an_oversize_or_negative_handshake_frame_ends_the_connection_and_nothing_after_it_runs(
    rpc_server, loop_name, tmp_path, header
):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    baseline = settled_baseline(server)
    marker = tmp_path / "ran"
    peer = Peer(server)
    challenge = peer.frame()
    # The bad frame, then a well-formed rest of the handshake and a call that must never run.
    peer.send(header + b"\0" * 300 + peer.authentication(challenge) + hello() + request(1, "touch", str(marker)))
    assert peer.sees_eof(), "the server kept the connection open"
    peer.close()
    assert wait_for(lambda: "client_rejected" in server.log_text(), 10)
    still_serves(server)  # (a call that ran would have had this long to touch the file)
    assert not marker.exists()
    baseline.assert_restored()


def test_bytes_after_a_failure_are_discarded_and_never_run(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    baseline = settled_baseline(server)
    marker = tmp_path / "ran"
    peer = Peer(server)
    challenge = peer.frame()
    wrong = peer.authentication(challenge, key=b"w" * 32)
    peer.send(wrong + hello() + request(1, "touch", str(marker)) + request(2, "add", 1, 2))
    assert peer.frame() == FAILURE
    assert peer.sees_eof()
    peer.close()
    still_serves(server)
    assert not marker.exists()
    assert wait_for(lambda: "digest received was wrong" in server.log_text(), 10)
    baseline.assert_restored()


def test_a_request_in_place_of_the_answer_is_refused_and_never_runs(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    baseline = settled_baseline(server)
    marker = tmp_path / "ran"
    peer = Peer(server)
    peer.frame()  # the challenge, ignored
    peer.send(hello() + request(1, "touch", str(marker)))
    assert peer.frame() == FAILURE
    assert peer.sees_eof()
    peer.close()
    still_serves(server)
    assert not marker.exists()
    baseline.assert_restored()


NESTED_HELLOS = {
    # 60,000 nested arrays: msgpack's own depth limit, inside the 64 KiB a hello may have.
    "deep-arrays": msgpack.packb([4, 1, {}])[:-1] + b"\x91" * 60_000 + b"\xc0",
    "deep-maps": msgpack.packb([4, 1, {}])[:-1] + b"\x81\xa1k" * 20_000 + b"\xc0",
    # An extension type nested in tuples: a hello decodes none at all.
    "ext-types": protocol.encode_value([4, 1, {"x": ((((1,),),),)}]),
    "wide-map": msgpack.packb([4, 1, {str(i): [i] for i in range(6000)}]),  # about 50 KiB: valid
    "oversize": msgpack.packb([4, 1, {str(i): [i] for i in range(8000)}]),  # about 70 KiB: over the hello's limit
    "list-keys": b"\x93\x04\x01\x81\x91\x01\x01",
    "bool-version": msgpack.packb([4, True, {}]),
}


@pytest.mark.parametrize("name", list(NESTED_HELLOS))
def test_a_hostile_hello_is_refused_or_taken_without_harm(rpc_server, loop_name, name):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    baseline = settled_baseline(server)
    peer = Peer(server)
    challenge = peer.frame()
    peer.send(peer.authentication(challenge) + framed(NESTED_HELLOS[name]) + request(1, "add", 1, 2))
    read_admission(peer)
    try:
        first = peer.frame()
    except EOFError:
        first = None  # refused without a word
    if name == "wide-map":  # a valid hello, if a large one: served
        assert protocol.decode_response(first).result == 3
    else:
        assert first is None or protocol.decode_response(first).id is None
        assert peer.sees_eof()
    peer.close()
    still_serves(server)
    assert "Traceback" not in server.log_text()
    baseline.assert_restored()


def test_close_ends_connections_at_every_step_of_the_handshake_at_once(rpc_server, loop_name):
    baseline = Baseline()  # before the server: once closed, it leaves nothing behind
    # A long handshake deadline: only close() can end these connections within the test.
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, handshake_timeout=60.0)
    silent = [Peer(server) for _ in range(20)]  # never answer the challenge
    for peer in silent:
        assert peer.frame().startswith(CHALLENGE)  # (adopted by the router: see test_router_lifecycle for the others)
    half = []  # answered, then stopped before #WELCOME#
    for _ in range(20):
        peer = Peer(server)
        digest = hmac.new(peer.authkey, peer.frame()[len(CHALLENGE) :], "sha256").digest()
        peer.send(framed(b"{sha256}" + digest))
        assert peer.frame() == WELCOME
        half.append(peer)
    no_hello = []  # authenticated, hello never sent
    for _ in range(20):
        peer = Peer(server)
        peer.send(peer.authentication(peer.frame()))
        read_admission(peer)
        no_hello.append(peer)
    partial = Peer(server)  # half a frame
    partial.frame()
    partial.send(struct.pack("!i", 100) + b"\0" * 10)
    server.server.close()
    for group, peers in {"silent": silent, "half": half, "no_hello": no_hello, "partial": [partial]}.items():
        for i, peer in enumerate(peers):
            assert peer.sees_eof(timeout=10), (group, i)
            peer.close()
    assert "Traceback" not in server.log_text()
    baseline.assert_restored()
