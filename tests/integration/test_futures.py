"""submit() and map(): many calls in flight on one connection, results matched by id."""

from __future__ import annotations

import threading
from concurrent.futures import Future, as_completed, wait

import pytest

import rpc


def test_submit_returns_futures_that_complete_without_anyone_waiting(client):
    futures = [client.submit("add", i, 1000) for i in range(200)]
    assert all(isinstance(f, Future) for f in futures)
    done, not_done = wait(futures, timeout=30)
    assert not not_done
    assert [f.result() for f in futures] == [i + 1000 for i in range(200)]


def test_as_completed_and_callbacks_work(client):
    seen = []
    futures = [client.submit("sleep", 0.05 * (3 - i), i) for i in range(3)]
    for future in futures:
        future.add_done_callback(lambda f: seen.append(f.result()))
    assert sorted(f.result() for f in as_completed(futures, timeout=30)) == [0, 1, 2]
    assert sorted(seen) == [0, 1, 2]


def test_a_failed_future_carries_the_remote_error(client):
    future = client.submit("fail", "ValueError", "bad")
    assert isinstance(future.exception(timeout=30), ValueError)
    timed_out = client.submit("sleep", 10, timeout=0.2)
    assert isinstance(timed_out.exception(timeout=30), rpc.CallTimeout)
    assert client.add(1, 2) == 3


def test_submit_refuses_unencodable_arguments_before_sending(client):
    with pytest.raises(rpc.SerializationError):
        client.submit("echo", object())


def test_map_yields_results_in_order_with_bounded_calls_in_flight(client):
    assert list(client.map("add", range(500), range(500), max_in_flight=8)) == [2 * i for i in range(500)]
    assert list(client.map("add", [], [])) == []


def test_map_raises_at_the_failing_item(client):
    results = client.map("fail", ["ValueError", "KeyError"])
    with pytest.raises(ValueError):
        next(results)


def test_sync_calls_and_futures_mix_across_threads(client):
    errors = []

    def sync_calls() -> None:
        try:
            for i in range(100):
                assert client.add(i, 0) == i
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync_calls) for _ in range(4)]
    for t in threads:
        t.start()
    futures = [client.submit("add", i, 1) for i in range(300)]
    for t in threads:
        t.join(30)
    assert errors == []
    assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(300)]


def test_futures_fail_with_connection_closed_when_the_server_goes_away(rpc_server):
    running = rpc_server("services:registry", workers=1)
    client = running.client()
    future = client.submit("sleep", 5)
    running.server.close(grace=0.1)
    # cut off while running, or refused if the request arrived after close() began
    assert isinstance(future.exception(timeout=30), (rpc.ConnectionClosed, rpc.WorkerCrashed, rpc.ServerShuttingDown))
