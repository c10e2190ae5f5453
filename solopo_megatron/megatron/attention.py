"""Core attention for the local (non-Transformer-Engine) layer spec: packed THD rows and context parallelism.

Megatron's local DotProductAttention refuses packed sequences and context parallelism, so the local
spec plugs in this module instead. Each query attends causally within its own sequence. Under CP
every rank holds a zigzag share of every sequence; keys and values are all-gathered over the CP
group (autograd-correct: the backward sums every rank's gradient for this rank's keys and values)
and the mask is built from global token positions, so the result equals one process's attention.

Shared prompts (``SharedPromptSeqParams.branch_ids``, one id per token of the whole row): a slot may
hold a prompt (branch 0) and then several answers (branches 1, 2, ...), each contiguous. A query sees
the keys of its slot at or before its row index whose branch is 0 or its own (``_visible``); rows
without branch ids take the plain document-causal paths unchanged.

Two backends (``model.attention_backend``; ``te`` is Transformer Engine's own attention module):

- ``sdpa``: one sequence at a time with torch SDPA (``sequence_spans`` finds each sequence's queries
  and, under CP, its keys among the gathered ones): causal SDPA when CP = 1, else a [local queries,
  sequence keys] mask in global positions. Extra memory is bounded by the longest sequence, not by
  the packed row, and no work is spent on pairs of different sequences. At CP = 1 a shared slot is
  its prompt (causal) and then each branch against [prompt keys; its own keys] with a small mask, so
  no [slot, slot] mask exists and no work is spent on pairs of branches. The spans (and masks, on
  the device) are built once per microbatch and shared by every layer. On CUDA with CP = 1 and
  bf16/fp16, flash-attn's varlen kernel serves instead when it is installed (rows without branches).
- ``flex``: torch ``flex_attention`` over the whole row with a document-causal block mask built from
  segment ids, global (zigzag) positions and branch ids (``document_causal_block_mask``: blocks
  between two branches are skipped as empty), one mask per microbatch shared by every layer;
  grouped-query attention without repeating K/V. Compiled on CUDA (training) with the row dimensions
  marked dynamic: one graph per grad mode (and per rows with or without branch ids) serves every row
  length (rows of a single query block run eager); on CPU torch runs it forward-only (the tests' check).

``packed_attention_mask`` (the dense [t_local, t_global] mask of a whole row) is the tests' oracle.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from ..data.cp_sharding import zigzag_indices


def _visible(
    q_pos: Tensor,
    k_pos: Tensor,
    q_seg: Tensor | None = None,
    k_seg: Tensor | None = None,
    q_branch: Tensor | None = None,
    k_branch: Tensor | None = None,
) -> Tensor:
    """The attention rule, elementwise over broadcastable query and key tensors: a query sees a key of
    its own sequence (segment ids; None: the same one) at or before its global row index, unless the
    key is on another branch than the query's (branch 0, a prompt or an unshared sequence, is seen by
    every later token of its slot; branch ids None: no shared prompt)."""
    allowed = k_pos <= q_pos
    if q_seg is not None:
        allowed = allowed & (q_seg == k_seg)
    if q_branch is not None:
        allowed = allowed & ((k_branch == 0) | (k_branch == q_branch))
    return allowed


@dataclass(frozen=True)
class SequenceSpan:
    """One packed sequence (or, at CP = 1, one prompt or branch of a shared slot) as this CP rank sees it."""

    start: int  # its first query among this rank's tokens
    end: int
    # Its keys' rows among the keys (CP: all-gathered, CP-rank-major order; a branch at CP = 1: the
    # prompt's rows, then its own); None: its own query rows, causal.
    key_rows: Tensor | None
    mask: Tensor | None  # bool [end - start, len(key_rows)] where key_rows is set


def _branch_runs(branches: Tensor) -> list[tuple[int, int, int]]:
    """(first, end, branch id) of every run of one branch id in a slot's branch ids (offsets in the slot).

    Checks the shared-slot layout the CP = 1 spans rely on: the prompt (branch 0) first, then each
    branch contiguous with increasing ids."""
    ids, counts = torch.unique_consecutive(branches, return_counts=True)
    ids, ends = ids.tolist(), counts.cumsum(0).tolist()
    if ids[0] < 0 or any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(
            f"a slot's branch ids must be 0 (its prompt), then each branch contiguous with increasing "
            f"ids >= 1; got runs of ids {ids}"
        )
    return [(first, end, b) for first, end, b in zip([0, *ends[:-1]], ends, ids)]


def _shared_slot_spans(start: int, runs: list[tuple[int, int, int]]) -> list[SequenceSpan]:
    """CP = 1 spans of one shared slot starting at row ``start`` (its ``_branch_runs``): its prompt,
    causal, then each branch's queries against [prompt keys; its own keys] (all prompt keys, causal
    within the branch); in row order."""
    prompt = runs[0][1] if runs[0][2] == 0 else 0  # an empty prompt: the slot starts with branch 1
    spans = [SequenceSpan(start, start + prompt, None, None)] if prompt else []
    for first, end, branch in runs:
        if branch == 0:
            continue
        if not prompt:
            spans.append(SequenceSpan(start + first, start + end, None, None))
            continue
        n = end - first
        key_rows = torch.cat([torch.arange(start, start + prompt), torch.arange(start + first, start + end)])
        mask = torch.cat(
            [torch.ones(n, prompt, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], dim=1
        )
        spans.append(SequenceSpan(start + first, start + end, key_rows, mask))
    return spans


def sequence_spans(
    cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int, branch_ids: Tensor | None = None
) -> list[SequenceSpan]:
    """Every sequence's queries on this rank and, under CP, its keys and mask (zigzag order), in row order.

    ``branch_ids`` (the whole row's, before CP sharding; None: no shared prompt) split each shared slot
    at CP = 1 into its prompt and branches (``_shared_slot_spans``); under CP they join each slot's mask.
    """
    bounds = cu_seqlens_padded.to("cpu", torch.int64).tolist()
    branches = None if branch_ids is None else branch_ids.to("cpu", torch.int64)  # the one host copy
    local_tokens = bounds[-1] // cp_size
    spans = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if end == begin:
            continue
        start, stop = begin // cp_size, end // cp_size
        slot_branches = runs = None
        if branches is not None and bool(branches[begin:end].any()):  # a shared slot
            slot_branches = branches[begin:end]
            runs = _branch_runs(slot_branches)  # its layout, checked at every CP size alike
        if cp_size == 1:
            if runs is None:
                spans.append(SequenceSpan(start, stop, None, None))
            else:
                spans.extend(_shared_slot_spans(start, runs))
            continue
        whole = [0, end - begin]  # the sequence alone: positions relative to its start
        query_positions = zigzag_indices(whole, cp_size, cp_rank)
        key_positions = torch.cat([zigzag_indices(whole, cp_size, r) for r in range(cp_size)])
        key_rows = torch.cat(
            [torch.arange(r * local_tokens + start, r * local_tokens + stop) for r in range(cp_size)]
        )
        q_branch = k_branch = None
        if slot_branches is not None:
            q_branch, k_branch = slot_branches[query_positions, None], slot_branches[None, key_positions]
        mask = _visible(
            query_positions[:, None], key_positions[None, :], q_branch=q_branch, k_branch=k_branch
        )
        spans.append(SequenceSpan(start, stop, key_rows, mask))
    return spans


def _row_positions(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int):
    """(segment id of every global token, global positions of this rank's queries, of the gathered keys)."""
    bounds = cu_seqlens_padded.to("cpu", torch.int64)
    segment = torch.repeat_interleave(torch.arange(bounds.numel() - 1), bounds[1:] - bounds[:-1])
    query_positions = zigzag_indices(bounds, cp_size, cp_rank)
    key_positions = torch.cat([zigzag_indices(bounds, cp_size, r) for r in range(cp_size)])
    return segment, query_positions, key_positions


def document_causal_block_mask(
    cu_seqlens_padded: Tensor,
    cp_size: int,
    cp_rank: int,
    device: torch.device,
    block_size: int = 128,
    branch_ids: Tensor | None = None,
):
    """flex_attention's BlockMask for this rank's queries against the CP-gathered keys: a query sees the
    keys of its own sequence at global positions up to its own and, with ``branch_ids`` (the whole
    row's), not those of another branch of its slot (``_visible``; the dense oracle, never materialised).

    Built blockwise without torch.compile: a few [rows, keys] tiles of the mask at a time (at most
    ``_MASK_TILE_ELEMENTS``) reduce to which [block_size x block_size] blocks are empty, full or partial
    (partial blocks apply the mask function inside the kernel). ``create_block_mask`` evaluates the mask
    over the whole [t, t] grid unless compiled, and compiling it on a fresh closure per microbatch
    recompiles; this costs neither.
    """
    from torch.nn.attention.flex_attention import BlockMask

    segment, query_positions, key_positions = _row_positions(cu_seqlens_padded, cp_size, cp_rank)
    q_pos, k_pos = query_positions.to(device), key_positions.to(device)
    q_seg, k_seg = segment.to(device)[q_pos], segment.to(device)[k_pos]
    inputs = [q_pos, k_pos, q_seg, k_seg]
    q_branch = k_branch = None
    if branch_ids is not None:
        branches = branch_ids.to(device)
        q_branch, k_branch = branches[q_pos], branches[k_pos]
        inputs += [q_branch, k_branch]
    for tensor in inputs:  # the mask function's inputs: see _mark_row_dims_dynamic
        torch._dynamo.maybe_mark_dynamic(tensor, 0)

    # Indexing is safe on an edge block's rows and keys past the row: inductor's flex kernels take
    # them modulo the length (get_bounded_indices) before calling the mask, and mask them out after.
    def document_causal(b, h, q, k):
        branches = () if q_branch is None else (q_branch[q], k_branch[k])
        return _visible(q_pos[q], k_pos[k], q_seg[q], k_seg[k], *branches)

    num_q, num_k = q_pos.numel(), k_pos.numel()
    q_blocks, k_blocks = -(-num_q // block_size), -(-num_k // block_size)
    any_allowed = torch.empty(q_blocks, k_blocks, dtype=torch.bool, device=device)
    all_allowed = torch.empty_like(any_allowed)
    rows = max(1, _MASK_TILE_ELEMENTS // (k_blocks * block_size * block_size)) * block_size
    for start in range(0, num_q, rows):
        stop = min(num_q, start + rows)
        part = slice(start, stop)  # views: the tile is the one tensor built
        tile = _visible(
            q_pos[part, None],
            k_pos[None, :],
            q_seg[part, None],
            k_seg[None, :],
            None if q_branch is None else q_branch[part, None],
            None if k_branch is None else k_branch[None, :],
        )
        n = -(-(stop - start) // block_size)
        # Out-of-range rows and keys count as masked, as in create_block_mask: edge blocks stay partial.
        padded = F.pad(tile, (0, k_blocks * block_size - num_k, 0, n * block_size - (stop - start)))
        blocks = padded.view(n, block_size, k_blocks, block_size).sum(dim=(1, 3), dtype=torch.int32)
        first = start // block_size
        any_allowed[first : first + n] = blocks > 0
        all_allowed[first : first + n] = blocks == block_size * block_size
    partial = any_allowed & ~all_allowed

    def as_kv_blocks(selected: Tensor) -> tuple[Tensor, Tensor]:
        # Per query block: how many key blocks, and their indices first (ascending), the rest after.
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)
        # Cloned: no views, whose bases dynamo would trace (and shape-guard) as inputs of their own.
        counts = selected.sum(dim=1, dtype=torch.int32)[None, None].clone()
        return counts, order.to(torch.int32)[None, None].clone()

    kv_num, kv_indices = as_kv_blocks(partial)
    full_num, full_indices = as_kv_blocks(all_allowed)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=document_causal,
        seq_lengths=(num_q, num_k),
    )


_MASK_TILE_ELEMENTS = 1 << 26  # mask elements evaluated at once while building a block mask (64 MB of bool)
# kind -> ((packed_seq_params, branch_ids), (cp_size, cp_rank, device), value) of the last microbatch
_LAST: dict[str, tuple] = {}


def _per_microbatch(
    kind: str,
    params,
    branch_ids: Tensor | None,
    cp_size: int,
    cp_rank: int,
    device: torch.device,
    build: Callable,
):
    """``build()`` once per microbatch and kind: every layer of one forward (and its recomputation) gets
    the same PackedSeqParams object, so all of them share what is derived from its row (and its one
    device-to-host copy of the row's bounds and branch ids). Keyed by the identities of ``params`` and
    ``branch_ids`` (a row with branch ids never gets one's built without, nor the reverse); holding
    them keeps their identities from being reused."""
    inputs, key = (params, branch_ids), (cp_size, cp_rank, device)
    last = _LAST.get(kind)
    if last is None or any(a is not b for a, b in zip(last[0], inputs)) or last[1] != key:
        last = _LAST[kind] = (inputs, key, build())
    return last[2]


def _shared_block_mask(params, branch_ids: Tensor | None, cp_size: int, cp_rank: int, device: torch.device):
    """The block mask of ``params``' row (with its ``branch_ids``), built once per microbatch."""
    return _per_microbatch(
        "block_mask",
        params,
        branch_ids,
        cp_size,
        cp_rank,
        device,
        lambda: document_causal_block_mask(
            params.cu_seqlens_q_padded, cp_size, cp_rank, device, branch_ids=branch_ids
        ),
    )


def _shared_spans(
    params, branch_ids: Tensor | None, cp_size: int, cp_rank: int, device: torch.device
) -> list[SequenceSpan]:
    """``sequence_spans`` of ``params``' row (with its ``branch_ids``) with their key rows and masks on
    ``device``, once per microbatch (the per-layer host sync and copies happen once)."""

    def build() -> list[SequenceSpan]:
        spans = sequence_spans(params.cu_seqlens_q_padded, cp_size, cp_rank, branch_ids)
        return [
            replace(s, key_rows=s.key_rows.to(device), mask=s.mask.to(device)) if s.mask is not None else s
            for s in spans
        ]

    return _per_microbatch("spans", params, branch_ids, cp_size, cp_rank, device, build)


_COMPILED: dict[str, object] = {}
_COMPILE_BACKEND = "inductor"  # the tests count graphs with a counting backend instead


def _compiled(name: str, fn):
    """``torch.compile(fn)``, once per process: flex attention runs as a fused kernel only when compiled;
    dynamic shapes, since every row has its own length."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, backend=_COMPILE_BACKEND)
    return _COMPILED[name]


def _compiles_flex(device: torch.device) -> bool:
    """Whether flex attention runs compiled: on CUDA (on CPU torch runs it forward-only, eager)."""
    return device.type == "cuda"


def _mark_row_dims_dynamic(query: Tensor, key: Tensor, value: Tensor, block_mask) -> None:
    """Marks every row-length dimension dynamic before the compiled call, so one graph serves every row.

    ``dynamic=True`` alone traces the first row's sizes duck-shaped: a block count that happens to equal
    another size (2 query blocks, 2 KV groups) is traced as that size and recompiles on the next row.
    Marked sizes get symbols of their own. ``maybe_``: a size the compiler must specialise is not an
    error. Sizes 0 and 1 are always specialised: rows of one query block run eager (``_flex_attend``).
    """
    for tensor in (query, key, value):
        torch._dynamo.maybe_mark_dynamic(tensor, 2)  # [1, heads, t, d]
    for part in block_mask.as_tuple():  # block counts [1, 1, blocks], indices [1, 1, blocks, blocks]
        if isinstance(part, Tensor):
            torch._dynamo.maybe_mark_dynamic(part, list(range(2, part.dim())))


def _flex_attend(query: Tensor, key: Tensor, value: Tensor, block_mask, scale: float) -> Tensor:
    """flex_attention on [1, heads, t, d] inputs: compiled with dynamic row dimensions where
    ``_compiles_flex``; eager elsewhere and for rows of one query block (at most [128, 128 x cp] scores,
    where a compiled call would trace a graph specialised to one block)."""
    from torch.nn.attention.flex_attention import flex_attention

    one_block = block_mask.kv_num_blocks.shape[-1] == 1
    attend = flex_attention
    if _compiles_flex(query.device) and not one_block:
        _mark_row_dims_dynamic(query, key, value, block_mask)
        attend = _compiled("flex_attention", flex_attention)
    return attend(
        query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
    )


def packed_attention_mask(
    cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int, branch_ids: Tensor | None = None
) -> Tensor:
    """bool [t_local, t_global]: causal within each sequence, in global (pre-sharding) positions, and
    with ``branch_ids`` (the whole row's) blind to the other branches of a shared slot (``_visible``).

    The dense mask of a whole row: the oracle the attention backends are tested against."""
    segment, query_positions, key_positions = _row_positions(cu_seqlens_padded, cp_size, cp_rank)
    q_branch = k_branch = None
    if branch_ids is not None:
        branches = branch_ids.to("cpu", torch.int64)
        q_branch, k_branch = branches[query_positions, None], branches[None, key_positions]
    return _visible(
        query_positions[:, None],
        key_positions[None, :],
        segment[query_positions, None],
        segment[None, key_positions],
        q_branch,
        k_branch,
    )


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


@functools.cache
def _flash_varlen():
    """flash-attn's varlen function, or None where it is not installed: looked up once per process (a
    failed import searches sys.path again on every try)."""
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
        backend: str = "sdpa",
        **kwargs,
    ):
        super().__init__(config=config)
        if backend not in ("sdpa", "flex"):
            raise ValueError(f"PackedCoreAttention backend must be sdpa or flex, got {backend!r}")
        if backend == "flex" and config.attention_dropout:
            raise ValueError(
                "the flex attention backend has no attention dropout; set model.attention_dropout=0"
            )
        self.backend = backend
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
        branch_ids = getattr(packed_seq_params, "branch_ids", None)  # SharedPromptSeqParams
        if self.backend == "flex":
            return self._flex(query, key, value, packed_seq_params, branch_ids, cp)
        half = query.dtype in (torch.bfloat16, torch.float16)  # flash-attn takes no fp32
        # flash-attn's varlen kernel knows causal sequences only, not branches.
        flash = _flash_varlen() if query.is_cuda and half and not cp and branch_ids is None else None
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
        key, value, cp_size, cp_rank = self._gather_keys(key, value, cp)
        outputs = []
        for span in _shared_spans(packed_seq_params, branch_ids, cp_size, cp_rank, query.device):
            rows = slice(span.start, span.end)
            k = key[span.key_rows] if span.key_rows is not None else key[rows]
            v = value[span.key_rows] if span.key_rows is not None else value[rows]
            out = self._attend(
                query[rows].transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                mask=span.mask,
                causal=span.mask is None,
            )
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs).reshape(query.shape[0], -1)  # spans are in row order

    def _gather_keys(self, key: Tensor, value: Tensor, cp: bool):
        """(keys, values of every CP rank in rank order, cp size, cp rank); this rank's own without CP."""
        if not cp:
            return key, value, 1, 0
        key = _AllGatherTokens.apply(key, self.cp_group)
        value = _AllGatherTokens.apply(value, self.cp_group)
        return key, value, dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)

    def _flex(
        self, query: Tensor, key: Tensor, value: Tensor, params, branch_ids: Tensor | None, cp: bool
    ) -> Tensor:
        """The whole row through flex_attention with the document-causal (and branch) block mask; THD in
        and out."""
        key, value, cp_size, cp_rank = self._gather_keys(key, value, cp)
        block_mask = _shared_block_mask(params, branch_ids, cp_size, cp_rank, query.device)
        out = _flex_attend(
            query.transpose(0, 1)[None],  # [1, heads, t, d]
            key.transpose(0, 1)[None],  # [1, groups, t_global, d]
            value.transpose(0, 1)[None],
            block_mask,
            self._scale(query),
        )
        return out[0].transpose(0, 1).reshape(query.shape[0], -1)

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
