"""A small network on one machine: HAProxy in front of several rpc daemons, in network namespaces.

    sudo python examples/deploy/haproxy/lab.py --daemons 3

builds it, starts a daemon per host and HAProxy with haproxy.cfg (beside this file)
rendered for the lab's addresses, prints commands to try, and tears everything
down on Ctrl-C. rpc's own test of the balancer (tests/integration/test_haproxy.py)
and ``python -m bench --only haproxy`` build it with :class:`Lab`.

Each host is a network namespace, joined to the balancer's by one veth pair (a
routed link); every address lives inside namespaces the lab creates, so nothing
of it is visible outside and the same addresses serve every lab at once::

    client 10.77.0.2 ─── 10.77.0.1 ┐
                                   balancer: HAProxy on 10.77.0.1:7100; also routes
    d1     10.77.1.2 ─── 10.77.1.1 ┤
    d2     10.77.2.2 ─── 10.77.2.1 ┘ ...

A daemon serves rpc on port 7100 of its host and /healthz, /metrics on port 9100.
The balancer's host also forwards between its links, so a client can reach a
daemon directly, for comparison. Names are unique per lab (``rpclab-PID-RANDOM-ROLE``);
a lab whose process was killed is swept away by the next one.

Linux only, as root, with ``ip`` (iproute2) and ``haproxy`` installed.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
EXAMPLE_CONFIG = HERE / "haproxy.cfg"
BACKEND = "rpc_daemons"  # the backend's name in haproxy.cfg
PREFIX = "rpclab"
RPC_PORT = 7100
METRICS_PORT = 9100  # the `check port` of haproxy.cfg
SUBNET = "10.77"  # link k is SUBNET.k.0/24: the balancer is .1 on it, the other host .2

T = TypeVar("T")


class LabError(RuntimeError):
    """Something the lab waited for did not happen; the message says what, with the log to read."""


def missing() -> str | None:
    """Why a lab cannot be built here, or None if it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if haproxy_binary() is None:
        return "`haproxy` is not installed (Debian: apt-get install haproxy)"
    probe = f"{PREFIX}-probe-{os.getpid()}-{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def haproxy_binary() -> str | None:
    """The haproxy program (Debian installs it in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def wait_until(what: str, predicate: Callable[[], T], timeout: float, log: Path | None = None) -> T:
    """Poll ``predicate`` until it returns a true value; LabError saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = f"\n--- {log}:\n{_tail(log)}" if log is not None else ""
            raise LabError(f"{what}: not within {timeout:g} s{tail}")
        time.sleep(0.02)


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read: {exc})"


def ip(*args: str) -> str:
    """Run an `ip` command; its output, or RuntimeError with its message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def render_config(example: str, bind: str, servers: Mapping[str, str], stats_socket: str) -> str:
    """``example`` (haproxy.cfg) with the lab's addresses: its `bind`, `server` and `stats socket` lines replaced.

    Everything else (modes, checks, timeouts, retries) is kept as written, so the lab
    runs the example itself.
    """
    out: list[str] = []
    found = {"bind": 0, "server": 0, "stats socket": 0}
    for line in example.splitlines():
        words = line.split()
        indent = line[: len(line) - len(line.lstrip())]
        if words[:1] == ["bind"]:
            found["bind"] += 1
            line = f"{indent}bind {bind}"
        elif words[:2] == ["stats", "socket"]:
            found["stats socket"] += 1
            line = f"{indent}stats socket {stats_socket} mode 600 level admin"
        elif words[:1] == ["server"]:
            found["server"] += 1
            if found["server"] > 1:
                continue  # the first server line stands for all of them
            out.extend(f"{indent}server {name} {address}" for name, address in servers.items())
            continue
        out.append(line)
    if found["bind"] != 1 or found["stats socket"] != 1 or not found["server"]:
        raise ValueError(f"the example config must have one bind, one stats socket and some server lines: {found}")
    return "\n".join(out) + "\n"


def _stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group of ``process`` (one this lab started), then SIGKILL after ``timeout`` s."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process, signal.SIGKILL)  # what the leader left behind (handlers) too
    process.wait(10)


def _die_with_parent() -> None:
    """In a child before it runs its program: SIGKILL it if the lab's process dies (a killed test run).

    The setting survives `ip netns exec`, which runs the program in the same process.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # started with start_new_session: its group id is its pid
    except ProcessLookupError:
        pass


@dataclass
class Daemon:
    """One daemon host: its namespace, address, and the `rpc serve` running there (if any)."""

    name: str
    netns: str
    host: str
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None  # the log of its latest start
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{RPC_PORT}"

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{METRICS_PORT}"


@dataclass
class Lab:
    """The namespaces, links, daemons and HAProxy of one lab; use as a context manager.

    ``registry`` is what each daemon serves; ``env`` is added to the environment of
    the daemons (PYTHONPATH, for example). ``authkey`` is shared by the daemons and
    the clients started with :meth:`client_env`.
    """

    folder: Path
    daemons: int = 3
    registry: str = "rpc.demo:registry"
    workers: int = 2
    env: Mapping[str, str] = field(default_factory=dict)
    authkey: str = field(default_factory=lambda: secrets.token_hex(16))
    name: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}")
    hosts: list[Daemon] = field(init=False, default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = field(init=False, default=None)
    namespaces: list[str] = field(init=False, default_factory=list)

    # -- addresses ------------------------------------------------------------------------------

    @property
    def balancer(self) -> str:
        """The namespace of HAProxy (and the router between the links)."""
        return f"{self.name}-lb"

    @property
    def client(self) -> str:
        """The namespace clients run in."""
        return f"{self.name}-client"

    @property
    def address(self) -> str:
        """HAProxy's address, as clients dial it."""
        return f"{SUBNET}.0.1:{RPC_PORT}"

    @property
    def stats_socket(self) -> Path:
        return self.folder / "haproxy.sock"

    @property
    def haproxy_log(self) -> Path:
        return self.folder / "haproxy.log"

    def in_netns(self, netns: str, argv: Iterable[str]) -> list[str]:
        """The command line that runs ``argv`` in namespace ``netns``."""
        return ["ip", "netns", "exec", netns, *argv]

    def client_env(self) -> dict[str, str]:
        """The environment of a client process: the lab's authkey in RPC_AUTHKEY."""
        return {**os.environ, **self.env, "RPC_AUTHKEY": self.authkey}

    # -- building and tearing down --------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        """Namespaces, links and routes; then the daemons, then HAProxy, waiting until it sees them all up."""
        sweep_stale()
        self.folder.mkdir(parents=True, exist_ok=True)
        for netns in [self.balancer, self.client]:
            self._add_netns(netns)
        self._link(0, self.client)
        for i in range(1, self.daemons + 1):
            netns = f"{self.name}-d{i}"
            self._add_netns(netns)
            self._link(i, netns)
            self.hosts.append(Daemon(f"d{i}", netns, f"{SUBNET}.{i}.2"))
        # The balancer's host routes between its links (its namespace's own setting, not the machine's).
        ip("netns", "exec", self.balancer, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        for daemon in self.hosts:
            self.start_daemon(daemon)
        self.start_haproxy()
        for daemon in self.hosts:
            self.wait_for_state(daemon, "UP")

    def _add_netns(self, netns: str) -> None:
        ip("netns", "add", netns)
        self.namespaces.append(netns)
        ip("-n", netns, "link", "set", "lo", "up")

    def _link(self, k: int, netns: str) -> None:
        """A veth pair from ``netns`` (eth0, .2) to the balancer (link{k}, .1), made inside both namespaces."""
        inside, outside = f"{SUBNET}.{k}.2", f"{SUBNET}.{k}.1"
        ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", f"link{k}", "netns", self.balancer)
        ip("-n", self.balancer, "addr", "add", f"{outside}/24", "dev", f"link{k}")
        ip("-n", self.balancer, "link", "set", f"link{k}", "up")
        ip("-n", netns, "addr", "add", f"{inside}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", "default", "via", outside)

    def close(self) -> None:
        """Stop HAProxy and the daemons, end anything left in the lab's namespaces, delete them."""
        if self.haproxy is not None:
            _stop_group(self.haproxy, 10)
        for daemon in self.hosts:
            if daemon.process is not None:
                _stop_group(daemon.process, 15)
        for netns in reversed(self.namespaces):
            _delete_netns(netns)
        self.namespaces.clear()

    # -- daemons --------------------------------------------------------------------------------

    def start_daemon(self, daemon: Daemon, timeout: float = 60.0) -> None:
        """Start `rpc serve` on ``daemon``'s host and wait for its `listening` log line."""
        daemon.starts += 1
        config = self.folder / f"{daemon.name}.toml"
        config.write_text(
            f'address = "{daemon.address}"\n'
            f'metrics_address = "{daemon.metrics_address}"\n'
            f'registry = "{self.registry}"\n'
            f"workers = {self.workers}\n"
            'log_format = "json"\n'
        )
        daemon.log = self.folder / f"{daemon.name}.{daemon.starts}.log"
        env = {**os.environ, **self.env, "RPC_AUTHKEY": self.authkey, "LAB_HOST": daemon.name}
        with open(daemon.log, "wb") as log:
            daemon.process = subprocess.Popen(
                self.in_netns(daemon.netns, [sys.executable, "-m", "rpc", "serve", "--config", str(config)]),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a SIGKILL of the group takes its handlers too
                preexec_fn=_die_with_parent,
            )
        process, log_path = daemon.process, daemon.log

        def listening() -> bool:
            if process.poll() is not None:
                raise LabError(f"rpc serve on {daemon.name} exited with {process.returncode}:\n{_tail(log_path)}")
            return '"listening"' in log_path.read_text(errors="replace")

        wait_until(f"rpc serve on {daemon.name} logs `listening`", listening, timeout, log_path)

    def signal_daemon(self, daemon: Daemon, signum: int) -> None:
        """Send ``signum`` to ``daemon``'s `rpc serve` (SIGKILL: to its whole process group, as a crash of its host)."""
        assert daemon.process is not None
        if signum == signal.SIGKILL:
            _signal_group(daemon.process, signum)
        else:
            daemon.process.send_signal(signum)

    def wait_for_exit(self, daemon: Daemon, timeout: float = 60.0) -> int:
        """``daemon``'s exit code, once its `rpc serve` has exited (and its handlers with it)."""
        assert daemon.process is not None
        try:
            code = daemon.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"rpc serve on {daemon.name} did not exit within {timeout:g} s:\n{_tail(daemon.log)}") from None
        # its handlers exit with it; anything slower is not left running into the next start
        wait_until(f"the processes of {daemon.name} exit", lambda: not _netns_pids(daemon.netns), 30)
        return code

    def metrics(self, daemon: Daemon) -> str:
        """``daemon``'s GET /metrics (Prometheus text), fetched from the balancer's host, as Prometheus would."""
        fetch = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({f'http://{daemon.metrics_address}/metrics'!r}, timeout=10).read().decode())"
        done = subprocess.run(self.in_netns(self.balancer, [sys.executable, "-c", fetch]), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise LabError(f"GET /metrics of {daemon.name} failed: {done.stderr.strip()}")
        return done.stdout

    # -- HAProxy --------------------------------------------------------------------------------

    def config_text(self) -> str:
        """haproxy.cfg for this lab: the example with the lab's addresses."""
        servers = {daemon.name: daemon.address for daemon in self.hosts}
        return render_config(EXAMPLE_CONFIG.read_text(), self.address, servers, str(self.stats_socket))

    def start_haproxy(self, timeout: float = 30.0) -> None:
        """Start HAProxy in the balancer's namespace (in the foreground, logging to haproxy.log)."""
        binary = haproxy_binary()
        assert binary is not None
        config = self.folder / "haproxy.cfg"
        config.write_text(self.config_text())
        checked = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise LabError(f"haproxy rejects {config}:\n{checked.stdout}{checked.stderr}")
        with open(self.haproxy_log, "wb") as log:
            self.haproxy = subprocess.Popen(
                self.in_netns(self.balancer, [binary, "-db", "-f", str(config)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        haproxy = self.haproxy

        def answers() -> bool:
            if haproxy.poll() is not None:
                raise LabError(f"haproxy exited with {haproxy.returncode}:\n{_tail(self.haproxy_log)}")
            try:
                return bool(self.haproxy_command("show info"))
            except OSError:
                return False

        wait_until("haproxy answers on its stats socket", answers, timeout, self.haproxy_log)

    def haproxy_command(self, command: str) -> str:
        """Send one command to HAProxy's stats socket; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's statistics of the backend's servers, and of the backend as "BACKEND": name -> field -> value."""
        lines = self.haproxy_command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == BACKEND:
                rows[row["svname"]] = row
        return rows

    def state(self, daemon: Daemon) -> str:
        """HAProxy's view of ``daemon``: "UP", "DOWN", "UP 1/2" (going down), "DOWN 1/2" (coming up), ..."""
        return self.stats()[daemon.name]["status"]

    def wait_for_state(self, daemon: Daemon, state: str, timeout: float = 60.0) -> None:
        """Wait until HAProxy's health checks put ``daemon`` in ``state`` ("UP" or "DOWN")."""
        wait_until(f"haproxy sees {daemon.name} {state}", lambda: self.state(daemon) == state, timeout, daemon.log)


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


def _delete_netns(netns: str) -> None:
    """End what still runs in ``netns`` (a lab's own namespace), then delete it; its veth ends go with it."""
    for pid in _netns_pids(netns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True)


def sweep_stale() -> list[str]:
    """Delete the namespaces of labs whose process no longer exists (a run that was killed); their names."""
    pattern = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-\w+$")
    swept = []
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        netns = line.split()[0] if line.split() else ""
        found = pattern.match(netns)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            _delete_netns(netns)
            swept.append(netns)
    return swept


def enter_netns(netns: str) -> None:
    """Move the calling process into namespace ``netns`` (its sockets from then on live there)."""
    import ctypes

    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HAProxy in front of rpc daemons, in network namespaces (run as root).")
    parser.add_argument("--daemons", type=int, default=3, help="daemon hosts (default: 3)")
    parser.add_argument("--folder", type=Path, default=None, help="where configs and logs go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    why = missing()
    if why:
        print(f"cannot build the lab: {why}", file=sys.stderr)
        return 1
    import tempfile

    folder = args.folder or Path(tempfile.mkdtemp(prefix="rpclab-"))
    with Lab(folder, daemons=args.daemons) as lab:
        call = " ".join(lab.in_netns(lab.client, [sys.executable, "-m", "rpc", "call", "--address", lab.address, "info"]))
        print(f"HAProxy listens on {lab.address} in namespace {lab.balancer}; configs and logs in {folder}")
        for daemon in lab.hosts:
            print(f"  {daemon.name}: rpc on {daemon.address}, /healthz on http://{daemon.metrics_address}/healthz")
        print(f"\nTry, in another shell as root:\n  export RPC_AUTHKEY={lab.authkey}\n  {call}")
        print(f"  echo 'show stat' | socat - {lab.stats_socket}   # HAProxy's view of the daemons")
        print(f"  kill -TERM {lab.hosts[0].process.pid if lab.hosts[0].process else '?'}   # drain d1: HAProxy marks it DOWN")
        print("\nCtrl-C (or SIGTERM) tears the lab down.")
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background job starts with it ignored
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(1.0):  # in steps: the wait wakes to run the signal handler
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
