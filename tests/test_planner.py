"""``solopo-train --dry-run`` on every cluster recipe: valid, planned, and the printed plan as reviewed.

The expected outputs live in tests/golden/dry_run/; after an intended change, regenerate them with
``SOLOPO_UPDATE_GOLDEN=1 python -m pytest tests/test_planner.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from solopo_megatron.recipe.loading import load_config
from solopo_megatron.recipe.planner import make_plan
from solopo_megatron.train import main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "recipes" / "cluster"
GOLDEN = Path(__file__).parent / "golden" / "dry_run"
RECIPES = sorted(
    p.relative_to(CLUSTER)
    for p in CLUSTER.glob("*/*.yaml")
    if p.parent.name not in ("models", "layouts", "losses")
)
MODELS = ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct")


@pytest.fixture(autouse=True)
def default_paths(monkeypatch):
    """The recipes' path defaults, whatever this machine's environment says (the output names them)."""
    for name in ("SOLOPO_DATA", "SOLOPO_MODELS", "SOLOPO_RUNS", "SOLOPO_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_every_combination_has_a_recipe():
    names = {p.name for p in RECIPES}
    expected = {
        f"solopo-{loss}-{length}.yaml"
        for loss in ("dpo", "simpo", "orpo")
        for length in ("32k", "64k", "128k")
    }
    expected |= {f"long_po-dpo-{length}.yaml" for length in ("32k", "64k", "128k")} | {"short_po-dpo.yaml"}
    for model in MODELS:
        assert {p.name for p in RECIPES if p.parent.name == model} == expected
    assert names == expected


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_dry_run_output(recipe, capsys):
    path = f"recipes/cluster/{recipe}"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the printed recipe path is relative to the repository
    try:
        assert main(["--dry-run", "--config", path]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    golden = GOLDEN / recipe.with_suffix(".txt")
    if os.environ.get("SOLOPO_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text(), f"dry-run output of {path} changed; see the module docstring"


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_plan_is_consistent(recipe):
    """Independent of the golden text: the plan's numbers follow from the recipe."""
    cfg = load_config(CLUSTER / recipe)
    m, ds = cfg.model, cfg.dataset
    plan = make_plan(cfg, cfg.cluster.world_size)
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    assert tp * pp * cp * plan.dp == cfg.cluster.world_size == 8 * cfg.cluster.num_nodes
    assert 1 <= cfg.cluster.num_nodes <= 4
    assert plan.padded_vocab == plan.vocab == m.vocab_size  # no padding rows in the log-softmax
    assert plan.group_tokens <= ds.max_tokens and plan.groups_per_row >= 1
    assert plan.microbatches * plan.groups_per_row >= plan.examples_per_dp_rank
    assert plan.memory.total / 2**30 + 4 <= cfg.cluster.gpu_memory_gib, "the recipe does not fit its GPUs"
    assert (
        plan.parameters
        == {"qwen2.5-7b-instruct": 7_615_616_512, "llama-3.1-8b-instruct": 8_030_261_248}[recipe.parent.name]
    )
    limit = {"32k": 32768, "64k": 65536, "128k": 131072}.get(recipe.stem.rsplit("-", 1)[-1])
    if limit is not None:
        assert ds.max_long_length == limit
    mode = recipe.stem.split("-")[0]
    assert cfg.solopo.mode == mode


def test_layouts_cover_tp_cp_and_pp():
    layouts = {
        (
            c.model.tensor_model_parallel_size,
            c.model.context_parallel_size,
            c.model.pipeline_model_parallel_size,
        )
        for c in (load_config(CLUSTER / r) for r in RECIPES)
    }
    assert any(tp > 1 for tp, _, _ in layouts) and any(cp > 1 for _, cp, _ in layouts)
    assert any(pp > 1 for _, _, pp in layouts)


def test_dry_run_reports_problems_and_overrides(capsys):
    recipe = str(CLUSTER / "qwen2.5-7b-instruct" / "solopo-dpo-32k.yaml")
    assert main(["--dry-run", "--config", recipe, "model.tensor_model_parallel_size=8"]) == 2
    err = capsys.readouterr().err
    assert (
        "num_attention_heads / num_query_groups: 28 / 4 must be divisible by tensor_model_parallel_size=8"
        in err
    )
    assert main(["--dry-run", "--config", recipe, "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "tp 2 x cp 4 x pp 1 x dp 2 = 16 GPUs" in out
    assert "64 examples / dp 2 = 32 per DP rank -> 32 microbatch(es)" in out
    assert (
        main(
            [
                "--dry-run",
                "--config",
                recipe,
                "model.recompute_granularity=null",
                "optimizer.use_distributed_optimizer=false",
                "cluster.gpu_memory_gib=40",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"of 40 \(cluster\.gpu_memory_gib\): DOES NOT FIT", out)
    assert "warning: the estimate exceeds cluster.gpu_memory_gib" in out
