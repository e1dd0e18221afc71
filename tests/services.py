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
def pid():
    return os.getpid()


@registry.expose
def crash(how="exit"):
    """Die mid-call: os._exit, SIGKILL to itself, or a segfault."""
    if how == "exit":
        os._exit(1)
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
