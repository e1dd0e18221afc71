"""rpc: remote procedure calls over authenticated ``multiprocessing.connection`` sockets.

A :class:`Server` runs the functions of a :class:`Registry` in a pool of handler
processes; :func:`connect` returns a client whose attributes call them.
"""

__version__ = "0.1.0"

from .client import Client, Stream, connect
from .config import ServerConfig, read_authkey
from .errors import (
    AuthenticationError,
    CallError,
    CallCancelled,
    CallTimeout,
    ConfigError,
    ConnectionClosed,
    ConnectTimeout,
    MessageTooLarge,
    MethodNotFound,
    ProtocolError,
    RemoteError,
    RPCError,
    SerializationError,
    ServerBusy,
    ServerShuttingDown,
    StartupError,
    TLSError,
    TransportError,
    WorkerCrashed,
)
from .protocol import register_type
from .registry import MethodInfo, Registry
from .server import Server

__all__ = [
    "__version__",
    "Registry",
    "MethodInfo",
    "Server",
    "ServerConfig",
    "Client",
    "Stream",
    "connect",
    "read_authkey",
    "register_type",
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
]
