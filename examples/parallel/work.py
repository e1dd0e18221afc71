"""A CPU-bound function to call in parallel. Handler processes import this module."""

import rpc

registry = rpc.Registry()


@registry.expose
def crunch(n):
    """Pure-Python arithmetic that holds the GIL for a while; returns a checksum."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total
