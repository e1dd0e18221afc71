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


@registry.expose
def rows(n: int, size: int) -> Any:
    """A generator of ``n`` byte strings of ``size`` bytes: streamed."""
    row = b"x" * size
    for _ in range(n):
        yield row


@registry.expose
def rows_list(n: int, size: int) -> list[bytes]:
    """The same data as :func:`rows`, returned as one list."""
    row = b"x" * size
    return [row] * n
