"""Several daemons behind a real HAProxy, on a real network built in namespaces.

The lab of examples/deploy/haproxy/lab.py: a namespace for the balancer, one per
daemon host, one for the clients, joined by veth pairs; HAProxy from the
distribution's package runs the example's haproxy.cfg with the lab's addresses; a
daemon (`rpc serve`) per host; clients are processes in the client namespace
(haproxy_client.py), each calling ``work`` in a loop, which answers with the name of
the daemon's host; each daemon's /metrics counts the same calls. Every wait is on
an event (a log line, a process exit, HAProxy's view of a health check, a client's
output), bounded. ``-s`` prints the figures (calls by daemon; the rolling restart's
calls made, failed, made again, and the longest pause a call saw).

Runs as root with `ip` and `haproxy` (.ci/run installs them); elsewhere it skips,
saying why, except in CI, where it must run and fails instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLIENT = HERE / "haproxy_client.py"
CLIENTS = 6
DAEMONS = 3
WAIT = 60.0  # bound of every wait on the lab; each takes a few seconds at most


def _load_lab() -> Any:
    spec = importlib.util.spec_from_file_location("rpc_haproxy_lab", ROOT / "examples" / "deploy" / "haproxy" / "lab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


labs = _load_lab()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    why = labs.missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the HAProxy test, but {why} (.ci/run installs haproxy and iproute2)")
        pytest.skip(f"cannot build the HAProxy lab here: {why}")
    folder = tmp_path_factory.mktemp("haproxy-lab")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    with labs.Lab(folder, daemons=DAEMONS, registry="haproxy_services:registry", workers=2, env=env) as built:
        yield built


@pytest.fixture
def fleet(lab: Any) -> Any:
    """The lab, with every daemon running and up in HAProxy's view (a test before may have stopped one)."""
    for daemon in lab.hosts:
        if daemon.process is None or daemon.process.poll() is not None:
            lab.start_daemon(daemon)
    for daemon in lab.hosts:
        lab.wait_for_state(daemon, "UP", WAIT)
    return lab


class Clients:
    """``count`` client processes in the lab's client namespace, calling through HAProxy until stopped."""

    def __init__(self, lab: Any, folder: Path, count: int = CLIENTS) -> None:
        self.folder = folder
        folder.mkdir()
        self.names = [f"c{i}" for i in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for name in self.names:
            with open(folder / f"{name}.log", "wb") as log:
                argv = [sys.executable, str(CLIENT), name, lab.address, str(folder)]
                self.processes.append(
                    subprocess.Popen(lab.in_netns(lab.client, argv), env=lab.client_env(), stdout=log, stderr=subprocess.STDOUT)
                )

    def records(self) -> list[dict[str, Any]]:
        """Every call finished so far, from every client (a line still being written is left for later)."""
        found = []
        for name in self.names:
            path = self.folder / f"{name}.jsonl"
            if path.exists():
                for line in path.read_text().splitlines(keepends=True):
                    if line.endswith("\n"):
                        found.append({"client": name, **json.loads(line)})
        return found

    def wait(self, what: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = WAIT) -> None:
        """Wait until ``predicate(records)`` holds; fail saying ``what`` if a client died or time ran out."""

        def check() -> bool:
            for name, process in zip(self.names, self.processes):
                if process.poll() is not None:
                    raise AssertionError(f"client {name} exited with {process.returncode}:\n{self.log(name)}")
            return predicate(self.records())

        labs.wait_until(what, check, timeout)

    def each_made(self, calls: int, since: float = 0.0, what: str = "") -> None:
        """Wait until every client has finished ``calls`` successful calls begun after ``since``."""

        def enough(records: list[dict[str, Any]]) -> bool:
            done = Counter(r["client"] for r in records if r["began"] >= since and "server" in r)
            return all(done[name] >= calls for name in self.names)

        self.wait(what or f"every client makes {calls} calls", enough)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> list[dict[str, Any]]:
        """Tell the clients to stop, wait for them; every call they made."""
        (self.folder / "stop").touch()
        for name, process in zip(self.names, self.processes):
            try:
                code = process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                raise AssertionError(f"client {name} did not stop:\n{self.log(name)}") from None
            assert code == 0, f"client {name} exited with {code}:\n{self.log(name)}"
        return self.records()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def clients(fleet: Any, tmp_path: Path) -> Iterator[Callable[..., Clients]]:
    started: list[Clients] = []

    def start(count: int = CLIENTS) -> Clients:
        started.append(Clients(fleet, tmp_path / f"clients{len(started)}", count))
        return started[-1]

    yield start
    for group in started:
        group.kill()


def _failures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "error" in r]


def _calls_served(lab: Any, daemon: Any) -> int:
    """How many calls of ``work`` ``daemon`` answered "ok" since it started, from its GET /metrics."""
    wanted = 'rpc_calls_total{method="work",outcome="ok"}'
    for line in lab.metrics(daemon).splitlines():
        if line.startswith(wanted):
            return int(float(line.split()[-1]))
    return 0


def test_under_load_every_daemon_takes_calls(fleet: Any, clients: Callable[..., Clients]) -> None:
    counted_before = {daemon.name: _calls_served(fleet, daemon) for daemon in fleet.hosts}
    group = clients()
    group.each_made(30)
    records = group.stop()
    served = Counter(r["server"] for r in records if "server" in r)
    print(f"\ncalls through HAProxy by daemon, {CLIENTS} client processes: {dict(sorted(served.items()))}")
    assert _failures(records) == []
    assert set(served) == {daemon.name for daemon in fleet.hosts}
    # Each daemon's /metrics counts the calls it answered, as the clients saw them (calls served on
    # lent sockets are tallied as their connections close: wait for those).
    for daemon in fleet.hosts:
        labs.wait_until(
            f"{daemon.name}'s /metrics counts the {served[daemon.name]} calls it answered",
            lambda: _calls_served(fleet, daemon) - counted_before[daemon.name] == served[daemon.name],
            WAIT,
        )
    # HAProxy counted the connections it sent to each: every daemon had some.
    stats = fleet.stats()
    assert all(int(stats[daemon.name]["stot"]) > 0 for daemon in fleet.hosts)


def test_rolling_restart_of_every_daemon_fails_no_call(fleet: Any, clients: Callable[..., Clients]) -> None:
    group = clients()
    group.each_made(10, what="every client calls before the restart")
    before = fleet.stats()["BACKEND"]
    begun = time.monotonic()
    for daemon in fleet.hosts:
        fleet.signal_daemon(daemon, signal.SIGTERM)
        assert fleet.wait_for_exit(daemon, WAIT) == 0, labs._tail(daemon.log)
        fleet.start_daemon(daemon, WAIT)
        fleet.wait_for_state(daemon, "UP", WAIT)
    ended = time.monotonic()
    group.each_made(10, since=ended, what="every client calls after the restart")
    records = group.stop()
    after = fleet.stats()["BACKEND"]

    during = [r for r in records if r["began"] + r["seconds"] >= begun and r["began"] <= ended]
    failed = _failures(during)
    # Calls the clients made again on a new connection (they did not run where first sent), and
    # HAProxy's own retries: connects it retried (wretr) or sent to another daemon (wredis).
    retried = sum(1 for r in during if r["moves"])
    reconnected = sum(int(after[key] or 0) - int(before[key] or 0) for key in ("wretr", "wredis"))
    longest = max(r["seconds"] for r in during)
    usual = max(r["seconds"] for r in records if r["began"] + r["seconds"] < begun)
    print(
        f"\nrolling restart of {DAEMONS} daemons under {CLIENTS} clients, {ended - begun:.1f} s: "
        f"{len(during)} calls made, {len(failed)} failed, {retried} retried by the clients, "
        f"{reconnected} connects retried by HAProxy; longest pause a call saw {longest * 1000:.0f} ms "
        f"(before the restart: {usual * 1000:.0f} ms)"
    )
    for record in failed[:10]:
        print(f"  failed: {record['token']}: {record['error']}: {record['message']}")
    assert failed == []


def test_sigkill_of_a_daemon_fails_only_the_calls_running_on_it(fleet: Any, clients: Callable[..., Clients]) -> None:
    group = clients()
    group.each_made(10)
    gate = group.folder / "gate"
    held = Path(f"{gate}.held")
    held.mkdir()
    gate.touch()  # from now on each call waits in its handler, after saying where it runs
    labs.wait_until("every client's call is held in a handler", lambda: len(list(held.iterdir())) >= CLIENTS, WAIT)
    running = {}
    for marker in held.iterdir():
        token, host = marker.name.split("@")
        running[token] = host
    victim = next(d for d in fleet.hosts if d.name in running.values())
    lost = {token for token, host in running.items() if host == victim.name}
    fleet.signal_daemon(victim, signal.SIGKILL)
    fleet.wait_for_exit(victim, WAIT)
    group.wait(
        "the calls held on the killed daemon fail",
        lambda records: lost <= {r["token"] for r in records if "error" in r},
    )
    killed = time.monotonic()
    Path(f"{gate}.release").touch()
    group.each_made(10, since=killed, what="every client calls on the daemons left")
    records = group.stop()

    failed = _failures(records)
    print(
        f"\nSIGKILL of {victim.name} with {len(running)} calls held ({len(lost)} on it): "
        f"{len(records)} calls made, {len(failed)} failed: {sorted(r['token'] for r in failed)}"
    )
    assert {r["token"] for r in failed} == lost
    for record in failed:
        assert record["error"] == "ConnectionClosed", record
    # The calls held on the other daemons finished there, and later calls went to those left.
    answered = {r["token"]: r["server"] for r in records if "server" in r}
    assert all(answered[token] == host for token, host in running.items() if token not in lost)
    assert not [r for r in records if r.get("server") == victim.name and r["began"] >= killed]
