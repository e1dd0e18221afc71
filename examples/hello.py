import rpc

registry = rpc.Registry()

@registry.expose
def add(x, y):
    return x + y

if __name__ == "__main__":  # handler processes import this module: start the server once
    with rpc.Server(registry, address=("127.0.0.1", 0), authkey=b"change me", workers=2) as server:
        with rpc.connect(server.address, authkey=b"change me") as client:
            print(client.add(2, 3))  # 5
