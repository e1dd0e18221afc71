"""Call a CPU-bound function from several threads at once, with 1 handler and with N.

Each handler is a process, so calls on different handlers run on different cores.
Prints the wall time of each run and the speed-up that more handlers give.

    python run.py [--calls 16] [--size 2000000] [--workers N]
"""

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from rpc.testing import serve
from work import registry


def timed_run(workers: int, calls: int, size: int) -> float:
    with serve(registry, workers=workers, log_level="warning") as server:
        with server.client() as client:  # one client, shared by all threads: calls are pipelined
            client.crunch(1000)  # warm up
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=workers * 2) as pool:
                results = list(pool.map(lambda _: client.crunch(size), range(calls)))
            elapsed = time.perf_counter() - started
    assert len(set(results)) == 1
    return elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--size", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    one = timed_run(1, args.calls, args.size)
    many = timed_run(args.workers, args.calls, args.size)
    print(f"{args.calls} calls with 1 handler:  {one:.2f} s")
    print(f"{args.calls} calls with {args.workers} handlers: {many:.2f} s")
    print(f"speed-up: {one / many:.2f}x (the ideal is {args.workers}.0x on {os.cpu_count()} CPUs)")
