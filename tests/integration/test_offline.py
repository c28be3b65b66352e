"""Nothing leaves the machine: the main commands run with every non-loopback connection (and name lookup) refused,
and none is tried. The suite runs with HF_HUB_OFFLINE=1 (conftest), as the library sets its flag at import; what
this shows is that shitate's own code paths open no outside socket."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from test_train import make_recipe
from typer.testing import CliRunner

from shitate.cli import app

runner = CliRunner()


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # a Unix socket path
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name to resolve: that is already the network


def test_main_commands_open_no_outside_connection(tmp_path, tiny_model, monkeypatch):
    attempts = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(method):
        def wrapper(self, address):
            if not _is_local(address):
                attempts.append(address)
                raise OSError(f"test: outside connection to {address} refused")
            return method(self, address)
        return wrapper

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    lookup = socket.getaddrinfo

    def guarded_lookup(host, *args, **kwargs):
        if host is not None and not _is_local((host, 0)):
            attempts.append(host)
            raise OSError(f"test: name lookup of {host} refused")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)

    recipe = make_recipe(tmp_path, tiny_model)
    run = tmp_path / "run"
    steps = [["data", "check", str(tmp_path / "train.jsonl"), "--model", str(tiny_model)],
             ["train", str(recipe), "--out", str(run), "--set", "train.max_steps=2"],
             ["eval", str(run)],
             ["generate", str(run), "空は", "--max-new-tokens", "3"],
             ["compare", str(tiny_model), str(run), str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "c.jsonl")]]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output, result.exception)

    from shitate.serve.engine import Sampling, open_engines

    engine = next(iter(open_engines([str(run)]).values()))
    try:
        reply = asyncio.run(engine.complete(engine.chat_prompt([{"role": "user", "content": "空は?"}]), Sampling(3)))
    finally:
        engine.close()
    assert reply.completion_tokens > 0
    assert attempts == []
    try:  # the guard itself works: an outside address is caught and recorded
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    except OSError:
        pass
    assert attempts == ["192.0.2.1"]
