"""What the benchmarks call: an rpc registry and, for the managers baseline, a class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import rpc

registry = rpc.Registry()


@registry.expose
def add(x: int, y: int) -> int:
    return x + y


@registry.expose
def echo(value: Any) -> Any:
    return value


@registry.expose
def burn(n: int) -> int:
    """Pure-Python work that holds the GIL: n iterations of integer arithmetic."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


# The plain Listener + msgpack baseline server looks functions up here.
FUNCTIONS: dict[str, Callable[..., Any]] = {"add": add, "echo": echo, "burn": burn}


class Calc:
    """The same functions, for multiprocessing.managers to expose."""

    def add(self, x: int, y: int) -> int:
        return x + y

    def echo(self, value: Any) -> Any:
        return value

    def burn(self, n: int) -> int:
        return burn(n)
