"""Recipe checks that run before any process group exists: every problem, each named by its key.

Unknown or misspelt keys and wrong types are caught earlier, by the typed schema (with a suggestion).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data.packing import pad_multiple_for
from .errors import RecipeError
from .schema import LoggerSection, ModelSection, RecipeConfig, field_choices


def layout_problems(m: ModelSection, world_size: int | None = None) -> list[str]:
    """The parallel layout's problems (sizes, world size, heads/groups vs tp, layers vs pp), by key."""
    problems = []
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    for key, value in (
        ("model.tensor_model_parallel_size", tp),
        ("model.pipeline_model_parallel_size", pp),
        ("model.context_parallel_size", cp),
    ):
        if value < 1:
            problems.append(f"{key}: must be >= 1, got {value}")
    if min(tp, pp, cp) < 1:
        return problems
    if world_size is not None and world_size % (tp * pp * cp):
        problems.append(
            f"model.tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size = "
            f"{tp} x {pp} x {cp} does not divide the world size {world_size}"
        )
    if m.num_layers % pp:
        problems.append(
            f"model.num_layers: {m.num_layers} is not divisible by pipeline_model_parallel_size={pp}"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % tp or groups % tp:
        problems.append(
            f"model.num_attention_heads / num_query_groups: {m.num_attention_heads} / {groups} "
            f"must be divisible by tensor_model_parallel_size={tp}"
        )
    return problems


def choice_problems(cfg: RecipeConfig) -> list[str]:
    """String settings that must be one of the schema's choices (a typo fails here, not in Megatron)."""
    problems = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for name, choices in field_choices(values).items():
            value = getattr(values, name)
            if value not in choices:
                allowed = ", ".join("null" if c is None else str(c) for c in choices)
                problems.append(f"{section.name}.{name}: must be one of {allowed}; got {value!r}")
    return problems


def recipe_problems(
    cfg: RecipeConfig,
    world_size: int | None = None,
    *,
    check_reference: bool = True,
    check_paths: bool = True,
) -> list[str]:
    """Every problem, by key: the configuration's, then (``check_paths``) those of the files it names."""
    problems = config_problems(cfg, world_size)
    if check_paths:
        problems.extend(path_problems(cfg, check_reference=check_reference))
    return problems


def config_problems(cfg: RecipeConfig, world_size: int | None = None) -> list[str]:
    """Problems of the recipe itself, whatever machine it is checked on."""
    from .planner import largest_group_tokens

    problems: list[str] = []
    m, t, ds = cfg.model, cfg.train, cfg.dataset
    tp, cp = m.tensor_model_parallel_size, m.context_parallel_size

    problems.extend(choice_problems(cfg))
    problems.extend(layout_problems(m, world_size))
    for key, value in (
        ("train.global_batch_size", t.global_batch_size),
        ("train.train_iters", t.train_iters),
        ("dataset.max_tokens", ds.max_tokens),
    ):
        if value < 1:
            problems.append(f"{key}: must be >= 1, got {value}")
    if m.sequence_parallel and m.transformer_impl == "local":
        problems.append(
            "model.sequence_parallel: needs the Transformer Engine layer spec, not transformer_impl=local"
        )
    if t.micro_batch_size != 1:
        problems.append(
            f"train.micro_batch_size: must be 1 (a microbatch is one packed row of whole groups; "
            f"size it with dataset.max_tokens), got {t.micro_batch_size}"
        )

    multiple = pad_multiple_for(cp, tp, m.sequence_parallel)
    if cp >= 1 and ds.max_tokens % multiple:
        problems.append(
            f"dataset.max_tokens: {ds.max_tokens} is not a multiple of 2 x context_parallel_size"
            f"{' x tensor_model_parallel_size (sequence parallel)' if m.sequence_parallel else ''} = {multiple}"
        )
    try:
        loss = cfg.solopo.loss_config()
    except ValueError as error:
        problems.append(str(error).replace("SoLoPOConfig.", "solopo."))
        loss = None
    group_bound = largest_group_tokens(cfg) if loss is not None and min(tp, cp) >= 1 else None
    if group_bound is not None and group_bound > ds.max_tokens:
        problems.append(
            f"dataset.max_tokens: {ds.max_tokens} is below the largest possible group "
            f"({group_bound} tokens from max_short_length / max_long_length, padded); raise it"
        )
    decay = cfg.scheduler.lr_decay_iters or t.train_iters
    if cfg.scheduler.lr_warmup_iters >= max(1, decay):
        problems.append(
            f"scheduler.lr_warmup_iters: {cfg.scheduler.lr_warmup_iters} must be below the decay "
            f"iterations ({decay})"
        )
    return problems


def path_problems(cfg: RecipeConfig, *, check_reference: bool = True) -> list[str]:
    """Problems of the files and packages a recipe needs on the machine that checks it."""
    problems = []
    ds = cfg.dataset
    for key, path in (("dataset.train_path", ds.train_path), ("dataset.valid_path", ds.valid_path)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{key}: file {path} does not exist")
    if ds.tokenizer != "tiny" and not Path(ds.tokenizer).is_dir():
        problems.append(
            f"dataset.tokenizer: {ds.tokenizer!r} is neither 'tiny' nor a local tokenizer directory"
        )
    if cfg.checkpoint.load is not None and not Path(cfg.checkpoint.load).exists():
        problems.append(f"checkpoint.load: {cfg.checkpoint.load} does not exist")
    problems.extend(_pretrained_problems(cfg))
    if (problem := wandb_problem(cfg.logger)) is not None:
        problems.append(problem)
    if check_reference and _loss_ok(cfg) and cfg.solopo.loss_config().needs_reference:
        problems.extend(_reference_store_problems(cfg))
    return problems


def wandb_problem(logger: LoggerSection) -> str | None:
    """Why the wandb settings cannot work here, or None (checked before training starts)."""
    if logger.wandb_project is None:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "logger.wandb_project: wandb is not installed (pip install wandb), or unset the key"
    return None


def _pretrained_problems(cfg: RecipeConfig) -> list[str]:
    """The Hugging Face checkpoint exists and the model section describes it (key by key)."""
    path = cfg.checkpoint.pretrained_hf
    if path is None:
        return []
    if not (Path(path) / "config.json").is_file():
        return [
            f"checkpoint.pretrained_hf: {path} is not a Hugging Face checkpoint directory (no config.json)"
        ]
    from .hf_config import check_model_matches_hf

    return [
        f"{problem} (checkpoint.pretrained_hf={path})" for problem in check_model_matches_hf(cfg.model, path)
    ]


def _reference_store_problems(cfg: RecipeConfig) -> list[str]:
    from ..data.errors import DataError
    from ..data.reference_store import read_store_header
    from .sources import expected_reference_fingerprint, resolve_reference_store

    s = cfg.solopo
    if cfg.dataset.tokenizer != "tiny" and not Path(cfg.dataset.tokenizer).is_dir():
        return []  # reported as a dataset.tokenizer problem; the fingerprint needs the tokenizer
    try:
        expected = expected_reference_fingerprint(cfg)
        path = resolve_reference_store(cfg, expected)
        if path is None or not path.exists():
            if s.compute_reference_if_missing:
                return []
            where = (
                f"{s.reference_store} does not exist"
                if s.reference_store
                else f"is not set and the default {path} does not exist"
                if path
                else "is not set"
            )
            return [
                f"solopo.reference_store: dpo needs reference log-probs, and the store {where} "
                "(run solopo-ref-logps, or set solopo.compute_reference_if_missing=true)"
            ]
        read_store_header(path, data_fingerprint=expected)
    except (DataError, OSError) as error:
        return [f"solopo.reference_store: {error}"]
    return []


def _loss_ok(cfg: RecipeConfig) -> bool:
    try:
        cfg.solopo.loss_config()
    except ValueError:
        return False
    return True


def validate_recipe(
    cfg: RecipeConfig,
    world_size: int | None = None,
    *,
    check_reference: bool = True,
    check_paths: bool = True,
) -> None:
    """Raises RecipeError listing every problem (each with its key) before any process group exists.

    ``check_reference=False`` for solopo-ref-logps, which writes the store; ``check_paths=False`` for
    the dry run, which may plan a cluster recipe on a machine without its files.
    """
    problems = recipe_problems(cfg, world_size, check_reference=check_reference, check_paths=check_paths)
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))
