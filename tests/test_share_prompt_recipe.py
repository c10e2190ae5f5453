"""``dataset.share_prompt`` in recipes: parsing, resolution against the attention backend, and the
dry-run planner's and validation's group bounds with sharing."""

from __future__ import annotations

import pytest

from solopo_megatron.recipe.errors import RecipeError
from solopo_megatron.recipe.lengths import largest_group_tokens, prompts_shared
from solopo_megatron.recipe.loading import load_config
from solopo_megatron.recipe.planner import format_plan, make_plan
from solopo_megatron.recipe.validation import validate_recipe

RECIPE = "recipes/tiny-cpu.yaml"
CLUSTER = "recipes/cluster/llama-3.1-8b-instruct/long_po-dpo-32k.yaml"


@pytest.mark.parametrize(
    "value, expected", [("true", "true"), ("off", "false"), ("False", "false"), ("auto", "auto")]
)
def test_yaml_booleans_read_as_the_settings(value, expected):
    assert load_config(RECIPE, [f"dataset.share_prompt={value}"]).dataset.share_prompt == expected


def test_resolution_against_the_attention_backend():
    from solopo_megatron.megatron.model import resolve_share_prompt

    assert resolve_share_prompt("auto", "sdpa") and resolve_share_prompt("auto", "flex")
    assert not resolve_share_prompt("auto", "te")  # auto does not share under Transformer Engine
    assert not resolve_share_prompt("false", "sdpa")
    with pytest.raises(RecipeError, match="dataset.share_prompt.*model.attention_backend"):
        resolve_share_prompt("true", "te")


def test_what_the_recipe_alone_tells():
    def shared(*overrides: str):
        return prompts_shared(load_config(RECIPE, list(overrides)))

    assert shared() is None  # auto attention: the machine decides
    assert shared("model.attention_backend=flex") is True
    assert shared("dataset.share_prompt=true") is True
    assert shared("dataset.share_prompt=false", "model.attention_backend=sdpa") is False
    assert shared("model.attention_backend=te") is False


def test_the_plan_counts_a_shared_long_pair_once(monkeypatch):
    for name in ("SOLOPO_DATA", "SOLOPO_MODELS", "SOLOPO_RUNS", "SOLOPO_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    unshared = load_config(CLUSTER)
    shared = load_config(CLUSTER, ["model.attention_backend=flex"])
    # 32,768 + 32,768 apart; with sharing the second answer adds at most max_short_length = 4,096 tokens.
    assert largest_group_tokens(unshared) == 65_536
    assert largest_group_tokens(shared, share_prompt=True) == 36_864
    text = format_plan(shared, make_plan(shared, 8), CLUSTER)
    assert "prompts: shared (dataset.share_prompt=auto, model.attention_backend=flex)" in text
    assert "largest group 36,864 tokens" in text


def test_validation_takes_the_shared_bound_where_sharing_is_certain():
    # long_po at 1,000 tokens a sequence: 2,000 tokens apart, at most 1,000 + 512 shared (tiny recipe: CP 2).
    base = [
        "solopo.mode=long_po",
        "dataset.max_long_length=1000",
        "dataset.max_short_length=512",
        "dataset.max_tokens=1600",
    ]
    validate_recipe(load_config(RECIPE, [*base, "dataset.share_prompt=true"]), world_size=2)
    with pytest.raises(RecipeError, match="largest possible group"):
        validate_recipe(load_config(RECIPE, [*base, "dataset.share_prompt=false"]), world_size=2)
