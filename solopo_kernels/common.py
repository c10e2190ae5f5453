"""Helpers shared by the log-prob implementations: input checks, label ownership, row chunking.

Pure torch (no Triton). ``CHUNK_ELEMENTS`` bounds the fp32 temporaries of the chunked pure-torch
paths (the reference and the fused LM head); ``row_chunks`` reads it on every call, so tests may
patch it here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "check_token_logprob_inputs",
    "compute_dtype",
    "group_size",
    "merge_logit_stats",
    "owned_labels",
    "padding_shard_stats",
    "row_chunks",
    "valid_columns",
]

# Upper bound on the fp32 temporaries (elements) of one row chunk: 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``; 1 for None (single process)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def row_chunks(num_rows: int, row_elements: int) -> Iterator[slice]:
    """Slices covering ``range(num_rows)`` whose rows hold at most ``CHUNK_ELEMENTS`` elements (at least one row)."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def valid_columns(local_vocab: int, vocab_start_index: int, vocab_size: int | None) -> int:
    """How many of this shard's ``local_vocab`` columns are real vocabulary: Megatron pads the vocabulary
    to a multiple of ``make_vocab_size_divisible_by x tp``, and the padding columns (global id >=
    ``vocab_size``) must not enter the softmax. They are the shard's last columns, as padding comes last.
    ``vocab_size`` None: every column is real."""
    if vocab_size is None:
        return local_vocab
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(0, min(local_vocab, vocab_size - vocab_start_index))


def padding_shard_stats(num_tokens: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The per-token statistics [3, T] of a shard without real vocabulary columns (all padding): max
    -inf, sum-exp 0, no label owned; ``merge_logit_stats`` gives them weight 0."""
    stats = torch.zeros(3, num_tokens, dtype=dtype, device=device)
    stats[0] = float("-inf")
    return stats


def check_token_logprob_inputs(logits: Tensor, labels: Tensor) -> None:
    """Shapes and dtypes shared by every token_logprobs implementation; ValueError naming the problem."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V_local], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [T] = [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def owned_labels(
    labels: Tensor, vocab_start_index: int, local_vocab: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """(owned mask, safe local index): which tokens' labels live in this rank's vocab shard.

    The local index is ``labels - vocab_start_index`` where owned and 0 elsewhere, so it can index
    (gather, scatter) the shard's columns without going out of range.
    """
    local = labels - vocab_start_index
    owned = (local >= 0) & (local < local_vocab) & (labels != ignore_index)
    return owned, torch.where(owned, local, torch.zeros_like(local))


def merge_logit_stats(
    stats: Tensor, labels: Tensor, ignore_index: int, tp_group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """(log-probs [T], log-sum-exp [T]) from per-shard statistics ``stats`` [3, T].

    ``stats`` rows: this shard's row max, sum of exp(logit - row max), and the label's logit where
    this shard owns the label (0 elsewhere), in fp32 or fp64. Under TP two small all-reduces merge
    the shards: MAX of the max, then SUM of the rescaled sum-exp and of the owner's target logit.
    ``stats`` is overwritten.
    """
    row_max = stats[0]
    if group_size(tp_group) > 1:
        row_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        # A shard whose logits are all -inf (masked vocab) contributes exp(-inf) = 0, never NaN.
        shift = torch.where(row_max == float("-inf"), 0.0, row_max)
        stats[1].mul_(torch.exp(stats[0] - shift))
        dist.all_reduce(stats[1:], group=tp_group)
    lse = stats[1].log().add_(row_max)
    out = (stats[2] - lse).masked_fill_(labels == ignore_index, 0.0)
    return out, lse
