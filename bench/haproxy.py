"""The ``haproxy`` section, on request only (``python -m bench --only haproxy``; root, `ip`, haproxy).

In the lab of examples/deploy/haproxy/lab.py (network namespaces joined by veth
pairs: a client host, a balancer host, two daemon hosts), ``s.clients`` client
processes in the client namespace call ``add(1, 2)``:

- through HAProxy in front of two daemons, against the same clients calling one
  daemon directly (routed through the balancer's host, without HAProxy), in turn,
  ``s.load_rounds`` times: throughput, unpinned, with CPU time per call;
- through HAProxy while both daemons are restarted one after the other (SIGTERM,
  wait for the exit, start again, wait until HAProxy sees it up): calls made,
  failed and made again by the clients, connects HAProxy retried, and the longest
  pause a call saw, against the longest call of a quiet window of the same length
  right after.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rpc

from .load import JOIN_TIMEOUT, Load, _caller, _collect, _stop, run_clients
from .procs import descendants
from .report import Row, compare
from .servers import AUTHKEY, CTX, START_TIMEOUT, BenchError

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "examples" / "deploy" / "haproxy" / "lab.py"
DAEMONS = 2
WORKERS = 2  # handlers per daemon
RESTART_CLIENT_SECONDS = 600.0  # a restart client stops by itself after this, whatever happens


def _lab() -> Any:
    """The lab module (examples/deploy/haproxy/lab.py), loaded once per process."""
    name = "rpc_haproxy_lab"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LAB)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


def haproxy(s: Any) -> list[Row]:
    lab = _lab()
    why = lab.missing()
    if why is not None:
        raise BenchError(f"cannot build the HAProxy lab: {why}")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp, lab.Lab(
        Path(tmp), daemons=DAEMONS, registry="bench.services:registry", workers=WORKERS, env=env,
        authkey=AUTHKEY.decode(),
    ) as built:
        rows = _throughput(s, built)
        rows.extend(_rolling_restart(s, built))
    return rows


# -- throughput ----------------------------------------------------------------------------------


def _caller_in(netns: str, *args: Any) -> None:
    """A client process of load.run_clients, in namespace ``netns``."""
    _lab().enter_netns(netns)
    _caller(*args)


def _daemon_groups(daemons: list[Any]) -> dict[str, list[int]]:
    routers = [daemon.process.pid for daemon in daemons]
    return {"routers": routers, "handlers": [pid for router in routers for pid in descendants(router)]}


def _throughput(s: Any, lab: Any) -> list[Row]:
    assert lab.haproxy is not None
    through = {"haproxy": [lab.haproxy.pid], **_daemon_groups(lab.hosts)}
    direct = _daemon_groups(lab.hosts[:1])
    runs: dict[str, list[Load]] = {"haproxy": [], "direct": []}
    for _ in range(s.load_rounds):
        runs["haproxy"].append(run_clients("rpc", lab.address, s.clients, s.seconds, through, _caller_in, (lab.client,)))
        runs["direct"].append(run_clients("rpc", lab.hosts[0].address, s.clients, s.seconds, direct, _caller_in, (lab.client,)))
    rate = {name: statistics.median(run.rate for run in got) for name, got in runs.items()}
    cpu = {}
    for name, got in runs.items():
        calls = sum(run.calls for run in got)
        cpu[name] = {group: sum(run.cpu[group] for run in got) / calls * 1e6 for group in got[0].cpu}
    what = f"{s.clients} client processes calling add through HAProxy, {DAEMONS} daemons x {WORKERS} handlers"
    return [
        compare("haproxy", what, rate["haproxy"], "calls/s", f"one daemon directly ({WORKERS} handlers), routed",
                rate["direct"], cpu=cpu["haproxy"], baseline_cpu=cpu["direct"],
                note="network namespaces on one machine: every process shares its CPUs"),
    ]


# -- a rolling restart under load ------------------------------------------------------------------


def _restart_caller(netns: str, address: str, ready: Any, stop: Any, results: Any) -> None:
    """Call add(1, 2) until ``stop``; report calls, failures by type, calls made again, and the longest call of each second."""
    _lab().enter_netns(netns)
    try:
        client = rpc.connect(address, authkey=AUTHKEY, timeout=60)
        client.add(1, 2)
    except Exception as exc:
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(None)
    calls = 0
    failures: dict[str, int] = {}
    longest: dict[int, float] = {}  # second of time.monotonic() -> the longest call begun in it
    deadline = time.monotonic() + RESTART_CLIENT_SECONDS
    while not stop.is_set() and time.monotonic() < deadline:
        began = time.monotonic()
        try:
            client.add(1, 2)
        except rpc.RPCError as exc:
            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
        took = time.monotonic() - began
        second = int(began)
        longest[second] = max(longest.get(second, 0.0), took)
        calls += 1
    client.close()
    results.put((calls, failures, longest, client.calls_made_again))


def _rolling_restart(s: Any, lab: Any) -> list[Row]:
    ready, stop, results = CTX.Queue(), CTX.Event(), CTX.Queue()
    processes = [
        CTX.Process(target=_restart_caller, args=(lab.client, lab.address, ready, stop, results), daemon=True)
        for _ in range(s.clients)
    ]
    for process in processes:
        process.start()
    try:
        _collect(ready, processes, START_TIMEOUT, "connect")
        before = lab.stats()["BACKEND"]
        begun = time.monotonic()
        for daemon in lab.hosts:
            lab.signal_daemon(daemon, signal.SIGTERM)
            lab.wait_for_exit(daemon, START_TIMEOUT)
            lab.start_daemon(daemon, START_TIMEOUT)
            lab.wait_for_state(daemon, "UP", START_TIMEOUT)
        ended = time.monotonic()
        time.sleep(ended - begun)  # a quiet window as long as the restart, for the baseline
        stop.set()
        reports = _collect(results, processes, JOIN_TIMEOUT, "stop calling")
        after = lab.stats()["BACKEND"]
    except queue.Empty:
        raise BenchError("the restart clients did not report") from None
    finally:
        stop.set()
        _stop(processes)
    calls = sum(r[0] for r in reports)
    failures: dict[str, int] = {}
    for _, by_type, _, _ in reports:
        for name, count in by_type.items():
            failures[name] = failures.get(name, 0) + count
    failed = sum(failures.values())
    retried = sum(r[3] for r in reports)
    reconnected = sum(int(after[key] or 0) - int(before[key] or 0) for key in ("wretr", "wredis"))

    def longest(start: float, end: float) -> float:
        return max((took for r in reports for second, took in r[2].items() if int(start) <= second <= int(end)), default=0.0)

    pause, quiet = longest(begun, ended), longest(ended + 1, ended + (ended - begun))
    what = f"rolling restart of {DAEMONS} daemons under {s.clients} clients, {ended - begun:.1f} s"
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(failures.items())) or "none"
    return [
        compare("haproxy", f"{what}: longest pause a call saw", pause * 1e3, "ms",
                "longest call, a quiet window as long", quiet * 1e3,
                note=f"{calls:,} calls made, {failed} failed ({kinds}), {retried} made again by the clients, "
                     f"{reconnected} connects retried by HAProxy"),
        Row("haproxy", f"{what}: calls failed", failed, "calls", "calls made", calls,
            extra={"failures": failures, "retried": retried, "haproxy_retries": reconnected}),
        Row("haproxy", f"{what}: calls made again", retried, "calls", "calls made", calls,
            note="calls that did not run where first sent (go-away, ServerShuttingDown), made again on a new connection"),
    ]
