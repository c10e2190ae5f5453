"""Deterministic segmented sum with autograd: per-sequence totals of a packed row of tokens.

``segment_sum`` dispatches (see ``dispatch``) to the Triton kernel (``triton_segment_sum``, imported
lazily: no atomics, batch invariant) or to ``reference.segment_sum_reference`` (``index_add``).
Backward is the same for both: each kept token receives its segment's gradient.
``segment_spans`` (pure torch, in ``reference``) finds each segment's token span for the Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import use_triton
from .reference import segment_spans, segment_sum_reference

__all__ = ["segment_spans", "segment_sum"]


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, keep, segment_ids, num_segments, run_triton):
        ctx.save_for_backward(keep, segment_ids)
        if run_triton:
            from .triton_segment_sum import segment_sum_triton

            return segment_sum_triton(values, keep, segment_ids, num_segments)
        return segment_sum_reference(values, keep, segment_ids, num_segments)

    @staticmethod
    def backward(ctx, grad_sums):
        keep, segment_ids = ctx.saved_tensors
        num_segments = grad_sums.numel()
        if num_segments == 0:
            grad = torch.zeros(keep.shape, dtype=grad_sums.dtype, device=grad_sums.device)
        else:
            valid = keep & (segment_ids >= 0) & (segment_ids < num_segments)
            grad = grad_sums[segment_ids.clamp(0, num_segments - 1)]
            grad = torch.where(valid, grad, torch.zeros_like(grad))
        return grad, None, None, None, None


def segment_sum(
    values: Tensor, keep: Tensor, segment_ids: Tensor, num_segments: int, *, backend: str | None = None
) -> Tensor:
    """Per-segment sums [num_segments] of ``values`` where ``keep``, in the dtype of ``values``.

    Args:
        values: [T] floating point.
        keep: [T] bool or 0/1; tokens outside it contribute nothing (not even NaN) and get no gradient.
        segment_ids: [T] integer segment of each token; ids outside [0, num_segments) (negative ids
            mark padding) contribute nothing and get no gradient.
        num_segments: number of segments (static, so no host sync is needed).
        backend: ``auto``, ``triton`` or ``torch``; None: ``dispatch.default_backend()``.

    Deterministic (Triton path: no atomics, batch invariant) and free of host syncs. Gradient: each
    kept token receives its segment's gradient.
    """
    run_triton = use_triton(values, backend)
    return _SegmentSum.apply(values, keep.bool(), segment_ids, int(num_segments), run_triton)
