#!/usr/bin/env bash
# Everything that needs a GPU, in one call: environment, ceilings, `pytest -m gpu`, the extension
# built for the device, and every benchmark at GPU sizes. GPU time is scarce (minutes at a time,
# machine start included), so steps run in order of value under one overall budget, each with its
# own limit, and results are gathered after every step: a suite cut short still returns what it
# measured. The C++/CUDA extension compiles in the background on the CPU while the Triton tests and
# benchmarks use the GPU.
#
#   bench/gpu_suite.sh [--quick] [--out DIR] [--budget SECONDS] [--only STEP[,STEP...]]
#                      [--wheels DIR] [--dry-run]
#
#   --quick          a ~4-minute subset (--quick benchmark sizes, fewer steps)
#   --out DIR        also gather the results into DIR as at most 8 files (suite.json, report.md,
#                    suite.log, build.log, plots.tar.gz, pytest-gpu*.xml); report.md opens with the
#                    GPU tests' counts and every failure's error (gpu-tests.md)
#   --budget SECONDS the whole suite's limit (default 450, 240 with --quick)
#   --only STEPS     run only these steps (comma-separated, run in suite order; `env` and `install`
#                    always run): reruns of failed steps in a later call. Named steps run even where
#                    --quick would skip them. `build-sync` (build the extension, in the foreground)
#                    runs only when named here.
#   --wheels DIR     put the wheels found there on the path first (default: .whl/ in the repository)
#   --dry-run        list the steps and their limits, run nothing
#
# Carried wheels, for GPU machines without network (DeepSpeed ships as an sdist, so build a wheel):
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl/
#   pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl/ \
#       hjson py-cpuinfo msgpack einops
# Nothing is installed into the machine's Python: the suite runs the checkout from PYTHONPATH.
# Results land in bench/results/<device>/ (commit them) and, with --out, in DIR.
set -uo pipefail

cd "$(dirname "$0")/.."
QUICK=0
DRY=0
OUT=""
BUDGET=""
ONLY=""
WHEELS=".whl"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        --only) ONLY="${2:?--only needs step names}"; shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -z $BUDGET ]] && BUDGET=$([[ $QUICK == 1 ]] && echo 240 || echo 450)
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; }

# python3: on the borrowed GPU machines the plain `python3` is the one that holds PyTorch.
PY="${PYTHON:-python3}"
Q=""
[[ $QUICK == 1 ]] && Q="--quick"
# Numerics, not tuning: one config per autotune key (kernels/attention.py), or the sweep spends
# minutes compiling candidates. -rfEs --tb=short: every failure's error in the log in a few lines
# (a torch.compile error's long traceback runs to hundreds); its junit XML keeps the same text, and
# bench/junit_report.py turns it into gpu-tests.md after the step.
GPU_TEST="TRITON_INTERPRET=0 BERT_FAST_AUTOTUNE=0 $PY -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider --durations=15"

# name | limit in seconds | when | command. In order of value. when: 1 = always, 0 = not with
# --quick, - = only when --only names it.
STEPS=(
    "env|20|1|show_env"
    "install|60|1|install_package"
    "build-start|30|1|start_build"
    "build-sync|240|-|start_build && wait_build"
    "ceilings|30|1|$PY bench/ceilings.py"
    "gpu-tests|120|1|$GPU_TEST tests/gpu --ignore=tests/gpu/ext --ignore=tests/gpu/test_train_compiled_gpu.py --junitxml=\$RESULTS/pytest-gpu.xml"
    "build-wait|150|1|wait_build"
    "bench-e2e|150|1|$PY bench/e2e.py $Q"
    "fp8-prediction|15|1|$PY bench/fp8_prediction.py --results \$RESULTS --provider fast_packed || $PY bench/fp8_prediction.py --results \$RESULTS"
    "bench-step_profile|45|1|$PY bench/step_profile.py $Q"
    "pretrain|90|1|run_pretrain"
    "pretrain-throughput|60|0|run_pretrain_throughput"
    "gpu-tests-train|200|0|$GPU_TEST tests/gpu/test_train_compiled_gpu.py --junitxml=\$RESULTS/pytest-gpu-train.xml"
    "gpu-tests-ext|45|0|$GPU_TEST tests/gpu/ext --junitxml=\$RESULTS/pytest-gpu-ext.xml"
    "bench-attention|60|1|$PY bench/attention.py $Q"
    "bench-mlm_loss|30|1|$PY bench/mlm_loss.py $Q"
    "bench-layernorm|30|0|$PY bench/layernorm.py $Q"
    "bench-optim|30|0|$PY bench/optim.py $Q"
    "bench-embeddings|20|0|$PY bench/embeddings.py $Q"
    "bench-fp8_cast|20|0|$PY bench/fp8_cast.py $Q"
    "bench-fp8_roll|15|0|$PY bench/fp8_roll.py $Q"
)
# Every bench/*.py that measures a GPU op appears above (tests/test_gpu_suite.py checks it).
ALWAYS=" env install "  # every other step needs them

KNOWN=" "
for step in "${STEPS[@]}"; do KNOWN+="${step%%|*} "; done
if [[ -n $ONLY ]]; then
    ONLY=" ${ONLY//,/ } "
    for name in $ONLY; do
        [[ $KNOWN == *" $name "* ]] && continue
        known=$(echo $KNOWN | sed 's/ /, /g')
        echo "gpu_suite.sh: unknown step '$name' in --only; known steps: $known" >&2
        exit 2
    done
    if [[ $ONLY == *" build-sync "* && ( $ONLY == *" build-start "* || $ONLY == *" build-wait "* ) ]]; then
        echo "gpu_suite.sh: --only build-sync replaces build-start and build-wait; name one or the other" >&2
        exit 2
    fi
fi

# Why a step does not run (nothing when it runs): not named by --only, or --quick, or only-when-named.
skip_reason() {
    local name=$1 when=$2
    if [[ -n $ONLY ]]; then
        [[ $ALWAYS == *" $name "* || $ONLY == *" $name "* ]] || echo "not in --only"
    elif [[ $when == - ]]; then
        echo "only with --only"
    elif [[ $QUICK == 1 && $when == 0 ]]; then
        echo "--quick"
    fi
}

if [[ $DRY == 1 ]]; then
    echo "gpu_suite.sh dry run ($([[ $QUICK == 1 ]] && echo quick || echo full), budget ${BUDGET}s$([[ -n $ONLY ]] && echo ", only $(echo $ONLY | tr ' ' ,)")):"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit when cmd <<< "$step"
        reason=$(skip_reason "$name" "$when")
        if [[ -n $reason ]]; then echo "  skip  $name ($reason)"; continue; fi
        printf '  %4ss  %-19s %s\n' "$limit" "$name" "$cmd"
    done
    exit 0
fi

show_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print("device", torch.cuda.get_device_name())'
}

install_package() {
    # Nothing is installed into the machine's Python: the checkout runs from PYTHONPATH (see
    # bert_fast/__init__.py) and carried wheels go to a private folder on it.
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
    else
        echo "no wheels in $WHEELS/: DeepSpeed steps and tests will be skipped"
    fi
    $PY -c 'import bert_fast, bert_fast.kernels.attention; print("bert_fast from", bert_fast.__file__)'
}

start_build() {
    # This device's architecture only, all cores, into the source tree (the editable install
    # finds bert_fast/_C*.so there).
    local arch cuda_home nvcc
    arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') ||
        { echo "no CUDA device: the extension's CUDA kernels cannot be built here"; return 1; }
    # The compilers, for diagnosing a failed build: nvcc must accept torch's CUDA headers and the
    # host compiler must be one nvcc supports.
    cuda_home=$($PY -c 'import torch; from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "", torch.version.cuda)')
    echo "CUDA_HOME ${cuda_home% *}, torch built for CUDA ${cuda_home##* }"
    nvcc="${cuda_home% *}/bin/nvcc"
    [[ -x $nvcc ]] || nvcc=nvcc
    echo "nvcc: $($nvcc --version 2>&1 | tail -1)"
    echo "c++:  $(c++ --version 2>&1 | head -1)"
    $PY -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]; print("Python.h:", p, os.path.exists(os.path.join(p, "Python.h")))'
    rm -f "$RESULTS/build.log" "$RESULTS/build.pid"
    # setsid: its own process group, so the step's `timeout` (which signals its whole group)
    # can never take the build down with it.
    BERT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        setsid -w nohup $PY setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1 &
    echo $! > "$RESULTS/build.pid"
    echo "building bert_fast._C for sm_${arch/./} in the background (pid $!)"
}

wait_build() {
    local pid log="$RESULTS/build.log" first from
    [[ -f $RESULTS/build.pid ]] || { echo "no build was started (build-start failed or did not run)"; return 1; }
    pid=$(cat "$RESULTS/build.pid")
    while kill -0 "$pid" 2> /dev/null; do sleep 2; done
    if $PY -c 'import bert_fast.ops.extension as e; e.require("cuda")' 2> /dev/null; then
        tail -n 3 "$log"
        echo "bert_fast._C has CUDA kernels"
        return 0
    fi
    # What matters is the compiler's message, far above the Python traceback that ends the log.
    # Lines are cut at 400 characters: ninja's command lines run to thousands.
    echo "the build failed: $(wc -l < "$log") lines in build.log (gathered whole as build.log)"
    echo "--- build.log lines with error/Error/FAILED (first 40):"
    grep -n -E "error|Error|FAILED" "$log" | head -40 | cut -c1-400
    first=$(grep -n -m1 -E "error:|error [A-Z]*[0-9]+|fatal error" "$log" | cut -d: -f1)
    [[ -z $first ]] && first=$(grep -n -m1 "FAILED" "$log" | cut -d: -f1)
    if [[ -n $first ]]; then
        from=$(( first > 10 ? first - 10 : 1 ))
        echo "--- build.log lines $from-$(( first + 40 )), around the first compiler error:"
        sed -n "${from},$(( first + 40 ))p" "$log" | cut -c1-400
    fi
    echo "--- the end of build.log:"
    tail -n 15 "$log" | cut -c1-400
    $PY -c 'import bert_fast.ops.extension as e; e.require("cuda")' 2>&1 | tail -n 1
    return 1
}

# The real training loop (pretrain.py, bert_fast/train/), one process on the GPU, a world of one
# without the launcher: bf16, ZeRO 2, LAMB, BERT-mini on synthetic data. 60 steps with checkpoints
# at 30 and 60, then `--resume auto` to 80 (the resumed run must continue at step 60, not restart),
# then the export to a Hugging Face folder. PRETRAIN_OVERRIDES: more dotted overrides, last
# (a CPU check of the command lines uses train.micro_batch=4).
run_pretrain() {
    local run="$RESULTS/pretrain-run" rc
    rm -rf "$run" "$RESULTS/pretrain-run-metrics.jsonl"
    local args=(--config configs/tiny-cpu.yaml model.preset=mini data.source=synthetic data.seq_length=128
                precision.bf16=true zero.stage=2 optimizer.name=lamb schedule.warmup_steps=10
                log.every=20 eval.every=0 checkpoint.every=30 "train.output_dir=$run")
    # Numerics, not tuning (as in the GPU tests): no autotune sweep.
    BERT_FAST_AUTOTUNE=0 TQDM_DISABLE=1 $PY pretrain.py "${args[@]}" train.steps=60 $PRETRAIN_OVERRIDES &&
        BERT_FAST_AUTOTUNE=0 TQDM_DISABLE=1 $PY pretrain.py --resume auto "${args[@]}" train.steps=80 \
            $PRETRAIN_OVERRIDES &&
        $PY -c 'import json, sys
steps = [r["step"] for r in map(json.loads, open(sys.argv[1])) if r["kind"] == "train"]
print("train records at steps", steps)
sys.exit(0 if steps == [20, 40, 60, 80] else "expected steps 20, 40, 60 and, resumed, 80")' "$run/metrics.jsonl" &&
        $PY -m bert_fast.train.export "$run/checkpoints" "$run/hf"
    rc=$?
    cp "$run/metrics.jsonl" "$RESULTS/pretrain-run-metrics.jsonl" 2> /dev/null
    return $rc
}

# The trainer's throughput at a realistic size: BERT-base, seq 128, micro-batch 128, bf16, ZeRO 1,
# LAMB, 30 steps, autotuned kernels. seq/s, tokens/s, TFLOP/s and MFU are in each train record.
run_pretrain_throughput() {
    local run="$RESULTS/pretrain-base" rc
    rm -rf "$run" "$RESULTS/pretrain-base-metrics.jsonl"
    TQDM_DISABLE=1 $PY pretrain.py --config configs/tiny-cpu.yaml model.preset=base data.source=synthetic \
        data.seq_length=128 train.micro_batch=128 train.steps=30 log.every=10 precision.bf16=true \
        zero.stage=1 optimizer.name=lamb eval.every=0 checkpoint.every=0 "train.output_dir=$run" \
        $PRETRAIN_OVERRIDES
    rc=$?
    cp "$run/metrics.jsonl" "$RESULTS/pretrain-base-metrics.jsonl" 2> /dev/null
    rm -rf "$run/checkpoints"  # the loop saves one at the last step (1.3 GB); nothing reads it
    return $rc
}

SITE=/tmp/bert_fast_site
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=$($PY -c 'import sys, torch; sys.path.insert(0, "bench"); import harness; print(harness.device_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu")))')
RESULTS="bench/results/$DEVICE"
mkdir -p "$RESULTS"
LOG="$RESULTS/suite.log"
STEPS_TSV="$RESULTS/steps.tsv"
: > "$LOG"
: > "$STEPS_TSV"
# A warm machine keeps the last call's files: what belongs to one run must not pass for this one's
# (a stale build.pid would even name someone else's process at the end).
rm -f "$RESULTS/build.pid" "$RESULTS/build.log" "$RESULTS"/pytest-gpu*.xml "$RESULTS"/gpu-tests.{md,json} \
    "$RESULTS"/pretrain*-metrics.jsonl
rm -rf "$RESULTS/pretrain-run" "$RESULTS/pretrain-base"
export RESULTS PY WHEELS SITE PRETRAIN_OVERRIDES="${PRETRAIN_OVERRIDES:-}"
export -f show_env install_package start_build wait_build run_pretrain run_pretrain_throughput
echo "gpu_suite.sh: budget ${BUDGET}s$([[ -n $ONLY ]] && echo ", only $(echo $ONLY | tr ' ' ,)"), results in $RESULTS$([[ -n $OUT ]] && echo ", gathered into $OUT")" | tee -a "$LOG"

gather() {
    [[ -z $OUT ]] && return 0
    $PY bench/gather.py "$RESULTS" "$OUT" --steps "$STEPS_TSV" --log "$LOG" > /dev/null 2>> "$LOG"
    cp "$RESULTS"/pytest-gpu*.xml "$OUT/" 2> /dev/null
    return 0
}

suite_start=$(date +%s)
failed=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit when cmd <<< "$step"
    reason=$(skip_reason "$name" "$when")
    # Steps left out by --only (or run only through it) are not part of this run's table.
    [[ $reason == "--quick" ]] && printf '%s\tskipped (--quick)\t0\n' "$name" >> "$STEPS_TSV"
    [[ -n $reason ]] && continue
    left=$(( BUDGET - ($(date +%s) - suite_start) ))
    if (( left < 5 )); then
        printf '%s\tskipped (budget spent)\t0\n' "$name" >> "$STEPS_TSV"
        echo "--- $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        failed=1
        continue
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
    log_from=$(wc -l < "$LOG")
    start=$(date +%s)
    # SIGINT first: pytest then stops cleanly and still writes its summary and junit XML.
    timeout --signal=INT --kill-after=10 "$limit" bash -c "$cmd" >> "$LOG" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - start ))
    case $rc in
        0) status="ok" ;;
        124|137) status="timed out"; failed=1 ;;
        *) status="failed (exit $rc)"; failed=1 ;;
    esac
    echo "--- $name: $status in ${seconds}s" | tee -a "$LOG"
    printf '%s\t%s\t%s\n' "$name" "$status" "$seconds" >> "$STEPS_TSV"
    # A pytest step: its counts and each failure's first line here, whole errors in gpu-tests.md
    # (a stand-in report with the end of its output when pytest died without writing one).
    if [[ $cmd == *"--junitxml=\$RESULTS/"* ]]; then
        xml=${cmd##*--junitxml=\$RESULTS/}
        $PY bench/junit_report.py "$RESULTS" --xml "${xml%% *}" --rc "$rc" --log "$LOG" --log-from "$log_from" \
            2>&1 | tee -a "$LOG"
    fi
    gather
done
# The build's whole process group (setsid made it the leader): ninja and nvcc too.
[[ -f $RESULTS/build.pid ]] && { kill -- "-$(cat "$RESULTS/build.pid")" || kill "$(cat "$RESULTS/build.pid")"; } 2> /dev/null
echo "gpu_suite.sh: done in $(( $(date +%s) - suite_start ))s$([[ $failed == 1 ]] && echo ", some steps failed or were skipped (see $LOG)")" | tee -a "$LOG"
gather
exit $failed
