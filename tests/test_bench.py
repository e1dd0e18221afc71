"""The benchmark suite runs end to end (tiny rounds; no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_suite_runs_and_reports_every_target(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["failed"] == {}
    rows = report["results"]
    sections = {row["section"] for row in rows}
    assert sections == {
        "many clients", "cpu per call", "latency", "pipelined", "cpu-bound", "bulk",
        "connections", "event loop", "aio", "streams", "metrics", "connect", "startup",
    }
    assert all(math.isfinite(row["value"]) and row["value"] >= 0 for row in rows)
    baselines = {(row["section"], row["baseline"]) for row in rows}
    for wanted in [
        ("many clients", "multiprocessing.managers"),
        ("many clients", "Listener + msgpack, thread per connection"),
        ("cpu per call", "managers' server process"),
        ("latency", "raw echo, tcp"),
        ("latency", "raw echo, unix"),
        ("latency", "multiprocessing.managers"),
        ("pipelined", "sequential calls, same client"),
        ("cpu-bound", "multiprocessing.managers"),
        ("bulk", "raw echo"),
        ("event loop", "event_loop=uvloop"),
        ("aio", "sync client"),
        ("aio", "raw echo, unix"),
        ("aio", "sync client map(), 1000 in flight"),
        ("streams", "the same rows returned as one list"),
        ("metrics", "no metrics_address"),
    ]:
        assert wanted in baselines
    # CPU time per call is read for the router, its handlers and the clients.
    assert {"router", "handlers", "clients"} <= set(rows[0]["cpu"])
    # Every idle connection of the quick run was opened, and answered its one call.
    answered = next(row for row in rows if row["unit"] == "answered")
    assert answered["value"] == answered["baseline_value"]
    assert "latency: add(1, 2) sequential, tcp, pinned" in result.stdout
    assert "CPU time per call" in result.stdout
