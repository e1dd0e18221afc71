"""The handler loop: frames in, responses out, over a real Pipe to a real process."""

from __future__ import annotations

import multiprocessing

import pytest

from rpc import handler, protocol
from rpc.registry import load_registry

SETTINGS = handler.HandlerSettings("services:registry", max_message_bytes=1024)


def run(method, *args, **kwargs):
    registry = load_registry(SETTINGS.registry)
    frame = protocol.encode_request(1, method, args, kwargs, None)
    return protocol.decode_response(handler.execute(registry, frame, SETTINGS))


def test_execute_returns_the_result():
    assert run("add", 2, 3) == protocol.Response(1, None, 5)


def test_execute_passes_keyword_arguments():
    assert run("kwargs_echo", 1, a=2).result == [[1], {"a": 2}]


@pytest.mark.parametrize("method", ["nope", "_private", "add.__globals__", "__class__", ""])
def test_unknown_names_are_method_not_found(method):
    response = run(method)
    assert response.error is not None and response.error.code == "method_not_found"


def test_method_not_found_suggests_close_names_and_how_to_list_them():
    message = run("ad").error.message
    assert "did you mean 'add'" in message and "rpc methods" in message


def test_the_method_is_noted_before_it_runs():
    """What a function prints or logs can name its method: the handler notes it first."""
    noted = []
    registry = load_registry(SETTINGS.registry)
    frame = protocol.encode_request(1, "add", (1, 2), {}, None)
    handler.execute(registry, frame, SETTINGS, noted.append)
    assert noted == ["add"]


def test_a_raising_function_gives_type_message_and_traceback():
    error = run("fail", "ValueError", "bad value").error
    assert (error.code, error.type_name, error.message, error.args) == ("remote_error", "ValueError", "bad value", ("bad value",))
    assert "raise" in error.traceback and "services.py" in error.traceback
    assert "rpc/handler.py" not in error.traceback


def test_custom_exceptions_are_named_by_module_and_class():
    assert run("fail_custom").error.type_name == "services.CustomError"


def test_wrong_argument_count_is_a_type_error():
    error = run("add", 1).error
    assert (error.code, error.type_name) == ("remote_error", "TypeError")


def test_unencodable_result_is_a_serialization_error():
    assert run("unencodable").error.code == "serialization_error"


def test_a_result_over_the_size_limit_is_refused():
    assert run("big", 10_000).error.code == "message_too_large"


def _start(settings):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=handler.run, args=(child, settings), daemon=True)
    process.start()
    child.close()
    return process, parent


def test_handler_process_says_hello_serves_and_exits_on_eof():
    """A real handler process greets, answers calls in order, and exits when its pipe closes."""
    process, conn = _start(SETTINGS)
    try:
        hello = protocol.decode_hello(conn.recv_bytes())
        assert hello.info["pid"] == process.pid
        for i in range(3):
            conn.send_bytes(protocol.encode_request(i, "add", (i, 1), {}, None))
            assert protocol.decode_response(conn.recv_bytes()) == protocol.Response(i, None, i + 1)
    finally:
        conn.close()
        process.join(10)
    assert process.exitcode == 0


def test_handler_process_reports_a_registry_it_cannot_import():
    process, conn = _start(handler.HandlerSettings("services:broken"))
    try:
        response = protocol.decode_response(conn.recv_bytes())
        assert response.error is not None and "not an rpc.Registry" in response.error.message
    finally:
        conn.close()
        process.join(10)


def test_an_exception_whose_args_raise_still_fails_only_the_call():
    error = run("fail_args_property").error
    assert (error.code, error.message) == ("remote_error", "odd")


def test_an_encoder_raising_keyboard_interrupt_is_a_serialization_error():
    error = run("interrupting_result").error
    assert error.code == "serialization_error" and "interrupting_result" in error.message
