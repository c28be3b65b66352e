import subprocess
import sys

from shitate.memory import KERNEL_CACHE_ENTRIES, bound_kernel_caches, peak_rss_bytes


def test_kernel_caches_are_bounded_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "5")
    bound_kernel_caches()
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ["LRU_CACHE_CAPACITY"] == "5"


def test_each_zero_stage_shards_one_more_part_across_the_devices():
    from types import SimpleNamespace

    from shitate.memory import per_device_bytes

    config = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             head_dim=32, vocab_size=1000)
    billion = 10**9
    plans = {engine: per_device_bytes(config, 7 * billion, 7 * billion, 0, 8, engine, loss_workspace=10**6)
             for engine in ("ddp", "zero1", "zero2", "zero3")}
    # 7B trained in full: 2 bytes of weights, 2 of gradients and 12 of optimizer state a parameter (ZeRO paper).
    assert [plans["ddp"][part] for part in ("weights", "gradients", "optimizer")] == [14 * billion, 14 * billion, 84 * billion]
    assert plans["zero1"]["optimizer"] == 84 * billion // 8 and plans["zero1"]["gradients"] == 14 * billion
    assert plans["zero2"]["gradients"] == 14 * billion // 8 and plans["zero2"]["weights"] == 14 * billion
    assert plans["zero3"]["weights"] == 14 * billion // 8
    assert all(plan["activations"] == plans["ddp"]["activations"] for plan in plans.values())
    lora = per_device_bytes(config, 7 * billion, 40 * 10**6, 0, 8, "zero2", loss_workspace=10**6)
    assert lora["weights"] == 14 * billion and lora["optimizer"] == 12 * 40 * 10**6 // 8  # the frozen base is whole


def test_peak_rss_is_the_process_own_not_the_peak_of_the_parent_that_launched_it():
    # ru_maxrss keeps the parent's high-water mark across fork and exec: a child launched from a 1 GB process
    # would report 1 GB however little it used. The benches and `train --nproc` launch processes this way.
    held = bytearray(1024**3)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page so it is resident
    child = subprocess.run([sys.executable, "-c", "from shitate.memory import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert peak_rss_bytes() >= len(held)
    assert int(child.stdout) < 0.5 * len(held)
