#!/usr/bin/env bash
# A grid over many nodes: Slurm starts one torchrun agent a node (srun), each agent one worker a GPU, and the agents
# meet in a c10d rendezvous on the job's first node. Workers claim rows from a shared counter; rank 0 merges.
# What must be shared: the run dir (every node writes its rows there, and rank 0 locks it and reads the whole grid),
# so pass a --run_dir on a filesystem all nodes mount with file locks (NFS; Lustre with -o flock). The model and
# dataset are read by every worker: a shared path, or the same hf: id with a warm cache on each node.
#
#   uv sync                          # once, in a checkout every node sees (the script runs its .venv's torchrun)
#   sbatch --nodes=8 scripts/slurm_grid.sh --axes matrix_lr,unembedding_lr --rows 64 --cols 64 --num_tokens 250000 \
#       --model hf:owner/nanochat-d20 --run_dir /shared/runs/d20-64x64
#
# Rerun the same command to resume: rows with a finished file are kept. Environment knobs: GPUS_PER_NODE (default 8),
# RDZV_PORT (29400), TORCHRUN (.venv/bin/torchrun).
#SBATCH --job-name=fractal-vmap
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=02:00:00
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# a restart (--max_restarts) must get a fresh store, or the workers' gloo group cannot form again (fractal_vmap/shard.py)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

srun "${TORCHRUN:-.venv/bin/torchrun}" \
    --nnodes="$SLURM_NNODES" --nproc_per_node="${GPUS_PER_NODE:-8}" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:${RDZV_PORT:-29400}" --rdzv_id="$SLURM_JOB_ID" \
    --max_restarts=1 \
    -m fractal_vmap grid "$@"
