"""What the Python client accepts: text addresses, the key file, timeouts, authkeys.

Each refusal is checked against a real server, so a wrong value is refused
before anything is sent, and the connection goes on serving.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import rpc
import services

BAD_TIMEOUTS = [-1, 0, 0.0, math.nan, math.inf, -math.inf, 1e9]  # 1e9 s: beyond what poll() takes


@pytest.fixture(scope="module")
def tcp_server(rpc_server_module):
    return rpc_server_module("services:registry", workers=1, transport="tcp")


# -- addresses ------------------------------------------------------------------------


def test_host_port_text_is_tcp_for_the_client(tcp_server):
    host, port = tcp_server.address
    with rpc.connect(f"{host}:{port}", authkey=tcp_server.authkey) as client:
        assert client.address == (host, port)
        assert client.add(2, 3) == 5


def test_host_port_text_is_tcp_for_the_server():
    with rpc.Server(services.registry, address="127.0.0.1:0", authkey=b"k", workers=1) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port != 0
        with rpc.connect(f"127.0.0.1:{port}", authkey=b"k") as client:
            assert client.add(2, 3) == 5


def test_text_without_a_colon_is_a_unix_socket_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with rpc.Server(services.registry, address="my.sock", authkey=b"k", workers=1) as server:
        assert server.address == "my.sock"
        assert (tmp_path / "my.sock").is_socket()
        with rpc.connect("my.sock", authkey=b"k") as client:
            assert client.add(2, 3) == 5


@pytest.mark.parametrize("text", ["host:http", ":80", "host:99999"])
def test_text_with_a_colon_that_is_not_host_port_is_refused(text):
    with pytest.raises(rpc.ConfigError, match="must be HOST:PORT or a Unix socket path|out of range"):
        rpc.connect(text, authkey=b"k")


# -- the key file ---------------------------------------------------------------------


def _key_file(folder: Path, text: str = "a" * 64 + "\n", mode: int = 0o600) -> Path:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "authkey"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_read_authkey_reads_the_default_file_of_rpc_serve(tmp_path, monkeypatch):
    _key_file(tmp_path / "rpc")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("RPC_AUTHKEY", "b" * 64)  # not read: the file is what rpc.read_authkey reads
    assert rpc.read_authkey() == b"a" * 64
    assert "read_authkey" in rpc.__all__


def test_read_authkey_reads_a_given_path_and_connects(tmp_path):
    path = _key_file(tmp_path / "keys")
    assert rpc.read_authkey(path) == b"a" * 64
    assert rpc.read_authkey(str(path)) == b"a" * 64
    key = rpc.read_authkey(path)
    with rpc.Server(services.registry, address=("127.0.0.1", 0), authkey=key, workers=1) as server:
        with rpc.connect(server.address, authkey=rpc.read_authkey(path)) as client:
            assert client.add(2, 3) == 5


def test_read_authkey_checks_the_file_as_the_rpc_command_does(tmp_path):
    with pytest.raises(rpc.ConfigError, match=r"readable by others .* chmod 600"):
        rpc.read_authkey(_key_file(tmp_path / "open", mode=0o644))
    with pytest.raises(rpc.ConfigError, match=r"is \d+ bytes; at least 32"):
        rpc.read_authkey(_key_file(tmp_path / "short", text="short\n"))
    with pytest.raises(rpc.ConfigError, match=r"does not exist \(`rpc serve` creates it"):
        rpc.read_authkey(tmp_path / "missing")


def test_the_missing_authkey_error_points_to_read_authkey(tcp_server):
    with pytest.raises(rpc.AuthenticationError, match=r"none was given: pass authkey=rpc\.read_authkey\(\)"):
        rpc.connect(tcp_server.address)


# -- timeouts -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tcp_server):
    with tcp_server.client(timeout=30) as connected:
        yield connected


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_a_timeout_that_is_not_a_finite_number_above_zero_is_refused_at_the_call(client, bad):
    message = r"timeout must be a number of seconds > 0 and at most 31536000 \(a year\), or None"
    with pytest.raises(ValueError, match=message):
        client.call("add", 1, 2, timeout=bad)
    with pytest.raises(ValueError, match=message):
        client.submit("add", 1, 2, timeout=bad)
    with pytest.raises(ValueError, match=message):
        client.map("add", [1], [2], timeout=bad)  # at the call, not when the first result is asked for
    with pytest.raises(ValueError, match=message):
        client.timeout = bad
    assert client.add(1, 2) == 3  # nothing was sent; the connection goes on


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_connect_refuses_bad_timeouts(tcp_server, bad):
    with pytest.raises(ValueError, match=r"^timeout must be"):
        rpc.connect(tcp_server.address, authkey=tcp_server.authkey, timeout=bad)
    with pytest.raises(ValueError, match=r"^connect_timeout must be"):
        rpc.connect(tcp_server.address, authkey=tcp_server.authkey, connect_timeout=bad)


def test_a_timeout_that_is_not_a_number_is_a_type_error(client):
    with pytest.raises(TypeError, match="timeout must be a number of seconds or None, not str"):
        client.call("add", 1, 2, timeout="1")


def test_good_timeouts_are_taken(client):
    assert client.call("add", 1, 2, timeout=None) == 3
    assert client.call("add", 1, 2, timeout=5) == 3
    assert client.submit("add", 1, 2, timeout=5.5).result() == 3
    assert list(client.map("add", [1, 2], [3, 4], timeout=5)) == [4, 6]


# -- authkeys -------------------------------------------------------------------------


def test_a_text_authkey_is_refused_with_the_fix(tcp_server):
    with pytest.raises(rpc.ConfigError, match=r"^authkey must be bytes, not str \(use b'\.\.\.' or \.encode\(\)\)$"):
        rpc.connect(tcp_server.address, authkey="text")


def test_a_wrong_authkey_says_the_server_refused_it(tcp_server):
    with pytest.raises(rpc.AuthenticationError) as caught:
        rpc.connect(tcp_server.address, authkey=b"not the key")
    host, port = tcp_server.address
    assert str(caught.value) == f"{host}:{port} refused this authkey: it is not the key the server was started with"
    with rpc.connect(tcp_server.address, authkey=tcp_server.authkey) as client:
        assert client.add(1, 2) == 3  # the server goes on serving others
