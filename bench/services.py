"""Functions the benchmarks call, in a module handler processes can import."""

import rpc

registry = rpc.Registry()


@registry.expose
def add(x, y):
    return x + y


@registry.expose
def echo(value):
    return value
