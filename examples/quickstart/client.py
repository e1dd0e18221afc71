"""Call the quickstart server. The authkey comes from RPC_AUTHKEY."""

import os

import rpc

with rpc.connect(("127.0.0.1", 8766), authkey=os.environ["RPC_AUTHKEY"].encode(), timeout=10) as client:
    print("add(2, 3) =", client.add(2, 3))
    print("text.shout('hi', times=2) =", client.text.shout("hi", times=2))
    for method in client.methods():
        print(f"  {method.name}{method.signature}  {method.doc}")
    try:
        client.add(1)
    except TypeError as error:  # a remote TypeError is also a TypeError here
        print("remote error:", error)
