#!/usr/bin/env bash
# Everything that needs a GPU, in one call: environment, ceilings, `pytest -m gpu`, the extension
# built for the device, and every benchmark at GPU sizes. GPU time is scarce (minutes at a time,
# machine start included), so steps run in order of value under one overall budget, each with its
# own limit, and results are gathered after every step: a suite cut short still returns what it
# measured. The C++/CUDA extension compiles in the background on the CPU while the Triton tests and
# benchmarks use the GPU.
#
#   bench/gpu_suite.sh [--quick] [--out DIR] [--budget SECONDS] [--wheels DIR] [--dry-run]
#
#   --quick          a ~2-minute subset (--quick benchmark sizes, fewer steps)
#   --out DIR        also gather the results into DIR as at most 8 files (suite.json, report.md,
#                    suite.log, plots.tar.gz, pytest-gpu*.xml)
#   --budget SECONDS the whole suite's limit (default 450, 240 with --quick)
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
WHEELS=".whl"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
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
# minutes compiling candidates.
GPU_TEST="TRITON_INTERPRET=0 BERT_FAST_AUTOTUNE=0 $PY -m pytest -m gpu -q -rs -p no:cacheprovider --durations=15"

# name | limit in seconds | run with --quick (1/0) | command. In order of value.
STEPS=(
    "env|20|1|show_env"
    "install|60|1|install_package"
    "build-start|30|1|start_build"
    "ceilings|30|1|$PY bench/ceilings.py"
    "gpu-tests|100|1|$GPU_TEST tests/gpu --ignore=tests/gpu/ext --junitxml=\$RESULTS/pytest-gpu.xml"
    "build-wait|150|1|wait_build"
    "bench-e2e|150|1|$PY bench/e2e.py $Q"
    "gpu-tests-ext|45|0|$GPU_TEST tests/gpu/ext --junitxml=\$RESULTS/pytest-gpu-ext.xml"
    "bench-attention|60|1|$PY bench/attention.py $Q"
    "bench-mlm_loss|30|1|$PY bench/mlm_loss.py $Q"
    "bench-layernorm|30|0|$PY bench/layernorm.py $Q"
    "bench-optim|30|0|$PY bench/optim.py $Q"
    "bench-embeddings|20|0|$PY bench/embeddings.py $Q"
)
# Every bench/*.py that measures a GPU op appears above (tests/test_gpu_suite.py checks it).

if [[ $DRY == 1 ]]; then
    echo "gpu_suite.sh dry run ($([[ $QUICK == 1 ]] && echo quick || echo full), budget ${BUDGET}s):"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit quick cmd <<< "$step"
        if [[ $QUICK == 1 && $quick == 0 ]]; then echo "  skip  $name"; continue; fi
        printf '  %4ss  %-17s %s\n' "$limit" "$name" "$cmd"
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
    local arch
    arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') ||
        { echo "no CUDA device: the extension's CUDA kernels cannot be built here"; return 1; }
    # setsid: its own process group, so the step's `timeout` (which signals its whole group)
    # can never take the build down with it.
    BERT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        setsid -w nohup $PY setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1 &
    echo $! > "$RESULTS/build.pid"
    echo "building bert_fast._C for sm_${arch/./} in the background (pid $!)"
}

wait_build() {
    local pid
    pid=$(cat "$RESULTS/build.pid")
    while kill -0 "$pid" 2> /dev/null; do sleep 2; done
    tail -n 15 "$RESULTS/build.log"
    $PY -c 'import bert_fast.extension as e; e.require("cuda"); print("bert_fast._C has CUDA kernels")'
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
export RESULTS PY WHEELS SITE
export -f show_env install_package start_build wait_build
echo "gpu_suite.sh: budget ${BUDGET}s, results in $RESULTS$([[ -n $OUT ]] && echo ", gathered into $OUT")" | tee -a "$LOG"

gather() {
    [[ -z $OUT ]] && return 0
    $PY bench/gather.py "$RESULTS" "$OUT" --steps "$STEPS_TSV" --log "$LOG" > /dev/null 2>> "$LOG"
    cp "$RESULTS"/pytest-gpu*.xml "$OUT/" 2> /dev/null
    return 0
}

suite_start=$(date +%s)
failed=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit quick cmd <<< "$step"
    if [[ $QUICK == 1 && $quick == 0 ]]; then
        printf '%s\tskipped (--quick)\t0\n' "$name" >> "$STEPS_TSV"
        continue
    fi
    left=$(( BUDGET - ($(date +%s) - suite_start) ))
    if (( left < 5 )); then
        printf '%s\tskipped (budget spent)\t0\n' "$name" >> "$STEPS_TSV"
        echo "--- $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        failed=1
        continue
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
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
    gather
done
# The build's whole process group (setsid made it the leader): ninja and nvcc too.
[[ -f $RESULTS/build.pid ]] && { kill -- "-$(cat "$RESULTS/build.pid")" || kill "$(cat "$RESULTS/build.pid")"; } 2> /dev/null
echo "gpu_suite.sh: done in $(( $(date +%s) - suite_start ))s$([[ $failed == 1 ]] && echo ", some steps failed or were skipped (see $LOG)")" | tee -a "$LOG"
gather
exit $failed
