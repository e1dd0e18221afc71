"""Streamed results from the sync client, against real servers: a generator function's items
arrive as it yields them, under a window, and closing the stream closes the generator."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rpc
from rpc.protocol import STREAM_WINDOW

from helpers import log_has, wait_for

REGISTRY = "stream_services:registry"


@pytest.fixture(scope="module", params=["unix", "tcp"])
def server(request, rpc_server_module):
    return rpc_server_module(REGISTRY, workers=2, transport=request.param)


@pytest.fixture
def client(server):
    with server.client(timeout=30) as connected:
        yield connected


def _rss_bytes() -> int:
    """This process's resident memory (the server's router runs in it, as does the client)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def test_a_generator_streams_its_items_in_order(client):
    stream = client.count(1000)
    assert isinstance(stream, rpc.Stream)
    assert list(stream) == list(range(1000))
    assert stream.closed
    assert list(client.count(0)) == []
    assert list(client.wrapped(3)) == [0, 1, 2]  # a generator function behind functools.wraps
    assert client.add(2, 3) == 5


def test_a_slow_consumer_keeps_the_generator_a_window_ahead_and_the_server_memory_flat(client, tmp_path):
    total, size = 100_000, 1000  # 100 MB streamed in all
    produced = tmp_path / "produced"
    before = None
    most_ahead = 0
    # The generator notes its position near each checkpoint (up to two windows past it).
    stream = client.tracked(total, size, str(tmp_path), every=2000, near=2 * STREAM_WINDOW)
    for consumed, item in enumerate(stream, start=1):
        assert item[0] == consumed - 1 and len(item[1]) == size
        if consumed % 2000 == 0:
            # The consumer pauses here (reading files is slow next to taking an item):
            # whatever the speeds, the generator is never more than a window ahead.
            ahead = int(produced.read_text()) + 1 - consumed
            most_ahead = max(most_ahead, ahead)
            assert ahead <= STREAM_WINDOW
            if consumed == 10_000:
                gc.collect()
                before = _rss_bytes()
    assert consumed == total
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 30 * 1024 * 1024, f"memory grew by {grown} bytes over 90 MB streamed"


def test_breaking_out_of_a_stream_runs_the_generators_finally_and_frees_the_handler(server, tmp_path):
    with server.client(timeout=30) as client:
        pids = set(server.handler_pids())
        for item in client.count_marked(10**9, str(tmp_path)):
            if item == 5:
                break
        assert wait_for(lambda: (tmp_path / "finally").exists(), timeout=30)
        assert int((tmp_path / "finally").read_text()) in pids  # the handler that ran it still lives
        assert set(server.handler_pids()) == pids
        assert client.add(1, 1) == 2
    assert log_has(server, "stream_closed")


@pytest.mark.parametrize("how", ["close", "with", "gc"])
def test_closing_a_stream_runs_the_generators_finally(client, server, tmp_path, how):
    pids = set(server.handler_pids())
    if how == "close":
        stream = client.count_marked(10**9, str(tmp_path))
        assert next(stream) == 0
        stream.close()
        assert stream.closed
        with pytest.raises(StopIteration):
            next(stream)
    elif how == "with":
        with client.count_marked(10**9, str(tmp_path)) as stream:
            assert [next(stream), next(stream)] == [0, 1]
    else:
        stream = client.count_marked(10**9, str(tmp_path))
        assert next(stream) == 0
        del stream
        gc.collect()
    assert wait_for(lambda: (tmp_path / "finally").exists(), timeout=30)
    assert set(server.handler_pids()) == pids
    assert client.add(2, 2) == 4


def test_an_exception_in_the_generator_is_raised_where_the_iteration_reaches_it(client):
    stream = client.fail_after(3, "bad row")
    assert [next(stream), next(stream), next(stream)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad row") as caught:
        next(stream)
    assert isinstance(caught.value, rpc.RemoteError)
    assert "fail_after" in caught.value.remote_traceback
    with pytest.raises(StopIteration):
        next(stream)
    assert client.add(1, 2) == 3


def test_an_item_that_cannot_be_encoded_ends_the_stream_there(client):
    stream = client.unencodable()
    assert next(stream) == 1
    with pytest.raises(rpc.SerializationError):
        next(stream)


def test_a_client_that_goes_away_closes_its_streams(server, tmp_path):
    pids = set(server.handler_pids())
    client = server.client(timeout=30)
    stream = client.count_marked(10**9, str(tmp_path))
    assert next(stream) == 0
    client.close()
    with pytest.raises(rpc.ConnectionClosed):
        for _ in range(2 * STREAM_WINDOW):  # what had arrived, then the connection's end
            next(stream)
    assert wait_for(lambda: (tmp_path / "finally").exists(), timeout=30)
    assert set(server.handler_pids()) == pids
    with server.client(timeout=30) as other:
        assert other.add(3, 4) == 7


def test_many_streams_at_once_on_one_connection(client):
    # More streams than handlers: the rest wait in the queue, then run.
    def consume(n: int) -> list[int]:
        return list(client.count(n))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(consume, [500 + i for i in range(8)]))
    assert results == [list(range(500 + i)) for i in range(8)]
    # Two streams consumed in turn by one thread.
    pairs = list(zip(client.count(3000), client.count(3000, 10)))
    assert [a for a, _ in pairs] == list(range(3000)) and [b[0] for _, b in pairs] == list(range(3000))


def test_streams_and_plain_calls_interleave(client):
    futures = [client.submit("add", i, 1) for i in range(20)]
    total = 0
    for item in client.count(300):
        total += client.add(item, 0)
        if item % 50 == 0:
            futures.append(client.submit("add", item, 1))
    assert total == sum(range(300))
    assert [f.result(30) for f in futures[:20]] == [i + 1 for i in range(20)]
    stream = client.submit("count", 5).result(30)  # a submitted call's result is the stream
    assert list(stream) == [0, 1, 2, 3, 4]


def test_timeout_bounds_each_item_not_the_whole_stream(server, tmp_path):
    with server.client() as client:
        # Three items, each well within the timeout; the whole stream takes longer than it.
        assert list(client.call("sleep_between", 3, 0.5, timeout=1.4)) == [0, 1, 2]
        release = tmp_path / "release"
        stream = client.call("wait_after", 2, str(release), timeout=0.5)
        assert [next(stream), next(stream)] == [0, 1]
        with pytest.raises(rpc.CallTimeout, match="no item within its timeout"):
            next(stream)
        assert stream.closed
        release.touch()
        assert client.add(5, 5) == 5 + 5


def test_a_stream_after_calls_on_a_quiet_connection_is_not_lent(client):
    # Calls one at a time: the connection's socket may be lent to a handler; a stream
    # request then waits on it for the router, which follows the stream.
    for i in range(20):
        assert client.add(i, i) == 2 * i
    assert list(client.count(100)) == list(range(100))
    assert client.add(1, 0) == 1


def test_a_stream_waiting_for_its_consumer_does_not_stop_other_clients(server):
    with server.client(timeout=30) as first, server.client(timeout=30) as second:
        stream = first.count(10**6)
        assert next(stream) == 0  # its handler now waits for credit: one handler left
        assert second.add(1, 2) == 3
        assert sum(1 for _ in zip(range(1000), second.count(10**6))) == 1000
        stream.close()


def test_server_shutdown_ends_a_stream_with_an_error(rpc_server, tmp_path):
    server = rpc_server(REGISTRY, workers=1)
    client = server.client(timeout=30)
    stream = client.count_marked(10**9, str(tmp_path))
    assert next(stream) == 0
    closing = threading.Thread(target=server.server.close)
    closing.start()
    with pytest.raises((rpc.ServerShuttingDown, rpc.ConnectionClosed)):
        for _ in range(10**6):
            next(stream)
    closing.join(60)
    assert (tmp_path / "finally").exists()


def test_an_async_generator_streams_and_closing_it_runs_its_finally(client, server, tmp_path):
    assert list(client.count_async(200)) == list(range(200))
    with client.count_async(1_000_000, str(tmp_path)) as stream:
        assert [next(stream) for _ in range(5)] == list(range(5))
    assert wait_for((tmp_path / "finally").exists, timeout=30)  # aclose() ran in the handler
    with pytest.raises(KeyError, match="async broken"):
        list(client.fail_async_after(3))
    assert client.add(1, 2) == 3
