"""rpc.logs: the logger never raises, and says what it lost."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings

import pytest

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


def test_printed_text_becomes_one_event_per_complete_line(monkeypatch):
    stream = io.StringIO()
    log = make_logger(fmt="json", stream=stream)
    router = OutputRouter(log, log)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    router.install_streams()
    router.method = "f"
    print("one", "two", end="", flush=True)  # an unfinished line waits for its end
    print(" three\nfour")
    print("x" * (MAX_LINE_CHARS + 10), end="", file=sys.stderr)  # too long: cut
    sys.stderr.write("tail")
    router.method = None
    router.close()  # what is left is emitted
    events = _events(stream.getvalue())
    assert [(e["stream"], e["line"][:10], len(e["line"])) for e in events] == [
        ("stdout", "one two th", 13),
        ("stdout", "four", 4),
        ("stderr", "x" * 10, MAX_LINE_CHARS + 10),
        ("stderr", "tail", 4),
    ]
    assert [e["method"] for e in events] == ["f", "f", "f", None]
