"""The stream messages of rpc.protocol and the window, as pure code."""

from __future__ import annotations

import pytest

from rpc import protocol
from rpc.errors import ProtocolError, SerializationError


def test_stream_messages_round_trip_through_the_clients_decoder():
    start = protocol.decode_answer(protocol.encode_stream_start(7))
    assert start == protocol.StreamMessage(protocol.STREAM_START, 7, None, None)
    item = protocol.decode_answer(protocol.encode_stream_item(7, (1, "a")))
    assert item == protocol.StreamMessage(protocol.STREAM_ITEM, 7, None, (1, "a"))
    assert protocol.decode_answer(protocol.encode_stream_end(7)) == protocol.StreamMessage(protocol.STREAM_END, 7, None, None)
    info = protocol.ErrorInfo("remote_error", "ValueError", "bad row", "Traceback ...", ("bad row",))
    end = protocol.decode_answer(protocol.encode_stream_end(7, info))
    assert end.kind == protocol.STREAM_END and end.error == info
    # A response still decodes as one.
    assert protocol.decode_answer(protocol.encode_response(3, [1])) == protocol.Response(3, None, [1])


def test_the_router_tells_stream_messages_from_responses_by_their_first_bytes():
    assert protocol.stream_kind(protocol.encode_stream_start(2**40)) == protocol.STREAM_START
    assert protocol.stream_kind(protocol.encode_stream_item(1, b"x" * 100_000)) == protocol.STREAM_ITEM
    assert protocol.stream_kind(protocol.encode_stream_end(1)) == protocol.STREAM_END
    assert protocol.stream_kind(protocol.encode_response(1, 6)) is None
    assert protocol.stream_kind(protocol.error_frame(1, ProtocolError("x"))) is None
    assert protocol.stream_control(protocol.encode_credit(5, 32))
    assert protocol.stream_control(protocol.encode_cancel(5))
    assert not protocol.stream_control(protocol.encode_request(5, "add", (1, 2), {}, None))


def test_credit_envelopes_are_checked():
    assert protocol.parse_envelope(protocol.encode_credit(9, 32)) == protocol.Envelope(protocol.CREDIT, 9, "", None)
    assert protocol.decode_credit(protocol.encode_credit(9, 32)) == (9, 32)
    for bad in ([8, "9", 1], [8, 9, -1], [8, 9, "many"], [8, 9]):
        with pytest.raises(ProtocolError):
            protocol.parse_envelope(protocol.encode_value(bad))


def test_malformed_stream_messages_are_protocol_errors():
    for bad in ([5], [5, "id"], [7, 1, "not a map"], [7, 1]):
        with pytest.raises(ProtocolError):
            protocol.decode_answer(protocol.encode_value(bad))


def test_an_item_that_cannot_be_encoded_says_so():
    with pytest.raises(SerializationError, match="an item of 'rows'"):
        protocol.encode_stream_item(1, object(), "rows")


def test_the_window_closes_at_its_count_or_its_bytes_and_credit_reopens_it():
    window = protocol.StreamWindow()
    for _ in range(protocol.STREAM_WINDOW):
        assert window.open()
        window.sent(10)
    assert not window.open()
    window.credit(1)
    assert window.open()
    big = protocol.StreamWindow()
    big.sent(protocol.STREAM_WINDOW_BYTES)  # one large item shuts it
    assert not big.open()
    big.credit(5)  # more credit than items sent is harmless
    assert big.open() and big.bytes == 0
