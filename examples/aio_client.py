"""Call the daemon (`rpc serve --config config/rpc.toml`) from asyncio.

Uses the daemon's defaults: 127.0.0.1:8765 and the key file `rpc serve` made
(rpc.read_authkey()). Another address may be given: python aio_client.py HOST:PORT
"""

import asyncio
import sys

import rpc
import rpc.aio


async def main(address: str) -> None:
    async with rpc.aio.connect(address, authkey=rpc.read_authkey(), timeout=10) as client:
        print("add(2, 3) =", await client.add(2, 3))
        # A thousand calls in flight at once on the one connection, each matched to its answer.
        results = await asyncio.gather(*(client.add(i, 1) for i in range(1000)))
        print("1000 calls in flight, sum of results =", sum(results))
        try:
            await client.call("sleep", 5, timeout=0.5)
        except rpc.CallTimeout as error:
            print("timeout:", error)
        print("fib(20) =", await client.fib(20))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8765"))
