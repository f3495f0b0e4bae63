#!/usr/bin/env bash
# Multi-node Linnaeus training under SLURM: one task per node, each running `accelerate launch` with this node's rank.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch.sh configs/experiments/my_exp.yaml [--opts KEY VALUE ...]
#
# Environment knobs (all optional):
#   ACCELERATE_CONFIG   accelerate config (default accelerate_configs/multi_node_zero2.yaml)
#   GPUS_PER_NODE       processes per node (default: SLURM_GPUS_ON_NODE, else nvidia-smi count, else 8)
#   MAIN_PORT           rendezvous port (default 29500)
#   WANDB_OFFLINE=1     log W&B offline (sync later with `wandb sync`); for nodes without internet
#   NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE ...  passed through to NCCL as usual
#   LINNAEUS_VENV       a virtualenv to activate on every node (default: ./.venv if present)
#
#SBATCH --job-name=linnaeus
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
#SBATCH --signal=TERM@120  # SIGTERM to the training processes 2 min before the time limit: they checkpoint and exit 75
#SBATCH --requeue          # exit 75 requeues the job (below); it resumes from the checkpoint when it starts again
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch launch.sh CONFIG.yaml [--opts KEY VALUE ...]" >&2
  exit 2
fi
CFG=$1
shift

if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
  echo "launch.sh: not inside a SLURM allocation (SLURM_JOB_NODELIST unset); submit it with sbatch" >&2
  exit 2
fi
if ! command -v scontrol >/dev/null; then
  # Falling back to localhost would make every node its own world and hang silently.
  echo "launch.sh: scontrol not found; cannot determine the main node" >&2
  exit 2
fi

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node_zero2.yaml}
NNODES=${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}
if [ -n "${GPUS_PER_NODE:-}" ]; then :;
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then GPUS_PER_NODE=$SLURM_GPUS_ON_NODE;
elif command -v nvidia-smi >/dev/null; then GPUS_PER_NODE=$(nvidia-smi -L | wc -l);
else GPUS_PER_NODE=8; fi
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
if [ "${WANDB_OFFLINE:-0}" = "1" ]; then export WANDB_MODE=offline; fi
VENV=${LINNAEUS_VENV:-.venv}
if [ -f "$VENV/bin/activate" ]; then source "$VENV/bin/activate"; fi

echo "launch.sh: $NNODES nodes x $GPUS_PER_NODE processes, main $MAIN_ADDR:$MAIN_PORT, config $ACCELERATE_CONFIG"

# Stop signals: `--signal=TERM@120` (or USR1/USR2/HUP, whichever the job asks for) reaches every process of the
# step, these shells included. A shell without a trap dies of it, and srun would report 143 before the ranks had
# checkpointed, so no requeue. Both shells below trap the stop signals and keep waiting for their child, which
# checkpoints and exits 75. `wait` returns early (status > 128) when a trapped signal arrives: wait_for waits again
# until the child is really gone and returns its own status.
WAIT_FOR='wait_for() {
  local status again
  wait "$1"; status=$?
  while kill -0 "$1" 2>/dev/null; do wait "$1"; status=$?; done
  if [ "$status" -gt 128 ]; then
    wait "$1" 2>/dev/null; again=$?
    if [ "$again" -ne 127 ]; then status=$again; fi
  fi
  return "$status"
}'
eval "$WAIT_FOR"
STOP_SIGNALS="TERM INT HUP USR1 USR2"

# Single quotes: \$SLURM_NODEID must expand inside each task, so every node gets its own machine rank.
# `linnaeus launch` is `accelerate launch` whose exit status is 75 when the ranks checkpointed on SIGTERM (plain
# `accelerate launch` would say 1). The first node requeues the job on 75 itself: the checkpoint is complete once
# its ranks have exited 75, and with --kill-on-bad-exit the other tasks may be ended before srun could report 75.
trap 'echo "launch.sh: stop signal received; waiting for the ranks to checkpoint" >&2' $STOP_SIGNALS
set +e
srun --kill-on-bad-exit=1 bash -c "$WAIT_FOR"'
  trap ":" '"$STOP_SIGNALS"'  # survive the stop signal: linnaeus launch forwards it to the ranks and reports 75
  linnaeus launch \
    --config_file "'"$ACCELERATE_CONFIG"'" \
    --num_machines '"$NNODES"' \
    --num_processes '"$NUM_PROCESSES"' \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip '"$MAIN_ADDR"' \
    --main_process_port '"$MAIN_PORT"' \
    -m linnaeus.train --cfg "$0" "$@" &
  wait_for $!
  status=$?
  if [ "$status" -eq 75 ] && [ "$SLURM_NODEID" = 0 ]; then
    echo "launch.sh: preempted and checkpointed (exit 75); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$status"
' "$CFG" "$@" &
wait_for $!
status=$?
set -e
if [ "$status" -eq 75 ]; then
  echo "launch.sh: exit 75 (preempted; requeued, resumes from the checkpoint)" >&2
fi
exit "$status"
