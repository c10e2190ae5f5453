"""TP=2, PP=2, CP=2, TP=2 x CP=2 and DP=2 (and variants) train step by step like one process.

gloo, fp32, megatron-core's own schedules, DDP and optimizers; every mode (solopo, short_po, long_po).
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed
from layout_runs import MODES, run_layout

# Also run on the oldest tested megatron-core by CI's compat job (.ci/run).
pytestmark = pytest.mark.compat

ADAM = {"optimizer.optimizer": "adam", "optimizer.lr": 1e-3, "optimizer.adam_eps": 1e-3}
TIED_QKV_BIAS = {"model.share_embeddings_and_output_weights": True, "model.add_qkv_bias": True}
# Variants: what the one-process baseline shares with the layouts compared against it.
VARIANTS = {
    "base": {},
    # Megatron's distributed optimizer takes Adam only; a large eps keeps Adam's update linear in
    # tiny gradients, so fp32 reduction noise cannot flip near-zero updates.
    "adam": ADAM,
    # Tied embeddings under PP need Megatron's embedding-group gradient sync; QKV bias (Qwen2).
    "tied-qkv-bias": TIED_QKV_BIAS,
}

# (tag, tp, pp, cp, world size, variant, layout-only overrides): DP is what remains of the world.
LAYOUTS = [
    ("tp2", 2, 1, 1, 2, "base", {}),
    # Slow (14 s): PP=2 stays in the default suite with tied embeddings and QKV bias (pp2-tied-qkv-bias).
    pytest.param("pp2", 1, 2, 1, 2, "base", {}, marks=pytest.mark.slow, id="pp2"),
    ("cp2", 1, 1, 2, 2, "base", {}),
    # Slow (14 s): data parallelism stays in the default suite with the distributed optimizer below,
    # and in tests/megatron/test_checkpoint.py's DP resharding test.
    pytest.param("dp2", 1, 1, 1, 2, "base", {}, marks=pytest.mark.slow, id="dp2"),
    ("dp2-distributed-optimizer", 1, 1, 1, 2, "adam", {"optimizer.use_distributed_optimizer": True}),
    # Four processes on two cores (32 s): slow. TP x CP stays in the default suite in
    # tests/test_parallel_logprobs.py (the loss and gradients at TP=2 x CP=2), TP and CP each here.
    pytest.param("tp2cp2", 2, 1, 2, 4, "base", {}, marks=pytest.mark.slow, id="tp2cp2"),
    ("pp2-tied-qkv-bias", 1, 2, 1, 2, "tied-qkv-bias", {}),
    ("tp2-tied-qkv-bias", 2, 1, 1, 2, "tied-qkv-bias", {}),
    # Activation recomputation changes memory, not numbers.
    (
        "recompute-full",
        1,
        1,
        1,
        1,
        "base",
        {
            "model.recompute_granularity": "full",
            "model.recompute_method": "uniform",
            "model.recompute_num_layers": 1,
        },
    ),
    # Slow (18 s): recomputation stays in the default suite with recompute-full.
    pytest.param(
        "recompute-selective-tp2",
        2,
        1,
        1,
        2,
        "base",
        {"model.recompute_granularity": "selective"},
        marks=pytest.mark.slow,
        id="recompute-selective-tp2",
    ),  # fmt: skip
]


def dp_size(world: int, tp: int, pp: int, cp: int) -> int:
    return world // (tp * pp * cp)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process runs per variant, which also write the initial weights and reference stores."""
    tmp = str(tmp_path_factory.mktemp("layouts"))
    results = {}

    def run(variant: str):
        if variant not in results:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SOLOPO_KERNELS", "torch")
                run_distributed(run_layout, 1, tmp, 1, 1, 1, f"single-{variant}", VARIANTS[variant], variant)
            results[variant] = torch.load(os.path.join(tmp, f"result-single-{variant}.pt"))
        return results[variant]

    return tmp, run


@pytest.mark.parametrize(
    "tag, tp, pp, cp, world, variant, extra",
    LAYOUTS,
    ids=[layout[0] if isinstance(layout, tuple) else layout.id for layout in LAYOUTS],
)
def test_layout_matches_one_process(single, tag, tp, pp, cp, world, variant, extra):
    tmp, run_single = single
    expected = run_single(variant)
    run_distributed(run_layout, world, tmp, tp, pp, cp, tag, {**VARIANTS[variant], **extra}, variant)
    got = torch.load(os.path.join(tmp, f"result-{tag}.pt"))
    for mode in MODES:
        want, have = expected[mode], got[mode]
        assert have["before"].keys() == want["before"].keys()
        for name in want["before"]:
            torch.testing.assert_close(
                have["before"][name], want["before"][name], rtol=0, atol=0, msg=f"{mode} init {name}"
            )
        # Per step: loss and gradient norm.
        torch.testing.assert_close(
            have["steps"][:, :2], want["steps"][:, :2], rtol=1e-5, atol=1e-6, msg=f"{mode} loss/grad norm"
        )
        for name in want["after"]:
            torch.testing.assert_close(
                have["after"][name], want["after"][name], rtol=1e-5, atol=1e-6, msg=f"{mode} updated {name}"
            )
        assert not torch.equal(
            want["after"][next(iter(want["after"]))], want["before"][next(iter(want["before"]))]
        )
        # Several microbatches per step: accumulation (and under PP, 1F1B's steady state) is exercised.
        assert want["steps"][:, 2].min() >= 2 and (
            dp_size(world, tp, pp, cp) > 1 or have["steps"][:, 2].min() >= 2
        )
