"""Replies that wait for a slow reader ("parked" with the handler that made them).

A reply for a client whose unsent replies are over twice ``max_outbox_bytes``
waits in the router with its handler held. If that handler dies meanwhile, its
slot gets a new handler, which may run another client's call: the parked reply
must not free the slot when it is finally sent, or that call's answer would go
to the next caller.
"""

from __future__ import annotations

import os
import signal
import threading

from rpc import protocol
from helpers import Gate, raw_connection, still_serves, wait_for

BIG = 8 * 1024 * 1024


def _parked(test_server) -> int:
    return sum(len(c.parked) for c in list(test_server.server._router.connections))


def test_a_parked_reply_of_a_dead_handler_frees_nothing_of_its_replacement(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1, max_outbox_bytes=65536)
    slow = raw_connection(server)
    for request_id in (1, 2):  # 16 MiB of replies, none read: the second is parked
        slow.send_bytes(protocol.encode_request(request_id, "big", (BIG,), {}, None))
    assert wait_for(lambda: _parked(server) == 1, timeout=30)
    [pid] = server.handler_pids()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: server.handler_pids() not in ([], [pid]), timeout=60)

    gate = Gate(tmp_path)
    held, added = [], []
    with server.client(timeout=60) as second, server.client(timeout=60) as third:
        holder = threading.Thread(target=lambda: held.append(second.hold(*gate.args(), "second's answer")))
        holder.start()
        gate.wait_started()  # the new handler runs the second client's call
        replies = [protocol.decode_response(slow.recv_bytes()) for _ in range(2)]  # the slow client catches up
        assert sorted(r.id for r in replies) == [1, 2]
        adder = threading.Thread(target=lambda: added.append(third.add(2, 3)))
        adder.start()
        gate.open()
        holder.join(60)
        adder.join(60)
    slow.close()
    assert held == ["second's answer"]
    assert added == [5]
    still_serves(server)
