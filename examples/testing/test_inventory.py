"""Tests of the inventory service against a real server on loopback."""

import pytest

import rpc
from rpc.testing import serve


@pytest.fixture
def client():
    # One handler, so every call sees the same process state.
    with serve("inventory:registry", workers=1) as server:
        with server.client(timeout=10) as connected:
            yield connected


def test_stock_is_reported(client):
    assert client.stock("apple") == 3


def test_taking_items_lowers_the_stock(client):
    assert client.take("apple", count=2) == 1
    assert client.stock("apple") == 1


def test_unknown_items_raise_key_error(client):
    with pytest.raises(KeyError):
        client.stock("pear")


def test_taking_too_many_is_a_value_error_with_the_server_message(client):
    with pytest.raises(ValueError) as caught:
        client.take("apple", count=10)
    assert "only 3 apple left" in str(caught.value)
    assert isinstance(caught.value, rpc.RemoteError)
