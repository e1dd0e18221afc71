"""The counters behind /metrics, as plain data: counting, labels, tallies, the lent calls' ring."""

from __future__ import annotations

import multiprocessing

import pytest

import rpc
from rpc import lease, metrics, protocol
from rpc.cli import format_stats
from rpc.config import ServerConfig


def test_calls_count_by_method_and_outcome_and_time_into_buckets():
    counts = metrics.CallCounts(["add"])
    counts.call("add", "ok", 0.0003)
    counts.call("add", "ok", 0.0003)
    counts.call("add", "error", 100.0)  # past the last bucket: +Inf
    counts.call("add", "busy")  # refused: counted, not timed
    assert counts.calls == {("add", "ok"): 2, ("add", "error"): 1, ("add", "busy"): 1}
    histogram = counts.durations["add"]
    assert histogram[metrics.BUCKETS.index(0.0005)] == 2
    assert histogram[len(metrics.BUCKETS)] == 1  # +Inf
    assert sum(histogram[:-1]) == 3 and histogram[-1] == pytest.approx(100.0006)


def test_a_call_on_a_bucket_bound_lands_in_that_bucket():
    """Prometheus buckets count values less than or equal to their bound ("le")."""
    counts = metrics.CallCounts(["add"])
    counts.call("add", "ok", 0.001)
    assert counts.durations["add"][metrics.BUCKETS.index(0.001)] == 1


def test_unregistered_names_share_one_label_so_clients_cannot_grow_the_metrics():
    counts = metrics.CallCounts(["add"])
    for i in range(1000):
        counts.call(f"no_such_method_{i}", "error", 0.001)
    counts.call(protocol.METHODS, "ok", 0.001)  # rpc's own method is always known
    assert set(counts.calls) == {(metrics.UNKNOWN, "error"), (protocol.METHODS, "ok")}
    assert counts.calls[(metrics.UNKNOWN, "error")] == 1000
    assert set(counts.durations) == {metrics.UNKNOWN, protocol.METHODS}


def test_a_tally_exported_by_a_handler_adds_up_in_the_router():
    handler = metrics.CallCounts(["add", "hypot"])
    handler.call("add", "ok", 0.0001)
    handler.call("hypot", "error", 2.0)
    router = metrics.CallCounts(["add", "hypot"])
    router.call("add", "ok", 0.0001)
    router.absorb(metrics.read_tally(metrics.tally_message(handler)))
    assert router.calls == {("add", "ok"): 2, ("hypot", "error"): 1}
    assert sum(router.durations["add"][:-1]) == 2 and router.durations["hypot"][-1] == 2.0
    assert metrics.read_tally(metrics.tally_message(metrics.CallCounts())) is None  # nothing counted: nothing sent


@pytest.mark.parametrize(
    "junk",
    [None, [], [1, 2, 3], [[["add", "ok", -1]], []], [[["add", "sideways", 1]], []], [[], [["add", [1, 2]]]],
     [[["add", "ok", "1"]], "x"], [[], [["add", -1.0, [0, 1]]]], [[], [["add", 0.5, "x"]]], [[], [[1, 0.5, [0, 1]]]]],
)
def test_a_malformed_tally_changes_nothing(junk):
    counts = metrics.CallCounts(["add"])
    counts.absorb(junk)
    assert counts.calls == {} and counts.durations == {}


def test_bad_buckets_in_a_tally_are_skipped():
    counts = metrics.CallCounts(["add"])
    counts.absorb([[], [["add", 0.5, [0, 1, 99, 1, -1, 1, 2, -3, 3, "x", 4]]]])
    histogram = counts.durations["add"]
    assert histogram[0] == 1 and sum(histogram[:-1]) == 1 and histogram[-1] == 0.5


def test_a_tally_sends_only_the_buckets_counted():
    counts = metrics.CallCounts(["add"])
    counts.call("add", "ok", 0.0003)
    counts.call("add", "ok", 0.0003)
    counts.call("add", "ok", 1000.0)
    assert counts.export()[1] == [["add", pytest.approx(1000.0006), [metrics.BUCKETS.index(0.0005), 2, len(metrics.BUCKETS), 1]]]


def test_a_tally_naming_a_method_the_router_does_not_know_counts_it_as_unknown():
    handler = metrics.CallCounts(["secret"])
    handler.call("secret", "ok", 0.001)
    router = metrics.CallCounts(["add"])
    router.absorb(handler.export())
    assert router.calls == {(metrics.UNKNOWN, "ok"): 1}


def _ring():
    array = multiprocessing.get_context("spawn").RawArray("q", lease.SHARED_SIZE)
    ring = lease.LentCalls(array)
    ring.reset()
    return ring


def test_the_router_takes_the_calls_a_handler_posted_once_each():
    ring = _ring()
    assert [ring.post(i % 3, i == 4, i / 1000) for i in range(5)] == [1, 2, 3, 4, 5]  # how many wait
    assert ring.take() == [(0, False, 0.0), (1, False, 0.001), (2, False, 0.002), (0, False, 0.003), (1, True, 0.004)]
    assert ring.take() == []
    assert ring.post(-1, False, 10**6) == 1  # a name not in the handler's list; a call of 11 days
    assert ring.take() == [(-1, False, ((1 << 40) - 1) / 1e9)]  # counted as about 18 minutes


def test_a_full_ring_refuses_calls_until_the_router_takes_them():
    ring = _ring()
    for i in range(lease.LentCalls.RING):
        assert ring.post(i, False, 0.0) == i + 1
    assert ring.post(7, False, 0.0) == -1  # the handler counts this one itself
    assert [number for number, _, _ in ring.take()] == list(range(lease.LentCalls.RING))
    for i in range(10):  # around the end of the ring and on
        assert ring.post(i, True, 0.5) == i + 1
    assert ring.take() == [(i, True, 0.5) for i in range(10)]


def test_the_ring_does_not_touch_the_call_state_before_it():
    array = multiprocessing.get_context("spawn").RawArray("q", lease.SHARED_SIZE)
    state = lease.CallState(array, {"add": 4})
    state.running(12, None, "add")
    lease.LentCalls(array).reset()
    for _ in range(lease.LentCalls.RING):
        lease.LentCalls(array).post(1, False, 0.5)
    assert state.read()[:3] == (lease.CallState.RUNNING, None, 12)
    assert state.method_number() == 4
    state.running(13, None, "unregistered")
    assert state.method_number() == -1


@pytest.mark.parametrize(
    "reason, label",
    [
        ("digest received was wrong", "authentication"),
        ("the handshake message names no digest this server accepts", "authentication"),
        ("handshake timed out", "timeout"),
        ("a handshake message of 99999 bytes (at most 1024)", "too_large"),
        ("protocol version 9 is not supported; this server speaks 1", "protocol_version"),
        ("malformed message: expected a hello", "bad_hello"),
        ("the server is shutting down", "shutting_down"),
        ("something new", "other"),
    ],
)
def test_rejected_connections_are_labelled_by_their_reason(reason, label):
    assert metrics.rejection_reason(reason) == label


@pytest.mark.parametrize(
    "kill_reason, reason, label",
    [
        (None, "killed by SIGKILL", "crashed"),
        (None, "exited with code 1", "crashed"),
        (None, "reload", "reload"),
        ("call 'sleep' passed its deadline", "killed by SIGTERM", "timeout"),
        ("a call on a lent socket passed its deadline", "killed by SIGTERM", "timeout"),
        ("its call 'sleep' (id 3) was cancelled by its caller", "killed by SIGTERM", "cancelled"),
        ("its call on a lent socket (id 3) was cancelled by its client going away", "x", "cancelled"),
        ("it sent a malformed reply: bad", "x", "malformed_reply"),
        ("the lent socket could not be handed to it: boom", "x", "lease_failed"),
        ("some other reason", "x", "stopped"),
    ],
)
def test_replaced_handlers_are_labelled_by_why(kill_reason, reason, label):
    assert metrics.replacement_reason(kill_reason, reason) == label


@pytest.mark.parametrize(
    "address, expected",
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)), (("0.0.0.0", 9100), ("0.0.0.0", 9100))],
)
def test_metrics_address_takes_host_and_port(address, expected):
    assert ServerConfig(metrics_address=address).metrics_address == expected


@pytest.mark.parametrize("address", ["9100", "/run/rpc/metrics.sock", "host:port", "127.0.0.1:70000", "", 9100, ("h",)])
def test_metrics_address_must_be_host_and_port(address):
    with pytest.raises(rpc.ConfigError, match="metrics_address must be HOST:PORT"):
        ServerConfig(metrics_address=address)


def test_stats_are_printed_as_a_table():
    text = "\n".join(
        [
            'rpc_calls_total{method="add",outcome="ok"} 3.0',
            'rpc_calls_total{method="<unknown>",outcome="error"} 1.0',
            '# TYPE rpc_call_duration_seconds histogram',
            'rpc_call_duration_seconds_bucket{le="0.001",method="add"} 2.0',
            'rpc_call_duration_seconds_bucket{le="0.01",method="add"} 3.0',
            'rpc_call_duration_seconds_bucket{le="+Inf",method="add"} 3.0',
            'rpc_call_duration_seconds_sum{method="add"} 0.006',
            'rpc_call_duration_seconds_count{method="add"} 3.0',
            "# TYPE rpc_handlers gauge",
            "rpc_handlers 4.0",
            "# TYPE rpc_handlers_busy gauge",
            "rpc_handlers_busy 1.0",
            "# TYPE rpc_queue_bytes gauge",
            "rpc_queue_bytes 512.0",
            "# TYPE rpc_handler_replacements counter",
            'rpc_handler_replacements_total{reason="crashed"} 2.0',
            "",
        ]
    )
    table = format_stats(text).splitlines()
    assert table[0] == "handlers: 4 (1 busy, 0 lent)   queue: 0 calls, 512 bytes   connections: 0"
    assert table[2].split() == ["method", "ok", "error", "calls", "mean", "ms", "p99", "ms"]
    assert table[3].split() == ["<unknown>", "0", "1", "1", "-", "-"]
    assert table[4].split() == ["add", "3", "0", "3", "2.000", "<=", "10"]
    assert table[-2:] == ["handler replacements: crashed 2", "rejected handshakes: none"]
