"""`rpc serve` with TLS flags and keys, and the client commands with TLS."""

from __future__ import annotations

import json

import pytest

from certs import Authority


@pytest.fixture
def certs(tmp_path):
    authority = Authority(tmp_path)
    return authority.cert, authority.issue("server")


def _address(daemon) -> str:
    for line in daemon.log().splitlines():
        if '"listening"' in line:
            event = json.loads(line)
            assert event["tls"] is True
            return event["address"]
    raise AssertionError(f"no listening line:\n{daemon.log()}")


def test_serve_with_tls_flags_then_call_with_tls(daemon, certs):
    ca, server = certs
    daemon.env["RPC_HANDSHAKE_TIMEOUT"] = "3"  # how long the call without TLS waits to be told
    daemon.start("--address", "127.0.0.1:0", "--tls-cert", str(server.cert), "--tls-key", str(server.key), "services:registry")
    address = _address(daemon)

    result = daemon.rpc("call", "--address", address, "--tls-ca", str(ca), "add", "2", "3")
    assert (result.returncode, result.stdout) == (0, "5\n"), result.stderr
    ping = daemon.rpc("ping", "--address", address, "--tls-ca", str(ca))
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stderr

    plain = daemon.rpc("call", "--address", address, "add", "2", "3")
    assert plain.returncode == 1 and "speaks TLS: connect with tls=" in plain.stderr, plain.stderr
    assert "(here: --tls-ca FILE or --tls" in plain.stderr
    untrusted = daemon.rpc("call", "--address", address, "--tls", "add", "2", "3")  # the system's CAs
    assert untrusted.returncode == 1 and "TLSError" in untrusted.stderr and "certificate verify failed" in untrusted.stderr
    assert "(here: --tls-ca FILE names the CA to trust)" in untrusted.stderr
    assert "client_rejected" in daemon.log() and "the client sent nothing" in daemon.log()


def test_a_shared_config_file_turns_tls_on_for_server_and_client(daemon, certs, tmp_path):
    ca, server = certs
    folder = tmp_path / "etc"  # not the daemon's working folder: paths are relative to the file's
    folder.mkdir()
    for path in (ca, server.cert, server.key):
        (folder / path.name).write_bytes(path.read_bytes())
    config = folder / "rpc.toml"
    config.write_text(
        f'tls_cert_file = "{server.cert.name}"\ntls_key_file = "{server.key.name}"\ntls_ca_file = "{ca.name}"\n'
    )  # (paths relative to the file's folder)
    daemon.start("--config", str(config), "--address", "127.0.0.1:0", "services:registry")
    address = _address(daemon)
    result = daemon.rpc("call", "--config", str(config), "--address", address, "add", "2", "3")
    assert (result.returncode, result.stdout) == (0, "5\n"), result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "{cert}"], "tls_key_file is not set, but tls_cert_file is"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "tls_key_file {missing} cannot be read"),
        (["--tls-cert", "{cert}", "--tls-key", "{cert}"], "tls_cert_file"),
    ],
)
def test_bad_tls_settings_exit_2_naming_the_key(daemon, certs, tmp_path, flags, message):
    _, server = certs
    names = {"cert": str(server.cert), "missing": str(tmp_path / "missing.key")}
    process = daemon.start(*(f.format(**names) for f in flags), "--address", "127.0.0.1:0", wait=False)
    assert process.wait(60) == 2
    assert message.format(**names) in daemon.log()
