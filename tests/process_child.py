"""A child process for tests/test_arbiter_processes.py: small, so a forkserver starts it in a moment."""

import os
import socket
from multiprocessing.connection import Connection

GREETING = bytes(range(64))
WRONG_BYTES, NO_BYTES = 3, 4


def check_greeting(conn: Connection) -> None:
    """Exit 0 if exactly GREETING arrives on ``conn``."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    sock.settimeout(30)
    data = b""
    try:
        while len(data) < len(GREETING):
            chunk = sock.recv(len(GREETING) - len(data))
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        os._exit(NO_BYTES)
    os._exit(0 if data == GREETING else WRONG_BYTES)
