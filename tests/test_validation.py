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
        ["solopo.compute_reference_if_missing=false"],
        2,
        "solopo.reference_store: dpo needs reference log-probs, and the store is not set",
    ),
    "store missing": (
        ["solopo.compute_reference_if_missing=false", "solopo.reference_store=/nope/ref.jsonl"],
        2,
        "solopo.reference_store: dpo needs reference log-probs, and the store /nope/ref.jsonl does not exist",
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
        "model.cp_comm_type: must be one of p2p, all_gather, a2a, a2a+p2p; got 'allgather'",
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
