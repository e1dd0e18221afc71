"""Run rpc's benchmarks and print a table: ``python -m bench [--quick] [--only a,b] [--json FILE]``.

Every figure comes with the baseline it is compared to, measured in the same run
on the same machine. Run it by hand on a quiet machine; tests only check that it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

from .suite import SECTIONS, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny rounds: checks that everything runs, measures nothing")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    settings = Settings()
    if args.quick:
        settings = Settings(rounds=1, calls=20, seconds=0.2, burn_ms=2, idle_connections=20, bulk_sizes=(1 << 16,))
    rows = []
    for name in names:
        print(f"[{name}]", file=sys.stderr, flush=True)
        rows.extend(SECTIONS[name](settings))
    print(f"{'measure':<58} {'rpc':>10} {'unit':<9} {'baseline':>10}  {'ratio':>6}  {'target':<18} baseline is")
    for row in rows:
        base = "" if row.baseline_value is None else f"{row.baseline_value:10.1f}"
        ratio = "" if row.ratio is None else f"{row.ratio:6.2f}"
        print(
            f"{row.section + ': ' + row.what:<58} {row.value:10.1f} {row.unit:<9} {base:>10}  {ratio:>6}  "
            f"{row.target:<18} {row.baseline}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
                    "settings": dataclasses.asdict(settings),
                    "results": [dataclasses.asdict(r) for r in rows],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
