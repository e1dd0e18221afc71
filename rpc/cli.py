"""The ``rpc`` command: serve, call, methods, ping.

The edge of the program: the only module that reads the environment and the
command line. It builds the settings, then hands frozen config objects down.
Exit codes: 0 ok, 1 a call or the server failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from . import __version__
from .client import connect
from .config import Settings, load_settings, resolve_authkey
from .errors import ConfigError, RemoteError, RPCError
from .logs import LOG_FORMATS, LOG_LEVELS, make_logger

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpc", description="Serve and call Python functions over rpc.")
    parser.add_argument("--version", action="version", version=f"rpc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (default: $RPC_CONFIG, else none)")
    common.add_argument("--address", metavar="HOST:PORT|PATH", help="TCP address or Unix socket path")
    common.add_argument("--authkey-file", metavar="FILE", dest="authkey_file", help="file holding the authkey")

    serve = commands.add_parser("serve", parents=[common], help="run the server until SIGTERM or Ctrl-C")
    serve.add_argument("registry", nargs="?", metavar="IMPORT_STRING", help="pkg.module:registry (default: the demo)")
    serve.add_argument("--workers", type=int, metavar="N", help="handler processes (default: CPUs)")
    serve.add_argument("--log-format", choices=LOG_FORMATS, dest="log_format")
    serve.add_argument("--log-level", choices=LOG_LEVELS, dest="log_level")

    call = commands.add_parser("call", parents=[common], help="call a method and print its result as JSON")
    call.add_argument("method")
    call.add_argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="JSON literals (text that is not JSON is passed as a string); NAME=VALUE passes a keyword",
    )
    call.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the result (default 60)")
    call.add_argument("--verbose", "-v", action="store_true", help="print the remote traceback of an error")

    methods = commands.add_parser("methods", parents=[common], help="list the methods the server exposes")
    methods.add_argument("--json", action="store_true", help="print as JSON")

    ping = commands.add_parser("ping", parents=[common], help="measure the round-trip time to the server")
    ping.add_argument("--count", type=int, default=3, metavar="N")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    command = {"serve": _serve, "call": _call, "methods": _methods, "ping": _ping}[args.command]
    try:
        return command(args, environ)
    except ConfigError as exc:
        print(f"rpc: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED


def _settings(args: argparse.Namespace, environ: Mapping[str, str], *names: str) -> Settings:
    flags = {name: getattr(args, name, None) for name in ("address", "authkey_file", *names)}
    return load_settings(args.config, environ, flags)


# -- serve -------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from . import daemon
    from .server import Server

    settings = _settings(args, environ, "registry", "workers", "log_format", "log_level")
    authkey, key_file, created = resolve_authkey(settings, environ, create=True)
    config = settings.server_config(authkey)
    log = make_logger(config.log_level, config.log_format, component="rpc.daemon")
    if created:
        log.info("authkey_created", path=str(key_file), mode="0600")
    # Like `python -m`, let IMPORT_STRING name modules in the current folder.
    sys.path.insert(0, os.getcwd())
    _check_importable(settings.registry)
    try:
        server = Server(settings.registry, config=config)
        return daemon.serve(server, log)
    except RPCError as exc:
        log.error("start_failed", error=str(exc))
        print(f"rpc: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _check_importable(spec: str) -> None:
    """Fail early, as a config error, when the registry's module cannot be found."""
    import importlib.util

    module = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(f"registry {spec!r}: no module named {module!r} (from {os.getcwd()} and sys.path)")


# -- client commands ----------------------------------------------------------------------


def _client(args: argparse.Namespace, environ: Mapping[str, str], timeout: float | None = None) -> Any:
    settings = _settings(args, environ)
    authkey, _, _ = resolve_authkey(settings, environ, create=False)
    return connect(settings.address(), authkey=authkey, timeout=timeout)


def _call(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    positional, keywords = _parse_arguments(args.args)
    try:
        with _client(args, environ, timeout=args.timeout) as client:
            result = client.call(args.method, *positional, **keywords)
    except RPCError as exc:
        _print_error(exc, args.verbose)
        return EXIT_FAILED
    print(json.dumps(result, default=_jsonable, ensure_ascii=False))
    return EXIT_OK


def _methods(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        with _client(args, environ, timeout=30.0) as client:
            methods = client.methods()
    except RPCError as exc:
        _print_error(exc, False)
        return EXIT_FAILED
    if args.json:
        print(json.dumps([vars(m) for m in methods], indent=2))
        return EXIT_OK
    calls = [f"{m.name}{m.signature}" for m in methods]
    width = max((len(c) for c in calls), default=0)
    for text, method in zip(calls, methods):
        print(f"{text:<{width}}  {method.doc}".rstrip())
    return EXIT_OK


def _ping(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        started = time.perf_counter()
        with _client(args, environ, timeout=10.0) as client:
            connected = time.perf_counter() - started
            address = client.address
            times = [client.ping() for _ in range(max(args.count, 1))]
    except RPCError as exc:
        _print_error(exc, False)
        return EXIT_FAILED
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    rtts = ", ".join(f"{t * 1000:.3f}" for t in times)
    print(f"pong from {where}: connect {connected * 1000:.1f} ms, round trips {rtts} ms")
    return EXIT_OK


def _parse_arguments(texts: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if sep and name.isidentifier():
            keywords[name] = _literal(value)
        else:
            positional.append(_literal(text))
    return positional, keywords


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # plain words need no JSON quotes


def _jsonable(value: Any) -> Any:
    """JSON for the values rpc carries that JSON lacks."""
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode()
    if isinstance(value, (Decimal, uuid.UUID, complex)):
        return str(value)
    return repr(value)


def _print_error(exc: RPCError, verbose: bool) -> None:
    kind = type(exc).__name__ if not isinstance(exc, RemoteError) else "RemoteError"
    print(f"rpc: {kind}: {exc}", file=sys.stderr)
    if verbose and isinstance(exc, RemoteError) and exc.remote_traceback:
        print(exc.remote_traceback.rstrip(), file=sys.stderr)
