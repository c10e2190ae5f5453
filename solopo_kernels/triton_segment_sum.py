"""Triton segmented sum: one program per segment sums its token span in a fixed order, no atomics.

Each segment's span [first, end) comes from ``reference.segment_spans`` (integer scatter-min/max,
order independent, hence deterministic); the program walks the span in blocks relative to the
segment's first token, so a sequence alone or packed among others gets bitwise the same total.
Tokens of other segments inside the span (never the case for THD packing, where a sequence is
contiguous) are masked out, so the result is right for any segment layout.

Imported only when a Triton path runs (see ``dispatch``); ``import solopo_kernels`` does not load it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import segment_spans

__all__ = ["BLOCK", "segment_sum_triton"]

BLOCK = 1024


@triton.jit
def _segment_sum_kernel(
    values_ptr, keep_ptr, segment_ids_ptr, first_ptr, end_ptr, out_ptr, BLOCK: tl.constexpr
):
    segment = tl.program_id(0)
    first = tl.load(first_ptr + segment)
    end = tl.load(end_ptr + segment)
    acc = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for start in range(first, end, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        in_span = idx < end
        ids = tl.load(segment_ids_ptr + idx, mask=in_span, other=-1)
        keep = tl.load(keep_ptr + idx, mask=in_span, other=0) != 0
        take = in_span & keep & (ids == segment)
        acc += tl.load(values_ptr + idx, mask=take, other=0.0).to(acc.dtype)
    tl.store(out_ptr + segment, tl.sum(acc, axis=0))


def segment_sum_triton(values: Tensor, keep: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum of ``values`` where ``keep`` for each segment id in [0, num_segments); dtype of ``values``.

    Forward only (no autograd); ``segmented_sum.segment_sum`` wraps it with the gradient.
    """
    out = torch.empty(num_segments, dtype=values.dtype, device=values.device)
    if num_segments == 0:
        return out
    first, end = segment_spans(segment_ids, num_segments)
    _segment_sum_kernel[(num_segments,)](
        values.contiguous(),
        keep.to(torch.int8).contiguous(),
        segment_ids.contiguous(),
        first,
        end,
        out,
        BLOCK=BLOCK,
        num_warps=4,
    )
    return out
