"""The ``rpc`` command: serve, call, methods, ping, stats.

The edge of the program: the only module that reads the environment and the
command line. It builds the settings, then hands frozen config objects down.
Exit codes: 0 ok, 1 a call or the server failed, 2 usage or configuration error,
130 interrupted (Ctrl-C); every command reports its errors through :func:`main`,
one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .client import connect
from .config import (
    DEFAULT_ADDRESS,
    DEFAULT_REGISTRY,
    MAX_SECONDS,
    Settings,
    check_registry_spec,
    load_settings,
    resolve_authkey,
)
from .errors import AuthenticationError, ConfigError, ConnectionClosed, RemoteError, RPCError, StartupError
from .logs import LOG_FORMATS, LOG_LEVELS, make_logger
from .transport import format_address

__all__ = ["main", "format_result"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT

CALL_EPILOG = """\
Options may come before or after the arguments. An argument that starts with a
dash is read as an option unless it is a number (rpc call add -1 2 works); put
others after --, which ends the options: rpc call echo -- -x
"""


def _positive(kind: Callable[[str], Any], words: str, maximum: float | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` of the text, finite, above zero and at most ``maximum``."""
    bound = f" and at most {maximum}" if maximum is not None else ""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words} > 0{bound}, not {text!r}") from None
        if not math.isfinite(value) or value <= 0 or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {words} > 0{bound}, not {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each command."""
    # allow_abbrev=False: an abbreviated or misspelt option (--addres) is an error, not a guess.
    parser = argparse.ArgumentParser(
        prog="rpc", description="Serve and call Python functions over rpc.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"rpc {__version__}", help="print the version")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (default: $RPC_CONFIG, else none)")
    common.add_argument(
        "--address",
        metavar="HOST:PORT|PATH",
        help="TCP address or Unix socket path; for the client commands, several separated by commas (servers of the "
        f"same functions: one is used at a time) (default: $RPC_ADDRESS, else the config's address, else {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--authkey-file",
        metavar="FILE",
        dest="authkey_file",
        help="file holding the authkey; given, it wins over $RPC_AUTHKEY (default: the key in $RPC_AUTHKEY, "
        "else the file $RPC_AUTHKEY_FILE, else the config's authkey_file, else $XDG_CONFIG_HOME/rpc/authkey, "
        "else ~/.config/rpc/authkey)",
    )

    def command(name: str, help: str, **options: Any) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, parents=[common], help=help, description=help, allow_abbrev=False, **options
        )

    serve = command("serve", "run the server until SIGTERM or Ctrl-C")
    serve.add_argument(
        "registry",
        nargs="?",
        metavar="IMPORT_STRING",
        help=f"the functions to serve, pkg.module:registry (default: $RPC_REGISTRY, else the config's registry, "
        f"else {DEFAULT_REGISTRY})",
    )
    serve.add_argument(
        "--workers",
        type=_positive(int, "a whole number"),
        metavar="N",
        help="handler processes (default: $RPC_WORKERS, else the config's workers, else the number of CPUs)",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        dest="log_format",
        help="log lines for people (console) or programs (json) (default: auto: console on a terminal, else json)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, dest="log_level", help="least severe events logged (default: info)")
    metrics_address: dict[str, Any] = dict(
        metavar="HOST:PORT",
        dest="metrics_address",
        help="HTTP address of GET /healthz and GET /metrics (default: $RPC_METRICS_ADDRESS, else the config's "
        "metrics_address, else none); /metrics shows method names and call counts: keep it on a private network",
    )
    serve.add_argument("--metrics-address", **metrics_address)

    call = command(
        "call", "call a method and print its result", epilog=CALL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    call.add_argument("method", metavar="METHOD", help="the method's name, e.g. add or math.hypot")
    call.add_argument(
        "args",
        nargs="*",
        default=[],  # without it argparse lists ARG as required when METHOD is missing
        metavar="ARG",
        help="JSON literals (text that is not JSON is passed as a string); NAME=VALUE passes a keyword",
    )
    call.add_argument(
        "--timeout",
        type=_positive(float, "a number", MAX_SECONDS),  # longer overflows the system's timeouts
        default=60.0,
        metavar="SECONDS",
        help=f"seconds to wait for the result, at most {MAX_SECONDS} (a year) (default: 60)",
    )
    call.add_argument("--verbose", "-v", action="store_true", help="print the remote traceback of an error")

    methods = command("methods", "list the methods the server exposes")
    methods.add_argument("--json", action="store_true", help="print as JSON (default: a table)")

    ping = command("ping", "measure the round-trip time to the server")
    ping.add_argument(
        "--count", type=_positive(int, "a whole number"), default=3, metavar="N", help="round trips (default: 3)"
    )

    # Not a client of the rpc protocol: it reads the server's /metrics over HTTP (no authkey, no --address).
    stats = commands.add_parser(
        "stats",
        help="print the server's calls, handlers and queue, read from its /metrics",
        description="print the server's calls, handlers and queue, read from its /metrics",
        allow_abbrev=False,
    )
    stats.add_argument("--config", metavar="FILE", help="TOML config file (default: $RPC_CONFIG, else none)")
    stats.add_argument("--metrics-address", **metrics_address)
    stats.add_argument(
        "--timeout", type=_positive(float, "a number", MAX_SECONDS), default=10.0, metavar="SECONDS",
        help="seconds to wait for the server's answer (default: 10)",
    )
    return parser, dict(commands.choices)


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; options may follow the arguments (usage errors exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parsers()
    if argv and argv[0] in commands:
        # Each command parses its own words, so its errors show its own usage.
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, --version, or a usage error


def _take_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """A copy to read settings from; the authkey leaves the live environment.

    Handler processes, and whatever the served functions start, inherit the
    environment: the key must not be there for them to find.
    """
    copy = dict(environ)
    environ.pop("RPC_AUTHKEY", None)
    return copy


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    if environ is None or environ is os.environ:
        environ = _take_environment(os.environ)
    args = _parse(argv)
    command = {"serve": _serve, "call": _call, "methods": _methods, "ping": _ping, "stats": _stats}[args.command]
    try:
        return command(args, environ)
    except ConfigError as exc:
        print(f"rpc: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"rpc: cannot start: {exc}{_startup_hint(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except _BadArgument as exc:
        print(f"rpc {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RPCError as exc:
        _print_error(exc, getattr(args, "verbose", False))
        return EXIT_FAILED
    except KeyboardInterrupt:
        # The request may have reached the server: interrupting the client does not cancel it.
        running = "; the call may still be running on the server" if args.command == "call" else ""
        print(f"rpc: interrupted{running}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _settings(args: argparse.Namespace, environ: Mapping[str, str], *names: str) -> Settings:
    flags = {name: getattr(args, name, None) for name in ("address", "authkey_file", *names)}
    return load_settings(args.config, environ, flags)


def _print_error(exc: RPCError, verbose: bool) -> None:
    if isinstance(exc, _CannotConnect):
        print(f"rpc: {exc}", file=sys.stderr)  # the message says it all; "ConnectionClosed" would mislead
        return
    kind = type(exc).__name__ if not isinstance(exc, RemoteError) else "RemoteError"
    print(f"rpc: {kind}: {exc}", file=sys.stderr)
    if verbose and isinstance(exc, RemoteError) and exc.remote_traceback:
        print(exc.remote_traceback.rstrip(), file=sys.stderr)


# -- serve -------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from . import daemon
    from .server import Server

    settings = _settings(args, environ, "registry", "workers", "log_format", "log_level", "metrics_address")
    settings.server_config(b"\0" * 32)  # every setting is valid before anything is created
    shadow = _add_current_folder()
    _check_importable(check_registry_spec(settings.registry), shadow)
    authkey, key_file, created = resolve_authkey(settings, environ, create=True)
    config = settings.server_config(authkey)
    log = make_logger(config.log_level, config.log_format, component="rpc.daemon")
    if created:
        log.info("authkey_created", path=str(key_file), mode="0600")
    server = Server(settings.registry, config=config)
    return daemon.serve(server, log)


def _add_current_folder() -> str | None:
    """Like `python -m`, let IMPORT_STRING name modules in the current folder.

    The folder goes last on the path, so it cannot hide an installed package from
    the handlers, which import with this path. One case remains: a folder here
    named ``rpc`` (say, a clone of rpc's repository) hides an rpc installed in
    editable mode, whose finder runs after the path is searched. Then the current
    folder is left off, and its ``rpc`` returned to explain a registry not found.
    """
    folder = os.getcwd()
    if folder in sys.path:  # `python -m rpc` put it first already
        return None
    sys.path.append(folder)
    if _finds_this_rpc():
        return None
    sys.path.remove(folder)
    return os.path.join(folder, "rpc")


def _finds_this_rpc() -> bool:
    """Whether a fresh import of ``rpc`` (in a handler) finds this very package."""
    this = sys.modules[__package__].__spec__
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(__package__, None)
        except Exception:
            continue
        if spec is not None:
            return this is not None and spec.origin == this.origin
    return True  # nothing else claims the name


def _check_importable(spec: str, shadow: str | None = None) -> None:
    """Fail early, once, as a config error, when the registry's module cannot be found.

    This finds the module without running it (only its parent packages are
    imported); the handlers import it.
    """
    import importlib.util

    module = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except ImportError:
        found = None
    except Exception as exc:  # a parent package that fails as it is imported
        raise ConfigError(f"registry {spec!r}: importing {module!r} failed: {type(exc).__name__}: {exc}") from None
    if found is None:
        if shadow is not None:
            raise ConfigError(
                f"registry {spec!r}: no module named {module!r} on sys.path; the current folder was left off "
                f"because its {shadow} would hide the rpc package from the handlers: rename that folder, or "
                "run rpc serve from a folder without one"
            )
        raise ConfigError(f"registry {spec!r}: no module named {module!r} (from {os.getcwd()} and sys.path)")


def _startup_hint(exc: StartupError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        if "/metrics" in exc.message:
            return "; choose another with --metrics-address (or the metrics_address key, or RPC_METRICS_ADDRESS)"
        return "; choose another with --address (or the address key, or RPC_ADDRESS)"
    return ""


# -- client commands ----------------------------------------------------------------------


class _CannotConnect(RPCError):
    """No connection could be opened; the message names the address and the reason."""


def _client(args: argparse.Namespace, environ: Mapping[str, str], timeout: float | None = None) -> Any:
    settings = _settings(args, environ)
    addresses = settings.addresses()
    authkey, key_file, _ = resolve_authkey(settings, environ, create=False)
    try:
        return connect(addresses if len(addresses) > 1 else addresses[0], authkey=authkey, timeout=timeout)
    except ConnectionClosed as exc:
        raise _CannotConnect(str(exc)) from None
    except AuthenticationError as exc:
        raise AuthenticationError(f"{exc} (the key came from {_key_source(settings, key_file)})") from None


def _key_source(settings: Settings, key_file: Path | None) -> str:
    """Where the client's authkey came from, for an error that says the server refused it."""
    if key_file is None:
        return "RPC_AUTHKEY"
    source = settings.sources.get("authkey_file")
    return f"the default file {key_file}" if source is None else f"{key_file}, named by {source}"


class _BadArgument(Exception):
    """An argument of ``rpc call`` that cannot be read (a usage error)."""


def _call(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    positional, keywords = _parse_arguments(args.args)
    with _client(args, environ, timeout=args.timeout) as client:
        result = client.call(args.method, *positional, **keywords)
    print(format_result(result))
    return EXIT_OK


def _methods(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    with _client(args, environ, timeout=30.0) as client:
        methods = client.methods()
    if args.json:
        print(json.dumps([vars(m) for m in methods], indent=2))
        return EXIT_OK
    calls = [f"{m.name}{m.signature}" for m in methods]
    width = max((len(c) for c in calls), default=0)
    for text, method in zip(calls, methods):
        print(f"{text:<{width}}  {method.doc}".rstrip())
    return EXIT_OK


def _ping(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    started = time.perf_counter()
    with _client(args, environ, timeout=10.0) as client:
        connected = time.perf_counter() - started
        address = client.address
        times = [client.ping() for _ in range(args.count)]
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    rtts = ", ".join(f"{t * 1000:.3f}" for t in times)
    print(f"pong from {where}: connect {connected * 1000:.1f} ms, round trips {rtts} ms")
    return EXIT_OK


def _stats(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = load_settings(args.config, environ, {"metrics_address": args.metrics_address})
    address = settings.metrics_address()
    if address is None:
        raise ConfigError(
            "no metrics_address is configured, so there is no /metrics to read: pass --metrics-address HOST:PORT, "
            "set RPC_METRICS_ADDRESS, or give the config file of `rpc serve` (--config or RPC_CONFIG)"
        )
    base = f"http://{format_address(address)}"
    health = _http_get(f"{base}/healthz", args.timeout)[0]
    status, text = _http_get(f"{base}/metrics", args.timeout)
    if status != 200:
        raise _CannotConnect(f"{base}/metrics answered HTTP {status}: is this the metrics_address of an rpc server?")
    state = {200: "serving", 503: "draining"}.get(health, f"/healthz answered HTTP {health}")
    print(f"rpc at {format_address(address)}: {state}")
    print(format_stats(text))
    return EXIT_OK


def _http_get(url: str, timeout: float) -> tuple[int, str]:
    """The status and body of a GET; _CannotConnect if nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise _CannotConnect(
            f"nothing answers at {url}: {why} (is `rpc serve` running with this metrics_address?)"
        ) from None


# Outcome columns in this order (others, if any, after them).
_OUTCOME_ORDER = ("ok", "error", "timeout", "cancelled", "crashed", "closed", "busy", "shutting_down")


def format_stats(text: str) -> str:
    """A short table of the figures in an rpc server's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    gauges: dict[str, float] = {}
    calls: dict[str, dict[str, float]] = {}  # method -> outcome -> calls
    buckets: dict[str, list[tuple[float, float]]] = {}  # method -> (le, cumulative count)
    sums: dict[str, float] = {}
    by_reason: dict[str, dict[str, float]] = {"rpc_handler_replacements_total": {}, "rpc_rejected_handshakes_total": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # known by their names, whatever the families' TYPE lines say
            name, labels = sample.name, sample.labels
            if name == "rpc_calls_total":
                calls.setdefault(labels["method"], {})[labels["outcome"]] = sample.value
            elif name == "rpc_call_duration_seconds_bucket":
                buckets.setdefault(labels["method"], []).append((float(labels["le"]), sample.value))
            elif name == "rpc_call_duration_seconds_sum":
                sums[labels["method"]] = sample.value
            elif name in by_reason:
                by_reason[name][labels["reason"]] = sample.value
            elif name.startswith("rpc_") and not labels:
                gauges[name] = sample.value

    def whole(name: str) -> str:
        return f"{gauges.get(name, 0):.0f}"

    lines = [
        f"handlers: {whole('rpc_handlers')} ({whole('rpc_handlers_busy')} busy, {whole('rpc_handlers_lent')} lent)   "
        f"queue: {whole('rpc_queue_calls')} calls, {whole('rpc_queue_bytes')} bytes   "
        f"connections: {whole('rpc_connections')}",
        "",
    ]
    seen = {outcome for counts in calls.values() for outcome in counts}
    outcomes = [o for o in _OUTCOME_ORDER if o in seen] + sorted(seen - set(_OUTCOME_ORDER))
    header = ["method", *outcomes, "calls", "mean ms", "p99 ms"]
    rows = []
    for method in sorted(calls):
        counts = calls[method]
        timed = sorted(buckets.get(method, []))
        total = timed[-1][1] if timed else 0.0
        mean = f"{sums.get(method, 0.0) / total * 1000:.3f}" if total else "-"
        rows.append(
            [method, *(f"{counts.get(o, 0):.0f}" for o in outcomes), f"{sum(counts.values()):.0f}", mean, _quantile(timed, 0.99)]
        )
    if not rows:
        lines.append("no calls yet")
    else:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
    for name, title in (("rpc_handler_replacements_total", "handler replacements"), ("rpc_rejected_handshakes_total", "rejected handshakes")):
        counted = by_reason[name]
        listed = ", ".join(f"{reason} {n:.0f}" for reason, n in sorted(counted.items())) or "none"
        lines.append(f"{title}: {listed}")
    return "\n".join(lines)


def _quantile(buckets: list[tuple[float, float]], q: float) -> str:
    """The bucket bound under which the fraction ``q`` of calls took, in ms ("<= 2.5")."""
    if not buckets or not buckets[-1][1]:
        return "-"
    wanted = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= wanted:
            return f"<= {bound * 1000:g}" if math.isfinite(bound) else f"> {buckets[-2][0] * 1000:g}"
    return "-"


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


@contextlib.contextmanager
def _any_int_digits() -> Iterator[None]:
    """Lift Python's limit of 4300 digits for int <-> str, for the user's own values.

    The limit guards servers against costly conversions of untrusted text; here
    the numbers are the user's arguments and the results they asked for.
    """
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(limit)


def _literal(text: str) -> Any:
    try:
        with _any_int_digits():
            return json.loads(text)
    except RecursionError:
        raise _BadArgument(f"argument {_quote(text)} nests too deeply to read as JSON") from None
    except ValueError:  # JSONDecodeError, and any other value json refuses
        return text  # plain words need no JSON quotes


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def format_result(value: Any) -> str:
    """The result as JSON when JSON shows it exactly, else Python's repr of the whole value.

    Exactly: strings, numbers (not NaN or infinity), true/false/null, lists and
    tuples (as arrays), and dicts whose keys are all strings. Anything else (sets,
    bytes, datetimes, NaN, non-string keys, ...) would be changed by JSON, so the
    readable and faithful repr of the whole value is printed instead.
    """
    with _any_int_digits():  # a result may be an int of any size
        if _is_json(value):
            try:
                return json.dumps(value, ensure_ascii=False, allow_nan=False)
            except (ValueError, RecursionError):
                pass
        try:
            return repr(value)
        except RecursionError:
            return f"<a {type(value).__name__} nested too deeply to print>"


def _is_json(value: Any) -> bool:
    stack = [value]
    while stack:  # iterative: a deeply nested value must not exhaust the stack here
        item = stack.pop()
        kind = type(item)
        if item is None or kind in (str, int, bool):
            continue
        if kind is float:
            if not math.isfinite(item):
                return False
        elif kind in (list, tuple):
            stack.extend(item)
        elif kind is dict:
            if any(type(key) is not str for key in item):
                return False
            stack.extend(item.values())
        else:
            return False
    return True
