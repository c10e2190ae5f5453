"""Per-sequence zigzag context-parallel sharding of a packed (THD) row.

Every sequence is cut into 2*cp equal chunks and rank r keeps chunks r and 2*cp-1-r, which balances
causal-attention work across ranks. The order matches Transformer Engine's
``thd_get_partitioned_indices``: cu_seqlens [0, 8, 16], cp=2 -> rank 0 keeps [0,1,6,7,8,9,14,15].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def zigzag_indices(cu_seqlens: Sequence[int] | Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Positions (int64, ascending) of the packed row that CP rank ``cp_rank`` keeps.

    ``cu_seqlens`` are the padded sequence boundaries; every length must be a multiple of 2*cp_size.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
    lengths = bounds[1:] - bounds[:-1]
    if bounds.dim() != 1 or bounds.numel() < 1 or bounds[0] != 0 or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {bounds.tolist()}")
    bad = lengths % (2 * cp_size) != 0
    if bool(bad.any()):
        seq = int(bad.nonzero()[0])
        raise ValueError(
            f"sequence {seq} has length {int(lengths[seq])}, not a multiple of 2*cp = {2 * cp_size}"
        )
    if cp_size == 1:
        return torch.arange(int(bounds[-1]), dtype=torch.int64)
    chunk = lengths // (2 * cp_size)
    pieces = []
    for start, size in zip(bounds[:-1].tolist(), chunk.tolist()):
        pieces.append(torch.arange(start + cp_rank * size, start + (cp_rank + 1) * size))
        mirror = 2 * cp_size - 1 - cp_rank
        pieces.append(torch.arange(start + mirror * size, start + (mirror + 1) * size))
    if not pieces:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(pieces)
