"""Streamed results: a generator function's rows reach the client as it yields them.

python streaming.py   (starts its own server on loopback, then streams from it)
"""

import asyncio
import tempfile
from pathlib import Path

import rpc
import rpc.aio

registry = rpc.Registry()


@registry.expose
def rows(path, limit=None):
    """The lines of a text file, one at a time: never the whole file in memory."""
    with open(path) as lines:  # closed by the with block when the client stops early
        for number, line in enumerate(lines):
            if limit is not None and number >= limit:
                return
            yield line.rstrip("\n")


async def first_rows(address, authkey, path):
    async with rpc.aio.connect(address, authkey=authkey, timeout=10) as client:
        return [row async for row in await client.rows(path, limit=3)]


if __name__ == "__main__":  # handler processes import this module: start the server once
    with tempfile.TemporaryDirectory() as folder:
        big = Path(folder) / "big.csv"
        big.write_text("".join(f"{i},{i * i}\n" for i in range(100_000)))
        with rpc.Server(registry, address=("127.0.0.1", 0), authkey=b"change me", workers=2, log_level="warning") as server:
            with rpc.connect(server.address, authkey=b"change me", timeout=10) as client:
                total = 0
                for row in client.rows(str(big)):  # the server runs a window ahead of this loop
                    total += int(row.split(",")[1])
                print("sum of squares:", total)
                for row in client.rows(str(big)):
                    if row.startswith("7,"):
                        print("found:", row)
                        break  # closes the generator on the server (its file is closed)
            print("aio:", asyncio.run(first_rows(server.address, b"change me", str(big))))
