"""Daemon settings: precedence of flags, environment and file; addresses; authkey files."""

from __future__ import annotations

import os
import re

import pytest

import rpc
from rpc.config import (
    check_registry_spec,
    create_authkey_file,
    load_settings,
    parse_address,
    read_authkey_file,
    resolve_authkey,
)


def _file(tmp_path, text):
    path = tmp_path / "rpc.toml"
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    path = _file(tmp_path, "workers = 3\nlog_level = 'debug'\nshutdown_grace = 4\n")
    env = {"RPC_WORKERS": "5", "RPC_LOG_LEVEL": "error"}
    settings = load_settings(path, env, {"workers": 7})
    config = settings.server_config(b"k" * 32)
    assert (config.workers, config.log_level, config.shutdown_grace, config.max_pending) == (7, "error", 4.0, 1024)
    assert settings.sources["workers"] == "--workers"
    assert settings.sources["log_level"] == "RPC_LOG_LEVEL"
    assert settings.sources["shutdown_grace"] == str(path)


def test_the_shipped_config_file_is_valid():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "config" / "rpc.toml"
    settings = load_settings(path, {}, {})
    config = settings.server_config(b"k" * 32)
    assert config.address == ("127.0.0.1", 8765)
    assert config.access_log is True and config.max_call_seconds is None
    assert settings.registry == "rpc.demo:registry"


def test_a_bad_value_names_the_key_and_where_it_came_from(tmp_path):
    path = _file(tmp_path, "max_pending = -1\n")
    with pytest.raises(rpc.ConfigError, match=f"{path}: max_pending must be"):
        load_settings(path, {}, {}).server_config(b"k" * 32)
    with pytest.raises(rpc.ConfigError, match="RPC_WORKERS: workers must be a whole number"):
        load_settings(None, {"RPC_WORKERS": "lots"}, {})
    with pytest.raises(rpc.ConfigError, match="RPC_ACCESS_LOG"):
        load_settings(None, {"RPC_ACCESS_LOG": "maybe"}, {})


def test_relative_paths_in_a_file_are_relative_to_it(tmp_path):
    path = _file(tmp_path, "address = 'run/rpc.sock'\nauthkey_file = 'keys/authkey'\n")
    settings = load_settings(path, {}, {})
    assert settings.address() == str(tmp_path / "run" / "rpc.sock")
    assert settings.authkey_file({}) == tmp_path / "keys" / "authkey"


def test_clients_take_a_list_of_addresses_and_rpc_serve_refuses_one(tmp_path):
    path = _file(tmp_path, "address = ['127.0.0.1:9001', 'run/rpc.sock', '[::1]:9002']\n")
    settings = load_settings(path, {}, {})
    assert settings.addresses() == [("127.0.0.1", 9001), str(tmp_path / "run" / "rpc.sock"), ("::1", 9002)]
    with pytest.raises(rpc.ConfigError, match=f"{path}: rpc serve listens on one address, not a list of 3"):
        settings.address()
    # Commas separate addresses in RPC_ADDRESS and --address; one address is as it always was.
    from_env = load_settings(path, {"RPC_ADDRESS": "127.0.0.1:9001, /run/rpc.sock"}, {})
    assert from_env.addresses() == [("127.0.0.1", 9001), "/run/rpc.sock"]
    assert load_settings(None, {}, {"address": "h1:1,h2:2"}).addresses() == [("h1", 1), ("h2", 2)]
    assert load_settings(None, {}, {}).addresses() == [("127.0.0.1", 8765)]
    with pytest.raises(rpc.ConfigError, match="--address: rpc serve listens on one address, not a list of 2"):
        load_settings(None, {}, {"address": "h1:1,h2:2"}).server_config(b"k" * 32)


@pytest.mark.parametrize(
    "text, message",
    [
        ("address = 8765\n", "address must be a string, or a list of strings, not 8765"),
        ("address = ['h:1', 2]\n", "address must be a string, or a list of strings"),
        ("address = []\n", "address is an empty list: give at least one address"),
        ("address = ['h:1', 'h:x']\n", "address 'h:x' must be HOST:PORT or a Unix socket path"),
    ],
)
def test_a_bad_list_of_addresses_says_what_is_wrong(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(rpc.ConfigError, match=re.escape(message)):
        load_settings(path, {}, {}).addresses()


@pytest.mark.parametrize(
    "text, address",
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:1", ("localhost", 1)),
        ("/run/rpc.sock", "/run/rpc.sock"),
        ("unix:rpc.sock", "rpc.sock"),
        ("rpc.sock", "rpc.sock"),  # no ":": a socket file in the current folder
        ("unix:a:1", "./a:1"),  # stays a path when parsed again
    ],
)
def test_addresses_parse(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["host:", ":80", "host:99999", "host:http", ""])
def test_bad_addresses_are_refused(text):
    with pytest.raises(rpc.ConfigError):
        parse_address(text)


def test_the_server_creates_a_private_key_file_and_clients_read_it(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    settings = load_settings(None, env, {})
    key, path, created = resolve_authkey(settings, env, create=True)
    assert created and path == tmp_path / "rpc" / "authkey"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    assert len(key) >= 32
    assert resolve_authkey(settings, env, create=False) == (key, path, False)


def test_rpc_authkey_wins_over_the_file_but_not_over_the_flag(tmp_path):
    key_file = tmp_path / "flag-key"
    key_file.write_text("f" * 40)
    key_file.chmod(0o600)
    env = {"RPC_AUTHKEY": "e" * 40, "XDG_CONFIG_HOME": str(tmp_path)}
    assert resolve_authkey(load_settings(None, env, {}), env, create=False)[0] == b"e" * 40
    settings = load_settings(None, env, {"authkey_file": str(key_file)})
    assert resolve_authkey(settings, env, create=False)[0] == b"f" * 40


def test_a_missing_key_file_tells_the_client_what_to_do(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    with pytest.raises(rpc.ConfigError, match="does not exist"):
        resolve_authkey(load_settings(None, env, {}), env, create=False)


def test_a_port_out_of_range_is_named():
    with pytest.raises(rpc.ConfigError, match=r"port 99999 is out of range \(0-65535\)"):
        parse_address("localhost:99999")


def test_unknown_rpc_variables_are_refused_with_the_known_ones_named():
    with pytest.raises(rpc.ConfigError) as caught:
        load_settings(None, {"RPC_WORKER": "2", "HOME": "/home/x"}, {})
    message = str(caught.value)
    assert "unknown environment variable RPC_WORKER;" in message and "did you mean RPC_WORKERS?" in message
    for known in ("RPC_AUTHKEY", "RPC_CONFIG", "RPC_ADDRESS", "RPC_AUTHKEY_FILE", "RPC_LOG_LEVEL"):
        assert known in message


def test_known_and_reserved_rpc_variables_are_accepted():
    env = {"RPC_AUTHKEY": "k" * 40, "RPC_SOAK_SECONDS": "5", "RPC_WORKERS": "2", "RPC_AUTHKEY_FILE": "/k"}
    assert load_settings(None, env, {}).values["workers"] == 2


@pytest.mark.parametrize("spec", ["pkg.module:registry", "app:api.registry", "módulo:registro"])
def test_registry_import_strings_of_the_right_form_pass(spec):
    assert check_registry_spec(spec) == spec


@pytest.mark.parametrize("spec", ["app", "app.api", "app:", ":registry", "app api:registry", "app:reg:x", "app.:r"])
def test_registry_import_strings_of_the_wrong_form_are_refused(spec):
    with pytest.raises(rpc.ConfigError, match="must look like 'pkg.module:registry'"):
        check_registry_spec(spec)


def test_a_registry_string_without_a_colon_suggests_one():
    with pytest.raises(rpc.ConfigError, match="did you mean 'myapp.api:registry'"):
        check_registry_spec("myapp.api")


def _private_key(folder, name="authkey"):
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / name
    path.write_text("k" * 40)
    path.chmod(0o600)
    return path


def test_a_key_file_that_is_a_symlink_is_refused(tmp_path):
    real = _private_key(tmp_path / "keys")
    link = tmp_path / "keys" / "link"
    link.symlink_to(real)
    with pytest.raises(rpc.ConfigError, match=f"is a symbolic link \\(to {real}\\)"):
        read_authkey_file(link)
    dangling = tmp_path / "keys" / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    settings = load_settings(None, env, {"authkey_file": str(dangling)})
    with pytest.raises(rpc.ConfigError, match="symbolic link"):
        resolve_authkey(settings, env, create=True)  # not written through the link
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("mode, who", [(0o770, "group"), (0o703, "others"), (0o777, "group and others")])
def test_a_key_file_in_a_folder_others_can_write_is_refused(tmp_path, mode, who):
    path = _private_key(tmp_path / "keys")
    path.parent.chmod(mode)
    with pytest.raises(rpc.ConfigError, match=f"writable by {who} .*chmod go-w {path.parent}$"):
        read_authkey_file(path)
    with pytest.raises(rpc.ConfigError, match=f"chmod go-w {path.parent}"):
        create_authkey_file(path.parent / "new")
    assert not (path.parent / "new").exists()


def test_a_key_file_that_is_not_a_plain_file_is_refused(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / "fifo", 0o600)  # opening must not block on a pipe
    with pytest.raises(rpc.ConfigError, match="not a plain file"):
        read_authkey_file(folder / "fifo")


def test_an_oversized_key_file_is_refused(tmp_path):
    path = _private_key(tmp_path / "keys")
    path.write_bytes(b"k" * (1 << 20))
    with pytest.raises(rpc.ConfigError, match="should hold one key"):
        read_authkey_file(path)


@pytest.mark.parametrize(
    "text, hint",
    [
        ("adress = '127.0.0.1:1'\n", "unknown key 'adress'; did you mean 'address'?"),
        ("send_timout = 3\n", "unknown key 'send_timout'; did you mean 'send_timeout'?"),
        ("authkey = 'x'\n", "unknown key 'authkey'; the key itself never goes in a config file: name a key file with authkey_file"),
    ],
)
def test_a_misspelt_config_file_key_suggests_the_right_one(tmp_path, text, hint):
    path = _file(tmp_path, text)
    with pytest.raises(rpc.ConfigError, match=f"{path}: " + re.escape(hint)):
        load_settings(path, {}, {})


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e20", "infinity"])
@pytest.mark.parametrize("name", ["send_timeout", "handshake_timeout", "shutdown_grace", "startup_timeout", "max_call_seconds", "idle_timeout"])
def test_durations_that_would_break_the_server_are_refused_naming_the_variable(name, value):
    variable = "RPC_" + name.upper()
    with pytest.raises(rpc.ConfigError, match=f"{variable}: {name} must be a number of seconds from 0 to 31536000"):
        load_settings(None, {variable: value}, {}).server_config(b"k" * 32)


def test_an_authkey_that_is_not_utf8_is_read_as_its_exact_bytes(tmp_path):
    key = b"\xff\xfe" + b"k" * 40
    env = {"RPC_AUTHKEY": os.fsdecode(key), "XDG_CONFIG_HOME": str(tmp_path)}  # as os.environ holds it
    assert resolve_authkey(load_settings(None, env, {}), env, create=False)[0] == key


@pytest.mark.parametrize(
    "spec, suggestion",
    [
        ("myapp/api.py", "did you mean 'myapp.api:registry'?"),
        ("./app.py", "did you mean 'app:registry'?"),
        ("app.py", "did you mean 'app:registry'?"),
        ("myapp/api.py:api", "did you mean 'myapp.api:api'?"),
        ("/srv/code/app.py", "did you mean 'app:registry' (run from /srv/code)?"),
    ],
)
def test_a_file_path_given_as_registry_suggests_its_module(spec, suggestion):
    with pytest.raises(rpc.ConfigError, match=re.escape(suggestion)):
        check_registry_spec(spec)
