"""The accelerate configurations `--nproc --engine` launches with are valid for accelerate and are what they say."""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "two-hosts": "MULTI_GPU", "fsdp": "FSDP", "fsdp-offload": "FSDP",
            "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_loads_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == EXPECTED[name]
    if name.startswith("fsdp"):
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_offload_params"] is (name == "fsdp-offload")
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
