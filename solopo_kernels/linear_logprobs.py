"""Fused LM head + token log-probs: ``token_logprobs(hidden @ weight.T, labels)`` without the logits.

Chunked over tokens. Forward forms one [chunk, V_local] block of logits at a time with a matmul in
the model's dtype (bf16 on GPUs: fp32 accumulation, one rounding, exactly the unfused output layer's
logits), reduces it to three fp32 numbers per token (row max, sum-exp, label logit; the Triton
kernel on CUDA, the pure-torch reference elsewhere), merges those over the TP group like the unfused
kernel, and saves only hidden, weight, labels and one fp32 log-sum-exp per token. Backward recomputes
each block, turns it into ``g * (onehot - softmax)`` (formed in fp32, rounded once to the model's
dtype, in the block's own storage), and accumulates dX per block and dW in fp32 across blocks.

No [T, V_local] tensor and no fp32 copy of the weight exist at any time; the workspace is one
``chunk x V_local`` block (``common.CHUNK_ELEMENTS`` elements) plus, in backward, the fp32 dW
accumulator (the weight's size, as Megatron's own fp32 main_grad).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .common import compute_dtype, merge_logit_stats, owned_labels, row_chunks, valid_columns
from .dispatch import TRITON_LOGPROBS_DTYPES, use_triton
from .reference import logit_stats_reference, softmax_grad_reference

__all__ = ["linear_token_logprobs"]


def _block_stats(logits: Tensor, labels: Tensor, vocab_start_index: int, ignore_index: int, triton: bool):
    if triton:
        from .triton_logprobs import logit_stats_triton

        return logit_stats_triton(logits, labels, vocab_start_index, ignore_index)
    return logit_stats_reference(logits, labels, vocab_start_index, ignore_index)


def _block_grad_(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    vocab_start_index: int,
    ignore_index: int,
    triton: bool,
) -> Tensor:
    """g * (onehot - softmax) of one block, in the block's dtype (written into its storage on Triton)."""
    if triton:
        from .triton_logprobs import backward_into

        return backward_into(logits, logits, labels, lse, grad_out, vocab_start_index, ignore_index)
    owned, local_labels = owned_labels(labels, vocab_start_index, logits.shape[1], ignore_index)
    return softmax_grad_reference(logits, local_labels, owned, lse, grad_out)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start_index, tp_group, ignore_index, triton, valid_vocab):
        num_tokens = hidden.shape[0]
        real = weight[:valid_vocab]  # a view: the padding rows (Megatron's) never form a logit
        stats = torch.empty(3, num_tokens, dtype=compute_dtype(hidden.dtype), device=hidden.device)
        for rows in row_chunks(num_tokens, valid_vocab):
            logits = hidden[rows] @ real.T
            stats[:, rows] = _block_stats(logits, labels[rows], vocab_start_index, ignore_index, triton)
        out, lse = merge_logit_stats(stats, labels, ignore_index, tp_group)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(hidden, weight, labels, lse)
            ctx.vocab_start_index = vocab_start_index
            ctx.ignore_index = ignore_index
            ctx.triton = triton
            ctx.valid_vocab = valid_vocab
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        num_tokens, valid_vocab = hidden.shape[0], ctx.valid_vocab
        real = weight[:valid_vocab]
        grad_out = torch.where(labels != ctx.ignore_index, grad_out.to(lse.dtype), torch.zeros_like(lse))
        grad_hidden = torch.zeros_like(hidden)
        # Padding rows of the weight formed no logit: their gradient stays 0.
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device)
        grad_real = grad_weight[:valid_vocab]
        for rows in row_chunks(num_tokens, valid_vocab) if valid_vocab else ():
            x = hidden[rows]
            grad_logits = _block_grad_(
                x @ real.T,
                labels[rows],
                lse[rows],
                grad_out[rows],
                ctx.vocab_start_index,
                ctx.ignore_index,
                ctx.triton,
            )
            grad_hidden[rows] = grad_logits @ real
            if grad_real.dtype == weight.dtype:
                grad_real.addmm_(grad_logits.T, x)
            else:  # bf16/fp16 products, accumulated over blocks in fp32
                grad_real += grad_logits.T @ x
        # Under TP each rank holds part of dX (its vocab shard's contribution): the caller's
        # column-parallel LM head reduces it, exactly as for the unfused logits' gradient.
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_start_index: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    backend: str | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Log-probs [T] (fp32; fp64 for fp64 inputs) of ``labels`` under softmax(hidden @ weight.T) over the full vocab.

    hidden [T, H], weight [V_local, H] (this rank's vocab shard), both in the model's dtype. Same
    result as ``token_logprobs(hidden @ weight.T, labels, ...)`` without ever materialising the
    [T, V_local] logits. Gradients flow to ``hidden`` (this shard's contribution, to be reduced over TP
    by the caller as for any column-parallel layer) and ``weight``. ``backend`` chooses the per-block
    log-prob kernel as for ``token_logprobs`` (Triton on CUDA by default). ``vocab_size``: the true
    vocabulary; weight rows of global id at or above it (Megatron's padding) form no logit and get
    gradient 0. None: every row is vocabulary.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [T, H] and weight [V_local, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden and weight must share the model's dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"labels must be an integer tensor [T] = [{hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    triton = use_triton(hidden, backend, supported_dtypes=TRITON_LOGPROBS_DTYPES)
    return _LinearTokenLogprobs.apply(
        hidden,
        weight,
        labels.long().contiguous(),
        int(vocab_start_index),
        tp_group,
        int(ignore_index),
        triton,
        valid_columns(weight.shape[0], int(vocab_start_index), vocab_size),
    )
