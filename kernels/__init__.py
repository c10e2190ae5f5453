"""solopo_kernels: log-prob kernels for SoLoPO, independent of Megatron.

Installed as the package ``solopo_kernels`` (this directory is ``kernels/`` in the repository) so it
never clashes with the unrelated PyPI package ``kernels``. Each entry point dispatches to Triton or
to the pure-torch reference (see ``dispatch``); the reference is also the tests' oracle.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import TRITON_LOGPROBS_DTYPES, kernel_choice, use_triton
from .linear_logprobs import linear_token_logprobs
from .reference import segment_sum_reference, token_logprobs_reference

__all__ = [
    "kernel_choice",
    "linear_token_logprobs",
    "segment_sum",
    "segment_sum_reference",
    "token_logprobs",
    "token_logprobs_reference",
]


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    vocab_start_index: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> Tensor:
    """Log-probs [T] (fp32) of ``labels`` under the full-vocab softmax of vocab-parallel ``logits``.

    ``logits`` [T, V_local] is this rank's shard of the vocab (bf16, fp16, fp32; fp64 runs the
    reference), ``labels`` [T] global ids or ``ignore_index`` (log-prob 0, no gradient). The result
    is identical on every rank of ``tp_group``. Gradient flows to ``logits`` only; no fp32
    [T, V_local] buffer is allocated by the Triton path. ``inplace_backward`` (Triton path) writes
    the gradient into the logits' storage.
    """
    if use_triton(logits, supported_dtypes=TRITON_LOGPROBS_DTYPES):
        from .triton_logprobs import token_logprobs_triton

        return token_logprobs_triton(
            logits,
            labels,
            vocab_start_index=vocab_start_index,
            tp_group=tp_group,
            ignore_index=ignore_index,
            inplace_backward=inplace_backward,
        )
    return token_logprobs_reference(
        logits, labels, vocab_start_index=vocab_start_index, tp_group=tp_group, ignore_index=ignore_index
    )


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, keep, segment_ids, num_segments):
        ctx.save_for_backward(keep, segment_ids)
        if use_triton(values):
            from .segment_sum import segment_sum_triton

            return segment_sum_triton(values, keep, segment_ids, num_segments)
        return segment_sum_reference(values, keep, segment_ids, num_segments)

    @staticmethod
    def backward(ctx, grad_sums):
        keep, segment_ids = ctx.saved_tensors
        num_segments = grad_sums.numel()
        if num_segments == 0:
            return torch.zeros(keep.shape, dtype=grad_sums.dtype, device=grad_sums.device), None, None, None
        valid = keep & (segment_ids >= 0) & (segment_ids < num_segments)
        grad = grad_sums[segment_ids.clamp(0, num_segments - 1)]
        return torch.where(valid, grad, torch.zeros_like(grad)), None, None, None


def segment_sum(values: Tensor, keep: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Per-segment sums [num_segments] of ``values`` where ``keep``; ids outside [0, num_segments)
    (negative ids mark padding) contribute nothing and get no gradient.

    Deterministic (Triton path: no atomics, batch invariant) and free of host syncs. Gradient: each
    kept token receives its segment's gradient.
    """
    return _SegmentSum.apply(values, keep.bool(), segment_ids, int(num_segments))
