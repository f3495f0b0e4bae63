#!/usr/bin/env bash
# The one GPU check (issue #28): run from the repository root of a fresh copy of the work tree,
#
#   bash benchmarks/device_check.sh            # one GPU, at most 8 minutes (--budget SECONDS, default 470)
#   bash benchmarks/device_check.sh --smoke    # the same steps on the CPU at tiny sizes (CI; < 2 min)
#
# Steps, each cut to what is left of the time budget (the script stops on its own; a killed step keeps what it
# wrote): 1. a Python environment (LINNAEUS_PYTHON if set; else .venv if it imports linnaeus and torch; else a
# new .venv-device with the machine's own packages visible and `pip install torch torchvision -e .[dev]`, from
# wheels in .whl/ when the machine is offline); 2. the CUDA-only tests (skipped on the CPU); 3. benchmarks/
# gpu_train.py variants, most important first; 4. one table, device_check.md, with the date and versions, beside
# gpu_train.json and the logs in $OUT (or --out DIR; default ./device_check_out). benchmarks/README.md has the plan.
set -uo pipefail

START=$(date +%s)
SMOKE=0
BUDGET=""
DEST="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --budget) BUDGET="$2"; shift ;;
        --out) DEST="$2"; shift ;;
        *) echo "device_check.sh: unknown argument $1 (use --smoke, --budget SECONDS, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$BUDGET" ] || BUDGET=$([ "$SMOKE" = 1 ] && echo 150 || echo 470)
DEST="${DEST:-device_check_out}"
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
LOG="$DEST/device_check.log"
: >"$LOG"

left() { echo $((START + BUDGET - $(date +%s))); }
say() { echo "[device_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
# A step gets what is left minus a reserve for the steps after it (at least 1 s, so `timeout` always has a limit).
limit() { local n=$(( $(left) - $1 )); [ "$n" -lt 1 ] && n=1; echo "$n"; }

if [ ! -f pyproject.toml ] || [ ! -d linnaeus ]; then
    echo "device_check.sh: run it from the repository root" >&2
    exit 2
fi

# ------------------------------------------------------------------------------------------------ 1. environment
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this copy's code, whatever a reused venv has installed
usable() { [ -x "$1" ] && "$1" -c "import linnaeus, torch, accelerate, deepspeed, pytest" >/dev/null 2>&1; }
PY="${LINNAEUS_PYTHON:-}"
if [ -z "$PY" ]; then
    if usable .venv/bin/python; then
        PY=.venv/bin/python
    elif usable .venv-device/bin/python; then
        PY=.venv-device/bin/python
    else
        BASE=$(command -v python3.11 || command -v python3)
        say "installing into .venv-device with $BASE (its own torch is reused where it has one)"
        "$BASE" -m venv --system-site-packages .venv-device >>"$LOG" 2>&1
        WHEELS=()
        [ -d .whl ] && WHEELS=(--find-links .whl)
        # No build isolation: setuptools comes from the machine, so an offline machine fails fast, not after retries.
        PIP=(.venv-device/bin/pip install -q --no-build-isolation --retries 1 --timeout 10)
        timeout "$(limit 300)" "${PIP[@]}" "${WHEELS[@]}" torch torchvision -e '.[dev]' >>"$LOG" 2>&1 \
            || { [ -d .whl ] && timeout "$(limit 300)" "${PIP[@]}" --no-index --find-links .whl -e '.[dev]' >>"$LOG" 2>&1; }
        PY=.venv-device/bin/python
        usable "$PY" || { say "no usable environment (see $LOG; offline machines need wheels in .whl/)"; exit 1; }
    fi
fi
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
export PATH="$(dirname "$PY"):$PATH" WANDB_MODE=disabled PYTHONUNBUFFERED=1
say "python $PY ($($PY -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"

# ------------------------------------------------------------------------------------------------ 2. CUDA-only tests
# The tests that skip without CUDA: the step under sync-debug "error", augmentation on CUDA, the CUDA predictor.
CUDA_TESTS=(tests/unit/test_fast_step.py tests/unit/test_aug.py tests/integration/test_inference.py)
if [ "$SMOKE" = 1 ]; then CUDA_TESTS=(tests/unit/test_aug.py); fi  # collection only: they skip on the CPU
say "CUDA-only tests: ${CUDA_TESTS[*]} -k cuda"
timeout "$(limit $([ "$SMOKE" = 1 ] && echo 90 || echo 330))" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    "${CUDA_TESTS[@]}" -k cuda >"$DEST/cuda_tests.log" 2>&1
TESTS_RC=$?
TESTS_LINE=$(grep -E "passed|failed|skipped|error|no tests ran" "$DEST/cuda_tests.log" | tail -1)
[ "$TESTS_RC" = 124 ] && TESTS_LINE="stopped by the time budget; ${TESTS_LINE}"
say "tests: rc $TESTS_RC, ${TESTS_LINE:-no summary line}"

# ------------------------------------------------------------------------------------------------ 3. trainer variants
if [ "$SMOKE" = 1 ]; then
    ARGS=(--smoke --variants single-jpeg500-32-cpu-eager)
else
    # Most important first; gpu_train skips what its budget cannot fit. mFormerV1_sm, bf16, 224 px throughout:
    # decode cpu vs device (eager), compiled, DDP vs ZeRO-2 on one GPU, files vs shards, then the rest.
    ARGS=(--variants "single-jpeg500-224-cpu-eager,single-jpeg500-224-device-eager,single-jpeg500-224-device-compiled,\
ddp-jpeg500-224-device-eager,zero2-jpeg500-224-device-eager,single-shards-224-device-eager,\
single-shards-224-cpu-eager,single-jpeg500-224-cpu-compiled,zero2-jpeg500-224-device-compiled")
fi
TRAIN_LIMIT=$(limit 10)
say "gpu_train.py ${ARGS[*]} (budget ${TRAIN_LIMIT}s)"
timeout "$TRAIN_LIMIT" "$PY" -m benchmarks.gpu_train "${ARGS[@]}" --budget "$((TRAIN_LIMIT - 10))" \
    --out "$DEST/gpu_train.json" >"$DEST/gpu_train.log" 2>&1
TRAIN_RC=$?
say "gpu_train.py: rc $TRAIN_RC"

# ------------------------------------------------------------------------------------------------ 4. the table
"$PY" - "$DEST" "$TESTS_RC" "$TESTS_LINE" "$TRAIN_RC" "$(( $(date +%s) - START ))" <<'EOF'
import datetime, json, sys
from pathlib import Path

from benchmarks.gpu_train import table

dest, tests_rc, tests_line, train_rc, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
path = dest / "gpu_train.json"
res = json.loads(path.read_text()) if path.is_file() else {"errors": [{"section": "gpu_train", "error": "no JSON"}]}
env = res.get("env", {})
versions = {}
for mod in ("torch", "torchvision", "timm", "accelerate", "deepspeed"):
    try:
        versions[mod] = __import__(mod).__version__
    except Exception as err:  # recorded, not fatal
        versions[mod] = f"unavailable ({type(err).__name__})"
lines = [
    f"# Device check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    "",
    f"Machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '-')} GiB), {env.get('cpu_count')} CPUs; "
    f"Python {env.get('python')}, CUDA {env.get('cuda')}, "
    + ", ".join(f"{k} {v}" for k, v in versions.items())
    + f". bf16 matmul: {res.get('matmul', {}).get('tflops') or 0:.1f} TFLOP/s. Wall time {wall} s.",
    "",
    f"CUDA-only tests (exit {tests_rc}): {tests_line or '-'}",
    "",
    f"Trainer variants (benchmarks/gpu_train.py, exit {train_rc}; plan {json.dumps(res.get('plan', {}))}):",
    "",
    table(res),
]
for err in res.get("errors", []):
    lines.append(f"\nerror in {err.get('section')}: {err.get('error')}")
text = "\n".join(lines) + "\n"
(dest / "device_check.md").write_text(text)
print(text)
EOF
REPORT_RC=$?
say "table: $DEST/device_check.md"
# Exit non-zero when something failed (not when the budget skipped variants).
[ "$REPORT_RC" = 0 ] && [ "$TRAIN_RC" = 0 ] && { [ "$TESTS_RC" = 0 ] || [ "$TESTS_RC" = 5 ]; } && exit 0
exit 1
