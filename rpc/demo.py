"""The built-in demo service: what ``rpc serve`` runs when no registry is configured.

Small functions that show each kind of call: arithmetic, echo of any value,
a slow call, CPU-bound work that runs in parallel across handlers, and facts
about the server.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from typing import Any

from . import __version__
from .registry import Registry

__all__ = ["registry"]

registry = Registry()


@registry.expose
def add(x: Any, y: Any) -> Any:
    """Add two numbers (or concatenate two strings or lists)."""
    return x + y


@registry.expose
def echo(value: Any) -> Any:
    """Return the value unchanged."""
    return value


@registry.expose
def sleep(seconds: float) -> float:
    """Sleep for the given seconds (at most 60), then return them."""
    if not 0 <= seconds <= 60:
        raise ValueError("seconds must be between 0 and 60")
    time.sleep(seconds)
    return seconds


@registry.expose
def fib(n: int) -> int:
    """The n-th Fibonacci number, computed slowly on purpose (CPU-bound; n at most 32)."""
    if not 0 <= n <= 32:
        raise ValueError("n must be between 0 and 32")
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@registry.expose
def info() -> dict[str, Any]:
    """Facts about the handler process that ran this call."""
    return {
        "rpc": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cpus": os.cpu_count(),
    }
