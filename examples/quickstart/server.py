"""Serve service.registry on 127.0.0.1:8766 until Ctrl-C. The authkey comes from RPC_AUTHKEY."""

import os

import rpc
from service import registry

if __name__ == "__main__":  # handler processes import this file too: start only once
    authkey = os.environ["RPC_AUTHKEY"].encode()
    with rpc.Server(registry, address=("127.0.0.1", 8766), authkey=authkey, workers=2) as server:
        print("serving on", server.address, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
