"""The router's queue under floods: shares, the byte budget, pipelining, deadlines; on both event loops.

Every test counts the answers per request id on raw connections: no call is
answered twice, none is left unanswered.
"""

from __future__ import annotations

import random
import socket
import struct
import threading

import pytest

from conftest import rss_mb, settled_baseline, still_serves
from helpers import Gate, framed, log_has, raw_connection, request, router_state, wait_for, write
from rpc import protocol


def notification(method: str, *args) -> bytes:
    return framed(protocol.encode_notification(method, args, {}))


def held(test_server) -> int:
    return router_state(test_server, lambda router: sum(c.held for c in list(router.connections)))


def queued(test_server) -> int:
    return router_state(test_server, lambda router: len(router.table.queue))


class Answers:
    """Every response read on a connection, by id: [(result or error code, error message), ...]."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.by_id: dict[int | None, list[tuple[object, str]]] = {}

    def read(self, count: int, timeout: float = 20.0) -> Answers:
        for _ in range(count):
            assert self.conn.poll(timeout), f"{self.total()} answers, then nothing for {timeout} s"
            response = protocol.decode_response(self.conn.recv_bytes())
            error = response.error
            entry = (error.code, error.message) if error else (response.result, "")
            self.by_id.setdefault(response.id, []).append(entry)
        return self

    def total(self) -> int:
        return sum(map(len, self.by_id.values()))

    def once_each(self, ids) -> dict:
        """Each of ``ids`` answered exactly once, and nothing else: id -> its answer."""
        assert sorted(self.by_id, key=repr) == sorted(ids, key=repr), "answers for other ids, or ids without one"
        twice = {i: a for i, a in self.by_id.items() if len(a) != 1}
        assert not twice, f"answered more than once: {twice}"
        return {i: a[0] for i, a in self.by_id.items()}

    def nothing_more(self) -> bool:
        return not self.conn.poll(0.2)


def test_a_request_flood_is_held_at_its_share_and_others_are_served(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_pending=8)  # share: 2 calls
    gate = Gate(tmp_path)
    running = server.client(timeout=30).submit("hold", *gate.args())
    gate.wait_started()
    flood = raw_connection(server)
    write(flood, b"".join(request(i, "add", i, 1) for i in range(100)))
    assert wait_for(lambda: held(server) == 1, timeout=10)
    assert queued(server) == 2
    with server.client(timeout=30) as victim:
        waiting = victim.submit("add", 2, 3)  # queued: the flood holds only its share
        assert wait_for(lambda: queued(server) == 3, timeout=10)
        gate.open()
        assert waiting.result(30) == 5
    assert running.result(30) is None
    answers = Answers(flood).read(100).once_each(range(100))
    assert answers == {i: (i + 1, "") for i in range(100)}  # slowed, not refused
    flood.close()
    still_serves(server)


def test_a_notification_flood_is_held_at_its_share_and_others_are_served(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_pending=8)  # share: 2 calls
    gate = Gate(tmp_path)
    running = server.client(timeout=30).submit("hold", *gate.args())
    gate.wait_started()
    flood = raw_connection(server)
    write(flood, notification("add", 1, 2) * 100)
    # Held at its share, or (as now) its notifications fill the queue and the rest are dropped.
    assert wait_for(lambda: held(server) == 1 or "notification_dropped" in server.log_text(), timeout=10)
    try:
        with server.client(timeout=30) as victim:
            waiting = victim.submit("add", 2, 3)
            gate.open()
            assert waiting.result(30) == 5
    finally:
        gate.open()
        flood.close()
    assert running.result(30) is None


def test_the_queue_budget_in_bytes_refuses_with_server_busy_and_answers_every_call_once(rpc_server, loop_name, tmp_path):
    # 512 KiB of queue, a quarter of it per connection; the count limit is out of the way.
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_pending=1000, max_queue_bytes=512 << 10)
    gate = Gate(tmp_path)
    holder = server.client(timeout=60)
    running = holder.submit("hold", *gate.args())
    gate.wait_started()
    payload = b"p" * 100_000
    conns = [raw_connection(server) for _ in range(6)]
    # From threads: the last request of a held connection waits in the socket until the queue moves.
    writers = [threading.Thread(target=write, args=(conn, b"".join(request(i, "echo", payload) for i in range(3)))) for conn in conns]
    for writer in writers:
        writer.start()
    # At most five 100 kB calls fit; a connection is held after two, so at least three connections
    # are never held and have all their requests read: six refusals at least before anything runs.
    answers = [Answers(conn) for conn in conns]
    assert wait_for(lambda: sum(a.read(1).total() if a.conn.poll(0) else a.total() for a in answers) >= 6, timeout=20)
    assert queued(server) <= 5
    gate.open()
    assert running.result(30) is None
    holder.close()
    for writer in writers:
        writer.join(30)
    refused = 0
    for a in answers:
        a.read(3 - a.total())
        for outcome, message in a.once_each(range(3)).values():
            if outcome == "server_busy":
                refused += 1
                assert "max_queue_bytes" in message
            else:
                assert outcome == payload
        assert a.nothing_more()
        a.conn.close()
    assert 6 <= refused <= 13
    still_serves(server)


# Three connections hold at most three shares (48) of the queue of 64: none is refused. (Notifications
# would count against no share: see the notification flood above.)
@pytest.mark.parametrize("connections, notifications", [(1, True), (3, False)], ids=["one", "three"])
def test_thousands_of_pipelined_calls_are_each_answered_exactly_once(rpc_server, loop_name, connections, notifications):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_pending=64)
    baseline = settled_baseline(server)
    calls = 3000 // connections
    conns = [raw_connection(server) for _ in range(connections)]
    expected = {}
    streams = []
    for conn in conns:
        frames, wanted = [], {}
        for i in range(calls):
            if notifications and i % 7 == 3:
                frames.append(notification("add", i, 0))  # never answered
            if i % 10 == 0:
                frames.append(request(i, "_rpc.ping"))
                wanted[i] = ("pong", "")
            else:
                frames.append(request(i, "add", i, 1, timeout=60 if i % 3 else None))
                wanted[i] = (i + 1, "")
        streams.append(b"".join(frames))
        expected[conn] = wanted
    writers = [threading.Thread(target=write, args=(conn, stream)) for conn, stream in zip(conns, streams)]
    for writer in writers:
        writer.start()
    for conn in conns:
        answers = Answers(conn).read(len(expected[conn]))
        assert answers.once_each(expected[conn]) == expected[conn]
        assert answers.nothing_more()
    for writer in writers:
        writer.join(30)
    for conn in conns:
        conn.close()
    still_serves(server)
    assert wait_for(lambda: router_state(server, lambda router: router.table.unanswered) == 0, timeout=10)
    baseline.assert_restored()


def test_clients_that_pipeline_thousands_of_calls_then_vanish_mid_stream_leak_nothing(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_pending=64)
    baseline = settled_baseline(server)
    stream = b"".join(request(i, "add", i, 1) for i in range(5000))
    rng = random.Random(10)
    for round in range(20):
        conn = raw_connection(server)
        sock = socket.socket(fileno=conn.fileno())
        try:
            if round % 2:  # everything, then gone without reading a reply
                sock.sendall(stream)
            else:  # gone in the middle of a frame
                sock.sendall(stream[: rng.randrange(len(stream) // 4, len(stream))])
        finally:
            sock.detach()
            conn.close()
    # Until the router reads a vanished client's end, the requests before it are real calls:
    # they may fill the queue, and a new call meanwhile is rightly answered ServerBusy.
    assert wait_for(lambda: router_state(server, lambda router: (router.table.unanswered, len(router.connections))) == (0, 0), timeout=30)
    still_serves(server)
    baseline.assert_restored(timeout=30)


def test_a_request_split_across_many_writes_is_served(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, transport="tcp")
    conn = raw_connection(server)
    sock = socket.socket(fileno=conn.fileno())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = request(1, "echo", payload) + request(2, "add", 2, 3)
    rng = random.Random(7)
    try:
        position = 0
        for _ in range(8):  # the first header a byte at a time
            sock.sendall(data[position : position + 1])
            position += 1
        while position < len(data):
            step = rng.choice((1, 2, 3, 5, 4096, 65536))
            sock.sendall(data[position : position + step])
            position += step
    finally:
        sock.detach()
    answers = Answers(conn).read(2).once_each([1, 2])
    assert answers == {1: (payload, ""), 2: (5, "")}
    conn.close()
    still_serves(server)


def test_deadlines_of_queued_and_running_calls_each_answered_once(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name)
    gate = Gate(tmp_path)  # never opened: the running call can only end at its deadline
    [first_handler] = server.handler_pids()
    markers = [tmp_path / f"ran-{i}" for i in range(2, 7)]
    conn = raw_connection(server)
    stream = request(1, "hold", *gate.args(), timeout=1.0)
    stream += b"".join(request(i, "touch", str(markers[i - 2]), timeout=0.3) for i in range(2, 7))  # expire queued
    stream += b"".join(request(i, "add", i, 1) for i in range(7, 12))  # run once the handler is replaced
    write(conn, stream)
    answers = Answers(conn).read(11).once_each(range(1, 12))
    assert answers[1][0] == "call_timeout" and "did not run" not in answers[1][1]
    for i in range(2, 7):
        assert answers[i][0] == "call_timeout" and "did not run" in answers[i][1]
    assert {i: answers[i] for i in range(7, 12)} == {i: (i + 1, "") for i in range(7, 12)}
    assert not any(marker.exists() for marker in markers)
    assert server.handler_pids() not in ([], [first_handler])  # the one past its deadline was stopped
    conn.close()
    still_serves(server)


def test_memory_stays_within_the_byte_bounds_while_clients_pipeline_far_more(rpc_server, loop_name, tmp_path):
    server = rpc_server("services:registry", workers=1, event_loop=loop_name, max_pending=1000, max_queue_bytes=4 << 20)
    baseline = settled_baseline(server)
    gate = Gate(tmp_path)
    holder = server.client(timeout=30)
    running = holder.submit("hold", *gate.args())
    gate.wait_started()
    before = rss_mb()
    frame = request(0, "echo", b"m" * (256 << 10))
    conns = [raw_connection(server) for _ in range(8)]
    sent = [0] * len(conns)

    def flood(index: int) -> None:
        sock = socket.socket(fileno=conns[index].fileno())
        sock.settimeout(1.0)
        try:
            for _ in range(100):  # 25 MiB per connection, 200 MiB in all
                sock.sendall(frame)
                sent[index] += 1
        except (socket.timeout, OSError):
            pass  # no longer read: held at its share (once the queue is full, the rest are refused)
        finally:
            sock.detach()

    floods = [threading.Thread(target=flood, args=(i,)) for i in range(len(conns))]
    for t in floods:
        t.start()
    for t in floods:
        t.join(60)
    grown = rss_mb() - before
    try:
        print(f"sent {sum(sent)} of 800 requests; this process grew {grown:.1f} MB")  # refused or held, not kept
        assert router_state(server, lambda router: router.table.queue_bytes) <= 4 << 20
        assert grown < 64, f"{grown:.0f} MB more while 4 MiB may be queued"
    finally:
        gate.open()
        for conn in conns:
            conn.close()
    assert running.result(30) is None
    holder.close()
    still_serves(server)
    baseline.assert_restored(timeout=30)


def test_half_sent_large_requests_hold_at_most_max_receive_bytes(rpc_server, loop_name):
    """A's large request is under way; B's does not fit beside it, so B is not read (its bytes
    stay in the kernel, not in the server) until A's has arrived; small calls are never held."""
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_receive_bytes=1_000_000)
    payload = bytes(700_000)
    frame_a, frame_b = request(1, "echo", payload), request(2, "echo", payload)
    a, b = raw_connection(server), raw_connection(server)
    write(a, frame_a[: len(frame_a) // 2])
    assert wait_for(lambda: router_state(server, lambda router: router.receive_budget.used) == len(frame_a) - 4)
    write(b, frame_b[:1000])
    assert wait_for(lambda: router_state(server, lambda router: len(router.starved)) == 1)
    rest_of_b = threading.Thread(target=write, args=(b, frame_b[1000:]))  # blocks: nobody reads it yet
    rest_of_b.start()
    still_serves(server)  # small requests do not wait for the budget
    assert router_state(server, lambda router: router.starved[0].decoder.buffered) < 200_000
    assert router_state(server, lambda router: router.receive_budget.used) == len(frame_a) - 4
    write(a, frame_a[len(frame_a) // 2 :])
    for conn, request_id in ((a, 1), (b, 2)):
        response = protocol.decode_response(conn.recv_bytes())
        assert (response.id, response.error, response.result) == (request_id, None, payload)
    rest_of_b.join(30)
    assert not rest_of_b.is_alive()
    assert router_state(server, lambda router: (router.receive_budget.used, len(router.starved))) == (0, 0)
    a.close()
    b.close()


def test_a_connection_that_ends_mid_request_gives_its_room_back(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_receive_bytes=1_000_000)
    frame = request(1, "echo", bytes(700_000))
    a = raw_connection(server)
    write(a, frame[:100_000])
    assert wait_for(lambda: router_state(server, lambda router: router.receive_budget.used) > 0)
    a.close()
    assert wait_for(lambda: router_state(server, lambda router: router.receive_budget.used) == 0)
    with server.client(timeout=30) as client:
        assert client.echo(bytes(700_000)) == bytes(700_000)



def test_a_connection_waiting_for_room_to_send_its_request_is_not_idle(rpc_server, loop_name, tmp_path):
    server = rpc_server(
        "services:registry", workers=2, event_loop=loop_name, max_receive_bytes=1_000_000, idle_timeout=0.5
    )
    gate = Gate(tmp_path)
    frame_a, frame_b = request(2, "echo", bytes(700_000)), request(3, "echo", bytes(700_000))
    a, b = raw_connection(server), raw_connection(server)
    write(a, request(1, "hold", *gate.args()))  # in flight: A is not idle while it holds the room
    gate.wait_started()
    write(a, frame_a[:100_000])
    assert wait_for(lambda: router_state(server, lambda router: router.receive_budget.used) > 0)
    write(b, frame_b[:1000])
    assert wait_for(lambda: router_state(server, lambda router: len(router.starved)) == 1)
    quiet = raw_connection(server)  # connected after B last sent: idle no earlier than B would be
    assert wait_for(lambda: router_state(server, lambda router: len(router.connections)) == 2, timeout=30)
    assert router_state(server, lambda router: len(router.starved)) == 1  # B is still there, waiting
    gate.open()
    write(a, frame_a[100_000:])
    rest_of_b = threading.Thread(target=write, args=(b, frame_b[1000:]))
    rest_of_b.start()
    assert sorted(protocol.decode_response(a.recv_bytes()).id for _ in range(2)) == [1, 2]
    response = protocol.decode_response(b.recv_bytes())
    assert (response.id, response.error) == (3, None)
    rest_of_b.join(30)
    for conn in (a, b, quiet):
        conn.close()
