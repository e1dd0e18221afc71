"""Server settings: one frozen, validated object built at the edge and passed down.

Everything below the command line receives a :class:`ServerConfig`; nothing else
reads the environment or global settings.
"""

from __future__ import annotations

import difflib
import errno
import os
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import protocol
from .errors import ConfigError
from .logs import LOG_FORMATS, LOG_LEVELS
from .transport import Address, _check_address, format_address, is_loopback, parse_address, unix_path

__all__ = [
    "ServerConfig",
    "START_METHODS",
    "Settings",
    "load_settings",
    "parse_address",
    "resolve_authkey",
    "read_authkey",
    "check_registry_spec",
    "check_metrics_address",
    "FILE_KEYS",
    "ENV_VARIABLES",
    "RESERVED_VARIABLES",
]

START_METHODS = ("spawn", "forkserver")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

#: the largest value of any setting in seconds: one year. Larger values (or infinity)
#: overflow the operating system's timeouts and would fail every connection.
MAX_SECONDS = 365 * 24 * 3600
#: larger values overflow listen() and setrlimit() (the kernel caps the backlog lower anyway)
MAX_BACKLOG = 65535
MAX_MEMORY_LIMIT = 2**62


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of a server. Build with keywords; invalid values raise :class:`ConfigError`.

    Durations are seconds, finite and at most :data:`MAX_SECONDS` (one year).
    """

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
    #: append log lines here instead of stderr (handlers send their stderr here too)
    log_file: str | None = None
    #: permissions of a Unix socket file; None leaves the umask's choice
    unix_socket_mode: int | None = 0o600
    #: a client that does not read its replies for this long is dropped
    send_timeout: float = 30.0
    #: replies waiting for a slow client beyond which its requests are not read
    max_outbox_bytes: int = 16 * 1024 * 1024
    #: bytes of requests waiting for a free handler before new ones get ServerBusy
    max_queue_bytes: int = 256 * 1024 * 1024
    #: bytes of large requests (64 KiB or more) being received at once, over all connections;
    #: a connection starting one past that is not read until some have arrived whole
    max_receive_bytes: int = 256 * 1024 * 1024
    #: close connections with no call in flight and no request for this long; None: never
    idle_timeout: float | None = None
    #: address-space limit of each handler process in bytes (RLIMIT_AS); None: none
    handler_memory_limit: int | None = None
    #: lend a one-call-at-a-time client's socket to a spare handler (the latency fast path)
    lease: bool = True
    #: the router's event loop: "auto" (uvloop where installed, else asyncio's own), "uvloop" or "asyncio"
    event_loop: str = "auto"
    #: where to serve GET /healthz and GET /metrics over HTTP: "HOST:PORT" or (host, port); None: nowhere.
    #: /metrics shows method names and call counts to whoever reaches it: keep it on a private network.
    metrics_address: tuple[str, int] | None = None

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
        _positive_int(self, "backlog", MAX_BACKLOG)
        _non_negative_int(self, "max_pending")
        for name in ("handshake_timeout", "shutdown_grace", "startup_timeout", "send_timeout"):
            _non_negative_number(self, name)
        _positive_int(self, "max_outbox_bytes")
        _positive_int(self, "max_queue_bytes")
        _positive_int(self, "max_receive_bytes")
        if self.handler_memory_limit is not None:
            _positive_int(self, "handler_memory_limit", MAX_MEMORY_LIMIT)
        for name in ("max_call_seconds", "idle_timeout"):
            if getattr(self, name) is not None:
                _non_negative_number(self, name)
        if self.metrics_address is not None:
            object.__setattr__(self, "metrics_address", check_metrics_address(self.metrics_address))
        for name, allowed in (("start_method", START_METHODS), ("event_loop", EVENT_LOOPS), ("log_level", LOG_LEVELS), ("log_format", LOG_FORMATS)):
            if getattr(self, name) not in allowed:
                raise _invalid(name, f"must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

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


def _invalid(name: str, message: str) -> ConfigError:
    error = ConfigError(f"{name} {message}")
    error.key = name  # type: ignore[attr-defined]  # lets the loader say where the value came from
    return error


def check_metrics_address(address: object) -> tuple[str, int]:
    """``metrics_address`` as (host, port): from "HOST:PORT" or a (host, port) pair; never a Unix socket."""
    error = _invalid(
        "metrics_address",
        f"must be HOST:PORT (an HTTP address for /healthz and /metrics, e.g. 127.0.0.1:9100), not {address!r}",
    )
    if not isinstance(address, (str, tuple)):
        raise error
    try:
        checked = _check_address(address)
    except ConfigError:
        raise error from None
    if isinstance(checked, str):  # text without a port reads as a Unix socket path
        raise error
    return checked


def _positive_int(config: ServerConfig, name: str, maximum: int | None = None) -> None:
    value = getattr(config, name)
    if type(value) is not int or value < 1:
        raise _invalid(name, f"must be a whole number >= 1, not {value!r}")
    if maximum is not None and value > maximum:
        raise _invalid(name, f"must be a whole number from 1 to {maximum}, not {value!r}")


def _non_negative_int(config: ServerConfig, name: str) -> None:
    value = getattr(config, name)
    if type(value) is not int or value < 0:
        raise _invalid(name, f"must be a whole number >= 0, not {value!r}")


def _non_negative_number(config: ServerConfig, name: str) -> None:
    """A duration in seconds: finite, >= 0 and at most :data:`MAX_SECONDS`."""
    value = getattr(config, name)
    if type(value) not in (int, float) or not 0 <= value <= MAX_SECONDS:  # refuses NaN and infinity too
        raise _invalid(name, f"must be a number of seconds from 0 to {MAX_SECONDS} (one year), not {value!r}")


# -- the daemon's settings: file, environment, flags ------------------------------------

DEFAULT_ADDRESS = "127.0.0.1:8765"
DEFAULT_REGISTRY = "rpc.demo:registry"
MIN_AUTHKEY_BYTES = 32
ENV_PREFIX = "RPC_"

# Keys of a config file (and RPC_<KEY> variables), with the type each takes.
FILE_KEYS: dict[str, type] = {
    "address": str,
    "registry": str,
    "authkey_file": str,
    "workers": int,
    "max_message_bytes": int,
    "max_call_seconds": float,
    "handshake_timeout": float,
    "max_pending": int,
    "shutdown_grace": float,
    "backlog": int,
    "start_method": str,
    "startup_timeout": float,
    "send_timeout": float,
    "max_outbox_bytes": int,
    "max_queue_bytes": int,
    "max_receive_bytes": int,
    "idle_timeout": float,
    "handler_memory_limit": int,
    "lease": bool,
    "event_loop": str,
    "metrics_address": str,
    "tracebacks": bool,
    "access_log": bool,
    "log_level": str,
    "log_format": str,
    "log_file": str,
}
_TYPE_WORDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}

# Every RPC_* variable rpc reads: one per file key, plus the key itself and the file's path.
ENV_VARIABLES: tuple[str, ...] = (
    "RPC_AUTHKEY",
    "RPC_CONFIG",
    *(ENV_PREFIX + key.upper() for key in FILE_KEYS),
)
# RPC_* variables rpc does not read but accepts, because tools around it use them:
# RPC_SOAK_SECONDS sets the length of the soak test in rpc's own test suite.
RESERVED_VARIABLES: tuple[str, ...] = ("RPC_SOAK_SECONDS",)


def default_authkey_file(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/rpc/authkey``, or ``~/.config/rpc/authkey``."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "rpc" / "authkey"


def check_registry_spec(text: str) -> str:
    """Check the form ``pkg.module:registry`` (dotted identifiers on both sides of one colon)."""
    module, sep, attribute = text.partition(":")
    parts = module.split(".") + attribute.split(".")
    if not sep or not all(part.isidentifier() for part in parts):
        hint = _module_of_path(module, attribute or "registry")
        if not hint and not sep and all(p.isidentifier() for p in parts[:-1]):
            hint = f"; did you mean '{text}:registry'?"
        raise ConfigError(
            f"registry {text!r} must look like 'pkg.module:registry' "
            f"(a module, a colon, and the name of the rpc.Registry in it){hint}"
        )
    return text


def _module_of_path(path: str, attribute: str) -> str:
    """A hint naming the module of a file path such as ``myapp/api.py``, or ""."""
    if not (path.endswith(".py") or "/" in path or os.sep in path):
        return ""
    file = Path(path)
    parts = (file.parent / file.stem if file.suffix == ".py" else file).parts
    if file.is_absolute():
        module, where = file.stem, f" (run from {file.parent})"
    else:
        module, where = ".".join(p for p in parts if p not in (".", "")), ""
    if not all(part.isidentifier() for part in module.split(".")):
        return ""
    return f"; did you mean '{module}:{attribute}'{where}? (an import string names a module, not a file)"


@dataclass(frozen=True)
class Settings:
    """What ``rpc serve`` and the client commands were told, and where each value came from.

    ``values`` maps file keys to values; ``sources`` maps the same keys to a phrase
    naming where the value came from ("config/rpc.toml", "RPC_WORKERS", "--workers").
    """

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: Path | None
    authkey_from_env: bytes | None = field(default=None, repr=False)

    @property
    def registry(self) -> str:
        return str(self.values.get("registry", DEFAULT_REGISTRY))

    def address(self) -> Address:
        """The one address ``rpc serve`` listens on."""
        addresses = self.addresses()
        if len(addresses) > 1:
            raise self._error("address", f"rpc serve listens on one address, not a list of {len(addresses)}")
        return addresses[0]

    def addresses(self) -> list[Address]:
        """The addresses the client commands may connect to: a list in a config file, or
        addresses separated by commas in RPC_ADDRESS and --address (one, usually)."""
        value = self.values.get("address", DEFAULT_ADDRESS)
        texts = list(value) if isinstance(value, list) else [part.strip() for part in str(value).split(",")]
        addresses: list[Address] = []
        for text in texts:
            try:
                address = parse_address(text)
            except ConfigError as exc:
                raise self._error("address", exc.message) from None
            if isinstance(address, str):
                address = unix_path(str(self._relative_to_source("address", address)))
            addresses.append(address)
        if not addresses:
            raise self._error("address", "address is an empty list: give at least one address")
        return addresses

    def metrics_address(self) -> tuple[str, int] | None:
        """Where the server answers /healthz and /metrics, or None if it does not."""
        if "metrics_address" not in self.values:
            return None
        try:
            return check_metrics_address(self.values["metrics_address"])
        except ConfigError as exc:
            raise self._error("metrics_address", exc.message) from None

    def authkey_file(self, environ: Mapping[str, str]) -> Path:
        if "authkey_file" in self.values:
            return self._relative_to_source("authkey_file", os.path.expanduser(str(self.values["authkey_file"])))
        return default_authkey_file(environ)

    def server_config(self, authkey: bytes) -> ServerConfig:
        """The frozen server config; a bad value raises ConfigError naming key and source."""
        options = {k: v for k, v in self.values.items() if k not in ("address", "registry", "authkey_file")}
        for name in ("max_call_seconds", "idle_timeout", "handler_memory_limit"):
            if options.get(name) == 0:
                options[name] = None  # 0 in a file means "no limit"
        try:
            return ServerConfig(address=self.address(), authkey=authkey, **options)
        except ConfigError as exc:
            key = getattr(exc, "key", None)  # set by _invalid
            if isinstance(key, str) and key in self.sources:
                raise self._error(key, exc.message) from None
            raise

    def _error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.sources.get(key, 'default')}: {message}")

    def _relative_to_source(self, key: str, path: str) -> Path:
        """Relative paths in a config file are relative to the file's folder."""
        if self.config_file is not None and self.sources.get(key) == str(self.config_file):
            return self.config_file.parent / path
        return Path(path)


def load_settings(
    config_file: str | os.PathLike[str] | None, environ: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """Merge flags over ``RPC_*`` variables over the config file; defaults fill the rest.

    ``flags`` holds only options given on the command line. Unknown keys and values
    of the wrong type raise :class:`ConfigError` naming the key and where it came from.
    """
    _check_variables(environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config_file or environ.get("RPC_CONFIG") or None
    if path is not None:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for key, value in document.items():
            if key not in FILE_KEYS:
                close = difflib.get_close_matches(key, FILE_KEYS, n=1, cutoff=0.8)
                hint = f"did you mean {close[0]!r}? " if close else ""
                if key == "authkey":
                    hint = "the key itself never goes in a config file: name a key file with authkey_file; "
                raise ConfigError(f"{path}: unknown key {key!r}; {hint}allowed keys: {', '.join(FILE_KEYS)}")
            values[key] = _check_type(key, value, str(path))
            sources[key] = str(path)
    for key, kind in FILE_KEYS.items():
        variable = ENV_PREFIX + key.upper()
        if environ.get(variable):
            values[key] = _parse_text(key, environ[variable], kind, variable)
            sources[key] = variable
    for key, value in flags.items():
        if value is not None:
            values[key] = value
            sources[key] = "--" + key.replace("_", "-")
    authkey = environ.get("RPC_AUTHKEY")
    # os.fsencode gives back the variable's exact bytes: os.environ holds bytes that are
    # not UTF-8 as surrogate escapes, which a plain encode() refuses.
    return Settings(values, sources, Path(path) if path else None, os.fsencode(authkey) if authkey else None)


def _check_variables(environ: Mapping[str, str]) -> None:
    """Refuse RPC_* variables rpc does not know: a misspelt one would be silently ignored."""
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in ENV_VARIABLES and name not in RESERVED_VARIABLES:
            close = difflib.get_close_matches(name, ENV_VARIABLES, n=1, cutoff=0.85)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"unknown environment variable {name}; {hint}rpc reads {', '.join(ENV_VARIABLES)} "
                f"(and leaves {', '.join(RESERVED_VARIABLES)} to its test suite): unset it or correct its name"
            )


def _check_type(key: str, value: Any, source: str) -> Any:
    kind = FILE_KEYS[key]
    ok = (
        type(value) is kind
        or (kind is float and type(value) is int)
        # a client of several servers: a list of addresses
        or (key == "address" and type(value) is list and all(type(item) is str for item in value))
    )
    if not ok:
        words = "a string, or a list of strings" if key == "address" else _TYPE_WORDS[kind]
        raise ConfigError(f"{source}: {key} must be {words}, not {value!r}")
    return float(value) if kind is float else value


def _parse_text(key: str, text: str, kind: type, source: str) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be {_TYPE_WORDS[kind]}, not {text!r}") from None


# -- authkeys ----------------------------------------------------------------------------


def check_authkey(key: bytes, source: str) -> bytes:
    if len(key) < MIN_AUTHKEY_BYTES:
        raise ConfigError(
            f"the authkey from {source} is {len(key)} bytes; at least {MIN_AUTHKEY_BYTES} are required "
            "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


MAX_AUTHKEY_FILE_BYTES = 64 * 1024


def _check_key_folder(folder: Path) -> None:
    """Refuse a folder where others could replace the key file, as ssh does."""
    try:
        info = os.stat(folder)
    except OSError:
        return  # opening the file reports what is wrong
    writable = [who for who, bit in (("group", 0o020), ("others", 0o002)) if info.st_mode & bit]
    if writable:
        raise ConfigError(
            f"the folder of the authkey file, {folder}, is writable by {' and '.join(writable)} "
            f"(mode {stat.S_IMODE(info.st_mode):04o}), who could replace the key: chmod go-w {folder}"
        )
    if hasattr(os, "getuid") and info.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"the folder of the authkey file, {folder}, belongs to another user")


def _symlink_error(path: Path) -> ConfigError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return ConfigError(
        f"authkey file {path} is a symbolic link{target}; a key file must be a plain file: "
        "point authkey_file at the file itself"
    )


def read_authkey_file(path: Path) -> bytes:
    """Read a key file that only its owner can read, as ssh insists for private keys.

    The file must be a plain file (not a symbolic link) in a folder that neither
    group nor others can write.
    """
    _check_key_folder(path.absolute().parent)
    if path.is_symlink():
        raise _symlink_error(path)
    try:
        # O_NOFOLLOW: a link swapped in after the check above is refused too.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"authkey file {path} does not exist (rpc serve creates it; or set RPC_AUTHKEY)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path) from None
        raise ConfigError(f"cannot read authkey file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"cannot read authkey file {path}: it is not a plain file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"authkey file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"it must be private: chmod 600 {path}"
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise ConfigError(f"authkey file {path} belongs to another user")
        data = os.read(fd, MAX_AUTHKEY_FILE_BYTES + 1)  # a key file is small: one read suffices
    except OSError as exc:
        raise ConfigError(f"cannot read authkey file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_AUTHKEY_FILE_BYTES:
        raise ConfigError(f"authkey file {path} is over {MAX_AUTHKEY_FILE_BYTES} bytes: it should hold one key")
    return check_authkey(data.strip(), str(path))


def create_authkey_file(path: Path) -> bytes:
    """Write a new random key to ``path`` (mode 0600, its folder 0700) and return it."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create authkey file {path}: {exc.strerror}") from None
    _check_key_folder(path.absolute().parent)  # an existing folder may be open to others
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create authkey file {path}: {exc.strerror}") from None
    key = secrets.token_hex(MIN_AUTHKEY_BYTES).encode()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def resolve_authkey(settings: Settings, environ: Mapping[str, str], create: bool) -> tuple[bytes, Path | None, bool]:
    """The authkey: ``RPC_AUTHKEY``, else the key file (created if ``create`` and missing).

    Returns the key, the file it came from (None for the environment) and whether
    the file was just created. An ``--authkey-file`` flag overrides ``RPC_AUTHKEY``.
    """
    flag_given = settings.sources.get("authkey_file", "").startswith("--")
    if settings.authkey_from_env is not None and not flag_given:
        return check_authkey(settings.authkey_from_env, "RPC_AUTHKEY"), None, False
    path = settings.authkey_file(environ)
    if create and not os.path.lexists(path):  # a dangling symlink is refused, not written through
        return create_authkey_file(path), path, True
    return read_authkey_file(path), path, False


def read_authkey(path: str | os.PathLike[str] | None = None) -> bytes:
    """The authkey in the key file ``rpc serve`` uses, for a Python program to connect with.

    ``path`` None means the default file, ``$XDG_CONFIG_HOME/rpc/authkey`` or
    ``~/.config/rpc/authkey``: finding it reads ``XDG_CONFIG_HOME`` and ``HOME``,
    which is acceptable here because you call this helper yourself; the rest of
    the library reads no environment. ``RPC_AUTHKEY`` is not read: pass
    ``os.environ["RPC_AUTHKEY"].encode()`` yourself if you keep the key there.
    The file is checked as the ``rpc`` command checks it (private, a plain file,
    in a folder only its owner can write); returns the key without surrounding
    whitespace. Raises :class:`ConfigError` saying what is wrong.
    """
    key_file = default_authkey_file(os.environ) if path is None else Path(os.path.expanduser(os.fspath(path)))
    if not os.path.lexists(key_file):
        raise ConfigError(f"authkey file {key_file} does not exist (`rpc serve` creates it when it first starts)")
    return read_authkey_file(key_file)
