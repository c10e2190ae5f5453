"""Recipe schema: Megatron-Core key names in Megatron-Bridge-style sections plus ``solopo:``.

Recipes are OmegaConf YAML files; ``load_config(path, overrides)`` merges them over this schema
(unknown keys and wrong types are errors naming the key) and applies Hydra-style ``a.b=c``
overrides. ``train.global_batch_size`` counts examples (preference groups), not sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class LoggerSection:
    metrics_file: str | None = None  # JSON lines: one object per step (train metrics, eval when run)


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
    rng: RngSection = field(default_factory=RngSection)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Schema defaults <- recipe YAML <- ``key=value`` overrides; returns a typed RecipeConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(RecipeConfig)
    try:
        layers = [schema]
        if path is not None:
            layers.append(OmegaConf.load(path))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}{error}".strip()) from None
    try:
        config.solopo.loss_config()  # validates the loss keys
    except ValueError as error:
        raise ValueError(str(error).replace("SoLoPOConfig.", "solopo.")) from None
    return config


def to_dict(config: RecipeConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
