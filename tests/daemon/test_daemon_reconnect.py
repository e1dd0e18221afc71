"""A call in flight when `rpc serve` is killed fails, and a client reconnects to its restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import rpc
import rpc.aio
from helpers import wait_for

HANG = 60.0


def _key(daemon) -> bytes:
    return (Path(daemon.env["XDG_CONFIG_HOME"]) / "rpc" / "authkey").read_bytes().strip()


def _start(daemon, transport: str, address=None):
    """Start the daemon (one handler) on a Unix socket or TCP; its address (the same on a restart)."""
    args = ["--workers", "1", "async_services:registry"]
    if transport == "unix":
        daemon.start(*args)
        return daemon.env["RPC_ADDRESS"]
    daemon.start("--address", "127.0.0.1:0" if address is None else f"127.0.0.1:{address[1]}", *args)
    [listening] = [json.loads(line) for line in daemon.log().splitlines() if '"listening"' in line]
    host, port = listening["address"].rsplit(":", 1)
    return (host, int(port))


def _kill(daemon) -> None:
    daemon.process.kill()
    daemon.process.wait(HANG)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_sync_a_call_in_flight_when_the_daemon_is_killed_fails_and_runs_once(daemon, tmp_path, transport):
    address = _start(daemon, transport)
    marker, started, release = tmp_path / "runs", tmp_path / "started", tmp_path / "release"
    with rpc.connect(address, authkey=_key(daemon), timeout=HANG) as client:
        assert client.add(1, 2) == 3
        future = client.submit("count_and_hold", str(marker), str(started), str(release))
        assert wait_for(started.exists, timeout=HANG)
        _kill(daemon)
        with pytest.raises(rpc.ConnectionClosed):
            future.result(HANG)
        release.touch()  # a copy of the call, if one were sent to the new daemon, would finish at once
        assert _start(daemon, transport, address) == address
        # One handler, calls in order: had the call been sent again, it would have run before this one.
        assert client.add(2, 3) == 5
    assert marker.read_text().count("\n") == 1


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_aio_a_call_in_flight_when_the_daemon_is_killed_fails_and_runs_once(daemon, tmp_path, transport):
    address = _start(daemon, transport)
    marker, started, release = tmp_path / "runs", tmp_path / "started", tmp_path / "release"

    async def body() -> None:
        async with rpc.aio.connect(address, authkey=_key(daemon), timeout=HANG) as client:
            assert await client.add(1, 2) == 3
            held = asyncio.ensure_future(client.count_and_hold(str(marker), str(started), str(release)))
            for _ in range(3000):
                if started.exists():
                    break
                await asyncio.sleep(0.01)
            _kill(daemon)
            with pytest.raises(rpc.ConnectionClosed):
                await held
            release.touch()
            assert await asyncio.to_thread(_start, daemon, transport, address) == address
            assert await client.add(2, 3) == 5

    asyncio.run(asyncio.wait_for(body(), HANG))
    assert marker.read_text().count("\n") == 1
