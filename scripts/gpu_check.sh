#!/usr/bin/env bash
# The GPU check (docs/performance.md, "GPU"): the tests marked `cuda`, then the forward, train-step and eval-memory
# benchmarks on CUDA, each step time-boxed; a failed step is recorded and the next one runs. Writes 8 files into
# OUTDIR:
#   machine.json      GPU name and memory, torch/CUDA versions, this run's fp32 and bf16 torch.mm rates
#   pytest_cuda.xml   JUnit XML of `pytest -m cuda`, and pytest_cuda.log its output
#   forward.jsonl, train_step.jsonl, eval_memory.jsonl   one JSON record per line (each with the machine facts)
#   steps.log         the install step's and the benchmarks' stderr, one header per step
#   summary.json      per step: status, exit code, seconds, time limit, output file and command
#
# Usage: scripts/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run (or GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1): the same steps on the CPU at toy sizes (vit_t16 alone,
#   64 px, N = 8, batch 1 and 2, 1 repetition): 4 minutes of CPU time, 10 on a busy 2-core machine.
# Environment:
#   GPU_CHECK_DEVICE  cuda (default) or cpu          GPU_CHECK_TINY    1: toy sizes (default 0)
#   GPU_CHECK_BUDGET_S  seconds for all steps after the install (default 450; 1500 with toy sizes): a step's
#                       time limit is cut to what is left, and steps that find under 15 s left are skipped
#   GPU_CHECK_LIMIT_FACTOR  multiplies each step's time limit (default 1; 5 with toy sizes, on a CPU)
#   GPU_CHECK_PYTHON  the interpreter (default: GPU_CHECK_VENV's python if there is one, else python3)
#   GPU_CHECK_VENV    where to create a virtual environment when segrank's dependencies do not import
#                     (default: .venv in the repository; made with --system-site-packages, so the machine's own
#                     CUDA build of torch is used, and installed with pip install -e '.[dev]')
#   GPU_CHECK_TESTS   the test paths of `pytest -m cuda` (default tests/cuda)
# Exit status: 0 when every step passed, 1 otherwise (summary.json says which).
set -euo pipefail

usage() { echo "usage: scripts/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUTDIR=$1
if [[ $# -eq 2 ]]; then
    [[ $2 == --dry-run ]] || usage
    GPU_CHECK_DEVICE=cpu
    GPU_CHECK_TINY=1
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "GPU_CHECK_DEVICE: '$DEVICE' is not cuda or cpu" >&2; exit 2; }
[[ $TINY == 0 || $TINY == 1 ]] || { echo "GPU_CHECK_TINY: '$TINY' is not 0 or 1" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GPU_CHECK_VENV:-$REPO/.venv}
PY=python3
[[ -x $VENV/bin/python ]] && PY=$VENV/bin/python
PY=${GPU_CHECK_PYTHON:-$PY}
TESTS=${GPU_CHECK_TESTS:-tests/cuda}

if [[ $TINY == 1 ]]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-1500}
    FACTOR=${GPU_CHECK_LIMIT_FACTOR:-5}
    MODELS=("vit_t16 64")
    CLASSES=(8) BATCHES=1,2 REPS=1 IMAGE=64,64
else
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
    FACTOR=${GPU_CHECK_LIMIT_FACTOR:-1}
    MODELS=("vit_b16 512" "vit_l16 640")  # the model zoo's ViT-B/16 at 512 and ViT-L/16 at 640
    CLASSES=(150 1284) BATCHES=1,32 REPS=5 IMAGE=512,683
fi
[[ $BUDGET =~ ^[0-9]+$ && $FACTOR =~ ^[1-9][0-9]*$ ]] \
    || { echo "GPU_CHECK_BUDGET_S, GPU_CHECK_LIMIT_FACTOR: '$BUDGET', '$FACTOR' are not whole numbers" >&2; exit 2; }
CLASS_LIST=$(IFS=,; echo "${CLASSES[*]}")
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for output in steps.log machine.json pytest_cuda.log forward.jsonl train_step.jsonl eval_memory.jsonl; do
    : >"$OUTDIR/$output"  # a new run's records only
done
rm -f "$OUTDIR/pytest_cuda.xml" "$OUTDIR/summary.json"
STEPS_JSON=()
START=$SECONDS  # of the whole run; the budget counts from the end of the install step
BUDGET_START=$SECONDS
FAILED=0

json_string() {  # $1 as a JSON string
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    printf '"%s"' "$s"
}

write_summary() {
    local steps
    steps=$(IFS=,; echo "${STEPS_JSON[*]:-}")
    printf '{"device": %s, "tiny": %s, "budget_s": %s, "total_s": %s, "failed_steps": %s, "steps": [%s]}\n' \
        "$(json_string "$DEVICE")" "$([[ $TINY == 1 ]] && echo true || echo false)" "$BUDGET" \
        "$((SECONDS - START))" "$FAILED" "$steps" >"$OUTDIR/summary.json"
}

# record NAME STATUS RC SECONDS LIMIT OUTPUT COMMAND...
record() {
    local name=$1 status=$2 rc=$3 seconds=$4 limit=$5 output=$6
    shift 6
    [[ $status == ok ]] || FAILED=$((FAILED + 1))
    STEPS_JSON+=("{\"name\": $(json_string "$name"), \"status\": \"$status\", \"rc\": $rc, \"seconds\": $seconds, \
\"limit_s\": $limit, \"output\": $(json_string "$output"), \"command\": $(json_string "$*")}")
    write_summary
    echo "[gpu_check] $name: $status (rc $rc, ${seconds}s)" >&2
}

# step NAME LIMIT_S OUTPUT COMMAND...: run COMMAND with its stdout appended to OUTDIR/OUTPUT (stderr too when
# OUTPUT is a .log) and its stderr to steps.log, within LIMIT_S x FACTOR seconds and the budget that is left.
step() {
    local name=$1 limit=$(($2 * FACTOR)) output=$3
    shift 3
    local left=$((BUDGET - (SECONDS - BUDGET_START))) err="$OUTDIR/steps.log"
    [[ $output == *.log ]] && err="$OUTDIR/$output"
    if ((left < 15)); then
        record "$name" "skipped: budget spent" null 0 0 "$output" "$@"
        return
    fi
    ((limit <= left)) || limit=$left
    echo "=== $name (limit ${limit}s): $*" >>"$OUTDIR/steps.log"
    local t0=$SECONDS rc=0 status=ok
    timeout --kill-after=10 "$limit" "$@" >>"$OUTDIR/$output" 2>>"$err" || rc=$?
    if ((rc == 124 || rc == 137)); then
        status="timed out"
    elif ((rc != 0)); then
        status=failed
    fi
    record "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$output" "$@"
}

# The install step: none when segrank's dependencies import with $PY (a device machine's python3 holds them).
install_step() {
    local t0=$SECONDS rc=0
    if "$PY" -c "import segrank.cli, pytest" 2>>"$OUTDIR/steps.log"; then
        record install ok 0 0 0 steps.log "$PY: segrank imports, no install"
        return
    fi
    echo "=== install: $VENV" >>"$OUTDIR/steps.log"
    { "$PY" -m venv --system-site-packages "$VENV" \
        && "$VENV/bin/python" -m pip install -q --no-build-isolation -e "$REPO[dev]"; } \
        >>"$OUTDIR/steps.log" 2>&1 || rc=$?
    [[ -x $VENV/bin/python ]] && PY=$VENV/bin/python
    record install "$([[ $rc == 0 ]] && echo ok || echo failed)" "$rc" "$((SECONDS - t0))" 0 steps.log \
        "$PY -m venv --system-site-packages $VENV && pip install -e .[dev]"
}

install_step
BUDGET_START=$SECONDS
SEGRANK=("$PY" -m segrank.cli benchmark)
read -ra TEST_PATHS <<<"$TESTS"
# machine_info measures the fp32 and bf16 torch.mm rates (up to 8192 x 8192 on a GPU)
step machine 60 machine.json "$PY" -c "
import json, sys, torch
from segrank.benchmarks.measure import machine_info
print(json.dumps(machine_info(torch.device(sys.argv[1]))))" "$DEVICE"
# SEGRANK_TEST_DEVICE: on the CPU the checks compare the CPU with itself (a check of the tests, not of CUDA)
step pytest 200 pytest_cuda.log env SEGRANK_TEST_DEVICE="$DEVICE" "$PY" -m pytest -m cuda -p no:cacheprovider -rA \
    --junitxml="$OUTDIR/pytest_cuda.xml" "${TEST_PATHS[@]}"
for model in "${MODELS[@]}"; do
    read -r backbone size <<<"$model"
    for amp in none bf16; do
        step "forward-$backbone-$size-$amp" 80 forward.jsonl "${SEGRANK[@]}" forward --json --device "$DEVICE" \
            --backbone "$backbone" --size "$size" --classes "$CLASS_LIST" --amp "$amp" --reps "$REPS"
    done
done
for model in "${MODELS[@]}"; do
    read -r backbone size <<<"$model"
    for classes in "${CLASSES[@]}"; do
        step "train-step-$backbone-$size-n$classes" 100 train_step.jsonl "${SEGRANK[@]}" train-step --json \
            --device "$DEVICE" --backbone "$backbone" --size "$size" --classes "$classes" --batch "$BATCHES" \
            --reps "$REPS"
    done
done
for model in "${MODELS[@]}"; do
    read -r backbone _ <<<"$model"
    # eval-memory's windows are 512 px for every backbone (the benchmark has no size flag)
    step "eval-memory-$backbone" 100 eval_memory.jsonl "${SEGRANK[@]}" eval-memory --json --device "$DEVICE" \
        --backbone "$backbone" --classes "$CLASS_LIST" --image-size "$IMAGE" --reps "$REPS"
done
write_summary
echo "[gpu_check] $FAILED failed step(s) in $((SECONDS - START))s; summary: $OUTDIR/summary.json" >&2
((FAILED == 0))
