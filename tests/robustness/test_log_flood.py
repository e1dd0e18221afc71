"""Log amplification: what a client can make the server log stays far smaller than what it sends."""

from __future__ import annotations

import json
import threading
import time

import msgpack

from conftest import raw_connection, still_serves
from helpers import Gate, wait_for
from rpc import protocol


def _dropped(server) -> list[dict]:
    events = [json.loads(line) for line in server.log_text().splitlines() if "notification_dropped" in line]
    return [e for e in events if e["event"] == "notification_dropped"]


def test_notifications_dropped_by_a_busy_server_log_the_first_then_a_count_per_second(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1, max_pending=0, log_format="json", transport="tcp")
    gate = Gate(tmp_path)
    holder = server.client(timeout=60)
    held = threading.Thread(target=holder.hold, args=gate.args())
    held.start()
    gate.wait_started()  # the only handler is busy and nothing may wait: every notification is dropped
    conn = raw_connection(server)
    sent = 5000
    started = time.monotonic()
    notification = msgpack.packb([protocol.NOTIFICATION, "add", [1, 2], {}])
    for _ in range(sent):
        conn.send_bytes(notification)
    # The server reads a connection in order: once the ping is answered, every notification was read.
    conn.send_bytes(msgpack.packb([protocol.REQUEST, 1, "_rpc.ping", [], {}, {}]))
    assert protocol.decode_response(conn.recv_bytes()).result == "pong"
    # The last ones are counted in a summary within a second, without any further drop.
    assert wait_for(lambda: sum(e.get("count", 1) for e in _dropped(server)) == sent, timeout=30), _dropped(server)[-3:]
    elapsed = time.monotonic() - started
    events = _dropped(server)
    assert len(events) <= 2 + elapsed, len(events)  # the first, then at most one a second, not one each
    assert events[0]["count"] == 1 and events[0]["method"] == "add" and events[0]["reason"] == "server busy"
    conn.close()
    gate.open()
    held.join(60)
    still_serves(server)
