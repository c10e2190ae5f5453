#!/usr/bin/env bash
# The GPU proof and its measurements, one command on one H100/H200, no network; its stage time limits
# add up to under 9 minutes (not yet run on a GPU):
#
#   bash benchmarks/gpu/fetch_wheels.sh          # first, where the package registries are (-> .whl/)
#   bash benchmarks/gpu/run_all.sh OUT_DIR       # then on the GPU machine, .whl/ beside the checkout
#   bash benchmarks/gpu/run_all.sh OUT_DIR --cpu-smoke   # the same pipeline on a CPU, tiny (checks it)
#
# Stages, each under its own time limit so the whole run stays inside 9 minutes (a stage that runs
# out keeps what it wrote: both benchmarks rewrite their JSON after every case):
#   1. versions (GPU, driver, Python, torch, CUDA, Triton, megatron-core, Liger)
#   2. pytest -m gpu: the Triton kernels against float64 at real shapes, training steps through
#      flex and SDPA attention with the Triton kernels (TE where importable; it is not on that machine)
#   3. the kernel benchmark, --quick: ours against torch (eager, compiled), megatron-core and Liger
#   4. the long-context step benchmark, --preset qwen2.5-0.5b: solopo vs long_po, response-only vs full
#      logits, 8K..64K tokens, and the longest context that fits the GPU
#   5. the reports: tables on stdout, plots beside the JSON
# OUT_DIR receives run_all.log, summary.json (versions, each stage's exit code and seconds),
# pytest-gpu.xml, logprobs.json/.png and long-context.json/.png: seven files. To publish a run, copy
# the JSON into benchmarks/results/ (logprobs-<device>.json, long-context-<device>.json) and run
# each report.py with --readme.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu/run_all.sh OUT_DIR [--cpu-smoke]}
smoke=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
exec > >(tee "$out/run_all.log") 2>&1
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if [[ $smoke != --cpu-smoke ]] && compgen -G ".whl/*.whl" >/dev/null; then  # (the smoke uses what is installed)
    site=$(mktemp -d)/site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $smoke == --cpu-smoke ]]; then
    limits=(120 120 300)
    pytest_args=(-m gpu -q -p no:cacheprovider tests/megatron/test_gpu_training.py)
    kernel_args=(--smoke --tokens 16 --vocabs 64 --providers solopo_triton torch_eager)
    long_args=(--smoke --lengths 128 --modes solopo --logits response_only --packing-groups 0 --in-process yes --no-plot)
else
    limits=(180 100 220)
    pytest_args=(-m gpu -q -p no:cacheprovider tests)
    kernel_args=(--quick)
    long_args=(--preset qwen2.5-0.5b --no-plot)
fi

stages=()
stage() {  # stage NAME LIMIT_S COMMAND...: runs it under `timeout`, records its exit code and seconds
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    start=$(date +%s)
    # SIGINT first: pytest still writes its report, the benchmarks have saved every finished case.
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc in $(($(date +%s) - start)) s$([[ $rc == 124 ]] && echo ' (time limit)')"
    stages+=("$name $rc $(($(date +%s) - start))")
}

begin=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
stage "pytest -m gpu" "${limits[0]}" "$python" -m pytest "${pytest_args[@]}" --junitxml="$out/pytest-gpu.xml"
stage "kernel benchmark" "${limits[1]}" \
    "$python" benchmarks/kernels/bench_logprobs.py "${kernel_args[@]}" --out "$out/logprobs.json"
stage "long-context benchmark" "${limits[2]}" \
    "$python" benchmarks/long_context/bench_step.py "${long_args[@]}" --out "$out/long-context.json"
[[ -f $out/logprobs.json ]] && stage "kernel report" 60 "$python" benchmarks/kernels/report.py "$out/logprobs.json"
[[ -f $out/long-context.json ]] && stage "long-context report" 60 \
    "$python" benchmarks/long_context/report.py "$out/long-context.json"

"$python" - "$out/summary.json" "$begin" "${stages[@]}" <<'EOF'
import importlib, json, platform, sys, time

path, begin, *stages = sys.argv[1:]
versions = {"python": platform.python_version()}
for name in ("torch", "triton", "megatron.core", "liger_kernel", "transformer_engine"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:  # noqa: BLE001  (not installed)
        versions[name] = None
import torch

versions["cuda"] = torch.version.cuda
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
summary = {
    "device": device,
    "versions": versions,
    "seconds": round(time.time() - float(begin)),
    "stages": [
        {"name": name, "exit": int(rc), "seconds": int(seconds)}
        for name, rc, seconds in (s.rsplit(" ", 2) for s in stages)
    ],
}
open(path, "w").write(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
failed=0
for s in "${stages[@]}"; do
    rc=${s% *}
    rc=${rc##* }
    [[ $rc == 0 ]] || failed=1
done
echo "run_all: $(($(date +%s) - begin)) s, $([[ $failed == 0 ]] && echo 'every stage passed' || echo 'a stage failed (see above)')"
exit $failed
