"""Real rpc servers on loopback for tests: yours and rpc's own.

``serve()`` starts a real server (real handler processes, real sockets, a real
handshake) on a temporary Unix socket or an ephemeral TCP port, with a random
authkey, and stops it, leaving no process or socket file behind.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from .client import Client
from .registry import Registry
from .server import Server
from .transport import Address

__all__ = ["TestServer", "serve"]


class TestServer:
    """A running loopback server: its ``address``, ``authkey``, and clients for it."""

    __test__ = False  # not a pytest test class

    def __init__(self, server: Server, authkey: bytes) -> None:
        self.server = server
        self.authkey = authkey
        self._clients: list[Client] = []

    @property
    def address(self) -> Address:
        return self.server.address

    def client(self, **options: Any) -> Client:
        """A new client connected to this server (closed when the server stops)."""
        client = Client(self.address, authkey=self.authkey, **options)
        self._clients.append(client)
        return client

    def handler_pids(self) -> list[int]:
        return self.server.handler_pids()

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.close()


@contextlib.contextmanager
def serve(registry: Registry | str, *, transport: str = "unix", workers: int = 2, **options: Any) -> Iterator[TestServer]:
    """Run a server for ``registry`` on loopback for the duration of the ``with`` block.

    ``transport`` is ``"unix"`` (a socket in a fresh temporary directory) or
    ``"tcp"`` (127.0.0.1, an ephemeral port). Other keywords are server options.
    """
    authkey = secrets.token_bytes(32)
    directory = None
    if transport == "unix":
        directory = tempfile.mkdtemp(prefix="rpc-test-")
        address: Address = f"{directory}/rpc.sock"
    elif transport == "tcp":
        address = ("127.0.0.1", 0)
    else:
        raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
    try:
        server = Server(registry, address=address, authkey=authkey, workers=workers, **options)
        handle = TestServer(server, authkey)
        server.start()
        try:
            yield handle
        finally:
            handle.close()
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
