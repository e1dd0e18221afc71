"""Run rpc's benchmarks and print a table: ``python -m bench [--quick] [--only a,b] [--json FILE]``.

Every figure comes with the baseline it is compared to, measured in the same run
on the same machine. Run it by hand, on a machine as quiet as you can get; tests
only check that it runs. Linux only (CPU time, memory and pinning come from /proc).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

from .machine import cpus_available, describe
from .report import Row, print_tables
from .suite import ON_REQUEST, QUICK, SECTIONS, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}; "
                        f"only when named: {', '.join(ON_REQUEST)}")
    parser.add_argument("--quick", action="store_true", help="tiny rounds: checks that everything runs, measures nothing")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SECTIONS)
    known = {**SECTIONS, **ON_REQUEST}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    settings = QUICK if args.quick else Settings()
    check_seconds = 0.05 if args.quick else 0.5
    load_before, free_before = os.getloadavg(), cpus_available(check_seconds)
    started = time.monotonic()
    rows: list[Row] = []
    failed: dict[str, str] = {}
    for name in names:
        print(f"[{name}]", end=" ", file=sys.stderr, flush=True)
        begun = time.monotonic()
        try:
            rows.extend(known[name](settings))
        except Exception as exc:  # one section failing still reports the others
            traceback.print_exc()
            failed[name] = f"{type(exc).__name__}: {exc}"
        print(f"{time.monotonic() - begun:.1f} s", file=sys.stderr, flush=True)
    seconds = round(time.monotonic() - started, 1)
    load_after, free_after = os.getloadavg(), cpus_available(check_seconds)
    machine = {
        **describe(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpus_available_before": round(free_before, 2),
        "cpus_available_after": round(free_after, 2),
        "seconds": seconds,
    }
    print(f"python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"{machine['cpus']} CPUs, Python {machine['python']}, {machine['platform']}; {seconds} s")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; CPUs a busy process per CPU "
          f"could get: {free_before:.2f} before, {free_after:.2f} after (parallel speed-ups need more than 1)\n")
    print_tables(rows, sys.stdout)
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "settings": dataclasses.asdict(settings),
                    "results": [dataclasses.asdict(row) for row in rows],
                    "failed": failed,
                },
                f,
                indent=2,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
