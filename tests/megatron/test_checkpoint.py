"""Checkpoints: SIGKILL mid-run and resume reproduces the uninterrupted losses; a crash mid-save keeps the
last good one (and the lock the killed run left is taken over). Bad checkpoint folders, the run lock,
SIGINT and the logged lr: test_run_safety.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def _command(tmp: Path, name: str, extra: list[str] = ()) -> tuple[list[str], Path]:
    metrics = tmp / f"{name}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "solopo_megatron.train",
        "--config",
        str(ROOT / "recipes/tiny-cpu.yaml"),
        "model.context_parallel_size=1",
        f"train.train_iters={STEPS}",
        "train.eval_interval=null",
        "scheduler.lr_warmup_iters=2",
        "dataset.synthetic.num_train=64",
        f"dataset.cache_dir={tmp / 'cache'}",
        f"checkpoint.save={tmp / name}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=2",
        f"logger.metrics_file={metrics}",
        *extra,
    ]
    return cmd, metrics


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, str]:
    """Runs to completion in its own session; output to a file, so helper processes that
    dist_checkpointing leaves behind after a SIGKILL cannot hold a pipe open; they are killed after."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=600)
        finally:
            _kill_group(process)
    return code, log.read_text()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        entry = json.loads(line)
        if "train" in entry:
            out[entry["step"]] = entry["train"]["loss"]  # a resumed step overwrites the killed run's
    return out


@pytest.mark.compat
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cmd, metrics = _command(tmp_path, "straight")
    code, log = _run(cmd, tmp_path, _env(), tmp_path / "straight.log")
    assert code == 0, log[-3000:]
    expected = _losses(metrics)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert not (tmp_path / "straight" / "solopo-train.lock").exists()  # released at the end

    cmd, metrics = _command(tmp_path, "killed")
    latest = tmp_path / "killed" / "latest_checkpointed_iteration.txt"
    process = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not (latest.exists() and latest.read_text().strip() == "4"):
            assert process.poll() is None and time.time() < deadline, "run ended before its step-4 checkpoint"
            time.sleep(0.05)
    finally:
        _kill_group(process)  # SIGKILL, the whole job
        process.wait()
    assert len(_losses(metrics)) < STEPS
    code, log = _run(cmd, tmp_path, _env(), tmp_path / "resumed.log")
    assert code == 0, log[-3000:]
    assert "resumed from" in log
    got = _losses(metrics)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), (
            step,
            got[step],
            expected[step],
        )
    kept = sorted(p.name for p in (tmp_path / "killed").glob("iter_*"))
    assert kept == ["iter_0000006", "iter_0000008"]  # keep_last=2


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    cmd, metrics = _command(tmp_path, "crash")
    code, _ = _run(cmd, tmp_path, _env(SOLOPO_FAULT_INJECT="kill_during_save:4"), tmp_path / "crash.log")
    assert code == -signal.SIGKILL
    root = tmp_path / "crash"
    assert (root / "solopo-train.lock").exists()  # left by the killed run
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (root / "iter_0000004.tmp").is_dir() and not (root / "iter_0000004").exists()
    code, log = _run(cmd, tmp_path, _env(), tmp_path / "resumed.log")
    assert code == 0, log[-3000:]
    assert f"resumed from {root / 'iter_0000002'} after step 2" in log
    assert f"took over the stale lock {root / 'solopo-train.lock'}" in log
    assert not (root / "solopo-train.lock").exists()
    assert not (root / "iter_0000004.tmp").exists()
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


def _phase(
    tmp: Path, name: str, procs: int, until: int, layout: list[str], extra: list[str] = ()
) -> tuple[int, str]:
    """Runs (or resumes) ``name`` up to step ``until`` on ``procs`` processes with ``layout`` overrides.
    The schedule's length is pinned (lr_decay_iters), so stopping early does not change the run."""
    cmd, _ = _command(
        tmp,
        name,
        [
            "model.context_parallel_size=1",
            f"train.train_iters={until}",
            f"scheduler.lr_decay_iters={STEPS}",
            *layout,
            *extra,
        ],
    )
    if procs > 1:
        module = cmd.index("-m")
        cmd = [
            *cmd[:module],
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            *cmd[module:],
        ]
    return _run(cmd, tmp, _env(), tmp / f"{name}-{until}.log")


def _assert_same_losses(got: dict[int, float], expected: dict[int, float], rtol: float) -> None:
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert abs(got[step] - expected[step]) <= rtol * max(1.0, abs(expected[step])), (
            step,
            got[step],
            expected[step],
        )


@pytest.mark.slow  # 60 s; loading another layout's checkpoint stays in the default suite: test_long_eval[cp2] (CP=2 -> one process) and the DP resharding test
def test_resume_onto_other_layouts(tmp_path):
    """One run resumed three times, each onto another layout (TP, then PP, then CP; DP follows), reaches
    the losses of a one-process run: model and optimizer state reshard through dist_checkpointing."""
    code, log = _phase(tmp_path, "straight", 1, STEPS, [])
    assert code == 0, log[-3000:]
    expected = _losses(tmp_path / "straight.jsonl")
    phases = [
        (1, 2, []),
        (2, 4, ["model.tensor_model_parallel_size=2"]),
        (2, 6, ["model.pipeline_model_parallel_size=2"]),
        (2, STEPS, ["model.context_parallel_size=2"]),
    ]
    for procs, until, layout in phases:
        code, log = _phase(tmp_path, "moved", procs, until, layout)
        assert code == 0, log[-3000:]
        if until > 2:
            assert f"resumed from {tmp_path / 'moved' / f'iter_{until - 2:07d}'}" in log
            assert "resharded from layout" in log
    # Adam divides by sqrt(v): fp32 reduction-order noise of another layout shows at ~1e-6 relative.
    _assert_same_losses(_losses(tmp_path / "moved.jsonl"), expected, rtol=1e-4)


def test_distributed_optimizer_reshards_over_data_parallel_only(tmp_path):
    dist_opt = ["optimizer.use_distributed_optimizer=true"]
    code, log = _phase(tmp_path, "straight", 2, 4, [], dist_opt)
    assert code == 0, log[-3000:]
    code, log = _phase(tmp_path, "moved", 2, 2, [], dist_opt)
    assert code == 0, log[-3000:]
    code, log = _phase(tmp_path, "moved", 1, 4, [], dist_opt)  # DP 2 -> 1
    assert code == 0, log[-3000:]
    assert "resharded from layout tp 1 x pp 1 x cp 1 x dp 2" in log
    _assert_same_losses(_losses(tmp_path / "moved.jsonl"), _losses(tmp_path / "straight.jsonl"), rtol=1e-4)


def test_distributed_optimizer_state_is_refused_across_tensor_or_pipeline_sizes():
    """The check load_checkpoint runs on the checkpoint's common state before any tensor is read."""
    from solopo_megatron.megatron.checkpoint import _check_reshard
    from solopo_megatron.recipe.errors import RecipeError

    saved = {"layout": {"tp": 1, "pp": 1, "cp": 1, "dp": 2}, "distributed_optimizer": True}
    path = Path("run/iter_0000004")
    _check_reshard(saved, {"tp": 1, "pp": 1, "cp": 2, "dp": 1}, True, path)  # DP/CP: reshards
    _check_reshard(saved, {"tp": 2, "pp": 1, "cp": 1, "dp": 1}, False, path)  # plain optimizer now
    with pytest.raises(RecipeError) as error:
        _check_reshard(saved, {"tp": 2, "pp": 1, "cp": 1, "dp": 1}, True, path)
    assert str(error.value).startswith(
        "checkpoint.load: run/iter_0000004 holds distributed-optimizer state saved with "
        "tensor_model_parallel_size=1, pipeline_model_parallel_size=1; this run has 2, 1."
    )
