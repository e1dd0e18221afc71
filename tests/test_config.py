"""Server settings are validated before anything starts."""

from __future__ import annotations

import math

import pytest

import rpc
from rpc.config import ServerConfig


def test_defaults_are_valid_and_the_authkey_is_never_in_repr():
    config = ServerConfig(authkey=b"very-secret-key")
    assert config.workers >= 1
    assert "very-secret-key" not in repr(config)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.0.2.10", "::", "example.com"])
def test_non_loopback_address_without_authkey_is_refused(host):
    with pytest.raises(rpc.ConfigError, match="without an authkey"):
        ServerConfig(address=(host, 9000))


@pytest.mark.parametrize("address", [("127.0.0.1", 0), ("::1", 0), ("localhost", 0), "/tmp/rpc.sock"])
def test_loopback_and_unix_addresses_may_run_without_authkey(address):
    ServerConfig(address=address)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"workers": 0}, "workers"),
        ({"workers": -2}, "workers"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"handshake_timeout": -1}, "handshake_timeout"),
        ({"start_method": "fork"}, "start_method"),
        ({"authkey": "text"}, "bytes"),
        ({"authkey": b""}, "empty"),
        ({"address": ("127.0.0.1", 70000)}, "address"),
        ({"log_level": "loud"}, "log_level"),
        ({"no_such_option": 1}, "unknown server option"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(options, message):
    with pytest.raises(rpc.ConfigError, match=message):
        ServerConfig.build(**options)


def test_server_refuses_bad_options_before_starting():
    with pytest.raises(rpc.ConfigError):
        rpc.Server("services:registry", address=("0.0.0.0", 0))


def test_a_port_out_of_range_is_named():
    with pytest.raises(rpc.ConfigError, match=r"port 70000 is out of range \(0-65535\)"):
        ServerConfig(address=("127.0.0.1", 70000))


DURATIONS = ["send_timeout", "handshake_timeout", "shutdown_grace", "startup_timeout", "max_call_seconds", "idle_timeout"]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e20, 10**400, 365 * 24 * 3600 + 1])
def test_durations_must_be_finite_and_at_most_a_year(name, value):
    with pytest.raises(rpc.ConfigError, match=f"{name} must be a number of seconds from 0 to 31536000"):
        ServerConfig(**{name: value})


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_of_one_year_is_accepted(name):
    assert getattr(ServerConfig(**{name: 365 * 24 * 3600}), name) == 365 * 24 * 3600


@pytest.mark.parametrize("options", [{"backlog": 2**40}, {"handler_memory_limit": 10**20}])
def test_whole_numbers_that_would_overflow_the_system_calls_are_refused(options):
    with pytest.raises(rpc.ConfigError, match=f"{next(iter(options))} must be a whole number from 1 to"):
        ServerConfig(**options)


def test_server_refuses_an_infinite_timeout_before_starting():
    with pytest.raises(rpc.ConfigError, match="send_timeout"):
        rpc.Server("services:registry", send_timeout=math.inf)


def test_server_checks_the_form_of_an_import_string_before_starting():
    with pytest.raises(rpc.ConfigError, match="did you mean 'myapp.api:registry'"):
        rpc.Server("myapp.api")
