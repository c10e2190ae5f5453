#!/usr/bin/env bash
# Downloads, on a machine with the package registries, the wheels that benchmarks/gpu/run_all.sh installs
# (its preflight) on a GPU machine without network: what this project needs beyond that machine's image
# (torch, Triton, tokenizers, transformers, PyYAML, pytest, hypothesis and matplotlib are there).
# x86-64 Linux, CPython PYTHON_VERSION (default 3.12, the GPU machine's), no dependencies pulled in
# (each one needed is named here). About 4 MB, into .whl/ (git-ignored), which must travel with the
# checkout to the GPU machine (the device tool: carry [".whl"]).
#
#   bash benchmarks/gpu/fetch_wheels.sh [PYTHON_VERSION] [DEST]     # e.g. 3.12 .whl
set -euo pipefail
cd "$(dirname "$0")/../.."
python_version=${1:-3.12}
dest=${2:-.whl}
[[ $python_version =~ ^3\.[0-9]+$ ]] || { echo "PYTHON_VERSION must look like 3.12, got $python_version"; exit 2; }
mkdir -p "$dest"
wheels=(
    "megatron-core==0.19.2"          # the training stack (CI's default; 0.16.1 is its compat end)
    "omegaconf==2.4.0"               # recipes
    "antlr4-python3-runtime==4.13.2" # omegaconf's parser
    "liger-kernel==0.8.5"            # a kernel-benchmark baseline
)
# --ignore-requires-python: megatron-core 0.19 asks for 3.12; CI runs it on 3.11 too (.ci/install)
python3 -m pip download --quiet --no-deps --only-binary=:all: --ignore-requires-python \
    --python-version "$python_version" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "${wheels[@]}"
ls -1 "$dest"
echo "fetch_wheels: $(du -sh "$dest" | cut -f1) in $dest for CPython $python_version; carry it with the checkout"
