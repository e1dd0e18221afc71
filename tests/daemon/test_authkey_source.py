"""A refused authkey: the client commands say where the key they sent came from."""

from __future__ import annotations

SERVER_KEY = "s" * 64
OTHER_KEY = "o" * 64


def _private_file(path, text):
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_refused_key_names_where_it_came_from(daemon):
    daemon.env["RPC_AUTHKEY"] = SERVER_KEY
    daemon.start("--workers", "1")
    client_env = {name: value for name, value in daemon.env.items() if name != "RPC_AUTHKEY"}

    from_env = daemon.rpc("ping", env={**client_env, "RPC_AUTHKEY": OTHER_KEY})
    assert from_env.returncode == 1
    assert "refused this authkey" in from_env.stderr
    assert "(the key came from RPC_AUTHKEY)" in from_env.stderr

    flag_file = _private_file(daemon.cwd / "keys" / "other", OTHER_KEY)
    from_flag = daemon.rpc("ping", "--authkey-file", str(flag_file), env=client_env)
    assert from_flag.returncode == 1
    assert f"(the key came from {flag_file}, named by --authkey-file)" in from_flag.stderr

    default_file = _private_file(daemon.cwd / "xdg" / "rpc" / "authkey", OTHER_KEY)
    from_default = daemon.rpc("ping", env=client_env)
    assert from_default.returncode == 1
    assert f"(the key came from the default file {default_file})" in from_default.stderr

    for result in (from_env, from_flag, from_default):
        assert SERVER_KEY not in result.stderr and OTHER_KEY not in result.stderr
    assert daemon.rpc("ping", env={**client_env, "RPC_AUTHKEY": SERVER_KEY}).returncode == 0
