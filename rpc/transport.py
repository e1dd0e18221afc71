"""Sockets under ``multiprocessing.connection``: listen, accept, connect, authenticate.

rpc keeps the framing and the HMAC challenge of ``multiprocessing.connection``
(the challenge in rpc's own code, :mod:`rpc.handshake`) but opens its own sockets, because ``Listener.accept()`` runs the handshake on the
accepting thread (one silent client would stall every other) and ``Client()``
has no connect or handshake deadline. Nothing here knows about messages.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
import stat
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Union

from .errors import (
    AuthenticationError,
    ConfigError,
    ConnectionClosed,
    ConnectTimeout,
    MessageTooLarge,
    ProtocolError,
    StartupError,
    TLSError,
)
from .framing import FrameReader, SendTimeout, send_frame
from .handshake import ClientHandshake
from .tls import ClientTLS, client_error, server_hostname, speaks_tls, tls_server_error

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+

__all__ = [
    "Address",
    "ListeningSocket",
    "connect",
    "is_loopback",
    "format_address",
    "parse_address",
    "shutdown",
    "client_handshake",
    "start_tls",
    "TLS_HINT",
]

# What a client without TLS is told when the server says nothing, or closes without a word.
TLS_HINT = (
    "a server with TLS waits for the client to begin and closes it after its handshake_timeout: "
    "if it has TLS, connect with tls=True (the system's CAs) or tls='ca.pem'"
)

# (host, port) for TCP; a filesystem path for a Unix socket.
Address = Union[tuple[str, int], str]


def is_unix(address: Address) -> TypeIs[str]:
    return isinstance(address, (str, os.PathLike))


def is_loopback(address: Address) -> bool:
    """Unix sockets and loopback IPs are local; every other host is not."""
    if is_unix(address):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(address: Address) -> str:
    if is_unix(address):
        return str(address)
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_path(path: str) -> str:
    """``path`` as text that :func:`parse_address` reads back as this path ("a:1" becomes "./a:1")."""
    return path if "/" in path or ":" not in path else os.path.join(".", path)


def parse_address(text: str) -> Address:
    """One rule for text addresses, for the command line and the Python API alike.

    ``HOST:PORT`` or ``[v6 host]:PORT`` is TCP; text with a ``/``, text without a
    ``:``, or text after ``unix:`` is a Unix socket path.
    """
    if text.startswith("unix:"):
        return unix_path(text[len("unix:") :])
    if "/" in text or ":" not in text:
        if not text:
            raise ConfigError("a Unix socket path must not be empty")
        return text
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit():
        raise ConfigError(
            f"address {text!r} must be HOST:PORT or a Unix socket path (write ./{text} or unix:{text} for a socket file)"
        )
    if not 0 <= int(port) < 65536:
        raise ConfigError(f"address {text!r}: port {int(port)} is out of range (0-65535)")
    return (host, int(port))


def _check_address(address: object) -> Address:
    if isinstance(address, os.PathLike):
        path = os.fspath(address)
        if not isinstance(path, str) or not path:
            raise ConfigError(f"a Unix socket path must be non-empty text, not {path!r}")
        return path
    if isinstance(address, str):
        return parse_address(address)
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str) and isinstance(address[1], int):
        if not 0 <= address[1] < 65536:
            raise ConfigError(f"address {address!r}: port {address[1]} is out of range (0-65535)")
        return address
    raise ConfigError(f"address must be (host, port) or a Unix socket path, not {address!r}")


def _family(address: Address) -> socket.AddressFamily:
    if is_unix(address):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def set_stream_options(sock: socket.socket) -> None:
    """No Nagle delay (pipelined small frames would stall ~40 ms) and TCP keepalive."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _with_socket(conn: Connection, action: str, *args: object) -> None:
    """Run a socket method on a Connection's descriptor without taking ownership of it."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        getattr(sock, action)(*args)
    finally:
        sock.detach()


def shutdown(conn: Connection) -> None:
    """Wake any thread blocked reading or writing ``conn``; the owner then closes it."""
    try:
        _with_socket(conn, "shutdown", socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


class ListeningSocket:
    """A bound, listening socket whose ``accept()`` never blocks and never authenticates."""

    def __init__(self, address: object, backlog: int = 1024, unix_mode: int | None = 0o600) -> None:
        address = _check_address(address)
        self._unix_path: str | None = None
        sock = socket.socket(_family(address), socket.SOCK_STREAM)
        try:
            if is_unix(address):
                _remove_stale_socket(address)
                sock.bind(address)
                self._unix_path = address
                self._unix_inode = os.stat(address).st_ino
                if unix_mode is not None:
                    os.chmod(address, unix_mode)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {format_address(address)}: {exc.strerror or exc}") from exc
        self._sock = sock
        self.address: Address = address if is_unix(address) else sock.getsockname()[:2]

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def sock(self) -> socket.socket:
        """The listening socket itself, for an event loop to accept on."""
        return self._sock

    def close(self) -> None:
        self._sock.close()
        path = self._unix_path
        if path is not None:
            self._unix_path = None
            try:
                if os.stat(path).st_ino == self._unix_inode:  # only remove our own socket file
                    os.unlink(path)
            except FileNotFoundError:
                pass


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a server that is gone; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"cannot listen on {path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError:
        return  # let bind() report what is wrong
    finally:
        probe.close()
    in_use = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    raise StartupError(f"cannot listen on {path}: another server is listening there") from in_use


def connect(address: object, timeout: float, allowed: float | None = None) -> Connection:
    """Open a stream connection within ``timeout`` seconds, not yet authenticated.

    ``allowed`` is the timeout a ConnectTimeout names, if not ``timeout`` (a retry
    that has only what is left of the caller's connect_timeout names all of it).
    """
    address = _check_address(address)
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        set_stream_options(sock)
    except socket.timeout:
        sock.close()
        raise ConnectTimeout(f"connecting to {format_address(address)} took longer than {allowed or timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise ConnectionClosed(f"cannot connect: {_connect_failure(address, exc)}") from None
    return Connection(sock.detach())


def _connect_failure(address: Address, exc: OSError) -> str:
    """Why a connect failed, worded for someone who may not have started the server."""
    where = format_address(address)
    if exc.errno == errno.ECONNREFUSED:
        reason = "a socket file left by a server that stopped" if is_unix(address) else "connection refused"
    elif exc.errno == errno.ENOENT and is_unix(address):
        reason = "no such socket file"
    else:
        return f"{where}: {exc.strerror or exc}"
    return f"nothing is listening at {where} ({reason}); is the server running? Start it with `rpc serve`"


def start_tls(sock: socket.socket, context: ssl.SSLContext, address: Address, deadline: float, timeout: float) -> ClientTLS:
    """The TLS handshake on the connected ``sock`` by ``deadline``; ``timeout`` only words the errors."""
    where = format_address(address)
    tls = ClientTLS(sock, context, server_hostname(address, context))
    try:
        tls.handshake(deadline)
    except (TimeoutError, SendTimeout):
        if not tls.first:
            raise ConnectTimeout(
                f"connected to {where}, but it did not answer the TLS handshake within {timeout:g} s: "
                "is an rpc server with TLS listening there?"
            ) from None
        raise ConnectTimeout(f"{where} did not complete the TLS handshake within {timeout:g} s") from None
    except ssl.SSLError as exc:
        raise client_error(exc, where, tls.first) from None
    except (EOFError, OSError) as exc:
        if not tls.first:
            raise ConnectionClosed(
                f"{where} closed the connection at the start of the TLS handshake: is it an rpc server with TLS? ({exc})"
            ) from None
        raise ConnectionClosed(f"{where} closed the connection during the TLS handshake: {exc}") from None
    return tls


def client_handshake(
    conn: Connection | socket.socket,
    authkey: bytes | None,
    deadline: float,
    address: Address | None = None,
    timeout: float | None = None,
    tls: ClientTLS | None = None,
) -> bytes:
    """Authenticate to the server; returns the server's first message after it (its hello).

    rpc's own :class:`~rpc.handshake.ClientHandshake` decides each step; this only
    moves its frames, all under one ``deadline`` for the whole exchange (a socket
    timeout would bound each ``recv()`` only, and a server trickling a byte at a
    time could hold the client for as long as it liked). The server's first
    message is read before anything is sent, so a missing or unexpected key gives
    a clear :class:`AuthenticationError`, never a decode error. ``address`` and
    ``timeout`` only word the errors. With ``tls`` (its handshake done), frames go
    through it.
    """
    where = "the server" if address is None else format_address(address)
    handshake = ClientHandshake(authkey, where)
    frames = FrameReader(conn.fileno(), handshake.limit, tls)
    sock = socket.socket(fileno=conn.fileno())  # borrowed: detached below, it belongs to ``conn``
    heard = tls is not None  # whether the server sent anything at all
    try:
        while not handshake.done:
            frames.max_bytes = handshake.limit
            try:
                frame = frames.read(deadline)
            finally:
                heard = heard or frames.buffered > 0
            if frame is None:
                raise TimeoutError
            heard = True
            try:
                replies = handshake.receive(frame)
            except AuthenticationError:
                if handshake.farewell is not None:
                    _send(sock, tls, handshake.farewell, deadline)
                raise
            for reply in replies:
                _send(sock, tls, reply, deadline)
        if frames.buffered:  # bytes read past the hello would be lost
            raise ProtocolError("the server sent more than its hello before the client's hello")
        assert handshake.hello is not None
        return handshake.hello
    except (TimeoutError, SendTimeout):
        within = "" if timeout is None else f" within {timeout:g} s"
        if not heard:
            raise ConnectTimeout(
                f"connected to {where}, but nothing answered{within}: is an rpc server listening there? ({TLS_HINT})"
            ) from None
        raise ConnectTimeout(f"{where} did not complete the handshake{within}") from None
    except MessageTooLarge as exc:
        size = getattr(exc, "size", "too many")
        if tls is None and speaks_tls(size):
            raise tls_server_error(where) from None
        raise MessageTooLarge(
            f"{where} sent a handshake message announcing {size} bytes; at most "
            f"{frames.max_bytes} are accepted there: is an rpc server listening there?"
        ) from None
    except TLSError:
        raise
    except (EOFError, OSError) as exc:
        if not heard:
            raise ConnectionClosed(f"{where} closed the connection without a word ({TLS_HINT})") from None
        raise ConnectionClosed(f"the server closed the connection during the handshake: {exc or 'EOF'}") from None
    finally:
        sock.detach()


def _send(sock: socket.socket, tls: ClientTLS | None, frame: bytes, deadline: float) -> None:
    if tls is None:
        send_frame(sock, frame, deadline)
    else:
        tls.send_frame(frame, deadline)
