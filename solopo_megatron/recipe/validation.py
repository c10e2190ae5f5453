"""Recipe checks that run before any process group exists: every problem, each named by its key.

Unknown or misspelt keys and wrong types are caught earlier, by the typed schema (with a suggestion).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.files import input_file_problem, nearest_existing
from ..data.packing import pad_multiple_for
from ..data.tokenize import tokenizer_available
from .checkpoints import checkpoint_problems
from .errors import RecipeError
from .lengths import largest_group_tokens, prompts_shared
from .preflight import environment_problems, output_path_problems
from .schema import LoggerSection, ModelSection, RecipeConfig, field_bounds, field_choices

# A resume that changes the roles trained on (recipe.checkpoints.objective_change).
ROLE_KEYS = ("solopo.mode:", "solopo.solo_ra_chosen_only:")


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


def recipe_sections(section: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key prefix, section) of the recipe and every nested section (``dataset.synthetic``)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield f"{prefix}{f.name}", value
            yield from recipe_sections(value, f"{prefix}{f.name}.")


def bound_problems(cfg: RecipeConfig) -> list[str]:
    """Numbers outside their schema range (``positive``, ``at_least``, ``fraction``; floats finite)."""
    problems = []
    for key, section in recipe_sections(cfg):
        optional = {f.name for f in dataclasses.fields(section) if f.default is None}
        for name, bounds in field_bounds(section).items():
            if (problem := bounds.problem(getattr(section, name))) is not None:
                hint = " (or null to leave it unset)" if name in optional else ""
                problems.append(f"{key}.{name}: {problem}{hint}")
    return problems


def prompt_template_problem(template: str) -> str | None:
    """``dataset.prompt_template``'s problem (placeholders), or None; the data layer owns the rule."""
    from ..data.tokenize import prompt_template_problem as problem_of

    problem = problem_of(template)
    return None if problem is None else f"dataset.prompt_template: {problem}"


def recipe_problems(
    cfg: RecipeConfig,
    world_size: int | None = None,
    *,
    check_reference: bool = True,
    check_paths: bool = True,
    check_run_state: bool = True,
    resuming: bool = True,
) -> list[str]:
    """Every problem, by key: the configuration's, then (``check_paths``) those of the files it names.

    Without ``check_paths`` (the dry run) a reference store that exists on this machine is still
    checked (fingerprint, completeness): a bad store is a problem wherever the recipe is planned.
    """
    problems = config_problems(cfg, world_size)
    if check_paths:
        problems.extend(
            path_problems(
                cfg, check_reference=check_reference, check_run_state=check_run_state, resuming=resuming
            )
        )
    elif check_reference and _store_checkable(cfg):
        problems.extend(reference_store_problems(cfg)[0])
    return problems


def config_problems(cfg: RecipeConfig, world_size: int | None = None) -> list[str]:
    """Problems of the recipe itself, whatever machine it is checked on."""
    problems: list[str] = []
    m, t, ds = cfg.model, cfg.train, cfg.dataset
    tp, cp = m.tensor_model_parallel_size, m.context_parallel_size

    bounds = bound_problems(cfg)
    bad = {problem.partition(":")[0] for problem in bounds}  # keys out of range: skip checks built on them
    problems.extend(bounds)
    problems.extend(choice_problems(cfg))
    # layout_problems repeats the parallel sizes' range (it also runs on its own, at process-group setup).
    problems.extend(p for p in layout_problems(m, world_size) if p not in bounds)
    groups = m.num_query_groups
    if groups and m.num_attention_heads >= 1 and groups >= 1 and m.num_attention_heads % groups:
        problems.append(
            f"model.num_query_groups: {groups} does not divide num_attention_heads={m.num_attention_heads}"
        )
    o = cfg.optimizer
    if not {"optimizer.lr", "optimizer.min_lr"} & bad and o.min_lr > o.lr:
        problems.append(f"optimizer.min_lr: {o.min_lr} is above optimizer.lr={o.lr}")
    if (problem := prompt_template_problem(ds.prompt_template)) is not None:
        problems.append(problem)
    if m.sequence_parallel and m.transformer_impl == "local":
        problems.append(
            "model.sequence_parallel: needs the Transformer Engine layer spec, not transformer_impl=local"
        )
    if m.attention_backend == "te" and m.transformer_impl == "local":
        problems.append(
            "model.attention_backend: te is Transformer Engine's attention; it needs transformer_impl "
            "transformer_engine (or auto), not local"
        )
    if ds.share_prompt == "true" and m.attention_backend == "te":
        problems.append(
            "dataset.share_prompt: true needs attention that keeps answers apart, but model.attention_backend=te "
            "(Transformer Engine's THD attention cannot express branches); use flex or sdpa, or share_prompt auto"
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
    lengths_ok = not {"dataset.max_tokens", "dataset.max_short_length", "dataset.max_long_length"} & bad
    share = bool(prompts_shared(cfg))  # where the machine decides, the larger (unshared) bound
    group_bound = (
        largest_group_tokens(cfg, share) if loss is not None and min(tp, cp) >= 1 and lengths_ok else None
    )
    if group_bound is not None and group_bound > ds.max_tokens:
        how = ", prompts shared" if share else ""
        problems.append(
            f"dataset.max_tokens: {ds.max_tokens} is below the largest possible group "
            f"({group_bound} tokens from max_short_length / max_long_length, padded{how}); raise it"
        )
    problems.extend(synthetic_problems(cfg))
    problems.extend(long_eval_problems(cfg))
    decay = cfg.scheduler.lr_decay_iters or t.train_iters
    iters_ok = not {"train.train_iters", "scheduler.lr_decay_iters", "scheduler.lr_warmup_iters"} & bad
    if iters_ok and cfg.scheduler.lr_warmup_iters >= max(1, decay):
        problems.append(
            f"scheduler.lr_warmup_iters: {cfg.scheduler.lr_warmup_iters} must be below the decay "
            f"iterations ({decay})"
        )
    return problems


def synthetic_problems(cfg: RecipeConfig) -> list[str]:
    """``dataset.synthetic``'s rejected kinds (when the recipe uses the synthetic data)."""
    from ..data.synthetic import REJECTED_KINDS

    s = cfg.dataset.synthetic
    if cfg.dataset.train_path is not None:
        return []
    problems = []
    unknown = [kind for kind in s.rejected_kinds if kind not in REJECTED_KINDS]
    if unknown or not s.rejected_kinds:
        problems.append(
            f"dataset.synthetic.rejected_kinds: must be a non-empty list of {', '.join(REJECTED_KINDS)}; "
            f"got {list(s.rejected_kinds)}"
        )
    if "in_context" in s.rejected_kinds and s.facts_per_context < 2:
        problems.append(
            "dataset.synthetic.rejected_kinds: in_context (a confounder's value) needs "
            f"dataset.synthetic.facts_per_context >= 2, got {s.facts_per_context}"
        )
    return problems


def long_eval_problems(cfg: RecipeConfig) -> list[str]:
    """``eval.long_lengths``: each a token count or a multiple, each once; and validation data to build from."""
    from ..data.eval_sets import parse_long_length

    problems, labels = [], []
    for i, value in enumerate(cfg.eval.long_lengths):
        try:
            labels.append(parse_long_length(value).label)
        except ValueError as error:
            problems.append(f"eval.long_lengths[{i}]: {error}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        problems.append(f"eval.long_lengths: {', '.join(repeated)} listed more than once")
    ds = cfg.dataset
    if cfg.eval.long_lengths and ds.train_path is not None and ds.valid_path is None:
        problems.append("eval.long_lengths: needs validation records to build from; set dataset.valid_path")
    return problems


def path_problems(
    cfg: RecipeConfig, *, check_reference: bool = True, check_run_state: bool = True, resuming: bool = True
) -> list[str]:
    """Problems of the files and packages a recipe needs on the machine that checks it, and of its
    reference store (``check_reference=False``, solopo-ref-logps: whether the store can be written).

    ``resuming=False`` (the reference pass, ``--eval-only``): a checkpoint trained on other roles is fine.
    ``check_run_state=False`` leaves out what one rank checks for the whole job: the run lock (a lock on
    another node cannot be judged from here) and the reference store's fingerprint (hashing the data).
    """
    problems = environment_problems() + _file_problems(cfg) + output_path_problems(cfg)
    problems.extend(checkpoint_problems(cfg, check_lock=check_run_state, check_objective=resuming))
    if any(p.startswith(ROLE_KEYS) for p in problems):
        return problems  # a store kept for the checkpoint's roles would only be called "other data"
    if not check_reference:
        problems.extend(store_target_problems(cfg))
    elif check_run_state and _store_checkable(cfg):
        present, absent = reference_store_problems(cfg)
        problems.extend(present + absent)
    return problems


def dry_run_problems(cfg: RecipeConfig, world_size: int | None) -> tuple[list[str], list[str]]:
    """The dry run's (problems, what this machine lacks but a launch needs). A reference store that is
    here but wrong is a problem; missing files are only listed (a cluster recipe planned elsewhere)."""
    present, absent = reference_store_problems(cfg) if _store_checkable(cfg) else ([], [])
    c = cfg.checkpoint
    if any(path is not None and Path(path).exists() for path in (c.save, c.load)):
        present += checkpoint_problems(cfg)  # a bad checkpoint folder here fails before the allocation
    pretrained_here = c.pretrained_hf is not None and Path(c.pretrained_hf).is_dir()
    if pretrained_here:  # a pretrained folder on this machine is checked as the launch will check it
        present += _pretrained_problems(cfg)
    files = _file_problems(cfg, pretrained=not pretrained_here) + output_path_problems(cfg)
    return environment_problems() + config_problems(cfg, world_size) + present, files + absent


def _file_problems(cfg: RecipeConfig, *, pretrained: bool = True) -> list[str]:
    """Data, tokenizer, checkpoints, pretrained weights (``pretrained``) and wandb on this machine."""
    problems = []
    ds = cfg.dataset
    for key, path in (("dataset.train_path", ds.train_path), ("dataset.valid_path", ds.valid_path)):
        problem = input_file_problem(path) if path is not None else None
        if problem is not None:
            problems.append(f"{key}: file {path} {problem}")
    if not tokenizer_available(ds.tokenizer):
        problems.append(
            f"dataset.tokenizer: {ds.tokenizer!r} is neither 'tiny' nor a local tokenizer directory"
        )
    elif (problem := _tokenizer_problem(ds.tokenizer)) is not None:
        problems.append(problem)
    if cfg.checkpoint.load is not None and not Path(cfg.checkpoint.load).exists():
        problems.append(f"checkpoint.load: {cfg.checkpoint.load} does not exist")
    if pretrained:
        problems.extend(_pretrained_problems(cfg))
    if (problem := wandb_problem(cfg.logger)) is not None:
        problems.append(problem)
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
    """The Hugging Face checkpoint exists, its config.json is JSON, the model section describes it (key
    by key) and its vocabulary covers the tokenizer's ids (else their embedding rows stay untrained)."""
    path = cfg.checkpoint.pretrained_hf
    if path is None:
        return []
    config = Path(path) / "config.json"
    if not config.is_file():
        return [
            f"checkpoint.pretrained_hf: {path} is not a Hugging Face checkpoint directory (no config.json)"
        ]
    try:
        hf = json.loads(config.read_text())
        rows = int(hf["vocab_size"]) if isinstance(hf, dict) else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = "has no vocab_size" if isinstance(error, KeyError) else f"cannot be read ({error})"
        return [f"checkpoint.pretrained_hf: {config} {reason}; restore the checkpoint's config.json"]
    if rows is None:
        return [
            f"checkpoint.pretrained_hf: {config} is not a JSON object; restore the checkpoint's config.json"
        ]
    from .hf_config import check_model_matches_hf

    problems = [
        f"{problem} (checkpoint.pretrained_hf={path})" for problem in check_model_matches_hf(cfg.model, hf)
    ]
    tokens = _tokenizer_size(cfg.dataset.tokenizer)
    if tokens is not None and rows < tokens:
        problems.append(
            f"checkpoint.pretrained_hf: {path} has a vocabulary of {rows} (config.json vocab_size), fewer "
            f"than dataset.tokenizer's {tokens} tokens: ids {rows}..{tokens - 1} would have untrained "
            "embedding rows. Use the checkpoint's own tokenizer (dataset.tokenizer=<its folder>)"
        )
    return problems


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str) -> tuple[Any, str | None]:
    """(``dataset.tokenizer`` loaded, or None; the problem, by key), once per name for all the checks."""
    from ..data.errors import DataError
    from ..data.tokenize import load_tokenizer

    try:
        return load_tokenizer(name, "dataset.tokenizer"), None
    except DataError as error:
        return None, str(error)


def _tokenizer_problem(name: str) -> str | None:
    return _load_tokenizer(name)[1] if tokenizer_available(name) else None


def _tokenizer_size(name: str) -> int | None:
    """``len(tokenizer)`` of ``dataset.tokenizer``, or None where it cannot be loaded (reported by key)."""
    if not tokenizer_available(name):
        return None
    tokenizer, _ = _load_tokenizer(name)
    return None if tokenizer is None else len(tokenizer)


def _store_checkable(cfg: RecipeConfig) -> bool:
    """Whether the loss needs a store and the keys its fingerprint is built from are sound (else they
    are reported by key, and the data cannot be encoded to fingerprint it)."""
    if not _loss_ok(cfg) or not cfg.solopo.loss_config().needs_reference:
        return False
    if prompt_template_problem(cfg.dataset.prompt_template) is not None:
        return False
    return not any(p.startswith("dataset.") for p in bound_problems(cfg))


def reference_store_problems(cfg: RecipeConfig) -> tuple[list[str], list[str]]:
    """(problems of a reference store that exists on this machine: not a store, built for other data,
    incomplete; the problem of one that does not exist while the recipe needs it)."""
    from ..data.errors import DataError
    from ..data.reference_store import read_store_header
    from .sources import expected_reference_fingerprint, resolve_reference_store

    s = cfg.solopo
    tokenizer_here = tokenizer_available(cfg.dataset.tokenizer)
    if tokenizer_here and _tokenizer_problem(cfg.dataset.tokenizer) is not None:
        return [], []  # reported as a dataset.tokenizer problem: no fingerprint can be computed
    if not tokenizer_here and not s.reference_store:
        return [], []  # reported as a dataset.tokenizer problem; the default path needs the fingerprint
    try:
        # Without the tokenizer the fingerprint is unknown: a named store is still checked for being whole.
        expected = expected_reference_fingerprint(cfg) if tokenizer_here else None
        path = resolve_reference_store(cfg, expected)
        if path is None or not path.exists():
            if s.compute_reference_if_missing:
                return [], []
            where = (
                f"{s.reference_store} does not exist"
                if s.reference_store
                else f"is not set and the default {path} does not exist"
                if path
                else "is not set"
            )
            return [], [
                f"solopo.reference_store: dpo needs reference log-probs, and the store {where} "
                "(run solopo-ref-logps, or set solopo.compute_reference_if_missing=true)"
            ]
        read_store_header(path, data_fingerprint=expected)
    except (DataError, OSError) as error:
        return [f"solopo.reference_store: {error}"], []
    return [], []


def store_target_problems(cfg: RecipeConfig) -> list[str]:
    """Why ``solopo-ref-logps`` could not write its store (checked before anything is computed): the
    path is a directory, a folder on the way is a file, or the nearest existing folder is read-only."""
    from .sources import default_reference_store_path

    if cfg.solopo.reference_store:
        key, target = "solopo.reference_store", Path(cfg.solopo.reference_store)
        if target.is_dir():
            return [
                f"{key}: {target} is a directory; name the store file "
                f"(e.g. {target / 'reference_logps.jsonl'})"
            ]
        folder = target.parent
    else:  # the default path is keyed by the data's fingerprint; its folder does not depend on it
        key = "solopo.reference_store (unset: the default under dataset.cache_dir)"
        folder = default_reference_store_path(cfg, "any").parent
    existing, problem = nearest_existing(folder)
    if problem == "is a file":
        return [f"{key}: {existing} is a file, not a folder, so the store cannot be written under it"]
    if problem is not None:
        return [f"{key}: folder {existing} is not writable, so the store cannot be written there"]
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
    check_run_state: bool = True,
    resuming: bool = True,
) -> None:
    """Raises RecipeError listing every problem (each with its key) before any process group exists.

    ``check_reference=False`` for solopo-ref-logps, which writes the store; ``check_paths=False`` for
    the dry run, which may plan a cluster recipe on a machine without its files.
    """
    raise_problems(
        recipe_problems(
            cfg,
            world_size,
            check_reference=check_reference,
            check_paths=check_paths,
            check_run_state=check_run_state,
            resuming=resuming,
        )
    )


def raise_problems(problems: list[str]) -> None:
    """RecipeError listing ``problems``, one per line, if there are any."""
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))
