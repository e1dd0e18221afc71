"""Registry of the async-function and reconnect tests; handler processes import this module."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import rpc

registry = rpc.Registry()

# As in services.py: handlers started with it set keep a lent socket for as long as its
# client calls one call at a time, however slowly the test runs.
LEASE_STAYS = "RPC_TEST_LEASE_STAYS"
if os.environ.get(LEASE_STAYS) and __name__ != "__main__":
    from rpc import lease

    lease.IDLE_SECONDS = lease.PARALLEL_WORTHY_SECONDS = 600.0


@registry.expose
def add(x, y):
    return x + y


@registry.expose
def pid():
    return os.getpid()


@registry.expose
async def add_async(x, y):
    """Add two numbers, asynchronously."""
    await asyncio.sleep(0)
    return x + y


@registry.expose
async def fail_async(message):
    await asyncio.sleep(0)
    raise ValueError(message)


@registry.expose
async def nap(seconds, value=None):
    """Return ``value`` after ``seconds`` of asyncio.sleep."""
    await asyncio.sleep(seconds)
    return value


@registry.expose
async def gather_squares(n):
    async def square(i):
        await asyncio.sleep(0.001)
        return i * i

    return list(await asyncio.gather(*(square(i) for i in range(n))))


@registry.expose
async def hang_async(started):
    """Create the file ``started``, then wait (asynchronously) far longer than any test."""
    Path(started).touch()
    await asyncio.sleep(3600)


_state: dict = {}


async def _produce(queue):
    for n in itertools.count(1):
        await queue.put(n)


@registry.expose
async def loop_state():
    """What a handler's loop keeps across calls: [pid, same loop as the first call, calls, item].

    The first call starts a task that feeds a queue of one slot; each call takes one
    item from it, so the n-th call on a handler gets n only if the task, the queue and
    the loop all carried over from the calls before.
    """
    loop = asyncio.get_running_loop()
    if not _state:
        _state.update(loop=loop, calls=0, queue=asyncio.Queue(maxsize=1))
        _state["task"] = asyncio.create_task(_produce(_state["queue"]))
    _state["calls"] += 1
    item = await asyncio.wait_for(_state["queue"].get(), 30)
    return [os.getpid(), _state["loop"] is loop, _state["calls"], item]


@registry.expose
def count_and_hold(marker, started, release, timeout=60):
    """Append a line to ``marker`` (one per run), create ``started``, return once ``release`` exists."""
    with open(marker, "a") as file:
        file.write(f"{os.getpid()}\n")
    Path(started).touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.005)
    return "released"
