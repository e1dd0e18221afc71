"""pytest fixtures for testing rpc services against real loopback servers.

Installed with rpc and registered through the ``pytest11`` entry point, so
nothing needs to be configured. Fixtures:

``rpc_server``
    A factory: ``rpc_server("pkg.module:registry", workers=2, transport="tcp")``
    starts a real server and returns its :class:`rpc.testing.TestServer`
    (``address``, ``authkey``, ``client()``); it is stopped when the test ends.
``rpc_server_module``, ``rpc_server_session``
    The same, shared by the tests of a module or of the session: the same
    registry and options return the same running server.
``rpc_client``
    A client of a server started for the test from the ``rpc_registry`` marker,
    ``@pytest.mark.rpc_registry("pkg.module:registry", workers=1)``, or from an
    ``rpc_registry`` fixture that the test suite defines.

When a test fails, the log lines its servers wrote while it ran (supervisor and
handlers) are added to its report.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pluggy import Result

    from .client import Client
    from .testing import TestServer

_servers_key = pytest.StashKey[dict[int, tuple["TestServer", int]]]()
_log_reported_key = pytest.StashKey[bool]()  # the item's report already has the servers' log
_open_servers: list[TestServer] = []  # every server a fixture started and has not stopped
_current_item: list[pytest.Item] = []
_used_forkserver = False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rpc_registry(registry, **server_options): the registry (object or 'pkg.module:registry') "
        "that the rpc_client fixture's server serves",
    )


class _ServerFactory:
    """Starts servers on request and stops them all when its scope ends."""

    def __init__(self, shared: bool) -> None:
        self._shared = shared
        self._by_key: dict[tuple[Any, ...], TestServer] = {}
        self._running: list[tuple[Any, TestServer]] = []  # (context manager, server)

    def __call__(self, registry: Any, **options: Any) -> TestServer:
        global _used_forkserver
        from .testing import DEFAULT_START_METHOD, serve

        key = (registry if isinstance(registry, str) else id(registry), repr(sorted(options.items())))
        if self._shared and key in self._by_key:
            return self._by_key[key]
        if options.get("start_method", DEFAULT_START_METHOD) == "forkserver":
            _used_forkserver = True
        context = serve(registry, **options)
        server = context.__enter__()
        self._running.append((context, server))
        self._by_key[key] = server
        _open_servers.append(server)
        if _current_item:  # everything it logs belongs to the running test
            _current_item[-1].stash.setdefault(_servers_key, {})[id(server)] = (server, 0)
        return server

    def close(self) -> None:
        """Stop every server, newest first; each is stopped even if another fails to."""
        errors = []
        while self._running:
            context, server = self._running.pop()
            _open_servers.remove(server)
            try:
                context.__exit__(None, None, None)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def _factory(shared: bool) -> Iterator[Callable[..., TestServer]]:
    factory = _ServerFactory(shared)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def rpc_server() -> Iterator[Callable[..., TestServer]]:
    """Start real rpc servers for this test: ``rpc_server(registry, **options)``."""
    yield from _factory(shared=False)


@pytest.fixture(scope="module")
def rpc_server_module() -> Iterator[Callable[..., TestServer]]:
    """Like ``rpc_server``, but one server per registry and options for the whole module."""
    yield from _factory(shared=True)


@pytest.fixture(scope="session")
def rpc_server_session() -> Iterator[Callable[..., TestServer]]:
    """Like ``rpc_server``, but one server per registry and options for the whole session."""
    yield from _factory(shared=True)


@pytest.fixture
def rpc_registry(request: pytest.FixtureRequest) -> Any:
    """The registry ``rpc_client`` serves; override this fixture, or use the marker."""
    raise pytest.UsageError(
        f"{request.node.nodeid}: rpc_client needs a registry: mark the test with "
        "@pytest.mark.rpc_registry('pkg.module:registry') or define an rpc_registry fixture"
    )


@pytest.fixture
def rpc_client(request: pytest.FixtureRequest, rpc_server: Callable[..., TestServer]) -> Iterator[Client]:
    """A client of a fresh server for this test's registry (see the module docstring)."""
    marker = request.node.get_closest_marker("rpc_registry")
    if marker is not None:
        if len(marker.args) != 1:
            raise pytest.UsageError("@pytest.mark.rpc_registry takes one registry: 'pkg.module:registry'")
        registry, options = marker.args[0], dict(marker.kwargs)
    else:
        registry, options = request.getfixturevalue("rpc_registry"), {}
    server = rpc_server(registry, **options)
    with server.client() as client:
        yield client


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # Remember where each shared server's log stood when this test began.
    item.stash[_servers_key] = {id(s): (s, s.log_size()) for s in _open_servers}
    _current_item.append(item)
    try:
        yield
    finally:
        _current_item.remove(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or item.stash.get(_log_reported_key, False):
        return
    item.stash[_log_reported_key] = True
    for server, offset in item.stash.get(_servers_key, {}).values():
        text = server.log_text(offset).strip()
        if text:
            report.sections.append((f"rpc server log ({server.address})", text))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the forkserver the fixtures used, so no process outlives the run."""
    if not _used_forkserver:
        return
    from multiprocessing import forkserver as forkserver_module  # imported by now: a server used it

    forkserver = getattr(forkserver_module, "_forkserver", None)
    stop = getattr(forkserver, "_stop", None)
    if stop is not None:
        stop()
