"""Recipe validation before any process group: one test per problem class, each naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from solopo_megatron.recipe.loading import load_config
from solopo_megatron.recipe.validation import RecipeError, validate_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"

CASES = {
    "world size": (
        ["model.tensor_model_parallel_size=2"],
        3,
        "tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size = 2 x 1 x 2 "
        "does not divide the world size 3",
    ),
    "max_tokens vs 2*cp": (
        ["dataset.max_tokens=2046"],
        2,
        "dataset.max_tokens: 2046 is not a multiple of 2 x context_parallel_size",
    ),
    "budget below largest group": (
        ["dataset.max_short_length=512", "dataset.max_long_length=4096"],
        2,
        "dataset.max_tokens: 2048 is below the largest possible group (5120 tokens",
    ),
    "dpo without store": (
        # an empty cache: a store another run left in the default cache must not satisfy this case
        ["solopo.compute_reference_if_missing=false", "dataset.cache_dir=/nope/cache"],
        2,
        "solopo.reference_store: dpo needs reference log-probs, and the store is not set",
    ),
    "store missing": (
        ["solopo.compute_reference_if_missing=false", "solopo.reference_store=/nope/ref.jsonl"],
        2,
        "solopo.reference_store: dpo needs reference log-probs, and the store /nope/ref.jsonl does not exist",
    ),
    "data file is a directory": (
        ["dataset.train_path=/tmp"],
        2,
        "dataset.train_path: file /tmp is a directory, not a data file",
    ),
    "missing data file": (
        ["dataset.train_path=/nope/train.jsonl"],
        2,
        "dataset.train_path: file /nope/train.jsonl does not exist",
    ),
    "missing tokenizer": (
        ["dataset.tokenizer=/nope/tok"],
        2,
        "dataset.tokenizer: '/nope/tok' is neither 'tiny'",
    ),
    "missing checkpoint": (["checkpoint.load=/nope/ckpt"], 2, "checkpoint.load: /nope/ckpt does not exist"),
    "micro batch": (["train.micro_batch_size=2"], 2, "train.micro_batch_size: must be 1"),
    "heads vs tp": (
        ["model.tensor_model_parallel_size=4", "model.context_parallel_size=1"],
        4,
        "model.num_attention_heads / num_query_groups: 4 / 2 must be divisible by tensor_model_parallel_size=4",
    ),
    "layers vs pp": (
        ["model.pipeline_model_parallel_size=3", "model.context_parallel_size=1"],
        3,
        "model.num_layers: 2 is not divisible by pipeline_model_parallel_size=3",
    ),
    "sequence parallel local": (
        ["model.sequence_parallel=true", "model.transformer_impl=local"],
        2,
        "model.sequence_parallel: needs the Transformer Engine layer spec",
    ),
    "warmup": (
        ["scheduler.lr_warmup_iters=500"],
        2,
        "scheduler.lr_warmup_iters: 500 must be below the decay iterations (200)",
    ),
    "bad on_error": (
        ["dataset.on_error=ignore"],
        2,
        "dataset.on_error: must be one of raise, skip; got 'ignore'",
    ),
    # String choices fail here, before launch, not when Megatron builds the model or the scheduler.
    "te attention on the local spec": (
        ["model.attention_backend=te", "model.transformer_impl=local"],
        2,
        "model.attention_backend: te is Transformer Engine's attention; it needs transformer_impl",
    ),
    "logits typo": (
        ["model.logits=response"],
        2,
        "model.logits: must be one of response_only, full; got 'response'",
    ),
    "transformer_impl typo": (
        ["model.transformer_impl=te"],
        2,
        "model.transformer_impl: must be one of auto, transformer_engine, local; got 'te'",
    ),
    "recompute typo": (
        ["model.recompute_granularity=ful"],
        2,
        "model.recompute_granularity: must be one of null, full, selective; got 'ful'",
    ),
    "recompute method typo": (
        ["model.recompute_method=blocks"],
        2,
        "model.recompute_method: must be one of null, uniform, block; got 'blocks'",
    ),
    "cp_comm_type typo": (
        ["model.cp_comm_type=allgather"],
        2,
        "model.cp_comm_type: must be one of p2p, all_gather, a2a; got 'allgather'",
    ),
    "decay style typo": (
        ["scheduler.lr_decay_style=cosin"],
        2,
        "scheduler.lr_decay_style: must be one of constant, linear, cosine, inverse-square-root; got 'cosin'",
    ),
    "optimizer typo": (
        ["optimizer.optimizer=adamw"],
        2,
        "optimizer.optimizer: must be one of adam, sgd; got 'adamw'",
    ),
    "normalization typo": (
        ["model.normalization=rmsnorm"],
        2,
        "model.normalization: must be one of RMSNorm, LayerNorm; got 'rmsnorm'",
    ),
    "wandb mode": (
        ["logger.wandb_mode=sometimes"],
        2,
        "logger.wandb_mode: must be one of online, offline, disabled; got 'sometimes'",
    ),
    # Sizes, counts and intervals (schema ``positive``): each named by its key, not a Megatron assert.
    "hidden size zero": (["model.hidden_size=0"], 2, "model.hidden_size: must be >= 1, got 0"),
    "layers negative": (["model.num_layers=-2"], 2, "model.num_layers: must be >= 1, got -2"),
    "query groups zero": (["model.num_query_groups=0"], 2, "model.num_query_groups: must be >= 1, got 0"),
    "query groups vs heads": (
        ["model.num_query_groups=3"],
        2,
        "model.num_query_groups: 3 does not divide num_attention_heads=4",
    ),
    "vocab multiple zero": (
        ["model.make_vocab_size_divisible_by=0"],
        2,
        "model.make_vocab_size_divisible_by: must be >= 1, got 0",
    ),
    "log interval zero": (["train.log_interval=0"], 2, "train.log_interval: must be >= 1, got 0"),
    "eval interval zero": (["train.eval_interval=0"], 2, "train.eval_interval: must be >= 1, got 0"),
    "skipped steps zero": (
        ["train.max_skipped_steps_in_a_row=0"],
        2,
        "train.max_skipped_steps_in_a_row: must be >= 1, got 0",
    ),
    "max length zero": (["dataset.max_long_length=0"], 2, "dataset.max_long_length: must be >= 1, got 0"),
    "synthetic count zero": (
        ["dataset.synthetic.num_train=0"],
        2,
        "dataset.synthetic.num_train: must be >= 1, got 0",
    ),
    "keep_last zero": (["checkpoint.keep_last=0"], 2, "checkpoint.keep_last: must be >= 1, got 0"),
    "cluster size zero": (["cluster.gpus_per_node=0"], 2, "cluster.gpus_per_node: must be >= 1, got 0"),
    # Floats: finite and in range (schema ``positive`` / ``at_least`` / ``fraction``).
    "lr zero": (["optimizer.lr=0"], 2, "optimizer.lr: must be > 0, got 0.0"),
    "lr nan": (["optimizer.lr=nan"], 2, "optimizer.lr: must be a finite number, got nan"),
    "lr infinite": (["optimizer.lr=.inf"], 2, "optimizer.lr: must be a finite number, got inf"),
    "min_lr above lr": (["optimizer.min_lr=0.01"], 2, "optimizer.min_lr: 0.01 is above optimizer.lr=0.003"),
    "weight decay negative": (
        ["optimizer.weight_decay=-0.1"],
        2,
        "optimizer.weight_decay: must be >= 0, got -0.1",
    ),
    "adam eps zero": (["optimizer.adam_eps=0"], 2, "optimizer.adam_eps: must be > 0, got 0.0"),
    "adam beta one": (["optimizer.adam_beta2=1.0"], 2, "optimizer.adam_beta2: must be in [0, 1), got 1.0"),
    "clip_grad negative": (["optimizer.clip_grad=-1"], 2, "optimizer.clip_grad: must be >= 0, got -1.0"),
    "dropout one": (["model.hidden_dropout=1.0"], 2, "model.hidden_dropout: must be in [0, 1), got 1.0"),
    "layernorm epsilon zero": (
        ["model.layernorm_epsilon=0"],
        2,
        "model.layernorm_epsilon: must be > 0, got 0.0",
    ),
    "init std zero": (["model.init_method_std=0"], 2, "model.init_method_std: must be > 0, got 0.0"),
    "peak tflops zero": (
        ["logger.peak_tflops_per_gpu=0"],
        2,
        "logger.peak_tflops_per_gpu: must be > 0, got 0.0",
    ),
    "gpu memory infinite": (
        ["cluster.gpu_memory_gib=.inf"],
        2,
        "cluster.gpu_memory_gib: must be a finite number, got inf",
    ),
    # The synthetic data's rejected kinds and the long-context evaluation's lengths.
    "synthetic kind unknown": (
        ["dataset.synthetic.rejected_kinds=[wrong,odd]"],
        2,
        "dataset.synthetic.rejected_kinds: must be a non-empty list of wrong, unanswerable, in_context",
    ),
    "in_context with one fact": (
        ["dataset.synthetic.rejected_kinds=[in_context]"],
        2,
        "in_context (a confounder's value) needs dataset.synthetic.facts_per_context >= 2, got 1",
    ),
    "long length unreadable": (
        ["eval.long_lengths=[2x,long]"],
        2,
        "eval.long_lengths[1]: must be a positive token count (4096) or a multiple of the long context (2x)",
    ),
    "long length zero": (["eval.long_lengths=[0x]"], 2, "eval.long_lengths[0]: must be a positive"),
    "long length twice": (
        ["eval.long_lengths=[2x,2.0x,512]"],
        2,
        "eval.long_lengths: 2x listed more than once",
    ),
    "long eval without valid data": (
        ["dataset.train_path=t.jsonl", "eval.long_lengths=[2x]"],
        2,
        "eval.long_lengths: needs validation records to build from; set dataset.valid_path",
    ),
    # The prompt template: the data layer's rule, reported by key before anything is tokenised.
    "template without context": (
        ["dataset.prompt_template='Q: {question}'"],
        2,
        "dataset.prompt_template: must contain {context} and {question}",
    ),
    "template unknown placeholder": (
        ["dataset.prompt_template='{context} {query}'"],
        2,
        "dataset.prompt_template: unknown placeholder {query}",
    ),
    # Shared prompts: Transformer Engine's attention cannot keep the answers apart.
    "share_prompt with te": (
        ["dataset.share_prompt=true", "model.attention_backend=te"],
        2,
        "dataset.share_prompt: true needs attention that keeps answers apart, but model.attention_backend=te",
    ),
    "share_prompt unknown": (
        ["dataset.share_prompt=always"],
        2,
        "dataset.share_prompt: must be one of auto, true, false; got 'always'",
    ),
}


def test_bundled_recipe_is_valid():
    validate_recipe(load_config(RECIPE), world_size=2)


@pytest.mark.parametrize("case", list(CASES))
def test_problem_is_named_by_key(case):
    overrides, world, message = CASES[case]
    with pytest.raises(RecipeError) as info:
        validate_recipe(load_config(RECIPE, overrides), world_size=world)
    assert message in str(info.value)


def test_every_problem_is_listed_at_once():
    cfg = load_config(
        RECIPE, ["train.micro_batch_size=2", "dataset.on_error=ignore", "dataset.max_tokens=2046"]
    )
    with pytest.raises(RecipeError) as info:
        validate_recipe(cfg, world_size=2)
    assert str(info.value).count("\n  - ") == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.hiden_size=8"],
            "Key 'hiden_size' not in 'ModelSection'. Did you mean one of: 'hidden_size'",
        ),
        (["solopo.preference_loss=ipo"], "solopo.preference_loss must be one of dpo, simpo, orpo"),
        (["train.train_iters=many"], "train.train_iters"),
    ],
)
def test_schema_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(RECIPE, overrides)


def test_cli_reports_problems_without_starting(capsys):
    from solopo_megatron.train import main

    assert main(["--config", str(RECIPE), "train.micro_batch_size=3"]) == 2
    assert "train.micro_batch_size: must be 1" in capsys.readouterr().err


def _store_for(path: Path, fingerprint: str | None) -> None:
    from solopo_megatron.data.reference_store import ReferenceStore

    ReferenceStore(("short_chosen", "short_rejected"), data_fingerprint=fingerprint).save(path)


def test_store_that_does_not_match_the_data(tmp_path: Path):
    """Caught before any process group: the data files are hashed, nothing is tokenised."""
    from solopo_megatron.data.synthetic import generate_synthetic_records, write_jsonl
    from solopo_megatron.recipe.sources import expected_reference_fingerprint

    for name, seed in (("train", 0), ("valid", 1)):
        write_jsonl(
            generate_synthetic_records(4, seed=seed, long_target_words=40, id_prefix=name),
            tmp_path / f"{name}.jsonl",
        )
    store = tmp_path / "ref.jsonl"
    overrides = [
        f"dataset.train_path={tmp_path / 'train.jsonl'}",
        f"dataset.valid_path={tmp_path / 'valid.jsonl'}",
        f"solopo.reference_store={store}",
    ]
    cfg = load_config(RECIPE, overrides)
    _store_for(store, expected_reference_fingerprint(cfg))
    validate_recipe(cfg, world_size=2)  # the matching store passes

    changed = load_config(RECIPE, [*overrides, "dataset.prompt_template='Q: {question}\n{context}'"])
    with pytest.raises(
        RecipeError,
        match=r"solopo\.reference_store: .*ref\.jsonl:1: field 'data_fingerprint': "
        r"the store was built for other data or tokenisation",
    ):
        validate_recipe(changed, world_size=2)
    with open(tmp_path / "train.jsonl", "a") as handle:  # new records: another fingerprint too
        handle.write(
            (tmp_path / "valid.jsonl").read_text().splitlines()[0].replace('"valid-', '"extra-') + "\n"
        )
    with pytest.raises(RecipeError, match="field 'data_fingerprint'"):
        validate_recipe(cfg, world_size=2)


def test_store_that_is_not_a_store(tmp_path: Path):
    store = tmp_path / "ref.jsonl"
    store.write_text("{}\n")
    with pytest.raises(
        RecipeError, match=r"solopo\.reference_store: .*ref\.jsonl:1: not a reference log-prob store"
    ):
        validate_recipe(load_config(RECIPE, [f"solopo.reference_store={store}"]), world_size=2)


def test_solopo_section_is_built_from_the_loss_config():
    """The recipe's solopo: keys are SoLoPOConfig's fields (same defaults) plus the run's store settings."""
    import dataclasses

    from solopo_megatron.objectives import SoLoPOConfig
    from solopo_megatron.recipe.schema import SolopoSection

    loss_fields = {f.name: f.default for f in dataclasses.fields(SoLoPOConfig)}
    section = {f.name: f.default for f in dataclasses.fields(SolopoSection)}
    assert {k: section[k] for k in loss_fields} == loss_fields
    assert set(section) - set(loss_fields) == {
        "reference_store",
        "compute_reference_if_missing",
        "inplace_logits_backward",
    }
    cfg = load_config(RECIPE, ["solopo.beta=0.25", "solopo.solo_ra_distance=squared"])
    assert cfg.solopo.loss_config() == SoLoPOConfig(beta=0.25, solo_ra_distance="squared")


def test_the_dry_run_reports_a_choice_typo(capsys):
    from solopo_megatron.train import main

    assert main(["--dry-run", "--config", str(RECIPE), "model.transformer_impl=te"]) == 2
    assert (
        "model.transformer_impl: must be one of auto, transformer_engine, local; got 'te'"
        in capsys.readouterr().err
    )


# The ranges live in the schema (``positive`` / ``at_least`` / ``fraction`` field metadata); these keys
# must be among them, so a zero or negative size fails before launch, by key.
MUST_BE_BOUNDED = {
    *(f"model.{k}" for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")),
    *(f"model.{k}" for k in ("num_query_groups", "kv_channels", "vocab_size", "recompute_num_layers")),
    *(f"model.{k}" for k in ("make_vocab_size_divisible_by", "layernorm_epsilon", "init_method_std")),
    *(f"model.{k}" for k in ("attention_dropout", "hidden_dropout", "tensor_model_parallel_size")),
    *(f"train.{k}" for k in ("global_batch_size", "train_iters", "log_interval", "eval_interval")),
    *(f"train.{k}" for k in ("eval_iters", "max_skipped_steps_in_a_row")),
    *(f"optimizer.{k}" for k in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2")),
    *(f"optimizer.{k}" for k in ("adam_eps", "clip_grad")),
    *(f"dataset.{k}" for k in ("max_short_length", "max_long_length", "max_tokens")),
    "dataset.synthetic.num_train",
    "dataset.synthetic.num_valid",
    "checkpoint.save_interval",
    "checkpoint.keep_last",
    "logger.peak_tflops_per_gpu",
    *(f"cluster.{k}" for k in ("num_nodes", "gpus_per_node", "gpu_memory_gib")),
}


def _bounded_fields() -> dict[str, str]:
    """{key: an out-of-range override value} of every bounded schema field (floats: NaN)."""
    import typing

    from solopo_megatron.recipe.schema import RecipeConfig, field_bounds
    from solopo_megatron.recipe.validation import recipe_sections

    bad = {}
    for prefix, section in recipe_sections(RecipeConfig()):
        hints = typing.get_type_hints(type(section))
        for name, bounds in field_bounds(section).items():
            is_float = float in typing.get_args(hints[name]) or hints[name] is float
            low = int(bounds.low) if bounds.low is not None else 0
            bad[f"{prefix}.{name}"] = "nan" if is_float else str(low if bounds.low_open else low - 1)
    return bad


def test_the_sizes_that_must_be_positive_are_bounded_in_the_schema():
    assert MUST_BE_BOUNDED <= set(_bounded_fields()), MUST_BE_BOUNDED - set(_bounded_fields())


@pytest.mark.parametrize("key, value", sorted(_bounded_fields().items()))
def test_every_bounded_field_is_checked_by_key(key, value):
    with pytest.raises(RecipeError) as info:
        validate_recipe(load_config(RECIPE, [f"{key}={value}"]), world_size=2)
    assert f"\n  - {key}: must be " in str(info.value)


def test_the_dry_run_reports_a_size_problem_and_a_bad_world_size(capsys):
    from solopo_megatron.train import main

    assert main(["--dry-run", "--config", str(RECIPE), "model.hidden_size=0"]) == 2
    assert "model.hidden_size: must be >= 1, got 0" in capsys.readouterr().err
    for world in ("0", "-2"):
        assert main(["--dry-run", "--config", str(RECIPE), "--world-size", world]) == 2
        assert f"--world-size: must be >= 1, got {world}" in capsys.readouterr().err
