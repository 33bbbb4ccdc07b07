#!/bin/bash
# rlctl on several nodes under Slurm: one accelerate launcher per node, 8 GPUs each.
#   sbatch --nodes=2 scripts/slurm_multinode.sh deepspeed=zero3 model=qwen-1.5b
#SBATCH --job-name=rlctl
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --requeue  # a requeued job resumes: resume=auto finds the newest checkpoint in RUN_DIR
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-$PWD/runs/slurm-$SLURM_JOB_ID}  # on a filesystem every node sees

srun --kill-on-bad-exit=1 bash -c "
  source .venv/bin/activate
  accelerate launch \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    --mixed_precision no --dynamo_backend no --rdzv_backend static \
    -m rlctl train hydra.run.dir=$RUN_DIR $*
"
