#!/usr/bin/env bash
# Cut WebDataset shards under SLURM: one array task per part of the shard plan, then one merge job.
#
#   jid=$(sbatch --parsable --array=0-49 --cpus-per-task=16 shard.sh CONFIG.yaml OUT [shard options] [--opts KEY VALUE ...])
#   sbatch --dependency=afterok:$jid shard.sh CONFIG.yaml OUT --merge [the same shard options and --opts]
#
# Array task I of N runs `linnaeus shard --cfg CONFIG --out OUT --part I/N ...`: the shard plan is fixed by the
# labels, split, shard size and seed, so the N parts write exactly the shards one run would, each into its own
# progress log. The merge job checks that every shard is there and writes OUT/manifest.json. A failed or
# preempted task is simply resubmitted (`sbatch --array=I ...`): finished shards are verified and kept.
# Shard options: --samples-per-shard N | --shard-size-mb MB, --max-side PX, --splits train,val (the same in every
# task and in the merge; the merge refuses records written with other options).
#
# Environment knobs (all optional):
#   SHARD_WORKERS    writer processes per task (default: SLURM_CPUS_PER_TASK, else linnaeus' default)
#   LINNAEUS_VENV    a virtualenv to activate (default: ./.venv if present)
#
#SBATCH --job-name=linnaeus-shard
#SBATCH --ntasks=1
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

usage="usage: sbatch --array=0-(N-1) shard.sh CONFIG.yaml OUT [shard options] [--opts KEY VALUE ...]
       sbatch --dependency=afterok:JOBID shard.sh CONFIG.yaml OUT --merge [shard options] [--opts KEY VALUE ...]"
if [ $# -lt 2 ]; then
  echo "$usage" >&2
  exit 2
fi
CFG=$1
OUT=$2
shift 2

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "shard.sh: not inside a SLURM job (SLURM_JOB_ID unset); submit it with sbatch" >&2
  echo "$usage" >&2
  exit 2
fi

MERGE=0
for arg in "$@"; do
  if [ "$arg" = "--merge" ]; then MERGE=1; fi
done
PART=()
if [ "$MERGE" = "0" ]; then
  if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ -z "${SLURM_ARRAY_TASK_COUNT:-}" ]; then
    echo "shard.sh: not an array job (SLURM_ARRAY_TASK_ID unset); submit the parts with sbatch --array=0-(N-1)," \
      "or pass --merge for the merge job" >&2
    exit 2
  fi
  # --array=0-(N-1) numbers the tasks 0..N-1; other index sets would leave parts unwritten.
  if [ "${SLURM_ARRAY_TASK_MIN:-0}" != "0" ] || [ "${SLURM_ARRAY_TASK_MAX:-}" != "$((SLURM_ARRAY_TASK_COUNT - 1))" ]; then
    echo "shard.sh: --array must be 0-(N-1) without steps, got ${SLURM_ARRAY_TASK_MIN:-?}-${SLURM_ARRAY_TASK_MAX:-?}" \
      "for $SLURM_ARRAY_TASK_COUNT tasks" >&2
    exit 2
  fi
  PART=(--part "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
fi

WORKERS=()
if [ -n "${SHARD_WORKERS:-${SLURM_CPUS_PER_TASK:-}}" ] && [ "$MERGE" = "0" ]; then
  WORKERS=(--workers "${SHARD_WORKERS:-$SLURM_CPUS_PER_TASK}")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VENV=${LINNAEUS_VENV:-.venv}
if [ -f "$VENV/bin/activate" ]; then source "$VENV/bin/activate"; fi

echo "shard.sh: ${PART[*]:-merge} into $OUT"
# The options keep their order, so --opts (which takes every remaining argument) stays last.
exec linnaeus shard --cfg "$CFG" --out "$OUT" "${PART[@]}" "${WORKERS[@]}" "$@"
