"""Recipe schema: Megatron-Core key names in Megatron-Bridge-style sections plus ``solopo:``.

Recipes are OmegaConf YAML files that may inherit from others (``defaults:``);
``load_config(path, overrides)`` merges them over this schema (unknown keys and wrong types are
errors naming the key and the file) and applies Hydra-style overrides. ``train.global_batch_size`` counts examples (preference groups), not sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from .objectives import SoLoPOConfig


@dataclass
class ModelSection:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention
    kv_channels: int | None = None
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    add_qkv_bias: bool = False
    share_embeddings_and_output_weights: bool = False
    rotary_base: int = 10000
    rope_scaling: bool = False  # Llama-3.1 style RoPE frequency scaling
    rope_scaling_factor: float = 8.0
    vocab_size: int | None = None  # None: the tokenizer's (or the pretrained_hf checkpoint's, if larger)
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    cp_comm_type: str = "p2p"
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # full | selective
    recompute_method: str | None = None  # uniform | block (full recompute)
    recompute_num_layers: int | None = None
    transformer_impl: str = "auto"  # auto (TE when importable) | transformer_engine | local
    bf16: bool | None = None  # None: bf16 on CUDA, fp32 on CPU
    use_cpu_initialization: bool | None = None  # None: only without CUDA (true: same init on any device)


@dataclass
class TrainSection:
    global_batch_size: int = 16  # examples per optimizer step, over all DP ranks
    micro_batch_size: int = 1  # packed rows per microbatch; a row holds several whole groups
    train_iters: int = 100
    max_skipped_steps_in_a_row: int = 3  # non-finite loss or gradients: skip the update; stop after this many
    eval_interval: int | None = None
    eval_iters: int | None = None  # None: the whole validation set
    log_interval: int = 10


@dataclass
class OptimizerSection:
    optimizer: str = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


@dataclass
class SchedulerSection:
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train.train_iters
    lr_decay_style: str = "cosine"  # constant | linear | cosine


@dataclass
class SyntheticSection:
    num_train: int = 512
    num_valid: int = 64
    seed: int = 0
    long_target_words: int = 120


@dataclass
class DatasetSection:
    train_path: str | None = None  # None: the bundled synthetic data (dataset.synthetic)
    valid_path: str | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    tokenizer: str = "tiny"
    prompt_template: str = "{context}\n\nQuestion: {question}"
    system_prompt: str | None = None
    max_short_length: int | None = None
    max_long_length: int | None = None
    truncate_long_context: bool = False
    max_tokens: int = 2048  # tokens per packed microbatch row (whole sequences, before CP sharding)
    on_error: str = "raise"  # raise | skip
    cache_dir: str | None = None


@dataclass
class SolopoSection:
    mode: str = "solopo"
    preference_loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    sft_loss_weight: float = 0.0
    solo_ra_weight: float = 1.0
    solo_ra_chosen_only: bool = True
    solo_ra_distance: str = "abs"
    reference_store: str | None = None  # reference log-prob store (dpo); see solopo-ref-logps
    compute_reference_if_missing: bool = True  # compute it from the initial weights before training
    inplace_logits_backward: bool = True  # Triton path: write the logits' gradient into their buffer

    def loss_config(self) -> SoLoPOConfig:
        names = {f.name for f in dataclasses.fields(SoLoPOConfig)}
        return SoLoPOConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class CheckpointSection:
    save: str | None = None  # checkpoint root; training resumes from its latest checkpoint if one exists
    load: str | None = None  # resume from this root (its latest) or this iter_* directory instead
    save_interval: int | None = None  # steps between saves (and always at the end when save is set)
    keep_last: int | None = None  # keep only the newest N checkpoints (None: all)
    pretrained_hf: str | None = None  # initial weights: a Hugging Face Llama / Qwen2 directory (unless resuming)


@dataclass
class LoggerSection:
    metrics_file: str | None = None  # JSON lines: one object per step (train metrics, eval when run)
    tensorboard_dir: str | None = None  # TensorBoard event files (train/<metric>, eval/<metric>)
    wandb_project: str | None = None  # Weights & Biases project (needs `pip install wandb`); None: off
    wandb_run_name: str | None = None
    wandb_run_id: str | None = None  # set it to continue the same wandb run after a resume
    wandb_mode: str = "online"  # online | offline | disabled
    peak_tflops_per_gpu: float | None = None  # for MFU; None: known GPUs by name (dense bf16), else no MFU


@dataclass
class ClusterSection:
    """What the recipe is laid out for: the dry-run planner's world size and memory budget.
    A launch takes its world size from torchrun (WORLD_SIZE); these keys do not bind it."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class RngSection:
    seed: int = 1234


@dataclass
class RecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    solopo: SolopoSection = field(default_factory=SolopoSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logger: LoggerSection = field(default_factory=LoggerSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    rng: RngSection = field(default_factory=RngSection)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Schema defaults <- recipe YAML (with its ``defaults:`` chain) <- overrides; a typed RecipeConfig.

    Overrides edit the recipe layer, Hydra style: ``a.b=c`` sets a schema key, ``+a.b=c`` sets a key
    the recipe does not set yet (an error if it does), ``++a.b=c`` sets it either way, and ``~a.b``
    removes the recipe's value so the schema default applies again.
    """
    from omegaconf import OmegaConf

    recipe = load_recipe_layers(Path(path)) if path is not None else OmegaConf.create()
    for override in overrides:
        recipe = apply_override(recipe, override)
    config = OmegaConf.to_object(_merge_onto_schema(recipe, "overrides" if overrides else str(path)))
    try:
        config.solopo.loss_config()  # validates the loss keys
    except ValueError as error:
        raise ValueError(str(error).replace("SoLoPOConfig.", "solopo.")) from None
    return config


def _merge_onto_schema(layer, where: str):
    """Merges one untyped layer onto the typed schema; unknown keys and bad types name the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(OmegaConf.structured(RecipeConfig), layer)
    except OmegaConfBaseException as error:
        raise ValueError(f"{where}: {error}".strip()) from None


def load_recipe_layers(path: Path, _chain: tuple[Path, ...] = ()):
    """One recipe file merged over its ``defaults:`` (paths relative to the file, earlier first;
    ``_self_`` marks where the file's own keys go, last when absent). Each file is checked against the
    schema on its own, so a bad key is reported with the file that has it."""
    import yaml
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = path.resolve()
    if path in _chain:
        raise ValueError(f"{path}: defaults form a cycle: {' -> '.join(p.name for p in (*_chain, path))}")
    if not path.is_file():
        where = f"{_chain[-1]}: defaults: " if _chain else ""
        raise ValueError(f"{where}recipe {path} does not exist")
    try:
        own = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as error:  # syntax errors carry the line
        raise ValueError(f"{path}: {error}") from None
    if not isinstance(own, DictConfig):
        raise ValueError(f"{path}: a recipe is a mapping of sections, got {type(own).__name__}")
    entries = own.pop("defaults", None)
    entries = [] if entries is None else entries
    if not isinstance(entries, (ListConfig, list)):
        raise ValueError(f"{path}: defaults: must be a list of recipe paths, got {entries!r}")
    own_keys = OmegaConf.create(own)
    _merge_onto_schema(own_keys, str(path))
    entries = list(entries)
    if "_self_" not in entries:
        entries.append("_self_")
    layers = []
    for i, entry in enumerate(entries):
        if entry == "_self_":
            layers.append(own_keys)
        elif isinstance(entry, str):
            base = path.parent / (entry if entry.endswith((".yaml", ".yml")) else f"{entry}.yaml")
            layers.append(load_recipe_layers(base, (*_chain, path)))
        else:
            raise ValueError(f"{path}: defaults[{i}]: entries are recipe paths relative to this file "
                             f"(config groups are not supported), got {entry!r}")
    return OmegaConf.merge(*layers)


_ABSENT = object()


def apply_override(recipe, override: str):
    """Applies one ``a.b=c`` / ``+a.b=c`` / ``++a.b=c`` / ``~a.b`` override to the recipe layer."""
    from omegaconf import OmegaConf

    if override.startswith("~"):
        key = override[1:].split("=", 1)[0]
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(recipe, parent_key) if parent_key else recipe
        if parent is None or leaf not in parent:
            raise ValueError(f"override {override!r}: the recipe does not set {key}, so there is nothing to remove")
        del parent[leaf]
        return recipe
    key, sep, _ = override.partition("=")
    if not sep or not key.strip("+"):
        raise ValueError(f"override {override!r}: expected key=value, +key=value, ++key=value or ~key")
    add = key.startswith("+") and not key.startswith("++")  # ``++`` sets whether or not the recipe has it
    key = key.lstrip("+")
    if add and OmegaConf.select(recipe, key, default=_ABSENT) is not _ABSENT:
        raise ValueError(f"override {override!r}: the recipe already sets {key}; use {key}=... or ++{key}=...")
    value = OmegaConf.from_dotlist([f"{key}={override.partition('=')[2]}"])
    _merge_onto_schema(value, f"override {override!r}")  # unknown key or wrong type, with a suggestion
    return OmegaConf.merge(recipe, value)


def to_dict(config: RecipeConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
