"""Core attention for the local (non-Transformer-Engine) layer spec: packed THD rows and context parallelism.

Megatron's local DotProductAttention refuses packed sequences and context parallelism, so the local
spec plugs in this module instead. Each query attends causally within its own sequence. Under CP
every rank holds a zigzag share of every sequence; keys and values are all-gathered over the CP
group (autograd-correct: the backward sums every rank's gradient for this rank's keys and values)
and the mask is built from global token positions, so the result equals one process's attention.

Without flash-attn, attention runs one sequence at a time with torch SDPA (``sequence_spans`` finds
each sequence's queries and, under CP, its keys among the gathered ones): causal SDPA when CP = 1,
else a [local queries, sequence keys] mask in global positions. Extra memory is bounded by the
longest sequence, not by the packed row, and no work is spent on pairs of different sequences.
``packed_attention_mask`` (the dense [t_local, t_global] mask of a whole row) is the tests' oracle.
On GPUs the Transformer Engine spec (fused THD + CP attention) is the production path, and
flash-attn's varlen kernel serves CP = 1 when installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from ..data.cp_sharding import zigzag_indices


@dataclass(frozen=True)
class SequenceSpan:
    """One packed sequence as this CP rank sees it."""

    start: int  # its first query among this rank's tokens
    end: int
    key_rows: Tensor | None  # CP: its keys' rows among the all-gathered keys (CP-rank-major order)
    mask: Tensor | None  # CP: bool [end - start, sequence length], causal in global positions


def sequence_spans(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> list[SequenceSpan]:
    """Every sequence's queries on this rank and, under CP, its keys and causal mask (zigzag order)."""
    bounds = cu_seqlens_padded.to("cpu", torch.int64).tolist()
    local_tokens = bounds[-1] // cp_size
    spans = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if end == begin:
            continue
        start, stop = begin // cp_size, end // cp_size
        if cp_size == 1:
            spans.append(SequenceSpan(start, stop, None, None))
            continue
        whole = [0, end - begin]  # the sequence alone: positions relative to its start
        query_positions = zigzag_indices(whole, cp_size, cp_rank)
        key_positions = torch.cat([zigzag_indices(whole, cp_size, r) for r in range(cp_size)])
        key_rows = torch.cat(
            [torch.arange(r * local_tokens + start, r * local_tokens + stop) for r in range(cp_size)]
        )
        spans.append(SequenceSpan(start, stop, key_rows, key_positions[None, :] <= query_positions[:, None]))
    return spans


def packed_attention_mask(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """bool [t_local, t_global]: causal within each sequence, in global (pre-sharding) positions.

    The dense mask of a whole row: the oracle the per-sequence path is tested against."""
    bounds = cu_seqlens_padded.to("cpu", torch.int64)
    total = int(bounds[-1])
    segment = torch.repeat_interleave(torch.arange(bounds.numel() - 1), bounds[1:] - bounds[:-1])
    key_positions = torch.cat([zigzag_indices(bounds, cp_size, r) for r in range(cp_size)])
    query_positions = zigzag_indices(bounds, cp_size, cp_rank)
    assert key_positions.numel() == total
    same_sequence = segment[query_positions][:, None] == segment[key_positions][None, :]
    causal = key_positions[None, :] <= query_positions[:, None]
    return same_sequence & causal


class _AllGatherTokens(torch.autograd.Function):
    """Concatenates every CP rank's tokens (dim 0); backward sums the gradients and keeps this rank's."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size], None


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class PackedCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule for THD-packed sequences with optional context parallelism."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type="self",
        cp_comm_type=None,
        softmax_scale=None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        if config.context_parallel_size > 1 and getattr(pg_collection, "cp", None) is None:
            raise ValueError(
                "PackedCoreAttention with context parallelism needs pg_collection.cp (megatron-core "
                ">= 0.16 passes the model's ProcessGroupCollection to its core attention)"
            )
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.dropout = config.attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("PackedCoreAttention does not take an attention bias")
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if not packed:  # [s, b, heads, d]: one causal sequence per batch row (no CP)
            if self.cp_group is not None:
                raise NotImplementedError("context parallelism needs packed (THD) inputs")
            s, b = query.shape[:2]
            out = self._attend(
                query.permute(1, 2, 0, 3),
                key.permute(1, 2, 0, 3),
                value.permute(1, 2, 0, 3),
                mask=None,
                causal=True,
            )
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)
        # THD: [t, heads, d] -> [1, heads, t, d]
        cp = self.cp_group is not None and dist.get_world_size(self.cp_group) > 1
        flash = _flash_varlen() if query.is_cuda and not cp else None
        if flash is not None:
            cu = (
                packed_seq_params.cu_seqlens_q_padded
                if packed_seq_params.cu_seqlens_q_padded is not None
                else packed_seq_params.cu_seqlens_q
            )
            out = flash(
                query,
                key,
                value,
                cu,
                cu,
                packed_seq_params.max_seqlen_q,
                packed_seq_params.max_seqlen_kv,
                dropout_p=self.dropout if self.training else 0.0,
                softmax_scale=self._scale(query),
                causal=True,
            )
            return out.reshape(out.shape[0], -1)
        if cp:
            key = _AllGatherTokens.apply(key, self.cp_group)
            value = _AllGatherTokens.apply(value, self.cp_group)
        cp_size, cp_rank = (
            (dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)) if cp else (1, 0)
        )
        outputs = []
        for span in sequence_spans(packed_seq_params.cu_seqlens_q_padded, cp_size, cp_rank):
            rows = slice(span.start, span.end)
            k = key[span.key_rows] if span.key_rows is not None else key[rows]
            v = value[span.key_rows] if span.key_rows is not None else value[rows]
            mask = span.mask.to(query.device) if span.mask is not None else None
            out = self._attend(
                query[rows].transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                mask=mask,
                causal=mask is None,
            )
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs).reshape(query.shape[0], -1)

    def _scale(self, query: Tensor) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """q [b, heads, sq, d], k/v [b, groups, sk, d] (grouped-query attention expanded here)."""
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self._scale(q),
            dropout_p=self.dropout if self.training else 0.0,
        )
