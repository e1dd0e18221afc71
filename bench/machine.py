"""The machine the bench ran on, and how much of its CPU the bench could get.

Others may be running on it: ``cpus_available()`` starts one busy process per CPU
and sums the share of a CPU each one got, so a report can say whether parallel
speed-ups were possible at all while it ran.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from . import services
from .servers import CTX


def calibrate_burn(seconds: float) -> int:
    """Iterations of burn() that take ``seconds`` of CPU (CPU time, not wall time: the machine may be busy)."""
    n = 10_000
    while True:
        start = time.process_time()
        services.burn(n)
        elapsed = time.process_time() - start
        if elapsed > 0.005:
            return int(n * seconds / elapsed)
        n *= 4


def _share(n: int, start: Any, shares: Any) -> None:
    start.wait(60)
    cpu, wall = time.process_time(), time.perf_counter()
    services.burn(n)
    shares.put((time.process_time() - cpu) / (time.perf_counter() - wall))


def cpus_available(seconds: float) -> float:
    """How many CPUs' worth of time busy processes, one per CPU, got for ``seconds`` of work each."""
    n = calibrate_burn(seconds)
    start, shares = CTX.Event(), CTX.Queue()
    processes = [CTX.Process(target=_share, args=(n, start, shares), daemon=True) for _ in range(os.cpu_count() or 1)]
    for process in processes:
        process.start()
    start.set()
    try:
        return float(sum(shares.get(timeout=60 + 20 * seconds) for _ in processes))
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def describe() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
