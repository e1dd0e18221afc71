"""Each example's code runs as its README says."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
from pathlib import Path

import rpc.cli
from rpc.config import load_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hello_prints_5():
    result = subprocess.run([sys.executable, "hello.py"], cwd=EXAMPLES, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "5\n"


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
