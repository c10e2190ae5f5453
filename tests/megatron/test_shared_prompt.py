"""Shared prompts through the model: per-sequence sums and their gradients equal the unshared path.

Sharing changes how a row is laid out (the prompt once, the answers as branches with tree positions),
never what a sequence's log-probs are: everything here is compared within fp32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed
from shared_prompt_runs import shared_equals_unshared


def _check(tmp_path, tp: int, cp: int) -> None:
    """Each rank's complete sums equal; each TP shard's gradient, summed over CP ranks as Megatron's
    gradient reduction sums it (a CP rank holds other tokens of each layout), equals."""
    results = [torch.load(os.path.join(tmp_path, f"rank{rank}.pt")) for rank in range(tp * cp)]
    for result in results:
        assert result[True]["tokens"] < result[False]["tokens"]  # the prompts are read once
        torch.testing.assert_close(result[True]["sums"], result[False]["sums"], rtol=1e-5, atol=1e-5)
    for tp_rank in range(tp):
        ranks = [results[cp_rank * tp + tp_rank] for cp_rank in range(cp)]  # TP is the fastest dimension
        names = ranks[0][False]["grads"].keys()
        assert names and names == ranks[0][True]["grads"].keys()
        for name in names:
            unshared = sum(r[False]["grads"][name] for r in ranks)
            shared = sum(r[True]["grads"][name] for r in ranks)
            torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.compat  # tree positions go through megatron-core's THD rotary path: both versions
@pytest.mark.parametrize("logits", ["response_only", "full"])
def test_shared_prompts_equal_unshared_in_one_process(tmp_path, logits):
    run_distributed(shared_equals_unshared, 1, 1, 1, logits, str(tmp_path))
    _check(tmp_path, 1, 1)


@pytest.mark.parametrize(
    "tp, cp",
    [
        # Slow (8 s): CP=2 stays in the default suite through the reference stores
        # (test_shared_prompt_store.py, torchrun), the shared cp2 layout against one shared process
        # (test_layouts.py) and the attention's CP=2 test (test_shared_prompt_attention.py).
        pytest.param(1, 2, id="cp2", marks=pytest.mark.slow),
        pytest.param(2, 1, id="tp2"),
        pytest.param(2, 2, id="tp2cp2", marks=pytest.mark.slow),
    ],
)
def test_shared_prompts_equal_unshared_under_tp_and_cp(tmp_path, tp, cp):
    run_distributed(shared_equals_unshared, tp * cp, tp, cp, "response_only", str(tmp_path))
    _check(tmp_path, tp, cp)


def test_three_training_steps_shared_equal_unshared(tmp_path):
    """solopo with SoLo-RA on both answers (its short pair and its long pair shared: long_po's pair
    and more), 3 SGD steps in one process: loss and gradient norm per step within 1e-5 relative, and
    the same updated weights."""
    from layout_runs import run_layout

    modes = ("solopo",)
    extra = {"solopo.solo_ra_chosen_only": False, "train.train_iters": 3}
    tmp = str(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOLOPO_KERNELS", "torch")
        for share in ("false", "true"):
            settings = {**extra, "dataset.share_prompt": share}
            run_distributed(run_layout, 1, tmp, 1, 1, 1, f"share-{share}", settings, "base", modes)
    unshared = torch.load(os.path.join(tmp, "result-share-false.pt"))
    shared = torch.load(os.path.join(tmp, "result-share-true.pt"))
    for mode in modes:
        want, have = unshared[mode], shared[mode]
        assert want["steps"].shape[0] == 3
        torch.testing.assert_close(have["steps"][:, :2], want["steps"][:, :2], rtol=1e-5, atol=0, msg=mode)
        for name, value in want["after"].items():
            torch.testing.assert_close(have["after"][name], value, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
