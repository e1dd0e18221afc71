"""docs/protocol.md, checked against a real server over real sockets.

The peer here is written from the specification, not from rpc's code: its own
framing, its own HMAC-SHA256 handshake, msgpack bytes built by hand. Each row of
the spec's table "What the server does with malformed input" is a case below,
sent after a valid handshake and hello, followed by a ping: the answers tell
whether the server failed only that call (an error for its id, then the ping's
answer), closed the connection (an error with a nil id, then the end), or ignored
the frame (the ping's answer only).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import socket
import struct
import uuid
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Client as StdlibClient

import msgpack
import pytest

import rpc
import rpc.aio
from rpc import protocol
from helpers import Gate, still_serves

CHALLENGE, WELCOME, FAILURE = b"#CHALLENGE#", b"#WELCOME#", b"#FAILURE#"
PING_ID = 999_999  # the id of the ping sent after each case


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def framed(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def long_framed(payload: bytes) -> bytes:
    """The -1 + 8-byte form, for any size."""
    return struct.pack("!iQ", -1, len(payload)) + payload


HELLO = pack([4, 1, {"client": "wire-spec"}])


def request(request_id, method="add", args=(1, 2), kwargs=None, meta=None) -> bytes:
    return pack([0, request_id, method, list(args), {} if kwargs is None else kwargs, {} if meta is None else meta])


PING = request(PING_ID, "_rpc.ping", ())


class Peer:
    """One raw connection: bytes out exactly as written, frames in."""

    def __init__(self, server) -> None:
        address = server.address
        self.sock = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        self.sock.settimeout(20)
        self.sock.connect(address)
        self.authkey: bytes = server.authkey
        self.buffer = bytearray()

    @classmethod
    def admitted(cls, server) -> Peer:
        """Past the handshake (SHA-256 both ways) and the hello exchange."""
        peer = cls(server)
        peer.authenticate()
        info = peer.hello()
        assert info["server"] == "rpc" and isinstance(info["max_message_bytes"], int)
        peer.send(framed(HELLO))
        return peer

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> bytes:
        """The next whole frame; EOFError if the server closed first."""
        while True:
            if len(self.buffer) >= 4:
                size = struct.unpack_from("!i", self.buffer)[0]
                if len(self.buffer) >= 4 + size:
                    payload = bytes(self.buffer[4 : 4 + size])
                    del self.buffer[: 4 + size]
                    return payload
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError("the server closed the connection")
            self.buffer += data

    def at_eof(self) -> bool:
        """Nothing more comes: the server closed (and sent nothing else first)."""
        try:
            self.frame()
        except EOFError:
            return not self.buffer
        return False

    def authenticate(self, own_challenge: bytes | None = None) -> None:
        challenge = self.frame()
        assert challenge.startswith(CHALLENGE + b"{sha256}") and len(challenge) == 11 + 8 + 40
        message = challenge[len(CHALLENGE) :]
        self.send(framed(b"{sha256}" + hmac.new(self.authkey, message, "sha256").digest()))
        assert self.frame() == WELCOME
        own = own_challenge or b"{sha256}" + os.urandom(40)
        self.send(framed(CHALLENGE + own))
        answer = self.frame()
        assert hmac.compare_digest(answer, b"{sha256}" + hmac.new(self.authkey, own, "sha256").digest())
        self.send(framed(WELCOME))

    def hello(self) -> dict:
        kind, version, info = msgpack.unpackb(self.frame())
        assert (kind, version) == (4, 1)
        return info

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(rpc_server_module):
    return rpc_server_module("services:registry", workers=2, transport="tcp", handshake_timeout=2.0, max_message_bytes=1 << 20)


@dataclass
class Outcome:
    what: str  # "call fails", "closed", "ignored"
    code: str = ""
    message: str = ""
    type: str = ""
    id: int | None = None


def outcome(server, data: bytes, call_id: int | None = None) -> Outcome:
    """Send ``data`` (framed already) and a ping after a valid hello: what the server made of it.

    The router answers the ping at once, while a call's own error may come from a handler
    later: with ``call_id``, the answer for that id is awaited too.
    """
    peer = Peer.admitted(server)
    try:
        peer.send(data + framed(PING))
        answers: list[tuple[int, dict]] = []
        pinged = False
        while not (pinged and (call_id is None or answers)):
            try:
                kind, request_id, error, result = msgpack.unpackb(peer.frame(), strict_map_key=False)
            except EOFError:
                raise AssertionError(f"closed with no connection-level error, after {answers}") from None
            assert kind == 1
            if request_id == PING_ID:
                assert result == "pong"
                pinged = True
                continue
            assert error is not None, f"an answer to the malformed input: {result!r}"
            if request_id is None:
                assert not answers and not pinged, f"a nil-id error after {answers}"
                assert peer.at_eof(), "a nil-id error, and the connection went on"
                return Outcome("closed", error["code"], error["message"], error["type"])
            answers.append((request_id, error))
        if not answers:
            return Outcome("ignored")
        assert len(answers) == 1, answers
        request_id, error = answers[0]
        return Outcome("call fails", error["code"], error["message"], error["type"], request_id)
    finally:
        peer.close()


def str8(text: str) -> bytes:
    return pack(text)


# The table of docs/protocol.md: (input, bytes of one message, outcome, code, words of the message).
CASES = [
    ("not msgpack: 0xc1", b"\xc1", "closed", "protocol_error", "not valid msgpack"),
    ("not msgpack: text", b"hello there", "closed", "protocol_error", "malformed message: "),
    ("truncated", b"\x96\x00", "closed", "protocol_error", "truncated: the frame ends inside a msgpack value"),
    ("empty frame", b"", "closed", "protocol_error", "an empty frame"),
    ("a map", pack({"kind": 0}), "closed", "protocol_error", "not an array starting with an int kind, got a map of 1"),
    ("an int", pack(7), "closed", "protocol_error", "not an array starting with an int kind, got 7"),
    ("empty array", pack([]), "closed", "protocol_error", "not an array starting with an int kind"),
    ("kind a string", pack(["0", 1, "add", [], {}, {}]), "closed", "protocol_error", "the kind must be an int, got '0'"),
    ("kind 1 (response) from a client", pack([1, 1, None, 5]), "closed", "protocol_error", "kind 1 is not one a client sends"),
    ("kind 5", pack([5, 1]), "closed", "protocol_error", "kind 5 is not one a client sends"),
    ("kind 6", pack([6, 1, 2]), "closed", "protocol_error", "kind 6 is not one a client sends"),
    ("kind 7", pack([7, 1, None]), "closed", "protocol_error", "kind 7 is not one a client sends"),
    ("kind 9", pack([9, 7, "add", [], {}, {}]), "closed", "protocol_error", "kind 9 is not one a client sends"),
    ("kind 99", pack([99]), "closed", "protocol_error", "kind 99 is not one a client sends"),
    ("kind -1", pack([-1, 1]), "closed", "protocol_error", "kind -1 is not one a client sends"),
    ("request of 5 fields", pack([0, 7, "add", [1, 2], {}]), "closed", "protocol_error", "a request (kind 0) is an array of 6, got 5 fields"),
    ("request of 7 fields", pack([0, 7, "add", [1, 2], {}, {}, None]), "closed", "protocol_error", "a request (kind 0) is an array of 6, got 7 fields"),
    ("id negative", request(-1), "closed", "protocol_error", "request id must be an unsigned 64-bit int, got -1"),
    ("id float", request(1.0), "closed", "protocol_error", "request id must be an unsigned 64-bit int, got 1.0"),
    ("id string", request("1"), "closed", "protocol_error", "request id must be an unsigned 64-bit int, got '1'"),
    ("id nil", request(None), "closed", "protocol_error", "request id must be an unsigned 64-bit int, got nil"),
    ("id over 64 bits (ext 9)", request(msgpack.ExtType(9, (2**64).to_bytes(9, "big"))), "closed", "protocol_error", "request id must be an unsigned 64-bit int, got an extension value"),
    ("trailing bytes after a request", request(7) + b"\x00", "call fails", "protocol_error", "trailing bytes after the message"),
    ("trailing bytes after a cancel", pack([3, 7]) + b"\x00", "closed", "protocol_error", "trailing bytes after the message"),
    ("method an int", request(7, 42), "call fails", "protocol_error", "method must be a string, got 42"),
    ("method nil", request(7, None), "call fails", "protocol_error", "method must be a string, got nil"),
    ("method over 1024 bytes", request(7, "m" * 1025), "call fails", "protocol_error", "a method name is at most 1024 bytes"),
    ("method not UTF-8", pack([0, 7, "add", [1, 2], {}, {}]).replace(b"\xa3add", b"\xa3\xff\xfe\xfd"), "call fails", "protocol_error", "a string is not valid UTF-8"),
    ("args a map", request(7, args={}).replace(b"\x90", b"\x80", 1), "call fails", "protocol_error", "args must be an array"),
    ("args nil", pack([0, 7, "add", None, {}, {}]), "call fails", "protocol_error", "args must be an array (an empty one when there are none), got nil"),
    ("kwargs nil", pack([0, 7, "add", [1, 2], None, {}]), "call fails", "protocol_error", "kwargs must be a map of strings (an empty map when there are none), got nil"),
    ("kwargs an array", pack([0, 7, "add", [1, 2], [], {}]), "call fails", "protocol_error", "kwargs must be a map of strings"),
    ("kwargs with an int key", pack([0, 7, "add", [1], {1: 2}, {}]), "call fails", "protocol_error", "kwargs must be a map with string keys, got the key 1"),
    ("meta nil", pack([0, 7, "add", [1, 2], {}, None]), "call fails", "protocol_error", "meta must be a map (an empty map when there are no options), got nil"),
    ("meta a string", pack([0, 7, "add", [1, 2], {}, "meta"]), "call fails", "protocol_error", "meta must be a map"),
    ("timeout a string", request(7, meta={"timeout": "5"}), "call fails", "protocol_error", "timeout must be a number of seconds >= 0 and < 1e9, got '5'"),
    ("timeout negative", request(7, meta={"timeout": -1}), "call fails", "protocol_error", "timeout must be a number of seconds"),
    ("timeout 1e9", request(7, meta={"timeout": 1e9}), "call fails", "protocol_error", "timeout must be a number of seconds"),
    ("unknown extension code", request(7, "echo", [msgpack.ExtType(12, b"")]), "call fails", "protocol_error", "unknown extension type 12"),
    ("unknown method", request(7, "nope"), "call fails", "method_not_found", "no method named 'nope'"),
    ("wrong argument count", request(7, "add", [1]), "call fails", "remote_error", "missing 1 required positional argument"),
    ("notification, method an int", pack([2, 42, [], {}]), "closed", "protocol_error", "method must be a string, got 42"),
    ("notification of 3 fields", pack([2, "add", []]), "closed", "protocol_error", "a notification (kind 2) is an array of 4, got 3 fields"),
    ("cancel of 1 field", pack([3]), "closed", "protocol_error", "a cancel (kind 3) is an array of 2, got 1 field"),
    ("cancel of 3 fields", pack([3, 1, 2]), "closed", "protocol_error", "a cancel (kind 3) is an array of 2, got 3 fields"),
    ("cancel id a string", pack([3, "7"]), "closed", "protocol_error", "the id of a cancel must be an int, got '7'"),
    ("credit id nil", pack([8, None, 1]), "closed", "protocol_error", "the id of a credit must be an int, got nil"),
    ("credit count negative", pack([8, 7, -1]), "closed", "protocol_error", "a credit's count must be an int from 0 to 2^32-1, got -1"),
    ("credit count 2^32", pack([8, 7, 2**32]), "closed", "protocol_error", "a credit's count must be an int from 0 to 2^32-1"),
    ("credit of 2 fields", pack([8, 7]), "closed", "protocol_error", "a credit (kind 8) is an array of 3, got 2 fields"),
    ("hello of 2 fields", pack([4, 1]), "closed", "protocol_error", "a hello (kind 4) is an array of 3, got 2 fields"),
]

IGNORED = [
    ("unknown meta key", request(7, meta={"colour": "blue"})),  # runs: its answer is checked below
    ("notification with args nil", pack([2, "add", None, {}])),
    ("notification of an unknown method", pack([2, "nope", [], {}])),
    ("notification that raises", pack([2, "fail", ["ValueError"], {}])),
    ("cancel of an unknown id", pack([3, 12345])),
    ("cancel with a negative id", pack([3, -1])),
    ("credit for an unknown id", pack([8, 12345, 1])),
    ("a second hello", pack([4, 1, {}])),
    ("a second hello of another version", pack([4, 2, None])),
]


@pytest.mark.parametrize("name, message, what, code, words", CASES, ids=[case[0] for case in CASES])
def test_malformed_input_table(server, name, message, what, code, words):
    got = outcome(server, framed(message), 7 if what == "call fails" else None)
    assert (got.what, got.code) == (what, code), got
    assert words in got.message, got.message
    assert not got.message.rstrip().endswith(":"), "an error message that says nothing after its colon"
    if what == "call fails":
        assert got.id == 7
    if code in ("protocol_error", "method_not_found"):
        assert got.type == f"rpc.errors.{'ProtocolError' if code == 'protocol_error' else 'MethodNotFound'}"


@pytest.mark.parametrize("name, message", IGNORED, ids=[case[0] for case in IGNORED])
def test_ignored_inputs(server, name, message):
    if name == "unknown meta key":
        peer = Peer.admitted(server)
        peer.send(framed(message))
        assert msgpack.unpackb(peer.frame()) == [1, 7, None, 3]
        peer.close()
        return
    assert outcome(server, framed(message)).what == "ignored"


def test_a_duplicate_id_in_flight_closes_the_connection_naming_the_id(server, tmp_path):
    gate = Gate(tmp_path)
    peer = Peer.admitted(server)
    peer.send(framed(request(7, "hold", gate.args())))
    gate.wait_started()
    peer.send(framed(request(7, "add", (1, 2))))
    kind, request_id, error, _ = msgpack.unpackb(peer.frame())
    assert (kind, request_id, error["code"], error["type"]) == (1, None, "protocol_error", "rpc.errors.ProtocolError")
    assert "request id 7 is already in flight on this connection" in error["message"]
    assert peer.at_eof()
    peer.close()
    gate.open()
    still_serves(server)


def test_an_id_is_free_again_once_answered_and_ids_are_per_connection(server):
    one, two = Peer.admitted(server), Peer.admitted(server)
    for peer in (one, two):
        for _ in range(3):
            peer.send(framed(request(2**64 - 1, "add", (2, 3))))
            assert msgpack.unpackb(peer.frame()) == [1, 2**64 - 1, None, 5]
    one.close()
    two.close()


# -- framing --------------------------------------------------------------------------------


def test_the_long_frame_form_is_accepted_for_a_small_payload(server):
    peer = Peer.admitted(server)
    peer.send(long_framed(request(3, "add", (2, 3))))
    assert msgpack.unpackb(peer.frame()) == [1, 3, None, 5]
    peer.close()


def test_a_frame_over_max_message_bytes_is_refused_from_its_header(server):
    peer = Peer.admitted(server)
    peer.send(struct.pack("!i", 2**31 - 1))  # announced, never sent: refused before it is read
    kind, request_id, error, _ = msgpack.unpackb(peer.frame())
    assert (request_id, error["code"], error["type"]) == (None, "message_too_large", "rpc.errors.MessageTooLarge")
    assert "limit of 1048576 bytes" in error["message"]
    assert peer.at_eof()
    peer.close()


def test_a_negative_frame_length_closes_with_an_error(server):
    got = outcome(server, struct.pack("!i", -5))
    assert (got.what, got.code) == ("closed", "protocol_error")
    assert "a frame announced a negative length (-5)" in got.message


def test_a_large_frame_of_another_kind_closes_and_a_large_meta_fails_the_call(server):
    got = outcome(server, framed(pack([3, "x" * 5000])))
    assert (got.what, got.code) == ("closed", "protocol_error")
    assert "only a request or a notification may exceed 4096 bytes" in got.message
    big = pack([0, 7, "echo", ["y" * 5000], {}, {"pad": "z" * 5000}])
    got = outcome(server, framed(big), 7)
    assert (got.what, got.id) == ("call fails", 7)
    assert "meta is 5008 bytes; the limit is 4096" in got.message
    got = outcome(server, framed(pack([0, 7, "echo", ["y" * 5000], {}, None])), 7)
    assert (got.what, got.id, got.code) == ("call fails", 7, "protocol_error")
    assert "meta must be a map (an empty map when there are no options), got nil" in got.message


def test_extension_values_nested_too_deep_fail_the_call(server):
    value = pack([])
    for _ in range(40):
        value = pack([msgpack.ExtType(1, value)])
    got = outcome(server, framed(b"\x96\x00\x07\xa4echo" + value + b"\x80\x80"), 7)
    assert (got.what, got.id, got.code) == ("call fails", 7, "protocol_error")
    assert "more than 32 deep" in got.message


# -- hello ----------------------------------------------------------------------------------


def hello_outcome(server, first: bytes) -> dict:
    """Authenticate, then send ``first`` as the first frame: the nil-id error the server answers."""
    peer = Peer(server)
    try:
        peer.authenticate()
        peer.hello()
        peer.send(first)
        kind, request_id, error, result = msgpack.unpackb(peer.frame())
        assert (kind, request_id, result) == (1, None, None)
        assert peer.at_eof(), "the connection went on after a bad hello"
        return error
    finally:
        peer.close()


@pytest.mark.parametrize(
    "first, code, words",
    [
        (framed(request(1)), "protocol_error", "expected a hello [4, 1, {info}] first, got a message of kind 0"),
        (framed(pack([4, 1, None])), "protocol_error", "info must be a map (an empty one will do), got nil"),
        (framed(pack([4, 1, []])), "protocol_error", "info must be a map (an empty one will do), got an array of 0"),
        (framed(pack([4, "1", {}])), "protocol_error", "protocol_version must be the int 1, got '1'"),
        (framed(pack([4, None, {}])), "protocol_error", "protocol_version must be the int 1, got nil"),
        (framed(pack([4, 2, {}])), "protocol_error", "protocol version 2 is not supported; this server speaks 1"),
        (framed(pack([4, 1])), "protocol_error", "malformed hello: expected an array [4, 1, {info}], got an array of 2"),
        (framed(pack({"hello": 1})), "protocol_error", "malformed hello: expected an array [4, 1, {info}], got a map of 1"),
        (framed(b"\xc1"), "protocol_error", "malformed hello: not valid msgpack"),
        (framed(pack([4, 1, {"x": msgpack.ExtType(1, pack([]))}])), "protocol_error", "extension type 1 is not allowed in a hello"),
        (framed(HELLO + b"\x00"), "protocol_error", "malformed hello: trailing bytes after the message"),
        (struct.pack("!i", 65537), "message_too_large", "a hello of 65537 bytes; at most 65536"),
    ],
    ids=["request-first", "info-nil", "info-array", "version-str", "version-nil", "version-2", "short", "map",
         "not-msgpack", "ext", "trailing", "too-large"],
)
def test_a_bad_hello_gets_an_error_then_the_end(server, first, code, words):
    error = hello_outcome(server, first)
    assert error["code"] == code and words in error["message"], error
    assert error["type"] == ("rpc.errors.ProtocolError" if code == "protocol_error" else "rpc.errors.MessageTooLarge")


def test_no_hello_within_handshake_timeout_gets_an_error_then_the_end(server):
    peer = Peer(server)
    peer.authenticate()
    peer.hello()
    kind, request_id, error, _ = msgpack.unpackb(peer.frame())  # (within the 2 s handshake_timeout)
    assert (request_id, error["code"]) == (None, "protocol_error")
    assert "no hello within handshake_timeout (2 s)" in error["message"]
    assert peer.at_eof()
    peer.close()


def test_the_hello_info_may_carry_any_keys_and_requests_may_follow_it_at_once(server):
    peer = Peer(server)
    peer.authenticate()
    hello = pack([4, 1, {"client": "rpc-js", "runtime": {"node": "22"}, "features": ["x"]}])
    peer.send(framed(hello) + framed(request(1, "add", (2, 3))))  # without waiting for the server's hello
    peer.hello()
    assert msgpack.unpackb(peer.frame()) == [1, 1, None, 5]
    peer.close()


# -- handshake ------------------------------------------------------------------------------


def test_a_wrong_answer_gets_failure_then_the_end(server):
    peer = Peer(server)
    peer.frame()
    peer.send(framed(b"{sha256}" + bytes(32)))
    assert peer.frame() == FAILURE
    assert peer.at_eof()
    peer.close()


@pytest.mark.parametrize("digest", ["md5-bare", "sha256", "sha384", "sha3_256", "md5"])
def test_the_answers_the_server_accepts(server, digest):
    """SHA-256 (what clients send), the bare HMAC-MD5 of Python 3.11's stdlib client, and the
    other digests CPython 3.12 names."""
    peer = Peer(server)
    message = peer.frame()[len(CHALLENGE) :]
    if digest == "md5-bare":
        answer = hmac.new(server.authkey, message, "md5").digest()
    else:
        answer = b"{%s}" % digest.encode() + hmac.new(server.authkey, message, digest).digest()
    peer.send(framed(answer))
    assert peer.frame() == WELCOME
    peer.close()


def test_the_server_answers_a_20_byte_challenge_with_a_bare_hmac_md5(server):
    """The challenge Python 3.11's stdlib client sends."""
    peer = Peer(server)
    message = peer.frame()[len(CHALLENGE) :]
    peer.send(framed(b"{sha256}" + hmac.new(server.authkey, message, "sha256").digest()))
    assert peer.frame() == WELCOME
    own = os.urandom(20)
    peer.send(framed(CHALLENGE + own))
    assert peer.frame() == hmac.new(server.authkey, own, hashlib.md5).digest()
    peer.send(framed(WELCOME))
    assert peer.hello()["server"] == "rpc"
    peer.close()


def past_welcome(server) -> Peer:
    peer = Peer(server)
    message = peer.frame()[len(CHALLENGE) :]
    peer.send(framed(b"{sha256}" + hmac.new(server.authkey, message, "sha256").digest()))
    assert peer.frame() == WELCOME
    return peer


@pytest.mark.parametrize(
    "step",
    [framed(HELLO), framed(CHALLENGE + b"short"), framed(CHALLENGE + b"{sha1}" + bytes(40)), framed(b"x" * 257)],
    ids=["hello-instead-of-challenge", "short-challenge", "unknown-digest", "over-256-bytes"],
)
def test_the_clients_challenge_is_mandatory_and_checked_and_a_bad_one_ends_it_without_a_word(server, step):
    peer = past_welcome(server)
    peer.send(step)
    assert peer.at_eof()  # (nothing sent before the end)
    peer.close()


@pytest.mark.parametrize("verdict", [FAILURE, b"#WELCOME", HELLO])
def test_anything_but_welcome_as_the_clients_verdict_ends_it_without_a_word(server, verdict):
    peer = past_welcome(server)
    own = b"{sha256}" + os.urandom(40)
    peer.send(framed(CHALLENGE + own))
    peer.frame()
    peer.send(framed(verdict))
    assert peer.at_eof()
    peer.close()


@pytest.mark.parametrize(
    "first", [struct.pack("!i", 257) + b"x" * 257, struct.pack("!i", -5), struct.pack("!iQ", -1, 2**40)],
    ids=["257-bytes", "negative", "long-form"],
)
def test_a_bad_first_frame_in_the_handshake_ends_it_without_a_word(server, first):
    peer = Peer(server)
    peer.frame()
    peer.send(first)
    assert peer.at_eof()
    peer.close()


def test_silence_in_the_handshake_ends_it_after_handshake_timeout_without_a_word(server):
    peer = Peer(server)
    peer.frame()
    assert peer.at_eof()  # the socket's own timeout (20 s) is far above handshake_timeout (2 s)
    peer.close()


@pytest.fixture
def stdlib_conn(server):
    conn = StdlibClient(server.address, authkey=server.authkey)
    yield conn
    conn.close()


def test_the_stdlib_client_of_multiprocessing_connects_and_calls(server, stdlib_conn):
    """multiprocessing.connection.Client with the authkey (on 3.11: a bare HMAC-MD5 answer and a
    20-byte challenge), then a hello each way, requests and their responses."""
    kind, version, info = msgpack.unpackb(stdlib_conn.recv_bytes())
    assert (kind, version, info["server"]) == (4, 1, "rpc")
    stdlib_conn.send_bytes(HELLO)
    stdlib_conn.send_bytes(request(1, "add", (2, 3), meta={"timeout": 5}))
    assert msgpack.unpackb(stdlib_conn.recv_bytes()) == [1, 1, None, 5]
    stdlib_conn.send_bytes(request(2, "kwargs_echo", (1,), {"k": "v"}))
    assert msgpack.unpackb(stdlib_conn.recv_bytes()) == [1, 2, None, [[1], {"k": "v"}]]


# -- error maps: one rule for "type" ---------------------------------------------------------


def call_error(peer: Peer, request_id: int, method: str, args=(), meta=None) -> dict:
    peer.send(framed(request(request_id, method, args, meta=meta)))
    kind, got_id, error, _ = msgpack.unpackb(peer.frame())
    assert got_id == request_id and error is not None
    return error


def test_every_error_type_is_the_qualified_name_bare_only_for_builtins(server, tmp_path):
    peer = Peer.admitted(server)
    assert call_error(peer, 1, "fail", ["ValueError", "bad"])["type"] == "ValueError"
    assert call_error(peer, 2, "fail", ["KeyError"])["type"] == "KeyError"
    assert call_error(peer, 3, "fail_custom")["type"] == "services.CustomError"
    assert call_error(peer, 4, "nope")["type"] == "rpc.errors.MethodNotFound"
    error = call_error(peer, 5, "sleep", [30], meta={"timeout": 0.2})
    assert (error["code"], error["type"]) == ("call_timeout", "rpc.errors.CallTimeout")
    error = call_error(peer, 6, "unencodable")
    assert (error["code"], error["type"]) == ("serialization_error", "rpc.errors.SerializationError")
    error = call_error(peer, 7, "crash")
    assert (error["code"], error["type"]) == ("worker_crashed", "rpc.errors.WorkerCrashed")
    error = call_error(peer, 8, "big", [2 << 20])
    assert (error["code"], error["type"]) == ("message_too_large", "rpc.errors.MessageTooLarge")
    gate = Gate(tmp_path)
    peer.send(framed(request(9, "hold", gate.args())))
    gate.wait_started()
    peer.send(framed(pack([3, 9])))
    kind, got_id, error, _ = msgpack.unpackb(peer.frame())
    assert (got_id, error["code"], error["type"]) == (9, "call_cancelled", "rpc.errors.CallCancelled")
    peer.close()


def test_the_python_clients_raise_the_right_classes_for_qualified_types(server):
    with server.client(timeout=30) as client:
        with pytest.raises(rpc.MethodNotFound):
            client.nope()
        with pytest.raises(rpc.CallTimeout):
            client.call("sleep", 30, timeout=0.2)
        with pytest.raises(ValueError) as caught:
            client.fail("ValueError", "bad")
        assert isinstance(caught.value, rpc.RemoteError) and caught.value.type_name == "ValueError"
        with pytest.raises(rpc.RemoteError) as custom:
            client.fail_custom()
        assert custom.value.type_name == "services.CustomError"

    async def main() -> None:
        async with rpc.aio.connect(server.address, authkey=server.authkey, timeout=30) as client:
            with pytest.raises(rpc.MethodNotFound):
                await client.nope()
            with pytest.raises(rpc.CallTimeout):
                await client.call("sleep", 30, timeout=0.2)
            with pytest.raises(KeyError):
                await client.fail("KeyError")

    import asyncio

    asyncio.run(main())


@pytest.fixture(scope="module")
def stream_server(rpc_server_module):
    return rpc_server_module("stream_services:registry", workers=2, transport="tcp")


def test_a_stream_end_error_has_the_qualified_type(stream_server):
    peer = Peer.admitted(stream_server)
    peer.send(framed(request(1, "fail_after", (2, "broken"))))
    messages = [msgpack.unpackb(peer.frame()) for _ in range(4)]
    assert [m[0] for m in messages] == [5, 6, 6, 7]
    assert (messages[-1][2]["code"], messages[-1][2]["type"]) == ("remote_error", "ValueError")
    # A stream whose wait for an item passes its timeout: ended by the router.
    peer.send(framed(request(2, "sleep_between", (3, 30), meta={"timeout": 0.3})))
    while True:
        message = msgpack.unpackb(peer.frame())
        if message[0] == 7:
            break
    assert (message[2]["code"], message[2]["type"]) == ("call_timeout", "rpc.errors.CallTimeout")
    peer.close()


# -- values: the examples of docs/protocol.md, both ways -------------------------------------


@pytest.mark.parametrize(
    "value, hex_bytes",
    [
        ((1, 2), "c7 03 01 92 01 02"),
        ({3}, "d5 02 91 03"),
        (dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc),
         "c7 19 04" + b"2024-05-06T07:08:09+00:00".hex()),
        (dt.date(2024, 5, 6), "c7 0a 05" + b"2024-05-06".hex()),
        (Decimal("1.50"), "d6 06" + b"1.50".hex()),
        (uuid.UUID(int=1), "d8 07" + "00" * 15 + "01"),
        (1 + 2j, "d8 08 3ff0000000000000 4000000000000000"),
        (2**70, "c7 09 09 40" + "00" * 8),
        (-(2**64), "c7 09 09 ff" + "00" * 8),
        (dt.timedelta(days=1, seconds=2, microseconds=3), "d6 0a 93 01 02 03"),
        (dt.time(7, 8, 9), "d7 0b" + b"07:08:09".hex()),
    ],
    ids=["tuple", "set", "datetime", "date", "decimal", "uuid", "complex", "big-int", "big-negative", "timedelta", "time"],
)
def test_the_extension_examples_of_the_spec(server, value, hex_bytes):
    data = bytes.fromhex(hex_bytes.replace(" ", ""))
    assert protocol.encode_value(value) == data
    # And the server reads them so: echo sends the value back as it decoded it.
    peer = Peer.admitted(server)
    peer.send(framed(b"\x96\x00\x05\xa4echo\x91" + data + b"\x80\x80"))
    assert peer.frame() == b"\x94\x01\x05\xc0" + data
    peer.close()
