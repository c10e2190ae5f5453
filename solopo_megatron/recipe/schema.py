"""Recipe schema: Megatron-Core key names in Megatron-Bridge-style sections plus ``solopo:``.

``recipe.loading.load_config`` reads YAML recipes onto these dataclasses.
``train.global_batch_size`` counts examples (preference groups), not sequences.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..objectives import SoLoPOConfig


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of ``choices`` (checked by ``recipe.validation`` before launch)."""
    return field(default=default, metadata={"choices": choices})


def field_choices(section: Any) -> dict[str, tuple]:
    """{field name: allowed values} of a section's choice-valued fields."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(section) if "choices" in f.metadata}


@dataclass(frozen=True)
class Bounds:
    """A numeric field's allowed range, checked by ``recipe.validation`` before launch. Floats must
    also be finite; an unset (None) optional value always passes."""

    low: float | None = None
    low_open: bool = False  # True: ``> low``, else ``>= low``
    high: float | None = None
    high_open: bool = False  # True: ``< high``, else ``<= high``

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range (``must be ..., got ...``), or None."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return None if low_ok and high_ok else f"must be {self.describe(value)}, got {value}"

    def describe(self, value: Any = 0.0) -> str:
        """The range in words: ``>= 1`` (a positive integer), ``> 0``, ``in [0, 1)``."""
        low = self.low
        if isinstance(value, int) and low is not None and self.low_open and float(low).is_integer():
            low, low_open = int(low) + 1, False  # integers: "> 0" reads better as ">= 1"
        else:
            low_open = self.low_open
        if low is not None and self.high is not None:
            return f"in {'(' if low_open else '['}{low}, {self.high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{'>' if low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return "a finite number"


def bounded(default: Any, bounds: Bounds) -> Any:
    """A numeric field limited to ``bounds`` (checked by ``recipe.validation`` before launch)."""
    return field(default=default, metadata={"bounds": bounds})


def positive(default: Any) -> Any:
    """A size, count or interval that must be > 0 (integers: >= 1) when set."""
    return bounded(default, Bounds(low=0, low_open=True))


def at_least(default: Any, minimum: float) -> Any:
    """A number that must be >= ``minimum`` (and finite) when set."""
    return bounded(default, Bounds(low=minimum))


def fraction(default: Any) -> Any:
    """A probability-like number in [0, 1): dropout rates, Adam betas."""
    return bounded(default, Bounds(low=0, high=1, high_open=True))


def field_bounds(section: Any) -> dict[str, Bounds]:
    """{field name: allowed range} of a section's bounded numeric fields."""
    return {f.name: f.metadata["bounds"] for f in dataclasses.fields(section) if "bounds" in f.metadata}


# model.* keys that only change how the same weights are split over ranks or recomputed: the initial
# weights, their log-probs and a checkpoint's tensors are the same whatever their values.
LAYOUT_MODEL_KEYS = frozenset(
    {
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "cp_comm_type",
        "sequence_parallel",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
    }
)


@dataclass
class ModelSection:
    """``model:``: the architecture and its parallel layout (Megatron-Core names)."""

    num_layers: int = positive(2)
    hidden_size: int = positive(64)
    ffn_hidden_size: int = positive(176)
    num_attention_heads: int = positive(4)
    num_query_groups: int | None = positive(None)  # None: multi-head attention
    kv_channels: int | None = positive(None)
    normalization: str = choice("RMSNorm", "RMSNorm", "LayerNorm")
    layernorm_epsilon: float = positive(1e-6)
    add_qkv_bias: bool = False
    share_embeddings_and_output_weights: bool = False
    rotary_base: int = positive(10000)
    rope_scaling: bool = False  # Llama-3.1 style RoPE frequency scaling
    rope_scaling_factor: float = positive(8.0)
    vocab_size: int | None = positive(
        None
    )  # None: the tokenizer's (or the pretrained_hf checkpoint's, if larger)
    make_vocab_size_divisible_by: int = positive(128)
    init_method_std: float = positive(0.02)
    attention_dropout: float = fraction(0.0)
    hidden_dropout: float = fraction(0.0)
    tensor_model_parallel_size: int = positive(1)
    pipeline_model_parallel_size: int = positive(1)
    context_parallel_size: int = positive(1)
    cp_comm_type: str = choice("p2p", "p2p", "all_gather", "a2a")  # a2a+p2p needs hierarchical CP groups
    sequence_parallel: bool = False
    recompute_granularity: str | None = choice(None, None, "full", "selective")
    recompute_method: str | None = choice(None, None, "uniform", "block")  # block/uniform: full recompute
    recompute_num_layers: int | None = positive(None)
    transformer_impl: str = choice("auto", "auto", "transformer_engine", "local")  # auto: TE when importable
    # Core attention: te (TE's fused THD + CP), flex (torch flex_attention, CUDA), sdpa (per-sequence
    # torch SDPA); auto: te with the TE spec, else flex on CUDA, else sdpa. (docs/recipes.md, How a step runs)
    attention_backend: str = choice("auto", "auto", "te", "flex", "sdpa")
    # response_only: the LM head and log-probs run on the scored (response) positions only; full: on
    # every token (the [t, V/tp] logits; kept for comparison and the equality tests).
    logits: str = choice("response_only", "response_only", "full")
    bf16: bool | None = None  # None: bf16 on CUDA, fp32 on CPU
    use_cpu_initialization: bool | None = None  # None: only without CUDA (true: same init on any device)


@dataclass
class TrainSection:
    """``train:``: batch size, steps, evaluation and logging intervals."""

    global_batch_size: int = positive(16)  # examples per optimizer step, over all DP ranks
    micro_batch_size: int = 1  # packed rows per microbatch; a row holds several whole groups
    train_iters: int = positive(100)
    max_skipped_steps_in_a_row: int = positive(
        3
    )  # non-finite loss or gradients: skip the update; stop after this many
    eval_interval: int | None = positive(None)
    eval_at_start: bool = True  # with eval_interval: also evaluate the initial weights (step 0)
    eval_iters: int | None = positive(None)  # None: the whole validation set
    log_interval: int = positive(10)


@dataclass
class OptimizerSection:
    """``optimizer:``: Megatron's optimizer settings."""

    optimizer: str = choice("adam", "adam", "sgd")
    lr: float = positive(1e-3)
    min_lr: float = at_least(0.0, 0)  # at most lr
    weight_decay: float = at_least(0.0, 0)
    adam_beta1: float = fraction(0.9)
    adam_beta2: float = fraction(0.999)
    adam_eps: float = positive(1e-8)
    clip_grad: float = at_least(1.0, 0)  # 0: no clipping
    use_distributed_optimizer: bool = False


@dataclass
class SchedulerSection:
    """``scheduler:``: learning-rate warmup and decay."""

    lr_warmup_iters: int = at_least(0, 0)
    lr_decay_iters: int | None = positive(None)  # None: train.train_iters
    lr_decay_style: str = choice("cosine", "constant", "linear", "cosine", "inverse-square-root")


@dataclass
class SyntheticSection:
    """``dataset.synthetic:``: the bundled synthetic data used when no train file is given."""

    num_train: int = positive(512)
    num_valid: int = positive(64)
    seed: int = 0
    long_target_words: int = at_least(120, 0)
    # Facts stated per context (the asked one + confounders: the same attribute of other subjects).
    facts_per_context: int = positive(1)
    # Per record, one of: wrong (a value not in the context), unanswerable, in_context (a
    # confounder's value; needs facts_per_context >= 2).
    rejected_kinds: list[str] = field(default_factory=lambda: ["wrong", "unanswerable"])


@dataclass
class DatasetSection:
    """``dataset:``: files, tokenizer, prompt format, length limits and packing budget."""

    train_path: str | None = None  # None: the bundled synthetic data (dataset.synthetic)
    valid_path: str | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    tokenizer: str = "tiny"
    prompt_template: str = "{context}\n\nQuestion: {question}"
    system_prompt: str | None = None
    max_short_length: int | None = positive(None)
    max_long_length: int | None = positive(None)
    truncate_long_context: bool = False
    max_tokens: int = positive(2048)  # tokens per packed microbatch row (whole sequences, before CP sharding)
    on_error: str = choice("raise", "raise", "skip")  # skip: drop bad records, report counts
    cache_dir: str | None = None
    # The answers of one context share one forward of its prompt (chosen and rejected; the long pair
    # under long_po and solopo with solo_ra_chosen_only=false). auto: wherever the attention can
    # express branches (not Transformer Engine's); true: an error where it cannot; false: never.
    share_prompt: str = choice("auto", "auto", "true", "false")

    def __post_init__(self) -> None:
        # YAML and override booleans (true, false, on, off) reach this str field as "True" / "False".
        if self.share_prompt in ("True", "False"):
            self.share_prompt = self.share_prompt.lower()


def _loss_config(self) -> SoLoPOConfig:
    """The loss's keys of this section as a validated SoLoPOConfig (ValueError naming the key)."""
    return SoLoPOConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SoLoPOConfig)})


@dataclass
class _RunSettings:
    """The ``solopo:`` keys of a run beyond the loss's own."""

    reference_store: str | None = None  # reference log-prob store (dpo); see solopo-ref-logps
    compute_reference_if_missing: bool = True  # else compute it from the initial weights before training
    inplace_logits_backward: bool = True  # Triton path: write the logits' gradient into their buffer


def _field_specs(cls: type) -> list[tuple[str, Any, Any]]:
    """A dataclass's fields as ``make_dataclass`` specs, with their types resolved for OmegaConf."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(cls)]


# ``solopo:``: every SoLoPOConfig field (same names, types and defaults: the loss owns them), then the
# run's settings.
SolopoSection = dataclasses.make_dataclass(
    "SolopoSection",
    _field_specs(SoLoPOConfig) + _field_specs(_RunSettings),
    namespace={"loss_config": _loss_config, "__module__": __name__},
)


@dataclass
class CheckpointSection:
    """``checkpoint:``: where to save and resume, and initial Hugging Face weights."""

    save: str | None = None  # checkpoint root; training resumes from its latest checkpoint if one exists
    load: str | None = None  # resume from this root (its latest) or this iter_* directory instead
    save_interval: int | None = positive(None)  # steps between saves (and always at the end when save is set)
    keep_last: int | None = positive(None)  # keep only the newest N checkpoints (None: all)
    pretrained_hf: str | None = (
        None  # initial weights: a Hugging Face Llama / Qwen2 directory (unless resuming)
    )


@dataclass
class EvalSection:
    """``eval:``: held-out long contexts at several lengths, scored on every ``train.eval_interval``.

    Each validation record's short context is buried anew among distractor documents (the
    short-to-long construction, evidence at a random depth, deterministic per ``seed`` and record)
    at every length of ``long_lengths``: a token count (``4096``) or a multiple of the record's own
    long context (``2x``). Distractors are the validation long contexts' non-evidence documents."""

    long_lengths: list[str] = field(default_factory=list)  # [] : no long-context evaluation
    num_records: int | None = positive(None)  # validation records used (None: all)
    seed: int = at_least(0, 0)
    # Score every candidate answer of records with metadata.candidates (answer_accuracy): one more long
    # sequence per candidate; false skips them (the reward accuracy of chosen vs rejected stays)
    answer_accuracy: bool = True


@dataclass
class LoggerSection:
    """``logger:``: metrics file, TensorBoard, wandb and the MFU peak."""

    metrics_file: str | None = None  # JSON lines: one object per step (train metrics, eval when run)
    # JSON lines: per evaluation, one row per held-out record and eval.long_lengths length (its
    # reward margins and decisions under the short and the long context): for paired statistics
    eval_records_file: str | None = None
    tensorboard_dir: str | None = None  # TensorBoard event files (train/<metric>, eval/<metric>)
    wandb_project: str | None = None  # Weights & Biases project (needs `pip install wandb`); None: off
    wandb_run_name: str | None = None
    wandb_run_id: str | None = None  # set it to continue the same wandb run after a resume
    wandb_mode: str = choice("online", "online", "offline", "disabled")
    peak_tflops_per_gpu: float | None = positive(
        None
    )  # for MFU; None: known GPUs by name (dense bf16), else no MFU


@dataclass
class ClusterSection:
    """What the recipe is laid out for: the dry-run planner's world size and memory budget.
    A launch takes its world size from torchrun (WORLD_SIZE); these keys do not bind it."""

    num_nodes: int = positive(1)
    gpus_per_node: int = positive(8)
    gpu_memory_gib: float = positive(80.0)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class RngSection:
    """``rng:``: the seed of initialisation and data order."""

    seed: int = at_least(1234, 0)


@dataclass
class RecipeConfig:
    """A whole recipe: every section, typed."""

    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    solopo: SolopoSection = field(default_factory=SolopoSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logger: LoggerSection = field(default_factory=LoggerSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    rng: RngSection = field(default_factory=RngSection)
