"""The errors rpc raises, all rooted at :class:`RPCError`.

Transport errors (the connection is gone or unusable) are kept apart from call
errors (this one call failed, the connection is fine), so callers can decide
whether to retry or reconnect by class. Each error has a ``code``: the
language-neutral name it travels under on the wire.
"""

from __future__ import annotations

import builtins
import multiprocessing
import ssl

__all__ = [
    "RPCError",
    "ConfigError",
    "StartupError",
    "TransportError",
    "AuthenticationError",
    "ConnectionClosed",
    "ConnectTimeout",
    "TLSError",
    "ProtocolError",
    "MessageTooLarge",
    "CallError",
    "MethodNotFound",
    "RemoteError",
    "CallTimeout",
    "CallCancelled",
    "WorkerCrashed",
    "SerializationError",
    "ServerBusy",
    "ServerShuttingDown",
    "error_for_code",
    "remote_error_class",
    "wire_type_name",
]


class RPCError(Exception):
    """Root of every error rpc raises."""

    code = "rpc_error"

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(RPCError, ValueError):
    """A server or client option is missing, malformed or unsafe (raised before anything starts)."""

    code = "config_error"


class StartupError(RPCError):
    """The server could not start: the address is taken, or a handler could not import the registry."""

    code = "startup_error"


# -- transport errors: the connection is unusable -------------------------------


class TransportError(RPCError):
    """The connection failed; every call in flight on it fails too."""

    code = "transport_error"


class AuthenticationError(TransportError, multiprocessing.AuthenticationError):
    """The authkey was wrong, missing on one side, or the handshake did not finish in time."""

    code = "authentication_error"


class ConnectionClosed(TransportError, ConnectionError):
    """The connection ended; calls in flight on it fail with this."""

    code = "connection_closed"


class ConnectTimeout(TransportError, TimeoutError):
    """Connecting, or the handshake after it, did not finish within the connect timeout."""

    code = "connect_timeout"


class TLSError(TransportError, ssl.SSLError):
    """TLS failed: the server's certificate did not verify, one side does not speak TLS, or
    the peer refused the handshake (a client certificate missing, say). The message says which;
    ``reason`` is OpenSSL's name for the failure, as on :class:`ssl.SSLError`."""

    code = "tls_error"
    reason = ""
    library = ""


class ProtocolError(TransportError):
    """A frame could not be decoded or did not follow the message layout.

    ``request_id`` is the id of the offending request when it could be read.
    """

    code = "protocol_error"
    request_id: int | None = None


class MessageTooLarge(ProtocolError):
    """A frame is larger than the receiver's ``max_message_bytes``."""

    code = "message_too_large"


# -- call errors: this call failed, the connection is fine ------------------------


class CallError(RPCError):
    """One call failed; the connection stays usable."""

    code = "call_error"


class MethodNotFound(CallError):
    """The name is not registered on the server (private ``_names`` never are)."""

    code = "method_not_found"


class CallTimeout(CallError, TimeoutError):
    """The call's deadline passed: the client's timeout or the server's ``max_call_seconds``."""

    code = "call_timeout"


class WorkerCrashed(CallError):
    """The handler process died while running this call; the server replaced it."""

    code = "worker_crashed"


class CallCancelled(CallError):
    """The caller cancelled the call: it never ran, or its handler was stopped (and replaced).

    Clients raise the standard ``CancelledError`` (asyncio's or concurrent.futures')
    for a call they cancelled; this is its answer on the wire.
    """

    code = "call_cancelled"


class SerializationError(CallError, TypeError):
    """An argument or result cannot be encoded (arguments fail on the client, before sending)."""

    code = "serialization_error"


class ServerBusy(CallError):
    """The server's bounded queue of waiting calls is full; the call did not run."""

    code = "server_busy"


class ServerShuttingDown(ServerBusy):
    """The server is shutting down and did not run the call."""

    code = "server_shutting_down"


class RemoteError(CallError):
    """The remote function raised.

    ``type_name`` is the remote exception's qualified class name, ``message`` its
    text and ``remote_traceback`` the server's traceback text (empty when the
    server does not send tracebacks). A builtin remote exception arrives as a class
    that is both ``RemoteError`` and the builtin, so ``except KeyError`` works.
    """

    code = "remote_error"

    def __init__(
        self,
        message: str = "",
        *args: object,
        type_name: str = "Exception",
        remote_traceback: str = "",
    ) -> None:
        # Bypass the builtin's own __init__: some (UnicodeDecodeError, ...) demand
        # arguments a remote error cannot supply.
        Exception.__init__(self, *(args or (message,)))
        self.message = message
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


_BY_CODE: dict[str, type[RPCError]] = {
    cls.code: cls
    for cls in (
        RPCError,
        ConfigError,
        StartupError,
        TransportError,
        AuthenticationError,
        ConnectionClosed,
        ConnectTimeout,
        TLSError,
        ProtocolError,
        MessageTooLarge,
        CallError,
        MethodNotFound,
        CallTimeout,
        CallCancelled,
        WorkerCrashed,
        SerializationError,
        ServerBusy,
        ServerShuttingDown,
        RemoteError,
    )
}


def wire_type_name(cls: type) -> str:
    """The ``type`` an exception class travels under: ``module.QualName``, bare for builtins.

    The name Python's traceback prints (which also leaves ``__main__`` bare; here a
    bare name always means a builtin, so clients can map it to their own class).
    """
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module if isinstance(module, str) else '<unknown>'}.{cls.__qualname__}"


def error_for_code(code: str) -> type[RPCError]:
    """The error class for a wire code; unknown codes map to :class:`RPCError`."""
    return _BY_CODE.get(code, RPCError)


# Dual classes made so far, keyed by builtin exception name: bounded by the names in
# ``builtins``, since any other name a server sends maps to RemoteError uncached.
_remote_classes: dict[str, type[RemoteError]] = {}


def remote_error_class(type_name: str) -> type[RemoteError]:
    """The class to raise for a remote exception named ``type_name``.

    Only builtin exception types get a dual class; anything else is a plain
    :class:`RemoteError`, so nothing of the server's is ever instantiated here.
    ``StopIteration`` and ``StopAsyncIteration`` stay plain too: they steer loops.
    """
    cls = _remote_classes.get(type_name)
    if cls is not None:
        return cls
    builtin = getattr(builtins, type_name, None) if type(type_name) is str else None
    if not (isinstance(builtin, type) and issubclass(builtin, Exception) and not issubclass(builtin, RPCError)):
        return RemoteError  # not cached: a server may send any number of distinct names
    if issubclass(builtin, (StopIteration, StopAsyncIteration)):
        # They steer iteration: raised in a caller's generator, one would silently end it
        # (or become RuntimeError); a remote one is a failure, nothing more.
        return RemoteError
    try:
        cls = type(f"Remote{type_name}", (RemoteError, builtin), {"__module__": __name__})
        cls("probe", type_name=type_name)  # some builtins (ExceptionGroup) need more to exist
    except TypeError:  # an incompatible layout or constructor: keep the plain class
        cls = RemoteError
    _remote_classes[type_name] = cls
    return cls
