"""The client against rpc's real server, on each of the router's event loops.

A call made while no other is in flight reads its own answer; these tests move one
client between that and pipelining (futures, map, several threads) and back, with
values on both sides of the client's receive buffer size.
"""

from __future__ import annotations

import threading

import pytest

import rpc

HANG = 30.0  # seconds: a wait this long is a hang, not slowness
BUFFER = 1 << 16  # the client's receive buffer, as rpc.framing sizes it


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def server(request, rpc_server_module):
    return rpc_server_module("services:registry", workers=2, event_loop=request.param)


def test_calls_alone_then_pipelined_then_alone_again(server):
    with server.client(timeout=HANG) as client:
        assert [client.add(i, 1) for i in range(100)] == [i + 1 for i in range(100)]
        assert list(client.map("add", range(300), range(300))) == [2 * i for i in range(300)]
        assert [client.add(i, 2) for i in range(100)] == [i + 2 for i in range(100)]
        futures = [client.submit("add", i, 3) for i in range(50)]
        assert client.add(1, 1) == 2  # a call while futures are in flight
        assert [future.result(HANG) for future in futures] == [i + 3 for i in range(50)]
        assert client.call("add", 5, 5, timeout=None) == 10


def test_threads_sharing_a_client_mix_calls_and_futures(server):
    errors: list[BaseException] = []
    with server.client(timeout=HANG) as client:

        def work(thread: int) -> None:
            try:
                for i in range(100):
                    if i % 7 == 0:
                        assert client.submit("echo", [thread, i]).result(HANG) == [thread, i]
                    else:
                        assert client.echo([thread, i]) == [thread, i]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors[:3]
        assert client.add(2, 2) == 4


def test_values_on_both_sides_of_the_receive_buffer_size_round_trip(server):
    sizes = [0, BUFFER - 100, BUFFER, BUFFER + 1, 1 << 20, 10, 3 * BUFFER]
    with server.client(timeout=HANG) as client:
        for size in sizes:
            assert client.big(size) == b"x" * size
        assert list(client.map("big", sizes, max_in_flight=3)) == [b"x" * size for size in sizes]
        value = bytes(range(256)) * 1000
        assert client.echo(value) == value


def test_a_call_that_times_out_leaves_the_client_usable(server):
    with server.client(timeout=HANG) as client:
        with pytest.raises(rpc.CallTimeout):
            client.call("sleep", 5, timeout=0.3)
        assert client.add(1, 2) == 3
        assert client.submit("add", 2, 2).result(HANG) == 4
