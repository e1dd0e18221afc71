"""Daemon settings: precedence of flags, environment and file; addresses; authkey files."""

from __future__ import annotations

import os

import pytest

import rpc
from rpc.config import load_settings, parse_address, resolve_authkey


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


@pytest.mark.parametrize(
    "text, address",
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:1", ("localhost", 1)),
        ("/run/rpc.sock", "/run/rpc.sock"),
        ("unix:rpc.sock", "rpc.sock"),
    ],
)
def test_addresses_parse(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["nowhere", "host:", ":80", "host:99999", "host:http"])
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
