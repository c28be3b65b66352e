from shitate.models import load


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(load, "bf16_supported", lambda device: True)
    assert load.pick_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(load, "bf16_supported", lambda device: False)
    assert load.pick_precision("auto", "cpu") == "fp32"
    assert load.pick_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
