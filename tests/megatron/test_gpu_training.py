"""CUDA (``pytest -m gpu``): training steps on the production path (Triton kernels, flex / SDPA attention,
Transformer Engine when importable), and bf16 CUDA against fp32 CPU.

tests/megatron/conftest.py sets ``SOLOPO_KERNELS=triton`` for the gpu tests (and the runs they start),
whatever the environment says; ``test_gpu_tests_run_the_triton_kernels`` checks that on any machine.
The fp32 CPU run of the bf16 comparison is the exception: it hides the GPU, so it runs the torch
kernels (``child_environment``; checked by the default suite's ``test_cpu_child_runs_the_torch_kernels``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FINITE_KEYS = ("loss", "po_loss", "solo_ra_loss", "grad_norm")


def child_environment(environ: Mapping[str, str], *, cpu: bool) -> dict[str, str]:
    """The environment of a training run a test starts: ``environ`` without TRITON_INTERPRET (a CUDA
    run compiles its kernels); a ``cpu`` run sees no GPU and runs the torch kernels, since the
    ``triton`` backend the gpu tests set cannot run on CPU tensors without the interpreter."""
    env = {k: v for k, v in environ.items() if k != "TRITON_INTERPRET"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["SOLOPO_KERNELS"] = "torch"
    return env


def _run(tmp_path, name: str, overrides: list[str], *, cpu: bool = False) -> list[dict]:
    metrics = tmp_path / f"{name}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "solopo_megatron.train",
        "--config",
        str(ROOT / "recipes/tiny-cpu.yaml"),
        "model.context_parallel_size=1",
        "model.use_cpu_initialization=true",
        "scheduler.lr_warmup_iters=0",
        "dataset.synthetic.num_train=64",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"logger.metrics_file={metrics}",
        *overrides,
    ]
    env = child_environment(os.environ, cpu=cpu)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["train"] for line in metrics.read_text().splitlines() if "train" in line]
    _assert_finite(steps)
    return steps


def _assert_finite(steps: list[dict]) -> None:
    """Every step's losses and gradient norm are finite numbers (a NaN fails every comparison silently)."""
    assert steps, "no training step was logged"
    for number, step in enumerate(steps, 1):
        for key in FINITE_KEYS:
            assert math.isfinite(step[key]), f"step {number}: {key} = {step[key]}"


def test_cpu_child_runs_the_torch_kernels(tmp_path):
    """Default suite: the bf16 test's CPU run, started from a gpu test's environment (SOLOPO_KERNELS=triton,
    a GPU visible), gets kernels that run on a CPU tensor; the gpu test's environment itself does not."""
    gpu_test_env = {**os.environ, "SOLOPO_KERNELS": "triton", "CUDA_VISIBLE_DEVICES": "0"}
    gpu_test_env.pop("TRITON_INTERPRET", None)
    probe = (
        "import torch\n"
        "from solopo_kernels import token_logprobs\n"
        "out = token_logprobs(torch.zeros(2, 5), torch.tensor([1, 3]))\n"
        "print(torch.cuda.is_available(), round(float(out.sum()), 4))\n"
    )

    def run(env: dict[str, str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", probe]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    env = child_environment(gpu_test_env, cpu=True)
    assert env["SOLOPO_KERNELS"] == "torch" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert "TRITON_INTERPRET" not in env
    done = run(env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", str(round(2 * -math.log(5), 4))]
    # What the CPU run got before: the gpu test's backend, which cannot run here.
    kept = run({**gpu_test_env, "CUDA_VISIBLE_DEVICES": ""})
    assert kept.returncode != 0 and "the 'triton' backend cannot run here" in kept.stderr


@pytest.mark.gpu
@pytest.mark.cpu_ok
def test_gpu_tests_run_the_triton_kernels():
    """Needs no GPU: test_gpu_selection.py runs it on CPU with SOLOPO_KERNELS=torch in the environment."""
    assert os.environ.get("SOLOPO_KERNELS") == "triton" and "TRITON_INTERPRET" not in os.environ


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flex"])  # sdpa first: no flex compile before its result
def test_training_steps_with_local_spec(tmp_path, attention):
    steps = _run(
        tmp_path,
        attention,
        [
            "model.transformer_impl=local",
            f"model.attention_backend={attention}",
            "train.train_iters=3",
            "train.eval_interval=null",
        ],
    )
    assert len(steps) == 3
    assert all(step["grad_norm"] > 0 for step in steps)  # learning (finite: checked by _run)


@pytest.mark.gpu
def test_training_steps_with_transformer_engine(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    overrides = [
        "model.transformer_impl=transformer_engine",
        "train.train_iters=3",
        "train.eval_interval=null",
    ]
    steps = _run(tmp_path, "te", overrides)
    assert len(steps) == 3 and all(step["grad_norm"] > 0 for step in steps)


# bf16 CUDA against fp32 CPU, first step (the same fp32 initial weights: use_cpu_initialization).
# bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3); weights and activations are rounded
# once per op, matmuls accumulate in fp32, and each metric sums or averages thousands of token terms,
# so rounding errors mostly cancel. The same comparison on a CPU (bf16 vs fp32: torch kernels, SDPA)
# differs by at most 4e-4 relative in the losses and gradient norm, 1.3e-5 relative in the rewards
# and log-probs, and 1.3e-4 absolute in solo_ra_loss. The bounds leave the GPU's other kernels and
# summation orders (flex attention, Triton) 15x to 150x that, and stay far below what a wrong mask,
# kernel or label shift moves: u relative (2e-3) for the log-probs (~ -84 nats: 0.17) and the rewards
# (beta x mean log-prob), 5u (1e-2) for the losses and the gradient norm, and 2e-3 absolute for
# solo_ra_loss (~0.008, a difference of two log-prob gaps: its relative error is large).
BF16_BOUNDS = {
    "loss": {"rel": 1e-2},
    "po_loss": {"rel": 1e-2},
    "grad_norm": {"rel": 1e-2},
    "rewards/short_chosen": {"rel": 2e-3},
    "rewards/long_chosen": {"rel": 2e-3},
    "rewards/short_rejected": {"rel": 2e-3},
    "logps/short_chosen": {"rel": 2e-3},
    "logps/long_chosen": {"rel": 2e-3},
    "logps/short_rejected": {"rel": 2e-3},
    "solo_ra_loss": {"abs": 2e-3},
}


@pytest.mark.gpu
def test_shared_prompts_equal_unshared_on_cuda(tmp_path):
    """One fp32 step with both pairs shared (SoLo-RA on both answers) against the same step unshared,
    through compiled flex with the branch mask, forward and backward (CUDA only; SDPA's branch spans are
    the same code on CPU, tested there)."""
    common = [
        "model.transformer_impl=local",
        "model.attention_backend=flex",
        "model.bf16=false",
        "solopo.solo_ra_chosen_only=false",
        "train.train_iters=1",
        "train.eval_interval=null",
    ]
    shared = _run(tmp_path, "shared", [*common, "dataset.share_prompt=true"])[0]
    unshared = _run(tmp_path, "unshared", [*common, "dataset.share_prompt=false"])[0]
    for key in ("loss", "grad_norm"):
        assert shared[key] == pytest.approx(unshared[key], rel=1e-4), key


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tmp_path):
    common = [
        "solopo.preference_loss=simpo",
        "solopo.beta=2.0",
        "train.train_iters=1",
        "train.eval_interval=null",
        "model.transformer_impl=local",
    ]
    gpu = _run(tmp_path, "gpu", [*common, "model.bf16=true"])[0]
    cpu = _run(tmp_path, "cpu", [*common, "model.bf16=false"], cpu=True)[0]
    for key, bound in BF16_BOUNDS.items():
        tolerance = bound.get("rel", 0.0) * abs(cpu[key]) + bound.get("abs", 0.0)
        assert abs(gpu[key] - cpu[key]) <= tolerance, f"{key}: bf16 {gpu[key]} vs fp32 {cpu[key]}"
