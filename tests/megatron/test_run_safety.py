"""Nothing lost, nothing cryptic: bad checkpoint folders end in one message naming the path and what to
do, before any compute, with nothing overwritten; the run lock; the logged learning rate; SIGINT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from checkpoint_files import write_checkpoint_files

from solopo_megatron.megatron import checkpoint as ckpt
from solopo_megatron.recipe import checkpoints
from solopo_megatron.recipe.checkpoints import LATEST, LOCK, checkpoint_problems
from solopo_megatron.recipe.loading import load_config
from solopo_megatron.train import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/tiny-cpu.yaml")


def _overrides(tmp: Path, save: Path, *extra: str) -> list[str]:
    return [
        "model.context_parallel_size=1",
        f"dataset.cache_dir={tmp / 'cache'}",
        f"checkpoint.save={save}",
        *extra,
    ]


def _train(tmp: Path, save: Path, capsys, *extra: str) -> tuple[int, str]:
    """``solopo-train`` in this process: (exit code, stderr); a traceback would raise out of it."""
    code = main(["--config", RECIPE, *_overrides(tmp, save, *extra)])
    return code, capsys.readouterr().err


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A folder with the files the checks look for (dist_checkpointing's torch_dist layout)."""
    return write_checkpoint_files(root / f"iter_{step:07d}")


def _saved_config(root: Path, **model) -> None:
    cfg = load_config(RECIPE, ["model.context_parallel_size=1"])
    section = {f: getattr(cfg.model, f) for f in cfg.model.__dataclass_fields__}
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {**section, **model}}))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(tmp, save, capsys, *expected: str, extra: tuple[str, ...] = ()) -> None:
    """The run exits 2 with one ``error:`` naming every ``expected`` piece; ``save`` is unchanged."""
    before = _snapshot(save) if save.is_dir() else None
    code, err = _train(tmp, save, capsys, "train.train_iters=1", *extra)
    assert code == 2, err
    assert err.startswith("error: invalid recipe:") and "Traceback" not in err, err
    for piece in expected:
        assert piece in err, (piece, err)
    if before is not None:
        assert _snapshot(save) == before  # nothing written, nothing removed
    assert not (tmp / "cache").exists()  # refused before any data was prepared


def test_corrupt_latest_file(tmp_path, capsys):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    (save / LATEST).write_text("garbage\n")
    _refused(
        tmp_path,
        save,
        capsys,
        f"checkpoint.save: {save / LATEST} is corrupt (it holds 'garbage', not a step number)",
        f"`echo 2 > {save / LATEST}`",
        "point checkpoint.save at a new folder to start afresh",
    )


def test_latest_names_a_missing_checkpoint(tmp_path, capsys):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    (save / LATEST).write_text("4\n")
    _refused(
        tmp_path,
        save,
        capsys,
        f"{save / LATEST} names iter_0000004, which does not exist",
        f"`echo 2 > {save / LATEST}`",
    )


@pytest.mark.parametrize("lost", ["metadata.json", "common.pt", ".metadata"])
def test_latest_names_a_damaged_checkpoint(tmp_path, capsys, lost):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    (_fake_checkpoint(save, 4) / lost).unlink()
    (save / LATEST).write_text("4\n")
    _refused(
        tmp_path,
        save,
        capsys,
        f"{save / LATEST} names iter_0000004, which has no {lost}",
        f"`echo 2 > {save / LATEST}` (or set checkpoint.load={save / 'iter_0000002'})",
    )


def test_damaged_checkpoint_named_by_load(tmp_path, capsys):
    run = tmp_path / "old"
    (_fake_checkpoint(run, 2) / "metadata.json").unlink()
    _refused(
        tmp_path,
        tmp_path / "new",
        capsys,
        f"checkpoint.load: {run / 'iter_0000002'} has no metadata.json",
        extra=(f"checkpoint.load={run / 'iter_0000002'}",),
    )


def test_checkpoints_without_latest_are_not_overwritten(tmp_path, capsys):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    _fake_checkpoint(save, 4)
    _refused(
        tmp_path,
        save,
        capsys,
        f"checkpoint.save: {save} holds checkpoints (iter_0000002, iter_0000004) but no {LATEST}",
        "nothing was changed",
        f"`echo 4 > {save / LATEST}` (or set checkpoint.load={save / 'iter_0000004'})",
        "point checkpoint.save at a new folder to start afresh",
    )
    # ... also when checkpoint.load resumes from elsewhere (the saves would land on them)
    other = tmp_path / "other"
    _fake_checkpoint(other, 2)
    (other / LATEST).write_text("2\n")
    _refused(tmp_path, save, capsys, f"{save} holds checkpoints", extra=(f"checkpoint.load={other}",))
    # resuming from one of them is the way out
    cfg = load_config(RECIPE, [*_overrides(tmp_path, save), f"checkpoint.load={save / 'iter_0000004'}"])
    assert checkpoint_problems(cfg) == []


def test_read_only_checkpoint_folder(tmp_path, capsys, monkeypatch):
    save = tmp_path / "run"
    save.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: simulate what access(2) reports to other users
        real = os.access
        monkeypatch.setattr(
            checkpoints.os, "access", lambda p, mode: False if Path(p) == save else real(p, mode)
        )
    else:
        save.chmod(0o555)
    try:
        _refused(
            tmp_path,
            save,
            capsys,
            f"checkpoint.save: {save} is not writable",
            f"chmod u+w {save}) or point checkpoint.save at a writable folder",
        )
        _refused(tmp_path, save / "sub", capsys, f"cannot create {save / 'sub'}: {save} is not writable")
    finally:
        save.chmod(0o755)


def test_save_points_at_a_file(tmp_path, capsys):
    target = tmp_path / "run.txt"
    target.write_text("keep me\n")
    _refused(
        tmp_path,
        target,
        capsys,
        f"checkpoint.save: {target} is a file, not a folder; point checkpoint.save at a folder",
    )
    _refused(tmp_path, target / "sub", capsys, f"cannot create {target / 'sub'}: {target} is a file")
    assert target.read_text() == "keep me\n"


def test_checkpoint_of_another_model(tmp_path, capsys):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    (save / LATEST).write_text("2\n")
    _saved_config(save, hidden_size=128, num_layers=4)
    _refused(
        tmp_path,
        save,
        capsys,
        f"checkpoint.save: {save / 'iter_0000002'} holds another model than the recipe's",
        "model.hidden_size: recipe 64, checkpoint 128",
        "model.num_layers: recipe 2, checkpoint 4",
        f"the checkpoint's values from {save / 'config.yaml'}",
        "resume with the checkpoint's model.* values, or point checkpoint.save at a new folder",
    )


def test_parallel_sizes_may_change_on_resume(tmp_path):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    (save / LATEST).write_text("2\n")
    _saved_config(save, tensor_model_parallel_size=2, context_parallel_size=2, num_query_groups=None)
    cfg = load_config(RECIPE, _overrides(tmp_path, save, "model.num_query_groups=4"))
    assert checkpoint_problems(cfg) == []  # layout changed; unset groups == heads == 4


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def _write_lock(save: Path, host: str, pid: int) -> Path:
    save.mkdir(parents=True, exist_ok=True)
    lock = save / LOCK
    lock.write_text(json.dumps({"host": host, "pid": pid, "start": None, "since": "2025-01-01 00:00:00"}))
    return lock


def test_live_lock_refuses_a_second_run(tmp_path, capsys):
    save = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = _write_lock(save, socket.gethostname(), owner.pid)
        expected = (
            f"checkpoint.save: {save} is in use by another run (host {socket.gethostname()}, pid {owner.pid}",
            "point checkpoint.save at another folder",
            f"delete {lock}",
        )
        _refused(tmp_path, save, capsys, *expected)
        refusal, _ = ckpt._take_lock(lock)  # at process-group start (two runs starting together)
        assert refusal is not None and expected[0] in refusal
        assert json.loads(lock.read_text())["pid"] == owner.pid
    finally:
        owner.kill()
        owner.wait()
    lock = _write_lock(save, "another-node", os.getpid())  # its liveness cannot be checked from here
    _refused(tmp_path, save, capsys, "(host another-node, pid")


def test_stale_lock_is_taken_over_and_released(tmp_path):
    save = tmp_path / "run"
    lock = _write_lock(save, socket.gethostname(), _dead_pid())
    cfg = load_config(RECIPE, _overrides(tmp_path, save))
    assert checkpoint_problems(cfg) == []
    refusal, note = ckpt._take_lock(lock)
    assert refusal is None and f"took over the stale lock {lock}" in note
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert ckpt._take_lock(lock) == (None, None)  # re-entrant in the owning process
    ckpt.release_run_locks()
    assert not lock.exists()


def _run_cli(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "solopo_megatron.train", "--config", RECIPE, *_small(tmp), *extra],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _small(tmp: Path) -> list[str]:
    return [
        "model.context_parallel_size=1",
        "train.eval_interval=null",
        "train.log_interval=1",
        "dataset.synthetic.num_train=32",
        "dataset.synthetic.num_valid=8",
        f"dataset.cache_dir={tmp / 'cache'}",
    ]


def _logged_lr(metrics: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {e["step"]: e["train"]["lr"] for e in entries if "train" in e}


def test_logged_lr_is_the_rate_the_update_used(tmp_path):
    """OptimizerParamScheduler: the update of step k uses lr(k - 1) = lr * (k - 1) / warmup during
    the warmup, so the first update has lr 0 and lr is reached at step warmup + 1."""
    lr, metrics = 3.0e-3, tmp_path / "warmup.jsonl"
    done = _run_cli(
        tmp_path,
        "train.train_iters=4",
        "scheduler.lr_warmup_iters=2",
        "scheduler.lr_decay_style=constant",
        f"optimizer.lr={lr}",
        f"logger.metrics_file={metrics}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "warmup: the first update uses lr 0 (Megatron's convention), lr reaches optimizer.lr at step 3"
        in done.stdout
    )
    assert _logged_lr(metrics) == pytest.approx({1: 0.0, 2: lr / 2, 3: lr, 4: lr})
    assert "step 1/4:" in done.stdout and " lr 0 " in done.stdout.split("step 1/4:")[1].split("\n")[0]

    metrics = tmp_path / "no-warmup.jsonl"
    done = _run_cli(
        tmp_path,
        "train.train_iters=1",
        "scheduler.lr_warmup_iters=0",
        f"optimizer.lr={lr}",
        f"logger.metrics_file={metrics}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warmup:" not in done.stdout
    assert _logged_lr(metrics) == pytest.approx({1: lr})


def test_sigint_ends_the_run_with_one_line(tmp_path):
    save = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    command = [
        sys.executable,
        "-m",
        "solopo_megatron.train",
        "--config",
        RECIPE,
        *_small(tmp_path),
        "train.train_iters=200",
        f"checkpoint.save={save}",
        "checkpoint.save_interval=1",
    ]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        try:
            deadline = time.time() + 600
            while "saved checkpoint" not in out.read_text():
                assert process.poll() is None and time.time() < deadline, err.read_text()[-3000:]
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
    errors = err.read_text()
    assert code == 130, errors[-3000:]
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors[-3000:]
    lines = [line for line in errors.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, errors[-3000:]
    steps, _, named = lines[0].removeprefix("interrupted at step ").partition("; last checkpoint ")
    latest = int((save / LATEST).read_text())
    # The interrupt may land in a save: then the line names the one before (latest may be either).
    assert named in (str(save / f"iter_{step:07d}") for step in (latest, latest - 1)), lines[0]
    assert checkpoints.damage(Path(named)) is None and int(steps) in (latest, latest + 1), lines[0]
    done = int(steps)
    assert f"step {done}/200:" in out.read_text()
    assert not list(save.glob("iter_*.tmp"))  # an interrupted save is cleaned at once
    assert not (save / LOCK).exists()  # the lock is released


def test_lock_of_this_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued SLURM job restarts (maybe on another node) under the same job id: its own lock is stale."""
    save = tmp_path / "run"
    lock = _write_lock(save, "node-that-died", 4242)
    owner = json.loads(lock.read_text())
    assert not checkpoints.is_stale(owner, lock)  # another host: cannot be judged
    lock.write_text(json.dumps({**owner, "job": "777"}))
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert checkpoints.is_stale(json.loads(lock.read_text()), lock)
    monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job: still refused
    assert not checkpoints.is_stale(json.loads(lock.read_text()), lock)


def test_unreadable_or_broken_lock(tmp_path):
    """A lock cut while written (unreadable) is stale once it is a minute old; a pid <= 0 is never a live owner."""
    save = tmp_path / "run"
    save.mkdir()
    lock = save / LOCK
    lock.write_text("")
    assert not checkpoints.is_stale({}, lock)  # just written, maybe still being written
    old = time.time() - 2 * checkpoints.UNREADABLE_LOCK_GRACE_S
    os.utime(lock, (old, old))
    assert checkpoints.is_stale({}, lock)
    assert checkpoints.is_stale({"host": socket.gethostname(), "pid": 0}, lock)


def test_lock_is_written_whole_or_not_at_all(tmp_path):
    """The owner's record is complete the moment the lock exists (written aside, then linked)."""
    lock = tmp_path / "run" / LOCK
    refusal, _ = ckpt._take_lock(lock)
    try:
        assert refusal is None and json.loads(lock.read_text())["pid"] == os.getpid()
        assert [p.name for p in lock.parent.iterdir()] == [LOCK]  # no temporary record left
    finally:
        ckpt.release_run_locks()


def test_only_rank_zero_judges_the_lock_before_launch(tmp_path):
    """A lock on another node cannot be judged from the other ranks: they leave it to rank 0."""
    save = tmp_path / "run"
    _write_lock(save, "another-node", 4242)
    cfg = load_config(RECIPE, _overrides(tmp_path, save))
    from solopo_megatron.recipe.validation import path_problems

    assert any("is in use by another run" in p for p in path_problems(cfg))
    assert not any("is in use" in p for p in path_problems(cfg, check_run_state=False))


def test_sigterm_is_handled_like_sigint():
    """A scheduler's SIGTERM (time limit, preemption) ends the run the same clean way (lock released)."""
    from solopo_megatron.megatron.trainer import sigint_handling, sigint_received

    with pytest.raises(KeyboardInterrupt), sigint_handling():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert sigint_received()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_dry_run_reports_a_bad_checkpoint_folder(tmp_path, capsys):
    save = tmp_path / "run"
    _fake_checkpoint(save, 2)
    (save / LATEST).write_text("garbage\n")
    code = main(["--dry-run", "--config", RECIPE, *_overrides(tmp_path, save)])
    assert code == 2 and "latest_checkpointed_iteration.txt is corrupt" in capsys.readouterr().err


def test_ref_logps_writes_from_the_initial_weights_never_into_the_checkpoint(tmp_path):
    """solopo-ref-logps next to a run's checkpoints neither resumes them nor touches the run's store copy:
    it writes the default store from the initial weights, equal to the copy the run started with."""
    from solopo_megatron.data.reference_store import load_reference_store
    from solopo_megatron.recipe.sources import REFERENCE_COPY

    save = tmp_path / "run"
    done = _run_cli(tmp_path, "train.train_iters=2", "scheduler.lr_warmup_iters=0", f"checkpoint.save={save}")
    assert done.returncode == 0, done.stderr[-3000:]
    copy = (save / REFERENCE_COPY).read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        ["solopo-ref-logps", "--config", RECIPE, *_small(tmp_path), f"checkpoint.save={save}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (save / REFERENCE_COPY).read_bytes() == copy and not (save / LOCK).exists()
    written = list((tmp_path / "cache" / "reference").glob("*.jsonl"))
    assert len(written) == 1 and f"to {written[0]}" in done.stdout
    fresh, original = load_reference_store(written[0]), load_reference_store(save / REFERENCE_COPY)
    assert fresh.values.keys() == original.values.keys()
    for example_id, sums in original.values.items():
        assert fresh.values[example_id] == pytest.approx(sums, rel=1e-5)


def test_default_store_is_keyed_by_the_initial_weights(tmp_path):
    from solopo_megatron.recipe.sources import default_reference_store_path

    def path(*overrides):
        return default_reference_store_path(
            load_config(RECIPE, [f"dataset.cache_dir={tmp_path}", *overrides]), "fp"
        )

    assert path() == path("model.context_parallel_size=1", "model.recompute_granularity=full")  # layout only
    assert path() != path("model.hidden_size=128", "model.ffn_hidden_size=256")
    assert path() != path("rng.seed=7")


def test_sigint_under_torchrun_with_context_parallelism(tmp_path):
    """Ctrl-C to a torchrun job (every worker gets SIGINT; a peer may see the other's exit as a
    collective error): one line from the logging rank, no traceback from our workers, lock released."""
    save = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "solopo_megatron.train", "--config", RECIPE, *_small(tmp_path),
               "model.context_parallel_size=2", "train.train_iters=200", f"checkpoint.save={save}"]  # fmt: skip
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
                                   start_new_session=True)  # fmt: skip
        try:
            deadline = time.time() + 600
            while "step 2/200" not in out.read_text():
                assert process.poll() is None and time.time() < deadline, err.read_text()[-3000:]
                time.sleep(0.1)
            os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    errors = err.read_text()
    assert code != 0
    assert len([line for line in errors.splitlines() if line.startswith("interrupted at step ")]) == 1, errors
    assert "KeyboardInterrupt" not in errors, errors[-3000:]
    # torchrun's agent reports its own SignalException; nothing else raises.
    if "Traceback" in errors:
        tail = errors[-3000:]
        assert errors.count("Traceback") == 1 and "SignalException" in errors.split("Traceback")[1], tail
    assert not (save / LOCK).exists()
