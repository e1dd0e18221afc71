"""The rpc wire format: message kinds, msgpack encoding of values, and limits.

Pure functions, bytes in and messages out; no sockets here. Everything below is
what a client in another language needs to implement.

Transport
---------
A stream socket (TCP or Unix) framed as in Python's ``multiprocessing.connection``:
each frame is a 4-byte big-endian signed length followed by that many bytes; a
length of ``-1`` is followed by an 8-byte big-endian unsigned length (frames over
2 GiB). Receivers refuse frames over their ``max_message_bytes`` (default 64 MiB)
and close the connection, since the rest of the stream cannot be trusted.

Handshake
---------
When the server has an authkey, the ``multiprocessing.connection`` HMAC challenge
runs both ways first: the server sends ``#CHALLENGE#`` + random bytes, the client
answers with the HMAC of the random bytes under the authkey, the server replies
``#WELCOME#`` or ``#FAILURE#``; then the client challenges the server the same
way. Then the server sends a hello; the client sends its own hello without
waiting for it. A server without an authkey sends its hello at once.

Messages
--------
Every message is one msgpack array (msgpack-rpc layout, plus kwargs and meta):

=============  ==============================================  ===================
kind           layout                                          direction
=============  ==============================================  ===================
0 request      ``[0, id, method, args, kwargs, meta]``          client -> server
1 response     ``[1, id, error, result]``                       server -> client
2 notification ``[2, method, args, kwargs]``                    client -> server
3 cancel       ``[3, id]``                                      client -> server
4 hello        ``[4, protocol_version, info]``                  both ways, once
5 stream start ``[5, id]``                                      server -> client
6 stream item  ``[6, id, value]``                               server -> client
7 stream end   ``[7, id, error]``                               server -> client
8 credit       ``[8, id, count]``                               client -> server
9 go-away      ``[9, last_id, reason]``                         server -> client
=============  ==============================================  ===================

- ``id``: unsigned integer chosen by the client, unique among its calls in flight
  on the connection. Responses may come in any order; match them by ``id``.
- ``method``: UTF-8 string, a registered name such as ``"add"`` or ``"math.hypot"``.
- ``args``: array; ``kwargs``: map of string keys; ``meta``: map, with the optional
  key ``"timeout"`` (seconds, float or int, relative to the moment the server
  reads the request). Unknown meta keys are ignored.
- ``error``: nil on success, else a map ``{"code": str, "type": str,
  "message": str}`` with optional ``"traceback": str`` and ``"args": array``.
  ``code`` names the failure (``remote_error``, ``method_not_found``,
  ``call_timeout``, ``call_cancelled``, ``worker_crashed``, ``server_busy``, ``server_shutting_down``,
  ``serialization_error``, ``protocol_error``, ``message_too_large``); ``type`` is
  the remote exception's class name for ``remote_error``.
  A response with a nil ``id`` reports a connection-level error; the server closes
  the connection after sending it.
- ``info`` in hello: a map; the server sends ``{"server": "rpc", "version": str,
  "max_message_bytes": int}``; rpc's clients send ``{"client": "rpc", "version":
  str, "go_away": true}``. ``"go_away": true`` asks for the go-away message (see
  "Go-away"); unknown keys are ignored.
- Notifications run like requests but are never answered.
- Cancel asks the server to stop the call ``id`` of this connection: a queued
  call never runs; a running one's handler process is stopped (and replaced).
  Either way the call is answered with the error ``call_cancelled``. A cancel for
  a call already answered, or never sent, is ignored: its answer may already be
  on its way, so a client that cancels must discard a late answer. A client that
  closes its connection cancels every call of it: queued ones never run, and
  running ones still running 0.1 s later are stopped.

Streams
-------
A call of a generator function is answered by a stream instead of a response:
the first message answering a call is either a response or a stream start
``[5, id]``. Then come items ``[6, id, value]``, one per value the generator
yields, in order, and one stream end ``[7, id, error]``: ``error`` is nil when
the generator finished, else an error map as in a response (the generator
raised, an item could not be encoded or was over ``max_message_bytes``, the
wait for an item passed the call's ``timeout``, the handler crashed, the server
is shutting down). Nothing follows the end.

Flow control: the server sends at most ``STREAM_WINDOW`` (64) items, and while
the items not yet credited hold ``STREAM_WINDOW_BYTES`` (1 MiB, counting each
item message's encoded size) or more it sends no further item, so a slow
consumer holds at most a window of items on their way. The client grants
credit ``[8, id, count]``: ``count`` items it has consumed (the oldest not yet
credited). A client must credit at the latest once the items it consumed and
has not credited reach half the window in count (32) or in bytes (512 KiB),
else the stream may stall. A credit for a call that is not a stream is ignored.

The meta ``timeout`` of a stream's request bounds the wait for each item (from
the previous item, or from a credit that reopened the window), not the whole
stream. A cancel ``[3, id]`` of a stream closes it: the generator is closed
(its ``finally`` blocks run) and the stream ends; items already on their way
still arrive, and the client should drop them and the end. A client that
closes its connection closes its streams.

Go-away
-------
A server that begins to drain (on SIGTERM, or ``Server.close()``) closes its
listening socket, so new connections are refused, and sends ``[9, last_id,
reason]`` on each connection whose client asked for it in its hello
(``"go_away": true``). ``last_id`` is the highest request id the server had read
on this connection when it sent the go-away (nil if it had read none);
``reason`` is a text for people. A client that did not ask gets no go-away (an
older client would take the unknown kind for a broken stream). The rules:

- The server runs no request that it reads after the go-away: each is answered
  with the error ``server_shutting_down``, and a ``server_shutting_down`` answer
  always means the call never ran. Of the calls read before it, those running
  are answered as usual, and those still queued are answered
  ``server_shutting_down``.
- The server keeps reading the connection and answering it until the drain ends
  (its running calls are answered, or its grace period passes); then it closes
  the connection.
- The client sends no new request on that connection: new calls go to a new
  connection (another server, or the same address again). It closes the old
  connection once no call of it is in flight and no stream of it is open.
- A request whose id is greater than ``last_id`` was not read before the
  go-away, so it never runs, even if the connection ends before its answer
  arrives: a client that numbers its requests in increasing order on a connection
  (rpc's clients do) may send it again elsewhere. A request with an id up to
  ``last_id`` whose answer never comes may have run: it must not be sent again.
- A stream under way is not moved: the server ends it (``server_shutting_down``)
  as it begins to drain.

A lent connection (the server's latency fast path) gets its go-away once the
handler serving it has given it back, after the call it runs, so ``last_id``
counts the requests that handler read too.

Values
------
msgpack's own types (nil, bool, int up to 64 bits, float64, str, bin, array, map)
plus these extension types; the ext payload is given in the right column:

====  ===========  =====================================================
code  Python type  payload
====  ===========  =====================================================
1     tuple        msgpack array of the items
2     set          msgpack array of the items
3     frozenset    msgpack array of the items
4     datetime     UTF-8 ISO 8601 text (``isoformat()``); naive if no offset
5     date         UTF-8 ISO 8601 text ``YYYY-MM-DD``
6     Decimal      UTF-8 text of the decimal (``str()``)
7     UUID         16 bytes, big-endian
8     complex      two big-endian float64: real, imaginary
9     int          big-endian two's complement bytes (for ints beyond 64 bits)
10    timedelta    msgpack array ``[days, seconds, microseconds]``
11    time         UTF-8 ISO 8601 text
====  ===========  =====================================================

Codes 0-63 are rpc's; 64-127 are for users (see :func:`register_type`). Lists
arrive as lists, dicts as dicts; bytearray and memoryview arrive as bytes; a
subclass of a supported type (an IntEnum, an OrderedDict, a namedtuple) arrives as
its base type. A timezone-aware datetime keeps its UTC offset, not its zone name.

Limits
------
Every peer (server, handler, client) applies these, so that one small frame can
never cost a large amount of memory, CPU or stack:

- frames over ``max_message_bytes`` are refused before they are read;
- extension values nest at most ``MAX_EXT_DEPTH`` (32) deep, counting each tuple,
  set, frozenset, timedelta or user type inside another; a deeper value is refused
  by the encoder (``SerializationError``) and by every decoder (``ProtocolError``);
  arrays and maps nest at most 1024 deep within one extension level (msgpack's limit);
- a hello decodes no extension types at all;
- a method name is at most ``MAX_METHOD_BYTES`` (1024) bytes of UTF-8;
- the server decodes only the envelope of a request: in a frame over 4 KiB it
  checks the first byte of kind, id and method before reading them, skips
  ``args`` and ``kwargs`` without decoding them, and refuses a ``meta`` that is
  not a map of at most ``MAX_META_BYTES`` (4096) bytes; only requests and
  notifications may be over 4 KiB;
- an error's ``message`` and ``traceback`` are each at most
  ``MAX_ERROR_TEXT_BYTES`` (64 KiB) of UTF-8: a longer text keeps its head and its
  tail around a ``[N bytes cut]`` marker; ``type`` is at most 256 bytes; ``args``
  are sent only when they encode to at most 64 KiB;
- error texts and log lines quote at most 200 characters of what a peer sent.

A broken request whose id can be read is answered with a ``protocol_error`` for
that id and the connection goes on; one whose id cannot be read gets a response
with a nil id and the connection is closed.
"""

from __future__ import annotations

import datetime as _dt
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

import msgpack

from .errors import MessageTooLarge, ProtocolError, RPCError, SerializationError

__all__ = [
    "REQUEST",
    "RESPONSE",
    "NOTIFICATION",
    "CANCEL",
    "HELLO",
    "STREAM_START",
    "STREAM_ITEM",
    "STREAM_END",
    "CREDIT",
    "GO_AWAY",
    "STREAM_WINDOW",
    "STREAM_WINDOW_BYTES",
    "StreamWindow",
    "StreamMessage",
    "GoAway",
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Envelope",
    "Request",
    "Response",
    "ErrorInfo",
    "Hello",
    "register_type",
    "encode_value",
    "decode_value",
    "encode_request",
    "encode_notification",
    "encode_response",
    "encode_error",
    "encode_hello",
    "encode_stream_start",
    "encode_stream_item",
    "encode_stream_end",
    "encode_credit",
    "encode_go_away",
    "stream_kind",
    "stream_control",
    "decode_credit",
    "parse_envelope",
    "decode_request",
    "decode_call",
    "decode_response",
    "decode_hello",
    "decode_answer",
    "response_is_error",
    "check_size",
    "MAX_EXT_DEPTH",
    "MAX_METHOD_BYTES",
    "MAX_META_BYTES",
    "MAX_ERROR_TEXT_BYTES",
    "ProtocolError",  # what every decoder here raises, re-exported from rpc.errors
]

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2
CANCEL = 3
HELLO = 4
STREAM_START = 5
STREAM_ITEM = 6
STREAM_END = 7
CREDIT = 8
GO_AWAY = 9

# A stream's window (see "Streams" above): items on their way and not yet credited.
STREAM_WINDOW = 64
STREAM_WINDOW_BYTES = 1 << 20

# Between the server and its handler processes only, never on the wire:
LEASE = 16  # [16, request frame, peer]: serve this client's socket (its descriptor follows)
LEASE_END = 17  # [17, reason, calls served, their counts]: the socket is the server's again
RECALL = 18  # [18]: end the lease after the current call
LEASE_TALLY = 19  # [19, counts]: calls served on a lent socket so far (rpc.metrics)

PROTOCOL_VERSION = 1

# Names rpc answers itself; user names never start with "_", so these cannot clash.
PING = "_rpc.ping"  # answered by the server, without a handler
METHODS = "_rpc.methods"  # answered by a handler: what the registry exposes
# Room for a response's envelope around a result of the size limit, between server and handlers.
ENVELOPE_MARGIN = 65536
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

USER_CODES = range(64, 128)

# Limits every peer applies, so a small frame can never cost a large amount of memory,
# CPU or C stack (see "Limits" above).
MAX_EXT_DEPTH = 32  # extension values inside extension values
MAX_METHOD_BYTES = 1024
MAX_META_BYTES = 4096
MAX_ERROR_TEXT_BYTES = 64 * 1024  # each of an error's message and traceback
MAX_ERROR_ARGS_BYTES = 64 * 1024
MAX_TYPE_NAME_BYTES = 256

# -- values -------------------------------------------------------------------------

_Encoder = Callable[[Any], Any]
_Decoder = Callable[[Any], Any]

# type -> (ext code, encode to bytes); exact-type lookups keep the hot path cheap.
_ext_encoders: dict[type, tuple[int, Callable[[Any], bytes]]] = {}
_ext_decoders: dict[int, Callable[[bytes], Any]] = {}
# user types, tried with isinstance() after exact lookups miss (for subclasses)
_user_types: list[tuple[type, int, Callable[[Any], bytes]]] = []
_user_decoders: dict[int, Callable[[bytes], Any]] = {}


# Packers kept for reuse: making one allocates a 256 KiB buffer, which costs more than
# encoding a small message. Each is taken by one encoding at a time (an encoding inside
# another, of an extension value or in another thread, takes another).
_packers: list[Any] = []
_KEPT_PACKER_BYTES = 256 * 1024  # one whose buffer grew past its first size is dropped, freeing it


def _pack(obj: Any) -> bytes:
    try:
        packer = _packers.pop()
    except IndexError:
        packer = msgpack.Packer(default=_default, use_bin_type=True, strict_types=True, datetime=False)
    packed: bytes = packer.pack(obj)  # (a packer that raised is not put back)
    if len(packed) <= _KEPT_PACKER_BYTES:
        _packers.append(packer)
    return packed


def _unpack(data: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


class _Nesting(threading.local):
    """How deep the current thread is inside extension values, encoding and decoding.

    Each level runs msgpack afresh on the C stack (about 40 KB a level), so
    a few hundred nested tuples would overflow it and kill the process.
    """

    encoding = 0
    decoding = 0


_nesting = _Nesting()


class _TooDeep(ValueError):
    pass


def _too_deep() -> _TooDeep:
    return _TooDeep(f"values nest extension types (tuple, set, ...) more than {MAX_EXT_DEPTH} deep")


def _pack_nested(obj: Any) -> bytes:
    """Encode the payload of an extension value, one level deeper."""
    depth = _nesting.encoding
    if depth >= MAX_EXT_DEPTH:
        raise _too_deep()
    _nesting.encoding = depth + 1
    try:
        return _pack(obj)
    finally:
        _nesting.encoding = depth


def _unpack_nested(data: bytes) -> Any:
    """Decode the payload of an extension value, one level deeper."""
    depth = _nesting.decoding
    if depth >= MAX_EXT_DEPTH:
        raise _too_deep()
    _nesting.decoding = depth + 1
    try:
        return _unpack(data)
    finally:
        _nesting.decoding = depth


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"extension type {code} is not allowed here")


def _big_int_bytes(n: int) -> bytes:
    return n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True)


# Bases whose subclasses travel as the base: plain msgpack types, then extension types.
_PLAIN_BASES: tuple[type[Any], ...] = (float, str, bytes, dict, list)
_EXT_BASES: tuple[type, ...] = (
    tuple, frozenset, set, _dt.datetime, _dt.date, _dt.timedelta, _dt.time, Decimal, uuid.UUID,
)


def _default(obj: Any) -> Any:
    found = _ext_encoders.get(type(obj))
    if found is not None:
        code, encode = found
        return msgpack.ExtType(code, encode(obj))
    for cls, code, encode in _user_types:
        if isinstance(obj, cls):
            return msgpack.ExtType(code, encode(obj))
    # Subclasses of supported types travel as their base type.
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    for base in _PLAIN_BASES:
        if isinstance(obj, base):
            return base(obj)
    for ext_base in _EXT_BASES:
        if isinstance(obj, ext_base):
            code, encode = _ext_encoders[ext_base]
            return msgpack.ExtType(code, encode(obj))
    raise TypeError(
        f"cannot encode a value of type {type(obj).__module__}.{type(obj).__qualname__} "
        "(teach rpc the type with rpc.register_type)"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    decode = _ext_decoders.get(code)
    if decode is None:
        raise ValueError(f"unknown extension type {code}")
    return decode(data)


def _builtin(cls: type, code: int, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> None:
    _ext_encoders[cls] = (code, encode)
    _ext_decoders[code] = decode


def _items(obj: Any) -> bytes:
    return _pack_nested(list(obj))


def _iso(obj: _dt.date | _dt.time) -> bytes:
    return obj.isoformat().encode()


_COMPLEX = struct.Struct("!dd")

_builtin(tuple, 1, _items, lambda b: tuple(_unpack_nested(b)))
_builtin(set, 2, _items, lambda b: set(_unpack_nested(b)))
_builtin(frozenset, 3, _items, lambda b: frozenset(_unpack_nested(b)))
_builtin(_dt.datetime, 4, _iso, lambda b: _dt.datetime.fromisoformat(b.decode()))
_builtin(_dt.date, 5, _iso, lambda b: _dt.date.fromisoformat(b.decode()))
_builtin(Decimal, 6, lambda d: str(d).encode(), lambda b: Decimal(b.decode()))
_builtin(uuid.UUID, 7, lambda u: u.bytes, lambda b: uuid.UUID(bytes=b))
_builtin(complex, 8, lambda c: _COMPLEX.pack(c.real, c.imag), lambda b: complex(*_COMPLEX.unpack(b)))
_builtin(int, 9, _big_int_bytes, lambda b: int.from_bytes(b, "big", signed=True))
_builtin(
    _dt.timedelta,
    10,
    lambda t: _pack([t.days, t.seconds, t.microseconds]),
    lambda b: _dt.timedelta(*_unpack_nested(b)),
)
_builtin(_dt.time, 11, _iso, lambda b: _dt.time.fromisoformat(b.decode()))


def register_type(cls: type, code: int, encode: _Encoder, decode: _Decoder) -> None:
    """Teach the wire format a type of your own.

    ``encode(obj)`` returns any encodable value (a tuple, a dict, ...) and
    ``decode(value)`` rebuilds the object from it. ``code`` is an extension code
    in 64-127, the same in every process that talks; register at import time of a
    module that both the server's registry and the clients import. Instances of
    subclasses of ``cls`` are encoded too (and decode as ``cls``).
    """
    if code not in USER_CODES:
        raise ValueError(f"extension code {code} is outside the user range 64-127")
    if code in _ext_decoders and _ext_decoders[code] is not _user_decoders.get(code):
        raise ValueError(f"extension code {code} is taken")

    def to_bytes(obj: Any) -> bytes:
        return _pack_nested(encode(obj))

    def from_bytes(data: bytes) -> Any:
        return decode(_unpack_nested(data))

    _ext_encoders[cls] = (code, to_bytes)
    _ext_decoders[code] = from_bytes
    _user_decoders[code] = from_bytes
    _user_types[:] = [entry for entry in _user_types if entry[0] is not cls]
    _user_types.append((cls, code, to_bytes))


def encode_value(value: Any, what: str = "value") -> bytes:
    """Encode one value; :class:`SerializationError` if it (or something in it) cannot be.

    ``what`` names the value in the error: "an argument of 'add'", "the result of 'add'".
    """
    try:
        return _pack(value)
    except Exception as exc:  # msgpack's errors, and whatever a user type's encoder raises
        raise SerializationError(f"cannot encode {what}: {brief(exc)}") from None


def decode_value(data: bytes | bytearray | memoryview) -> Any:
    """Decode one value; :class:`ProtocolError` if the bytes are not a valid encoding."""
    try:
        return _unpack(data)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ProtocolError(f"cannot decode value: {brief(exc)}") from None


_QUOTE_CHARS = 200


def brief(value: object, limit: int = _QUOTE_CHARS) -> str:
    """Text for an error or a log line that quotes what a peer sent: at most ``limit`` characters.

    A hostile frame must not turn into a megabyte of log line or error reply.
    """
    try:
        text = value if isinstance(value, str) else (str(value) or type(value).__name__)
    except Exception:
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text


def quote(value: object, limit: int = _QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters; never raises.

    A peer's values may be huge strings, integers too long for ``repr`` or lists
    nested too deep for it: they are named by their type instead.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{brief(repr(value[:limit]), limit)}... ({len(value)} in all)"
    if isinstance(value, (list, dict)):
        return f"{'a map' if isinstance(value, dict) else 'an array'} of {len(value)}"
    try:
        return brief(repr(value), limit)
    except Exception:  # ValueError for a 5000-digit int, InvalidOperation, ...
        return f"a value of type {type(value).__name__}"


def _text(value: object, default: str) -> str:
    """A text field of a peer's error map: a string as is, anything else quoted, never raising."""
    if value is None:
        return default
    return value if type(value) is str else quote(value)


# -- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as it travels: the wire ``code``, exception type name, message, traceback."""

    code: str
    type_name: str
    message: str
    traceback: str = ""
    args: tuple[Any, ...] = ()


class Envelope(NamedTuple):
    """What the server reads of an incoming frame: enough to route it, not the arguments."""

    kind: int
    id: int | None
    method: str
    timeout: float | None


class StreamMessage(NamedTuple):
    """A stream's start, item or end as the client decodes it (``kind`` is STREAM_START, ...)."""

    kind: int
    id: int
    error: ErrorInfo | None  # of an end: nil when the generator finished
    value: Any  # of an item


class StreamWindow:
    """A stream's flow control as its sender sees it: the items sent and not yet credited.

    The handler sends an item only while the window is open; the router keeps the
    same count to know whether the handler is producing or waiting for the client.
    """

    __slots__ = ("sizes", "bytes")

    def __init__(self) -> None:
        self.sizes: deque[int] = deque()
        self.bytes = 0

    def open(self) -> bool:
        return len(self.sizes) < STREAM_WINDOW and self.bytes < STREAM_WINDOW_BYTES

    def sent(self, size: int) -> None:
        self.sizes.append(size)
        self.bytes += size

    def credit(self, count: int) -> None:
        sizes = self.sizes
        for _ in range(min(count, len(sizes))):
            self.bytes -= sizes.popleft()


class GoAway(NamedTuple):
    """A server's go-away as the client decodes it: no new call on this connection."""

    last_id: int | None  # the highest request id the server had read; a higher one never runs
    reason: str


class Request(NamedTuple):
    """A request or notification as the handler decodes it (``id`` is None for notifications)."""

    id: int | None
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    timeout: float | None = None


class Response(NamedTuple):
    """A decoded response: exactly one of ``error`` and ``result`` is meaningful."""

    id: int | None
    error: ErrorInfo | None
    result: Any


@dataclass(frozen=True, slots=True)
class Hello:
    """The first message each side sends after the handshake."""

    version: int
    info: dict[str, Any]


def check_size(frame: bytes, limit: int) -> None:
    """Raise :class:`MessageTooLarge` if ``frame`` exceeds ``limit`` bytes."""
    if len(frame) > limit:
        raise MessageTooLarge(f"message of {len(frame)} bytes exceeds the limit of {limit} bytes")


def encode_request(id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> bytes:
    meta = {} if timeout is None else {"timeout": timeout}
    try:
        return _pack([REQUEST, id, method, list(args), kwargs, meta])
    except Exception as exc:  # encode again for the error text: the per-call path builds none
        encode_value([method, list(args), kwargs], f"the arguments of {quote(method)}")
        raise SerializationError(f"cannot encode the request: {brief(exc)}") from None


def encode_notification(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return encode_value([NOTIFICATION, method, list(args), kwargs], f"the arguments of {quote(method)}")


def encode_cancel(request_id: int) -> bytes:
    """Ask the server to cancel the call ``request_id`` (answered with ``call_cancelled``, unless
    its answer is already on its way)."""
    return _pack([CANCEL, request_id])


def encode_response(id: int | None, result: Any, method: str = "") -> bytes:
    try:
        return _pack([RESPONSE, id, None, result])
    except Exception as exc:  # encode again for the error text: the per-call path builds none
        encode_value(result, f"the result of {quote(method)}" if method else "the result")
        raise SerializationError(f"cannot encode the response: {brief(exc)}") from None


def shorten(text: str, limit: int = MAX_ERROR_TEXT_BYTES) -> str:
    """``text`` as valid UTF-8 if that is at most ``limit`` bytes, else its head and tail around a marker.

    Error messages and tracebacks are cut like this before they travel, so an
    exception holding megabytes of text still gives a small, readable reply.
    """
    data = text.encode("utf-8", "backslashreplace")  # lone surrogates cannot travel as UTF-8
    if len(data) <= limit:
        return data.decode("utf-8")
    half = (limit - 100) // 2
    head = data[:half].decode("utf-8", "ignore")
    tail = data[-half:].decode("utf-8", "ignore")
    return f"{head}\n... [{len(data) - 2 * half} bytes cut] ...\n{tail}"


def encode_error(id: int | None, error: ErrorInfo) -> bytes:
    """An error response; texts over :data:`MAX_ERROR_TEXT_BYTES` are shortened, large args dropped."""
    body: dict[str, Any] = {
        "code": error.code,
        "type": shorten(error.type_name, MAX_TYPE_NAME_BYTES),
        "message": shorten(error.message),
    }
    if error.traceback:
        body["traceback"] = shorten(error.traceback)
    if error.args:
        try:
            args = _pack(list(error.args))
        except BaseException:  # the exception's args are not encodable (whatever an encoder raised); its text still is
            args = b""
        if 0 < len(args) <= MAX_ERROR_ARGS_BYTES:
            body["args"] = list(error.args)
    return _pack([RESPONSE, id, body, None])


def error_frame(id: int | None, error: RPCError) -> bytes:
    """The error response that carries one of rpc's own errors (CallTimeout, ServerBusy, ...)."""
    return encode_error(id, ErrorInfo(error.code, type(error).__name__, error.message))


def encode_hello(info: dict[str, Any]) -> bytes:
    return _pack([HELLO, PROTOCOL_VERSION, info])


def encode_stream_start(id: int) -> bytes:
    return _pack([STREAM_START, id])


def encode_stream_item(id: int, value: Any, method: str = "") -> bytes:
    """One item of a stream; :class:`SerializationError` if it cannot be encoded."""
    try:
        return _pack([STREAM_ITEM, id, value])
    except Exception as exc:
        raise SerializationError(f"cannot encode an item of {quote(method) if method else 'the stream'}: {brief(exc)}") from None


def encode_stream_end(id: int | None, error: ErrorInfo | None = None) -> bytes:
    """The end of a stream: nil error when the generator finished."""
    if error is None:
        return _pack([STREAM_END, id, None])
    # The error map of a response, so texts are cut the same way.
    body = decode_value(encode_error(id, error))[2]
    return _pack([STREAM_END, id, body])


def stream_end_frame(id: int | None, error: RPCError) -> bytes:
    """The end of a stream that failed with one of rpc's own errors (CallTimeout, ...)."""
    return encode_stream_end(id, ErrorInfo(error.code, type(error).__name__, error.message))


def encode_credit(id: int, count: int) -> bytes:
    return _pack([CREDIT, id, count])


def encode_go_away(last_id: int | None, reason: str) -> bytes:
    """Tell a client the server is going away (see "Go-away" above)."""
    return _pack([GO_AWAY, last_id, reason])


_STREAM_KINDS = (STREAM_START, STREAM_ITEM, STREAM_END)


def stream_control(frame: bytes | bytearray | memoryview) -> bool:
    """Whether a frame the router forwards to a handler is a stream's credit or close (cancel)."""
    return len(frame) > 1 and ((frame[0] == 0x93 and frame[1] == CREDIT) or (frame[0] == 0x92 and frame[1] == CANCEL))


def stream_kind(frame: bytes | bytearray) -> int | None:
    """The kind of a stream message from a handler (start, item, end), read from its first bytes, or None."""
    if len(frame) > 1 and 0x92 <= frame[0] <= 0x93 and frame[1] in _STREAM_KINDS:
        return frame[1]
    return None


_NIL = 0xC0
# An id's width in bytes by its msgpack marker: uint8/16/32/64 (any other: fixint or nil, 1)
_ID_WIDTHS = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}


def response_is_error(frame: bytes | bytearray) -> bool:
    """Whether an encoded response carries an error, read without decoding it.

    The error field follows the id; its first byte is nil (0xc0) on success.
    """
    marker = frame[2] if len(frame) > 2 else _NIL
    width = _ID_WIDTHS.get(marker, 1)  # (a module constant: this runs for every call's reply)
    position = 2 + width
    return len(frame) > position and frame[position] != _NIL


def encode_internal(*fields: Any) -> bytes:
    """A message between the server and a handler (LEASE, LEASE_END, RECALL, LEASE_TALLY)."""
    return _pack(list(fields))


def internal_kind(frame: bytes | bytearray) -> int | None:
    """The kind of a server-handler message, or None for an ordinary request or response."""
    kind = frame[1] if len(frame) > 1 and 0x91 <= frame[0] <= 0x9F else None
    return kind if kind in (LEASE, LEASE_END, RECALL, LEASE_TALLY) else None


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ProtocolError(f"malformed message: {what}")


# Below this size a full decode is cheap and bounded (a few hundred KB at worst);
# above it, each envelope field's type and size is checked before it is decoded,
# and the arguments are skipped, never decoded, by the server.
_SMALL_FRAME = 4096

_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_STR_MARKERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


def _ignore_ext(code: int, data: bytes) -> None:
    return None


def parse_envelope(frame: bytes | bytearray) -> Envelope:
    """Read kind, id, method and timeout of a client frame, not decoding the arguments.

    Raises :class:`ProtocolError`; its ``request_id`` attribute is the id when the
    id could be read, so the caller can still answer the request.
    """
    try:
        if len(frame) <= _SMALL_FRAME:
            message = msgpack.unpackb(frame, raw=False, strict_map_key=False, ext_hook=_ignore_ext)
        else:
            message = _read_large(frame)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        what = "trailing bytes after the message" if isinstance(exc, msgpack.ExtraData) else brief(exc)
        error = ProtocolError(f"malformed message: {what}")
        error.request_id = _readable_id(frame)
        raise error from None
    if type(message) is not list or not message:
        raise ProtocolError("malformed message: not a non-empty array")
    kind = message[0]
    if type(kind) is not int:
        raise ProtocolError(f"malformed message: kind {quote(kind)} is not an int")
    if kind == REQUEST and len(message) == 6:
        request_id = message[1]
        if type(request_id) is not int or not 0 <= request_id < 2**64:
            raise ProtocolError("malformed message: request id must be an unsigned 64-bit int")
        method, meta = message[2], message[5]
        try:
            _check_method(method)
            _expect(type(meta) is dict, "meta must be a map")
            timeout = meta.get("timeout")
            _expect(
                timeout is None or (type(timeout) in (int, float) and 0 <= timeout < 1e9),
                "timeout must be a number of seconds >= 0",
            )
        except ProtocolError as exc:
            exc.request_id = request_id
            raise
        return Envelope(REQUEST, request_id, method, None if timeout is None else float(timeout))
    if kind == NOTIFICATION and len(message) == 4:
        _check_method(message[1])
        return Envelope(NOTIFICATION, None, message[1], None)
    if kind == CANCEL and len(message) == 2:
        _expect(type(message[1]) is int, "request id must be an int")
        return Envelope(CANCEL, message[1], "", None)
    if kind == HELLO and len(message) == 3:
        return Envelope(HELLO, None, "", None)
    if kind == CREDIT and len(message) == 3:
        _expect(type(message[1]) is int, "request id must be an int")
        _expect(type(message[2]) is int and 0 <= message[2] < 2**32, "credit must be a count >= 0")
        return Envelope(CREDIT, message[1], "", None)
    raise ProtocolError(f"malformed message: kind {quote(kind)} with {len(message)} fields")


def _check_method(method: object) -> None:
    if type(method) is not str:
        raise ProtocolError("malformed message: method must be a string")
    if len(method) > MAX_METHOD_BYTES // 4 and len(method.encode("utf-8")) > MAX_METHOD_BYTES:
        raise ProtocolError(f"malformed message: a method name is at most {MAX_METHOD_BYTES} bytes")


def _read_large(frame: bytes | bytearray) -> list[Any]:
    """The envelope of a frame over _SMALL_FRAME bytes, each field's type checked before it is read.

    Only a request or a notification may be that large; their arguments are
    skipped, and meta (the last field) must be a map of at most MAX_META_BYTES.
    """
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=len(frame),
        max_str_len=MAX_METHOD_BYTES,
        max_bin_len=MAX_META_BYTES,
        max_array_len=MAX_META_BYTES,
        max_map_len=MAX_META_BYTES,
        max_ext_len=MAX_META_BYTES,
    )
    unpacker.feed(frame)
    size = unpacker.read_array_header()
    if frame[unpacker.tell()] not in (REQUEST, NOTIFICATION):
        raise ProtocolError(f"malformed message: only a request or a notification may exceed {_SMALL_FRAME} bytes")
    kind = unpacker.unpack()
    if (kind, size) not in ((REQUEST, 6), (NOTIFICATION, 4)):
        raise ProtocolError(f"malformed message: kind {kind} with {size} fields")
    request_id = None
    if kind == REQUEST:
        if frame[unpacker.tell()] > 0x7F and frame[unpacker.tell()] not in _UINT_WIDTHS:
            raise ProtocolError("malformed message: request id must be an unsigned 64-bit int")
        request_id = unpacker.unpack()
    try:
        _expect(frame[unpacker.tell()] in _STR_MARKERS, "method must be a string")
        try:
            method = unpacker.unpack()
        except ValueError:  # over max_str_len
            raise ProtocolError(f"malformed message: a method name is at most {MAX_METHOD_BYTES} bytes") from None
        unpacker.skip()  # args
        unpacker.skip()  # kwargs
        if kind == NOTIFICATION:
            _expect(unpacker.tell() == len(frame), "trailing bytes after the message")
            return [kind, method, None, None]
        meta_bytes = len(frame) - unpacker.tell()
        _expect(0 < meta_bytes and frame[unpacker.tell()] in _MAP_MARKERS, "meta must be a map")
        _expect(meta_bytes <= MAX_META_BYTES, f"meta is {meta_bytes} bytes; the limit is {MAX_META_BYTES}")
        try:
            meta = msgpack.unpackb(frame[unpacker.tell() :], raw=False, strict_map_key=False, ext_hook=_ignore_ext)
        except msgpack.ExtraData:
            raise ProtocolError("malformed message: trailing bytes after the message") from None
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    return [kind, request_id, method, None, None, meta]


def _readable_id(frame: bytes | bytearray) -> int | None:
    """The id of a request whose later fields are broken, if its first fields are sound.

    Read by hand from the first bytes: nothing of a broken frame is decoded.
    """
    for prefix in (b"\x96\x00", b"\xdc\x00\x06\x00", b"\xdd\x00\x00\x00\x06\x00"):  # [0, id, ...] of 6
        if frame.startswith(prefix):
            position = len(prefix)
            break
    else:
        return None
    if position >= len(frame):
        return None
    marker = frame[position]
    if marker <= 0x7F:
        return marker
    width = _UINT_WIDTHS.get(marker)
    if width is None or position + 1 + width > len(frame):
        return None
    return int.from_bytes(frame[position + 1 : position + 1 + width], "big")


def decode_request(frame: bytes | bytearray) -> Request:
    """Decode a request or notification in full (the handler's side); only ever raises ProtocolError."""
    try:
        return _decode_request(frame)
    except ProtocolError:
        raise
    except Exception as exc:  # whatever a hostile value makes a check raise: never the handler's end
        raise ProtocolError(f"malformed message: {brief(exc)}") from None


def _decode_request(frame: bytes | bytearray) -> Request:
    message = decode_value(frame)
    _expect(type(message) is list and len(message) > 0, "not a message array")
    kind = message[0]
    _expect(type(kind) is int, "kind must be an int")  # before comparing: Decimal('sNaN') == 0 raises
    if kind == REQUEST:
        _expect(len(message) == 6, "a request is an array of 6")
        _, request_id, method, args, kwargs, meta = message
        _expect(type(request_id) is int and 0 <= request_id < 2**64, "request id must be an unsigned 64-bit int")
        _expect(type(meta) is dict, "meta must be a map")
        timeout = meta.get("timeout")
        _expect(timeout is None or (type(timeout) in (int, float) and timeout >= 0), "timeout must be >= 0")
    elif kind == NOTIFICATION:
        _expect(len(message) == 4, "a notification is an array of 4")
        _, method, args, kwargs = message
        request_id = timeout = None
    else:
        raise ProtocolError(f"malformed message: kind {quote(kind)} is not a call")
    _check_method(method)
    _expect(type(args) is list, "args must be an array")
    _expect(type(kwargs) is dict and all(type(k) is str for k in kwargs), "kwargs must be a map of strings")
    return Request(request_id, method, args, kwargs, None if timeout is None else float(timeout))


class _HasExtension(Exception):
    """Raised out of an ext hook: the frame holds an extension value (see :func:`decode_call`)."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _HasExtension


def decode_call(frame: bytes | bytearray | memoryview) -> Request:
    """Decode a request or notification that both :func:`parse_envelope` and
    :func:`decode_request` accept, in one decode; ProtocolError if either refuses it.

    Without extension values, one decode gives both the envelope the router
    reads and the whole message, so the checks of both are made on it. A frame
    with extension values (or over 4 KiB, whose envelope is read field by field)
    takes both functions, since ``parse_envelope`` does not decode them.
    """
    if len(frame) <= _SMALL_FRAME:
        try:
            message = msgpack.unpackb(frame, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
        except _HasExtension:
            pass
        except Exception as exc:  # msgpack raises a zoo of types for bad input
            raise ProtocolError(f"malformed message: {brief(exc)}") from None
        else:
            try:
                return _checked_call(message)
            except ProtocolError:
                raise
            except Exception as exc:  # as in decode_request: whatever a hostile value makes a check raise
                raise ProtocolError(f"malformed message: {brief(exc)}") from None
    whole = bytes(frame) if isinstance(frame, memoryview) else frame
    parse_envelope(whole)
    return decode_request(whole)


def _checked_call(message: Any) -> Request:
    """The checks of parse_envelope and _decode_request together, on a message with no extension values."""
    if type(message) is not list or not message or type(message[0]) is not int:
        raise ProtocolError("malformed message: not an array starting with an int kind")
    kind = message[0]
    if kind == REQUEST and len(message) == 6:
        _, request_id, method, args, kwargs, meta = message
        if type(request_id) is not int or not 0 <= request_id < 2**64:
            raise ProtocolError("malformed message: request id must be an unsigned 64-bit int")
        if type(method) is not str or len(method) > MAX_METHOD_BYTES // 4:
            _check_method(method)
        if type(meta) is not dict:
            raise ProtocolError("malformed message: meta must be a map")
        timeout = meta.get("timeout")
        if timeout is not None:
            if type(timeout) not in (int, float) or not 0 <= timeout < 1e9:
                raise ProtocolError("malformed message: timeout must be a number of seconds >= 0")
            timeout = float(timeout)
    elif kind == NOTIFICATION and len(message) == 4:
        _, method, args, kwargs = message
        _check_method(method)
        request_id = timeout = None
    else:
        raise ProtocolError(f"malformed message: kind {quote(kind)} with {len(message)} fields is not a call")
    if type(args) is not list:
        raise ProtocolError("malformed message: args must be an array")
    if type(kwargs) is not dict or (kwargs and not all(type(k) is str for k in kwargs)):
        raise ProtocolError("malformed message: kwargs must be a map of strings")
    return tuple.__new__(Request, (request_id, method, args, kwargs, timeout))  # Request(...) without its Python-level __new__


def decode_response(frame: bytes | memoryview) -> Response:
    """Decode a response (the client's side)."""
    try:
        message = _unpack(frame)
    except Exception as exc:  # as decode_value, one call less on the per-call path
        raise ProtocolError(f"cannot decode value: {brief(exc)}") from None
    if type(message) is list and len(message) == 4 and type(message[0]) is int and message[0] == RESPONSE:
        _, response_id, error, result = message
        if error is None and type(response_id) is int:  # the usual answer, checked in one go
            return tuple.__new__(Response, (response_id, None, result))  # Response(...) without its Python-level __new__
    return _response_of(message)


def decode_answer(frame: bytes | memoryview) -> Response | StreamMessage | GoAway:
    """Decode what a server sends a client: a response, a stream's start, item or end, or a go-away."""
    try:
        message = _unpack(frame)
    except Exception as exc:
        raise ProtocolError(f"cannot decode value: {brief(exc)}") from None
    if type(message) is list and message and type(message[0]) is int:
        kind = message[0]
        if kind == RESPONSE and len(message) == 4 and message[2] is None and type(message[1]) is int:
            return tuple.__new__(Response, (message[1], None, message[3]))
        if kind == STREAM_ITEM and len(message) == 3 and type(message[1]) is int:
            return tuple.__new__(StreamMessage, (STREAM_ITEM, message[1], None, message[2]))
        if kind == STREAM_START:
            _expect(len(message) == 2 and type(message[1]) is int, "a stream start is [5, id]")
            return StreamMessage(STREAM_START, message[1], None, None)
        if kind == STREAM_END:
            _expect(len(message) == 3 and type(message[1]) is int, "a stream end is [7, id, error]")
            error = message[2]
            _expect(error is None or type(error) is dict, "error must be a map")
            return StreamMessage(STREAM_END, message[1], None if error is None else _error_of(error), None)
        if kind == GO_AWAY:
            _expect(len(message) == 3 and (message[1] is None or type(message[1]) is int), "a go-away is [9, id, reason]")
            return GoAway(message[1], _text(message[2], ""))
    return _response_of(message)


def _response_of(message: Any) -> Response:
    _expect(type(message) is list and len(message) == 4 and _is_kind(message[0], RESPONSE), "not a response")
    _, response_id, error, result = message
    _expect(response_id is None or type(response_id) is int, "response id must be an int or nil")
    if error is None:
        return Response(response_id, None, result)
    _expect(type(error) is dict, "error must be a map")
    return Response(response_id, _error_of(error), None)


def _error_of(error: dict[Any, Any]) -> ErrorInfo:
    args = error.get("args", ())
    return ErrorInfo(
        code=_text(error.get("code"), "rpc_error"),
        type_name=_text(error.get("type"), "Exception"),
        message=_text(error.get("message"), ""),
        traceback=_text(error.get("traceback"), ""),
        args=tuple(args) if type(args) is list else (),
    )


def decode_credit(frame: bytes | bytearray) -> tuple[int, int]:
    """The id and count of a credit message that :func:`parse_envelope` accepted."""
    _, request_id, count = decode_value(frame)
    return request_id, count


def _is_kind(value: object, kind: int) -> bool:
    return type(value) is int and value == kind


def decode_hello(frame: bytes) -> Hello:
    """Decode a hello. It arrives before anything is known of the peer: no extension types."""
    try:
        message = msgpack.unpackb(frame, ext_hook=_no_ext, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ProtocolError(f"malformed hello: {brief(exc)}") from None
    _expect(type(message) is list and len(message) == 3 and _is_kind(message[0], HELLO), "expected a hello")
    _, version, info = message
    _expect(type(version) is int and type(info) is dict, "malformed hello")
    return Hello(version, info)
