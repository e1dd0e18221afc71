"""Generator functions served by the stream tests; handler processes import this module."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import rpc

registry = rpc.Registry()


@registry.expose
def add(x, y):
    return x + y


@registry.expose
def count(n, size=0):
    """Yield 0 .. n-1, or with ``size``, that many bytes tagged with the index."""
    for i in range(n):
        yield i if not size else [i, b"x" * size]


@registry.expose
def count_marked(n, folder):
    """Yield 0 .. n-1; files say how far it got and that its finally ran (with the pid)."""
    folder = Path(folder)
    try:
        for i in range(n):
            (folder / "produced").write_text(str(i))
            yield i
    finally:
        (folder / "finally").write_text(str(os.getpid()))


@registry.expose
def fail_after(n, message="broken"):
    yield from range(n)
    raise ValueError(message)


@registry.expose
def wait_after(n, release):
    """Yield n items, then wait for the file ``release`` before the last one."""
    yield from range(n)
    while not Path(release).exists():
        time.sleep(0.01)
    yield "released"


@registry.expose
def sleep_between(n, seconds):
    for i in range(n):
        time.sleep(seconds)
        yield i


@registry.expose
def unencodable():
    yield 1
    yield object()


def _logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@registry.expose
@_logged
def wrapped(n):
    yield from range(n)


@registry.expose
def pid():
    return os.getpid()


@registry.expose
def tracked(n, size, folder, every=1, near=None):
    """Yield [i, size bytes] for i in 0 .. n-1, writing the index of each item it produces
    (with ``near``, only of those within ``near`` items after a multiple of ``every``)."""
    produced, scratch = Path(folder) / "produced", Path(folder) / "produced.next"
    payload = b"x" * size
    for i in range(n):
        if near is None or i % every <= near:
            scratch.write_text(str(i))
            os.replace(scratch, produced)  # a reader never sees it half written
        yield [i, payload]


@registry.expose
async def count_async(n, folder=None):
    """An async generator: yields 0 .. n-1, awaiting between items; a file says its finally ran."""
    import asyncio

    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
    finally:
        if folder is not None:
            (Path(folder) / "finally").write_text(str(os.getpid()))


@registry.expose
async def fail_async_after(n):
    for i in range(n):
        yield i
    raise KeyError("async broken")
