"""Real rpc servers on loopback for tests: yours and rpc's own.

``serve()`` starts a real server (real handler processes, real sockets, a real
handshake) on a temporary Unix socket or an ephemeral TCP port, with a random
authkey, and stops it, leaving no process, socket or temporary file behind. The
server's log (supervisor and handlers, including what functions print to
stderr) goes to a file that :meth:`TestServer.log_text` reads. The pytest
fixtures in :mod:`rpc.pytest_plugin` are built on this.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from .client import Client
from .errors import StartupError
from .registry import Registry
from .server import Server
from .transport import Address

__all__ = ["TestServer", "serve", "DEFAULT_START_METHOD"]

# forkserver starts a handler in milliseconds by forking a process that has already
# imported rpc; spawn starts a fresh interpreter (about 0.1 s). Both are thread-safe.
DEFAULT_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
_forkserver_prepared = False


def _prepare_forkserver() -> None:
    """Have the forkserver preload rpc (and not the test runner's main module)."""
    global _forkserver_prepared
    if not _forkserver_prepared:
        multiprocessing.get_context("forkserver").set_forkserver_preload(["rpc"])
        _forkserver_prepared = True


class TestServer:
    """A running loopback server: its ``address``, ``authkey``, clients, and its log."""

    __test__ = False  # not a pytest test class

    def __init__(self, server: Server, authkey: bytes, log_path: str) -> None:
        self.server = server
        self.authkey = authkey
        self.log_path = log_path
        self._final_log: str | None = None
        self._clients: list[Client] = []

    @property
    def address(self) -> Address:
        return self.server.address

    def client(self, *, timeout: float | None = 60.0, **options: Any) -> Client:
        """A new client connected to this server, closed when the server stops.

        Calls time out after 60 s by default, so a test fails instead of hanging.
        """
        client = Client(self.address, authkey=self.authkey, timeout=timeout, **options)
        self._clients.append(client)
        return client

    def handler_pids(self) -> list[int]:
        return self.server.handler_pids()

    def log_size(self) -> int:
        """Bytes of log written so far; pass to :meth:`log_text` to read only what follows."""
        if self._final_log is not None:
            return len(self._final_log.encode())
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The server's log from byte offset ``since`` (still readable after close)."""
        if self._final_log is not None:
            return self._final_log.encode()[since:].decode("utf-8", "replace")
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Close the clients and the server; keep the log text in memory."""
        for client in self._clients:
            client.close()
        try:
            self.server.close()
        finally:
            self._final_log = self.log_text()


@contextlib.contextmanager
def serve(
    registry: Registry | str,
    *,
    transport: str = "unix",
    workers: int = 2,
    start_method: str = DEFAULT_START_METHOD,
    **options: Any,
) -> Iterator[TestServer]:
    """Run a server for ``registry`` on loopback for the duration of the ``with`` block.

    ``transport`` is ``"unix"`` (a socket in a fresh temporary directory) or
    ``"tcp"`` (127.0.0.1, an ephemeral port). Other keywords are server options.
    A server that cannot start raises :class:`rpc.StartupError` saying why.
    """
    if transport not in ("unix", "tcp"):
        raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
    if start_method == "forkserver":
        _prepare_forkserver()
    authkey = secrets.token_bytes(32)
    directory = tempfile.mkdtemp(prefix="rpc-test-")
    address: Address = os.path.join(directory, "rpc.sock") if transport == "unix" else ("127.0.0.1", 0)
    options.setdefault("log_file", os.path.join(directory, "server.log"))
    options.setdefault("log_format", "console")
    options.setdefault("shutdown_grace", 5.0)
    try:
        server = Server(registry, address=address, authkey=authkey, workers=workers, start_method=start_method, **options)
        handle = TestServer(server, authkey, options["log_file"])
        try:
            server.start()
        except StartupError as exc:
            handle.close()
            hint = _import_hint(registry)
            if hint is None:
                raise
            raise StartupError(f"{exc.message}\n{hint}") from None
        except BaseException:
            handle.close()
            raise
        try:
            yield handle
        finally:
            handle.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _import_hint(registry: Registry | str) -> str | None:
    """How to fix a registry that this process cannot import either, or None if it can."""
    if not isinstance(registry, str):
        return None  # an object: its module was imported here already
    top = registry.partition(":")[0].split(".")[0]
    try:
        if not top or importlib.util.find_spec(top) is not None:
            return None
    except (ImportError, ValueError):
        pass
    return (
        f"This process cannot import {top!r} either: the folder that holds it is not on sys.path. "
        "`pytest` (unlike `python -m pytest`) does not add the current folder; add it in pyproject.toml:\n"
        "    [tool.pytest.ini_options]\n"
        '    pythonpath = ["."]'
    )
