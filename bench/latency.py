"""Sequential call latency of rpc against the raw transport, measured in one run.

The baseline is a ``multiprocessing.connection`` echo between two processes over
the same transport: the client sends a small frame with ``send_bytes`` and waits
for it with ``recv_bytes``. rpc's figure is ``client.add(1, 2)`` on a server with
one handler. Both are medians over rounds; the ratio is what to quote.

    python bench/latency.py [--calls N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Client, Listener

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rpc  # noqa: E402
from services import registry  # noqa: E402  (a module-level registry handlers can import)


def _echo_server(address: object, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    with Listener(address) as listener:
        ready.set()  # type: ignore[attr-defined]
        with listener.accept() as conn:
            _nodelay(conn)
            while True:
                try:
                    conn.send_bytes(conn.recv_bytes(1 << 20))
                except EOFError:
                    return


def _nodelay(conn: object) -> None:
    import socket

    try:
        sock = socket.socket(fileno=conn.fileno())  # type: ignore[attr-defined]
    except OSError:
        return
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


def _per_call(fn: object, calls: int, rounds: int) -> float:
    """Median over rounds of seconds per call."""
    for _ in range(min(calls, 200)):  # warm up
        fn()  # type: ignore[operator]
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def raw_echo(address: object, calls: int, rounds: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_echo_server, args=(address, ready), daemon=True)
    server.start()
    ready.wait(30)
    try:
        with Client(address) as conn:
            _nodelay(conn)
            frame = rpc.protocol.encode_request(1, "add", (1, 2), {}, None)

            def once() -> None:
                conn.send_bytes(frame)
                conn.recv_bytes(1 << 20)

            return _per_call(once, calls, rounds)
    finally:
        server.join(5)
        if server.is_alive():
            server.kill()


def _rpc_server(address: object, authkey: bytes, bound: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    server = rpc.Server(registry, address=address, authkey=authkey, workers=1, log_level="warning")
    with server:
        bound.put(server.address)
        server.serve_forever()


def rpc_call(address: object, calls: int, rounds: int) -> float:
    """rpc's latency, with the server in its own process as it is deployed."""
    ctx = multiprocessing.get_context("spawn")
    bound = ctx.Queue()
    authkey = os.urandom(32)
    server = ctx.Process(target=_rpc_server, args=(address, authkey, bound))
    server.start()
    try:
        with rpc.connect(bound.get(timeout=60), authkey=authkey) as client:
            return _per_call(lambda: client.add(1, 2), calls, rounds)
    finally:
        server.terminate()
        server.join(10)


def measure(calls: int, rounds: int) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        transports = [("tcp", ("127.0.0.1", 0), None), ("unix", os.path.join(tmp, "echo.sock"), os.path.join(tmp, "rpc.sock"))]
        for name, address, rpc_address in transports:
            if name == "tcp":
                # the echo server needs a fixed port: take a free one
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    address = s.getsockname()
                rpc_address = ("127.0.0.1", 0)
            raw = raw_echo(address, calls, rounds)
            ours = rpc_call(rpc_address, calls, rounds)
            rows.append(
                {
                    "transport": name,
                    "raw_echo_us": round(raw * 1e6, 1),
                    "rpc_add_us": round(ours * 1e6, 1),
                    "ratio": round(ours / raw, 2),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median is reported")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    rows = measure(args.calls, args.rounds)
    print(f"{'transport':<10} {'raw echo us':>12} {'rpc add us':>11} {'ratio':>6}")
    for row in rows:
        print(f"{row['transport']:<10} {row['raw_echo_us']:>12} {row['rpc_add_us']:>11} {row['ratio']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "rounds": args.rounds, "cpus": os.cpu_count(), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
