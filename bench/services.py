"""What the benchmarks call: an rpc registry and, for the managers baseline, a class."""

import rpc

registry = rpc.Registry()


@registry.expose
def add(x, y):
    return x + y


@registry.expose
def echo(value):
    return value


@registry.expose
def burn(n):
    """Pure-Python work that holds the GIL: n iterations of integer arithmetic."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


class Calc:
    """The same functions, for multiprocessing.managers to expose."""

    def add(self, x, y):
        return x + y

    def echo(self, value):
        return value
