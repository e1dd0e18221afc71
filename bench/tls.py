"""The ``tls`` section: what TLS costs, as ratios against the same server without it, in the same run.

Three rpc servers on TCP: with TLS, without (as deployed: the lease, its latency
fast path, on), and without TLS with the lease off (every call routed, as every
call is under TLS: the cost of TLS alone). Sequential ``add(1, 2)`` latency with
every process pinned to one CPU (unpinned beside it, for information), the echo
of 1 MiB, and connect + handshakes + first call. The certificate is made with
the README's ``openssl`` commands (or the ``cryptography`` package where the
``openssl`` command is missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any

import rpc

from .callers import Caller, connect
from .procs import SELF, pinned
from .report import Row, compare
from .servers import AUTHKEY, RpcServer

TCP = ("127.0.0.1", 0)
BULK = 1 << 20

# The README's commands (section TLS): a CA, and a certificate it signs for localhost and 127.0.0.1.
OPENSSL = """\
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=rpc test CA" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout ca.key -out ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=critical,CA:FALSE\\nkeyUsage=critical,digitalSignature\\nextendedKeyUsage=serverAuth\\nauthorityKeyIdentifier=keyid\\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -extfile server.ext -out server.pem
"""


def make_certificate(folder: str) -> tuple[str, str, str]:
    """(CA file, server certificate, server key) in ``folder``, for 127.0.0.1 and localhost."""
    if shutil.which("openssl"):
        subprocess.run(["sh", "-e", "-c", OPENSSL], cwd=folder, check=True, capture_output=True, timeout=60)
    else:
        _with_cryptography(folder)
    return tuple(os.path.join(folder, name) for name in ("ca.pem", "server.pem", "server.key"))  # type: ignore[return-value]


def _with_cryptography(folder: str) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rpc test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    with open(os.path.join(folder, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(os.path.join(folder, "server.pem"), "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(os.path.join(folder, "server.key"), "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def tls(s: Any) -> list[Row]:
    from .suite import _connected, _pin_label, _time_in_turn  # (suite imports this module for SECTIONS)

    with tempfile.TemporaryDirectory() as tmp:
        ca, cert, key = make_certificate(tmp)
        with (
            RpcServer(TCP, tls_cert_file=cert, tls_key_file=key) as secure,
            RpcServer(TCP) as plain,
            RpcServer(TCP, lease=False) as routed,
        ):
            servers = {"tls": secure, "plain": plain, "routed": routed}
            tls_of = {"tls": ca, "plain": None, "routed": None}
            groups = {name: server.groups() for name, server in servers.items()}
            everyone = [SELF, *(pid for server in servers.values() for pid in server.pids())]
            rows: list[Row] = []
            for what, method, args, calls in (
                ("add(1, 2) sequential", "add", (1, 2), s.calls),
                (f"echo of {BULK >> 20} MiB", "echo", (os.urandom(BULK),), max(2, s.bulk_bytes // BULK)),
            ):
                callers = {name: connect("rpc", server.address, method, args, tls=tls_of[name]) for name, server in servers.items()}
                with _connected(callers):
                    for pin in (True, False):
                        with pinned(everyone, pin):
                            t = _time_in_turn(s, callers, groups, calls)
                        label = f"{what}, tcp, {_pin_label(pin)}"
                        mine = t["tls"]
                        for name, baseline in (("routed", "no TLS, lease off (routed, as under TLS)"),
                                               ("plain", "no TLS, lease on (the default)")):
                            if method == "echo":
                                rows.append(compare("tls", label, BULK / mine.us, "MB/s", baseline, BULK / t[name].us,
                                                    target="reported", cpu=mine.cpu_us(), baseline_cpu=t[name].cpu_us()))
                            else:
                                rows.append(compare("tls", label, mine.us, "us/call", baseline, t[name].us,
                                                    target="reported", cpu=mine.cpu_us(), baseline_cpu=t[name].cpu_us()))
            rows.append(_connect_time(s, secure, routed, ca))
    return rows


def _connect_time(s: Any, secure: RpcServer, plain: RpcServer, ca: str) -> Row:
    from .suite import _time_in_turn

    def once(address: Any, tls: str | None) -> Caller:
        def run() -> None:
            with rpc.connect(address, authkey=AUTHKEY, tls=tls) as client:
                client.add(1, 2)

        return Caller(run, lambda: None)

    count = max(10, s.calls // 100)
    callers = {"tls": once(secure.address, ca), "plain": once(plain.address, None)}
    t = _time_in_turn(s, callers, {"tls": secure.groups(), "plain": plain.groups()}, count)
    return compare("tls", "connect + TLS and authkey handshakes + first call, tcp", t["tls"].us / 1e3, "ms",
                   "the same without TLS", t["plain"].us / 1e3, target="reported",
                   cpu=t["tls"].cpu_us(), baseline_cpu=t["plain"].cpu_us())
