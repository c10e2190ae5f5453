"""Nothing lost, nothing cryptic in the training loop: a diverging run stops with one line naming what was
not finite and the checkpoint to go back to, saving nothing while steps are skipped; a resumed run says
what its checkpoint was trained with, and refuses other training roles; an error is printed once per
torchrun job, and torchrun's failure summary shows it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from solopo_megatron.megatron import parallel, trainer
from solopo_megatron.recipe.checkpoints import LATEST, LOCK
from solopo_megatron.recipe.loading import load_config
from solopo_megatron.train import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes/tiny-cpu.yaml")


def _small(tmp: Path, *extra: str) -> list[str]:
    """The tiny recipe without CP (one process), 32 examples, no warmup and no evaluation."""
    return [
        "--config",
        RECIPE,
        "model.context_parallel_size=1",
        "train.eval_interval=null",
        "train.log_interval=1",
        "scheduler.lr_warmup_iters=0",
        "scheduler.lr_decay_style=constant",
        "dataset.synthetic.num_train=32",
        "dataset.synthetic.num_valid=8",
        f"dataset.cache_dir={tmp / 'cache'}",
        *extra,
    ]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _torchrun(tmp: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "solopo_megatron.train", *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e30 under torchrun with pp 2: step 1's update wrecks the weights, steps 2 and 3 have a nan loss.
    One line, from the logging rank (the last stage, rank 1); rank 0, which holds the run lock, releases
    it and stops silently. The saves due after the skipped steps are not made, so keep_last=1 still holds
    step 1's checkpoint, which the line names; the metrics of every step run are written."""
    save, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    done = _torchrun(
        tmp_path,
        2,
        *_small(
            tmp_path,
            "model.pipeline_model_parallel_size=2",
            "optimizer.lr=1e30",
            "train.train_iters=8",
            "train.max_skipped_steps_in_a_row=2",
            f"checkpoint.save={save}",
            "checkpoint.save_interval=1",
            "checkpoint.keep_last=1",
            f"logger.metrics_file={metrics}",
        ),
    )
    assert done.returncode != 0
    line = (
        "error: training diverged: steps 2-3 had non-finite values (2 in a row, limit "
        "train.max_skipped_steps_in_a_row=2), their updates skipped and not saved; step 3: loss nan. Lower "
        "optimizer.lr (now 1e+30) and start afresh in a new checkpoint.save folder (the last checkpoint, "
        f"{save / 'iter_0000001'}, keeps its learning-rate schedule)"
    )
    assert _error_lines(done.stderr) == [line], done.stderr[-4000:]
    root_cause = done.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and f"traceback : {line}" in root_cause
    assert done.stderr.count("Traceback") == 1  # torchrun's own (its launcher's ChildFailedError)
    out = done.stdout
    assert "step 2: loss nan; update skipped (1 in a row, limit train.max_skipped_steps_in_a_row=2)" in out
    kept = f"the last checkpoint stays {save / 'iter_0000001'}"
    assert f"step 2: checkpoint not saved, the step's update was skipped (non-finite values); {kept}" in out
    assert (save / LATEST).read_text().strip() == "1"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]
    assert not (save / LOCK).exists()
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(e["step"], e["train"]["skipped"]) for e in logged] == [(1, 0.0), (2, 1.0), (3, 1.0)]


def test_non_finite_gradients_name_the_first_parameter(tmp_path, capsys, monkeypatch):
    """A finite loss with a non-finite gradient (injected after the backward) names the parameter."""
    target = "decoder.layers.1.mlp.linear_fc2.weight"
    run = trainer.Trainer.run

    def poisoned(self, mbs, *, forward_only, ctx=None):
        reports = run(self, mbs, forward_only=forward_only, ctx=ctx)
        if not forward_only and self.steps_done >= 1:  # after step 2's backward and reduction
            params = dict(self.chunks[0].module.named_parameters())
            params[target].main_grad.view(-1)[3] = math.inf
        return reports

    monkeypatch.setattr(trainer.Trainer, "run", poisoned)
    code = main(
        _small(
            tmp_path,
            "solopo.preference_loss=simpo",
            "train.train_iters=5",
            "train.max_skipped_steps_in_a_row=2",
        )
    )
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    assert f"step 2: non-finite gradients, first in {target} (loss " in out
    [line] = _error_lines(err)
    assert f"step 3: non-finite gradients, first in {target} (loss " in line, line
    loss = float(line.split("(loss ")[1].split(")")[0])
    assert math.isfinite(loss)
    assert line.endswith("and train again (no checkpoints: checkpoint.save is unset)"), line


def test_step_check_describes_what_was_not_finite():
    assert trainer.StepCheck(False, False).describe(math.nan) == "loss nan"
    assert trainer.StepCheck(True, False).describe(0.5) == "non-finite gradients (loss 0.5)"
    assert not trainer.StepCheck(True, False).finite and trainer.StepCheck(True, True).finite


# ----------------------------------------------------------------------------- printed once


def test_an_error_is_printed_once_and_given_to_torchrun(tmp_path, capsys, monkeypatch):
    """The reporting rank prints and writes torchrun's error file, which torch's own parser reads into
    the failure summary (instead of its link). Another rank waits to be stopped; if it is not (the
    reporting rank is slower, or the error is its own), it writes its error file, or prints without torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    parallel.report_error("training diverged: a\n  - b", here=True)
    assert capsys.readouterr().err == "error: training diverged: a\n  - b\n"

    def summary() -> str:
        return str(ChildFailedError("solopo", {0: ProcessFailure(0, 1, 2, str(error_file))}))

    assert "traceback : error: training diverged: a\n    - b" in summary(), summary()
    assert "To enable traceback" not in summary()

    error_file.unlink()
    monkeypatch.setattr(parallel, "PEERS_EXIT_GRACE_S", 0.2)

    def own_handler(signum, frame):
        raise AssertionError("not reached")

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        parallel.report_error("late", here=False)  # not stopped within the grace: into the summary
        assert signal.getsignal(signal.SIGTERM) is own_handler  # restored after the wait
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "" and "traceback : error: late" in summary()

    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    parallel.report_error("no torchrun", here=False)  # no summary would show it: printed
    assert capsys.readouterr().err == "error: no torchrun\n"
    monkeypatch.setenv("WORLD_SIZE", "1")
    parallel.report_error("quiet", here=False)  # a lone process that is not to report: no wait, no line
    assert capsys.readouterr().err == ""


def test_layout_error_under_torchrun_is_printed_once(tmp_path):
    """cp 2 does not divide a world of 3: one line from rank 0 (the others stop silently), and torchrun's
    summary names it as the root cause. torchrun's own traceback (of its launcher process) remains."""
    done = _torchrun(tmp_path, 3, "--config", RECIPE, f"dataset.cache_dir={tmp_path / 'cache'}")
    assert done.returncode != 0
    errors = _error_lines(done.stderr)
    assert errors == ["error: invalid recipe:"], done.stderr[-4000:]
    root_cause = done.stderr.split("Root Cause (first observed failure):")[1]
    assert (
        "traceback : error: invalid recipe:" in root_cause
        and "does not divide the world size 3" in root_cause
    )
    assert "To enable traceback" not in done.stderr, done.stderr[-4000:]


# ----------------------------------------------------------------------------- resume messages


def _run_folder(tmp: Path, **solopo) -> Path:
    """A checkpoint path whose run folder records ``solopo`` in its config.yaml (what setup writes)."""
    root = tmp / "run"
    root.mkdir()
    cfg = load_config(
        RECIPE, [f"solopo.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in solopo.items()]
    )
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(cfg), root / "config.yaml")
    return root / "iter_0000002"


def test_another_mode_is_refused_naming_the_roles(tmp_path):
    from solopo_megatron.recipe.checkpoints import objective_change

    checkpoint = _run_folder(tmp_path, mode="solopo")
    refusal, warning = objective_change(load_config(RECIPE, ["solopo.mode=short_po"]), checkpoint)
    assert warning is None
    assert refusal == (
        f"solopo.mode: {checkpoint} was trained with solopo.mode=solopo (roles short_chosen, short_rejected, "
        f"long_chosen; from {checkpoint.parent / 'config.yaml'}), this recipe has solopo.mode=short_po (roles "
        "short_chosen, short_rejected), and a run cannot change the roles it trains on: resume with "
        "solopo.mode=solopo, or train short_po in a new checkpoint.save folder (from these weights: "
        "solopo-export, then checkpoint.pretrained_hf)"
    )
    refusal, _ = objective_change(load_config(RECIPE, ["solopo.solo_ra_chosen_only=false"]), checkpoint)
    assert refusal is not None and refusal.startswith("solopo.solo_ra_chosen_only: ")
    assert (
        "solopo.mode=solopo, solopo.solo_ra_chosen_only=true (roles short_chosen, short_rejected, long_chosen;"
        in refusal
    )
    assert "(roles short_chosen, short_rejected, long_chosen, long_rejected)" in refusal


def test_another_loss_is_a_warning(tmp_path):
    from solopo_megatron.recipe.checkpoints import objective_change

    checkpoint = _run_folder(tmp_path, preference_loss="dpo", beta=0.1)
    cfg = load_config(RECIPE, ["solopo.preference_loss=simpo", "solopo.beta=2.0"])
    assert objective_change(cfg, checkpoint) == (
        None,
        f"warning: {checkpoint} was trained with solopo.preference_loss=dpo, solopo.beta=0.1 (from "
        f"{checkpoint.parent / 'config.yaml'}); this run continues it with solopo.preference_loss=simpo, "
        "solopo.beta=2.0",
    )
    assert objective_change(load_config(RECIPE), checkpoint) == (None, None)
    (checkpoint.parent / "config.yaml").unlink()  # not a solopo-train run folder: nothing to compare
    assert objective_change(cfg, checkpoint) == (None, None)


def test_resume_with_another_loss_warns_and_another_mode_is_refused(tmp_path, capsys):
    """Real runs: simpo for one step, resumed with orpo (a warning line, training goes on), then with
    short_po (refused before training, nothing in the run folder changed, its config.yaml included)."""
    save = tmp_path / "run"
    common = (f"checkpoint.save={save}",)
    assert main(_small(tmp_path, *common, "solopo.preference_loss=simpo", "train.train_iters=1")) == 0
    capsys.readouterr()
    assert main(_small(tmp_path, *common, "solopo.preference_loss=orpo", "train.train_iters=2")) == 0
    out, _ = capsys.readouterr()
    assert (
        f"warning: {save / 'iter_0000001'} was trained with solopo.preference_loss=simpo (from "
        f"{save / 'config.yaml'}); this run continues it with solopo.preference_loss=orpo"
    ) in out
    assert "step 2/2:" in out
    before = {p: p.read_bytes() for p in save.rglob("*") if p.is_file()}
    code = main(
        _small(
            tmp_path, *common, "solopo.preference_loss=orpo", "solopo.mode=short_po", "train.train_iters=3"
        )
    )
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    # Refused before launch (recipe.checkpoints), not as "other data" by the reference store's check.
    assert err.startswith(
        f"error: invalid recipe:\n  - solopo.mode: {save / 'iter_0000002'} was trained with solopo.mode=solopo"
    ), err
    assert "other data" not in err, err
    assert {p: p.read_bytes() for p in save.rglob("*") if p.is_file()} == before


def test_a_missing_store_is_not_computed_from_weights_that_are_not_the_initial_ones(tmp_path):
    """A run that started from pretrained_hf, resumed with dpo: the model holds the random init until the
    checkpoint loads, so the store must come from solopo-ref-logps, not from these weights."""
    from types import SimpleNamespace

    from solopo_megatron.megatron import reference
    from solopo_megatron.recipe.errors import RecipeError

    cfg = load_config(RECIPE, [f"solopo.reference_store={tmp_path / 'ref.jsonl'}"])
    data = SimpleNamespace(train=SimpleNamespace(fingerprint="a"), valid=None)
    with pytest.raises(RecipeError, match="solopo-ref-logps and this recipe"):
        reference.ensure_reference_store(cfg, None, [], data, print, weights_are_initial=False)
    assert not (tmp_path / "ref.jsonl").exists()
