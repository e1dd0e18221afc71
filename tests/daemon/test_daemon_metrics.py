"""`rpc serve --metrics-address` and `rpc stats` as users run them: a real daemon, SIGTERM, HTTP."""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import rpc
from helpers import Gate, wait_for


def _key(daemon) -> bytes:
    return (Path(daemon.env["XDG_CONFIG_HOME"]) / "rpc" / "authkey").read_bytes().strip()


def _metrics_address(daemon) -> str:
    """The address the daemon serves /healthz and /metrics on, from its start-up log line."""
    for line in daemon.log().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "metrics_listening":
            return str(json.loads(line)["address"])
    raise AssertionError(f"no metrics_listening line:\n{daemon.log()}")


def _health(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_healthz_is_200_while_serving_and_503_from_sigterm_until_exit(daemon, tmp_path):
    process = daemon.start("--workers", "2", "--metrics-address", "127.0.0.1:0", "services:registry")
    address = _metrics_address(daemon)
    assert _health(address) == 200
    gate = Gate(tmp_path)
    results = []
    with rpc.connect(daemon.env["RPC_ADDRESS"], authkey=_key(daemon), timeout=60) as client:
        held = threading.Thread(target=lambda: results.append(client.hold(*gate.args(), value="done")))
        held.start()
        gate.wait_started()
        process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "shutdown_begun" in daemon.log(), timeout=30)
        assert _health(address) == 503  # draining: the held call keeps the daemon up
        stats = daemon.rpc("stats", "--metrics-address", address)
        assert stats.returncode == 0, stats.stderr
        assert stats.stdout.startswith(f"rpc at {address}: draining\n")
        assert "handlers: 2 (1 busy, 0 lent)" in stats.stdout
        gate.open()
        held.join(60)
    assert process.wait(30) == 0
    assert results == ["done"]
    stats = daemon.rpc("stats", "--metrics-address", address)
    assert stats.returncode == 1 and f"nothing answers at http://{address}/healthz" in stats.stderr


def test_rpc_stats_reads_the_metrics_address_of_the_config_file(daemon):
    with socket.socket() as probe:  # a free port for the config file (both commands must know it)
        probe.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % probe.getsockname()[1]
    config = daemon.cwd / "rpc.toml"
    config.write_text(f'registry = "services:registry"\nworkers = 1\nmetrics_address = "{address}"\n')
    daemon.start("--config", str(config))
    assert _metrics_address(daemon) == address
    with rpc.connect(daemon.env["RPC_ADDRESS"], authkey=_key(daemon), timeout=60) as client:
        assert client.add(2, 3) == 5
    stats = daemon.rpc("stats", "--config", str(config))
    assert stats.returncode == 0, stats.stderr
    lines = stats.stdout.splitlines()
    assert lines[0] == f"rpc at {address}: serving"
    assert ["add", "1", "1"] == lines[4].split()[:3]  # method, ok, calls


def test_a_bad_metrics_address_is_a_configuration_error(daemon):
    result = daemon.rpc("serve", "--metrics-address", "9100")
    assert result.returncode == 2
    assert "--metrics-address: metrics_address must be HOST:PORT" in result.stderr
    result = daemon.rpc("serve", env={**daemon.env, "RPC_METRICS_ADDRESS": "/run/metrics.sock"})
    assert result.returncode == 2 and "RPC_METRICS_ADDRESS: metrics_address must be HOST:PORT" in result.stderr


def test_the_example_configs_metrics_address_works_once_uncommented(tmp_path):
    from rpc.config import load_settings

    root = Path(__file__).resolve().parents[2]
    for example, expected in [
        (root / "config" / "rpc.toml", ("127.0.0.1", 9100)),
        (root / "examples" / "deploy" / "rpc.toml", ("10.0.0.5", 9100)),
    ]:
        text = example.read_text()
        assert "# metrics_address = " in text, example
        path = tmp_path / example.parent.name / "rpc.toml"
        path.parent.mkdir()
        path.write_text(text.replace("# metrics_address = ", "metrics_address = "))
        settings = load_settings(path, {}, {})
        assert settings.metrics_address() == expected
        assert settings.server_config(b"k" * 32).metrics_address == expected


def test_a_metrics_port_in_use_suggests_another_metrics_address(daemon):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        result = daemon.rpc("serve", "--workers", "1", "--metrics-address", address)
    assert result.returncode == 1
    error = result.stderr.splitlines()[-1]  # (after the line saying the authkey file was created)
    assert error.startswith(f"rpc: cannot start: cannot listen on {address}")
    assert "(for /healthz and /metrics)" in error and "choose another with --metrics-address" in error
