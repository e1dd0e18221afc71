"""`rpc serve` and the client commands as users run them: real processes, signals and files."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import rpc
from helpers import Gate, child_pids, sigint_as_by_default, wait_for

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "config" / "rpc.toml")


def _key(daemon) -> bytes:
    return (Path(daemon.env["XDG_CONFIG_HOME"]) / "rpc" / "authkey").read_bytes().strip()


def _client(daemon, **options):
    return rpc.connect(daemon.env["RPC_ADDRESS"], authkey=_key(daemon), **options)


def test_serve_with_the_shipped_config_then_call_methods_and_ping(daemon):
    daemon.start("--config", CONFIG)
    key_file = Path(daemon.env["XDG_CONFIG_HOME"]) / "rpc" / "authkey"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert str(key_file) in daemon.log()  # says where the new key is

    result = daemon.rpc("call", "add", "2", "3")
    assert (result.returncode, result.stdout) == (0, "5\n"), result.stderr

    methods = daemon.rpc("methods")
    assert methods.returncode == 0
    for name in ("add", "echo", "sleep", "fib", "info"):
        assert name in methods.stdout
    assert "Add two numbers" in methods.stdout

    ping = daemon.rpc("ping")
    assert ping.returncode == 0 and "pong" in ping.stdout


def test_call_takes_json_literals_words_and_keywords(daemon):
    daemon.start()
    assert daemon.rpc("call", "echo", '{"a": [1, 2.5, null]}').stdout == '{"a": [1, 2.5, null]}\n'
    assert daemon.rpc("call", "echo", "plain words").stdout == '"plain words"\n'
    assert daemon.rpc("call", "add", "x=[1]", "y=[2]").stdout == "[1, 2]\n"


def test_call_errors_exit_1_with_type_and_message(daemon):
    daemon.start()
    missing = daemon.rpc("call", "nope")
    assert missing.returncode == 1 and "MethodNotFound" in missing.stderr
    failing = daemon.rpc("call", "sleep", "1000")
    assert failing.returncode == 1 and "ValueError: seconds must be between 0 and 60" in failing.stderr
    assert "Traceback" not in failing.stderr
    verbose = daemon.rpc("call", "sleep", "1000", "--verbose")
    assert "Traceback" in verbose.stderr and "demo.py" in verbose.stderr
    timeout = daemon.rpc("call", "sleep", "5", "--timeout", "0.5")
    assert timeout.returncode == 1 and "CallTimeout" in timeout.stderr


def test_client_commands_without_a_server_exit_1(daemon):
    Path(daemon.env["XDG_CONFIG_HOME"], "rpc").mkdir(parents=True)
    key = Path(daemon.env["XDG_CONFIG_HOME"], "rpc", "authkey")
    key.write_text("k" * 40)
    key.chmod(0o600)
    result = daemon.rpc("ping")
    assert result.returncode == 1 and "cannot connect" in result.stderr


def test_sigterm_lets_calls_in_flight_finish_then_exits_0_leaving_no_process(daemon, tmp_path):
    process = daemon.start("--workers", "3", "services:registry")
    handlers = wait_for(lambda: len(child_pids(process.pid)) >= 3 and child_pids(process.pid))
    results, errors = [], []
    clients = [_client(daemon, timeout=30) for _ in range(3)]  # connected before the signal
    gates = [Gate(tmp_path, f"call{i}") for i in range(3)]

    def held_call(client, gate) -> None:
        try:
            results.append(client.hold(*gate.args(), value="done"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=held_call, args=pair) for pair in zip(clients, gates)]
    for thread in threads:
        thread.start()
    for gate in gates:
        gate.wait_started()  # all three calls run in handlers
    process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "shutdown_begun" in daemon.log(), timeout=30)
    assert process.poll() is None  # draining: the calls in flight keep it up
    for gate in gates:
        gate.open()
    for thread in threads:
        thread.join(30)
    assert process.wait(30) == 0
    assert (results, errors) == (["done"] * 3, [])
    assert not [pid for pid in handlers if Path(f"/proc/{pid}").exists()]
    assert not Path(daemon.env["RPC_ADDRESS"]).exists()  # the socket file is removed


def test_a_second_signal_stops_at_once(daemon, tmp_path):
    process = daemon.start("--workers", "1", "services:registry")
    client = _client(daemon)
    gate = Gate(tmp_path)  # never opened: the call runs until the second signal stops it
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(_outcome(client.hold, *gate.args())))
    caller.start()
    gate.wait_started()
    process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "shutdown_begun" in daemon.log(), timeout=30)
    assert process.poll() is None  # still waiting for the call
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 1
    caller.join(30)
    assert isinstance(outcome[0], (rpc.WorkerCrashed, rpc.ConnectionClosed))


def _outcome(function, *args):
    try:
        return function(*args)
    except Exception as exc:
        return exc


def test_a_killed_handler_is_replaced_and_logged_with_the_reason(daemon):
    process = daemon.start("--workers", "2")
    handlers = wait_for(lambda: len(child_pids(process.pid)) >= 2 and child_pids(process.pid))
    victim = sorted(handlers)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: "killed by SIGKILL" in daemon.log())
    replaced = [json.loads(line) for line in daemon.log().splitlines() if '"handler_replaced"' in line]
    assert replaced[0]["pid"] == victim and replaced[0]["reason"] == "killed by SIGKILL"
    assert daemon.rpc("call", "add", "2", "3").stdout == "5\n"


def test_sighup_reloads_changed_code_without_failing_a_call(daemon):
    module = daemon.cwd / "reloadable.py"
    module.write_text("import rpc\nregistry = rpc.Registry()\nregistry.register(lambda: 1, name='version')\n")
    daemon.env["PYTHONDONTWRITEBYTECODE"] = "1"
    process = daemon.start("--workers", "2", "reloadable:registry")
    seen, errors = [], []
    stop = threading.Event()

    with _client(daemon, timeout=30, reconnect=False) as client:  # (a reconnect would hide a drop)

        def keep_calling() -> None:
            while not stop.is_set():
                try:
                    seen.append(client.version())
                except Exception as exc:
                    errors.append(exc)

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            wait_for(lambda: len(seen) > 20)
            module.write_text(
                "import rpc\nregistry = rpc.Registry()\n\n# version two\nregistry.register(lambda: 2, name='version')\n"
            )
            process.send_signal(signal.SIGHUP)
            assert wait_for(lambda: seen[-1] == 2, timeout=30)
            assert wait_for(lambda: "reload_finished" in daemon.log(), timeout=30)
            count = len(seen)
            wait_for(lambda: len(seen) > count + 20)
        finally:
            stop.set()
            caller.join(10)
        assert errors == []
        assert seen[-1] == 2 and 1 in seen
        assert not client.closed  # the same connection served before, during and after


def test_a_reload_whose_code_does_not_import_keeps_the_old_handlers(daemon):
    module = daemon.cwd / "fragile.py"
    module.write_text("import rpc\nregistry = rpc.Registry()\nregistry.register(lambda: 1, name='version')\n")
    process = daemon.start("--workers", "1", "fragile:registry")
    module.write_text("raise RuntimeError('broken on purpose')\n")
    process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload_failed" in daemon.log(), timeout=30)
    assert daemon.rpc("call", "version").stdout == "1\n"


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ("workers = -2\n", "workers must be a whole number >= 1"),
        ("workers = 'many'\n", "workers must be a whole number"),
        ("log_level = 'loud'\n", "log_level must be one of"),
        ("address = 'nowhere:http'\n", "must be HOST:PORT"),  # 'nowhere' alone is a socket path
        ("not toml at all [\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_exits_2_naming_the_problem_and_starts_nothing(daemon, config_text, message):
    config = daemon.cwd / "bad.toml"
    config.write_text(config_text)
    del daemon.env["RPC_ADDRESS"]
    result = daemon.rpc("serve", "--config", str(config), timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    if "unknown" in message or "workers" in message:
        assert str(config) in result.stderr  # names the file
    assert "listening" not in result.stderr


def _key_file(daemon, mode: int, content: str = "k" * 64) -> Path:
    path = daemon.cwd / "authkey"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_a_world_readable_authkey_file_is_refused(daemon):
    path = _key_file(daemon, 0o644)
    result = daemon.rpc("serve", "--authkey-file", str(path))
    assert result.returncode == 2 and "readable by others" in result.stderr and "chmod 600" in result.stderr


def test_an_unreadable_authkey_file_is_refused(daemon):
    if os.geteuid() == 0:  # root reads any file: use a path that cannot be read as a file
        path = daemon.cwd / "authkey"
        path.mkdir(mode=0o700)
    else:
        path = _key_file(daemon, 0o000)
    result = daemon.rpc("serve", "--authkey-file", str(path))
    assert result.returncode == 2 and "cannot read authkey file" in result.stderr


def test_a_short_authkey_is_refused(daemon):
    result = daemon.rpc("serve", env={**daemon.env, "RPC_AUTHKEY": "short"})
    assert result.returncode == 2 and "at least 32" in result.stderr
    path = _key_file(daemon, 0o600, "x" * 10)
    result = daemon.rpc("serve", "--authkey-file", str(path))
    assert result.returncode == 2 and "at least 32" in result.stderr


def test_a_registry_that_does_not_exist_exits_2(daemon):
    result = daemon.rpc("serve", "no_such_module_here:registry")
    assert result.returncode == 2 and "no_such_module_here" in result.stderr


def test_no_output_ever_contains_the_authkey(daemon):
    secret = "s3cr3t-" + "k" * 40
    daemon.env["RPC_AUTHKEY"] = secret
    daemon.env["RPC_LOG_LEVEL"] = "debug"
    daemon.env["RPC_ACCESS_LOG"] = "true"
    process = daemon.start()
    outputs = [
        daemon.rpc("call", "add", "2", "3"),
        daemon.rpc("call", "nope", "--verbose"),
        daemon.rpc("call", "sleep", "1000", "--verbose"),
        daemon.rpc("methods"),
        daemon.rpc("ping"),
        daemon.rpc("call", "add", "1", "2", env={**daemon.env, "RPC_AUTHKEY": "w" * 40}),
    ]
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    text = daemon.log() + "".join(o.stdout + o.stderr for o in outputs)
    assert '"call"' in text and "AuthenticationError" in text  # the commands really ran
    assert secret not in text
    assert secret.encode().hex() not in text


def test_the_console_script_is_installed():
    import shutil
    import sys

    script = shutil.which("rpc", path=os.path.dirname(sys.executable))
    assert script is not None


def test_handler_processes_log_to_the_same_output_with_their_pid(daemon):
    daemon.env["RPC_LOG_LEVEL"] = "debug"
    process = daemon.start("--workers", "2")
    handlers = wait_for(lambda: len(child_pids(process.pid)) >= 2 and child_pids(process.pid))
    assert wait_for(lambda: daemon.log().count('"handler_ready"') >= 2)
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    ready = [line for line in lines if line["event"] == "handler_ready"]
    assert {line["pid"] for line in ready} == handlers
    assert all(line["component"] == "rpc.handler" for line in ready)
    assert {line["pid"] for line in lines if line["event"] == "listening"} == {process.pid}


# -- hardening: the authkey, the key file, output, errors and usage ----------------------

PROBE_MODULE = '''\
import math, os, datetime
import rpc

registry = rpc.Registry()


@registry.expose
def authkey_seen():
    """What a function finds in its environment."""
    return os.environ.get("RPC_AUTHKEY")


@registry.expose
def shaped(kind):
    return {
        "tuple_keys": {(1, 2): "x"},
        "nan": {"v": math.nan},
        "bytes_keys": {b"k": 1},
        "nested_sets": [{frozenset({1}), frozenset({2, 3})}],
        "int_keys": {1: "a"},
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "tuple": (1, "two", None),
        "plain": {"a": [1, 2.5, None, True]},
    }[kind]


@registry.expose
def kwargs_echo(*args, **kwargs):
    return [list(args), kwargs]
'''


def _serve_probe(daemon, *args: str):
    (daemon.cwd / "probe.py").write_text(PROBE_MODULE)
    return daemon.start(*args, "probe:registry")


def _environ_of(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_handlers_and_the_functions_they_run_never_see_the_authkey(daemon):
    secret = "e" * 48
    daemon.env["RPC_AUTHKEY"] = secret
    process = _serve_probe(daemon, "--workers", "2")
    result = daemon.rpc("call", "authkey_seen")
    assert (result.returncode, result.stdout) == (0, "null\n"), result.stderr
    handlers = wait_for(lambda: len(child_pids(process.pid)) >= 2 and child_pids(process.pid))
    # (the supervisor's own /proc/PID/environ shows the environment it started with, always)
    for pid in handlers:
        assert not [v for v in _environ_of(pid) if v.startswith(b"RPC_AUTHKEY=")]


def test_a_symlinked_authkey_file_is_refused(daemon):
    real = _key_file(daemon, 0o600)
    link = daemon.cwd / "link-to-key"
    link.symlink_to(real)
    for command in (("serve",), ("call", "add", "1", "2")):
        result = daemon.rpc(*command, "--authkey-file", str(link))
        assert result.returncode == 2, result.stderr
        assert "symbolic link" in result.stderr and str(real) in result.stderr


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_an_authkey_file_in_a_folder_others_can_write_is_refused(daemon, mode):
    folder = daemon.cwd / "keys"
    folder.mkdir()
    key = folder / "authkey"
    key.write_text("k" * 64)
    key.chmod(0o600)
    folder.chmod(mode)
    result = daemon.rpc("call", "add", "1", "2", "--authkey-file", str(key))
    assert result.returncode == 2, result.stderr
    assert "writable by" in result.stderr and f"chmod go-w {folder}" in result.stderr
    # rpc serve refuses to create a new key there too
    result = daemon.rpc("serve", "--authkey-file", str(folder / "new-key"))
    assert result.returncode == 2, result.stderr
    assert f"chmod go-w {folder}" in result.stderr and not (folder / "new-key").exists()


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("tuple_keys", "{(1, 2): 'x'}"),
        ("nan", "{'v': nan}"),
        ("bytes_keys", "{b'k': 1}"),
        ("int_keys", "{1: 'a'}"),
        ("when", "datetime.datetime(2026, 1, 2, 3, 4, 5)"),
        ("tuple", '[1, "two", null]'),
        ("plain", '{"a": [1, 2.5, null, true]}'),
    ],
)
def test_call_prints_every_result_as_json_or_else_as_python(daemon, kind, expected):
    _serve_probe(daemon)
    result = daemon.rpc("call", "shaped", kind)
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


def test_call_prints_nested_sets_faithfully(daemon):
    _serve_probe(daemon)
    result = daemon.rpc("call", "shaped", "nested_sets")
    assert result.returncode == 0 and result.stderr == ""
    assert eval(result.stdout) == [{frozenset({1}), frozenset({2, 3})}]


def _write_key(daemon) -> None:
    folder = Path(daemon.env["XDG_CONFIG_HOME"], "rpc")
    folder.mkdir(parents=True, mode=0o700)
    (folder / "authkey").write_text("k" * 40)
    (folder / "authkey").chmod(0o600)


@pytest.mark.parametrize(
    "command",
    [("call", "add", "1", "2"), ("methods",), ("ping",)],
)
def test_client_commands_exit_2_on_configuration_errors(daemon, command):
    missing_key = daemon.rpc(*command)
    assert missing_key.returncode == 2 and "authkey file" in missing_key.stderr
    _write_key(daemon)
    bad_variable = daemon.rpc(*command, env={**daemon.env, "RPC_WORKERS": "lots"})
    assert bad_variable.returncode == 2 and "RPC_WORKERS" in bad_variable.stderr
    bad_file = daemon.rpc(*command, "--config", str(daemon.cwd / "missing.toml"))
    assert bad_file.returncode == 2 and "does not exist" in bad_file.stderr


def test_options_go_anywhere_and_dash_arguments_need_no_quoting(daemon):
    _serve_probe(daemon)
    result = daemon.rpc("call", "kwargs_echo", "1", "--verbose", "k=v", "--timeout", "30")
    assert (result.returncode, result.stdout) == (0, '[[1], {"k": "v"}]\n'), result.stderr
    result = daemon.rpc("call", "kwargs_echo", "-1", "2", "-2.5")
    assert (result.returncode, result.stdout) == (0, "[[-1, 2, -2.5], {}]\n"), result.stderr
    result = daemon.rpc("call", "kwargs_echo", "--", "-x", "--verbose")
    assert (result.returncode, result.stdout) == (0, '[["-x", "--verbose"], {}]\n'), result.stderr


def test_usage_errors_show_the_commands_own_usage_and_exit_2(daemon):
    for args, usage in [
        (("call", "add", "1", "--timeout", "-5"), "usage: rpc call"),
        (("call", "add", "--timeout", "nan"), "usage: rpc call"),
        (("call", "add", "--timeout", "1e9"), "usage: rpc call"),  # over a year: would overflow timeouts
        (("call", "add", "--bogus"), "usage: rpc call"),
        (("ping", "--count", "0"), "usage: rpc ping"),
        (("serve", "--workers", "0"), "usage: rpc serve"),
    ]:
        result = daemon.rpc(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(usage), (args, result.stderr)
    assert "must be a number > 0" in daemon.rpc("call", "add", "--timeout", "-5").stderr


def test_every_option_has_help_and_says_its_default():
    from rpc.cli import _parsers

    _, commands = _parsers()
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert "default" in action.help, (name, action.option_strings)
            if {"--address", "--config", "--authkey-file", "--workers"} & set(action.option_strings):
                assert "default" in action.help, (name, action.option_strings)
    assert "--" in commands["call"].format_help()  # says how to pass arguments that start with a dash


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rpc.demo", "must look like 'pkg.module:registry'"),
        ("rpc.demo:", "must look like 'pkg.module:registry'"),
        ("rpc demo:registry", "must look like 'pkg.module:registry'"),
        ("no_such_module_here:registry", "no module named 'no_such_module_here'"),
    ],
)
def test_a_bad_import_string_is_refused_once_before_any_handler_starts(daemon, spec, message):
    result = daemon.rpc("serve", spec, "--workers", "3")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count(message) == 1
    assert "handler" not in result.stderr and "registry_import_failed" not in result.stderr


def test_nothing_listening_on_a_unix_socket_says_how_to_start_a_server(daemon):
    _write_key(daemon)
    missing = daemon.rpc("ping")
    assert missing.returncode == 1
    assert "nothing is listening at" in missing.stderr and "rpc serve" in missing.stderr
    import socket

    stale = socket.socket(socket.AF_UNIX)  # a socket file that no server listens on
    stale.bind(daemon.env["RPC_ADDRESS"])
    stale.close()
    refused = daemon.rpc("call", "add", "1", "2")
    assert refused.returncode == 1
    assert "nothing is listening at" in refused.stderr and "rpc serve" in refused.stderr


def test_nothing_listening_on_a_tcp_port_says_how_to_start_a_server(daemon):
    import socket

    _write_key(daemon)
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % bound.getsockname()[1]
        result = daemon.rpc("ping", "--address", address)
    assert result.returncode == 1
    assert f"nothing is listening at {address}" in result.stderr and "rpc serve" in result.stderr
    assert "ConnectionClosed" not in result.stderr


def test_a_port_in_use_suggests_another_address_once(daemon):
    import socket

    _write_key(daemon)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        result = daemon.rpc("serve", "--address", address, "--workers", "1")
    assert result.returncode == 1
    assert "already in use" in result.stderr and "--address" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # printed once
    assert result.stderr.startswith("rpc: cannot start: cannot listen on")


def test_a_port_out_of_range_is_named(daemon):
    result = daemon.rpc("call", "add", "1", "2", "--address", "localhost:99999")
    assert result.returncode == 2 and "port 99999 is out of range" in result.stderr


def test_unknown_rpc_variables_are_refused_but_reserved_ones_pass(daemon):
    result = daemon.rpc("serve", env={**daemon.env, "RPC_WORKER": "2"})
    assert result.returncode == 2
    assert "RPC_WORKER" in result.stderr and "RPC_WORKERS" in result.stderr and "RPC_AUTHKEY" in result.stderr
    daemon.env["RPC_SOAK_SECONDS"] = "1"
    daemon.start()
    result = daemon.rpc("call", "add", "1", "2")
    assert (result.returncode, result.stdout) == (0, "3\n"), result.stderr


def test_a_registry_that_fails_to_import_is_reported_once_with_where_it_failed(daemon):
    """Three handlers fail the same way: one message, with the user's line, and no handler's log line."""
    (daemon.cwd / "broken_app.py").write_text("import rpc\nregistry = rpc.Registry()\nraise RuntimeError('boom at import')\n")
    result = daemon.rpc("serve", "broken_app:registry", "--workers", "3")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("cannot import the registry") == 1
    assert result.stderr.count("RuntimeError: boom at import") == 1  # the traceback's last line
    assert 'broken_app.py", line 3' in result.stderr
    assert "registry_import_failed" not in result.stderr and "importlib" not in result.stderr


# -- hardening: odd values, interrupted calls, a folder named rpc, usage ------------------


def test_durations_that_would_break_every_connection_are_refused_before_starting(daemon):
    for variable, value in [("RPC_SEND_TIMEOUT", "inf"), ("RPC_HANDSHAKE_TIMEOUT", "nan"), ("RPC_IDLE_TIMEOUT", "1e20")]:
        result = daemon.rpc("serve", env={**daemon.env, variable: value}, timeout=30)
        assert result.returncode == 2, (variable, result.stderr)
        assert result.stderr.startswith(f"rpc: configuration error: {variable}: ")
        assert "from 0 to 31536000" in result.stderr and "Traceback" not in result.stderr


def test_call_reads_and_prints_integers_of_any_size(daemon):
    daemon.start("services:registry")
    digits = "1" * 5000  # over Python's default limit of 4300 digits, both ways
    result = daemon.rpc("call", "echo", digits)
    assert (result.returncode, result.stdout, result.stderr) == (0, digits + "\n", "")
    result = daemon.rpc("call", "add", "9" * 4300, "1")
    assert (result.returncode, result.stdout, result.stderr) == (0, "1" + "0" * 4300 + "\n", "")


def test_an_argument_nested_too_deeply_is_a_usage_error(daemon):
    _write_key(daemon)
    result = daemon.rpc("call", "echo", "[" * 50_000 + "]" * 50_000)  # one argument is at most 128 KiB
    assert result.returncode == 2
    assert result.stderr == "rpc call: argument '" + "[" * 40 + "...' nests too deeply to read as JSON\n"


def test_an_authkey_that_is_not_utf8_works_as_its_exact_bytes(daemon):
    daemon.env["RPC_AUTHKEY"] = os.fsdecode(b"\xff" + b"k" * 40)  # subprocess passes the byte \xff
    daemon.start()
    result = daemon.rpc("call", "add", "1", "2")
    assert (result.returncode, result.stdout, result.stderr) == (0, "3\n", "")
    wrong = daemon.rpc("call", "add", "1", "2", env={**daemon.env, "RPC_AUTHKEY": os.fsdecode(b"\xfe" + b"k" * 40)})
    assert wrong.returncode == 1 and "AuthenticationError" in wrong.stderr and "Traceback" not in wrong.stderr


def test_ctrl_c_on_call_says_the_call_may_still_run_and_exits_130(daemon, tmp_path):
    import subprocess
    import sys

    daemon.start("--workers", "1", "services:registry")
    gate = Gate(tmp_path)
    caller = subprocess.Popen(
        [sys.executable, "-m", "rpc", "call", "hold", *gate.args(), "done"],
        cwd=daemon.cwd,
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_by_default,
    )
    try:
        gate.wait_started()  # the call runs on the server
        caller.send_signal(signal.SIGINT)
        stdout, stderr = caller.communicate(timeout=30)
    finally:
        gate.open()
        if caller.poll() is None:
            caller.kill()
            caller.wait(10)
    assert (caller.returncode, stdout) == (130, "")
    assert stderr == "rpc: interrupted; the call may still be running on the server\n"


def test_a_folder_named_rpc_in_the_current_folder_does_not_hide_rpc_from_the_handlers(daemon, tmp_path):
    import sysconfig

    here = tmp_path / "parent-of-a-clone"
    (here / "rpc").mkdir(parents=True)  # like the folder of a clone of rpc's repository
    daemon.start("--workers", "1", cwd=here)
    result = daemon.rpc("call", "add", "2", "3")
    assert (result.returncode, result.stdout, result.stderr) == (0, "5\n", "")
    daemon.stop()

    # A registry in that folder: served if rpc is installed normally; if it is installed in
    # editable mode, the folder named rpc would hide it, so rpc serve explains and stops.
    (here / "mine.py").write_text("import rpc\nregistry = rpc.Registry()\nregistry.register(lambda: 7, name='seven')\n")
    editable = not Path(rpc.__file__).is_relative_to(sysconfig.get_paths()["purelib"])
    if editable:
        refused = daemon.rpc("serve", "mine:registry", cwd=here)
        assert refused.returncode == 2, refused.stderr
        assert str(here / "rpc") in refused.stderr and "would hide the rpc package" in refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    else:
        daemon.start("--workers", "1", "mine:registry", cwd=here)
        assert daemon.rpc("call", "seven").stdout == "7\n"


def test_abbreviated_options_are_refused(daemon):
    for args in [("call", "add", "1", "--addres", "x:1"), ("serve", "--work", "2"), ("ping", "--cou", "2")]:
        result = daemon.rpc(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "unrecognized arguments" in result.stderr, (args, result.stderr)


def test_help_names_the_default_key_file_under_xdg_config_home(daemon):
    for command in ("serve", "call", "methods", "ping"):
        text = " ".join(daemon.rpc(command, "--help").stdout.split())
        assert "else $XDG_CONFIG_HOME/rpc/authkey, else ~/.config/rpc/authkey)" in text, command


def test_a_misspelt_config_key_suggests_the_right_one(daemon):
    config = daemon.cwd / "typo.toml"
    config.write_text("adress = '127.0.0.1:1'\n")
    result = daemon.rpc("serve", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}: unknown key 'adress'; did you mean 'address'?" in result.stderr


def test_a_file_path_as_registry_suggests_the_module(daemon):
    result = daemon.rpc("serve", "myapp/api.py")
    assert result.returncode == 2
    assert "did you mean 'myapp.api:registry'?" in result.stderr and len(result.stderr.splitlines()) == 1


def test_serve_raises_its_open_files_limit_and_says_so(daemon):
    """Each connection holds a descriptor: the daemon lifts its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files here is {hard}: nothing to raise")
    expected = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    log = open(daemon.log_path, "w")
    daemon.process = subprocess.Popen(
        [sys.executable, "-m", "rpc", "serve"], cwd=daemon.cwd, env=daemon.env, stdout=log, stderr=log, preexec_fn=low_limit
    )
    log.close()
    assert wait_for(lambda: "listening" in daemon.log(), timeout=60), daemon.log()
    [raised] = [json.loads(line) for line in daemon.log().splitlines() if "open_files_limit_raised" in line]
    assert (raised["previous"], raised["limit"]) == (256, expected)
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    assert any(line.startswith("Max open files") and str(expected) in line for line in limits.splitlines()), limits
    assert daemon.rpc("ping").returncode == 0
