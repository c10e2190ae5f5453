"""Triton vocab-parallel token log-probs: one read of the logits forward, one read + one write backward.

Forward: one program per token streams its row of this rank's vocab shard through an online
max / sum-exp in fp32, kept per lane and reduced once at the end, and picks the label's logit if this
shard owns it. On a single shard the
kernel writes the log-prob and log-sum-exp directly; under TP three fp32 numbers per token leave the
kernel (max, sum-exp, target) and two small all-reduces merge them (MAX of the max, then SUM of the
rescaled sum-exp and the target). Saved for backward: the logits themselves (no copy) and one fp32
log-sum-exp per token.

Backward: a 2-D grid over (token, vocab block) forms g * (onehot - softmax) in fp32 and rounds once
to the logits' dtype, optionally writing into the logits' own storage.

No atomics: each token's statistics come from one program in a fixed order that depends only on the
vocab size, so a sequence alone or packed among others gets bitwise the same log-probs.

Imported only when a Triton path runs (see ``dispatch``); ``import solopo_kernels`` does not load it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from .common import check_token_logprob_inputs, merge_logit_stats, padding_shard_stats, valid_columns
from .dispatch import TRITON_LOGPROBS_DTYPES, triton_interpret_enabled

__all__ = [
    "INTERPRETED",
    "SUPPORTED_DTYPES",
    "backward_into",
    "forward_logprobs",
    "logit_stats_triton",
    "token_logprobs_triton",
]

# Decorating under TRITON_INTERPRET=1 makes these kernels run on CPU tensors (the CPU tests).
INTERPRETED = triton_interpret_enabled()
SUPPORTED_DTYPES = TRITON_LOGPROBS_DTYPES


@triton.jit
def _forward_kernel(
    logits_ptr,
    labels_ptr,
    out_ptr,  # FINALIZE: fp32 [T] log-probs
    lse_ptr,  # FINALIZE: fp32 [T] log-sum-exp
    stats_ptr,  # not FINALIZE: fp32 [3, T] row max, sum of exp(x - max), label logit (0 where not owned)
    row_stride,
    num_tokens,
    valid_vocab,  # columns read: the shard's real vocabulary, before Megatron's padding columns
    vocab_start_index,
    ignore_index,
    BLOCK_V: tl.constexpr,
    FINALIZE: tl.constexpr,  # single shard: finish the log-prob here, no [3, T] round trip
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    # Per-lane running max and sum-exp, reduced across lanes once after the loop (no block-wide
    # reduction per vocab block). One exp per logit: exp(-|x - m|) rescales whichever side is smaller.
    lane_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, valid_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < valid_vocab, other=float("-inf")).to(tl.float32)
        larger = x > lane_max
        # -inf logits (masked vocab, lanes past the end) add exp(-inf) = 0 and never form -inf - -inf.
        scale = tl.where(x == float("-inf"), 0.0, tl.exp(tl.minimum(x, lane_max) - tl.maximum(x, lane_max)))
        lane_sum = tl.where(larger, lane_sum * scale + 1.0, lane_sum + scale)
        lane_max = tl.maximum(lane_max, x)
    row_max = tl.max(lane_max, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    sum_exp = tl.sum(tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp(lane_max - shift)), axis=0)
    label = tl.load(labels_ptr + row)
    local_label = label - vocab_start_index
    owned = (label != ignore_index) & (local_label >= 0) & (local_label < valid_vocab)
    target = tl.load(row_ptr + local_label, mask=owned, other=0.0).to(tl.float32)
    if FINALIZE:
        lse = row_max + tl.log(sum_exp)
        tl.store(lse_ptr + row, lse)
        tl.store(out_ptr + row, tl.where(label == ignore_index, 0.0, target - lse))
    else:
        tl.store(stats_ptr + row, row_max)
        tl.store(stats_ptr + num_tokens + row, sum_exp)
        tl.store(stats_ptr + 2 * num_tokens + row, target)


@triton.jit
def _backward_kernel(
    logits_ptr,
    grad_logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_out_ptr,
    logits_row_stride,
    grad_row_stride,
    local_vocab,
    valid_vocab,  # columns at or above it are vocabulary padding: softmax 0, gradient 0
    vocab_start_index,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < local_vocab
    real = cols < valid_vocab
    label = tl.load(labels_ptr + row)
    g = tl.load(grad_out_ptr + row)
    g = tl.where(label == ignore_index, 0.0, g)
    lse = tl.load(lse_ptr + row)
    x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=real, other=float("-inf")).to(tl.float32)
    onehot = tl.where(real & (cols == label - vocab_start_index), 1.0, 0.0)
    grad = g * (onehot - tl.exp(x - lse))
    tl.store(
        grad_logits_ptr + row * grad_row_stride + cols,
        grad.to(grad_logits_ptr.dtype.element_ty),
        mask=in_vocab,
    )


def _block_size(local_vocab: int, cap: int) -> int:
    # Depends on the vocab size only, never on T: that keeps results batch invariant.
    return min(triton.next_power_of_2(max(local_vocab, 16)), cap)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _launch_forward(
    logits, labels, vocab_start_index, ignore_index, out, lse, stats, finalize: bool, valid_vocab: int
) -> None:
    num_tokens = logits.shape[0]
    block = _block_size(valid_vocab, 4096)
    _forward_kernel[(num_tokens,)](
        logits,
        labels,
        out,
        lse,
        stats,
        logits.stride(0),
        num_tokens,
        valid_vocab,
        vocab_start_index,
        ignore_index,
        BLOCK_V=block,
        FINALIZE=finalize,
        num_warps=_num_warps(block),
    )


def forward_logprobs(
    logits: Tensor,
    labels: Tensor,
    vocab_start_index: int,
    ignore_index: int,
    tp_group: dist.ProcessGroup | None,
    valid_vocab: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(log-probs [T], log-sum-exp [T]), both fp32, over the vocab split across ``tp_group``.

    A single shard finishes inside the kernel (8 bytes per token). Under TP the kernel returns three
    floats per token and two all-reduces merge them: MAX of the max, then SUM of the rescaled sum-exp
    and of the owner's target logit. Only the first ``valid_vocab`` columns (default: all) are read.
    """
    num_tokens = logits.shape[0]
    valid_vocab = logits.shape[1] if valid_vocab is None else valid_vocab
    device = logits.device
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        out = torch.empty(num_tokens, dtype=torch.float32, device=device)
        lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
        if num_tokens:
            _launch_forward(logits, labels, vocab_start_index, ignore_index, out, lse, out, True, valid_vocab)
        return out, lse
    stats = logit_stats_triton(logits, labels, vocab_start_index, ignore_index, valid_vocab)
    return merge_logit_stats(stats, labels, ignore_index, tp_group)


def logit_stats_triton(
    logits: Tensor,
    labels: Tensor,
    vocab_start_index: int,
    ignore_index: int,
    valid_vocab: int | None = None,
) -> Tensor:
    """This shard's per-token statistics fp32 [3, T]: row max, sum of exp(logit - max), label logit
    (0 where not owned), over its first ``valid_vocab`` columns (default: all);
    ``common.merge_logit_stats`` turns them into log-probs."""
    num_tokens = logits.shape[0]
    valid_vocab = logits.shape[1] if valid_vocab is None else valid_vocab
    if valid_vocab == 0:  # a shard of padding only: nothing to launch on
        return padding_shard_stats(num_tokens, torch.float32, logits.device)
    stats = torch.empty(3, num_tokens, dtype=torch.float32, device=logits.device)
    if num_tokens:
        _launch_forward(
            logits, labels, vocab_start_index, ignore_index, stats, stats, stats, False, valid_vocab
        )
    return stats


def backward_into(
    grad_logits: Tensor,
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    vocab_start_index: int,
    ignore_index: int,
    valid_vocab: int | None = None,
) -> Tensor:
    """Writes g * (onehot - softmax) into ``grad_logits`` (which may be ``logits`` itself); columns at
    or above ``valid_vocab`` (vocabulary padding; default: none) get 0."""
    num_tokens, local_vocab = logits.shape
    if num_tokens == 0 or local_vocab == 0:
        return grad_logits
    block = _block_size(local_vocab, 4096)
    grid = (num_tokens, triton.cdiv(local_vocab, block))
    _backward_kernel[grid](
        logits,
        grad_logits,
        labels,
        lse,
        grad_out,
        logits.stride(0),
        grad_logits.stride(0),
        local_vocab,
        local_vocab if valid_vocab is None else valid_vocab,
        vocab_start_index,
        ignore_index,
        BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return grad_logits


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, vocab_start_index, tp_group, ignore_index, inplace_backward, valid_vocab
    ):
        out, lse = forward_logprobs(logits, labels, vocab_start_index, ignore_index, tp_group, valid_vocab)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, labels, lse)
            ctx.valid_vocab = valid_vocab
            ctx.vocab_start_index = vocab_start_index
            ctx.ignore_index = ignore_index
            ctx.inplace_backward = inplace_backward
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        grad_out = grad_out.to(torch.float32).contiguous()
        backward_into(
            grad_logits,
            logits,
            labels,
            lse,
            grad_out,
            ctx.vocab_start_index,
            ctx.ignore_index,
            ctx.valid_vocab,
        )
        return grad_logits, None, None, None, None, None, None


def token_logprobs_triton(
    logits: Tensor,
    labels: Tensor,
    *,
    vocab_start_index: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    vocab_size: int | None = None,
) -> Tensor:
    """Triton implementation of ``token_logprobs`` (same contract as the reference).

    ``inplace_backward=True`` writes the gradient into the logits' storage, saving a [T, V_local]
    buffer; use it only when nothing else reads the logits after the backward pass.
    """
    check_token_logprob_inputs(logits, labels)
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernel takes bf16, fp16 or fp32 logits, got {logits.dtype}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _TritonTokenLogprobs.apply(
        logits,
        labels.contiguous(),
        int(vocab_start_index),
        tp_group,
        int(ignore_index),
        bool(inplace_backward),
        valid_columns(logits.shape[1], int(vocab_start_index), vocab_size),
    )
