"""The benchmark suite runs end to end (tiny rounds; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_suite_runs_and_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    sections = {row["section"] for row in report["results"]}
    assert sections == {"latency", "pipelined", "many clients", "cpu scaling", "bulk", "connect", "memory", "startup"}
    assert all(row["value"] > 0 for row in report["results"])
    assert "latency: add(1, 2) sequential, tcp" in result.stdout
