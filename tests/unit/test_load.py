from shitate.models import load


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(load, "bf16_supported", lambda device: True)
    assert load.pick_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(load, "bf16_supported", lambda device: False)
    assert load.pick_precision("auto", "cpu") == "fp32"
    assert load.pick_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_a_hub_id_without_network_fails_fast_with_a_reason(monkeypatch):
    import socket

    import pytest

    from shitate.errors import ModelError

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelError, match="the hub cannot be reached from here"):
        load.resolve("google/gemma-3-270m")
