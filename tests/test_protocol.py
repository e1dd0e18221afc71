"""The wire format as pure code: values, envelopes, errors; no sockets."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections import OrderedDict, namedtuple
from decimal import Decimal
from enum import IntEnum

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpc import protocol
from rpc.errors import ProtocolError, SerializationError

EXTENSION_VALUES = [
    (1, 2, "three"),
    (),
    {1, 2, 3},
    frozenset({"a", "b"}),
    dt.datetime(2026, 11, 26, 8, 30, 15, 123456),
    dt.datetime(2026, 11, 26, 8, 30, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 11, 26, 8, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
    dt.date(1999, 12, 31),
    dt.time(23, 59, 59, 999999),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    Decimal("3.14159265358979323846264338327950288"),
    Decimal("-0"),
    Decimal("NaN"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    complex(1.5, -2.25),
    2**64,
    -(2**63) - 1,
    10**100,
    -(10**100),
]


@pytest.mark.parametrize("value", EXTENSION_VALUES, ids=lambda v: type(v).__name__)
def test_extension_types_round_trip_with_type_and_value(value):
    """Each extension type comes back as the same type with an equal value."""
    decoded = protocol.decode_value(protocol.encode_value(value))
    assert type(decoded) is type(value)
    if isinstance(value, Decimal) and value.is_nan():
        assert decoded.is_nan()
    else:
        assert decoded == value
    if isinstance(value, dt.datetime):
        assert decoded.utcoffset() == value.utcoffset()


def test_naive_and_aware_datetimes_stay_apart():
    """A naive datetime stays naive; an aware one keeps its offset."""
    naive = protocol.decode_value(protocol.encode_value(dt.datetime(2020, 1, 1)))
    aware = protocol.decode_value(protocol.encode_value(dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)))
    assert naive.tzinfo is None
    assert aware.utcoffset() == dt.timedelta(0)


def test_nested_extension_types_inside_containers():
    """Tuples inside lists, sets of tuples and tuple dict keys survive."""
    value = {"k": [(1, (2, 3)), {(4, 5)}], (6, 7): frozenset({(8,)})}
    assert protocol.decode_value(protocol.encode_value(value)) == value


def test_subclasses_travel_as_their_base_type():
    """An IntEnum, an OrderedDict and a namedtuple arrive as int, dict and tuple."""
    Color = IntEnum("Color", "RED GREEN")
    Point = namedtuple("Point", "x y")
    decoded = protocol.decode_value(protocol.encode_value([Color.GREEN, OrderedDict(a=1), Point(1, 2)]))
    assert decoded == [2, {"a": 1}, (1, 2)]
    assert [type(v) for v in decoded] == [int, dict, tuple]


def test_bytes_like_values_arrive_as_bytes():
    assert protocol.decode_value(protocol.encode_value([bytearray(b"ab"), memoryview(b"cd")])) == [b"ab", b"cd"]


@pytest.mark.parametrize("value", [object(), [1, object()], {"f": lambda: 0}, {1j: {object()}}])
def test_unencodable_values_raise_serialization_error(value):
    with pytest.raises(SerializationError):
        protocol.encode_value(value)


def test_recursive_list_raises_serialization_error():
    value: list = []
    value.append(value)
    with pytest.raises(SerializationError):
        protocol.encode_value(value)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.dates()
    | st.datetimes()
    | st.datetimes(timezones=st.timezones().map(lambda tz: dt.timezone.utc))
    | st.timedeltas()
    | st.complex_numbers(allow_nan=False)
)
hashables = st.recursive(
    scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=8
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text() | st.integers(), inner, max_size=4)
    | st.sets(hashables, max_size=3)
    | st.frozensets(hashables, max_size=3),
    max_leaves=20,
)


def _same(a, b) -> bool:
    """Equal and of the same type, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_nested_value_round_trips_exactly(value):
    """Property: decode(encode(v)) equals v, with every type preserved."""
    assert _same(protocol.decode_value(protocol.encode_value(value)), value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_envelope_parser(data):
    """Arbitrary bytes give an Envelope or a ProtocolError, nothing else."""
    try:
        protocol.parse_envelope(data)
    except ProtocolError:
        pass


def test_request_envelope_is_read_without_the_arguments():
    frame = protocol.encode_request(7, "math.hypot", (3, 4), {"k": 1}, 2.5)
    assert protocol.parse_envelope(frame) == protocol.Envelope(protocol.REQUEST, 7, "math.hypot", 2.5)


def test_large_request_envelope_is_streamed_and_skips_payload():
    """Above the small-frame size the arguments are skipped, not decoded."""
    frame = protocol.encode_request(9, "echo", (b"x" * 100_000, (1, 2)), {}, None)
    assert protocol.parse_envelope(frame) == protocol.Envelope(protocol.REQUEST, 9, "echo", None)
    with pytest.raises(ProtocolError, match="trailing"):
        protocol.parse_envelope(frame + b"\x00")



def _two_step(frame):
    """What the router's envelope check and then the handler's decode make of ``frame``."""
    try:
        protocol.parse_envelope(bytes(frame))
        return protocol.decode_request(bytes(frame))
    except ProtocolError:
        return None


def _one_step(frame):
    try:
        return protocol.decode_call(frame)
    except ProtocolError:
        return None


_CALL_FRAMES = [
    protocol.encode_request(1, "add", (1, 2), {}, None),
    protocol.encode_request(2**64 - 1, "math.hypot", ((1, 2), {3}), {"at": dt.date(2024, 1, 2)}, 3.5),
    protocol.encode_notification("log", ("text",), {}),
    protocol.encode_request(9, "echo", (b"x" * 5000,), {}, 1),  # over 4 KiB: the envelope is read field by field
    msgpack.packb([0, "1", "add", [], {}, {}]),  # a string id
    msgpack.packb([0, 1, "add", [], {}, {"timeout": 1e10}]),  # the envelope's timeout limit
    msgpack.packb([0, 1, "add", [], {}, {"timeout": float("nan")}]),
    msgpack.packb([0, 1, "add", [], {1: 2}, {}]),  # decode_request's kwargs check
    msgpack.packb([0, 1, "add", {}, {}, {}]),
    msgpack.packb([0, 1, "add", [], {}, {}, 7]),
    msgpack.packb([True, 1, "add", [], {}, {}]),
    msgpack.packb([1, 1, None, 3]),  # a response
    # Extension values where the envelope reads nothing (parse_envelope does not decode them):
    msgpack.packb([msgpack.ExtType(9, b"\x00"), 5, "add", [], {}, {}]),
    msgpack.packb([0, msgpack.ExtType(9, b"\x05"), "add", [], {}, {}]),
    msgpack.packb([0, 5, "add", [], {}, {"timeout": msgpack.ExtType(9, b"\x05")}]),
    msgpack.packb([0, 5, "add", [], {}, msgpack.ExtType(1, msgpack.packb([]))]),
    msgpack.packb([0, 5, "add", [msgpack.ExtType(77, b"")], {}, {}]),
    msgpack.packb([0, 1, "add", [], {}, {}]) + b"\x00",
]


@pytest.mark.parametrize("frame", _CALL_FRAMES)
def test_decode_call_accepts_what_the_envelope_and_the_full_decode_both_accept(frame):
    """One decode on a lent socket, with the checks of the router's envelope and of the handler's decode."""
    assert _one_step(frame) == _two_step(frame)
    assert _one_step(memoryview(bytearray(frame))) == _two_step(frame)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(_CALL_FRAMES[:3] + _CALL_FRAMES[4:]), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
def test_decode_call_agrees_with_the_two_step_decode_on_damaged_frames(frame, damage):
    data = bytearray(frame)
    for position, value in damage:
        data[position % len(data)] = value
    assert _one_step(bytes(data)) == _two_step(bytes(data))


def test_decode_call_refuses_a_string_id_and_keeps_the_envelope_limits():
    with pytest.raises(ProtocolError, match="request id"):
        protocol.decode_call(msgpack.packb([0, "1", "add", [], {}, {}]))
    with pytest.raises(ProtocolError, match="timeout"):
        protocol.decode_call(msgpack.packb([0, 1, "add", [], {}, {"timeout": 1e10}]))
    request = protocol.decode_call(protocol.encode_request(3, "add", (1, (2,)), {"z": 3}, 2))
    assert request == protocol.Request(3, "add", [1, (2,)], {"z": 3}, 2.0)

@pytest.mark.parametrize(
    "message, request_id",
    [
        ({"not": "an array"}, None),
        ([], None),
        ([9, 1, 2], None),
        ([0, -1, "add", [], {}, {}], None),
        ([0, "id", "add", [], {}, {}], None),
        ([0, 5, b"add", [], {}, {}], 5),
        ([0, 5, "add", [], {}, "meta"], 5),
        ([0, 5, "add", [], {}, {"timeout": "soon"}], 5),
        ([0, 5, "add", [], {}, {"timeout": -1}], 5),
        ([0, 5, "add", [], {}], None),
    ],
)
def test_malformed_envelopes_raise_protocol_error_with_the_id_when_readable(message, request_id):
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_envelope(msgpack.packb(message))
    assert caught.value.request_id == request_id


def test_invalid_utf8_method_name_is_a_protocol_error():
    frame = msgpack.packb([0, 3, "add", [], {}, {}]).replace(b"add", b"\xff\xfe\xfd")
    with pytest.raises(ProtocolError):
        protocol.parse_envelope(frame)


def test_decode_request_checks_argument_shapes():
    with pytest.raises(ProtocolError, match="kwargs"):
        protocol.decode_request(msgpack.packb([0, 1, "add", [], {1: 2}, {}]))
    with pytest.raises(ProtocolError, match="args"):
        protocol.decode_request(msgpack.packb([0, 1, "add", {}, {}, {}]))
    request = protocol.decode_request(protocol.encode_request(1, "add", (1, (2,)), {"z": 3}, None))
    assert request == protocol.Request(1, "add", [1, (2,)], {"z": 3})


@pytest.mark.parametrize("request_id", [0, 1, 127, 128, 255, 256, 70000, 2**32, 2**64 - 1, None])
def test_response_is_error_reads_the_error_field_for_every_id_width(request_id):
    ok = protocol.encode_response(request_id, "result")
    failed = protocol.encode_error(request_id, protocol.ErrorInfo("remote_error", "ValueError", "bad"))
    assert protocol.response_is_error(ok) is False
    assert protocol.response_is_error(failed) is True


def test_error_with_unencodable_args_still_encodes_its_message():
    info = protocol.ErrorInfo("remote_error", "ValueError", "bad", "", (object(),))
    response = protocol.decode_response(protocol.encode_error(4, info))
    assert response.error is not None
    assert (response.id, response.error.message, response.error.args) == (4, "bad", ())


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def test_user_types_register_with_a_code_and_round_trip():
    protocol.register_type(Point, 64, lambda p: (p.x, p.y), lambda v: Point(*v))
    assert protocol.decode_value(protocol.encode_value([Point(1, 2)])) == [Point(1, 2)]
    with pytest.raises(ValueError):
        protocol.register_type(Point, 5, lambda p: p, lambda v: v)


def test_unknown_extension_code_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        protocol.decode_value(msgpack.packb(msgpack.ExtType(120, b"")))


def test_hello_round_trips():
    hello = protocol.decode_hello(protocol.encode_hello({"server": "rpc"}))
    assert (hello.version, hello.info) == (protocol.PROTOCOL_VERSION, {"server": "rpc"})


# -- limits: what a small frame may cost the peer that decodes it ------------------------


def _nested_ext_frame(depth: int) -> bytes:
    """An ext-1 (tuple) value nested ``depth`` deep, built without rpc's encoder."""
    data = msgpack.packb([])
    for _ in range(depth):
        data = msgpack.packb([msgpack.ExtType(1, data)])
    return data


def _in_thread(function):
    """Run ``function`` on a fresh thread (a smaller stack than the main one) and return its outcome."""
    import threading

    outcome = []

    def run():
        try:
            outcome.append(("ok", function()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(("error", exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return outcome[0]


def test_values_nested_to_the_limit_round_trip():
    """Tuples nested MAX_EXT_DEPTH deep encode and decode."""
    value: tuple = ()
    for _ in range(protocol.MAX_EXT_DEPTH - 1):
        value = (value,)
    assert protocol.decode_value(protocol.encode_value(value)) == value


@pytest.mark.parametrize("depth", [protocol.MAX_EXT_DEPTH + 1, 300, 5000])
def test_deeper_extension_nesting_is_a_clear_decode_error_not_a_crash(depth):
    """A few hundred nested tuples used to overflow the C stack; now they are refused."""
    kind, outcome = _in_thread(lambda: protocol.decode_value(_nested_ext_frame(depth)))
    assert kind == "error" and isinstance(outcome, ProtocolError)
    assert f"more than {protocol.MAX_EXT_DEPTH} deep" in str(outcome)


def test_too_deep_values_are_refused_when_encoding_too():
    """The encoder refuses what decoders refuse, so a too-deep value never leaves its process."""
    value: tuple = ()
    for _ in range(220):
        value = (value,)
    kind, outcome = _in_thread(lambda: protocol.encode_request(1, "echo", (value,), {}, None))
    assert kind == "error" and isinstance(outcome, SerializationError)
    assert "the arguments of 'echo'" in str(outcome) and "deep" in str(outcome)


def test_a_response_too_deep_for_the_client_is_a_protocol_error():
    """A hostile server's deep result cannot crash a client: decode_response refuses it."""
    frame = b"\x94\x01\x01\xc0" + _nested_ext_frame(300)
    kind, outcome = _in_thread(lambda: protocol.decode_response(frame))
    assert kind == "error" and isinstance(outcome, ProtocolError)


def test_a_hello_decodes_no_extension_types():
    """The hello comes before anything is known of the peer: an ext value in it is refused."""
    frame = msgpack.packb([protocol.HELLO, 1, {"x": msgpack.ExtType(1, _nested_ext_frame(300))}])
    with pytest.raises(ProtocolError, match="extension type 1 is not allowed"):
        protocol.decode_hello(frame)


def _large_request(request_id, method, meta_bytes: bytes) -> bytes:
    """A request over the small-frame size, with raw msgpack bytes for meta."""
    head = b"\x96\x00" + msgpack.packb(request_id) + msgpack.packb(method)
    return head + msgpack.packb([b"x" * 8192]) + b"\x80" + meta_bytes


def test_a_large_meta_is_refused_before_it_is_decoded():
    """4 MiB of empty arrays in meta used to cost 300 MB to decode; now a call error for that id."""
    bomb = b"\xdf" + (2 << 20).to_bytes(4, "big") + b"\x90" * (4 << 20)
    with pytest.raises(ProtocolError, match="meta is .* bytes; the limit is 4096") as caught:
        protocol.parse_envelope(_large_request(7, "echo", bomb))
    assert caught.value.request_id == 7


@pytest.mark.parametrize(
    "field",
    [b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20), b"\xdb" + (1 << 20).to_bytes(4, "big") + b"a" * (1 << 20)],
    ids=["array", "string"],
)
def test_a_large_id_or_kind_is_refused_without_decoding_it(field):
    """Kind and id are read only if their first byte says they are small integers."""
    rest = msgpack.packb("echo") + msgpack.packb([]) + b"\x80\x80"
    for frame in (b"\x96" + field + b"\x07" + rest, b"\x96\x00" + field + rest):
        with pytest.raises(ProtocolError) as caught:
            protocol.parse_envelope(frame)
        assert caught.value.request_id is None
        assert len(str(caught.value)) < 300


def test_a_long_method_name_is_a_call_error_in_small_and_large_frames():
    """Method names are at most MAX_METHOD_BYTES: refused for that id, quoted briefly."""
    name = "\x01" * 300_000
    small = protocol.encode_request(3, "\x01" * 2000, (), {}, None)
    for frame in (small, _large_request(3, name, b"\x80")):
        with pytest.raises(ProtocolError, match="at most 1024 bytes") as caught:
            protocol.parse_envelope(frame)
        assert caught.value.request_id == 3
    with pytest.raises(ProtocolError, match="at most 1024 bytes"):
        protocol.decode_request(small)


def test_malformed_frames_are_quoted_briefly_in_errors():
    """A megabyte of hostile kind field gives an error text of a few hundred characters."""
    frame = msgpack.packb(["\x00" * (1 << 20), 1])
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_envelope(frame)
    assert len(str(caught.value)) < 300
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(msgpack.packb(["\x00" * (1 << 20), 1]))
    assert len(str(caught.value)) < 300


def test_error_texts_are_shortened_to_a_documented_size():
    """Message and traceback keep their head and tail within MAX_ERROR_TEXT_BYTES; big args are dropped."""
    message = "start " + "é" * (1 << 20) + " end"
    info = protocol.ErrorInfo("remote_error", "KeyError", message, "Traceback\n" + "x" * (5 << 20), (message,))
    frame = protocol.encode_error(4, info)
    assert len(frame) < 3 * protocol.MAX_ERROR_TEXT_BYTES
    decoded = protocol.decode_response(frame).error
    assert decoded.message.startswith("start ") and decoded.message.endswith(" end")
    assert "bytes cut" in decoded.message and decoded.traceback.startswith("Traceback")
    assert len(decoded.message.encode()) <= protocol.MAX_ERROR_TEXT_BYTES
    assert decoded.args == ()
    small = protocol.decode_response(protocol.encode_error(4, protocol.ErrorInfo("remote_error", "KeyError", "k", "", ("k",))))
    assert small.error.args == ("k",)


def test_unencodable_values_name_what_they_were_and_the_fix():
    with pytest.raises(SerializationError, match=r"the arguments of 'add'.*rpc.register_type"):
        protocol.encode_request(1, "add", (object(),), {}, None)
    with pytest.raises(SerializationError, match=r"the result of 'f'.*rpc.register_type"):
        protocol.encode_response(1, object(), "f")


@pytest.mark.parametrize(
    "kind",
    [msgpack.ExtType(6, b"sNaN"), msgpack.ExtType(9, (10**5000).to_bytes(2100, "big", signed=True)), "deep"],
    ids=["decimal-snan", "5000-digit-int", "1000-deep-list"],
)
def test_hostile_kinds_are_protocol_errors_in_every_decoder(kind):
    """Values whose comparison or repr raises used to escape as ValueError, InvalidOperation or RecursionError."""
    if kind == "deep":
        frame = b"\x96" + b"\x91" * 1000 + b"\xc0" + b"\x01\xa3add\x90\x80\x80"
    else:
        frame = msgpack.packb([kind, 1, "add", [], {}, {}])
    with pytest.raises(ProtocolError):
        protocol.decode_request(frame)
    with pytest.raises(ProtocolError):
        protocol.parse_envelope(frame)
    with pytest.raises(ProtocolError):
        protocol.decode_response(frame)


def test_odd_error_fields_from_a_server_decode_to_text():
    """An error map whose message is a 5000-digit integer gives text, not a ValueError in the client."""
    big = msgpack.ExtType(9, (10**5000).to_bytes(2100, "big", signed=True))
    frame = msgpack.packb([1, 3, {"code": "remote_error", "type": big, "message": big, "traceback": [1]}, None])
    error = protocol.decode_response(frame).error
    assert error.message == "a value of type int" and error.type_name == "a value of type int"
    assert error.traceback == "an array of 1"


def test_go_away_round_trips_and_a_malformed_one_is_refused():
    assert protocol.decode_answer(protocol.encode_go_away(41, "draining")) == protocol.GoAway(41, "draining")
    assert protocol.decode_answer(protocol.encode_go_away(None, "")) == protocol.GoAway(None, "")
    assert msgpack.unpackb(protocol.encode_go_away(7, "bye")) == [protocol.GO_AWAY, 7, "bye"]
    for bad in ([protocol.GO_AWAY, "7", "bye"], [protocol.GO_AWAY, 7], [protocol.GO_AWAY, 7, "bye", None]):
        with pytest.raises(ProtocolError):
            protocol.decode_answer(msgpack.packb(bad))
