"""Each example's code runs as its README says."""

from __future__ import annotations

import configparser
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import rpc
import rpc.cli
from rpc.config import load_settings
from rpc.testing import DEFAULT_START_METHOD

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hello_prints_5():
    result = subprocess.run([sys.executable, "hello.py"], cwd=EXAMPLES, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "5\n"


def test_the_streaming_example_streams_stops_early_and_streams_to_asyncio():
    result = subprocess.run([sys.executable, "streaming.py"], cwd=EXAMPLES, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"sum of squares: {sum(i * i for i in range(100_000))}",
        "found: 7,49",
        "aio: ['0,0', '1,1', '2,4']",
    ]


def test_parallel_example_runs_and_reports_a_speed_up():
    result = subprocess.run(
        [sys.executable, "run.py", "--calls", "4", "--size", "20000", "--workers", "2"],
        cwd=EXAMPLES / "parallel",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "speed-up:" in result.stdout


def test_the_testing_example_suite_passes():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "testing")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout


def test_the_deploy_config_and_unit_are_valid():
    settings = load_settings(EXAMPLES / "deploy" / "rpc.toml", {}, {})
    config = settings.server_config(b"k" * 32)
    assert config.workers == 4 and config.log_format == "json"
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(EXAMPLES / "deploy" / "rpc.service")
    command = shlex.split(unit["Service"]["ExecStart"])
    assert command[0].endswith("/rpc") and command[1:] == ["serve", "--config", "/etc/rpc/rpc.toml"]
    rpc.cli._parser().parse_args(command[1:])  # the daemon accepts this command line
    assert unit["Service"]["KillMode"] == "mixed"


def test_the_aio_example_runs_against_a_server_of_the_daemons_demo(tmp_path):
    """examples/aio_client.py as run against `rpc serve`: the demo registry, the key from the key file."""
    key = secrets.token_hex(32).encode()  # as `rpc serve` writes it (read_authkey strips whitespace)
    (tmp_path / "rpc").mkdir(mode=0o700)
    key_file = tmp_path / "rpc" / "authkey"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    with rpc.Server(
        "rpc.demo:registry", address=("127.0.0.1", 0), authkey=key, workers=2,
        start_method=DEFAULT_START_METHOD, log_level="warning",
    ) as server:
        host, port = server.address
        result = subprocess.run(
            [sys.executable, "aio_client.py", f"{host}:{port}"],
            cwd=EXAMPLES,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "add(2, 3) = 5",
        "1000 calls in flight, sum of results = 500500",
        "timeout: call 'sleep' got no answer within its timeout of 0.5 s",
        "fib(20) = 6765",
    ]
