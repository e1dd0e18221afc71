"""rpc.logs: the logger never raises, and says what it lost."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import warnings

import pytest

from helpers import wait_for
from rpc.handler_output import MAX_LINE_CHARS, OutputRouter
from rpc.logs import dropped_lines, make_logger, open_log_file, report_dropped
from rpc.testing import serve


class _Flaky(io.StringIO):
    """A stream that fails like a pipe whose reader left, until ``broken`` is cleared."""

    broken = False

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_pipe_without_reader_drops_and_counts_lines_instead_of_raising():
    read, write = os.pipe()
    os.close(read)
    # built like sys.stderr: text written through to the file descriptor
    with io.TextIOWrapper(os.fdopen(write, "wb", buffering=0), encoding="utf-8", write_through=True) as stream:
        log = make_logger(fmt="json", stream=stream)
        log.info("first")
        log.error("second", detail="x")
        assert dropped_lines(log) == 2
        report_dropped(log)  # nowhere to say it: dropped too, and not raised
        assert dropped_lines(log) == 2  # a failed report is not one more lost line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_drops_lines_and_the_log_file_still_closes():
    stream = open_log_file("/dev/full")  # every write fails with ENOSPC
    log = make_logger(fmt="json", stream=stream)
    log.info("lost")
    assert dropped_lines(log) == 1
    stream.close()  # no failed line is left behind to fail again
    log.info("after close")
    assert dropped_lines(log) == 2


def test_a_closed_stream_drops_and_counts_lines():
    stream = io.StringIO()
    log = make_logger(fmt="console", stream=stream)
    stream.close()
    log.warning("after close")
    assert dropped_lines(log) == 1


def test_when_the_stream_works_again_the_first_line_is_followed_by_the_count():
    stream = _Flaky()
    log = make_logger(fmt="json", stream=stream, component="t")
    log.info("kept")
    stream.broken = True
    log.info("lost")
    log.info("lost")
    stream.broken = False
    log.info("back")
    log.info("after")
    events = _events(stream.getvalue())
    assert [e["event"] for e in events] == ["kept", "back", "log_lines_dropped", "after"]
    report = events[2]
    assert report["count"] == 2 and report["level"] == "warning" and "BrokenPipeError" in report["error"]
    report_dropped(log)  # already reported: nothing more
    assert len(_events(stream.getvalue())) == 4


def test_report_dropped_at_shutdown_when_nothing_else_was_written():
    stream = _Flaky()
    log = make_logger(fmt="json", stream=stream)
    stream.broken = True
    log.info("lost")
    stream.broken = False
    report_dropped(log)
    (event,) = _events(stream.getvalue())
    assert (event["event"], event["count"]) == ("log_lines_dropped", 1)


def test_loggers_on_one_stream_share_the_count():
    stream = _Flaky()
    a = make_logger(fmt="json", stream=stream, component="a")
    b = make_logger(fmt="json", stream=stream, component="b")
    stream.broken = True
    a.info("lost")
    b.info("lost")
    assert dropped_lines(a) == dropped_lines(b) == 2


def test_report_dropped_refuses_a_foreign_logger():
    with pytest.raises(TypeError):
        report_dropped(object())


# -- a handler's own output -------------------------------------------------------------


def test_json_logs_hold_what_functions_print_log_and_warn_one_event_per_line():
    with serve("services:registry", workers=1, log_format="json") as server:
        with server.client() as client:  # a connection's first call goes through the server
            assert client.chatter("first") == "done"
            handler = client.pid()
            assert client.chatter("lent") == "done"  # later ones to a handler that holds the socket
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    ours = [e for e in events if e.get("pid") == handler and e.get("method") == "chatter"]

    def find(**fields):
        found = [e for e in ours if all(e.get(k) == v for k, v in fields.items())]
        assert len(found) == 1, f"{fields} in {ours}"
        return found[0]

    for text in ("first", "lent"):
        find(event="handler_output", stream="stderr", line=f"to stderr: {text}", level="warning")
        find(event="handler_output", stream="stdout", line=f"to stdout: {text}", level="info")
        find(event=f"myapp says {text}", logger="myapp", level="warning")
        warning = find(event="python_warning", category="UserWarning", message=f"careful: {text}")
        assert warning["file"].endswith("services.py")
    assert len([e for e in ours if e.get("line") == "second line"]) == 2


# -- a handler's own output: the router in this process -----------------------------------


class _Interrupted(io.StringIO):
    """A stream that runs ``interrupt`` once, halfway through a write, as a signal handler would."""

    interrupt = None

    def write(self, text: str) -> int:
        interrupt, self.interrupt = self.interrupt, None
        written = super().write(text[: len(text) // 2])
        if interrupt is not None:
            interrupt()
        return written + super().write(text[len(text) // 2 :])


def _in_thread(scenario, timeout: float = 30.0) -> None:
    """Run ``scenario`` on a thread of its own, failing (not hanging) if it deadlocks."""
    failure = []

    def run():
        try:
            scenario()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "deadlocked"
    assert failure == []


def _routed(monkeypatch) -> tuple[OutputRouter, io.StringIO]:
    """An output router installed on this thread (restored after the test); its log stream.

    Called in the test itself: pytest sets its own sys.stdout between a fixture and the test.
    """
    stream = io.StringIO()
    log = make_logger(fmt="json", stream=stream)
    router = OutputRouter(log, log)
    _keep_streams(monkeypatch)
    router.install_streams()
    router.install_logging()
    return router, stream


def _keep_streams(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logging.root, "handlers", [])


def test_printed_text_becomes_one_event_per_complete_line(monkeypatch):
    router, stream = _routed(monkeypatch)
    router.method = "f"
    print("one", "two", end="", flush=True)  # an unfinished line waits for its end
    print(" three\nfour")
    sys.stderr.write("tail")
    router.method = None
    router.close()  # what is left is emitted
    events = _events(stream.getvalue())
    assert [(e["stream"], e["line"], e["method"]) for e in events] == [
        ("stdout", "one two three", "f"),
        ("stdout", "four", "f"),
        ("stderr", "tail", None),
    ]


def test_an_unfinished_line_is_logged_when_the_call_ends_with_its_method(monkeypatch):
    router, stream = _routed(monkeypatch)
    router.note_method("f")
    print("no newline", end="")
    router.end_call()
    assert router.method is None
    (event,) = _events(stream.getvalue())
    assert (event["line"], event["method"]) == ("no newline", "f")


def test_a_log_line_written_from_a_signal_handler_mid_line_follows_that_line_whole():
    stream = _Interrupted()
    log = make_logger(fmt="json", stream=stream)
    stream.interrupt = lambda: log.warning("from the signal handler")
    _in_thread(lambda: log.info("interrupted"))
    assert [e["event"] for e in _events(stream.getvalue())] == ["interrupted", "from the signal handler"]


def test_printing_from_a_signal_handler_mid_print_neither_deadlocks_nor_splits_a_line(monkeypatch):
    stream = _Interrupted()
    log = make_logger(fmt="json", stream=stream)
    _keep_streams(monkeypatch)

    def scenario():  # the router's own thread is the one that runs calls, and gets the signals
        router = OutputRouter(log, log)
        router.install_streams()
        router.install_logging()
        stream.interrupt = lambda: (print("tick"), logging.getLogger("alarm").warning("tock"))
        print("work 1")
        print("work 2")
        router.close()

    _in_thread(scenario)
    events = _events(stream.getvalue())
    # Each waits for the line being written: "tock" for the log line, "tick" for the printed one.
    assert [e.get("line", e["event"]) for e in events] == ["work 1", "tock", "tick", "work 2"]


def test_a_long_line_is_cut_to_the_cap_with_a_marker_saying_how_much(monkeypatch):
    router, stream = _routed(monkeypatch)
    print("x" * (MAX_LINE_CHARS * 3))
    sys.stderr.write("y" * (MAX_LINE_CHARS + 5))  # unfinished and over the cap already
    for _ in range(1000):
        sys.stderr.write("y" * 100)
    sys.stderr.write("\nshort\n")
    sys.stderr.write("z" * (MAX_LINE_CHARS * 2))  # never finished: cut too, when the call ends
    router.close()
    events = _events(stream.getvalue())
    assert [e["line"][:1] for e in events] == ["x", "y", "s", "z"]
    assert all(len(e["line"]) <= MAX_LINE_CHARS for e in events)
    assert events[2]["line"] == "short"
    for event, written in zip((events[0], events[1], events[3]), (MAX_LINE_CHARS * 3, MAX_LINE_CHARS + 5 + 100_000, MAX_LINE_CHARS * 2)):
        line = event["line"]
        kept = len(line) - len(line.lstrip(line[0]))
        assert line[kept:] == f"... [{written - kept} characters cut]"


def test_any_long_text_in_a_log_event_is_cut():
    from rpc.logs import MAX_FIELD_CHARS

    stream = io.StringIO()
    log = make_logger(fmt="json", stream=stream)
    log.warning("e" * (MAX_FIELD_CHARS + 1), detail="d" * (MAX_FIELD_CHARS * 4), small="s")
    (event,) = _events(stream.getvalue())
    assert len(event["event"]) <= MAX_FIELD_CHARS and event["event"].endswith(" characters cut]")
    assert len(event["detail"]) <= MAX_FIELD_CHARS and event["detail"].startswith("ddd")
    assert event["small"] == "s"


def test_tiny_writes_are_only_buffered_until_their_line_ends(monkeypatch):
    """A write without a newline emits nothing (no lock, no event): 50,000 of them make one event."""
    router, stream = _routed(monkeypatch)
    before = len(stream.getvalue())
    for _ in range(50_000):
        sys.stderr.write("y")
    assert len(stream.getvalue()) == before
    sys.stderr.write("\n")
    emitted = stream.getvalue()[before:].splitlines()
    assert [json.loads(line)["line"] for line in emitted] == ["y" * 50_000]


def test_output_of_threads_a_function_started_names_the_thread_not_the_method(monkeypatch):
    router, stream = _routed(monkeypatch)
    router.note_method("f")

    def speak():
        print("from a thread")
        logging.getLogger("app").warning("logged from a thread")
        warnings.warn("warned from a thread", stacklevel=1)

    thread = threading.Thread(target=speak, name="worker")
    thread.start()
    thread.join()
    print("from the call")
    router.end_call()
    events = _events(stream.getvalue())
    labels = [(e.get("line") or e.get("message") or e["event"], e["method"], e.get("thread")) for e in events]
    assert labels == [
        ("from a thread", None, "worker"),
        ("logged from a thread", None, "worker"),
        ("warned from a thread", None, "worker"),
        ("from the call", "f", None),
    ]


def test_bytes_written_to_the_buffer_of_stdout_become_text(monkeypatch):
    router, stream = _routed(monkeypatch)
    sys.stdout.buffer.write(b"caf\xc3")  # a character split across two writes
    assert sys.stdout.buffer.write(b"\xa9 \xff!\n") == 5  # and one that is not UTF-8
    sys.stdout.buffer.flush()
    router.close()
    (event,) = _events(stream.getvalue())
    assert event["line"] == "café \ufffd!"


# -- a handler's own output: real handlers --------------------------------------------------


def test_printing_and_logging_from_a_signal_handler_does_not_deadlock_the_handler():
    signals = 10
    with serve("output_services:registry", workers=1, log_format="json") as server:
        with server.client(timeout=60) as client:  # a deadlocked handler fails the call at its deadline
            client.print_in_signal_handler(signals)
            assert client.print_in_signal_handler(signals) > 0  # a lent socket: the same again
    events = _events(server.log_text())  # every line is one JSON object
    ticks = sum(e["line"].count("tick") for e in events if e["event"] == "handler_output")
    tocks = [e for e in events if e["event"].startswith("tock")]
    assert (ticks, len(tocks)) == (2 * signals, 2 * signals)


def test_a_real_handler_logs_bytes_thread_output_and_long_lines_as_bounded_events():
    with serve("output_services:registry", workers=1, log_format="json") as server:
        with server.client() as client:
            assert client.print_bytes(b"raw \xe2\x82\xac\n") == "ok"
            assert client.print_from_thread("worker-1", "from a thread") == "ok"
            client.print_long(4 * MAX_LINE_CHARS)
            client.print_long(2 * MAX_LINE_CHARS, False)  # logged when the call ends
            client.print_bytes(b"after")
    events = [e for e in _events(server.log_text()) if e["event"] == "handler_output"]
    assert [(e["line"][:5], e["method"], e.get("thread")) for e in events] == [
        ("raw €", "print_bytes", None),
        ("from ", None, "worker-1"),
        ("xxxxx", "print_long", None),
        ("xxxxx", "print_long", None),
        ("after", "print_bytes", None),
    ]
    assert all(len(e["line"]) <= MAX_LINE_CHARS for e in events)


# -- a repeated warning -----------------------------------------------------------------------


def test_a_throttled_warning_logs_the_first_then_counts_until_the_interval_has_passed():
    from rpc.logs import Throttle

    stream = io.StringIO()
    log = make_logger(fmt="json", stream=stream)
    throttle = Throttle("thing_dropped", interval=3600)  # no timer fires during the test
    for i in range(1000):
        throttle(log, item=i)
    (first,) = _events(stream.getvalue())
    assert (first["event"], first["count"], first["item"], first["level"]) == ("thing_dropped", 1, 0, "warning")
    throttle.flush()  # as a server does when it stops
    throttle.flush()  # nothing more to say
    summary = _events(stream.getvalue())[1:]
    assert [(e["count"], e["item"]) for e in summary] == [(999, 999)]


def test_a_burst_that_stops_is_still_summed_up_after_the_interval():
    from rpc.logs import Throttle

    stream = io.StringIO()
    log = make_logger(fmt="json", stream=stream)
    throttle = Throttle("thing_dropped", interval=0.05)
    for i in range(1000):
        throttle(log, item=i)
    # Nothing more happens, yet the count arrives (a timer logs it).
    assert wait_for(lambda: sum(e["count"] for e in _events(stream.getvalue())) == 1000, timeout=30)
    assert _events(stream.getvalue())[-1]["item"] == 999
