"""The tiny recipe end to end through the CLI: it learns, the reference store round trip, non-finite
steps, and the reward check before the first update."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/tiny-cpu.yaml")


def run_cli(
    cwd: Path, *overrides: str, command: str = "train", timeout: int = 600
) -> subprocess.CompletedProcess:
    """``solopo-train`` (or ``solopo-ref-logps``) on the tiny recipe with ``overrides``, one process.

    TRITON_INTERPRET is dropped so the reference kernels run (the interpreter is slow on CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    program = [sys.executable, "-m", "solopo_megatron.train"] if command == "train" else ["solopo-ref-logps"]
    return subprocess.run(
        [*program, "--config", RECIPE, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.compat
def test_tiny_recipe_learns(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    done = run_cli(
        tmp_path,
        "model.context_parallel_size=1",
        "train.train_iters=60",
        "train.eval_interval=60",
        "train.log_interval=20",
        "dataset.synthetic.num_train=256",
        "scheduler.lr_warmup_iters=5",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"logger.metrics_file={metrics}",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "reward check: policy == reference before the first update" in out and "step 60/60" in out
    entries = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [e["eval"] for e in entries if "eval" in e]
    first, last = evals[0], evals[-1]
    assert abs(first["loss"] - 0.6931) < 1e-3 and abs(first["margin/long"]) < 1e-6  # policy == reference
    assert last["loss"] < first["loss"] - 0.1
    assert last["accuracy/long"] >= 0.6 and last["accuracy/long"] > first["accuracy/long"]
    assert len([e for e in entries if "train" in e]) == 60


# Slow (20 s): the default suite runs the same path with the default store location
# (test_default_store_written_by_ref_logps_is_found_by_training), and an explicit
# solopo.reference_store written by solopo-ref-logps in tests/megatron/test_reproducible_first_steps.py.
@pytest.mark.slow
def test_solopo_ref_logps_writes_a_store_training_then_uses(tmp_path):
    store = tmp_path / "ref.jsonl"
    common = [
        "model.context_parallel_size=1",
        "dataset.synthetic.num_train=32",
        "dataset.synthetic.num_valid=8",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"solopo.reference_store={store}",
        "scheduler.lr_warmup_iters=0",
        "solopo.compute_reference_if_missing=false",
    ]
    done = run_cli(tmp_path, *common, "train.train_iters=1")
    assert done.returncode == 2
    assert (
        f"solopo.reference_store: dpo needs reference log-probs, and the store {store} does not exist"
        in done.stderr
    )
    done = run_cli(tmp_path, *common, command="ref-logps")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 40 examples' reference log-probs" in done.stdout
    from solopo_megatron.data.reference_store import load_reference_store

    loaded = load_reference_store(store)
    assert len(loaded) == 40 and loaded.info == {"source": "initial weights"}
    done = run_cli(tmp_path, *common, "train.train_iters=2", "train.eval_interval=null")
    assert done.returncode == 0, done.stderr[-3000:]
    # The reference pass and the training pass pack rows differently, so rewards are 0 only up to fp32
    # rounding (4.8e-8 seen on an AVX2 EPYC, exactly 0 on others): the check's contract is a bound.
    check = re.search(r"max \|mean reward\| = (\S+), within the fp32 rounding bound (\S+)", done.stdout)
    assert check, done.stdout[-3000:]
    assert float(check.group(1)) <= float(check.group(2)) < 1e-4


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path):
    # An infinite learning rate wrecks the weights in step 1; every later step has non-finite gradients.
    done = run_cli(
        tmp_path,
        "model.context_parallel_size=1",
        "dataset.synthetic.num_train=32",
        "dataset.synthetic.num_valid=8",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "scheduler.lr_warmup_iters=0",
        "scheduler.lr_decay_style=constant",
        "optimizer.lr=1e37",  # finite (an infinite lr is a recipe error); Adam then overflows to inf
        "optimizer.clip_grad=0.0",
        "train.train_iters=10",
        "train.eval_interval=null",
        "train.log_interval=1",
        "train.max_skipped_steps_in_a_row=2",
    )
    assert done.returncode != 0
    assert "update skipped (1 in a row, limit train.max_skipped_steps_in_a_row=2)" in done.stdout
    assert "error: training diverged: steps 2-3 had non-finite values (2 in a row" in done.stderr


def test_reward_check_is_a_bound_not_bitwise_equality():
    from solopo_megatron.megatron.metrics import reward_check_message

    noise = {"rewards/short_chosen": 4.77e-8, "rewards/long_chosen": -1e-8, "logps/long_chosen": -120.0}
    assert "= 4.77e-08, within the fp32 rounding bound" in reward_check_message(noise, beta=0.1)
    import torch

    assert "within the bf16 rounding bound" in reward_check_message(
        {**noise, "rewards/short_chosen": 0.05}, 0.1, torch.bfloat16
    )
    wrong = {"rewards/short_chosen": 0.05, "logps/short_chosen": -120.0}
    assert "ABOVE (the reference store does not match these weights)" in reward_check_message(wrong, beta=0.1)


def test_default_store_written_by_ref_logps_is_found_by_training(tmp_path):
    """``solopo-ref-logps`` without solopo.reference_store writes the default cache path; training with
    compute_reference_if_missing=false must find it there (one resolve_reference_store rule for both)."""
    common = [
        "model.context_parallel_size=1",
        "dataset.synthetic.num_train=16",
        "dataset.synthetic.num_valid=4",
        "train.global_batch_size=8",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "solopo.compute_reference_if_missing=false",
        "scheduler.lr_warmup_iters=0",
    ]
    train = [*common, "train.train_iters=1", "train.eval_interval=null"]
    done = run_cli(tmp_path, *train)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "dpo needs reference log-probs, and the store is not set" in done.stderr  # no data files yet
    done = run_cli(tmp_path, *common, command="ref-logps")
    assert done.returncode == 0, done.stderr[-3000:]
    written = list((tmp_path / "cache" / "reference").glob("*.jsonl"))
    assert len(written) == 1 and f"to {written[0]}" in done.stdout
    done = run_cli(tmp_path, *train)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1/1" in done.stdout and "within the fp32 rounding bound" in done.stdout


def test_skipped_records_are_reported_at_start_up_and_in_the_metrics(tmp_path):
    """dataset.on_error=skip: the count and the first file:line: problems are printed, and the count
    goes to the metrics file."""
    from solopo_megatron.data.synthetic import generate_synthetic_records, write_jsonl

    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    write_jsonl(generate_synthetic_records(40, seed=3, id_prefix="t"), train)
    write_jsonl(generate_synthetic_records(8, seed=4, id_prefix="v"), valid)
    lines = train.read_text().splitlines()
    lines[4] = lines[4].replace(
        '"question":', '"question": "\\ud800", "question":', 1
    )  # surrogate + duplicate key
    lines[7] = "{not json"
    train.write_text("\n".join(lines) + "\n")
    metrics = tmp_path / "metrics.jsonl"
    done = run_cli(
        tmp_path,
        "model.context_parallel_size=1",
        f"dataset.train_path={train}",
        f"dataset.valid_path={valid}",
        "dataset.on_error=skip",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "train.train_iters=1",
        "train.eval_interval=null",
        "scheduler.lr_warmup_iters=0",
        f"logger.metrics_file={metrics}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dataset.on_error=skip: skipped 2 train record(s); the first:" in done.stdout
    assert f"{train}:5: " in done.stdout and f"{train}:8: " in done.stdout
    entries = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert entries[0] == {"step": 0, "data": {"skipped_records": {"train": 2, "valid": 0}}}
