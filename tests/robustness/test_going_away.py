"""A client that goes away is logged at info; a client at fault, at warning.

A port probe, or a client closing its connection while its reply is still being
sent (after its own CallTimeout, say), is a client leaving, not a fault: such
lines must not fill a warning-level log.
"""

from __future__ import annotations

import json
import socket
from multiprocessing.connection import Client as RawClient

import pytest

from rpc import protocol
from helpers import raw_connection, still_serves, wait_for

BIG = 32 * 1024 * 1024  # far more than a socket buffer holds, and more than max_outbox_bytes


@pytest.fixture
def server(rpc_server):
    return rpc_server("services:registry", workers=1, log_format="json")


def _events(server, name: str) -> list[dict]:
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == name]


def test_a_client_closing_while_its_reply_is_sent_is_logged_at_info(server):
    conn = raw_connection(server)
    try:
        conn.send_bytes(protocol.encode_request(1, "big", (BIG,), {}, None))
        assert conn.poll(60)  # the reply is being sent: what the socket cannot hold waits in the outbox
        # A ping read behind it holds the server's reader back from the end of the stream
        # (its outbox is over max_outbox_bytes), so the failed send is what ends the connection.
        conn.send_bytes(protocol.encode_request(2, "_rpc.ping", (), {}, None))
    finally:
        conn.close()  # without reading the reply
    assert wait_for(lambda: _events(server, "client_dropped"), timeout=30), server.log_text()
    [dropped] = _events(server, "client_dropped")
    assert dropped["level"] == "info", dropped
    assert dropped["reason"] in ("sending a reply failed: Broken pipe", "sending a reply failed: Connection reset by peer")
    still_serves(server)


def test_a_peer_that_connects_and_closes_without_a_word_is_logged_at_info(server):
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(server.address)
    probe.close()
    assert wait_for(lambda: _events(server, "client_rejected"), timeout=30), server.log_text()
    [rejected] = _events(server, "client_rejected")
    assert rejected["level"] == "info", rejected
    # closed before or after the server sent its challenge
    assert rejected["reason"] in ("closed during handshake", "[Errno 32] Broken pipe", "[Errno 104] Connection reset by peer")
    still_serves(server)


def test_a_wrong_key_is_still_logged_at_warning(server):
    with pytest.raises(Exception):
        RawClient(server.address, authkey=b"w" * 32)
    assert wait_for(lambda: _events(server, "client_rejected"), timeout=30), server.log_text()
    [rejected] = _events(server, "client_rejected")
    assert rejected["level"] == "warning", rejected
