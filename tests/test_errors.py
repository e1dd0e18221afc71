"""The error hierarchy and how remote exceptions are rebuilt on the client."""

from __future__ import annotations

import builtins
import multiprocessing

import pytest

import rpc
from rpc.errors import error_for_code, remote_error_class

BUILTIN_EXCEPTIONS = sorted(
    name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, Exception)
)


def test_every_public_error_is_an_rpc_error_with_a_docstring():
    for name in rpc.__all__:
        obj = getattr(rpc, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, rpc.RPCError), name
            assert obj.__doc__, name


def test_codes_are_unique_and_map_back_to_their_class():
    classes = [getattr(rpc, n) for n in rpc.__all__ if isinstance(getattr(rpc, n), type) and issubclass(getattr(rpc, n), rpc.RPCError)]
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert error_for_code(cls.code) is cls
    assert error_for_code("from_a_newer_server") is rpc.RPCError


def test_dual_classes_for_standard_exceptions():
    assert issubclass(rpc.AuthenticationError, multiprocessing.AuthenticationError)
    assert issubclass(rpc.CallTimeout, TimeoutError)
    assert issubclass(rpc.ConnectionClosed, ConnectionError)


@pytest.mark.parametrize("name", BUILTIN_EXCEPTIONS)
def test_every_builtin_exception_arrives_as_remote_error_and_the_builtin(name):
    cls = remote_error_class(name)
    if cls is rpc.RemoteError:
        # ExceptionGroup needs its sub-exceptions, which do not travel; the Stop* ones steer loops
        assert name in ("ExceptionGroup", "StopIteration", "StopAsyncIteration")
        return
    error = cls("the message", type_name=name, remote_traceback="tb")
    assert isinstance(error, rpc.RemoteError)
    assert isinstance(error, getattr(builtins, name))
    assert (error.message, error.type_name, error.remote_traceback) == ("the message", name, "tb")
    assert str(error) == f"{name}: the message"


@pytest.mark.parametrize("name", ["myapp.errors.Custom", "SystemExit", "KeyboardInterrupt", "os.system", "RPCError"])
def test_other_remote_types_are_plain_remote_errors(name):
    """Nothing but builtin Exception types is ever instantiated from a remote name."""
    assert remote_error_class(name) is rpc.RemoteError


def test_a_remote_stop_iteration_cannot_end_a_callers_loop():
    """Raised inside a generator, a StopIteration would end it silently; a remote one is a plain RemoteError."""
    cls = remote_error_class("StopIteration")
    assert cls is rpc.RemoteError and not issubclass(cls, StopIteration)
