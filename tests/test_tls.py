"""TLS: real servers on TCP with certificates made here, sync and asyncio clients, every failure case.

Certificates come from :mod:`certs` (the ``cryptography`` package of the test extra): a CA,
a server certificate for 127.0.0.1 and localhost, an expired one, one for another hostname,
one from a CA the clients do not trust, and client certificates.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path

import pytest

import rpc
import rpc.aio
from certs import Authority, Issued
from helpers import Gate, framed, log_has, request, router_state, wait_for
from rpc import protocol
from rpc.handshake import ClientHandshake
from rpc.testing import DEFAULT_START_METHOD


@dataclass
class Certs:
    ca: Path  # the CA the clients trust
    server: Issued  # for 127.0.0.1 and localhost
    expired: Issued
    elsewhere: Issued  # for rpc.example only
    stranger: Issued  # for 127.0.0.1, from a CA nobody trusts
    stranger_ca: Path
    client: Issued  # a client certificate from the trusted CA
    stranger_client: Issued  # a client certificate from the other CA

    def server_options(self, issued: Issued | None = None, **options) -> dict:
        issued = issued or self.server
        return {"transport": "tcp", "tls_cert_file": str(issued.cert), "tls_key_file": str(issued.key), **options}

    def client_context(self, issued: Issued | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if issued is not None:
            context.load_cert_chain(issued.cert, issued.key)
        return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca, other = Authority(folder), Authority(folder, "stranger CA")
    return Certs(
        ca=ca.cert,
        server=ca.issue("server"),
        expired=ca.issue("expired", expired=True),
        elsewhere=ca.issue("elsewhere", ("rpc.example",)),
        stranger=other.issue("stranger"),
        stranger_ca=other.cert,
        client=ca.issue("client", ("rpc client",), client=True),
        stranger_client=other.issue("stranger-client", ("rpc client",), client=True),
    )


@pytest.fixture(scope="module")
def server(rpc_server_module, certs):
    """A TLS server (every event loop's own default) shared by the tests of calls."""
    return rpc_server_module("services:registry", **certs.server_options(workers=2, access_log=True))


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request) -> str:
    return request.param


def rejected(server, text: str) -> bool:
    """The server logged a rejected client with ``text`` in its reason."""
    return bool(wait_for(lambda: any("client_rejected" in line and text in line for line in server.log_text().splitlines()), 30))


class RawTLS:
    """A TLS connection past the authkey handshake and the hellos, to write what no client would."""

    def __init__(self, server, certs: Certs) -> None:
        context = ssl.create_default_context(cafile=str(certs.ca))
        self.sock = context.wrap_socket(socket.create_connection(server.address, timeout=30), server_hostname="127.0.0.1")
        handshake = ClientHandshake(server.authkey)
        while not handshake.done:
            for reply in handshake.receive(self.read_frame()):
                self.write(framed(reply))
        protocol.decode_hello(handshake.hello)
        self.write(framed(protocol.encode_hello({})))

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError(f"the server closed the connection after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def read_frame(self) -> bytes:
        (size,) = struct.unpack("!i", self._exactly(4))
        return self._exactly(size)

    def close(self) -> None:
        self.sock.close()


# -- calls over TLS --------------------------------------------------------------------------------


def test_calls_kwargs_errors_and_a_large_echo_over_tls(server, certs):
    with server.client(tls=str(certs.ca)) as client:
        assert client._calls.tls.version in ("TLSv1.2", "TLSv1.3")
        assert client.add(2, 3) == 5
        assert client.math.hypot(3, 4) == 5.0
        assert client.kwargs_echo(1, b=2) == [[1], {"b": 2}]
        with pytest.raises(ValueError, match="boom"):
            client.fail("ValueError")
        with pytest.raises(rpc.MethodNotFound):
            client.no_such_method()
        payload = bytes(range(256)) * 4096  # 1 MiB
        assert client.echo(payload) == payload
        assert client.big(3 << 20) == b"x" * (3 << 20)
        assert {m.name for m in client.methods()} >= {"add", "echo"}
        assert client.ping() > 0
    assert "tls=True" in server.log_text()


def test_many_calls_in_flight_from_several_threads_over_tls(server, certs):
    with server.client(tls=str(certs.ca)) as client:
        results: dict[int, list] = {}

        def caller(n: int) -> None:
            results[n] = [client.add(n, i) for i in range(50)]

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        futures = [client.submit("echo", b"y" * 100_000) for _ in range(20)]
        assert all(f.result(60) == b"y" * 100_000 for f in futures)
        for thread in threads:
            thread.join(60)
        assert results == {n: [n + i for i in range(50)] for n in range(4)}


def test_the_lease_is_off_under_tls_every_call_is_routed(server, certs):
    assert not router_state(server, lambda router: router.lending)
    with server.client(tls=str(certs.ca)) as client:
        assert [client.add(i, 1) for i in range(50)] == [i + 1 for i in range(50)]
    assert "method=add" in server.log_text()
    assert "leased=True" not in server.log_text()


def test_deadlines_over_tls(server, certs):
    with server.client(tls=str(certs.ca)) as client:
        with pytest.raises(rpc.CallTimeout):
            client.call("sleep", 10, timeout=0.5)
        assert client.add(1, 1) == 2  # the connection is still good


def test_cancelling_queued_and_running_calls_over_tls(rpc_server, certs, tmp_path):
    server = rpc_server("services:registry", **certs.server_options(workers=1))
    gate, marker = Gate(tmp_path), tmp_path / "ran"
    with server.client(tls=str(certs.ca), timeout=30) as client:
        [pid] = server.handler_pids()
        running = client.submit("hold", *gate.args())
        gate.wait_started()
        queued = client.submit("touch", str(marker))
        assert queued.cancel() is True
        assert running.cancel() is True
        with pytest.raises(CancelledError):
            running.result(0)
        assert wait_for(lambda: server.handler_pids() not in ([], [pid]), timeout=30)
        assert client.add(2, 3) == 5
    assert log_has(server, "was cancelled by its caller")
    assert not marker.exists()


def test_streams_over_tls(rpc_server, certs, tmp_path):
    server = rpc_server("stream_services:registry", **certs.server_options())
    with server.client(tls=str(certs.ca), timeout=30) as client:
        assert list(client.count(1000)) == list(range(1000))
        items = list(client.count(20, size=100_000))
        assert [i for i, _ in items] == list(range(20)) and all(len(b) == 100_000 for _, b in items)
        for item in client.count_marked(10**9, str(tmp_path)):
            if item == 5:
                break
        assert wait_for(lambda: (tmp_path / "finally").exists(), timeout=30)  # closed on the server
        assert client.add(2, 2) == 4


def test_a_client_reconnects_over_tls_after_an_idle_close(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(idle_timeout=0.3))
    with server.client(tls=str(certs.ca)) as client:
        assert client.add(1, 2) == 3
        assert log_has(server, "idle for longer than idle_timeout")
        assert client.add(2, 3) == 5  # on a new connection, with TLS again


def test_a_user_context_is_used_as_given(rpc_server, certs):
    """A context with hostname checking off accepts a certificate for another name."""
    server = rpc_server("services:registry", **certs.server_options(certs.elsewhere))
    context = certs.client_context()
    context.check_hostname = False
    with server.client(tls=context) as client:
        assert client.add(2, 3) == 5


# -- the router's limits on decrypted bytes ----------------------------------------------------------


def test_a_frame_over_the_limit_is_refused_over_tls(rpc_server, certs, loop_name):
    server = rpc_server("services:registry", **certs.server_options(max_message_bytes=1 << 20, event_loop=loop_name))
    raw = RawTLS(server, certs)
    try:
        raw.write(struct.pack("!i", (1 << 20) + 1))
        response = protocol.decode_response(raw.read_frame())
        assert response.id is None and response.error.code == "message_too_large"
    finally:
        raw.close()
    assert log_has(server, "message too large")
    with server.client(tls=str(certs.ca)) as client:
        assert client.add(1, 2) == 3


def test_a_tls_client_that_stops_reading_is_dropped_and_frees_the_handler(rpc_server, certs, loop_name):
    """The outbox is counted in ciphertext waiting for the socket: backpressure and send_timeout hold."""
    server = rpc_server(
        "services:registry",
        **certs.server_options(workers=1, max_outbox_bytes=65536, send_timeout=1.0, event_loop=loop_name),
    )
    slow = RawTLS(server, certs)
    try:
        slow.write(request(1, "big", 8 << 20) + request(2, "add", 1, 2))
        parked = lambda: router_state(server, lambda r: sum(len(c.parked) for c in list(r.connections)))  # noqa: E731
        assert wait_for(lambda: parked() == 1, timeout=30), "the small reply never waited for the slow reader"
        with server.client(tls=str(certs.ca), timeout=10.0) as victim:
            assert victim.add(2, 3) == 5
        assert log_has(server, "stopped reading its replies", timeout=10)
    finally:
        slow.close()


def test_the_receive_budget_holds_over_tls(rpc_server, certs, loop_name):
    size = 150_000  # received into a buffer of its own, counted in the budget
    server = rpc_server(
        "services:registry", **certs.server_options(max_receive_bytes=size + 1000, event_loop=loop_name)
    )
    staller, waiter = RawTLS(server, certs), RawTLS(server, certs)
    try:
        first, second = request(1, "echo", b"s" * size), request(2, "echo", b"w" * size)
        staller.write(first[:4096])
        assert wait_for(lambda: router_state(server, lambda r: r.receive_budget.used) > 0, timeout=20)
        waiter.write(second)
        starved = lambda: router_state(server, lambda r: sum(c.starved for c in list(r.connections)))  # noqa: E731
        assert wait_for(lambda: starved() == 1, timeout=20), "the second large request was read past the budget"
        staller.write(first[4096:])
        assert protocol.decode_response(staller.read_frame()).result == b"s" * size
        assert protocol.decode_response(waiter.read_frame()).result == b"w" * size
        assert wait_for(lambda: router_state(server, lambda r: r.receive_budget.used) == 0, timeout=20)
    finally:
        staller.close()
        waiter.close()


def test_the_handshake_timeout_bounds_tls_and_authkey_together(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(handshake_timeout=3.0))  # (room for a loaded machine)
    # TLS done, then silence: the authkey handshake times out.
    context = ssl.create_default_context(cafile=str(certs.ca))
    quiet = context.wrap_socket(socket.create_connection(server.address, timeout=30), server_hostname="127.0.0.1")
    # Half a ClientHello, then silence: the TLS handshake times out.
    half = socket.create_connection(server.address, timeout=30)
    half.sendall(b"\x16\x03\x01\x02\x00\x01")
    try:
        assert rejected(server, "reason='handshake timed out'")
        assert rejected(server, "reason='TLS handshake timed out'")
    finally:
        quiet.close()
        half.close()


# -- failures, each with its error on the client and its line on the server ------------------------


def test_a_plain_client_against_a_tls_server_is_told_the_server_speaks_tls(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(handshake_timeout=0.5))
    with pytest.raises(rpc.TLSError, match="speaks TLS: connect with tls="):
        rpc.connect(server.address, authkey=server.authkey, connect_timeout=30)
    assert rejected(server, "the client sent nothing")


def test_a_plain_client_that_gives_up_first_is_told_tls_may_be_why(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(handshake_timeout=30))
    with pytest.raises(rpc.ConnectTimeout, match="if it has TLS, connect with tls="):
        rpc.connect(server.address, authkey=server.authkey, connect_timeout=0.5)


def test_a_tls_client_against_a_plain_server(rpc_server, certs):
    server = rpc_server("services:registry", transport="tcp")
    with pytest.raises(rpc.TLSError, match="does not speak TLS.*connect without tls"):
        rpc.connect(server.address, authkey=server.authkey, tls=str(certs.ca), connect_timeout=30)
    assert rejected(server, "the client speaks TLS, and this server has none")


def test_an_unknown_ca(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(certs.stranger))
    with pytest.raises(rpc.TLSError, match="certificate verify failed: unable to get local issuer certificate"):
        rpc.connect(server.address, authkey=server.authkey, tls=str(certs.ca), connect_timeout=30)
    assert rejected(server, "does not trust this server's certificate")


def test_the_system_cas_do_not_trust_a_private_ca(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options())
    with pytest.raises(rpc.TLSError, match="certificate verify failed"):
        rpc.connect(server.address, authkey=server.authkey, tls=True, connect_timeout=30)
    assert rejected(server, "TLS handshake failed")


def test_a_wrong_hostname(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(certs.elsewhere))
    with pytest.raises(rpc.TLSError, match="certificate verify failed: IP address mismatch"):
        rpc.connect(server.address, authkey=server.authkey, tls=str(certs.ca), connect_timeout=30)
    assert rejected(server, "refused this server's certificate")


def test_an_expired_certificate(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(certs.expired))
    with pytest.raises(rpc.TLSError, match="certificate verify failed: certificate has expired"):
        rpc.connect(server.address, authkey=server.authkey, tls=str(certs.ca), connect_timeout=30)
    assert rejected(server, "expired")


def test_client_certificates_when_required(rpc_server, certs):
    server = rpc_server("services:registry", **certs.server_options(tls_client_ca_file=str(certs.ca)))
    with server.client(tls=certs.client_context(certs.client)) as client:
        assert client.add(2, 3) == 5
    with pytest.raises(rpc.TLSError, match="requires a client certificate"):
        rpc.connect(server.address, authkey=server.authkey, tls=str(certs.ca), connect_timeout=30)
    assert rejected(server, "the client sent no certificate")
    with pytest.raises(rpc.TLSError):
        rpc.connect(server.address, authkey=server.authkey, tls=certs.client_context(certs.stranger_client), connect_timeout=30)
    assert rejected(server, "the client's certificate did not verify")


def test_a_wrong_authkey_inside_tls_is_still_refused(server, certs):
    with pytest.raises(rpc.AuthenticationError):
        rpc.connect(server.address, authkey=b"not the key" * 4, tls=str(certs.ca), connect_timeout=30)
    assert rejected(server, "digest received was wrong")


def test_tls_over_a_unix_socket_needs_a_context_without_hostname_checks(tmp_path):
    with pytest.raises(rpc.ConfigError, match="no hostname to check"):
        rpc.connect(str(tmp_path / "rpc.sock"), tls=True)


# -- the asyncio client --------------------------------------------------------------------------------


def test_aio_calls_streams_cancel_and_a_large_echo_over_tls(rpc_server, certs, tmp_path):
    server = rpc_server("stream_services:registry", **certs.server_options())
    calls = rpc_server("services:registry", **certs.server_options(workers=1))
    gate = Gate(tmp_path)

    async def main() -> None:
        async with rpc.aio.connect(server.address, server.authkey, timeout=30, tls=str(certs.ca)) as client:
            assert await client.add(2, 3) == 5
            assert [i async for i in await client.count(100)] == list(range(100))
        async with rpc.aio.connect(calls.address, calls.authkey, timeout=30, tls=str(certs.ca)) as client:
            payload = b"z" * (1 << 20)
            assert await client.echo(payload) == payload
            assert await client.kwargs_echo(1, b=2) == [[1], {"b": 2}]
            with pytest.raises(ValueError):
                await client.fail("ValueError")
            task = asyncio.ensure_future(client.hold(*gate.args()))
            await asyncio.get_running_loop().run_in_executor(None, gate.wait_started)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await client.add(1, 1) == 2

    asyncio.run(main())
    assert log_has(calls, "was cancelled by its caller")


@pytest.mark.parametrize(
    "case, match, logged",
    [
        # (asyncio's client closes without an alert: the server can only say when it closed)
        ("unknown CA", "certificate verify failed: unable to get local issuer certificate", "during the TLS handshake"),
        ("plain server", "does not speak TLS", "the client speaks TLS"),
        ("plain client", "speaks TLS: connect with tls=", "the client sent nothing"),
        ("no client certificate", "requires a client certificate", "the client sent no certificate"),
    ],
)
def test_aio_failures(rpc_server, certs, case, match, logged):
    tls: object = str(certs.ca)
    if case == "unknown CA":
        server = rpc_server("services:registry", **certs.server_options(certs.stranger))
    elif case == "plain server":
        server = rpc_server("services:registry", transport="tcp")
    elif case == "plain client":
        server = rpc_server("services:registry", **certs.server_options(handshake_timeout=0.5))
        tls = None
    else:
        server = rpc_server("services:registry", **certs.server_options(tls_client_ca_file=str(certs.ca)))

    async def main() -> None:
        client = await rpc.aio.connect(server.address, server.authkey, tls=tls, connect_timeout=30)
        await client.add(1, 2)  # (a missing client certificate is refused after the client's side is done)

    with pytest.raises(rpc.TLSError, match=match):
        asyncio.run(main())
    assert rejected(server, logged)


# -- configuration ---------------------------------------------------------------------------------------


def test_tls_settings_are_checked_naming_the_key(certs, tmp_path):
    with pytest.raises(rpc.ConfigError, match="tls_key_file is not set, but tls_cert_file is"):
        rpc.ServerConfig(tls_cert_file=str(certs.server.cert))
    with pytest.raises(rpc.ConfigError, match="tls_cert_file is not set, but tls_key_file is"):
        rpc.ServerConfig(tls_key_file=str(certs.server.key))
    with pytest.raises(rpc.ConfigError, match=f"tls_cert_file {tmp_path}/missing.pem cannot be read"):
        rpc.ServerConfig(tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file=str(certs.server.key))
    with pytest.raises(rpc.ConfigError, match="tls_client_ca_file requires TLS"):
        rpc.ServerConfig(tls_client_ca_file=str(certs.ca))
    with pytest.raises(rpc.ConfigError, match="tls_key_file .* is not the key of the certificate"):
        rpc.Server("services:registry", tls_cert_file=str(certs.server.cert), tls_key_file=str(certs.client.key))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(rpc.ConfigError, match="must be a PEM certificate"):
        rpc.Server("services:registry", tls_cert_file=str(not_pem), tls_key_file=str(certs.server.key))
    with pytest.raises(rpc.ConfigError, match="the CA file .* does not exist"):
        rpc.connect(("127.0.0.1", 1), tls=str(tmp_path / "missing.pem"))


def test_config_file_keys_for_server_and_client(certs, tmp_path):
    from rpc.config import load_settings

    folder = tmp_path / "conf"
    folder.mkdir()
    for name, source in (("cert.pem", certs.server.cert), ("key.pem", certs.server.key), ("ca.pem", certs.ca)):
        (folder / name).write_bytes(source.read_bytes())
    config = folder / "rpc.toml"
    config.write_text('tls_cert_file = "cert.pem"\ntls_key_file = "key.pem"\ntls_ca_file = "ca.pem"\n')
    settings = load_settings(config, {}, {})
    server_config = settings.server_config(b"k" * 32)
    assert server_config.tls and server_config.tls_cert_file == str(folder / "cert.pem")  # relative to the file
    assert settings.client_tls() == str(folder / "ca.pem")
    assert load_settings(None, {"RPC_TLS": "true"}, {}).client_tls() is True
    assert load_settings(config, {"RPC_TLS": "false"}, {}).client_tls() is False
    assert load_settings(None, {}, {}).client_tls() is False
    with pytest.raises(rpc.ConfigError, match="tls = true is the clients' key"):
        load_settings(None, {"RPC_TLS": "1"}, {}).server_config(b"k" * 32)


def test_a_daemon_on_a_network_address_without_tls_warns(tmp_path, certs):
    plain_log, tls_log = tmp_path / "plain.log", tmp_path / "tls.log"
    options = {"authkey": b"k" * 32, "workers": 1, "start_method": DEFAULT_START_METHOD}
    with rpc.Server("services:registry", address=("0.0.0.0", 0), log_file=str(plain_log), **options):
        pass
    text = plain_log.read_text()
    assert "listening_without_tls" in text and "traffic (arguments and results) is readable on the network" in text
    tls = {"tls_cert_file": str(certs.server.cert), "tls_key_file": str(certs.server.key)}
    with rpc.Server("services:registry", address=("0.0.0.0", 0), log_file=str(tls_log), **options, **tls):
        pass
    assert "listening" in tls_log.read_text() and "listening_without_tls" not in tls_log.read_text()


def test_a_client_of_several_tls_servers_moves_on_when_one_goes_away(certs, tmp_path):
    """The list of addresses and the go-away work inside TLS, for both clients: the server a
    client is on closes, and its next call goes to the other one, over TLS too."""
    import secrets

    authkey = secrets.token_bytes(32)
    options = {"tls_cert_file": str(certs.server.cert), "tls_key_file": str(certs.server.key), "workers": 1}
    servers = [
        rpc.Server("services:registry", address=("127.0.0.1", 0), authkey=authkey, log_file=str(tmp_path / f"s{i}.log"),
                   log_format="console", **options).start()
        for i in range(2)
    ]
    addresses = [server.address for server in servers]
    try:
        with rpc.connect(addresses, authkey=authkey, timeout=30, tls=str(certs.ca)) as client:
            assert client.add(2, 3) == 5
            first = client.address
            servers[addresses.index(first)].close()
            assert client.add(3, 4) == 7  # made on the other server
            assert client.address != first

        async def main() -> None:
            async with rpc.aio.connect(addresses, authkey=authkey, timeout=30, tls=str(certs.ca)) as client:
                assert await client.add(2, 3) == 5
                assert client.address != first  # the only server left

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        for server in servers:
            server.close()
