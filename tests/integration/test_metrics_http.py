"""/healthz and /metrics of a real server, read over real HTTP; `rpc stats` against it."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import rpc
import services
from helpers import Gate, log_has, wait_for
from rpc import cli, lease

METRICS = ("127.0.0.1", 0)


def _url(server, path: str) -> str:
    host, port = server.server.metrics_address
    return f"http://{host}:{port}{path}"


def _get(server, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(_url(server, path), method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = _get(server, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _calls(server) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["method"], dict(labels)["outcome"]): value
        for (name, labels), value in _samples(server).items()
        if name == "rpc_calls_total"
    }


def _by_reason(server, name: str) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (sample, labels), value in _samples(server).items() if sample == name}


def _gauge(server, name: str) -> float:
    return _samples(server)[(name, ())]


def test_healthz_answers_ok_and_anything_else_is_not_found(rpc_server):
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS)
    assert _get(server, "/healthz") == (200, "ok\n")
    assert _get(server, "/healthz", "HEAD") == (200, "")
    assert _get(server, "/metrics?x=1")[0] == 200
    for path, method in [("/", "GET"), ("/metrics/x", "GET"), ("/healthz", "POST"), ("/metrics", "DELETE")]:
        assert _get(server, path, method)[0] == 404, (path, method)
    assert "metrics_listening" in server.log_text() and "private network" in server.log_text()


def test_connections_that_send_nothing_cannot_keep_health_checks_out(rpc_server):
    server = rpc_server("services:registry", workers=1, metrics_address=METRICS)
    silent = [socket.create_connection(server.server.metrics_address, timeout=30) for _ in range(40)]
    try:
        assert _get(server, "/healthz") == (200, "ok\n")
        try:
            assert silent[0].recv(1) == b""  # the oldest were cut off to make room
        except ConnectionResetError:
            pass  # (cut off with a reset)
    finally:
        for sock in silent:
            sock.close()


def test_the_metrics_are_prometheus_text_with_rpcs_families(rpc_server):
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS)
    with urllib.request.urlopen(_url(server, "/metrics"), timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "rpc_calls", "rpc_call_duration_seconds", "rpc_handlers", "rpc_handlers_busy", "rpc_handlers_lent",
        "rpc_queue_calls", "rpc_queue_bytes", "rpc_connections", "rpc_handler_replacements",
        "rpc_rejected_handshakes", "rpc_draining", "process_cpu_seconds",
    } <= names
    assert _gauge(server, "rpc_handlers") == 2


def test_calls_are_counted_by_method_and_outcome(rpc_server):
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, lease=False)
    with server.client(timeout=30) as client:
        assert [client.add(i, 1) for i in range(3)] == [1, 2, 3]
        with pytest.raises(ValueError):
            client.fail("ValueError")
        for name in ("no_such_method", "another_one", "_private"):
            with pytest.raises(rpc.MethodNotFound):
                client.call(name)
        with pytest.raises(rpc.CallTimeout):
            client.call("sleep", 30, timeout=0.3)
        # The client gave up at the deadline; the server stops the call within moments (until
        # then it still runs, and this client leaving would cancel it instead).
        assert wait_for(lambda: _by_reason(server, "rpc_handler_replacements_total") == {"timeout": 1})
        with pytest.raises(rpc.WorkerCrashed):
            client.crash("kill")
        assert _gauge(server, "rpc_connections") == 1
    expected = {
        ("add", "ok"): 3,
        ("fail", "error"): 1,
        ("<unknown>", "error"): 3,  # names no registry has share one label
        ("sleep", "timeout"): 1,
        ("crash", "crashed"): 1,
    }
    assert wait_for(lambda: _calls(server) == expected), _calls(server)
    assert wait_for(lambda: _by_reason(server, "rpc_handler_replacements_total") == {"crashed": 1, "timeout": 1})
    samples = _samples(server)
    assert samples[("rpc_call_duration_seconds_count", (("method", "add"),))] == 3
    assert samples[("rpc_call_duration_seconds_bucket", (("le", "+Inf"), ("method", "sleep")))] == 1


def test_refused_calls_are_counted_as_busy(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1, max_pending=0, metrics_address=METRICS)
    gate = Gate(tmp_path)
    with server.client(timeout=30) as holder, server.client(timeout=30) as other:
        held = threading.Thread(target=holder.hold, args=gate.args())
        held.start()
        gate.wait_started()
        assert _gauge(server, "rpc_handlers_busy") == 1
        with pytest.raises(rpc.ServerBusy):
            other.add(1, 2)
        with pytest.raises(rpc.ServerBusy):
            other.call("not_registered_either")
        gate.open()
        held.join(30)
    assert wait_for(lambda: _calls(server) == {("add", "busy"): 1, ("<unknown>", "busy"): 1, ("hold", "ok"): 1})
    samples = _samples(server)
    assert ("rpc_call_duration_seconds_count", (("method", "add"),)) not in samples  # it never ran: not timed


def test_queue_depth_in_calls_and_bytes(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=1, metrics_address=METRICS)
    gate = Gate(tmp_path)
    with server.client(timeout=30) as holder, server.client(timeout=30) as waiter:
        held = threading.Thread(target=holder.hold, args=gate.args())
        held.start()
        gate.wait_started()
        future = waiter.submit("echo", "x" * 1000)
        assert wait_for(lambda: _gauge(server, "rpc_queue_calls") == 1)
        assert _gauge(server, "rpc_queue_bytes") > 1000
        gate.open()
        assert future.result(30) == "x" * 1000
        held.join(30)
    assert _gauge(server, "rpc_queue_calls") == 0 and _gauge(server, "rpc_queue_bytes") == 0


def test_a_handshake_with_a_wrong_key_is_counted_as_rejected(rpc_server):
    server = rpc_server("services:registry", workers=1, metrics_address=METRICS, transport="tcp")
    with pytest.raises(rpc.AuthenticationError):
        rpc.connect(server.address, authkey=b"not the key" * 4, timeout=30)
    assert wait_for(lambda: _by_reason(server, "rpc_rejected_handshakes_total") == {"authentication": 1})


def test_a_handshake_that_never_comes_is_counted_as_timed_out(rpc_server):
    server = rpc_server("services:registry", workers=1, metrics_address=METRICS, handshake_timeout=0.2)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(server.address)
        assert wait_for(lambda: _by_reason(server, "rpc_rejected_handshakes_total") == {"timeout": 1}, timeout=30)


def test_calls_served_on_a_lent_socket_are_counted(rpc_server):
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, access_log=True)
    with server.client(timeout=30) as client:
        assert [client.add(i, 1) for i in range(50)] == [i + 1 for i in range(50)]
        with pytest.raises(KeyError):
            client.fail("KeyError")
        with pytest.raises(rpc.MethodNotFound):
            client.call("nothing_by_this_name")
    assert "leased=True" in server.log_text()  # the handler served some of them itself
    expected = {("add", "ok"): 50, ("fail", "error"): 1, ("<unknown>", "error"): 1}
    # Counted once their lease ends (the client closed), or a scrape after a tally.
    assert wait_for(lambda: _calls(server) == expected), _calls(server)
    assert _samples(server)[("rpc_call_duration_seconds_count", (("method", "add"),))] == 50


def test_lent_calls_are_counted_even_when_their_handler_dies(rpc_server, tmp_path, monkeypatch):
    """Past a request to take them (half a ring), then killed: the rest are taken from shared memory."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    monkeypatch.setenv(services.LEASE_HOOKS, str(hooks))  # each call run on a lent socket leaves a file
    monkeypatch.setenv(services.LEASE_STAYS, "1")  # and the lease lasts, however slow this test runs
    # spawn: handlers start from this process's environment
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, start_method="spawn")
    calls = lease.LentCalls.RING // 2 + 300
    with server.client(timeout=30) as client:
        assert [client.add(i, 1) for i in range(calls)] == [i + 1 for i in range(calls)]
        with pytest.raises(rpc.WorkerCrashed):
            client.crash("kill")
    assert len(list(hooks.glob("lent-*"))) == calls  # all but the first call, and the crash, ran lent
    expected = {("add", "ok"): calls, ("crash", "crashed"): 1}
    assert wait_for(lambda: _calls(server) == expected), _calls(server)
    assert _samples(server)[("rpc_call_duration_seconds_count", (("method", "add"),))] == calls
    assert wait_for(lambda: _by_reason(server, "rpc_handler_replacements_total") == {"crashed": 1})


def test_the_calls_of_a_lease_still_under_way_are_counted_when_scraped(rpc_server, monkeypatch):
    monkeypatch.setenv(services.LEASE_STAYS, "1")
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, start_method="spawn")
    with server.client(timeout=30) as client:
        for i in range(lease.LentCalls.RING * 2 + 10):  # the ring goes round twice
            client.add(i, 1)
        # (the handler posts a call just after sending its answer: the last may come a moment later)
        assert wait_for(lambda: _calls(server) == {("add", "ok"): lease.LentCalls.RING * 2 + 10}), _calls(server)
        assert _gauge(server, "rpc_handlers_lent") == 1  # the lease is still under way


def test_a_handler_counts_calls_itself_while_the_router_is_a_whole_ring_behind(rpc_server, monkeypatch):
    from rpc.router import Router

    monkeypatch.setenv(services.LEASE_STAYS, "1")
    take = Router._take_lent_calls
    sent = []

    def take_only_with_counts(router, handler, counted=None):
        """A router that is behind: it ignores requests to take the calls posted, until a handler
        sends calls it counted itself (its ring was full)."""
        if counted is not None:
            sent.append(counted)
        if sent:
            take(router, handler, counted)

    monkeypatch.setattr(Router, "_take_lent_calls", take_only_with_counts)
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, start_method="spawn")
    calls = lease.LentCalls.RING + 100
    with server.client(timeout=30) as client:
        for i in range(calls):
            client.add(i, 1)
    assert wait_for(lambda: _calls(server) == {("add", "ok"): calls}), _calls(server)
    assert sent and sent[0][0] == [["add", "ok", 1]]  # the first call past a full ring, counted by the handler


def test_healthz_is_503_while_the_server_drains_then_the_port_closes(rpc_server, tmp_path):
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, shutdown_grace=60)
    gate = Gate(tmp_path)
    results = []
    with server.client(timeout=60) as client:
        held = threading.Thread(target=lambda: results.append(client.hold(*gate.args(), value="done")))
        held.start()
        gate.wait_started()
        assert _get(server, "/healthz") == (200, "ok\n")
        url = _url(server, "/healthz")
        closer = threading.Thread(target=server.server.close)
        closer.start()
        assert log_has(server, "shutdown_begun")
        # Draining: the held call keeps the server up, and /healthz says so.
        assert _get(server, "/healthz") == (503, "draining\n")
        assert _gauge(server, "rpc_draining") == 1
        gate.open()
        held.join(60)
        closer.join(60)
    assert results == ["done"]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=30)


def test_a_metrics_port_in_use_stops_the_start(rpc_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(rpc.StartupError, match="cannot listen on 127.0.0.1"):
            rpc_server("services:registry", workers=1, metrics_address=taken.getsockname())


def test_rpc_stats_prints_the_figures(rpc_server, capsys):
    server = rpc_server("services:registry", workers=2, metrics_address=METRICS, lease=False)
    with server.client(timeout=30) as client:
        assert client.add(1, 2) == 3
        with pytest.raises(rpc.WorkerCrashed):
            client.crash("kill")
    host, port = server.server.metrics_address
    assert wait_for(lambda: _by_reason(server, "rpc_handler_replacements_total") == {"crashed": 1})
    assert cli.main(["stats", "--metrics-address", f"{host}:{port}"], environ={}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"rpc at {host}:{port}: serving"
    assert lines[1].startswith("handlers: 2 (0 busy, 0 lent)   queue: 0 calls, 0 bytes   connections: ")
    rows = {line.split()[0]: line.split() for line in lines[3:] if line.startswith(("add", "crash", "method"))}
    assert rows["method"][:4] == ["method", "ok", "crashed", "calls"]
    assert rows["add"][:4] == ["add", "1", "0", "1"] and rows["crash"][:4] == ["crash", "0", "1", "1"]
    assert "handler replacements: crashed 1" in lines
    # The same address from the environment, as for `rpc serve`.
    assert cli.main(["stats"], environ={"RPC_METRICS_ADDRESS": f"{host}:{port}"}) == 0
    assert capsys.readouterr().out.startswith(f"rpc at {host}:{port}: serving")


def test_rpc_stats_says_what_is_missing(capsys):
    assert cli.main(["stats"], environ={}) == 2
    assert "no metrics_address is configured" in capsys.readouterr().err
    assert cli.main(["stats", "--metrics-address", "nonsense"], environ={}) == 2
    assert "--metrics-address: metrics_address must be HOST:PORT" in capsys.readouterr().err
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % bound.getsockname()[1]
        assert cli.main(["stats", "--metrics-address", address, "--timeout", "10"], environ={}) == 1
    error = capsys.readouterr().err
    assert f"nothing answers at http://{address}/healthz" in error and "rpc serve" in error


def test_a_client_that_leaves_is_counted_timeout_if_its_deadline_ended_the_call_else_cancelled(rpc_server):
    """A caller that gives up at its own timeout and hangs up (``rpc call --timeout``) leaves a
    call whose deadline passes within the disconnect's grace: counted ``timeout``, as for a
    caller that stayed. One that hangs up long before its deadline cancelled its call."""
    from helpers import raw_connection, write, request

    server = rpc_server("services:registry", workers=1, metrics_address="127.0.0.1:0")
    for round, timeout in enumerate((0.05, 30.0)):  # under, then over, the 0.1 s grace after a disconnect
        # A queued call of a client that left is dropped, not counted: wait for a free handler.
        assert wait_for(lambda: server.log_text().count("handler_started") > round, timeout=60)
        conn = raw_connection(server)
        write(conn, request(1, "sleep", 30, timeout=timeout))  # a connection's first call is routed
        conn.close()
        assert wait_for(lambda: sum(n for (method, _), n in _calls(server).items() if method == "sleep") >= (1 if timeout < 1 else 2), timeout=30)
    outcomes = {outcome: n for (method, outcome), n in _calls(server).items() if method == "sleep" and n}
    assert outcomes == {"timeout": 1, "cancelled": 1}
