#!/usr/bin/env bash
# The README's main job on a fresh CPU machine: install, then train the tiny-cpu recipe with
# 2 processes (context parallelism 2) on the bundled synthetic data and tokenizer. Extra arguments
# are recipe overrides, e.g. `bash scripts/tiny_cpu.sh train.train_iters=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Install unless what .ci/install puts in place is already here (saves pip's ~15 s on every run).
python .ci/installed.py || bash .ci/install
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # what torchrun sets anyway, without its warning
exec torchrun --standalone --nproc-per-node 2 -m solopo_megatron.train --config recipes/tiny-cpu.yaml "$@"
