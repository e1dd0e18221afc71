"""Calls over real loopback servers: results, names, errors, values, sharing a client."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from decimal import Decimal

import pytest

import rpc
import services


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("registry", [services.registry, "services:registry"], ids=["object", "import-string"])
def test_the_readme_example_works_on_every_transport(rpc_server, transport, registry):
    """A Registry object or its import string, over TCP or a Unix socket: add(2, 3) == 5."""
    running = rpc_server(registry, transport=transport, workers=1)
    with rpc.connect(running.address, authkey=running.authkey) as client:
        assert client.add(2, 3) == 5


def test_server_with_explicit_address_and_authkey():
    with rpc.Server(services.registry, address=("127.0.0.1", 0), authkey=b"k", workers=2) as server:
        assert server.address[1] != 0
        with rpc.connect(server.address, authkey=b"k") as client:
            assert client.add(2, 3) == 5


def test_namespaces_keywords_and_explicit_call(client):
    assert client.math.hypot(3, 4) == 5.0
    assert client.call("add", 2, 3, timeout=5.0) == 5
    assert client.kwargs_echo(1, key="value") == [[1], {"key": "value"}]
    assert client.call("kwargs_echo", x=1) == [[], {"x": 1}]


def test_methods_lists_names_signatures_and_doc_lines(client):
    methods = {m.name: m for m in client.methods()}
    assert methods["add"] == rpc.MethodInfo("add", "(x, y)", "Add two numbers.")
    assert "math.hypot" in methods
    assert not any(name.startswith("_") for name in methods)


def test_ping_answers(client):
    assert 0 < client.ping() < 5


@pytest.mark.parametrize("name", ["nope", "_private", "add.__globals__", "__class__", "os.system", ""])
def test_unknown_and_private_names_are_method_not_found(client, name):
    with pytest.raises(rpc.MethodNotFound):
        client.call(name)
    assert client.add(1, 1) == 2


def test_private_attribute_access_on_the_proxy_makes_no_call(client):
    with pytest.raises(AttributeError):
        client._private
    with pytest.raises(AttributeError):
        client.math._hidden


def test_wrong_argument_count_is_a_remote_type_error(client):
    with pytest.raises(TypeError) as caught:
        client.add(1)
    assert isinstance(caught.value, rpc.RemoteError)
    assert caught.value.type_name == "TypeError"


def test_a_remote_key_error_is_caught_by_except_key_error(client):
    try:
        client.fail("KeyError", "x")
    except KeyError as error:
        assert isinstance(error, rpc.RemoteError)
        assert error.args == ("x",)
        assert error.message == "'x'"
        assert 'raise {"KeyError"' in error.remote_traceback
    else:
        pytest.fail("no KeyError raised")


def test_a_custom_remote_exception_is_a_plain_remote_error(client):
    with pytest.raises(rpc.RemoteError) as caught:
        client.fail_custom()
    assert type(caught.value) is rpc.RemoteError
    assert caught.value.type_name == "services.CustomError"
    assert caught.value.message == "custom failure"


def test_an_unencodable_argument_fails_on_the_client_before_sending(server, client, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(rpc.SerializationError):
        client.touch(str(marker), object())
    with pytest.raises(rpc.SerializationError):
        client.call("touch", path=object())
    assert not marker.exists()
    assert client.add(1, 2) == 3


def test_an_unencodable_result_fails_that_call_only(client):
    with pytest.raises(rpc.SerializationError):
        client.unencodable()
    assert client.add(1, 2) == 3


ROUND_TRIP = [
    (1, "two", (3.0,)),
    {1, 2},
    frozenset({"a"}),
    dt.datetime(2026, 11, 26, 9, 0, 1, 2),
    dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.date(2026, 11, 26),
    Decimal("1.10"),
    uuid.UUID("c0ffee00-0000-4000-8000-000000000001"),
    complex(1, -1),
    2**70,
    -(2**70),
    {"nested": [(1, 2), {3}, {"k": b"\x00\xff"}]},
    None,
    True,
    1.5,
    "ünïcode",
    b"bytes",
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=lambda v: type(v).__name__)
def test_every_value_type_round_trips_through_a_real_server(client, value):
    """The handler receives the same type, and the client gets back the same type and value."""
    assert client.type_name(value) == type(value).__name__
    back = client.echo(value)
    assert type(back) is type(value)
    assert back == value


def test_threads_sharing_one_client_each_get_their_own_results(client):
    """8 threads x 200 calls with distinct arguments, pipelined on one connection."""
    errors = []
    results: dict[int, list] = {}

    def worker(thread: int) -> None:
        try:
            results[thread] = [client.add(thread * 1000, i) for i in range(200)]
        except BaseException as exc:  # report in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for thread in range(8):
        assert results[thread] == [thread * 1000 + i for i in range(200)]


def test_a_result_too_large_for_the_server_limit_is_refused(rpc_server):
    with rpc_server("services:registry", workers=1, max_message_bytes=4096).client() as client:
        with pytest.raises(rpc.MessageTooLarge):
            client.big(10_000)
        assert len(client.big(1000)) == 1000
