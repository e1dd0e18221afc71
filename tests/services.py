"""Registries served by the integration tests; handler processes import this module."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import rpc

registry = rpc.Registry()


@registry.expose
def add(x, y):
    """Add two numbers."""
    return x + y


@registry.expose(name="math.hypot")
def hypot(x, y):
    """Length of the hypotenuse."""
    return (x * x + y * y) ** 0.5


@registry.expose
def echo(value):
    """Return the value unchanged."""
    return value


@registry.expose
def type_name(value):
    """The name of the value's type as the handler received it."""
    return type(value).__name__


@registry.expose
def kwargs_echo(*args, **kwargs):
    return [list(args), kwargs]


@registry.expose
def fail(kind, message="boom"):
    """Raise the builtin exception named ``kind``."""
    raise {"KeyError": KeyError, "ValueError": ValueError, "ZeroDivisionError": ZeroDivisionError}[kind](message)


class CustomError(Exception):
    pass


@registry.expose
def fail_custom():
    raise CustomError("custom failure")


@registry.expose
def unencodable():
    return object()


@registry.expose
def sleep(seconds, value=None):
    time.sleep(seconds)
    return value


@registry.expose
def hold(started, release, value=None, timeout=60):
    """Create the file ``started``, return ``value`` once the file ``release`` exists.

    A call that runs exactly as long as a test wants: the test waits for ``started``
    to know the call runs, and creates ``release`` to let it finish.
    """
    Path(started).touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} was never created")
        time.sleep(0.005)
    return value


@registry.expose
def pid():
    return os.getpid()


@registry.expose
def crash(how="exit"):
    """Die mid-call: os._exit (with code 1, or 0), SIGKILL to itself, or a segfault."""
    if how == "exit":
        os._exit(1)
    if how == "exit0":
        os._exit(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    raise ValueError(how)


@registry.expose
def record(directory, seconds):
    """Sleep, recording start and end times in ``directory`` to measure overlap."""
    path = Path(directory) / f"{os.getpid()}-{time.monotonic_ns()}"
    start = time.monotonic()
    time.sleep(seconds)
    path.write_text(f"{start} {time.monotonic()}")
    return os.getpid()


@registry.expose
def touch(path):
    """Create the file at ``path`` (to tell whether a call ran)."""
    Path(path).touch()


@registry.expose
def big(size):
    return b"x" * size


broken = "not a registry"


@registry.expose
def spin_ignoring_sigterm(seconds):
    """Hold the GIL in a busy loop with SIGTERM ignored (only SIGKILL stops it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"


@registry.expose
def leave(how):
    """Raise what asks a program to stop: sys.exit(), SystemExit, KeyboardInterrupt."""
    import sys

    if how == "sys.exit":
        sys.exit(3)
    if how == "SystemExit":
        raise SystemExit("bye")
    raise KeyboardInterrupt


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text for you")


@registry.expose
def fail_unprintable():
    raise Unprintable()


@registry.expose
def fail_surrogate():
    raise ValueError("bad \udcff text")


@registry.expose
def recursive_list():
    value = []
    value.append(value)
    return value


@registry.expose
def identify(client, call):
    """Return the arguments, so each caller can check it got its own answer."""
    return [client, call, os.getpid()]


@registry.expose
def raise_key_error_of(size):
    """Raise a KeyError whose key is a string of ``size`` characters."""
    raise KeyError("k" * size)


@registry.expose
def nested_tuple(depth):
    """A tuple nested ``depth`` deep: ((((),),),)."""
    value = ()
    for _ in range(depth):
        value = (value,)
    return value


@registry.expose
def chatter(text):
    """Speak every way a function can besides its result: print, logging, warnings."""
    import logging
    import sys
    import warnings

    print(f"to stderr: {text}", file=sys.stderr)
    print(f"to stdout: {text}\nsecond line", flush=True)
    logging.getLogger("myapp").warning("myapp says %s", text)
    warnings.warn(f"careful: {text}", stacklevel=1)
    return "done"


# -- test hooks: where a handler serving a lent socket can be made to stop -------------

LEASE_HOOKS = "RPC_TEST_LEASE_HOOKS"  # a folder; handlers started with it set install the hooks


def _install_lease_hooks(folder: Path) -> None:
    """Let a test stop a handler at a chosen point of serving a lent socket, once.

    The test creates ``pause-<point>`` in ``folder``; the first handler to reach that
    point claims the file, creates ``paused-<pid>`` and sleeps until it is killed.
    Points: ``before-send`` (a reply is about to be written), ``after-send`` (the
    whole reply is written, the state not yet back to idle), ``decode`` (a request of method
    ``touch`` is about to run). Each call run on a lent socket creates ``lent-<id>``
    holding the handler's pid.

    ``hold-after-send`` (never claimed) holds every handler at ``after-send`` while the
    file exists: it creates ``held-<pid>`` and goes on once the test removes the file.
    """
    from rpc import lease, protocol

    def reached(point: str) -> None:
        pid = os.getpid()
        try:
            os.rename(folder / f"pause-{point}", folder / f"claimed-{pid}")
        except FileNotFoundError:
            return
        (folder / f"paused-{pid}").touch()
        time.sleep(120)  # until the test kills this process

    running, writing, idle = lease.CallState.running, lease.CallState.writing, lease.CallState.idle
    decode_request = protocol.decode_request

    def running_hook(self, request_id, deadline, *more):
        running(self, request_id, deadline, *more)
        try:
            (folder / f"lent-{int(request_id)}").write_text(str(os.getpid()))  # this call runs on a lent socket
        except OSError:
            pass  # the test that made the folder is over

    def writing_hook(self, *args, **kwargs):
        writing(self, *args, **kwargs)
        reached("before-send")

    def hold(point: str) -> None:
        if not (folder / f"hold-{point}").exists():
            return
        (folder / f"held-{os.getpid()}").touch()
        for _ in range(12_000):  # bounded: a minute at most
            if not (folder / f"hold-{point}").exists():
                return
            time.sleep(0.005)

    def idle_hook(self):
        if self.array[0] == lease.CallState.WRITING:
            reached("after-send")
            hold("after-send")
        idle(self)

    def hooked(decode):
        def decode_hook(frame):
            request = decode(frame)
            if request.method == "touch":
                reached("decode")
            return request

        return decode_hook

    lease.CallState.running, lease.CallState.writing, lease.CallState.idle = running_hook, writing_hook, idle_hook
    # A lent socket's requests are decoded by decode_call, the router's by decode_request.
    protocol.decode_request, protocol.decode_call = hooked(decode_request), hooked(protocol.decode_call)


if os.environ.get(LEASE_HOOKS) and __name__ != "__main__":
    _install_lease_hooks(Path(os.environ[LEASE_HOOKS]))

# Handlers started with it set keep a lent socket for as long as its client calls one call at
# a time, however slowly the test runs: it is not given back after a short quiet spell, nor
# taken for a pipelining client when a call and its reply take a while on a loaded machine.
LEASE_STAYS = "RPC_TEST_LEASE_STAYS"
if os.environ.get(LEASE_STAYS) and __name__ != "__main__":
    from rpc import lease

    lease.IDLE_SECONDS = lease.PARALLEL_WORTHY_SECONDS = 600.0


class ArgsRaise(Exception):
    @property
    def args(self):
        raise RuntimeError("no args for you")


@registry.expose
def fail_args_property():
    """Raise an exception whose ``args`` property raises."""
    raise ArgsRaise("odd")


class Interrupting:
    """A registered type whose encoder raises KeyboardInterrupt."""


def _interrupt(value):
    raise KeyboardInterrupt


rpc.register_type(Interrupting, 100, encode=_interrupt, decode=lambda value: Interrupting())


@registry.expose
def interrupting_result():
    return Interrupting()
