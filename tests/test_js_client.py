"""Conformance of the Node.js client (clients/js) with a real server, over TCP and a Unix socket.

Each test runs ``node clients/js/test/conformance.js SCENARIO`` against a real server
(real handler processes, a real authkey handshake) and asserts here on the JSON it
prints: values come tagged (``{"$tuple": [...]}``, ``{"$bigint": "..."}``) so that a
tuple is told from a list and a 70-bit int from a float. Every node run is bounded
by ``NODE_SECONDS``.

Every assertion is on what the protocol specification (docs/protocol.md) says.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import pytest

from certs import Authority
from helpers import log_has
from rpc import handshake, protocol

NODE = shutil.which("node")
SCRIPT = Path(__file__).resolve().parent.parent / "clients" / "js" / "test" / "conformance.js"
NODE_SECONDS = 120  # a node run that takes longer is killed and fails its test
MAX_MESSAGE_BYTES = 1 << 20  # the servers' limit, small so the client's check of it is cheap to test

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed: the Node.js client's conformance test needs it (CI has it)")


def run_node(scenario: str, *arg: str, address: str = "", authkey: bytes | None = None, stdin: str | None = None) -> Any:
    """Run one scenario of the JS client; what it printed, decoded from JSON."""
    assert NODE is not None
    env = {name: value for name, value in os.environ.items() if not name.startswith("RPC_")}
    env.update(RPC_ADDRESS=address, RPC_AUTHKEY_HEX="" if authkey is None else authkey.hex())
    proc = subprocess.run(
        [NODE, str(SCRIPT), scenario, *arg],
        env=env,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=NODE_SECONDS,
    )
    assert proc.returncode == 0, f"node {scenario} {' '.join(arg)} exited {proc.returncode}:\n{proc.stderr}"
    return json.loads(proc.stdout)


def js_address(server) -> str:
    """The server's address as rpc writes it: HOST:PORT, or the socket's path."""
    address = server.address
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def run_against(server, scenario: str, *arg: str) -> Any:
    return run_node(scenario, *arg, address=js_address(server), authkey=server.authkey)


@pytest.fixture(scope="module", params=["tcp", "unix"])
def server(request, rpc_server_module):
    return rpc_server_module("services:registry", transport=request.param, workers=2, max_message_bytes=MAX_MESSAGE_BYTES)


# -- handshake, hello, calls ----------------------------------------------------------------


@pytest.fixture(scope="module")
def calls(server) -> dict[str, Any]:
    """The ``calls`` scenario's results: one node run serves the tests below."""
    return run_against(server, "calls")


def test_handshake_and_hello(calls):
    assert calls["hello"]["server"] == "rpc"
    assert isinstance(calls["hello"]["version"], str)
    assert calls["hello"]["max_message_bytes"] == MAX_MESSAGE_BYTES
    assert calls["closed"] is None  # closed by the client, cleanly


def test_calls_with_positional_and_keyword_arguments(calls):
    assert calls["add"] == {"result": 5}
    assert calls["hypot"] == {"result": 5}
    assert calls["kwargs_only"] == {"result": 42}
    assert calls["kwargs_echo"] == {"result": [[1, 2], {"a": 1, "b": "x"}]}


def test_remote_exceptions_carry_code_type_message_and_traceback(calls):
    error = calls["remote_error"]["error"]
    assert (error["code"], error["type"], error["message"]) == ("remote_error", "ValueError", "bad value")
    assert error["traceback"].endswith("ValueError: bad value\n")
    assert error["local"] is False and error["transport"] is False
    custom = calls["custom_error"]["error"]
    assert (custom["code"], custom["type"], custom["message"]) == ("remote_error", "services.CustomError", "custom failure")
    wrong = calls["wrong_arguments"]["error"]
    assert (wrong["code"], wrong["type"]) == ("remote_error", "TypeError")
    assert calls["after_deadlines"] == {"result": 2}  # the connection went on after every failure


def test_method_not_found(calls):
    error = calls["not_found"]["error"]
    assert error["code"] == "method_not_found"
    assert error["type"] == "rpc.errors.MethodNotFound"
    assert "no_such_method" in error["message"]
    assert error["transport"] is False


def test_deadlines(calls):
    server_side = calls["server_deadline"]["error"]
    assert server_side["code"] == "call_timeout" and server_side["local"] is False
    assert server_side["type"] == "rpc.errors.CallTimeout"
    client_side = calls["client_deadline"]["error"]
    assert client_side["code"] == "call_timeout" and client_side["local"] is True


# Each value the JS side sent to `echo`: the Python type the handler received, and what came back.
EXT_VALUES = {
    "tuple": ("tuple", {"$tuple": [1, "a", {"$tuple": [2, {"$tuple": []}]}]}),
    "set": ("set", {"$set": [1, 2, 3]}),
    "frozenset": ("frozenset", {"$frozenset": ["x"]}),
    "datetime_aware": ("datetime", {"$datetime": "2024-02-29T12:34:56.789012+05:30"}),
    "datetime_naive": ("datetime", {"$datetime": "2024-02-29T12:34:56"}),
    "js_date": ("datetime", {"$datetime": "2024-02-29T12:34:56.789000+00:00"}),
    "date": ("date", {"$date": "2024-02-29"}),
    "time": ("time", {"$time": "23:59:59.000001"}),
    "decimal": ("Decimal", {"$decimal": "3.14159265358979323846264338327950288"}),
    "uuid": ("UUID", {"$uuid": "12345678-1234-5678-1234-567812345678"}),
    "complex": ("complex", {"$complex": [1.5, -2]}),
    "timedelta": ("timedelta", {"$timedelta": [1, 2, 3]}),
    "int_2_70": ("int", {"$bigint": str(2**70)}),
    "int_minus_2_70": ("int", {"$bigint": str(-(2**70))}),
    "int_2_64_minus_1": ("int", {"$bigint": str(2**64 - 1)}),
    "int_minus_2_63": ("int", {"$bigint": str(-(2**63))}),
    "int_2_53": ("int", {"$bigint": str(2**53)}),
    "int_small": ("int", -5),
    "float_integral": ("float", 2),
    "float": ("float", 1.5),
    "bytes": ("bytes", {"$bytes": "0001ff"}),
    "str": ("str", "héllo \U0001f600"),
    "map_int_keys": ("dict", {"$map": [[1, "a"], [2, "b"]]}),
    "nested": ("dict", {"list": [1, [2, [3]]], "none": None, "yes": True}),
}


@pytest.mark.parametrize("name", list(EXT_VALUES))
def test_values_both_ways(calls, name):
    python_type, echoed = EXT_VALUES[name]
    assert calls["python_type"][name] == {"result": python_type}
    assert calls["echo"][name] == {"result": echoed}


def test_ext_values_made_by_python(calls):
    assert calls["nested_tuple"] == {"result": {"$tuple": [{"$tuple": [{"$tuple": [{"$tuple": []}]}]}]}}


def test_100_pipelined_calls(calls):
    assert calls["in_flight"] == 100  # all sent before the first answer was read
    assert calls["pipelined"] == [["js", i] for i in range(100)]  # each answer matched to its call by id


# -- authentication ------------------------------------------------------------------------


def test_a_wrong_authkey_gives_a_clear_error(server):
    since = server.log_size()
    result = run_against(server, "wrong-key")
    wrong, missing = result["wrong"]["error"], result["none"]["error"]
    assert wrong["code"] == "authentication_error" and wrong["transport"] is True
    assert "refused this authkey" in wrong["message"]
    assert missing["code"] == "authentication_error"
    assert "requires an authkey and none was given" in missing["message"]
    assert log_has(server, "digest received was wrong")
    assert "digest received was wrong" in server.log_text(since)


class MisbehavingPeer:
    """A peer on a Unix socket that runs part of the server's handshake and then misbehaves.

    ``silent``: it says nothing.
    ``no-challenge``: it sends a hello at once, as a server without an authkey.
    ``bad-proof``: it challenges the client and accepts its answer, but answers the
    client's challenge with a digest of the wrong key. Not an rpc server (none behaves
    so); it records what the client sent.
    """

    def __init__(self, folder: str, behaviour: str, authkey: bytes) -> None:
        self.path = os.path.join(folder, "peer.sock")
        self.behaviour = behaviour
        self.authkey = authkey
        self.received: list[bytes] = []
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(NODE_SECONDS)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(NODE_SECONDS)
                if self.behaviour == "silent":
                    pass
                elif self.behaviour == "no-challenge":
                    self._send(conn, protocol.encode_hello({"server": "not rpc"}))
                else:
                    challenge = b"{sha256}" + secrets.token_bytes(40)
                    self._send(conn, handshake.CHALLENGE + challenge)
                    handshake.verify(self.authkey, challenge, self._receive(conn))  # the client's answer is right
                    self._send(conn, handshake.WELCOME)
                    theirs = self._receive(conn)
                    assert theirs.startswith(handshake.CHALLENGE)
                    self._send(conn, handshake.answer(b"another key", theirs[len(handshake.CHALLENGE) :]))
                while self._receive(conn):  # what the client says before it hangs up
                    pass
        except EOFError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            self.listener.close()

    @staticmethod
    def _send(conn: socket.socket, payload: bytes) -> None:
        conn.sendall(struct.pack("!i", len(payload)) + payload)

    def _receive(self, conn: socket.socket) -> bytes:
        size = struct.unpack("!i", self._exactly(conn, 4))[0]
        assert 0 <= size <= handshake.MAX_HELLO_FRAME
        payload = self._exactly(conn, size)
        self.received.append(payload)
        return payload

    @staticmethod
    def _exactly(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def join(self) -> None:
        self.thread.join(NODE_SECONDS)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize(
    "behaviour, expected",
    [("no-challenge", "did not ask for the authkey"), ("bad-proof", "could not prove it holds it")],
)
def test_a_server_that_does_not_prove_it_holds_the_authkey_is_refused(behaviour, expected):
    authkey = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="rpc-js-") as folder:
        peer = MisbehavingPeer(folder, behaviour, authkey)
        result = run_node("connect-only", address=peer.path, authkey=authkey)
        peer.join()
    assert result["error"]["code"] == "authentication_error"
    assert expected in result["error"]["message"]
    if behaviour == "bad-proof":
        assert peer.received[-1] == handshake.FAILURE  # the client says so before it hangs up


def test_connect_timeout_and_nothing_listening():
    authkey = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="rpc-js-") as folder:
        peer = MisbehavingPeer(folder, "silent", authkey)
        silent = run_node("connect-only", "0.5", address=peer.path, authkey=authkey)
        peer.join()
        nobody = run_node("connect-only", address=os.path.join(folder, "nobody.sock"), authkey=authkey)
    assert silent["error"]["code"] == "connect_timeout"
    assert "within the connect timeout of 0.5 s" in silent["error"]["message"]
    assert nobody["error"]["code"] == "connection_closed"
    assert "cannot connect to the server at" in nobody["error"]["message"]


def test_a_tls_server_is_named_as_such(rpc_server, tmp_path):
    """This client has no TLS: a TLS server's alert, sent in clear when its handshake_timeout
    ends, is the start of a TLS record, not a frame too large to read."""
    issued = Authority(tmp_path).issue("server")
    server = rpc_server(
        "services:registry", transport="tcp", tls_cert_file=str(issued.cert), tls_key_file=str(issued.key), handshake_timeout=0.5
    )
    result = run_against(server, "connect-only", "30")
    assert result["error"]["code"] == "protocol_error"
    assert "speaks TLS" in result["error"]["message"]


# -- malformed requests sent from the JS side (issue 13, gap 4) ---------------------------------

# The requests of the "malformed-call" scenario, each the first on a new connection.
CALL_FAILURES = {
    "method_not_a_string": (7001, "method must be a string"),
    "args_not_an_array": (7002, "args must be an array"),
    "kwargs_key_not_a_string": (7003, "kwargs must be a map with string keys"),
    "meta_nil": (7004, "meta must be a map"),
    "timeout_not_a_number": (7005, "timeout must be a number"),
    "timeout_negative": (7006, "timeout must be a number"),
    "method_too_long": (7007, "at most 1024 bytes"),
}


@pytest.fixture(scope="module")
def call_failures(server) -> dict[str, Any]:
    return run_against(server, "malformed-call")


@pytest.mark.parametrize("case", list(CALL_FAILURES))
def test_a_request_the_server_cannot_run_fails_only_that_call(call_failures, case):
    request_id, text = CALL_FAILURES[case]
    result = call_failures[case]
    error = result["answer"]["error"]
    assert (error["code"], error["id"], error["local"]) == ("protocol_error", request_id, False)
    assert text in error["message"]
    assert error["transport"] is False  # answered with its id: the call failed, not the connection
    assert error["type"] == "rpc.errors.ProtocolError"
    assert result["then"] == {"result": 5} and result["ended"] is False


def test_a_request_the_server_cannot_run_fails_only_that_call_after_a_call(server):
    result = run_against(server, "malformed-after-call", "args_not_an_array")
    assert result["first"] == {"result": 2}
    error = result["answer"]["error"]  # (kwargs_key_not_a_string takes the same path)
    assert (error["code"], error["id"], error["local"]) == ("protocol_error", 7002, False)
    assert result["then"] == {"result": 5}


@pytest.mark.parametrize(
    "kind, texts",
    [
        ("field-count", ("a request (kind 0) is an array of 6, got 3 fields",)),
        ("unknown-kind", ("kind 9 is not one a client sends",)),
        ("not-msgpack", ("malformed message: trailing bytes after the message",)),
        ("reserved-byte", ("malformed message: ",)),
        ("id-not-an-int", ("request id must be an unsigned 64-bit int",)),
        ("not-an-array", ("not an array starting with an int kind, got a map of 1",)),
    ],
)
def test_a_frame_without_a_readable_request_closes_the_connection(server, kind, texts):
    result = run_against(server, "malformed-close", kind)
    closed = result["closed"]
    # What the JS side sees: an error answer with a nil id (a connection-level error), then the close.
    assert (closed["code"], closed["id"], closed["local"], closed["transport"]) == ("protocol_error", None, False, True)
    assert any(text in closed["message"] for text in texts), closed["message"]
    assert closed["type"] == "rpc.errors.ProtocolError"
    # A call sent after the bad frame is never served: it fails with what closed the connection.
    assert result["after"]["error"]["code"] == "protocol_error"


@pytest.mark.parametrize("kind", ["version", "nil-info", "string-version", "request-first"])
def test_a_bad_hello_closes_the_connection(server, kind):
    result = run_against(server, "bad-hello", kind)
    assert result["hello"]["server"] == "rpc"  # the server's hello came first, then the close
    closed = result["closed"]
    assert result["strays"] == []
    # a nil-id protocol_error from the server, then the close
    assert (closed["code"], closed["id"], closed["local"]) == ("protocol_error", None, False)
    if kind == "version":
        assert "protocol version 2 is not supported" in closed["message"]


def test_duplicate_ids_in_flight(server):
    result = run_against(server, "duplicate-id")
    # the connection is closed with a nil-id protocol_error naming the id
    assert result["closed"] is not None, result
    assert (result["closed"]["code"], result["closed"]["id"]) == ("protocol_error", None)
    assert "9001" in result["closed"]["message"]


# -- limits ------------------------------------------------------------------------------


def test_frame_size_limits(server):
    result = run_against(server, "limits")
    assert result["server_limit"] == MAX_MESSAGE_BYTES
    # over the limit the server's hello gave: refused before sending, the connection goes on
    refused = result["request_over_server_limit"]["error"]
    assert (refused["code"], refused["local"], refused["transport"]) == ("message_too_large", True, False)
    assert result["still_open"] == {"result": 5}
    # over the client's own limit (4096 bytes): refused on reading its header, the connection ends
    too_large = result["answer_over_client_limit"]["error"]
    assert (too_large["code"], too_large["local"], too_large["transport"]) == ("message_too_large", True, True)
    assert result["closed"]["code"] == "message_too_large"


def _nested_tuple(depth: int) -> tuple:
    value: tuple = ()
    for _ in range(depth):
        value = (value,)
    return value


# Values Python encodes, which the JS codec must decode and encode to the same bytes.
CODEC_VALUES = [
    None, True, False, 0, 127, 128, -32, -33, -128, -129, 255, 256, 65535, 65536, -32768, -32769,
    2**32 - 1, 2**32, -(2**31), -(2**31) - 1, 2**53, 2**63 - 1, 2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 2**200, -(2**200),
    1.5, -0.0, float("inf"), 1e-300,
    "", "x" * 31, "x" * 32, "é" * 200, "x" * 70000,
    b"", b"\x00" * 300, b"\x01" * 70000,
    [], [1] * 15, [1] * 16, [None] * 70000, {}, {"a": 1}, {str(i): i for i in range(20)}, {1: "a", (1, 2): "b", None: []},
    (1, (2, ())), {1, 2}, frozenset({"a"}), _nested_tuple(protocol.MAX_EXT_DEPTH - 1),  # 32 tuples deep, the innermost () too
    dt.datetime(2024, 2, 29, 1, 2, 3, 4), dt.datetime(2024, 2, 29, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
    dt.date(2024, 2, 29), dt.time(1, 2, 3, 4), Decimal("-1.10"), uuid.UUID(int=2**128 - 2),
    complex(1.5, -2.5), dt.timedelta(days=-1, seconds=5, microseconds=7),
    [{"deep": [(1, {2, 3}), {"x": b"y"}]}],
]


def _ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


def _ext_nested(depth: int) -> bytes:
    data = msgpack.packb([])
    for _ in range(depth):
        data = _ext(1, data)
    return data


# Encoded by hand: extension values the JS decoder keeps opaque (and encodes back as they were).
CODEC_OPAQUE = [
    _ext(64, msgpack.packb([1, "a"])),  # a user type (rpc.register_type), its payload a msgpack value
    _ext(127, b""),
    b"\x91\xd6\xff\x00\x00\x00\x01",  # [msgpack's timestamp (ext -1)], which rpc never sends
]

# Bytes the JS decoder must refuse (with a DecodeError, never a crash or a huge allocation).
CODEC_REFUSED = {
    "arrays nested 2000 deep": b"\x91" * 2000 + b"\xc0",
    "maps nested 2000 deep": b"\x81\xa1k" * 2000 + b"\xc0",
    "tuples nested 33 deep": _ext_nested(protocol.MAX_EXT_DEPTH + 1),
    "an array header of 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "a map header of 2**32-1 entries": b"\xdf\xff\xff\xff\xff\xc0",
    "a str header of 4 GiB": b"\xdb\xff\xff\xff\xffab",
    "an ext header of 4 GiB": b"\xc9\xff\xff\xff\xff\x01ab",
    "truncated": b"\x96\x00",
    "trailing bytes": b"\xc0\xc0",
    "the reserved byte": b"\xc1",
    "invalid UTF-8": b"\xa2\xff\xfe",
    "a tuple of no array": _ext(1, msgpack.packb(5)),
    "a UUID of 3 bytes": _ext(7, b"abc"),
    "a complex of 8 bytes": _ext(8, b"\x00" * 8),
    "empty": b"",
    "an unassigned rpc extension code": _ext(12, b"x"),
}


def test_codec_against_python():
    encoded = [protocol.encode_value(value) for value in CODEC_VALUES] + CODEC_OPAQUE
    request = {"values": [data.hex() for data in encoded], "refuse": {name: data.hex() for name, data in CODEC_REFUSED.items()}}
    result = run_node("codec", stdin=json.dumps(request))
    for data, back in zip(encoded, result["values"], strict=True):
        assert back == data.hex(), f"{protocol.quote(data)} came back as other bytes"
    accepted = [name for name, why in result["refused"].items() if why is None]
    assert accepted == [], "the JS decoder accepted these"
