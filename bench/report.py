"""A result row, and the tables ``python -m bench`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Row:
    """One measure: rpc's figure, the baseline's from the same run, and their ratio.

    ``cpu`` and ``baseline_cpu`` are CPU microseconds per call by process
    ("client", "router", "handlers", "server", ...), where measured.
    """

    section: str
    what: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None  # value / baseline_value
    target: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    baseline_cpu: dict[str, float] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def compare(section: str, what: str, value: float, unit: str, baseline: str, baseline_value: float, **more: Any) -> Row:
    """A row with its ratio worked out."""
    ratio = value / baseline_value if baseline_value else None
    return Row(section, what, value, unit, baseline, baseline_value, ratio, **more)


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _cpu(cpu: dict[str, float]) -> str:
    if not cpu:
        return ""
    parts = [f"{name} {_number(us)}" for name, us in cpu.items()]
    return ", ".join(parts) + f" = {_number(sum(cpu.values()))}"


def print_tables(rows: list[Row], out: TextIO) -> None:
    """The results; then CPU per call by process where measured; then the notes."""
    names = [f"{row.section}: {row.what}" for row in rows]
    width = max([len(n) for n in names] + [7])
    print(f"{'measure':<{width}}  {'rpc':>9} {'unit':<9} {'baseline':>9}  {'ratio':>6}  {'target':<22} baseline is", file=out)
    for name, row in zip(names, rows):
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        print(
            f"{name:<{width}}  {_number(row.value):>9} {row.unit:<9} {_number(row.baseline_value):>9}  {ratio:>6}  "
            f"{row.target:<22} {row.baseline}".rstrip(),
            file=out,
        )
    with_cpu = [(name, row) for name, row in zip(names, rows) if row.cpu or row.baseline_cpu]
    if with_cpu:
        print(f"\nCPU time per call, microseconds, by process (sum after =)", file=out)
        print(f"{'measure':<{width}}  {'rpc':<48} baseline", file=out)
        for name, row in with_cpu:
            print(f"{name:<{width}}  {_cpu(row.cpu):<48} {_cpu(row.baseline_cpu)}".rstrip(), file=out)
    notes = [(name, row.note) for name, row in zip(names, rows) if row.note]
    if notes:
        print("\nnotes", file=out)
        for name, note in notes:
            print(f"- {name}: {note}", file=out)
