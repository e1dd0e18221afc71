"""The package type-checks clean: ``mypy --strict rpc`` (configured in pyproject.toml) reports nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_reports_nothing(tmp_path: Path) -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.skip("mypy is not importable (pip install -e '.[test]' brings it)")
    result = subprocess.run(
        # A cache of its own, so the run leaves nothing in the checkout.
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy_cache"), "rpc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"mypy --strict rpc reported:\n{result.stdout}{result.stderr}"
