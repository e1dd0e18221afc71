"""One client connection to a server under test: ``connect(kind, ...)`` and then ``call()``.

The same code serves the bench process (sequential latency) and the client
processes of the throughput runs, so every system is called the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from multiprocessing.connection import Client as RawClient
from typing import Any

import msgpack  # type: ignore[import-untyped]

import rpc
from rpc import protocol

from .servers import AUTHKEY, CalcManager, nodelay


class Caller:
    """A connection; ``call()`` makes one call of the method chosen at connect time."""

    def __init__(self, call: Callable[[], Any], close: Callable[[], None]) -> None:
        self.call = call
        self.close = close


def connect(kind: str, address: Any, method: str = "add", args: tuple[Any, ...] = (1, 2), tls: Any = None) -> Caller:
    """Connect to a server of ``kind`` ("rpc", "raw", "msgpack" or "managers") at ``address``.

    "raw" is the echo server: it sends back the bytes of the rpc request frame the
    call would send, so it moves as many bytes as rpc does. ``tls``: rpc's ``tls=``.
    """
    if kind == "rpc":
        client = rpc.connect(address, authkey=AUTHKEY, tls=tls)
        fn = getattr(client, method)  # as users write it: client.add(1, 2)
        return Caller(lambda: fn(*args), client.close)
    if kind == "managers":
        manager = CalcManager(address=address, authkey=AUTHKEY)
        manager.connect()
        proxy = getattr(manager.Calc(), method)  # type: ignore[attr-defined]
        return Caller(lambda: proxy(*args), lambda: None)  # the proxy's connection closes with it
    conn = RawClient(address, authkey=AUTHKEY)
    nodelay(conn)
    if kind == "raw":
        frame = protocol.encode_request(1, method, args, {}, None)

        def echo() -> bytes:
            conn.send_bytes(frame)
            return conn.recv_bytes()

        return Caller(echo, conn.close)
    if kind == "msgpack":
        ids = itertools.count(1)
        arguments = list(args)

        def call() -> Any:
            conn.send_bytes(msgpack.packb([0, next(ids), method, arguments, {}, None]))
            reply = msgpack.unpackb(conn.recv_bytes())
            if reply[2] is not None:
                raise RuntimeError(f"the msgpack server answered an error: {reply[2]}")
            return reply[3]

        return Caller(call, conn.close)
    conn.close()
    raise ValueError(f"unknown kind of server: {kind!r}")
