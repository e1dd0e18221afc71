"""max_receive_bytes attacked: many connections starving at once, starved connections that close,
are held, do not read their replies, or go quiet; tiny budgets. The budget never leaks (back to 0
when all is done) and no connection is left paused while there is room.

A "staller" takes the whole budget with a large request it sends only the start of, so the
others starve on cue; finishing (or closing) it gives the room back.
"""

from __future__ import annotations

import threading

from helpers import Gate, framed, raw_connection, request, router_state, still_serves, wait_for, write
from rpc import protocol

LARGE = 150_000  # bytes of argument: a request received into a buffer of its own (framing.DIRECT_BYTES)


def large(request_id: int, fill: bytes = b"x") -> bytes:
    return request(request_id, "echo", fill * LARGE)


def budget_used(server) -> int:
    return router_state(server, lambda r: r.receive_budget.used)


def starved(server) -> int:
    return router_state(server, lambda r: sum(c.starved for c in list(r.connections)))


def in_line(server) -> int:
    return router_state(server, lambda r: len(r.starved))


def drained(server) -> bool:
    """The budget is back to 0, no connection waits for it, nothing is unanswered."""
    return bool(
        wait_for(
            lambda: router_state(
                server,
                lambda r: r.receive_budget.used == 0
                and not r.starved
                and not any(c.starved for c in list(r.connections))
                and r.table.unanswered == 0,
            ),
            timeout=30,
        )
    )


class Staller:
    """A connection that takes the budget with the first bytes of a large request."""

    def __init__(self, server, request_id: int = 1) -> None:
        self.conn = raw_connection(server)
        self.frame = large(request_id, b"s")
        self.id = request_id
        write(self.conn, self.frame[: 1 << 12])
        assert wait_for(lambda: budget_used(server) > 0, timeout=20), "the staller took no room"

    def finish(self) -> None:
        write(self.conn, self.frame[1 << 12 :])
        response = read_answers(self.conn, 1)
        assert response == {self.id: [b"s" * LARGE]}


def read_answers(conn, count: int, timeout: float = 30.0) -> dict[int, list]:
    found: dict[int, list] = {}
    for _ in range(count):
        assert conn.poll(timeout), f"only {sum(map(len, found.values()))} of {count} answers came: {found}"
        response = protocol.decode_response(conn.recv_bytes())
        found.setdefault(response.id, []).append(response.error.code if response.error else response.result)
    return found


def test_many_connections_starve_at_once_and_all_are_served(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000)
    staller = Staller(server)
    conns = [raw_connection(server) for _ in range(16)]
    for i, conn in enumerate(conns):
        write(conn, large(i, bytes([65 + i])) + request(100 + i, "add", i, 1))
    assert wait_for(lambda: in_line(server) == len(conns), timeout=30)
    staller.finish()
    for i, conn in enumerate(conns):
        assert read_answers(conn, 2) == {i: [bytes([65 + i]) * LARGE], 100 + i: [i + 1]}
    assert drained(server)
    still_serves(server)


def test_starved_connections_that_close_in_line_give_way_to_the_next(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000)
    staller = Staller(server)
    leaving = [raw_connection(server) for _ in range(3)]
    for i, conn in enumerate(leaving):
        write(conn, large(i)[: LARGE // 2])  # half a large request: starved, then gone
    assert wait_for(lambda: in_line(server) == 3, timeout=30)
    staying = raw_connection(server)
    write(staying, large(9))
    assert wait_for(lambda: in_line(server) == 4, timeout=30)
    for conn in leaving:
        conn.close()
    staller.finish()
    assert read_answers(staying, 1) == {9: [b"x" * LARGE]}
    assert drained(server)


def test_a_starved_connection_that_does_not_read_its_replies(rpc_server, loop_name):
    """Starved, then write-blocked by a large reply it does not read: fed from the budget, it must
    still be read again once it drains (and its room must come back)."""
    server = rpc_server(
        "services:registry",
        workers=2,
        event_loop=loop_name,
        max_receive_bytes=LARGE + 1000,
        max_outbox_bytes=65536,
        send_timeout=60.0,
    )
    staller = Staller(server)
    slow = raw_connection(server)
    write(slow, request(1, "big", 4 << 20) + large(2) + request(3, "add", 1, 2))
    assert wait_for(lambda: in_line(server) == 1, timeout=30)
    blocked = lambda: router_state(server, lambda r: sum(c.write_blocked for c in list(r.connections)))  # noqa: E731
    assert wait_for(lambda: blocked() == 1, timeout=30)
    staller.finish()
    assert wait_for(lambda: in_line(server) == 0, timeout=30)  # fed, though it may not read yet
    answers = read_answers(slow, 3)
    assert answers == {1: [b"x" * (4 << 20)], 2: [b"x" * LARGE], 3: [3]}
    assert drained(server)


def test_a_starved_connection_that_was_held_at_its_queue_share(rpc_server, loop_name, tmp_path):
    """Held over its share of the queue with a large request read but not yet taken: released,
    it starves; fed, it is answered in full."""
    server = rpc_server(
        "services:registry", workers=1, event_loop=loop_name, lease=False, max_pending=8, max_receive_bytes=LARGE + 1000
    )
    gate = Gate(tmp_path)
    busy = raw_connection(server)
    write(busy, request(1, "hold", *gate.args()))
    gate.wait_started()
    staller = Staller(server, request_id=2)
    held = raw_connection(server)
    write(held, request(1, "add", 1, 1) + request(2, "add", 2, 2) + request(3, "add", 3, 3) + large(4))
    assert wait_for(lambda: router_state(server, lambda r: sum(c.held for c in list(r.connections))) == 1, timeout=30)
    gate.open()
    assert read_answers(busy, 1) == {1: [None]}
    assert wait_for(lambda: in_line(server) == 1, timeout=30)  # its large request waits for room now
    staller.finish()
    assert read_answers(held, 4) == {1: [2], 2: [4], 3: [6], 4: [b"x" * LARGE]}
    assert drained(server)


def test_a_budget_smaller_than_one_frame_slows_large_requests_but_serves_them(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_receive_bytes=1)
    conns = [raw_connection(server) for _ in range(8)]
    start = threading.Barrier(len(conns))

    def send(i: int, conn) -> None:
        start.wait()
        write(conn, large(i, bytes([97 + i])) + large(i + 10, bytes([97 + i])))

    threads = [threading.Thread(target=send, args=(i, conn)) for i, conn in enumerate(conns)]
    for thread in threads:
        thread.start()
    for i, conn in enumerate(conns):
        assert read_answers(conn, 2) == {i: [bytes([97 + i]) * LARGE], i + 10: [bytes([97 + i]) * LARGE]}
    for thread in threads:
        thread.join(30)
    assert drained(server)


def test_a_starved_connection_is_not_idle_and_an_idle_staller_gives_its_room_back(rpc_server, loop_name):
    server = rpc_server(
        "services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000, idle_timeout=0.5
    )
    staller = Staller(server)  # goes quiet mid-request: dropped as idle, its room given back
    waiting = raw_connection(server)
    write(waiting, large(5))
    assert wait_for(lambda: in_line(server) == 1, timeout=30)
    assert wait_for(lambda: "idle for longer than idle_timeout" in server.log_text(), timeout=30)
    assert read_answers(waiting, 1) == {5: [b"x" * LARGE]}
    assert staller.conn.poll(10) and _closed(staller.conn)
    assert drained(server)


def test_a_starved_connection_outlives_idle_timeout_while_the_staller_is_busy(rpc_server, loop_name, tmp_path):
    server = rpc_server(
        "services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000, idle_timeout=0.5,
        lease=False,
    )
    gate = Gate(tmp_path)
    staller_conn = raw_connection(server)
    write(staller_conn, request(7, "hold", *gate.args()))  # a call in flight: the staller is not idle
    gate.wait_started()
    staller_frame = large(8, b"s")
    write(staller_conn, staller_frame[:4096])
    assert wait_for(lambda: budget_used(server) > 0, timeout=20)
    waiting = raw_connection(server)
    write(waiting, large(5))
    assert wait_for(lambda: in_line(server) == 1, timeout=30)
    idle = raw_connection(server)  # connected after the waiting one: once it is dropped, idle_timeout has passed
    assert idle.poll(30) and _closed(idle)
    assert in_line(server) == 1  # still waiting, still connected
    write(staller_conn, staller_frame[4096:])
    gate.open()
    assert read_answers(staller_conn, 2) == {7: [None], 8: [b"s" * LARGE]}
    assert read_answers(waiting, 1) == {5: [b"x" * LARGE]}
    assert drained(server)


def test_a_starved_large_request_then_its_cancel(rpc_server, loop_name):
    server = rpc_server("services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000)
    staller = Staller(server)
    conn = raw_connection(server)
    write(conn, large(5) + framed(protocol.encode_cancel(5)) + request(6, "add", 1, 1))
    assert wait_for(lambda: in_line(server) == 1, timeout=30)
    staller.finish()
    answers = read_answers(conn, 2)
    assert answers[6] == [2] and answers[5] in ([b"x" * LARGE], ["call_cancelled"])
    assert drained(server)


def _closed(conn) -> bool:
    try:
        conn.recv_bytes()
    except EOFError:
        return True
    return False


def hello_of(size: int) -> bytes:
    """A client hello of exactly ``size`` bytes (the largest the server takes is 64 KiB: a large frame)."""
    room = size - len(protocol.encode_hello({"pad": ""}))
    for pad in range(room, room - 8, -1):  # (a longer string takes a longer msgpack header)
        hello = protocol.encode_hello({"pad": "p" * pad})
        if len(hello) == size:
            return hello
    raise AssertionError("no padding gives that size")


def test_a_largest_hello_waits_for_room_and_the_handshake_timer_still_ends_it(rpc_server, loop_name):
    from multiprocessing.connection import Client as RawClient

    server = rpc_server(
        "services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000, handshake_timeout=1.0
    )
    staller = Staller(server)
    conn = RawClient(server.address, authkey=server.authkey)
    protocol.decode_hello(conn.recv_bytes())
    conn.send_bytes(hello_of(65536))
    assert wait_for(lambda: in_line(server) == 1, timeout=30)  # a hello, waiting for room
    assert wait_for(lambda: "handshake timed out" in server.log_text(), timeout=30)
    staller.finish()
    assert drained(server)
    still_serves(server)


def test_a_largest_hello_is_taken_once_there_is_room(rpc_server, loop_name):
    from multiprocessing.connection import Client as RawClient

    server = rpc_server(
        "services:registry", workers=2, event_loop=loop_name, max_receive_bytes=LARGE + 1000, handshake_timeout=60.0
    )
    staller = Staller(server)
    conn = RawClient(server.address, authkey=server.authkey)
    protocol.decode_hello(conn.recv_bytes())
    conn.send_bytes(hello_of(65536))
    assert wait_for(lambda: in_line(server) == 1, timeout=30)
    staller.finish()
    write(conn, large(3))
    assert read_answers(conn, 1) == {3: [b"x" * LARGE]}
    assert drained(server)


def test_random_large_and_small_requests_some_abandoned_midway(rpc_server, loop_name):
    """A seeded mix on eight connections sharing a small budget: large requests (some larger than
    the budget), large replies, small calls and cancels, sent in random pieces; a quarter of the
    connections close partway through a request. The others are answered in full, and the budget
    comes back to 0."""
    import random
    import socket

    rnd = random.Random(6)
    server = rpc_server(
        "services:registry",
        workers=2,
        event_loop=loop_name,
        max_pending=4096,
        max_receive_bytes=300_000,
        max_outbox_bytes=65536,
        send_timeout=60.0,
    )
    conns = [raw_connection(server) for _ in range(8)]
    plans = []
    for c in range(len(conns)):
        data, ids = b"", []
        for j in range(rnd.randint(2, 8)):
            request_id = c * 1000 + j
            kind = rnd.random()
            if kind < 0.4:
                data += request(request_id, "echo", bytes([97 + c]) * rnd.choice([70_000, 150_000, 290_000, 400_000]))
            elif kind < 0.55:
                data += request(request_id, "big", rnd.choice([100_000, 1_000_000]))
            else:
                data += request(request_id, "add", request_id, 0)
            ids.append(request_id)
            if rnd.random() < 0.1:
                data += framed(protocol.encode_cancel(request_id))
        abandoned = rnd.random() < 0.25
        if abandoned:
            data = data[: rnd.randrange(len(data))]
        plans.append((data, ids, abandoned, [rnd.randint(1, 200_000) for _ in range(len(data) // 1000 + 1)]))

    def send(c: int) -> None:
        data, _, abandoned, steps = plans[c]
        sock = socket.socket(fileno=conns[c].fileno())
        try:
            position = 0
            for step in steps:
                if position >= len(data):
                    break
                sock.sendall(data[position : position + step])
                position += step
            sock.sendall(data[position:])
        finally:
            sock.detach()
        if abandoned:
            conns[c].close()

    results: dict[int, dict] = {}

    def receive(c: int) -> None:
        results[c] = read_answers(conns[c], len(plans[c][1]), timeout=60)

    senders = [threading.Thread(target=send, args=(c,)) for c in range(len(conns))]
    readers = [threading.Thread(target=receive, args=(c,)) for c in range(len(conns)) if not plans[c][2]]
    for thread in senders + readers:
        thread.start()
    for thread in senders + readers:
        thread.join(120)
    for c, (_, ids, abandoned, _) in enumerate(plans):
        if not abandoned:
            assert sorted(results[c]) == ids and all(len(a) == 1 for a in results[c].values()), (c, results.get(c))
    assert any(plan[2] for plan in plans)  # (the seed abandons some)
    assert drained(server)
    still_serves(server)
