"""Tests of the inventory service against real rpc servers on loopback, via the pytest plugin."""

import pytest

import rpc

# Every test in this module gets a fresh server with one handler, so each starts
# from the same stock and all its calls see the same process state.
pytestmark = pytest.mark.rpc_registry("inventory:registry", workers=1)


def test_stock_is_reported(rpc_client):
    assert rpc_client.stock("apple") == 3


def test_taking_items_lowers_the_stock(rpc_client):
    assert rpc_client.take("apple", count=2) == 1
    assert rpc_client.stock("apple") == 1


def test_unknown_items_raise_key_error(rpc_client):
    with pytest.raises(KeyError):
        rpc_client.stock("pear")


def test_taking_too_many_is_a_value_error_with_the_server_message(rpc_client):
    with pytest.raises(ValueError) as caught:
        rpc_client.take("apple", count=10)
    assert "only 3 apple left" in str(caught.value)
    assert isinstance(caught.value, rpc.RemoteError)


def test_two_handlers_keep_separate_state(rpc_server):
    """A server of the test's own making: state lives in each handler process."""
    server = rpc_server("inventory:registry", workers=2, transport="tcp")
    with server.client() as client:
        assert client.stock("apple") == 3
