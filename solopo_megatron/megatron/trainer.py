"""The training loop: a thin driver around ``megatron.core.pipeline_parallel.get_forward_backward_func()``.

Per step: the global batch's groups are planned into this DP rank's packed microbatches, sharded
for its CP rank, run through Megatron's schedule (PP included) with the SoLoPO loss closure, then
Megatron's DDP gradient reduction (``finalize_model_grads``: sum over DP x CP, divide by the global
example count), its optimizer and its learning-rate scheduler.

``setup(cfg)`` builds a ``Trainer`` (process groups, data, model, optimizer, reference store, resume);
``train(trainer)`` runs the loop. On a machine without CUDA, call both inside ``cpu_compat.enabled()``.
Inside ``sigint_handling()``, SIGINT ends the loop with ``Interrupted`` (one line for the user).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.loading import GlobalBatchSampler
from ..data.records import ROLES
from ..data.reference_store import ReferenceStore
from ..data.tokenize import load_tokenizer
from ..recipe.checkpoints import objective_change
from ..recipe.errors import RecipeError
from ..recipe.hf_config import HF_CONFIG_COPY, HF_GENERATION_CONFIG_COPY, TOKENIZER_COPY
from ..recipe.loading import to_dict
from ..recipe.schema import RecipeConfig
from ..recipe.sizing import padded_vocab_size
from ..recipe.validation import validate_recipe
from .build import ModelAndOptimizer, build_model_and_optimizer
from .checkpoint import (
    clean_partial_saves,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    take_run_lock,
)
from .inputs import Data, prepare_data, step_batches
from .long_eval import (
    EVAL_REFERENCE_COPY,
    LengthSet,
    ensure_eval_reference,
    evaluate_long_contexts,
    format_long_metrics,
    prepare_long_eval,
)
from .metric_writers import MetricWriters
from .metrics import (
    EVAL_KEYS,
    TRAIN_KEYS,
    Throughput,
    format_clock,
    format_metrics,
    peak_memory_gib,
    peak_tflops,
    reduce_reports,
    reward_check_message,
    step_work,
)
from .parallel import ParallelState, init_parallel_state, init_process_group
from .reference import ensure_reference_store, keep_reference_with_checkpoints
from .step import StepContext, run_schedule


@dataclass(frozen=True)
class StepCheck:
    """Whether a step's loss and reduced gradients were finite on every rank; ``culprit``: the first
    parameter (in rank order) whose gradient was not, when the loss was finite."""

    loss_finite: bool
    grads_finite: bool
    culprit: str | None = None

    @property
    def finite(self) -> bool:
        return self.loss_finite and self.grads_finite

    def describe(self, loss: float) -> str:
        """What was not finite, for a log line: ``loss nan``, or the gradients (and where) with the loss."""
        if not self.loss_finite:
            return f"loss {loss:.4g}"
        where = f", first in {self.culprit}" if self.culprit else ""
        return f"non-finite gradients{where} (loss {loss:.4g})"


class TrainingDiverged(RecipeError):
    """``train.max_skipped_steps_in_a_row`` steps in a row had a non-finite loss or gradients. Raised on
    every rank; ``report`` (the logging rank, which holds the loss) is where the entry point prints it."""

    def __init__(self, message: str, *, report: bool) -> None:
        super().__init__(message)
        self.report = report


def _first_non_finite_grad(chunks: list, parallel: ParallelState) -> str | None:
    """This rank's first parameter whose (reduced) gradient is not finite, with its pipeline stage."""
    for chunk in chunks:
        for name, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)  # Megatron DDP: a view into the grad buffer
            if grad is None:
                grad = param.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return name + (f" (pipeline stage {parallel.pp_rank})" if parallel.pp > 1 else "")
    return None


@dataclass
class Trainer:
    """One rank's training run: recipe, parallel state, data, model/optimizer/scheduler, step context."""

    cfg: RecipeConfig
    parallel: ParallelState
    data: Data
    state: ModelAndOptimizer
    ctx: StepContext
    store: ReferenceStore | None = None
    start_step: int = 0  # steps already done (from a checkpoint)
    history: list[dict] = field(default_factory=list)
    log: Callable[[str], None] = print
    steps_done: int = 0  # optimizer steps completed so far (start_step included)
    last_checkpoint: Path | None = None  # the newest complete checkpoint (resumed from or saved)
    long_eval: list[LengthSet] = field(default_factory=list)  # eval.long_lengths' held-out sets
    last_eval_records: list[dict] = field(default_factory=list)  # the last evaluation's per-record rows
    eval_store: ReferenceStore | None = None  # their reference sums (DPO)
    last_check: StepCheck | None = None  # the last training step's finiteness check

    @property
    def chunks(self) -> list:
        """This rank's DDP-wrapped model chunks."""
        return self.state.chunks

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.data.vocab_size, self.cfg.model)

    def run(self, mbs: list, *, forward_only: bool, ctx: StepContext | None = None) -> list[dict]:
        """Megatron's schedule over ``mbs``; the loss closure's reports (last pipeline stage only)."""
        return run_schedule(
            ctx or self.ctx, self.chunks, mbs, seq_length=self.data.max_tokens, forward_only=forward_only
        )

    def train_step(self, step: int, sampler: GlobalBatchSampler) -> dict[str, float]:
        """One optimizer step on global batch ``step``; a non-finite loss or gradient skips the update."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.state.optimizer.zero_grad()
        mbs = step_batches(
            self.data, self.data.train, sampler.batch(step), self.data.roles, self.parallel, self.store
        )
        reports = self.run(mbs, forward_only=False)
        check = self.last_check = self._check_step(reports)
        lr = self.state.optimizer.param_groups[0]["lr"]  # this update's rate; scheduler.step sets the next
        if check.finite:
            _, grad_norm, _ = self.state.optimizer.step()
        else:  # never apply a non-finite update: the step is skipped and reported
            grad_norm = math.nan
        self.state.scheduler.step(increment=1)
        metrics = reduce_reports(reports, self.parallel)
        metrics["skipped"] = 0.0 if check.finite else 1.0
        metrics.update(
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            lr=lr,
            microbatches=len(mbs),
            **step_work(mbs, self.cfg.model, self.padded_vocab, self.parallel),
        )
        return metrics

    def _check_step(self, reports: list[dict]) -> StepCheck:
        """Loss (last stage) and all reduced gradients finite on every rank: two flags, one all-reduce
        over the world. Only when the gradients alone are not finite, a second collective (a rare, bad
        step) names the first parameter whose gradient is not."""
        bad = torch.zeros(2, dtype=torch.float32, device=self.parallel.device)  # [loss, gradients]
        for report in reports:
            if "loss" in report:
                bad[0] = torch.maximum(bad[0], (~torch.isfinite(report["loss"])).any().float())
        for chunk in self.chunks:
            for buffer in chunk.buffers:
                bad[1] = torch.maximum(bad[1], (~torch.isfinite(buffer.grad_data)).any().float())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        loss_bad, grads_bad = (bool(flag) for flag in bad.tolist())
        culprit = None
        if grads_bad and not loss_bad:  # with a non-finite loss every gradient is: no one to name
            names: list[str | None] = [None] * self.parallel.world_size
            dist.all_gather_object(names, _first_non_finite_grad(self.chunks, self.parallel))
            culprit = next((name for name in names if name is not None), None)
        return StepCheck(loss_finite=not loss_bad, grads_finite=not grads_bad, culprit=culprit)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics over (the first ``train.eval_iters`` batches of) the validation set, every role."""
        data = self.data
        if data.valid is None:
            return {}
        batch = self.cfg.train.global_batch_size
        limit = len(data.valid)
        if self.cfg.train.eval_iters:
            limit = min(limit, self.cfg.train.eval_iters * batch)
        reports = []
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            for start in range(0, limit, batch):
                indices = list(range(start, min(start + batch, limit)))
                mbs = step_batches(data, data.valid, indices, ROLES, self.parallel, self.store)
                reports.extend(self.run(mbs, forward_only=True))
        for chunk in self.chunks:
            chunk.train()
        result = reduce_reports(reports, self.parallel)
        self.last_eval_records = []
        if self.long_eval:
            result.update(
                evaluate_long_contexts(
                    self.ctx,
                    self.chunks,
                    data,
                    self.long_eval,
                    self.eval_store,
                    batch_size=batch,
                    records=self.last_eval_records,
                    log=self.log,
                )  # fmt: skip
            )
        return result

    def write_eval_records(self, step: int) -> None:
        """Appends the last evaluation's per-record rows, tagged with ``step``, to
        ``logger.eval_records_file`` (logging rank; nothing when unset)."""
        path = self.cfg.logger.eval_records_file
        if not path or not self.parallel.is_logging_rank:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # its folder was checked before launch
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"step": step, **row}) + "\n" for row in self.last_eval_records)

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """The evaluation's console lines: the validation set's metrics, then each long-context length's."""
        self.log(f"eval step {step}: {format_metrics(result, EVAL_KEYS)}")
        if self.long_eval and result:
            self.log(f"eval step {step} long contexts: {format_long_metrics(result, self.long_eval)}")

    def save(self, step: int) -> Path:
        """A checkpoint after ``step`` under ``checkpoint.save``, with the reference store kept beside it."""
        c = self.cfg.checkpoint
        path = self.last_checkpoint = save_checkpoint(
            c.save,
            step,
            self.state,
            self.parallel,
            distributed_optimizer=self.cfg.optimizer.use_distributed_optimizer,
            keep_last=c.keep_last,
            vocab_size=self.data.vocab_size,
        )
        if self.parallel.rank == 0:
            keep_reference_with_checkpoints(self.store, c.save)
            keep_reference_with_checkpoints(self.eval_store, c.save, EVAL_REFERENCE_COPY)
        return path

    def interrupted(self) -> Interrupted:
        """The ``Interrupted`` to raise after SIGINT: how far the run got and what can be resumed."""
        saved = f"last checkpoint {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint saved"
        return Interrupted(
            f"interrupted at step {self.steps_done}; {saved}", report=self.parallel.is_logging_rank
        )


class Interrupted(KeyboardInterrupt):
    """SIGINT ended the run: ``message`` is the one line for the user, printed where ``report`` (the
    logging rank; under torchrun every worker is interrupted)."""

    def __init__(self, message: str, *, report: bool) -> None:
        super().__init__(message)
        self.message = message
        self.report = report


_SIGINT_RECEIVED = threading.Event()


def _on_sigint(signum, frame) -> None:
    if _SIGINT_RECEIVED.is_set():
        return  # torchrun forwards Ctrl-C once more: ignore repeats while the run cleans up
    _SIGINT_RECEIVED.set()
    raise KeyboardInterrupt


def sigint_received() -> bool:
    """Whether SIGINT arrived inside ``sigint_handling()`` (an error after it is its consequence)."""
    return _SIGINT_RECEIVED.is_set()


@contextmanager
def sigint_handling() -> Iterator[None]:
    """The first SIGINT or SIGTERM (a scheduler's time limit or preemption) raises KeyboardInterrupt,
    later ones are ignored (so the clean-up, which releases the run lock, is not interrupted in turn);
    the previous handlers are restored on exit. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGINT_RECEIVED.clear()
    previous = {sig: signal.signal(sig, _on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- set-up


def setup(
    cfg: RecipeConfig,
    *,
    init_state: dict | None = None,
    log: Callable[[str], None] | None = None,
    reference_pass: bool = False,
    evaluation: bool = False,
) -> Trainer:
    """Process groups, data, model, optimizer and scheduler, reference store and resume from the latest
    checkpoint; initial weights from ``init_state`` (a full state dict) if given.

    ``reference_pass`` (solopo-ref-logps): the initial weights only, for writing the reference store:
    no checkpoint is resumed, no run lock taken, nothing written into ``checkpoint.save``.
    ``evaluation`` (solopo-train --eval-only): the latest checkpoint is loaded, but no run lock is taken
    and nothing is written into ``checkpoint.save``."""
    init_process_group()
    # Also for direct API callers. The reference store is checked where it is loaded (its fingerprint
    # comes from the tokenised data then), so the data files are not hashed a second time here.
    validate_recipe(cfg, dist.get_world_size(), check_paths=False, check_reference=False)
    printer = log or (lambda text: print(text, flush=True))
    writes_run_folder = bool(cfg.checkpoint.save) and not (reference_pass or evaluation)
    if writes_run_folder:
        dist.barrier()  # every rank has checked the folder before rank 0 writes the lock into it
        take_run_lock(cfg.checkpoint.save, dist.get_rank(), printer)
    parallel = init_parallel_state(cfg.model, cfg.rng.seed)
    resume_from = None if reference_pass else _resume_path(cfg, parallel, clean=not evaluation)
    objective_warning = None
    if resume_from is not None and not evaluation:  # an evaluation may score any objective
        refusal, objective_warning = objective_change(cfg, resume_from)  # before the data is prepared
        if refusal is not None:
            raise RecipeError(refusal)
    data = prepare_data(cfg, parallel, training=not (reference_pass or evaluation))
    pretrained = cfg.checkpoint.pretrained_hf if resume_from is None else None  # a checkpoint replaces it
    state = build_model_and_optimizer(
        cfg, parallel, data.vocab_size, data.max_tokens, init_state=init_state, pretrained_hf=pretrained
    )
    ctx = StepContext(
        cfg.solopo.loss_config(),
        parallel,
        inplace_logits_backward=cfg.solopo.inplace_logits_backward,
        response_only=cfg.model.logits == "response_only",
        vocab_size=data.vocab_size,
    )
    trainer = Trainer(
        cfg, parallel, data, state, ctx, log=printer if parallel.is_logging_rank else (lambda text: None)
    )
    if not reference_pass:
        trainer.store = ensure_reference_store(
            cfg, ctx, state.chunks, data, trainer.log,
            weights_are_initial=pretrained == cfg.checkpoint.pretrained_hf,
        )  # fmt: skip
        # Before a checkpoint is loaded: DPO's evaluation rewards need the initial weights' sums.
        trainer.long_eval = prepare_long_eval(cfg, parallel.rank, data)
        trainer.eval_store = ensure_eval_reference(
            cfg, ctx, state.chunks, data, trainer.long_eval, trainer.log,
            weights_are_initial=pretrained == cfg.checkpoint.pretrained_hf,
        )  # fmt: skip
    if resume_from is not None:
        trainer.start_step = load_checkpoint(
            resume_from,
            state,
            parallel,
            distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
            log=trainer.log,
            vocab_size=data.vocab_size,
        )
        trainer.steps_done, trainer.last_checkpoint = trainer.start_step, resume_from
        trainer.log(f"resumed from {resume_from} after step {trainer.start_step}")
        if objective_warning is not None:
            trainer.log(objective_warning)
    if writes_run_folder and parallel.rank == 0:
        Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.structured(cfg), Path(cfg.checkpoint.save) / "config.yaml")
        _keep_for_export(cfg)
    trainer.log(
        f"solopo-train: world {parallel.world_size} = tp {parallel.tp} x pp {parallel.pp} x cp {parallel.cp} x "
        f"dp {parallel.dp}; {state.transformer_impl} layers, {state.attention_backend} attention, "
        f"{cfg.model.logits.replace('_', '-')} LM head; prompts {'shared' if data.share_prompt else 'not shared'} "
        f"(dataset.share_prompt={cfg.dataset.share_prompt}); {'bf16' if state.config.bf16 else 'fp32'} on "
        f"{parallel.device.type}; {len(data.train)} train examples; mode {cfg.solopo.mode}, loss "
        f"{cfg.solopo.preference_loss}"
    )
    for line in data.skip_report():  # dataset.on_error=skip: say what was left out, never silently
        trainer.log(line)
    if cfg.scheduler.lr_warmup_iters:  # OptimizerParamScheduler: the update of step k uses lr(k - 1)
        trainer.log(
            "warmup: the first update uses lr 0 (Megatron's convention), lr reaches optimizer.lr at "
            f"step {cfg.scheduler.lr_warmup_iters + 1}"
        )
    return trainer


def _keep_for_export(cfg: RecipeConfig) -> None:
    """What solopo-export needs beside the checkpoints, kept once: the run's tokenizer and the pretrained
    checkpoint's config and generation config, so the export works whether or not those folders remain."""
    root = Path(cfg.checkpoint.save)
    if not (root / TOKENIZER_COPY).exists():
        load_tokenizer(cfg.dataset.tokenizer, "dataset.tokenizer").save_pretrained(str(root / TOKENIZER_COPY))
    for name, copy in (
        ("config.json", HF_CONFIG_COPY),
        ("generation_config.json", HF_GENERATION_CONFIG_COPY),
    ):
        source = Path(cfg.checkpoint.pretrained_hf or "") / name
        if cfg.checkpoint.pretrained_hf and source.is_file() and not (root / copy).exists():
            shutil.copyfile(source, root / copy)


def _resume_path(cfg: RecipeConfig, parallel: ParallelState, *, clean: bool = True) -> Path | None:
    if clean and cfg.checkpoint.save and parallel.rank == 0:
        clean_partial_saves(cfg.checkpoint.save)
    dist.barrier()
    key = "checkpoint.load" if cfg.checkpoint.load else "checkpoint.save"
    root = cfg.checkpoint.load or cfg.checkpoint.save
    return None if root is None else latest_checkpoint(root, key)


# ----------------------------------------------------------------------------- the loop


def train(trainer: Trainer) -> list[dict]:
    """Runs the remaining steps with logging, evaluation and checkpoints; returns the metrics history."""
    cfg = trainer.cfg
    writers = MetricWriters(
        cfg.logger, to_dict(cfg), enabled=trainer.parallel.is_logging_rank, resumed_step=trainer.start_step
    )
    try:
        return _train_loop(trainer, writers)
    except BaseException as error:
        # After SIGINT a rank may instead see a peer's exit as a collective error: the same interrupt.
        if not (isinstance(error, KeyboardInterrupt) or sigint_received()):
            raise
        if trainer.parallel.rank == 0 and cfg.checkpoint.save:
            clean_partial_saves(cfg.checkpoint.save)  # an interrupted save's .tmp folder
        raise trainer.interrupted() from None
    finally:
        writers.close()


def _train_loop(trainer: Trainer, writers: MetricWriters) -> list[dict]:
    cfg = trainer.cfg
    sampler = GlobalBatchSampler(len(trainer.data.train), cfg.train.global_batch_size, seed=cfg.rng.seed)
    iters, log_every = cfg.train.train_iters, max(1, cfg.train.log_interval)
    eval_every = cfg.train.eval_interval
    if cfg.dataset.on_error == "skip":  # the metrics file records what the run left out
        writers.write(
            {"step": trainer.start_step, "data": {"skipped_records": trainer.data.skipped_records()}}
        )
    if eval_every and trainer.start_step == 0 and cfg.train.eval_at_start:
        result = trainer.evaluate()
        trainer.history.append({"step": 0, "eval": result})
        writers.write(trainer.history[-1])
        trainer.write_eval_records(0)
        trainer.log_eval(0, result)
    start = time.perf_counter()
    throughput = Throughput(
        trainer.parallel.world_size, peak_tflops(cfg.logger.peak_tflops_per_gpu, trainer.parallel.device)
    )
    save_every = cfg.checkpoint.save_interval
    skipped_in_a_row = 0
    progress = _progress_bar(trainer, iters)
    train_seconds = 0.0  # time in training steps (evaluation and checkpoints excluded), this process
    for step in range(trainer.start_step, iters):
        step_start = time.perf_counter()
        metrics = trainer.train_step(step, sampler)
        train_seconds += time.perf_counter() - step_start
        metrics["train_seconds"] = train_seconds
        trainer.steps_done = step + 1
        throughput.add(metrics)
        skipped = bool(metrics["skipped"])
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        diverged = skipped_in_a_row >= cfg.train.max_skipped_steps_in_a_row
        if skipped:
            trainer.log(
                f"step {step + 1}: {trainer.last_check.describe(metrics.get('loss', math.nan))}; "
                f"update skipped ({skipped_in_a_row} in a row, limit train.max_skipped_steps_in_a_row="
                f"{cfg.train.max_skipped_steps_in_a_row})"
            )
        entry = {"step": step + 1, "train": metrics}
        if step == 0 and trainer.store is not None and trainer.store.info.get("source") == "initial weights":
            trainer.log(reward_check_message(metrics, cfg.solopo.beta, trainer.state.config.params_dtype))
        if (step + 1) % log_every == 0 or step + 1 == iters:
            metrics.update(throughput.report(), peak_mem_gib=peak_memory_gib(trainer.parallel))
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1 - trainer.start_step) * (iters - step - 1)
            speed = f"{metrics['tokens_per_s']:,.0f} tokens/s {metrics['tflops_per_gpu']:.3g} TFLOP/s/GPU"
            if "mfu" in metrics:
                speed += f" MFU {metrics['mfu']:.1%}"
            trainer.log(
                f"step {step + 1}/{iters}: {format_metrics(metrics, TRAIN_KEYS)} | {speed} | peak mem "
                f"{metrics['peak_mem_gib']:.2f} GiB | elapsed {format_clock(elapsed)} eta {format_clock(eta)}"
            )
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == iters) and not diverged:
            entry["eval"] = trainer.evaluate()
            trainer.write_eval_records(step + 1)
            trainer.log_eval(step + 1, entry["eval"])
        trainer.history.append(entry)
        writers.write(entry)
        if diverged:  # after the step's metrics are written: nothing of the run is lost
            raise _diverged(trainer, step + 1, skipped_in_a_row, metrics)
        if progress is not None:
            progress.update(1)
        if cfg.checkpoint.save and ((save_every and (step + 1) % save_every == 0) or step + 1 == iters):
            if skipped:
                # A skip may be the start of a divergence (the weights wrecked by a finite but huge
                # update): a save now could prune (checkpoint.keep_last) the checkpoint to go back to.
                kept = (
                    f"the last checkpoint stays {trainer.last_checkpoint}"
                    if trainer.last_checkpoint
                    else "no checkpoint is saved yet"
                )
                trainer.log(
                    f"step {step + 1}: checkpoint not saved, the step's update was skipped (non-finite "
                    f"values); {kept}"
                )
            else:
                trainer.log(f"saved checkpoint {trainer.save(step + 1)}")
    if progress is not None:
        progress.close()
    return trainer.history


def _diverged(trainer: Trainer, step: int, in_a_row: int, metrics: dict[str, float]) -> TrainingDiverged:
    """The error that stops a run after ``in_a_row`` skipped steps: which steps, what was not finite in
    the last one, and what to do (the learning rate, the checkpoint to go back to)."""
    cfg = trainer.cfg
    assert trainer.last_check is not None
    steps = f"steps {step - in_a_row + 1}-{step}" if in_a_row > 1 else f"step {step}"
    if not cfg.checkpoint.save:
        todo = "train again (no checkpoints: checkpoint.save is unset)"
    else:
        # A resume keeps the checkpoint's learning-rate schedule (Megatron's OptimizerParamScheduler
        # state), and the last save may already hold the update that started the divergence.
        todo = "start afresh in a new checkpoint.save folder"
        if trainer.last_checkpoint is not None:
            todo += f" (the last checkpoint, {trainer.last_checkpoint}, keeps its learning-rate schedule)"
    return TrainingDiverged(
        f"training diverged: {steps} had non-finite values ({in_a_row} in a row, limit "
        f"train.max_skipped_steps_in_a_row={cfg.train.max_skipped_steps_in_a_row}), their updates skipped "
        f"and not saved; step {step}: {trainer.last_check.describe(metrics.get('loss', math.nan))}. Lower "
        f"optimizer.lr (now {cfg.optimizer.lr:g}) and {todo}",
        report=trainer.parallel.is_logging_rank,
    )


def evaluate_only(trainer: Trainer) -> dict[str, float]:
    """``solopo-train --eval-only``: the evaluation of the loaded weights (the latest checkpoint of
    ``checkpoint.load`` / ``checkpoint.save``, else the initial ones), logged and written as one entry."""
    cfg = trainer.cfg
    if trainer.data.valid is None:
        raise RecipeError("--eval-only: the recipe has no validation data (dataset.valid_path)")
    writers = MetricWriters(cfg.logger, to_dict(cfg), enabled=trainer.parallel.is_logging_rank)
    try:
        result = trainer.evaluate()
        writers.write({"step": trainer.start_step, "eval": result})
        trainer.write_eval_records(trainer.start_step)
        trainer.log_eval(trainer.start_step, result)
    finally:
        writers.close()
    return result


def _progress_bar(trainer: Trainer, iters: int):
    """A tqdm bar on the logging rank when stderr is a terminal (log lines stay the record otherwise)."""
    if not (trainer.parallel.is_logging_rank and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=iters, initial=trainer.start_step, unit="step", dynamic_ncols=True, leave=False)
