#!/usr/bin/env bash
# The GPU proof and its measurements, one command on one H100/H200, no network. Worst case 540 s: the
# stage limits plus their kill-afters (the table below; the script prints the sum first and refuses a
# GPU table over 540 s, inside the device's 600 s per command). Not yet run on a GPU.
#
#   bash benchmarks/gpu/fetch_wheels.sh [3.12]   # first, where the package registries are (-> .whl/)
#   bash benchmarks/gpu/run_all.sh OUT_DIR       # then on the GPU machine, .whl/ carried with the checkout
#   bash benchmarks/gpu/run_all.sh OUT_DIR --cpu-smoke   # the same pipeline on a CPU, tiny (a test runs it)
#   bash benchmarks/gpu/run_all.sh --print-budget [--cpu-smoke]   # the stage table and its worst case
#
# Stages, in order, each under `timeout` (SIGINT at its limit: pytest still writes its report, the
# benchmarks have saved every finished case; SIGKILL after the kill-after):
#   1. preflight (benchmarks/gpu/preflight.py): installs .whl/, versions, one trivial Triton kernel, flex
#      attention forward and backward, megatron-core import. If it fails, the run stops there with one line.
#   2. kernel tests: pytest -m gpu, the Triton kernels and the fused LM head against float64
#   3. training tests: pytest -m gpu, training steps through flex and SDPA with the Triton kernels, bf16
#      CUDA against fp32 CPU (TE where importable: it is not on that machine, so that test is skipped),
#      compiled flex attention's graphs on CUDA
#   4. kernel benchmark at T=16384 x V=152064: ours against torch (eager, compiled), megatron-core and Liger
#   5. long-context benchmark --preset run-all: solopo vs long_po at 8K and 32K, response-only, and a
#      budget probe that stops starting cases in time
#   6-7. the two reports: tables on stdout, plots beside the JSON
# OUT_DIR receives run_all.log, summary.json, preflight.json, pytest-kernels.xml, pytest-training.xml,
# logprobs.json/.png and long-context.json/.png. summary.json (benchmarks/gpu/summary.py) is rewritten
# at every stage's start and end: a run killed at any moment keeps every finished stage (name, limit_s,
# kill_after_s, rc, seconds, status; pytest stages their passed/failed/skipped/errors counts). To publish
# a run, copy the JSON into benchmarks/results/ and run each report.py with --readme.
set -uo pipefail
usage="usage: bash benchmarks/gpu/run_all.sh OUT_DIR [--cpu-smoke] | --print-budget [--cpu-smoke]"
out=${1:?$usage}
smoke=${2:-}
[[ -z $smoke || $smoke == --cpu-smoke ]] || { echo "$usage"; exit 2; }
if [[ $out != --print-budget ]]; then  # OUT_DIR is relative to the caller's folder, not the checkout's
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
fi
cd "$(dirname "$0")/../.."

# The stage table: name, limit (s), kill-after (s). GPU limits are estimates, not yet timed on a GPU.
names=(preflight "kernel tests" "training tests" "kernel benchmark" "long-context benchmark"
    "kernel report" "long-context report")
kill_after=(5 5 5 5 5 5 5)
if [[ $smoke == --cpu-smoke ]]; then
    limits=(120 120 120 120 300 60 60)
else
    limits=(75 70 160 90 80 15 15)
fi
MAX_BUDGET_S=540
budget=0
for i in "${!names[@]}"; do budget=$((budget + limits[i] + kill_after[i])); done

if [[ $out == --print-budget ]]; then
    for i in "${!names[@]}"; do
        echo "stage ${names[i]}: limit ${limits[i]} s, kill-after ${kill_after[i]} s"
    done
    echo "budget: $budget s (stage limits + kill-afters)"
    exit 0
fi
if [[ $smoke != --cpu-smoke ]] && ((budget > MAX_BUDGET_S)); then
    echo "run_all: the stage table's worst case is $budget s, over $MAX_BUDGET_S s"
    exit 2
fi

# A previous run's files must not pass for this one's (a report of an old JSON, an old summary).
rm -f "$out"/{run_all.log,summary.json,preflight.json,pytest-kernels.xml,pytest-training.xml} \
    "$out"/{logprobs,long-context}.{json,png}
exec > >(tee "$out/run_all.log") 2>&1
tee_pid=$!
finish() {  # the exit status, after tee has written the log's last line
    local rc=$1
    exec >&- 2>&-
    wait "$tee_pid" 2>/dev/null
    exit "$rc"
}
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
summary() { "$python" benchmarks/gpu/summary.py "$1" "$out/summary.json" "${@:2}"; }

preflight_args=(--out "$out/preflight.json")
if [[ $smoke == --cpu-smoke ]]; then  # the smoke uses what is installed
    preflight_args+=(--cpu-smoke)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else  # the preflight installs .whl/ there (or says in one line what to do when it is missing)
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    site=$scratch/site
    mkdir -p "$site"
    preflight_args+=(--wheels .whl --site "$site")
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $smoke == --cpu-smoke ]]; then
    require_passed=()  # on a CPU only the cpu_ok gpu tests run; the others are reported as skipped
    kernel_args=(--smoke --tokens 16 --vocabs 64 --providers solopo_triton torch_eager)
    long_args=(--smoke --lengths 128 --modes solopo --logits response_only --packing-groups 0 --in-process yes
        --probe-max 256)
else
    require_passed=(--require-passed)  # a GPU pytest stage where every test skipped is no pass
    kernel_args=(--tokens 16384 --vocabs 152064)  # one shape (a whole Qwen2.5 vocabulary): compiles once
    long_args=(--preset run-all)
fi
pytest_args=(-m gpu -q -p no:cacheprovider --durations=10)

stage() {  # stage NAME COMMAND...: runs it under its limit; summary.json rewritten at its start and end
    local name=$1 i limit kill start rc seconds arg end_args=()
    shift
    for i in "${!names[@]}"; do [[ ${names[i]} == "$name" ]] && break; done
    [[ ${names[i]} == "$name" ]] || { echo "run_all: no stage $name in the table"; exit 2; }
    limit=${limits[i]} kill=${kill_after[i]}
    for arg in "$@"; do  # a pytest stage: its junit XML gives the summary its test counts
        [[ $arg == --junitxml=* ]] && end_args=(--junit "${arg#--junitxml=}" ${require_passed[@]+"${require_passed[@]}"})
    done
    echo "=== $name (limit $limit s + kill-after $kill s): $*"
    summary start "$name" "$limit" "$kill"
    start=$(date +%s)
    timeout --signal=INT --kill-after="$kill" "$limit" "$@"
    rc=$?
    seconds=$(($(date +%s) - start))
    echo "=== $name: exit $rc in $seconds s$([[ $rc == 124 || $rc == 137 ]] && echo ' (time limit)')"
    summary end "$name" "$rc" "$seconds" ${end_args[@]+"${end_args[@]}"}
    return $rc
}

report_stage() {  # report_stage NAME JSON SCRIPT: the report, or a 'not run' entry when there is no JSON
    local name=$1 json=$2 script=$3 i
    if [[ -f $json ]]; then
        stage "$name" "$python" "$script" "$json"
    else
        for i in "${!names[@]}"; do [[ ${names[i]} == "$name" ]] && break; done
        summary not-run "$name" "${limits[i]}" "${kill_after[i]}" "no $(basename "$json")"
    fi
}

echo "run_all: worst case $budget s (stage limits + kill-afters$([[ $smoke == --cpu-smoke ]] && echo ', CPU smoke'))"
summary init "$budget" $([[ $smoke == --cpu-smoke ]] && echo --smoke)
if ! stage preflight "$python" benchmarks/gpu/preflight.py "${preflight_args[@]}"; then
    summary finish --stopped-after preflight
    finish 1
fi
stage "kernel tests" "$python" -m pytest "${pytest_args[@]}" tests/test_kernels_gpu.py \
    tests/test_gpu_linear_logprobs.py --junitxml="$out/pytest-kernels.xml"
# Every gpu-marked test file is in one of the two stages (a test of the CPU smoke checks it), but
# tests/megatron/test_gpu_selection.py: its gpu test checks the session set-up, run by the default suite.
stage "training tests" "$python" -m pytest "${pytest_args[@]}" tests/megatron/test_gpu_training.py \
    tests/megatron/test_packed_attention.py tests/megatron/test_shared_prompt_attention.py \
    --junitxml="$out/pytest-training.xml"
stage "kernel benchmark" \
    "$python" benchmarks/kernels/bench_logprobs.py "${kernel_args[@]}" --out "$out/logprobs.json"
stage "long-context benchmark" "$python" benchmarks/long_context/bench_step.py "${long_args[@]}" \
    --no-plot --out "$out/long-context.json"
report_stage "kernel report" "$out/logprobs.json" benchmarks/kernels/report.py
report_stage "long-context report" "$out/long-context.json" benchmarks/long_context/report.py
summary finish
finish $?
