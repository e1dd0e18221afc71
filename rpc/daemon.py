"""Running a server as a daemon: signals in, lifecycle steps out.

Signal handlers only record the signal; the main loop acts on it.
SIGTERM or SIGINT: graceful shutdown (stop accepting, finish calls in flight
within the grace period, stop handlers). A second one: stop at once.
SIGHUP: replace the handlers one at a time with freshly imported code.
SIGPIPE is ignored: a log reader that went away must not kill the server (log
lines that cannot be written are dropped and counted by :mod:`rpc.logs`).
"""

from __future__ import annotations

import queue
import resource
import signal
import threading
from typing import Any

from .logs import Logger, report_dropped
from .server import Server

__all__ = ["serve"]

_POLL_SECONDS = 0.2


# Raised no further than this, where the hard limit is unlimited.
_MAX_OPEN_FILES = 1 << 20


def _raise_open_files_limit(log: Logger) -> None:
    """Each connection holds a descriptor: raise the soft limit to the hard one, and say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("open_files_limit", limit=soft, error=str(exc), note="each connection needs one")
            return
        log.info("open_files_limit_raised", previous=soft, limit=target)


def serve(server: Server, log: Logger) -> int:
    """Start ``server`` and serve until a shutdown signal; returns the process exit code.

    0 after a graceful shutdown, 1 if a second signal cut calls off.
    """
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def record(signum: int, frame: Any) -> None:
        received.put(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    # Python ignores SIGPIPE, but whatever embeds or launches rpc may have restored it.
    previous[signal.SIGPIPE] = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        _raise_open_files_limit(log)
        server.start()
        closer: threading.Thread | None = None
        reloader: threading.Thread | None = None
        forced = False
        while closer is None or closer.is_alive():
            try:
                signum = received.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if closer is None and (reloader is None or not reloader.is_alive()):
                    log.info("signal_received", signal=name, action="reload")
                    reloader = threading.Thread(target=server.reload, name="rpc-reload", daemon=True)
                    reloader.start()
            elif closer is None:
                log.info("signal_received", signal=name, action="shutdown")
                closer = threading.Thread(target=server.close, name="rpc-close")
                closer.start()
            elif not forced:
                log.warning("signal_received", signal=name, action="stop now")
                forced = True
                server.abort()
        return 1 if forced else 0
    finally:
        report_dropped(log)  # if the log stream works again, say how many lines it lost
        for sig, handler in previous.items():
            signal.signal(sig, handler)
