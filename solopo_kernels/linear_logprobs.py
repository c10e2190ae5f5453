"""Fused LM-head + token log-probs: ``token_logprobs(hidden @ weight.T, labels)`` without the logits.

Pure torch, chunked over tokens: forward computes one [chunk, V_local] block of logits at a time
(fp32), keeps its per-token max / sum-exp / target, merges them over the TP group like the unfused
kernel, and saves only hidden, weight, labels and an fp32 log-sum-exp per token. Backward recomputes
each block, forms ``g * (onehot - softmax)`` in fp32, and accumulates dX and dW in fp32, rounding once.
No [T, V_local] tensor exists at any time; the workspace is ``chunk x V_local`` fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .common import group_size, owned_labels, row_chunks

__all__ = ["linear_token_logprobs"]


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start_index, tp_group, ignore_index):
        num_tokens, local_vocab = hidden.shape[0], weight.shape[0]
        owned, local_labels = owned_labels(labels, vocab_start_index, local_vocab, ignore_index)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        row_max = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
        sum_exp = torch.empty_like(row_max)
        target = torch.empty_like(row_max)
        w = weight.to(dtype)
        for rows in row_chunks(num_tokens, local_vocab):
            logits = hidden[rows].to(dtype) @ w.T
            row_max[rows] = logits.amax(dim=1)
            sum_exp[rows] = (logits - row_max[rows, None]).exp_().sum(dim=1)
            picked = logits.gather(1, local_labels[rows, None]).squeeze(1)
            target[rows] = torch.where(owned[rows], picked, torch.zeros_like(picked))
        if group_size(tp_group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            stats = torch.stack([sum_exp * torch.exp(row_max - global_max), target])
            dist.all_reduce(stats, group=tp_group)
            row_max, sum_exp, target = global_max, stats[0], stats[1]
        lse = row_max + sum_exp.log()
        out = torch.where(labels != ignore_index, target - lse, torch.zeros_like(lse))
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(hidden, weight, labels, lse)
            ctx.vocab_start_index = vocab_start_index
            ctx.ignore_index = ignore_index
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        num_tokens, local_vocab = hidden.shape[0], weight.shape[0]
        owned, local_labels = owned_labels(labels, ctx.vocab_start_index, local_vocab, ctx.ignore_index)
        dtype = lse.dtype
        g_all = torch.where(labels != ctx.ignore_index, grad_out.to(dtype), torch.zeros_like(lse))
        w = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        for rows in row_chunks(num_tokens, local_vocab):
            x = hidden[rows].to(dtype)
            g = g_all[rows]
            grad_logits = (x @ w.T - lse[rows, None]).exp_().mul_(-g[:, None])
            hit = torch.where(owned[rows], g, torch.zeros_like(g))
            grad_logits.scatter_add_(1, local_labels[rows, None], hit[:, None])
            grad_hidden[rows] = grad_logits @ w
            grad_weight.addmm_(grad_logits.T, x)
        # Under TP each rank holds part of dX (its vocab shard's contribution): the caller's
        # column-parallel LM head reduces it, exactly as for the unfused logits' gradient.
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_start_index: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Log-probs [T] (fp32) of ``labels`` under softmax(hidden @ weight.T) over the full vocab.

    hidden [T, H], weight [V_local, H] (this rank's vocab shard). Same result as
    ``token_logprobs(hidden @ weight.T, labels, ...)`` without ever materialising the [T, V_local]
    logits. Gradients flow to ``hidden`` (this shard's contribution, to be reduced over TP by the
    caller as for any column-parallel layer) and ``weight``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [T, H] and weight [V_local, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"labels must be an integer tensor [T] = [{hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    return _LinearTokenLogprobs.apply(
        hidden, weight, labels.long(), int(vocab_start_index), tp_group, int(ignore_index)
    )
