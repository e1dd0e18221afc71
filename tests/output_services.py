"""Functions that print in awkward ways, served by the logging tests (handler processes import this)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import rpc

registry = rpc.Registry()


@registry.expose
def print_in_signal_handler(signals: int) -> int:
    """Print and log from a SIGALRM handler while the function itself prints (a timeout-warning pattern).

    Returns how many lines the function printed before ``signals`` handlers had run.
    """
    ran = []

    def on_alarm(signum: int, frame: object) -> None:
        ran.append(signum)
        if len(ran) > signals:
            return
        print("tick", len(ran))
        logging.getLogger("alarm").warning("tock %d", len(ran))

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    printed = 0
    try:
        # Bounded, so a handler whose signals never arrive still returns (and the test says so).
        while len(ran) < signals and printed < 10_000_000:
            print("work", printed)
            printed += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return printed


@registry.expose
def print_long(chars: int, newline: bool = True) -> int:
    """Write one line of ``chars`` characters (left unfinished without ``newline``)."""
    sys.stdout.write("x" * chars + ("\n" if newline else ""))
    return chars


@registry.expose
def print_bytes(data: bytes) -> str:
    """Write bytes the way code made for a real stdout does."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return "ok"


@registry.expose
def print_from_thread(name: str, text: str) -> str:
    """Print ``text`` from a thread called ``name``, and return once it has."""
    thread = threading.Thread(target=print, args=(text,), name=name)
    thread.start()
    thread.join()
    return "ok"
