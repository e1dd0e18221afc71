"""Helpers shared by the tests: counting child processes, raw connections."""

from __future__ import annotations

import os
import time
from pathlib import Path


def child_pids(pid: int | None = None) -> set[int]:
    """Child processes of ``pid`` (default: this process), zombies included, read from /proc.

    multiprocessing's resource tracker is left out: the interpreter starts it once
    for any spawned process and it lives until the interpreter exits.
    """
    pid = os.getpid() if pid is None else pid
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"resource_tracker" not in cmdline:
            children.add(int(entry.name))
    return children


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
