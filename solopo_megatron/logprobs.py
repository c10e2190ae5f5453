"""Token log-probs -> per-sequence sums, with the context-parallel all-reduce.

A packed microbatch is one row of tokens; ``segment_ids`` says which sequence each token belongs to.
Under context parallelism each rank holds a zigzag shard of every sequence, so its sums are partial
and one all-reduce over the CP group completes them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from solopo_kernels import linear_token_logprobs, segment_sum, token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs", "sequence_logprobs", "all_reduce_sum_identity_backward"]


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: sum over ``group``. Backward: identity.

    Every rank of the group then computes the same loss from the same sums; its gradient reaches
    only this rank's partial sum, and Megatron's gradient reduction over DP x CP adds the ranks'
    contributions, giving the gradient of one loss, not of cp_size copies of it.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum_identity_backward(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``tensor`` over ``group`` (no-op for None or a group of one) with identity backward."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSumIdentityBackward.apply(tensor, group)


def sequence_logprobs(
    token_logps: Tensor,
    loss_mask: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    *,
    cp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Per-sequence sums [num_segments] of ``token_logps * loss_mask``, summed over ``cp_group``.

    Args:
        token_logps: [T] log-probs of this rank's tokens (fp32 or fp64).
        loss_mask: [T] bool or 0/1; tokens outside the mask contribute nothing, not even NaN.
        segment_ids: [T] integer sequence index in [0, num_segments); negative marks padding.
        num_segments: number of sequences in the microbatch (static, so no host sync is needed).
        cp_group: the context-parallel group (None: single process).

    One segmented reduction and one [num_segments] all-reduce; no Python loop over sequences and no
    host synchronisation.
    """
    if not (token_logps.shape == loss_mask.shape == segment_ids.shape) or token_logps.dim() != 1:
        raise ValueError(
            "token_logps, loss_mask and segment_ids must be 1-D of one length, got "
            f"{tuple(token_logps.shape)}, {tuple(loss_mask.shape)}, {tuple(segment_ids.shape)}"
        )
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    sums = segment_sum(token_logps.to(dtype), loss_mask, segment_ids, num_segments)
    return all_reduce_sum_identity_backward(sums, cp_group)
