"""``solopo-train --dry-run``: validate a recipe without GPUs and show what a launch would do.

Sizes are worst cases: every preference group at the recipe's length limits (max_short_length /
max_long_length), so microbatch counts, tokens and memory are upper bounds for real data.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.tokenize import load_tokenizer, tokenizer_available
from ..objectives import required_roles
from .lengths import prompts_shared, role_limits, slot_limits
from .schema import RecipeConfig
from .sizing import GIB, MemoryEstimate, estimate_memory, padded_vocab_size, parameter_counts, training_flops
from .sources import model_vocab_size

RUNTIME_OVERHEAD_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation: a rough allowance


def model_vocab_rows(cfg: RecipeConfig) -> tuple[int | None, str]:
    """Embedding rows before padding (the trainer's rule, from what this machine has), and their source."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "model.vocab_size"
    tokenizer_size = None
    if tokenizer_available(cfg.dataset.tokenizer):
        tokenizer_size = len(load_tokenizer(cfg.dataset.tokenizer, label="dataset.tokenizer"))
    rows = model_vocab_size(cfg, tokenizer_size)
    if rows is None:
        return None, "unknown (set model.vocab_size)"
    return rows, "the tokenizer" if rows == tokenizer_size else "checkpoint.pretrained_hf"


@dataclass
class Plan:
    """What a launch of the recipe would do, at the recipe's length limits."""

    world_size: int
    dp: int
    vocab: int | None
    padded_vocab: int | None
    vocab_source: str
    limits: dict[str, int] | None
    shared: bool | None  # prompts shared (None: the machine's attention decides; planned unshared)
    group_tokens: int | None
    groups_per_row: int | None
    examples_per_dp_rank: int
    microbatches: int | None
    tokens_per_step: int | None
    flops_per_step: float | None
    parameters: int | None
    memory: MemoryEstimate | None


def make_plan(cfg: RecipeConfig, world_size: int) -> Plan:
    """The plan of ``cfg`` on ``world_size`` GPUs."""
    m, t, ds = cfg.model, cfg.train, cfg.dataset
    dp = world_size // (
        m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
    )
    vocab, source = model_vocab_rows(cfg)
    padded = padded_vocab_size(vocab, m) if vocab else None
    limits = role_limits(cfg)
    shared = prompts_shared(cfg)
    slots = slot_limits(cfg, bool(shared)) if limits else None
    group = sum(slots) if slots else None
    per_dp = -(-t.global_batch_size // dp)
    per_row = ds.max_tokens // group if group else None
    microbatches = -(-per_dp // per_row) if per_row else None
    tokens = t.global_batch_size * group if group else None
    flops = parameters = memory = None
    if padded is not None:
        parameters = parameter_counts(m, padded).total
        if limits is not None:
            flops = t.global_batch_size * training_flops(m, padded, slots)
            memory = estimate_memory(
                m,
                padded,
                tokens_per_microbatch=ds.max_tokens,
                microbatches=microbatches or 1,
                dp=dp,
                distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
                inplace_logits_backward=cfg.solopo.inplace_logits_backward,
            )
    return Plan(
        world_size,
        dp,
        vocab,
        padded,
        source,
        limits,
        shared,
        group,
        per_row,
        per_dp,
        microbatches,
        tokens,
        flops,
        parameters,
        memory,
    )


def _n(value: float | None, unit: str = "") -> str:
    return "unknown" if value is None else f"{value:,.0f}{unit}"


def format_plan(cfg: RecipeConfig, plan: Plan, recipe: str) -> str:
    """The dry run's text."""
    m, t, ds, c = cfg.model, cfg.train, cfg.dataset, cfg.cluster
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    lines = [
        f"dry run: {recipe}",
        f"  recipe: valid for world size {plan.world_size} ({c.num_nodes} node(s) x {c.gpus_per_node} GPUs)",
        f"  objective: mode {cfg.solopo.mode}, loss {cfg.solopo.preference_loss}, roles "
        f"{', '.join(required_roles(cfg.solopo.loss_config()))}",
    ]
    inside = (
        "inside one node" if tp * cp <= c.gpus_per_node else "across nodes: CP traffic crosses the network"
    )
    lines.append(
        f"  layout: tp {tp} x cp {cp} x pp {pp} x dp {plan.dp} = {plan.world_size} GPUs; "
        f"each sequence is split over tp x cp = {tp * cp} GPUs ({inside}); sequence parallel "
        f"{'on' if m.sequence_parallel else 'off'}; distributed optimizer "
        f"{'on' if cfg.optimizer.use_distributed_optimizer else 'off'}; recompute {m.recompute_granularity or 'none'}"
    )
    padding = (
        ""
        if plan.padded_vocab is None
        else (
            "no padding rows"
            if plan.padded_vocab == plan.vocab
            else f"{plan.padded_vocab - plan.vocab} padding rows"
        )
    )
    params = (
        "unknown"
        if plan.parameters is None
        else (f"{plan.parameters / 1e9:.2f}B" if plan.parameters >= 1e9 else f"{plan.parameters / 1e6:.2f}M")
    )
    lines.append(
        f"  model: {m.num_layers} layers, hidden {m.hidden_size}, {params} parameters; vocab "
        f"{_n(plan.vocab)} from {plan.vocab_source}, padded to {_n(plan.padded_vocab)} ({padding}), "
        f"{_n(plan.padded_vocab / tp if plan.padded_vocab else None)} per TP rank"
    )
    if plan.limits is None:
        lines.append(
            "  sequences: dataset.max_short_length / max_long_length unset: per-rank lengths, microbatches, "
            "tokens and memory cannot be bounded"
        )
        return "\n".join(lines)
    per_rank = ", ".join(f"{role} {limit:,} -> {limit // cp:,}" for role, limit in plan.limits.items())
    lines.append(f"  per-rank sequence lengths (tokens, padded, split over cp {cp}): {per_rank}")
    lines.append(f"  prompts: {_sharing(cfg, plan)}")
    lines.append(
        f"  microbatch row: {ds.max_tokens:,} tokens -> {ds.max_tokens // cp:,} per CP rank; largest group "
        f"{plan.group_tokens:,} tokens, so {plan.groups_per_row} group(s) per row"
    )
    lines.append(
        f"  microbatches per step: {t.global_batch_size} examples / dp {plan.dp} = {plan.examples_per_dp_rank} per "
        f"DP rank -> {plan.microbatches} microbatch(es) per DP rank (at most; groups at the length limits)"
    )
    capacity = plan.microbatches * plan.dp * ds.max_tokens
    lines.append(
        f"  tokens per step: up to {plan.tokens_per_step:,} real tokens (packed capacity {capacity:,}); "
        f"{plan.flops_per_step / 1e15:,.1f} PFLOP model FLOPs per step at the limits"
    )
    mem = plan.memory
    if mem is not None:
        parts = ", ".join(f"{name} {value:.1f}" for name, value in mem.as_gib().items() if name != "total")
        need = mem.total / GIB + RUNTIME_OVERHEAD_GIB
        verdict = "fits" if need <= c.gpu_memory_gib else "DOES NOT FIT"
        lines.append(
            f"  memory per GPU (estimate, GiB): {parts}; total {mem.total / GIB:.1f} + ~{RUNTIME_OVERHEAD_GIB:.0f} "
            f"runtime = {need:.1f} of {c.gpu_memory_gib:.0f} (cluster.gpu_memory_gib): {verdict}"
        )
    lines.extend(f"  warning: {w}" for w in plan_warnings(cfg, plan))
    return "\n".join(lines)


def _sharing(cfg: RecipeConfig, plan: Plan) -> str:
    """The dry run's line on shared prompts (dataset.share_prompt)."""
    setting = f"dataset.share_prompt={cfg.dataset.share_prompt}, model.attention_backend={cfg.model.attention_backend}"
    if plan.shared is None:
        return (
            f"shared unless the attention resolves to te ({setting}: auto picks te where Transformer Engine is "
            "installed); planned unshared, the larger bound"
        )
    if not plan.shared:
        return f"not shared ({setting}): every (context, answer) sequence is a slot of its own"
    unshared = sum(plan.limits.values())
    return (
        f"shared ({setting}): the answers of one context follow one copy of its prompt; the largest group "
        f"takes {plan.group_tokens:,} tokens instead of {unshared:,} (answers at most dataset.max_short_length)"
    )


def plan_warnings(cfg: RecipeConfig, plan: Plan) -> list[str]:
    """Warnings about the plan (memory, padding rows, row use, layout across nodes)."""
    warnings = []
    if (
        plan.memory is not None
        and plan.memory.total / GIB + RUNTIME_OVERHEAD_GIB > cfg.cluster.gpu_memory_gib
    ):
        warnings.append(
            "the estimate exceeds cluster.gpu_memory_gib: raise tp/cp/pp, turn on "
            "model.recompute_granularity=full or optimizer.use_distributed_optimizer, or lower dataset.max_tokens"
        )
    if (
        plan.groups_per_row is not None
        and plan.groups_per_row * plan.group_tokens < 0.5 * cfg.dataset.max_tokens
    ):
        warnings.append(
            f"a row fits {plan.groups_per_row} largest group(s) using under half of dataset.max_tokens"
        )
    tp = cfg.model.tensor_model_parallel_size
    if tp > cfg.cluster.gpus_per_node:
        warnings.append("tensor parallelism spans nodes: keep tp <= GPUs per node")
    if cfg.train.global_batch_size % plan.dp:
        warnings.append(
            f"train.global_batch_size {cfg.train.global_batch_size} is not a multiple of dp {plan.dp}: "
            "some DP ranks get masked dummy groups each step"
        )
    return warnings


def dry_run(cfg: RecipeConfig, recipe: str, world_size: int | None = None) -> str:
    """Validates the recipe (RecipeError lists every problem) and returns the plan as text. Files the
    recipe names but this machine lacks (data, tokenizer, checkpoints) are listed, not fatal; a
    reference store that is here but wrong (other data, incomplete) is a problem."""
    from .validation import dry_run_problems, raise_problems

    bad_world = (
        [f"--world-size: must be >= 1, got {world_size}"] if world_size is not None and world_size < 1 else []
    )
    world = cfg.cluster.world_size if world_size is None else world_size
    problems, missing = dry_run_problems(cfg, None if bad_world else world)
    raise_problems(bad_world + problems)
    text = format_plan(cfg, make_plan(cfg, world), recipe)
    if missing:
        text += "\n  not checked on this machine (needed at launch):\n" + "\n".join(
            f"    - {p}" for p in missing
        )
    return text
