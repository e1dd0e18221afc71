"""Server settings: one frozen, validated object built at the edge and passed down.

Everything below the command line receives a :class:`ServerConfig`; nothing else
reads the environment or global settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from . import protocol
from .errors import ConfigError
from .logs import LOG_FORMATS, LOG_LEVELS
from .transport import Address, _check_address, format_address, is_loopback

__all__ = ["ServerConfig", "START_METHODS"]

START_METHODS = ("spawn", "forkserver")


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of a server. Build with keywords; invalid values raise :class:`ConfigError`."""

    address: Address = ("127.0.0.1", 0)
    #: None: no authentication (refused on non-loopback addresses). Never shown in repr.
    authkey: bytes | None = field(default=None, repr=False)
    #: handler processes; default: the number of CPUs
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: largest frame accepted from a client, and largest result sent back
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    #: server-side cap on any call's run time; None: only the client's timeout applies
    max_call_seconds: float | None = None
    #: a new connection must finish the authkey handshake within this many seconds
    handshake_timeout: float = 5.0
    #: calls that may wait for a free handler before new ones get ServerBusy
    max_pending: int = 1024
    #: on close, how long calls in flight may take to finish
    shutdown_grace: float = 10.0
    #: listen() backlog: room for a burst of connections before the kernel refuses them
    backlog: int = 1024
    #: how handler processes start ("spawn" or "forkserver"; never "fork": the server runs threads)
    start_method: str = "spawn"
    #: how long a handler may take to start and import the registry
    startup_timeout: float = 60.0
    #: whether remote errors carry the server's traceback text
    tracebacks: bool = True
    #: one log event per call (method, id, peer, pid, duration, outcome)
    access_log: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    #: permissions of a Unix socket file; None leaves the umask's choice
    unix_socket_mode: int | None = 0o600
    #: a client that does not read its replies for this long is dropped
    send_timeout: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _check_address(self.address))
        if self.authkey is not None:
            if isinstance(self.authkey, str):
                raise ConfigError("authkey must be bytes, not str (use b'...' or .encode())")
            if not isinstance(self.authkey, (bytes, bytearray)):
                raise ConfigError(f"authkey must be bytes, not {type(self.authkey).__name__}")
            if not self.authkey:
                raise ConfigError("authkey must not be empty")
            object.__setattr__(self, "authkey", bytes(self.authkey))
        if self.authkey is None and not is_loopback(self.address):
            raise ConfigError(
                f"refusing to listen on {format_address(self.address)} without an authkey: "
                "anyone who can reach it could run the exposed functions"
            )
        _positive_int(self, "workers")
        _positive_int(self, "max_message_bytes")
        _positive_int(self, "backlog")
        _non_negative_int(self, "max_pending")
        for name in ("handshake_timeout", "shutdown_grace", "startup_timeout", "send_timeout"):
            _non_negative_number(self, name)
        if self.max_call_seconds is not None:
            _non_negative_number(self, "max_call_seconds")
        if self.start_method not in START_METHODS:
            raise ConfigError(f"start_method must be one of {', '.join(START_METHODS)}, not {self.start_method!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def build(cls, **options: Any) -> ServerConfig:
        """A config from keywords, naming any unknown option in the error."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown server option(s): {', '.join(unknown)}; known: {', '.join(cls.names())}")
        return cls(**options)


def _positive_int(config: ServerConfig, name: str) -> None:
    value = getattr(config, name)
    if type(value) is not int or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, not {value!r}")


def _non_negative_int(config: ServerConfig, name: str) -> None:
    value = getattr(config, name)
    if type(value) is not int or value < 0:
        raise ConfigError(f"{name} must be a whole number >= 0, not {value!r}")


def _non_negative_number(config: ServerConfig, name: str) -> None:
    value = getattr(config, name)
    if type(value) not in (int, float) or value < 0 or value != value:
        raise ConfigError(f"{name} must be a number >= 0, not {value!r}")
