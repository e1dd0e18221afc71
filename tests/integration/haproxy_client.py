"""A client process of the HAProxy test: calls ``work`` in a loop, one JSON line per call.

    python haproxy_client.py NAME ADDRESS FOLDER     (the authkey in RPC_AUTHKEY)

The test runs it in the lab's client namespace. Each line: the call's token, the
daemon that answered (``server``) or the error's type and message, how many times
the client made it again elsewhere (``moves``), and when it began and how long it took (``time.monotonic``, shared by every process of the
machine). It stops when FOLDER/stop exists, or after MAX_SECONDS: it never
outlives a test that died.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import rpc

MAX_SECONDS = 240.0
CALL_TIMEOUT = 90.0  # above the longest hold of a call (haproxy_services.HOLD_SECONDS)


def _made_again(client: rpc.Client | None) -> int:
    """Calls the client made again on another connection because they did not run (a go-away, ServerShuttingDown)."""
    return 0 if client is None else client.calls_made_again


def main() -> None:
    name, address, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    authkey = os.environ["RPC_AUTHKEY"].encode()
    stop, gate = folder / "stop", str(folder / "gate")
    deadline = time.monotonic() + MAX_SECONDS
    client: rpc.Client | None = None
    with open(folder / f"{name}.jsonl", "a", buffering=1) as out:
        n = 0
        while not stop.exists() and time.monotonic() < deadline:
            token = f"{name}.{n}"
            began = time.monotonic()
            record: dict[str, Any] = {"token": token, "began": began}
            moved = _made_again(client)
            try:
                if client is None:
                    client = rpc.connect(address, authkey=authkey, timeout=CALL_TIMEOUT)
                record["server"] = client.work(token, gate)
            except rpc.RPCError as exc:
                record["error"] = type(exc).__name__
                record["message"] = str(exc)
            record["seconds"] = time.monotonic() - began
            record["moves"] = _made_again(client) - moved  # times it was made again elsewhere
            out.write(json.dumps(record) + "\n")
            n += 1
    if client is not None:
        client.close()


if __name__ == "__main__":
    main()
