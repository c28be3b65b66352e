#!/usr/bin/env bash
# Train one recipe on several nodes under SLURM: accelerate launch on every node (one task a node), data-parallel
# over all their GPUs; accelerate and torch.distributed do the distributing, shitate only runs the recipe.
#
#   sbatch --nodes 2 --gpus-per-node 8 examples/multi_node/slurm.sh examples/kids_qa/recipe.yaml [ENGINE]
#
# ENGINE: a file in configs/accelerate/ (ddp, fsdp, fsdp-offload, zero2, zero3); default ddp. Run it from a
# checkout on storage every node sees, with .venv set up there: the run folder (runs/NAME) is written by rank 0.
#SBATCH --job-name=shitate
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=shitate-%j.log
set -euo pipefail

recipe=${1:?give a recipe: sbatch examples/multi_node/slurm.sh RECIPE [ENGINE]}
engine=${2:-ddp}
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
export HF_HUB_OFFLINE=1  # every node loads the model from local files, never the hub

# One accelerate launch a node; $SLURM_NODEID (0 on main_host) becomes its machine rank.
srun bash -c "exec .venv/bin/accelerate launch \
    --config_file configs/accelerate/${engine}.yaml \
    --num_machines ${SLURM_NNODES} --machine_rank \$SLURM_NODEID \
    --num_processes $((SLURM_NNODES * gpus_per_node)) \
    --main_process_ip ${main_host} --main_process_port 29500 --rdzv_backend static \
    -m shitate.cli train ${recipe}"
