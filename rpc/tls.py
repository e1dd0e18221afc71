"""TLS under the frames: the contexts, the server's layer, the sync client's channel, the errors.

The authkey handshake and everything after it run inside TLS unchanged: TLS
encrypts and authenticates the server (and the client, with client certificates);
the authkey still decides who may call.

Both ends keep TLS in memory (:class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`),
with the raw socket in rpc's own hands:

- The router's connections get :class:`ServerTLS`, a layer between the socket's
  transport and the connection's protocol. It is that protocol's transport, so
  the router's code is the same with or without TLS: its limits, receive budget
  and backpressure apply to the decrypted bytes, and its write buffer is the
  socket's, ciphertext counted (nothing is held back unseen). A TLS handshake
  that fails ends the connection through the protocol (a ``client_rejected``
  line with the reason), and it runs under the connection's handshake timer.
- The sync client gets :class:`ClientTLS`: several threads share a client (one
  reads while another sends), which one :class:`ssl.SSLSocket` does not allow,
  so every use of the TLS state is under a lock and the socket is read and
  written around it, under the client's own deadlines.
- The asyncio client uses asyncio's own TLS support.

A socket lent to a handler (:mod:`rpc.lease`) would leave its TLS state behind in
the router, so TLS connections are always routed.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import socket
import ssl
import threading
import time
from typing import Any, Protocol, Union, cast

from .errors import ConfigError, TLSError
from .framing import SendTimeout, frame_header

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "TLSOption",
    "client_context",
    "client_error",
    "server_context",
    "server_hostname",
    "server_reason",
    "speaks_tls",
    "tls_server_error",
]

#: what ``tls=`` takes on the clients: True (the system's CAs), a CA file, or a context
TLSOption = Union[bool, str, "os.PathLike[str]", ssl.SSLContext, None]

_RAW_BYTES = 256 * 1024  # ciphertext read from a socket at once
_JOIN_BYTES = 1 << 16  # a frame up to this size is encrypted with its header, as one record
_TLS_RECORD_TYPES = range(0x14, 0x19)  # the first byte of any TLS record (change cipher spec .. heartbeat)
# Errors that say the peer sent something that is not TLS at all.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                      "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "UNSUPPORTED_PROTOCOL"})
_HINT = "connect with tls=True (the system's CAs), tls='ca.pem' (a CA file) or an ssl.SSLContext"
# A fatal handshake_failure alert, as a TLS server sends it before closing a handshake it gives up on.
# A client without TLS reads its first bytes as a frame's length: see speaks_tls.
_GIVE_UP_ALERT = bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28))


# -- contexts -----------------------------------------------------------------------------


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """The server's context: the ssl module's secure defaults, TLS 1.2 or later, and client
    certificates required (and checked against ``client_ca_file``) if it is given.

    A file that cannot be used raises :class:`ConfigError` naming its key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"tls_key_file {key_file} is not the key of the certificate in tls_cert_file {cert_file}") from None
        raise ConfigError(
            f"tls_cert_file {cert_file} and tls_key_file {key_file} must be a PEM certificate (chain) and its "
            f"unencrypted PEM private key: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tls_cert_file or tls_key_file cannot be read: {exc.strerror or exc}") from None
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls_client_ca_file {client_ca_file} holds no PEM CA certificate it can use: {exc}") from None
    return context


def client_context(tls: TLSOption) -> ssl.SSLContext | None:
    """The client's context for ``tls``: None for no TLS; True for the system's CAs; a CA
    file's path; or an :class:`ssl.SSLContext`, used as given. Hostnames are checked,
    unless the given context says otherwise."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        context = ssl.create_default_context()
    elif isinstance(tls, (str, os.PathLike)):
        path = os.fspath(tls)
        try:
            context = ssl.create_default_context(cafile=path)
        except FileNotFoundError:
            raise ConfigError(f"tls: the CA file {path} does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls: the CA file {path} holds no PEM CA certificate it can use: {exc}") from None
    else:
        raise TypeError(f"tls must be True, a CA file's path or an ssl.SSLContext, not {type(tls).__name__}")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_hostname(address: object, context: ssl.SSLContext) -> str | None:
    """The name the server's certificate must hold: the address's host; None for a Unix socket
    (refused if the context checks hostnames: there is none to check)."""
    if isinstance(address, tuple):
        return str(address[0])
    if context.check_hostname:
        raise ConfigError(
            "TLS over a Unix socket has no hostname to check: pass tls=ssl.SSLContext with check_hostname=False"
        )
    return None


# -- what went wrong, in words ----------------------------------------------------------------


def client_error(exc: ssl.SSLError, where: str, first: bytes = b"") -> TLSError:
    """A failed TLS handshake (or a TLS alert after it), worded for the client's user.

    ``first``: the first bytes the server sent, if known (a server without TLS speaks first).
    """
    error = _client_error(exc, where, first)
    error.reason, error.library = exc.reason or "", exc.library or ""
    return error


def _client_error(exc: ssl.SSLError, where: str, first: bytes) -> TLSError:
    reason = exc.reason or ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        code = exc.verify_code
        if code in (18, 19, 20, 21):  # self-signed, self-signed in chain, unknown issuer, unverifiable leaf
            hint = "the CA that signed it is not trusted here: pass tls='ca.pem' naming the CA's certificate"
        elif code == 10:
            hint = "the server must be given a new certificate"
        elif code == 62 or "Hostname mismatch" in message or "IP address mismatch" in message:
            hint = "connect by a name or address the certificate holds"
        else:
            hint = ""
        return TLSError(f"{where}: certificate verify failed: {message}" + (f" ({hint})" if hint else ""))
    if reason in _NOT_TLS or (first and first[0] not in _TLS_RECORD_TYPES):
        return TLSError(f"{where} does not speak TLS (the TLS handshake failed: {_words(exc)}): connect without tls")
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED" or reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and "certificate" in str(exc):
        return TLSError(
            f"{where} requires a client certificate and none was sent ({_words(exc)}): pass "
            "tls=ssl.SSLContext with load_cert_chain(cert, key)"
        )
    if "ALERT" in reason:
        return TLSError(f"{where} refused the TLS connection: {_words(exc)}")
    return TLSError(f"TLS with {where} failed: {_words(exc)}")


def speaks_tls(size: object) -> bool:
    """Whether a frame length read from a peer is really the start of a TLS record (a handshake
    message or an alert): the peer speaks TLS. (No frame that long is ever accepted.)"""
    return isinstance(size, int) and size >> 16 in (0x1503, 0x1603)


def tls_server_error(where: str) -> TLSError:
    """For a client without TLS that got a TLS record from ``where``."""
    return TLSError(f"{where} speaks TLS: {_HINT}")


def server_reason(exc: BaseException) -> str:
    """Why a client's TLS handshake failed, for the server's ``client_rejected`` line."""
    if not isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc}"
    reason = exc.reason or ""
    words = _words(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: the client's certificate did not verify: {exc.verify_message or words}"
    if reason in _NOT_TLS:
        return f"TLS handshake failed: the client does not speak TLS ({words})"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "TLS handshake failed: the client sent no certificate (tls_client_ca_file requires one)"
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        return f"TLS handshake failed: the client does not trust this server's certificate ({words}: unknown CA)"
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return f"TLS handshake failed: the client found this server's certificate expired ({words})"
    if reason == "SSLV3_ALERT_BAD_CERTIFICATE":
        return f"TLS handshake failed: the client refused this server's certificate ({words}; a hostname it does not hold?)"
    return f"TLS handshake failed: {words}"


def _words(exc: ssl.SSLError) -> str:
    """OpenSSL's text of an error, without the library and source location."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if text.startswith("["):
        text = text.partition("] ")[2] or text
    return text.rsplit(" (_ssl.c:", 1)[0]


# -- where ciphertext is read ---------------------------------------------------------------------

_local = threading.local()


def _raw_buffer() -> memoryview:
    """Where a thread reads ciphertext off any TLS socket: one buffer per thread, shared by its
    connections, since each read is copied into its connection's TLS state before the next (as
    the router's own scratch buffer is): a thousand idle connections hold no buffer of their own."""
    view: memoryview | None = getattr(_local, "raw", None)
    if view is None:
        view = _local.raw = memoryview(bytearray(_RAW_BYTES))
    return view


# -- the server's layer ------------------------------------------------------------------------



class _Above(Protocol):
    """What the layer needs of the protocol above it (the router's ClientConnection)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def drop(self, reason: str, level: str = "warning") -> None: ...


class ServerTLS(asyncio.BufferedProtocol):
    """TLS for one accepted connection: the socket's protocol, and the transport of ``above``.

    Ciphertext read from the socket is decrypted into ``above``'s buffers while it
    reads; once it pauses, nothing more is decrypted and the socket is not read
    (what is buffered is at most one read). Plaintext written is encrypted and handed
    to the socket's transport at once, so its buffer, its limits and its
    pause_writing/resume_writing are ``above``'s. What ``above`` writes before the
    handshake is done (the authkey challenge) is sent once it is. A failed handshake
    calls ``above.drop(reason)``, after the alert that tells the client why is sent.
    """

    def __init__(self, above: _Above, context: ssl.SSLContext) -> None:
        self.above = above
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._transport: asyncio.Transport | None = None
        self._view = _raw_buffer()  # (made in the loop's thread, which alone reads into it)
        self._secure = False  # the handshake is done
        self._early: list[bytes] = []  # plaintext written before it was
        self._early_bytes = 0
        self._heard = False  # whether the client sent anything
        self._paused = False  # the protocol above reads no more for now
        self._resuming = False  # a decrypting pass is scheduled
        self._closing = False
        self._failed = False

    # -- as the socket's protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # (uvloop's transports are not asyncio's classes)
        self.above.connection_made(self)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._heard = True
        self._incoming.write(self._view[:nbytes])
        if self._secure:
            self._decrypt()
        elif not self._failed:
            self._handshake()

    def eof_received(self) -> bool | None:
        self._left_mid_handshake()
        return self.above.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._left_mid_handshake()
        self._closing = True
        self.above.connection_lost(exc)

    def _left_mid_handshake(self) -> None:
        """The client closed during the TLS handshake it began: say so (one that refuses the
        server's certificate may close without an alert; asyncio's client does)."""
        if self._heard and not self._secure and not self._failed:
            self._failed = True
            self.above.drop(
                "the client closed the connection during the TLS handshake, without an alert "
                "(did it refuse this server's certificate?)"
            )

    def pause_writing(self) -> None:
        self.above.pause_writing()

    def resume_writing(self) -> None:
        self.above.resume_writing()

    # -- TLS ---------------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._failed = True
            self._early, self._early_bytes = [], 0  # (so the connection closes, not aborts, once the alert is out)
            self._flush()  # the alert that tells the client why
            self.above.drop(server_reason(exc))
            return
        self._secure = True
        early, self._early, self._early_bytes = self._early, [], 0
        self.writelines(early)
        self._decrypt()  # what came with the client's last handshake message

    def _decrypt(self) -> None:
        """Hand the protocol above what can be decrypted, while it reads."""
        ssl_object, incoming = self._ssl, self._incoming
        while not self._paused and not self._closing and (incoming.pending or ssl_object.pending()):
            buffer = self.above.get_buffer(-1)
            try:
                count = cast(int, ssl_object.read(len(buffer), buffer))  # (into a buffer: a count)
            except ssl.SSLWantReadError:
                break  # part of a record: the rest is still to come
            except ssl.SSLError as exc:
                self._failed = True
                self.above.drop(f"TLS failed: {_words(exc)}")
                return
            if not count:  # the client's close_notify: the end of its input
                if not self.above.eof_received():
                    self.close()
                return
            self.above.buffer_updated(count)
        if self._outgoing.pending:  # (TLS 1.3 may answer what it read, e.g. a key update)
            self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending and self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._outgoing.read())

    def handshake_timed_out(self) -> str | None:
        """The connection's handshake timer ran out: why, if TLS is what was unfinished (None if not).

        A client that sent nothing is sent an alert, in clear: a client without TLS,
        waiting for the server to speak first, reads it as the start of a frame and can
        say that the server speaks TLS (see :func:`speaks_tls`).
        """
        if self._secure:
            return None
        self._failed = True
        self._early, self._early_bytes = [], 0  # (so the connection closes, not aborts, once the alert is out)
        if not self._heard:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(_GIVE_UP_ALERT)
            return (
                "TLS handshake timed out: the client sent nothing (a client without TLS waits for the "
                "server to speak first: it must connect with tls=...)"
            )
        return "TLS handshake timed out"

    # -- as the transport of the protocol above ------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._failed or not data:
            return
        if not self._secure:
            self._early.append(bytes(data))
            self._early_bytes += len(data)
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:  # TLS is shut down (the client's close_notify): nothing more goes out
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        if self._closing or self._failed:
            return
        if not self._secure:
            for data in list_of_data:
                self.write(data)
            return
        try:
            for data in list_of_data:
                if data:
                    self._ssl.write(data)
        except ssl.SSLError:  # TLS is shut down (the client's close_notify): nothing more goes out
            self.abort()
            return
        self._flush()

    def get_write_buffer_size(self) -> int:
        unsent = self._transport.get_write_buffer_size() if self._transport is not None else 0
        return unsent + self._early_bytes

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert self._transport is not None
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._transport is not None
        return self._transport.get_write_buffer_limits()

    def is_closing(self) -> bool:
        return self._closing or self._transport is None or self._transport.is_closing()

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._transport is not None and not self._closing:
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()
            if not self._resuming and self._secure:
                # What was read but not decrypted waits in memory: decrypt it, outside this call.
                self._resuming = True
                asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        self._resuming = False
        if self._secure and not self._failed:
            self._decrypt()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close

    def write_eof(self) -> None:
        raise RuntimeError("TLS connections cannot be half-closed")

    def close(self) -> None:
        """Send close_notify and what is unsent, then close the socket."""
        if self._closing:
            return
        self._closing = True
        if self._secure and not self._failed:
            try:
                self._ssl.unwrap()
            except ssl.SSLError:
                pass  # (SSLWantReadError: the client's own close_notify is not awaited)
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._ssl.context
        if name == "peercert":
            return self._ssl.getpeercert() if self._secure else default
        if name == "cipher":
            return self._ssl.cipher() if self._secure else default
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


# -- the sync client's channel ---------------------------------------------------------------------


class ClientTLS:
    """A client's TLS session on a blocking socket, for one reading thread and one sending thread at once.

    The TLS state is only touched under a lock, and only for work in memory; the
    socket is read and written outside it. :meth:`decrypt_into` and :meth:`receive`
    never block unless told to, so :class:`rpc.framing.FrameReader` waits for the
    socket with ``poll()`` under its own deadline, as without TLS. Ciphertext is sent
    in the order it was made, since one thread sends at a time (the caller's lock).
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str | None) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._lock = threading.Lock()
        self.first = b""  # the first bytes the server sent, to tell a server without TLS

    def handshake(self, deadline: float) -> None:
        """The TLS handshake, by ``deadline``: raises TimeoutError, EOFError, or ssl.SSLError."""
        while True:
            try:
                with self._lock:
                    self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_raw(self._outgoing.read(), deadline)
                poller = select.poll()
                poller.register(self._fd, select.POLLIN)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
                    raise TimeoutError from None
                if not self.receive():
                    raise EOFError("the server closed the connection during the TLS handshake") from None
            except ssl.SSLError:
                try:
                    self._send_raw(self._outgoing.read(), time.monotonic() + 0.1)  # the alert saying why
                except (OSError, SendTimeout):
                    pass
                raise
        self._send_raw(self._outgoing.read(), deadline)  # the client's last handshake message

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    def receive(self, block: bool = False) -> bool:
        """Read the ciphertext the socket holds (waiting for some if ``block``); False at its end."""
        view = _raw_buffer()  # (the reading thread's: copied into the TLS state at once)
        try:
            count = self._sock.recv_into(view, 0, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        if not count:
            return False
        if not self.first:
            self.first = bytes(view[:8])
        with self._lock:
            self._incoming.write(view[:count])
        return True

    def decrypt_into(self, buffer: memoryview) -> int | None:
        """Plaintext into ``buffer``: how many bytes, 0 at the server's close_notify, None if
        more ciphertext is needed. A TLS error (an alert from the server) raises :class:`TLSError`."""
        with self._lock:
            if not self._incoming.pending and not self._ssl.pending():
                return None
            try:
                return cast(int, self._ssl.read(len(buffer), buffer))  # (into a buffer: a count)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLError as exc:
                raise client_error(exc, "the server") from None

    def send_frame(self, payload: bytes | bytearray | memoryview, deadline: float | None) -> None:
        """Send ``payload`` as one frame, as :func:`rpc.framing.send_frame` does.

        A frame is part of the TLS stream once encrypted, whatever then reaches the
        socket: a deadline passing before it is all out raises :class:`SendTimeout`
        naming all of it as sent, so the caller closes the connection.
        """
        size = len(payload)
        header = frame_header(size)
        with self._lock:
            if size <= _JOIN_BYTES:
                self._ssl.write(header + bytes(payload))
            else:
                self._ssl.write(header)
                self._ssl.write(payload)
            data = self._outgoing.read()
        try:
            self._send_raw(data, deadline)
        except SendTimeout:
            raise SendTimeout(len(header) + size) from None

    def _send_raw(self, data: bytes, deadline: float | None) -> None:
        if not data:
            return
        view = memoryview(data)
        flags = 0 if deadline is None else socket.MSG_DONTWAIT
        poller: Any = None
        while view:
            try:
                view = view[self._sock.send(view, flags) :]
            except BlockingIOError:
                pass
            if view and deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SendTimeout(len(data) - len(view))
                if poller is None:
                    poller = select.poll()
                    poller.register(self._fd, select.POLLOUT)
                poller.poll(math.ceil(remaining * 1000))
