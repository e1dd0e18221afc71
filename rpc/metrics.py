"""Health and metrics: counters kept on the call path, Prometheus text made only when scraped.

Counting costs a call a few dictionary operations and no lock: :class:`CallCounts`
keeps plain ints in dicts keyed by (method, outcome), and each method's
call-duration histogram as a list of bucket counts found with ``bisect``. What is
not a count (handlers busy, queue depth, connections) is read from the router when
someone asks. Metric families are built only then, by :func:`collect`.

Calls a handler serves on a lent socket (:mod:`rpc.lease`) never pass the router: the
handler posts each (method, failed, seconds) in memory they share
(``rpc.lease.LentCalls``), and the router counts them when it takes them: when the
handler asks (half the ring waits, :func:`tally_message`), when the lease ends, when
/metrics is read, and when the handler dies, so none is lost. Only if the router falls
a whole ring behind does the handler count calls itself, in a :class:`CallCounts` it
sends along (:meth:`CallCounts.export`, :meth:`CallCounts.absorb`).

A server with a ``metrics_address`` answers two HTTP requests there
(:class:`MetricsEndpoint`): ``GET /healthz`` (200 while it takes calls, 503 from the
moment it begins to shut down) and ``GET /metrics`` (Prometheus text, made by
prometheus-client, which only such a server imports). Anything else gets 404.

The endpoint runs on the router's own event loop, not on a thread of its own (as
prometheus-client's ``start_http_server`` would): the router's state is then read by
the thread that changes it, between two of its callbacks, so nothing on the call path
needs a lock or a copy; and ``/healthz`` is answered by the very loop that serves
calls, so a loop that is stuck fails its health check rather than a side thread
reporting it healthy. The price is that formatting a scrape (about a millisecond for
a few dozen methods) runs on that loop, once every scrape interval.

Labels stay bounded whatever clients send: a method is named only if a handler's
registry has it (its handlers say so when they start); any other name counts as
:data:`UNKNOWN`. Outcomes, reasons and the rest are the server's own words.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from .logs import Logger
    from .router import Router

__all__ = [
    "BUCKETS",
    "OUTCOMES",
    "UNKNOWN",
    "CallCounts",
    "MetricsEndpoint",
    "collect",
    "rejection_reason",
    "replacement_reason",
    "tally_message",
]

#: the label of every method name that no handler's registry has
UNKNOWN = "<unknown>"

#: the outcomes of a call, as the access log names them; a call answered is counted under one
OUTCOMES = (
    "ok",  # the function returned
    "error",  # the function raised, or the call failed in the handler (no such method, a result too large)
    "timeout",  # its deadline passed, waiting or running
    "cancelled",  # its caller cancelled it, or went away while it ran
    "crashed",  # its handler process died during it
    "closed",  # a stream closed by its caller before its end
    "busy",  # refused: the queue was full (ServerBusy); it never ran
    "shutting_down",  # refused or failed because the server was shutting down; it never ran
)

#: upper bounds, in seconds, of the call-duration histogram's buckets (Prometheus's "le")
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

class CallCounts:
    """Calls by (method, outcome), call durations by method, and the server's other counts.

    ``known`` method names are counted under their own name, any other under
    :data:`UNKNOWN`.
    """

    __slots__ = ("known", "calls", "durations", "replacements", "rejections")

    def __init__(self, known: Iterable[str] = ()) -> None:
        self.known: set[str] = {protocol.METHODS, *known}
        self.calls: dict[tuple[str, str], int] = {}
        # method -> a count per bucket of BUCKETS, one for "+Inf", then the sum of the seconds
        self.durations: dict[str, list[float]] = {}
        self.replacements: dict[str, int] = {}  # handler processes replaced, by reason
        self.rejections: dict[str, int] = {}  # connections refused before they could call, by reason

    def call(self, method: str, outcome: str, seconds: float | None = None) -> None:
        """One call answered (``seconds`` after it arrived; None: refused, it never ran)."""
        if method not in self.known:
            method = UNKNOWN
        key = (method, outcome)
        calls = self.calls
        calls[key] = calls.get(key, 0) + 1
        if seconds is not None:
            histogram = self.durations.get(method)
            if histogram is None:
                histogram = self.durations[method] = [0.0] * (len(BUCKETS) + 2)
            histogram[bisect_left(BUCKETS, seconds)] += 1
            histogram[-1] += seconds

    def know(self, methods: Iterable[str]) -> None:
        """Method names a handler's registry has: counted under their own names from now on."""
        self.known.update(methods)

    def replaced(self, reason: str) -> None:
        self.replacements[reason] = self.replacements.get(reason, 0) + 1

    def rejected(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    # -- a handler's tally of calls on a lent socket ----------------------------------

    def export(self) -> list[Any]:
        """The call counts as plain data for msgpack, small for a few calls: ``[[[method, outcome, n], ...],
        [[method, seconds, [bucket, n, bucket, n, ...]], ...]]`` (only the buckets counted)."""
        return [
            [[method, outcome, n] for (method, outcome), n in self.calls.items()],
            [
                [method, histogram[-1], [x for i, n in enumerate(histogram[:-1]) if n for x in (i, int(n))]]
                for method, histogram in self.durations.items()
            ],
        ]

    def clear(self) -> None:
        self.calls.clear()
        self.durations.clear()

    def absorb(self, exported: Any) -> None:
        """Add a handler's :meth:`export` to these counts (what is malformed in it is skipped)."""
        if type(exported) is not list or len(exported) != 2:
            return
        calls, durations = exported
        known, mine = self.known, self.calls
        for entry in calls if type(calls) is list else ():
            if type(entry) is list and len(entry) == 3:
                method, outcome, n = entry
                if type(method) is str and outcome in OUTCOMES and type(n) is int and n > 0:
                    key = (method if method in known else UNKNOWN, outcome)
                    mine[key] = mine.get(key, 0) + n
        buckets = len(BUCKETS) + 1
        for entry in durations if type(durations) is list else ():
            if type(entry) is not list or len(entry) != 3:
                continue
            method, seconds, counted = entry
            if type(method) is not str or type(seconds) not in (int, float) or not seconds >= 0 or type(counted) is not list:
                continue
            histogram = self.durations.get(method if method in known else UNKNOWN)
            if histogram is None:
                histogram = self.durations[method if method in known else UNKNOWN] = [0.0] * (buckets + 1)
            for i in range(0, len(counted) - 1, 2):
                index, n = counted[i], counted[i + 1]
                if type(index) is int and 0 <= index < buckets and type(n) is int and n > 0:
                    histogram[index] += n
            histogram[-1] += seconds


def tally_message(counts: CallCounts) -> bytes:
    """A handler to its router, while it serves a lent socket: take the calls posted to my
    rpc.lease.LentCalls; and here are those I counted myself while it was full (or None)."""
    return protocol.encode_internal(protocol.LEASE_TALLY, counts.export() if counts.calls else None)


def read_tally(message: bytes | bytearray | memoryview) -> Any:
    """What a :func:`tally_message` carries: a :meth:`CallCounts.export`, or None."""
    return protocol.decode_value(message)[1]


# -- reasons, in a few words each ------------------------------------------------------

# Phrases of the reasons the router gives when it stops a handler (rpc.router), and their label.
_KILLED = (
    ("passed its deadline", "timeout"),
    ("was cancelled", "cancelled"),
    ("malformed reply", "malformed_reply"),
    ("lent socket could not", "lease_failed"),
)


def replacement_reason(kill_reason: str | None, reason: str) -> str:
    """Why a handler was replaced, as a label: "reload", "crashed" (it died by itself), or what the
    router stopped it for ("timeout", "cancelled", "malformed_reply", "lease_failed", else "stopped")."""
    if kill_reason is None:
        return "reload" if reason == "reload" else "crashed"
    for phrase, label in _KILLED:
        if phrase in kill_reason:
            return label
    return "stopped"


# Phrases of the reasons a connection is refused before it may call (rpc.router, rpc.handshake).
_REJECTED = (
    ("timed out", "timeout"),
    ("handshake message of", "too_large"),
    ("digest", "authentication"),
    ("challenge", "authentication"),
    ("authkey", "authentication"),
    ("protocol version", "protocol_version"),
    ("hello", "bad_hello"),
    ("shutting down", "shutting_down"),
    ("certificate", "tls"),
    ("ssl", "tls"),
    ("tls", "tls"),
)


def rejection_reason(reason: str) -> str:
    """A rejected connection's reason as a label ("authentication", "timeout", ..., else "other")."""
    text = reason.lower()
    for phrase, label in _REJECTED:
        if phrase in text:
            return label
    return "other"


# -- the Prometheus side: only a server with a metrics_address gets here ---------------


def collect(router: Router, draining: bool) -> Iterator[Metric]:
    """The router's figures as Prometheus metric families, read now (on the router's loop)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    router.take_lent_calls()
    counts = router.counts
    calls = CounterMetricFamily("rpc_calls", "Calls answered, by method and outcome.", labels=["method", "outcome"])
    for (method, outcome), n in sorted(counts.calls.items()):
        calls.add_metric([method, outcome], n)
    yield calls
    durations = HistogramMetricFamily(
        "rpc_call_duration_seconds",
        "Seconds from a call's arrival to its answer (refused calls are not included), by method.",
        labels=["method"],
    )
    for method, histogram in sorted(counts.durations.items()):
        buckets: list[tuple[str, float]] = []
        running = 0.0
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), histogram):
            running += count
            buckets.append((bound, running))
        durations.add_metric([method], buckets, sum_value=histogram[-1])
    yield durations
    table = router.table
    for name, text, value in (
        ("rpc_handlers", "Handler processes the server runs (its workers).", router.config.workers),
        ("rpc_handlers_busy", "Handlers running a call or serving a lent connection.", table.busy()),
        ("rpc_handlers_lent", "Handlers serving a connection lent to them (the latency fast path).", len(router.lent)),
        ("rpc_queue_calls", "Calls waiting for a free handler.", len(table.queue)),
        ("rpc_queue_bytes", "Bytes of the calls waiting for a free handler.", table.queue_bytes),
        ("rpc_connections", "Client connections open, including those still in their handshake.", len(router.connections)),
        ("rpc_draining", "1 once the server has begun to shut down (/healthz answers 503), else 0.", int(draining)),
    ):
        yield GaugeMetricFamily(name, text, value=value)
    for name, text, label, values in (
        ("rpc_handler_replacements", "Handler processes replaced, by reason.", "reason", counts.replacements),
        ("rpc_rejected_handshakes", "Connections refused before their first call, by reason.", "reason", counts.rejections),
    ):
        family = CounterMetricFamily(name, text, labels=[label])
        for reason, n in sorted(values.items()):
            family.add_metric([reason], n)
        yield family


class _RouterCollector:
    """prometheus-client's side of :func:`collect` (a collector without describe(): read at scrape only)."""

    def __init__(self, router: Router, draining: Callable[[], bool]) -> None:
        self._router = router
        self._draining = draining

    def collect(self) -> Iterator[Metric]:
        return collect(self._router, self._draining())


# -- the HTTP endpoint -------------------------------------------------------------------

_REQUEST_SECONDS = 5.0  # a request must arrive, and its answer be taken, within this long
_MAX_CONNECTIONS = 16  # open at once; a new one past that cuts off the oldest (scrapers need few)
_MAX_HEADER_LINES = 100
_LINE_LIMIT = 8192


class MetricsEndpoint:
    """``/healthz`` and ``/metrics`` over HTTP/1.1, one request per connection, on the router's loop.

    ``draining`` says whether the server has begun to shut down.
    """

    def __init__(self, router: Router, draining: Callable[[], bool], log: Logger) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self._draining = draining
        self._log = log
        # A registry of its own (not prometheus-client's global one): several servers may run in one process.
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RouterCollector(router, draining))  # (collect() is all it needs)
        ProcessCollector(registry=self.registry)  # the supervisor's CPU, memory and descriptors
        self._server: asyncio.AbstractServer | None = None
        self._open: dict[asyncio.StreamWriter, None] = {}  # (a dict keeps them oldest first)

    async def start(self, sock: Any) -> None:
        """Answer requests on the listening socket ``sock``."""
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=_LINE_LIMIT)

    async def close(self) -> None:
        """Stop answering; cut off any request still under way."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= _MAX_CONNECTIONS:
            # A request takes milliseconds: the oldest has had its chance. (Refusing the new one
            # instead would let a peer that opens connections and sends nothing starve health checks.)
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        self._open[writer] = None
        try:
            try:
                method, path, accept = await asyncio.wait_for(_read_request(reader), _REQUEST_SECONDS)
            except (asyncio.TimeoutError, ValueError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # not an HTTP request we can read: close without a word
            status, content_type, body = self._answer(method, path, accept)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + (body if method != "HEAD" else b""))
            await asyncio.wait_for(writer.drain(), _REQUEST_SECONDS)
        except (asyncio.TimeoutError, OSError):
            pass
        except Exception:
            self._log.exception("metrics_request_failed")
        finally:
            self._open.pop(writer, None)
            writer.close()

    def _answer(self, method: str, path: str, accept: str) -> tuple[str, str, bytes]:
        """Status line, content type and body for a request."""
        plain = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "404 Not Found", plain, b"not found: only GET /healthz and GET /metrics are served\n"
        if path == "/healthz":
            if self._draining():
                return "503 Service Unavailable", plain, b"draining\n"
            return "200 OK", plain, b"ok\n"
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, content_type = choose_encoder(accept)
            started = time.perf_counter()
            body = encoder(self.registry)
            self._log.debug("metrics_scraped", bytes=len(body), ms=round((time.perf_counter() - started) * 1000, 3))
            return "200 OK", content_type, body
        return "404 Not Found", plain, b"not found: only GET /healthz and GET /metrics are served\n"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, str]:
    """The method, the path (without its query) and the Accept header of one HTTP request."""
    line = await reader.readline()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    method, target = parts[0], parts[1]
    accept = ""
    for _ in range(_MAX_HEADER_LINES):
        header = await reader.readline()
        if header in (b"\r\n", b"\n"):
            return method, target.partition("?")[0], accept
        if not header:
            raise ValueError("the request ended in its headers")
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    raise ValueError("too many header lines")
