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


GUARD = '''
import ipaddress, os, socket

def _local(address):
    if not isinstance(address, tuple):
        return True
    try:
        return address[0] == "localhost" or ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return False

def _refuse(what):
    with open(os.environ["SHITATE_TEST_ATTEMPTS"], "a") as log:
        log.write(repr(what) + "\\n")
    raise OSError(f"test: outside connection to {what} refused")

_connect, _connect_ex, _lookup = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
socket.socket.connect = lambda self, address: _connect(self, address) if _local(address) else _refuse(address)
socket.socket.connect_ex = lambda self, address: _connect_ex(self, address) if _local(address) else _refuse(address)
socket.getaddrinfo = lambda host, *a, **k: _lookup(host, *a, **k) if host is None or _local((host, 0)) else _refuse(host)
'''


def test_the_commands_try_no_connection_even_with_the_hub_left_online(tmp_path, tiny_model):
    """Separate processes without HF_HUB_OFFLINE (a user's ordinary shell): with local models, transformers and the
    hub library are never asked to look anything up, so the guard (installed by sitecustomize) logs nothing."""
    import os
    import subprocess
    import sys

    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
    attempts = tmp_path / "attempts.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(PYTHONPATH=str(tmp_path / "guard"), SHITATE_TEST_ATTEMPTS=str(attempts))
    recipe, run = make_recipe(tmp_path, tiny_model), tmp_path / "run"
    for args in (["data", "check", str(tmp_path / "train.jsonl"), "--model", str(tiny_model)],
                 ["train", str(recipe), "--out", str(run), "--set", "train.max_steps=2"],
                 ["eval", str(run)],
                 ["generate", str(run), "空は", "--max-new-tokens", "3"]):
        result = subprocess.run([sys.executable, "-m", "shitate.cli", *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert not attempts.exists(), (args, attempts.read_text())
    # The guard is live in those processes: a connection attempt is logged and refused.
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 80), 1)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and attempts.read_text().strip() == "'192.0.2.1'"  # its name lookup, first


def test_bitsandbytes_is_imported_without_its_hub_kernel_even_where_the_kernels_package_is_installed(tmp_path):
    # bitsandbytes' import fetches a CPU kernel from the hub through the `kernels` package when that is installed
    # (and the CPU has AVX512-BF16); PEFT imports bitsandbytes for every LoRA run. A stand-in `kernels` records a fetch.
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (the dev extra installs it)")
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        f"def get_kernel(*args, **kwargs):\n    open({str(tmp_path / 'fetched')!r}, 'a').write(repr(args))\n"
        "    raise RuntimeError('stand-in')\n")

    def import_bitsandbytes(through_shitate: bool) -> bool:
        code = ("from shitate.models.load import _import_bitsandbytes_offline; _import_bitsandbytes_offline()\n"
                if through_shitate else "") + "import bitsandbytes, peft"
        (tmp_path / "fetched").unlink(missing_ok=True)
        subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
                       capture_output=True)
        return (tmp_path / "fetched").exists()

    assert not import_bitsandbytes(through_shitate=True)
    cpu_flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    if " avx512_bf16" in cpu_flags:  # where bitsandbytes tries it at all: show that the stand-in would have been used
        assert import_bitsandbytes(through_shitate=False)
