"""The training loop: a thin driver around ``megatron.core.pipeline_parallel.get_forward_backward_func()``.

Per step: the global batch's groups are planned into this DP rank's packed microbatches, sharded
for its CP rank, run through Megatron's schedule (PP included) with the SoLoPO loss closure, then
Megatron's DDP gradient reduction (``finalize_model_grads``: sum over DP x CP, divide by the global
example count), its optimizer and its learning-rate scheduler.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RecipeConfig, to_dict
from ..data.dataset import GlobalBatchSampler, TokenizedDataset, step_microbatches
from ..data.packing import Microbatch, pad_multiple_for, shard_microbatch
from ..data.reference_store import ReferenceStore, load_reference_store
from ..data.sources import (cache_dir, combined_fingerprint, data_paths, model_vocab_size, sequence_encoder,
                             write_synthetic_files)
from ..estimates import peak_tflops_for, training_flops
from ..objectives import ROLES, required_roles
from ..validation import validate_recipe
from .checkpoint import REFERENCE_COPY, clean_partial_saves, latest_checkpoint, load_checkpoint, save_checkpoint
from .metric_writers import MetricWriters
from .model import build_gpt_model, padded_vocab_size, resolve_transformer_impl, transformer_config
from .parallel import Layout, init_parallel_state, init_process_group
from .step import StepContext, forward_step


@dataclass
class Data:
    train: TokenizedDataset
    valid: TokenizedDataset | None
    roles: tuple[str, ...]
    pad_id: int
    vocab_size: int
    pad_multiple: int
    max_tokens: int


@dataclass
class Trainer:
    cfg: RecipeConfig
    layout: Layout
    data: Data
    model: list
    optimizer: object
    scheduler: object
    ctx: StepContext
    store: ReferenceStore | None
    history: list[dict] = field(default_factory=list)
    start_step: int = 0  # steps already done (from a checkpoint)
    log: Callable[[str], None] = print

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.data.vocab_size, self.cfg.model)


# ----------------------------------------------------------------------------- data


def prepare_data(cfg: RecipeConfig, layout: Layout) -> Data:
    ds = cfg.dataset
    if ds.train_path is None and layout.rank == 0:
        write_synthetic_files(cfg)
    dist.barrier()
    train_path, valid_path = data_paths(cfg)
    encoder = sequence_encoder(ds)
    tokenizer = encoder.tokenizer
    roles = required_roles(cfg.solopo.loss_config())
    datasets = []
    for rank_turn in (True, False):  # rank 0 tokenises first; the others then find the cache
        if (layout.rank == 0) == rank_turn:
            train, _ = TokenizedDataset.build(train_path, encoder, roles, cache_dir=cache_dir(cfg),
                                              on_error=ds.on_error, progress=layout.rank == 0)
            # Validation forwards every role, so long-context accuracy is measured even in chosen-only mode.
            valid = TokenizedDataset.build(valid_path, encoder, ROLES, cache_dir=cache_dir(cfg), on_error=ds.on_error,
                                           progress=layout.rank == 0)[0] if valid_path else None
            datasets = [train, valid]
        dist.barrier()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    m = cfg.model
    multiple = pad_multiple_for(m.context_parallel_size, m.tensor_model_parallel_size, m.sequence_parallel)
    return Data(datasets[0], datasets[1], roles, pad_id, model_vocab_size(cfg, len(tokenizer)), multiple, ds.max_tokens)


def step_batches(data: Data, dataset: TokenizedDataset, indices: Sequence[int], roles, layout: Layout,
                 store: ReferenceStore | None) -> list[Microbatch]:
    """This rank's microbatches for one global batch: planned for its DP rank, sharded for its CP rank."""
    mbs = step_microbatches(dataset, indices, roles, max_tokens=data.max_tokens, pad_multiple=data.pad_multiple,
                            pad_id=data.pad_id, dp_size=layout.dp, dp_rank=layout.dp_rank, ref_store=store)
    return [shard_microbatch(mb, layout.cp, layout.cp_rank).to(layout.device) for mb in mbs]


# ----------------------------------------------------------------------------- model and optimizer


def build_model_and_optimizer(cfg: RecipeConfig, layout: Layout, data: Data, init_state: dict | None = None,
                              pretrained_hf: str | None = None):
    """This rank's DDP-wrapped model chunk, optimizer and scheduler; initial weights from ``init_state``
    (a full state dict), else from a Hugging Face directory, else Megatron's initialisation."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = cfg.model.bf16 if cfg.model.bf16 is not None else layout.device.type == "cuda"
    impl = resolve_transformer_impl(cfg.model)
    config = transformer_config(cfg.model, bf16=bf16, max_tokens=data.max_tokens)
    module = build_gpt_model(cfg.model, config, data.vocab_size, data.max_tokens, impl)
    if init_state is not None or pretrained_hf is not None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
        if init_state is not None:
            from .weights import load_full_state_dict

            load_full_state_dict(module, init_state, tp_group)
        else:
            from .hf_weights import load_hf_weights_into

            load_hf_weights_into(module, pretrained_hf, cfg.model, tp_group)
    module.to(layout.device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        average_in_collective=False,
    )
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=bf16,
            params_dtype=config.params_dtype, use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        model,
    )
    s = cfg.scheduler
    train_iters = cfg.train.train_iters
    decay_iters = s.lr_decay_iters or train_iters  # warmup < decay: checked by validate_recipe in setup()
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if s.lr_warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.lr_warmup_iters,
        lr_decay_steps=max(1, decay_iters),
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(1, train_iters),
        wd_incr_style="constant",
    )
    return model, optimizer, scheduler, impl


# ----------------------------------------------------------------------------- running microbatches


def _groups():
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_group() if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
    cp = parallel_state.get_context_parallel_group() if parallel_state.get_context_parallel_world_size() > 1 else None
    return tp, cp


def run_schedule(trainer: Trainer, mbs: list[Microbatch], *, forward_only: bool, ctx: StepContext | None = None) -> list[dict]:
    """One pass of Megatron's schedule over ``mbs``; the reports (last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, ctx or trainer.ctx),
        data_iterator=iter(mbs),
        model=trainer.model,
        num_microbatches=len(mbs),
        seq_length=trainer.data.max_tokens,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def reduce_reports(reports: list[dict], layout: Layout) -> dict[str, float]:
    """Sums [value, count] pairs over microbatches and DP ranks -> means (last stage only)."""
    from megatron.core import parallel_state

    if not reports:
        return {}
    names = sorted(reports[0])
    totals = torch.stack([sum(r[name] for r in reports) for name in names]).double()  # [metrics, 2]
    if layout.dp > 1:
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- reference log-probs


def compute_reference_store(trainer: Trainer, datasets: Sequence[tuple[TokenizedDataset, tuple[str, ...]]],
                            path: str | Path, fingerprint: str) -> ReferenceStore:
    """Per-sequence log-prob sums of the current weights over ``datasets``, written to ``path``."""
    from megatron.core import parallel_state

    layout = trainer.layout
    ctx = dataclasses.replace(trainer.ctx, forward_only_logps=True)
    entries: list[tuple[str, dict[str, float]]] = []
    batch_size = trainer.cfg.train.global_batch_size
    for model in trainer.model:
        model.eval()
    with torch.no_grad():
        for dataset, roles in datasets:
            for start in range(0, len(dataset), batch_size):
                indices = list(range(start, min(start + batch_size, len(dataset))))
                mbs = step_batches(trainer.data, dataset, indices, roles, layout, None)
                reports = run_schedule(trainer, mbs, forward_only=True, ctx=ctx)
                for mb, report in zip(mbs, reports):
                    sums = report["sequence_logps"].cpu()
                    for g, example_id in enumerate(mb.example_ids):
                        if mb.valid[g]:
                            entries.append((example_id, dict(zip(roles, sums[g].tolist()))))
    for model in trainer.model:
        model.train()
    if layout.is_last_stage and layout.tp_rank == 0 and layout.cp_rank == 0:
        gathered = [None] * layout.dp
        if layout.dp > 1:
            dist.all_gather_object(gathered, entries, group=parallel_state.get_data_parallel_group())
        else:
            gathered = [entries]
        if layout.dp_rank == 0:
            store = ReferenceStore(ROLES, data_fingerprint=fingerprint, info={"source": "initial weights"})
            for part in gathered:
                for example_id, sums in part:
                    store.add(example_id, sums)
            store.save(path)
    dist.barrier()
    return load_reference_store(path, data_fingerprint=fingerprint)


def reference_fingerprint(data: Data) -> str:
    return combined_fingerprint(data.train.fingerprint, data.valid.fingerprint if data.valid else None)


def reference_store_path(trainer: Trainer) -> Path:
    cfg = trainer.cfg
    if cfg.solopo.reference_store:
        return Path(cfg.solopo.reference_store)
    return cache_dir(cfg) / "reference" / f"{reference_fingerprint(trainer.data)}-seed{cfg.rng.seed}.jsonl"


def reference_datasets(trainer: Trainer):
    data = trainer.data
    return [(data.train, data.roles)] + ([(data.valid, ROLES)] if data.valid else [])


def ensure_reference_store(trainer: Trainer) -> ReferenceStore | None:
    cfg, data = trainer.cfg, trainer.data
    if not cfg.solopo.loss_config().needs_reference:
        return None
    fingerprint = reference_fingerprint(data)
    path = reference_store_path(trainer)
    if path.exists():
        return load_reference_store(path, data_fingerprint=fingerprint)
    for root in (cfg.checkpoint.load, cfg.checkpoint.save):  # a resumed run keeps its original reference
        if root and (Path(root) / REFERENCE_COPY).exists():
            return load_reference_store(Path(root) / REFERENCE_COPY, data_fingerprint=fingerprint)
    if not cfg.solopo.compute_reference_if_missing:
        raise ValueError(f"solopo.reference_store: {path} does not exist (run solopo-ref-logps, or set "
                         "solopo.compute_reference_if_missing=true)")
    trainer.log(f"computing reference log-probs from the initial weights -> {path}")
    return compute_reference_store(trainer, reference_datasets(trainer), path, fingerprint)


# ----------------------------------------------------------------------------- the loop


def setup(cfg: RecipeConfig, *, init_state: dict | None = None, log: Callable[[str], None] | None = None,
          load_reference: bool = True) -> Trainer:
    init_process_group()
    # Also for direct API callers. The reference store is checked where it is loaded (its fingerprint
    # comes from the tokenised data then), so the data files are not hashed a second time here.
    validate_recipe(cfg, dist.get_world_size(), check_reference=False)
    layout = init_parallel_state(cfg.model, cfg.rng.seed)
    data = prepare_data(cfg, layout)
    resume_from = _resume_path(cfg, layout)
    pretrained = cfg.checkpoint.pretrained_hf if resume_from is None else None  # a checkpoint replaces it
    model, optimizer, scheduler, impl = build_model_and_optimizer(cfg, layout, data, init_state, pretrained)
    tp_group, cp_group = _groups()
    ctx = StepContext(cfg.solopo.loss_config(), tp_group, cp_group, local_attention=impl == "local",
                      inplace_logits_backward=cfg.solopo.inplace_logits_backward)
    printer = log or (lambda text: print(text, flush=True))
    trainer = Trainer(cfg, layout, data, model, optimizer, scheduler, ctx, None,
                      log=printer if layout.is_logging_rank else (lambda text: None))
    if load_reference:
        trainer.store = ensure_reference_store(trainer)
    if resume_from is not None:
        trainer.start_step = load_checkpoint(trainer, resume_from)
        trainer.log(f"resumed from {resume_from} after step {trainer.start_step}")
    if cfg.checkpoint.save and layout.rank == 0:
        Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.structured(cfg), Path(cfg.checkpoint.save) / "config.yaml")
    trainer.log(
        f"solopo-train: world {layout.world_size} = tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp}; "
        f"{impl} attention; {'bf16' if model[0].config.bf16 else 'fp32'} on {layout.device.type}; "
        f"{len(data.train)} train examples; mode {cfg.solopo.mode}, loss {cfg.solopo.preference_loss}"
    )
    return trainer


def _resume_path(cfg: RecipeConfig, layout: Layout) -> Path | None:
    if cfg.checkpoint.save and layout.rank == 0:
        clean_partial_saves(cfg.checkpoint.save)
    dist.barrier()
    root = cfg.checkpoint.load or cfg.checkpoint.save
    if root is None:
        return None
    path = latest_checkpoint(root)
    if path is None and cfg.checkpoint.load:
        raise ValueError(f"checkpoint.load: no checkpoint in {root}")
    return path


def train_step(trainer: Trainer, step: int, sampler: GlobalBatchSampler) -> dict[str, float]:
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    mbs = step_batches(trainer.data, trainer.data.train, sampler.batch(step), trainer.data.roles, trainer.layout,
                       trainer.store)
    reports = run_schedule(trainer, mbs, forward_only=False)
    finite = _step_is_finite(trainer, reports)
    if finite:
        _, grad_norm, _ = trainer.optimizer.step()
    else:  # never apply a non-finite update: the step is skipped and reported
        grad_norm = math.nan
    trainer.scheduler.step(increment=1)
    metrics = reduce_reports(reports, trainer.layout)
    metrics["skipped"] = 0.0 if finite else 1.0
    metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                   lr=trainer.optimizer.param_groups[0]["lr"], microbatches=len(mbs), **_step_work(trainer, mbs))
    return metrics


def _step_work(trainer: Trainer, mbs: list[Microbatch]) -> dict[str, float]:
    """The step's real (unpadded) tokens, every role's prompt and response, and its model FLOPs, over all DP ranks.

    Sequence lengths are global (not CP shards), so every CP and TP rank of a replica counts the same.
    """
    from megatron.core import parallel_state

    lengths = [length for mb in mbs for length in (mb.cu_seqlens[1:] - mb.cu_seqlens_padded[:-1]).tolist()]
    work = torch.tensor([sum(lengths), training_flops(trainer.cfg.model, trainer.padded_vocab, lengths)],
                        dtype=torch.float64, device=trainer.layout.device)
    if trainer.layout.dp > 1:
        dist.all_reduce(work, group=parallel_state.get_data_parallel_group())
    return {"tokens": work[0].item(), "flops": work[1].item()}


def _step_is_finite(trainer: Trainer, reports: list[dict]) -> bool:
    """Loss (last stage) and all reduced gradients finite on every rank: one flag all-reduced over the world."""
    bad = torch.zeros((), dtype=torch.float32, device=trainer.layout.device)
    for report in reports:
        if "loss" in report:
            bad = torch.maximum(bad, (~torch.isfinite(report["loss"])).any().float())
    for chunk in trainer.model:
        for buffer in chunk.buffers:
            bad = torch.maximum(bad, (~torch.isfinite(buffer.grad_data)).any().float())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def peak_memory_gib(layout: Layout) -> float:
    """The largest peak over all ranks: CUDA memory allocated by torch, or the process's peak RSS on CPU."""
    if layout.device.type == "cuda":
        local = torch.cuda.max_memory_allocated(layout.device)
    else:
        import resource

        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    peak = torch.tensor(float(local), dtype=torch.float64, device=layout.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 2**30


def evaluate(trainer: Trainer) -> dict[str, float]:
    data = trainer.data
    if data.valid is None:
        return {}
    batch = trainer.cfg.train.global_batch_size
    limit = len(data.valid)
    if trainer.cfg.train.eval_iters:
        limit = min(limit, trainer.cfg.train.eval_iters * batch)
    reports = []
    for model in trainer.model:
        model.eval()
    with torch.no_grad():
        for start in range(0, limit, batch):
            mbs = step_batches(data, data.valid, list(range(start, min(start + batch, limit))), ROLES, trainer.layout,
                               trainer.store)
            reports.extend(run_schedule(trainer, mbs, forward_only=True))
    for model in trainer.model:
        model.train()
    return reduce_reports(reports, trainer.layout)


def _fmt(metrics: dict[str, float], keys: Sequence[str]) -> str:
    return " ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)


TRAIN_KEYS = ("loss", "po_loss", "solo_ra_loss", "accuracy/short", "solo_ra_gap/chosen", "grad_norm", "lr")
EVAL_KEYS = ("loss", "accuracy/short", "accuracy/long", "margin/long")


@dataclass
class Throughput:
    """Per log interval: tokens/s, TFLOP/s per GPU and MFU from the steps' model FLOPs."""

    world_size: int
    peak_tflops: float | None
    tokens: float = 0.0
    flops: float = 0.0
    since: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, float]) -> None:
        self.tokens += metrics["tokens"]
        self.flops += metrics["flops"]

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self.since, 1e-9)
        tflops = self.flops / seconds / self.world_size / 1e12
        out = {"tokens_per_s": self.tokens / seconds, "tflops_per_gpu": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        self.tokens, self.flops, self.since = 0.0, 0.0, now
        return out


def _peak_tflops(trainer: Trainer) -> float | None:
    if trainer.cfg.logger.peak_tflops_per_gpu:
        return trainer.cfg.logger.peak_tflops_per_gpu
    if trainer.layout.device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(trainer.layout.device))


def train(trainer: Trainer) -> list[dict]:
    cfg = trainer.cfg
    writers = MetricWriters(cfg.logger, to_dict(cfg), enabled=trainer.layout.is_logging_rank,
                            resumed_step=trainer.start_step)
    try:
        return _train_loop(trainer, writers)
    finally:
        writers.close()


def _train_loop(trainer: Trainer, writers: MetricWriters) -> list[dict]:
    cfg = trainer.cfg
    sampler = GlobalBatchSampler(len(trainer.data.train), cfg.train.global_batch_size, seed=cfg.rng.seed)
    iters, log_every = cfg.train.train_iters, max(1, cfg.train.log_interval)
    eval_every = cfg.train.eval_interval
    if eval_every and trainer.start_step == 0:
        result = evaluate(trainer)
        trainer.history.append({"step": 0, "eval": result})
        writers.write(trainer.history[-1])
        trainer.log(f"eval step 0: {_fmt(result, EVAL_KEYS)}")
    start = time.perf_counter()
    throughput = Throughput(trainer.layout.world_size, _peak_tflops(trainer))
    save_every = cfg.checkpoint.save_interval
    skipped_in_a_row = 0
    progress = _progress_bar(trainer, iters)
    for step in range(trainer.start_step, iters):
        metrics = train_step(trainer, step, sampler)
        throughput.add(metrics)
        if metrics["skipped"]:
            skipped_in_a_row += 1
            trainer.log(f"step {step + 1}: non-finite loss or gradients (loss {metrics.get('loss', math.nan):.4g}); "
                        f"update skipped ({skipped_in_a_row} in a row, limit train.max_skipped_steps_in_a_row="
                        f"{cfg.train.max_skipped_steps_in_a_row})")
            if skipped_in_a_row >= cfg.train.max_skipped_steps_in_a_row:
                raise RuntimeError(f"stopping: {skipped_in_a_row} steps in a row had non-finite loss or gradients "
                                   f"(last: step {step + 1})")
        else:
            skipped_in_a_row = 0
        entry = {"step": step + 1, "train": metrics}
        if step == 0 and trainer.store is not None and trainer.store.info.get("source") == "initial weights":
            trainer.log(reward_check_message(metrics, trainer.cfg.solopo.beta))
        if (step + 1) % log_every == 0 or step + 1 == iters:
            metrics.update(throughput.report(), peak_mem_gib=peak_memory_gib(trainer.layout))
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1 - trainer.start_step) * (iters - step - 1)
            speed = f"{metrics['tokens_per_s']:,.0f} tokens/s {metrics['tflops_per_gpu']:.3g} TFLOP/s/GPU"
            if "mfu" in metrics:
                speed += f" MFU {metrics['mfu']:.1%}"
            trainer.log(f"step {step + 1}/{iters}: {_fmt(metrics, TRAIN_KEYS)} | {speed} | peak mem "
                        f"{metrics['peak_mem_gib']:.2f} GiB | elapsed {_clock(elapsed)} eta {_clock(eta)}")
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == iters):
            entry["eval"] = evaluate(trainer)
            trainer.log(f"eval step {step + 1}: {_fmt(entry['eval'], EVAL_KEYS)}")
        trainer.history.append(entry)
        writers.write(entry)
        if progress is not None:
            progress.update(1)
        if cfg.checkpoint.save and ((save_every and (step + 1) % save_every == 0) or step + 1 == iters):
            saved = save_checkpoint(trainer, step + 1)
            trainer.log(f"saved checkpoint {saved}")
    if progress is not None:
        progress.close()
    return trainer.history


REWARD_CHECK_ULPS = 64  # slack over fp32's unit roundoff: the two passes may pack rows (and round) differently


def reward_check_message(metrics: dict[str, float], beta: float) -> str:
    """The step-1 check that the reference store matches the initial weights.

    Before the first update policy == reference, so every DPO reward ``beta * (S - S_ref)`` is 0 up to
    fp32 rounding: the reference pass and the training pass pack rows differently, so CPU matmuls may
    round differently (different machines give ~1e-8). The bound is ``beta * |S| * 64 * 2^-24`` for the
    largest mean log-prob sum ``|S|``; a store from other weights or data misses it by orders of magnitude.
    """
    worst = max((abs(v) for k, v in metrics.items() if k.startswith("rewards/")), default=math.nan)
    largest_sum = max((abs(v) for k, v in metrics.items() if k.startswith("logps/")), default=1.0)
    bound = beta * max(largest_sum, 1.0) * REWARD_CHECK_ULPS * 2.0**-24
    verdict = "within" if worst <= bound else "ABOVE (the reference store does not match these weights)"
    return (f"reward check: policy == reference before the first update, so rewards must be ~0: "
            f"max |mean reward| = {worst:.3g}, {verdict} the fp32 rounding bound {bound:.3g}")


def _progress_bar(trainer: Trainer, iters: int):
    """A tqdm bar on the logging rank when stderr is a terminal (log lines stay the record otherwise)."""
    import sys

    if not (trainer.layout.is_logging_rank and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=iters, initial=trainer.start_step, unit="step", dynamic_ncols=True, leave=False)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
