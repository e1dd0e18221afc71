"""The functions this example serves. Handler processes import this module."""

import rpc

registry = rpc.Registry()


@registry.expose
def add(x, y):
    """Add two numbers."""
    return x + y


@registry.expose(name="text.shout")
def shout(text, times=1):
    """Upper-case the text, repeated."""
    return " ".join([text.upper()] * times)
