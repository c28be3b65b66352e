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


def test_the_slurm_script_launches_accelerate_once_a_node_with_its_rank(tmp_path):
    """Under stand-ins for srun, scontrol and accelerate (no cluster here): the command each node would run."""
    import os
    import subprocess

    script = Path(__file__).parents[2] / "examples" / "multi_node" / "slurm.sh"
    bin_dir, venv = tmp_path / "bin", tmp_path / ".venv" / "bin"
    bin_dir.mkdir()
    venv.mkdir(parents=True)
    stubs = {bin_dir / "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
             bin_dir / "srun": 'for node in 0 1; do SLURM_NODEID=$node "$@"; done',  # one task a node
             venv / "accelerate": 'echo "accelerate $*" >> launched.txt'}
    for path, body in stubs.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    subprocess.run(["bash", str(script), "recipe.yaml", "zero3"], cwd=tmp_path, env=env, check=True, timeout=30)
    launched = (tmp_path / "launched.txt").read_text().splitlines()
    assert len(launched) == 2
    for rank, line in enumerate(launched):
        words = line.split()
        assert words[words.index("--machine_rank") + 1] == str(rank)
        assert words[words.index("--num_processes") + 1] == "16" and words[words.index("--main_process_ip") + 1] == "gpu-a"
        assert words[words.index("--config_file") + 1] == "configs/accelerate/zero3.yaml"
        assert words[-3:] == ["shitate.cli", "train", "recipe.yaml"]
