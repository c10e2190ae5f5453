"""CUDA (``pytest -m gpu``): training steps on the production path (Triton kernels, flex / SDPA attention,
Transformer Engine when importable), and bf16 CUDA against fp32 CPU.

tests/megatron/conftest.py sets ``SOLOPO_KERNELS=triton`` for these tests (and the runs they start),
whatever the environment says; ``test_gpu_tests_run_the_triton_kernels`` checks that on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, name: str, overrides: list[str], *, cpu: bool = False) -> list[dict]:
    metrics = tmp_path / f"{name}.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
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
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line)["train"] for line in metrics.read_text().splitlines() if "train" in line]


@pytest.mark.cpu_ok
def test_gpu_tests_run_the_triton_kernels():
    """Needs no GPU: test_gpu_selection.py runs it on CPU with SOLOPO_KERNELS=torch in the environment."""
    assert os.environ.get("SOLOPO_KERNELS") == "triton" and "TRITON_INTERPRET" not in os.environ


@pytest.mark.parametrize("attention", ["flex", "sdpa"])
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
    assert all(step["loss"] == step["loss"] and step["grad_norm"] > 0 for step in steps)  # finite, learning


def test_training_steps_with_transformer_engine(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    overrides = [
        "model.transformer_impl=transformer_engine",
        "train.train_iters=3",
        "train.eval_interval=null",
    ]
    steps = _run(tmp_path, "te", overrides)
    assert len(steps) == 3 and all(step["loss"] == step["loss"] for step in steps)


def test_cuda_bf16_matches_cpu_fp32(tmp_path):
    common = [
        "solopo.preference_loss=simpo",
        "solopo.beta=2.0",
        "train.train_iters=1",
        "train.eval_interval=null",
        "model.transformer_impl=local",
    ]
    gpu = _run(tmp_path, "gpu", common)[0]
    cpu = _run(tmp_path, "cpu", common, cpu=True)[0]
    for key in (
        "loss",
        "po_loss",
        "solo_ra_loss",
        "grad_norm",
        "rewards/short_chosen",
        "rewards/long_chosen",
    ):
        assert gpu[key] == pytest.approx(cpu[key], rel=3e-2, abs=2e-2), key
