#!/usr/bin/env bash
# Downloads, on a machine with the package registries, the wheels that benchmarks/gpu/run_all.sh installs
# on a GPU machine without network: what this project needs beyond that machine's image (torch, Triton,
# tokenizers, transformers, PyYAML, pytest, hypothesis and matplotlib are there). Python 3.12, x86-64,
# no dependencies pulled in (each one needed is named here). About 4 MB, into .whl/ (git-ignored).
#
#   bash benchmarks/gpu/fetch_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
mkdir -p "$dest"
wheels=(
    "megatron-core==0.16.1"          # the training stack
    "omegaconf==2.4.0"               # recipes
    "antlr4-python3-runtime==4.13.2" # omegaconf's parser
    "liger-kernel==0.8.5"            # a kernel-benchmark baseline
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${wheels[@]}"
ls -1 "$dest"
