"""Malformed and hostile messages (cases 9-13, and a fuzzer): an error to that caller, service for the rest."""

from __future__ import annotations

from multiprocessing.connection import Client as RawClient

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpc
from conftest import raw_connection, rss_mb, still_serves
from rpc import protocol


def exchange(server, frame: bytes):
    """Send one frame on a fresh raw connection; the response, and whether the server then closed."""
    conn = raw_connection(server)
    try:
        conn.send_bytes(frame)
        response = protocol.decode_response(conn.recv_bytes())
        closed = not conn.poll(0.5) or _eof(conn)
        return response, closed
    finally:
        conn.close()


def _eof(conn) -> bool:
    try:
        conn.recv_bytes()
    except EOFError:
        return True
    return False


@pytest.mark.parametrize(
    "frame",
    [b"\xc1", b"\x96\x00", b"\xdd\xff\xff\xff\xff", b"not msgpack at all"],
    ids=["reserved-byte", "truncated", "huge-array-header", "text"],
)
def test_9_undecodable_frames_close_that_connection_only(server, baseline, frame):
    response, closed = exchange(server, frame)
    assert response.id is None and response.error.code == "protocol_error"
    still_serves(server)
    baseline.assert_restored()


def test_9_trailing_bytes_and_bad_utf8_get_an_error_reply(server, baseline):
    good = protocol.encode_request(5, "add", (1, 2), {}, None)
    response, _ = exchange(server, good + b"\x00")
    assert response.error.code == "protocol_error"
    bad_name = msgpack.packb([0, 6, "add", [1, 2], {}, {}]).replace(b"\xa3add", b"\xa3\xff\xfe\xfd")
    response, _ = exchange(server, bad_name)
    assert (response.id, response.error.code) == (6, "protocol_error")
    still_serves(server)
    baseline.assert_restored()


@pytest.mark.parametrize(
    "message, expected_id",
    [
        ({"kind": 0}, None),
        ([], None),
        ([0, 7, "add"], None),
        ([0, 7, 42, [], {}, {}], 7),
        ([0, 7, "add", [1, 2], {}, "meta"], 7),
        ([0, 7, "add", {"not": "a list"}, {}, {}], 7),
        ([0, 7, "add", [1, 2], {1: "not a str key"}, {}], 7),
        ([9, 7, "add", [], {}, {}], None),
    ],
    ids=["map", "empty", "short", "int-method", "str-meta", "map-args", "int-kwarg-key", "kind-9"],
)
def test_10_a_wrong_envelope_gets_an_error_for_that_caller(server, baseline, message, expected_id):
    response, _ = exchange(server, msgpack.packb(message))
    assert response.error is not None and response.error.code == "protocol_error"
    assert response.id == expected_id
    still_serves(server)
    baseline.assert_restored()


def test_11_nesting_100000_deep_is_a_limit_error_not_a_crash(server, baseline):
    nested = b"\x91" * 100_000 + b"\xc0"
    frame = b"\x96\x00\x07\xa4echo\x91" + nested + b"\x80\x80"
    response, _ = exchange(server, frame)
    assert response.id == 7 and response.error is not None
    with server.client() as client:
        deep: list = []
        for _ in range(100_000):
            deep = [deep]
        with pytest.raises(rpc.SerializationError):
            client.echo(deep)
    still_serves(server)
    baseline.assert_restored()


def test_11_a_decompression_style_bomb_hits_the_handler_memory_limit(rpc_server):
    """4 MiB of empty arrays decode to about 250 MB of lists: refused under a 400 MB limit."""
    server = rpc_server("services:registry", workers=1, handler_memory_limit=400 << 20)
    before = rss_mb()
    bomb = b"\x96\x00\x08\xa4echo\x91\xdd" + (4 << 20).to_bytes(4, "big") + b"\x90" * (4 << 20) + b"\x80\x80"
    response, _ = exchange(server, bomb)
    assert response.id == 8 and response.error is not None
    assert rss_mb() - before < 50  # the supervisor forwarded the payload without decoding it
    still_serves(server)


@pytest.mark.parametrize("name", ["", "__class__", "os.system", "add.__globals__", "_rpc", "add.__call__"])
def test_12_hostile_method_names_are_not_found(server, baseline, name):
    with server.client() as client:
        with pytest.raises(rpc.MethodNotFound):
            client.call(name)
    baseline.assert_restored()


def test_13_wrong_arguments_are_a_type_error_and_cost_no_handler(server, baseline):
    pids = set(server.handler_pids())
    with server.client() as client:
        with pytest.raises(TypeError):
            client.add(1)
        with pytest.raises(TypeError):
            client.add(1, 2, unexpected=3)
    assert set(server.handler_pids()) == pids
    baseline.assert_restored()


valid = protocol.encode_request(1, "add", (1, 2), {"k": [1.5, None]}, 3.0)


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    data = bytearray(valid)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    return bytes(data) + draw(st.binary(min_size=1, max_size=50))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames())
def test_fuzzed_frames_never_stop_the_server(server, frame):
    """Random and mutated frames: an answer or a closed connection, and service for the next client."""
    conn = raw_connection(server)
    try:
        conn.send_bytes(frame)
        if conn.poll(5):
            try:
                protocol.decode_response(conn.recv_bytes())
            except EOFError:
                pass
    finally:
        conn.close()
    still_serves(server)


# -- limits on what one small frame may cost (issue: decode bombs) -----------------------


def _nested_tuples(depth: int) -> bytes:
    """msgpack bytes of a tuple (ext 1) nested ``depth`` deep, built without rpc's encoder."""
    data = msgpack.packb([])
    for _ in range(depth):
        data = msgpack.packb([msgpack.ExtType(1, data)])
    return data


def test_a_hello_of_nested_tuples_is_refused_and_the_server_lives(server, baseline):
    """300 nested tuples in a 1.4 KB hello used to crash the server with SIGSEGV."""
    conn = RawClient(server.address, authkey=server.authkey)
    try:
        protocol.decode_hello(conn.recv_bytes())
        conn.send_bytes(b"\x93\x04\x01\x81\xa1x" + _nested_tuples(300)[1:])
        assert conn.poll(10)
        response = protocol.decode_response(conn.recv_bytes())  # an error for the connection, then the end
        assert response.id is None and response.error.code == "protocol_error"
        assert "extension type 1 is not allowed in a hello" in response.error.message
        assert not conn.poll(10) or _eof(conn)
    finally:
        conn.close()
    assert "client_rejected" in server.log_text()
    still_serves(server)
    baseline.assert_restored()


def test_nested_tuples_in_arguments_fail_that_call_and_cost_no_handler(server, baseline):
    """Too deep for the handler's decoder: an error for that id, the same handlers after."""
    pids = set(server.handler_pids())
    frame = b"\x96\x00\x09\xa4echo\x91" + _nested_tuples(300)[1:] + b"\x80\x80"
    response, _ = exchange(server, frame)
    assert response.id == 9 and response.error.code == "protocol_error"
    assert "more than 32 deep" in response.error.message
    assert set(server.handler_pids()) == pids
    still_serves(server)
    baseline.assert_restored()


def test_a_deep_value_fails_on_the_client_and_a_deep_result_on_the_server(server, baseline):
    """A 220-deep cons list of tuples is refused before it is sent; a deep result is a SerializationError."""
    pids = set(server.handler_pids())
    cons: tuple = ()
    for i in range(220):
        cons = (i, cons)
    with server.client() as client:
        with pytest.raises(rpc.SerializationError, match="the arguments of 'echo'.*deep"):
            client.echo(cons)
        with pytest.raises(rpc.SerializationError, match="the result of 'nested_tuple'.*deep"):
            client.nested_tuple(100)
        assert client.nested_tuple(5) == ((((((),),),),),)
    assert set(server.handler_pids()) == pids
    baseline.assert_restored()


def test_a_meta_bomb_is_refused_before_the_server_decodes_it(server, baseline):
    """4 MiB of empty arrays in meta cost the server +300 MB; now an error for that id at no cost."""
    before = rss_mb()
    bomb = b"\xdf" + (2 << 20).to_bytes(4, "big") + b"\x90" * (4 << 20)
    frame = b"\x96\x00\x0a\xa4echo\x91\xc4\x10" + b"x" * 16 + b"\x80" + bomb
    response, _ = exchange(server, frame)
    assert response.id == 10 and response.error.code == "protocol_error"
    assert "meta is" in response.error.message
    assert rss_mb() - before < 50
    still_serves(server)
    baseline.assert_restored()


def test_a_huge_exception_message_is_shortened_and_costs_no_handler(server, baseline):
    """A KeyError of a 22 MB string: a shortened KeyError for the caller, not WorkerCrashed."""
    pids = set(server.handler_pids())
    with server.client() as client:
        with pytest.raises(KeyError) as caught:
            client.raise_key_error_of(22_000_000)
    error = caught.value
    assert "bytes cut" in error.message and len(error.message.encode()) <= protocol.MAX_ERROR_TEXT_BYTES
    assert len(error.remote_traceback.encode()) <= protocol.MAX_ERROR_TEXT_BYTES
    assert set(server.handler_pids()) == pids
    baseline.assert_restored()


def test_a_huge_method_name_is_refused_briefly(server, baseline):
    """300k control characters as a method name: a short error for that call; the handler stays."""
    pids = set(server.handler_pids())
    logged = server.log_size()
    with server.client() as client:
        with pytest.raises(rpc.ProtocolError, match="at most 1024 bytes") as caught:
            client.call("\x01" * 300_000)
        assert len(str(caught.value)) < 300
        assert client.add(1, 1) == 2
    assert set(server.handler_pids()) == pids
    assert len(server.log_text(logged)) < 10_000
    baseline.assert_restored()


def test_a_megabyte_malformed_frame_is_quoted_briefly_in_the_reply_and_the_log(server, baseline):
    """Hostile bytes are quoted by a short prefix, never copied whole into logs or replies."""
    logged = server.log_size()
    response, closed = exchange(server, msgpack.packb(["\x00" * (1 << 20), 1]))
    assert response.error.code == "protocol_error" and len(response.error.message) < 300
    assert closed
    assert len(server.log_text(logged)) < 10_000
    still_serves(server)
    baseline.assert_restored()


def test_a_string_id_on_a_lent_socket_costs_no_handler(rpc_server):
    """A handler serving a lent socket checks the id as the server does (an id of "abc" killed it)."""
    server = rpc_server("services:registry", workers=2, transport="tcp", access_log=True)
    pids = set(server.handler_pids())
    conn = raw_connection(server)
    try:
        # One call at a time: from the second on, the socket is lent once both handlers are idle
        # (on a loaded machine that may take a few calls); the bad frame follows a lent call at once.
        for request_id in range(1, 501):
            conn.send_bytes(protocol.encode_request(request_id, "add", (request_id, 1), {}, None))
            assert protocol.decode_response(conn.recv_bytes()).result == request_id + 1
            if "leased=True" in server.log_text():
                break
        conn.send_bytes(msgpack.packb([0, "abc", "add", [1, 2], {}, {}]))
        assert conn.poll(30), "no answer: the handler serving the socket died on the frame"
        response = protocol.decode_response(conn.recv_bytes())
        assert response.id is None and response.error.code == "protocol_error"
    finally:
        conn.close()
    assert "leased=True" in server.log_text()
    assert set(server.handler_pids()) == pids
    still_serves(server)


def test_a_lent_request_the_handler_cannot_run_is_answered(rpc_server):
    """A request whose envelope passes the router's checks but whose args do not (args not an
    array) may be the very request the router lends with the socket: the handler answers it
    with a protocol_error for its id (it was answered by no one, and the call hung)."""
    server = rpc_server("services:registry", workers=2, transport="tcp", access_log=True)
    conn = raw_connection(server)
    try:
        # Sequential calls with pauses the lease ends on: each bad request arrives at the
        # router, which lends it with the socket once both handlers are idle.
        for request_id in range(1, 41, 2):
            conn.send_bytes(protocol.encode_request(request_id, "add", (request_id, 1), {}, None))
            assert conn.poll(30), "no answer to a good call"
            assert protocol.decode_response(conn.recv_bytes()).result == request_id + 1
            conn.send_bytes(msgpack.packb([0, request_id + 1, "add", {"a": 1}, {}, {}]))
            assert conn.poll(30), f"no answer to the bad request {request_id + 1}"
            response = protocol.decode_response(conn.recv_bytes())
            assert response.id == request_id + 1 and response.error.code == "protocol_error"
            assert "args" in response.error.message
    finally:
        conn.close()
    assert "leased=True" in server.log_text()
    still_serves(server)
