"""Pure-torch vocab-parallel token log-probs: the oracle for the Triton kernels and their CPU fallback.

``token_logprobs(logits, labels)`` returns ``log_softmax(full_logits)[t, labels[t]]`` where this
rank holds the vocab columns ``[vocab_start_index, vocab_start_index + V_local)`` of the full
logits and the rest live on the other ranks of ``tp_group``.

Memory: for backward it keeps a reference to the caller's ``logits`` (no copy), the labels and one
fp32 log-sum-exp per token ([T]). Forward and backward work through row chunks so the fp32
temporaries never exceed ``common.CHUNK_ELEMENTS`` elements, whatever T x V_local is; the gradient is
formed in fp32 per chunk and rounded once to the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .common import (
    check_token_logprob_inputs,
    compute_dtype,
    group_size,
    owned_labels,
    padding_shard_stats,
    row_chunks,
    valid_columns,
)

__all__ = [
    "logit_stats_reference",
    "segment_spans",
    "segment_sum_reference",
    "softmax_grad_reference",
    "token_logprobs_reference",
]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start_index, tp_group, ignore_index, valid_vocab):
        num_tokens = logits.shape[0]
        dtype = compute_dtype(logits.dtype)
        real = logits[:, :valid_vocab]  # a view: padding columns never enter the softmax
        owned, local_labels = owned_labels(labels, vocab_start_index, valid_vocab, ignore_index)
        target = torch.zeros(num_tokens, dtype=dtype, device=logits.device)
        # The max is exact in any dtype, so it needs no fp32 copy of the logits. A shard of padding
        # only (possible at large TP) has max -inf, which the MAX all-reduce replaces.
        row_max = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=logits.device)
        if valid_vocab:
            picked = real.gather(1, local_labels[:, None]).squeeze(1).to(dtype)
            target = torch.where(owned, picked, target)
            row_max = real.amax(dim=1).to(dtype)
        distributed = group_size(tp_group) > 1
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)

        sum_exp = torch.zeros(num_tokens, dtype=dtype, device=logits.device)
        for rows in row_chunks(num_tokens, valid_vocab):
            shifted = real[rows].to(dtype) - row_max[rows, None]
            sum_exp[rows] = shifted.exp_().sum(dim=1)
        if distributed:
            # One collective for both per-token statistics: sum of exp and the owner's target logit.
            stats = torch.stack([sum_exp, target])
            dist.all_reduce(stats, group=tp_group)
            sum_exp, target = stats[0], stats[1]

        lse = row_max + sum_exp.log()
        valid = labels != ignore_index
        out = torch.where(valid, target - lse, torch.zeros_like(lse))
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, labels, lse)
            ctx.vocab_start_index = vocab_start_index
            ctx.ignore_index = ignore_index
            ctx.valid_vocab = valid_vocab
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        num_tokens, valid_vocab = logits.shape[0], ctx.valid_vocab
        owned, local_labels = owned_labels(labels, ctx.vocab_start_index, valid_vocab, ctx.ignore_index)
        grad_out = torch.where(labels != ctx.ignore_index, grad_out.to(lse.dtype), torch.zeros_like(lse))
        grad_logits = torch.empty_like(logits)
        grad_logits[:, valid_vocab:] = 0  # padding columns: probability 0, no label
        for rows in row_chunks(num_tokens, valid_vocab) if valid_vocab else ():
            grad_logits[rows, :valid_vocab] = softmax_grad_reference(
                logits[rows, :valid_vocab], local_labels[rows], owned[rows], lse[rows], grad_out[rows]
            )
        return grad_logits, None, None, None, None, None


def logit_stats_reference(
    logits: Tensor, labels: Tensor, vocab_start_index: int, ignore_index: int
) -> Tensor:
    """This shard's per-token statistics [3, T] in fp32 (fp64 for fp64 logits): row max, sum of
    exp(logit - max), label logit (0 where not owned). ``common.merge_logit_stats`` finishes them.
    Makes one fp32 copy of ``logits``: callers pass a row chunk (of real vocabulary columns only)."""
    dtype = compute_dtype(logits.dtype)
    if logits.shape[1] == 0:  # a shard of padding only
        return padding_shard_stats(logits.shape[0], dtype, logits.device)
    owned, local_labels = owned_labels(labels, vocab_start_index, logits.shape[1], ignore_index)
    x = logits.to(dtype)
    row_max = x.amax(dim=1)
    sum_exp = (x - row_max[:, None]).exp_().sum(dim=1)
    target = x.gather(1, local_labels[:, None]).squeeze(1)
    return torch.stack([row_max, sum_exp, torch.where(owned, target, torch.zeros_like(target))])


def softmax_grad_reference(
    logits: Tensor, local_labels: Tensor, owned: Tensor, lse: Tensor, grad_out: Tensor
) -> Tensor:
    """d(sum_t g_t * logp_t) / d logits = g * (onehot(label) - softmax), formed in ``lse``'s dtype and
    rounded once to the logits' dtype. ``owned``/``local_labels`` from ``common.owned_labels`` (ignored
    tokens are not owned; their ``grad_out`` must be 0). One fp32 [T, V_local] temporary: pass a chunk."""
    grad = (logits.to(lse.dtype) - lse[:, None]).exp_().mul_(-grad_out[:, None])
    hit = torch.where(owned, grad_out, torch.zeros_like(grad_out))
    grad.scatter_add_(1, local_labels[:, None], hit[:, None])
    return grad.to(logits.dtype)


def token_logprobs_reference(
    logits: Tensor,
    labels: Tensor,
    *,
    vocab_start_index: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> Tensor:
    """Log-probs [T] of ``labels`` under the full-vocab softmax of vocab-parallel ``logits``.

    Args:
        logits: [T, V_local], this rank's vocab shard (bf16, fp16, fp32 or fp64).
        labels: [T] global vocab ids, or ``ignore_index`` (its log-prob is 0 and gets no gradient).
            Ids must lie in the full vocabulary; one owned by no rank is not detected.
        vocab_start_index: global id of this shard's first column.
        tp_group: the tensor-parallel group the vocab is split over (None: single process).
        vocab_size: the true vocabulary; global columns at or above it are Megatron's padding and stay
            out of the softmax (gradient 0). None: every column is vocabulary. Labels must lie below
            it: a label in the padding is owned by no rank (not detected; its log-prob is -lse).

    Returns fp32 [T] (fp64 for fp64 logits), identical on every rank of ``tp_group``. Gradient flows
    to ``logits`` only.
    """
    check_token_logprob_inputs(logits, labels)
    valid = valid_columns(logits.shape[1], int(vocab_start_index), vocab_size)
    return _TokenLogprobs.apply(
        logits, labels.long(), int(vocab_start_index), tp_group, int(ignore_index), valid
    )


def segment_sum_reference(values: Tensor, keep: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Per-segment sums of ``values`` where ``keep`` (ids outside [0, num_segments) ignored), by ``index_add``.

    Deterministic on CPU; on CUDA ``index_add`` uses atomics, so the Triton kernel serves CUDA.
    """
    valid = keep & (segment_ids >= 0) & (segment_ids < num_segments)
    kept = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    sums = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    if num_segments == 0:
        return sums
    return sums.index_add(0, segment_ids.clamp(0, num_segments - 1).long(), kept)


def segment_spans(segment_ids: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """(first position, last position + 1) of each segment, int64 [num_segments]; empty -> (T, 0).

    Integer scatter-min/max, so the result does not depend on the order of the reduction.
    """
    num_tokens = segment_ids.numel()
    positions = torch.arange(num_tokens, device=segment_ids.device)
    # Negative ids (padding) and out-of-range ids go to a discarded extra slot.
    slot = torch.where((segment_ids >= 0) & (segment_ids < num_segments), segment_ids, num_segments).long()
    first = torch.full((num_segments + 1,), num_tokens, dtype=torch.int64, device=segment_ids.device)
    end = torch.zeros(num_segments + 1, dtype=torch.int64, device=segment_ids.device)
    first = first.scatter_reduce(0, slot, positions, reduce="amin")
    end = end.scatter_reduce(0, slot, positions + 1, reduce="amax")
    return first[:num_segments], end[:num_segments]
