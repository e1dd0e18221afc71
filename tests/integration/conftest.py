"""A shared server for the call tests of a module, and a client per test."""

import pytest


@pytest.fixture(scope="module")
def server(rpc_server_module):
    return rpc_server_module("services:registry", workers=2)


@pytest.fixture
def client(server):
    with server.client(timeout=30) as connected:
        yield connected
