"""Helpers to run the `rpc` command in subprocesses, isolated from the user's files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """An `rpc serve` subprocess and the environment its client commands share."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen[str] | None = None
        self.log_path = cwd / "serve.log"

    def rpc(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run an `rpc` command to completion; with ``cwd``, the installed `rpc` script in that folder."""
        command = [script()] if cwd is not None else [sys.executable, "-m", "rpc"]
        return subprocess.run(
            [*command, *args],
            cwd=cwd or self.cwd,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str, wait: bool = True, cwd: Path | None = None) -> subprocess.Popen[str]:
        """Start `rpc serve`; with ``cwd``, the installed `rpc` script in that folder (not `python -m`)."""
        log = open(self.log_path, "w")
        command = [script(), "serve"] if cwd is not None else [sys.executable, "-m", "rpc", "serve"]
        self.process = subprocess.Popen(
            [*command, *args], cwd=cwd or self.cwd, env=self.env, stdout=log, stderr=log, text=True
        )
        log.close()
        if wait:
            deadline = time.monotonic() + 30
            while "listening" not in self.log():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"rpc serve did not start:\n{self.log()}")
                time.sleep(0.05)
        return self.process

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def script() -> str:
    """The installed `rpc` console script."""
    found = shutil.which("rpc", path=os.path.dirname(sys.executable))
    assert found is not None, "the rpc console script is not installed next to this Python"
    return found


@pytest.fixture
def daemon(tmp_path):
    """A daemon harness with its own key folder and a Unix socket address."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "RPC_ADDRESS": str(tmp_path / "rpc.sock"),
        "RPC_LOG_FORMAT": "json",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RPC_AUTHKEY", None)
    env.pop("RPC_CONFIG", None)
    harness = Daemon(env, tmp_path)
    yield harness
    harness.stop()
