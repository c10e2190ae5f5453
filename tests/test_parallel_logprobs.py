"""TP, CP and TP x CP (gloo, 2 and 4 processes) give one process's log-probs, sums, loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import grid_groups, run_distributed
from packed_problems import make_packed_problem, run_sharded
from triton_support import set_default_backend, triton_runs_on_cpu

from solopo_megatron.data.cp_sharding import zigzag_indices
from solopo_megatron.objectives import MODES, PREFERENCE_LOSSES, SoLoPOConfig

CONFIGS = [SoLoPOConfig(mode=mode, preference_loss=loss) for mode in MODES for loss in PREFERENCE_LOSSES] + [
    SoLoPOConfig(solo_ra_chosen_only=False, solo_ra_distance="squared", preference_loss="simpo")
]
TOLERANCE = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _check_layout(rank: int, world_size: int, tp: int, cp: int, dtype_name: str, local_vocab: int) -> None:
    dtype = getattr(torch, dtype_name)
    tol = TOLERANCE[dtype]
    tp_group, cp_group, tp_rank, cp_rank = grid_groups(tp, cp)
    for i, cfg in enumerate(CONFIGS):
        problem = make_packed_problem(cfg, seed=100 + i, dtype=dtype, vocab=local_vocab * tp)
        one = run_sharded(problem, cfg)
        mine = run_sharded(
            problem,
            cfg,
            tp_size=tp,
            tp_rank=tp_rank,
            tp_group=tp_group,
            cp_size=cp,
            cp_rank=cp_rank,
            cp_group=cp_group,
        )
        tokens = zigzag_indices(problem.cu_seqlens, cp, cp_rank)
        local_vocab = problem.logits.shape[1] // tp
        columns = slice(tp_rank * local_vocab, (tp_rank + 1) * local_vocab)
        where = f"rank {rank} (tp {tp_rank}/{tp}, cp {cp_rank}/{cp}) {cfg}"
        torch.testing.assert_close(
            mine.token_logps, one.token_logps[tokens], **tol, msg=lambda m, where=where: f"{where}: {m}"
        )
        torch.testing.assert_close(
            mine.sequence_sums, one.sequence_sums, **tol, msg=lambda m, where=where: f"{where}: {m}"
        )
        torch.testing.assert_close(mine.loss, one.loss, **tol, msg=lambda m, where=where: f"{where}: {m}")
        torch.testing.assert_close(
            mine.grad_logits,
            one.grad_logits[tokens, columns],
            **tol,
            msg=lambda m, where=where: f"{where}: {m}",
        )
        assert mine.grad_logits.dtype == dtype
        # The layout really split the work.
        assert tokens.numel() * cp == problem.logits.shape[0] and local_vocab * tp == problem.logits.shape[1]
    assert dist.get_world_size() == tp * cp


@pytest.mark.parametrize(
    "impl, tp, cp, dtype, local_vocab",
    [
        ("torch", 2, 1, "float64", 24),
        ("torch", 1, 2, "float64", 24),
        ("torch", 2, 2, "float64", 24),
        ("torch", 2, 2, "float32", 24),
        ("torch", 4, 1, "float64", 24),
        ("torch", 1, 4, "float32", 24),
        # The Triton kernels (interpreted on CPU) take bf16/fp16/fp32 logits. A 4200-column shard
        # spans two 4096-column blocks, so the online rescale meets the TP merge.
        # Interpreted Triton is slow on CPU: TP=2 at 4200 columns (32 s), TP=2 at 24 (20 s) and TP=2 x CP=2
        # (28 s) are slow. The default suite keeps Triton's TP merge in tests/test_padded_vocab.py
        # (values and gradients against float64 at TP=2 and TP=4), the two-block online rescale in
        # test_logprobs, Triton at CP=2 here, and TP x CP with the torch kernels here.
        pytest.param("triton", 2, 1, "float32", 4200, marks=pytest.mark.slow),
        pytest.param("triton", 2, 1, "float32", 24, marks=pytest.mark.slow),
        ("triton", 1, 2, "float32", 24),
        pytest.param("triton", 2, 2, "float32", 24, marks=pytest.mark.slow),
    ],
    ids=lambda v: str(v),
)
def test_layout_matches_one_process(monkeypatch, impl, tp, cp, dtype, local_vocab):
    if impl == "triton" and not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    set_default_backend(monkeypatch, impl)  # SOLOPO_KERNELS, inherited by the spawned ranks
    run_distributed(_check_layout, tp * cp, tp, cp, dtype, local_vocab)
