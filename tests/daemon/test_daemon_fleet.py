"""Several `rpc serve` daemons under one client: SIGTERM to the one it is on, a restart on the
same address, and the client commands given a list of addresses."""

from __future__ import annotations

import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

import rpc
from conftest import Daemon
from helpers import wait_for

HANG = 60.0
REGISTRY = "fleet_services:registry"


class Daemons:
    """Daemons sharing one authkey (RPC_AUTHKEY), each on its own Unix socket and in its own folder."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.key = secrets.token_hex(32)
        self.started: list[Daemon] = []

    def __call__(self, count: int) -> list[Daemon]:
        made = []
        for _ in range(count):
            folder = self.folder / f"daemon{len(self.started)}"
            folder.mkdir()
            env = {**self.env, "RPC_AUTHKEY": self.key, "RPC_ADDRESS": str(folder / "rpc.sock"), "RPC_SHUTDOWN_GRACE": "30"}
            self.started.append(Daemon(env, folder))
            self.started[-1].start("--workers", "2", REGISTRY)
            made.append(self.started[-1])
        return made

    def client(self, address: Any, **options: Any) -> rpc.Client:
        return rpc.connect(address, authkey=self.key.encode(), timeout=HANG, **options)


@pytest.fixture
def daemons(daemon, tmp_path):
    made = Daemons(daemon.env, tmp_path)
    yield made
    for each in made.started:
        each.stop()


def runs(marks: Path) -> dict[str, int]:
    return {path.name: path.read_text().count("\n") for path in marks.iterdir()}


def test_sigterm_to_the_daemon_a_client_is_on_fails_no_call_and_runs_none_twice(daemons, tmp_path):
    fleet = daemons(3)
    addresses = [each.env["RPC_ADDRESS"] for each in fleet]
    marks = tmp_path / "marks"
    marks.mkdir()
    outcomes: dict[str, Any] = {}
    with daemons.client(addresses) as client:
        first = fleet[addresses.index(client.address)]

        def sequential(n: int) -> None:
            for i in range(40):
                name = f"seq{n}-{i}"
                try:
                    outcomes[name] = client.mark(str(marks), name, 0.01)
                except Exception as exc:
                    outcomes[name] = exc

        threads = [threading.Thread(target=sequential, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        futures = {f"sub{i}": client.submit("mark", str(marks), f"sub{i}", 0.01) for i in range(200)}
        assert wait_for(lambda: len(runs(marks)) >= 30, timeout=HANG)
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(HANG)
        for name, future in futures.items():
            try:
                outcomes[name] = future.result(HANG)
            except Exception as exc:
                outcomes[name] = exc
        assert first.process.wait(HANG) == 0
        assert client.add(1, 1) == 2
        assert client.address != first.env["RPC_ADDRESS"]
    assert {name: outcome for name, outcome in outcomes.items() if not isinstance(outcome, int)} == {}
    assert len(outcomes) == 360
    assert runs(marks) == {name: 1 for name in outcomes}  # each ran, once
    assert len(set(outcomes.values())) > 2  # handlers of more than one daemon ran them


def test_a_client_of_one_address_goes_on_through_its_daemon_restarting(daemons, tmp_path):
    [only] = daemons(1)
    address = only.env["RPC_ADDRESS"]
    marks = tmp_path / "marks"
    marks.mkdir()
    outcomes: dict[str, Any] = {}
    with daemons.client(address, connect_timeout=HANG) as client:

        def sequential(n: int) -> None:
            for i in range(60):
                name = f"s{n}-{i}"
                try:
                    outcomes[name] = client.mark(str(marks), name, 0.01)
                except Exception as exc:
                    outcomes[name] = exc

        threads = [threading.Thread(target=sequential, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: len(runs(marks)) >= 20, timeout=HANG)
        assert only.process is not None
        only.process.send_signal(signal.SIGTERM)
        assert only.process.wait(HANG) == 0
        only.start("--workers", "2", REGISTRY)  # the same address
        for thread in threads:
            thread.join(HANG)
    assert {name: outcome for name, outcome in outcomes.items() if not isinstance(outcome, int)} == {}
    assert runs(marks) == {name: 1 for name in outcomes} and len(outcomes) == 180


def test_rpc_call_takes_a_list_of_addresses(daemons, tmp_path):
    [live] = daemons(1)
    dead = str(tmp_path / "nothing-here.sock")
    env = {**live.env, "RPC_ADDRESS": f"{dead},{live.env['RPC_ADDRESS']}"}
    for _ in range(4):  # from whichever address it starts at
        result = live.rpc("call", "add", "2", "3", env=env)
        assert (result.returncode, result.stdout.strip()) == (0, "5"), result.stderr
    config = tmp_path / "client.toml"
    config.write_text(f"address = [{dead!r}, {live.env['RPC_ADDRESS']!r}]\n")
    env.pop("RPC_ADDRESS")
    result = live.rpc("call", "--config", str(config), "add", "2", "3", env=env)
    assert (result.returncode, result.stdout.strip()) == (0, "5"), result.stderr
    env["RPC_ADDRESS"] = f"{dead},{tmp_path / 'nothing-either.sock'}"
    result = live.rpc("call", "add", "2", "3", env=env)
    assert result.returncode != 0 and "cannot connect to any of 2 servers" in result.stderr
    refused = live.rpc("serve", env=env)
    assert refused.returncode != 0 and "rpc serve listens on one address, not a list of 2" in refused.stderr
