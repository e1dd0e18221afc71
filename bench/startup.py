"""Time from starting a test server to its first successful call, as the pytest fixtures do.

For each start method, the baseline is the bare cost of starting one process
with that method and hearing from it over a Pipe, measured in the same run; rpc's
figure is ``rpc.testing.serve(..., workers=1)`` up to the first ``add(1, 2)``.
Medians over rounds; the first forkserver start (once per test session) is
reported on its own.

    python bench/startup.py [--rounds 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rpc.testing import _prepare_forkserver, serve  # noqa: E402


def _hello(conn: object) -> None:
    conn.send_bytes(b"hello")  # type: ignore[attr-defined]


def bare_process(method: str) -> float:
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    started = time.perf_counter()
    process = ctx.Process(target=_hello, args=(child,))
    process.start()
    parent.recv_bytes()
    elapsed = time.perf_counter() - started
    process.join()
    return elapsed


def first_call(method: str) -> float:
    started = time.perf_counter()
    with serve("services:registry", workers=1, start_method=method, log_level="warning") as server:
        with server.client() as client:
            client.add(1, 2)
            return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    _prepare_forkserver()
    first_forkserver = first_call("forkserver")  # includes starting the forkserver itself
    rows = []
    for method in ("spawn", "forkserver"):
        base = statistics.median(bare_process(method) for _ in range(args.rounds))
        ours = statistics.median(first_call(method) for _ in range(args.rounds))
        rows.append({"start_method": method, "bare_process_ms": round(base * 1e3, 1),
                     "server_first_call_ms": round(ours * 1e3, 1), "ratio": round(ours / base, 2)})
    print(f"{'start method':<13} {'bare process ms':>16} {'server to first call ms':>24} {'ratio':>6}")
    for row in rows:
        print(f"{row['start_method']:<13} {row['bare_process_ms']:>16} {row['server_first_call_ms']:>24} {row['ratio']:>6}")
    print(f"first forkserver server of a session (starts the forkserver): {first_forkserver * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "first_forkserver_ms": round(first_forkserver * 1e3, 1), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
