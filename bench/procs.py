"""What the bench reads about processes (CPU time, memory, children) and how it pins them.

Linux only: everything comes from /proc. CPU time of another process is its
utime + stime from /proc/PID/stat (clock ticks, so measured windows must be long
enough for 10 ms steps not to matter); this process's own comes from
``time.process_time()``, which is exact.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

SELF = 0  # in a group of pids: this process
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ALL_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))
# The figures were taken with `taskset -c 0`; any one CPU will do.
PIN_CPU = 0 if 0 in ALL_CPUS else min(ALL_CPUS)


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat from its third field (state) on: the name in parentheses may hold spaces."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread, living or ended, of process ``pid`` (SELF: this one)."""
    if pid == SELF:
        return time.process_time()
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def read_cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each named group of processes."""
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}


def descendants(pid: int) -> list[int]:
    """Children of ``pid``, their children, and so on (handlers started by spawn or a forkserver)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat_fields(entry)[1])
            except (OSError, ValueError, IndexError):
                continue  # ended while we looked
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS)."""
    return _status(pid, "VmRSS") / 1024


def thread_count(pid: int) -> int:
    return _status(pid, "Threads")


def open_files_limit(pid: int) -> str:
    """The soft RLIMIT_NOFILE of ``pid``, as /proc/PID/limits gives it."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


def has_loaded(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains ``fragment`` is mapped into ``pid`` (an extension module, say)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(fragment in line for line in f)
    except OSError:
        return False


def set_affinity(pids: Iterable[int], cpus: Iterable[int]) -> None:
    """Put every thread of every process in ``pids`` (SELF: this one) on ``cpus``.

    sched_setaffinity() moves one thread, so each of /proc/PID/task is moved;
    threads started later inherit their creator's set. Listed twice, for a thread
    started while the first pass ran.
    """
    cpus = set(cpus)
    for _ in range(2):
        for pid in pids:
            pid = os.getpid() if pid == SELF else pid
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue  # the process has ended
            for tid in tids:
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except (ProcessLookupError, FileNotFoundError):
                    continue  # the thread has ended


@contextmanager
def pinned(pids: list[int], pin: bool = True) -> Iterator[None]:
    """Every thread of ``pids`` on one CPU for the block (if ``pin``), on all of them after."""
    if not pin:
        yield
        return
    set_affinity(pids, {PIN_CPU})
    try:
        yield
    finally:
        set_affinity(pids, ALL_CPUS)


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` as far as the hard limit allows.

    Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard
