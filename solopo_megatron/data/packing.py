"""Whole-group THD packing: a microbatch is one row of tokens holding whole preference groups.

A group is every required sequence of one example; the loss couples them, so a group is never split
across microbatches (under pipeline parallelism the loss runs once per microbatch on the last stage).
Inside the row each sequence has its labels shifted *within the sequence* (never across sequences,
never after CP sharding) and is padded to a multiple of ``pad_multiple`` (2*cp, times tp under
sequence parallelism). Sequences are ordered group-major, roles in a fixed order, so the
per-sequence sums reshape to [groups, roles].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from .cp_sharding import zigzag_indices
from .records import ROLES
from .tokenize import EncodedSequence

IGNORE_INDEX = -100
TAIL_SEGMENT = -1  # segment id of a row's tail padding (outside every sequence)


def pad_multiple_for(cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """Per-sequence padding multiple: 2*cp (zigzag chunks), times tp under sequence parallelism."""
    return 2 * cp_size * (tp_size if sequence_parallel else 1)


@dataclass(frozen=True)
class Group:
    """One example's sequences (only the roles the mode needs) and its reference sums."""

    example_id: str
    sequences: Mapping[str, EncodedSequence]
    ref_logps: Mapping[str, float] | None = None

    def padded_length(self, pad_multiple: int) -> int:
        return sum(padded_sequence_length(len(seq.ids), pad_multiple) for seq in self.sequences.values())


@dataclass
class Microbatch:
    """One packed THD row. Token fields are [T]; per-sequence [S]; per-group [G] or [G, R]."""

    tokens: Tensor  # int64 [T]
    labels: Tensor  # int64 [T], next token within the sequence, IGNORE_INDEX elsewhere
    loss_mask: Tensor  # bool [T], True where the label is a response token
    segment_ids: Tensor  # int64 [T], sequence index (its padding included); TAIL_SEGMENT for the row's tail
    position_ids: Tensor  # int64 [T], restarting at 0 for every sequence (and for the tail slot)
    # Slots: the S sequences, then (for a row padded to a fixed length) the tail padding as its own slot.
    cu_seqlens: Tensor  # int32 [slots+1], each slot's real end in the padded layout's offsets (tail: empty)
    cu_seqlens_padded: Tensor  # int32 [slots+1], padded slot boundaries
    seq_roles: Tensor  # int64 [S], index into ROLES
    seq_groups: Tensor  # int64 [S], group index in this microbatch
    num_response_tokens: Tensor  # int64 [G, R], response tokens of the *full* sequence
    ref_logps: Tensor  # float32 [G, R], reference sums (NaN where not provided)
    valid: Tensor  # bool [G], False for dummy groups
    roles: tuple[str, ...]
    example_ids: list[str]

    @property
    def num_groups(self) -> int:
        return self.valid.numel()

    @property
    def num_sequences(self) -> int:
        return self.seq_roles.numel()

    def per_role(self, values: Tensor) -> dict[str, Tensor]:
        """[S] per-sequence values -> role -> [G]."""
        by_role = values.view(self.num_groups, len(self.roles))
        return {role: by_role[:, i] for i, role in enumerate(self.roles)}

    def to(self, device: torch.device | str) -> Microbatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Microbatch(**moved)


TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "segment_ids", "position_ids")


def padded_sequence_length(length, pad_multiple: int):
    """The one padding rule: a sequence's slot in a row, ``length`` rounded up to ``pad_multiple``.
    Works on ints and on numpy arrays of lengths."""
    return -(-length // pad_multiple) * pad_multiple


def dummy_group(roles: Sequence[str], pad_multiple: int, pad_id: int) -> Group:
    """A group that fills an otherwise empty microbatch; masked out of the loss (valid=False)."""
    seq = EncodedSequence(ids=(pad_id,) * pad_multiple, response_start=pad_multiple)
    return Group(example_id="", sequences={role: seq for role in roles})


def pack_microbatch(
    groups: Sequence[Group],
    roles: Sequence[str],
    *,
    pad_multiple: int,
    pad_id: int,
    row_length: int | None = None,
    valid: Sequence[bool] | None = None,
) -> Microbatch:
    """Packs whole groups into one THD row, optionally padded to ``row_length`` tokens (the padding
    then forms a slot of its own at the end of the row, with no real tokens)."""
    roles = tuple(roles)
    if not groups:
        raise ValueError("pack_microbatch needs at least one group (use dummy_group for an empty slot)")
    valid = [True] * len(groups) if valid is None else list(valid)
    tokens, labels, mask, segments, positions = [], [], [], [], []
    cu, cu_padded, counts, refs = [0], [0], [], []
    offset = 0
    for g, group in enumerate(groups):
        missing = [role for role in roles if role not in group.sequences]
        if missing:
            raise ValueError(f"example {group.example_id!r} lacks role(s) {', '.join(missing)}")
        group_counts, group_refs = [], []
        for role in roles:
            seq = group.sequences[role]
            ids = torch.as_tensor(np.asarray(seq.ids, dtype=np.int64))
            length, padded = ids.numel(), padded_sequence_length(ids.numel(), pad_multiple)
            if not 0 < seq.response_start <= length:
                raise ValueError(f"example {group.example_id!r} role {role}: response_start out of range")
            seq_tokens = torch.full((padded,), pad_id, dtype=torch.int64)
            seq_tokens[:length] = ids
            seq_labels = torch.full((padded,), IGNORE_INDEX, dtype=torch.int64)
            seq_labels[: length - 1] = ids[1:]  # shift inside this sequence only
            seq_mask = torch.zeros(padded, dtype=torch.bool)
            seq_mask[seq.response_start - 1 : length - 1] = True
            tokens.append(seq_tokens)
            labels.append(seq_labels)
            mask.append(seq_mask)
            segments.append(torch.full((padded,), len(segments), dtype=torch.int64))
            positions.append(torch.arange(padded, dtype=torch.int64))
            cu.append(offset + length)
            offset += padded
            cu_padded.append(offset)
            group_counts.append(seq.num_response_tokens if valid[g] else 0)
            ref = (group.ref_logps or {}).get(role)
            group_refs.append(float("nan") if ref is None else float(ref))
        counts.append(group_counts)
        refs.append(group_refs)
    if row_length is not None:
        if row_length < offset:
            raise ValueError(f"groups need {offset} tokens, more than the row length {row_length}")
        if row_length % pad_multiple:
            raise ValueError(f"row length {row_length} is not a multiple of {pad_multiple}")
        tail = row_length - offset
        if tail:  # the row's tail padding is a slot of its own: no sequence's attention span grows
            tokens.append(torch.full((tail,), pad_id, dtype=torch.int64))
            labels.append(torch.full((tail,), IGNORE_INDEX, dtype=torch.int64))
            mask.append(torch.zeros(tail, dtype=torch.bool))
            segments.append(torch.full((tail,), TAIL_SEGMENT, dtype=torch.int64))
            positions.append(torch.arange(tail, dtype=torch.int64))
            cu.append(offset)  # no real tokens
            cu_padded.append(row_length)
    return Microbatch(
        tokens=torch.cat(tokens),
        labels=torch.cat(labels),
        loss_mask=torch.cat(mask),
        segment_ids=torch.cat(segments),
        position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(cu_padded, dtype=torch.int32),
        seq_roles=torch.tensor([ROLES.index(role) for role in roles] * len(groups), dtype=torch.int64),
        seq_groups=torch.arange(len(groups), dtype=torch.int64).repeat_interleave(len(roles)),
        num_response_tokens=torch.tensor(counts, dtype=torch.int64).view(len(groups), len(roles)),
        ref_logps=torch.tensor(refs, dtype=torch.float32).view(len(groups), len(roles)),
        valid=torch.tensor(valid, dtype=torch.bool),
        roles=roles,
        example_ids=[group.example_id for group in groups],
    )


def plan_microbatches(lengths: Sequence[int], max_tokens: int, dp_size: int = 1) -> list[list[list[int]]]:
    """Assigns groups (by padded length) to dp_size ranks x m microbatches, m equal on every rank.

    Longest-first into the least-loaded microbatch that fits, starting from the fewest microbatches
    the token count allows; microbatches are then dealt to ranks so loads stay balanced. Returns
    plan[dp_rank][microbatch] = group indices (possibly empty: that slot gets a dummy group).
    Deterministic: ties break by index. A group longer than ``max_tokens`` is an error.
    """
    if dp_size < 1 or max_tokens < 1:
        raise ValueError(f"dp_size and max_tokens must be >= 1, got {dp_size}, {max_tokens}")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"group {i} needs {lengths[i]} padded tokens, more than the microbatch budget max_tokens={max_tokens}"
            f" ({len(too_long)} such group(s)); raise the budget or lower the length limits"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    per_rank = max(1, math.ceil(sum(lengths) / (max_tokens * dp_size)))
    while True:
        bins = _first_fit_least_loaded(order, lengths, max_tokens, per_rank * dp_size)
        if bins is not None:
            break
        per_rank += 1
    # Deal bins, heaviest first, snake-wise over ranks so each rank gets per_rank bins of similar load.
    bins.sort(key=lambda b: (-sum(lengths[i] for i in b), b[0] if b else len(lengths)))
    plan: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for k, contents in enumerate(bins):
        round_, pos = divmod(k, dp_size)
        rank = pos if round_ % 2 == 0 else dp_size - 1 - pos
        plan[rank].append(sorted(contents))
    return plan


def _first_fit_least_loaded(order, lengths, capacity, num_bins):
    loads = [0] * num_bins
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        best = min(
            (b for b in range(num_bins) if loads[b] + lengths[i] <= capacity),
            key=lambda b: (loads[b], b),
            default=None,
        )
        if best is None:
            return None
        loads[best] += lengths[i]
        bins[best].append(i)
    return bins


def shard_microbatch(mb: Microbatch, cp_size: int, cp_rank: int) -> Microbatch:
    """This CP rank's zigzag share of every sequence; per-sequence and per-group fields unchanged."""
    if cp_size == 1:
        return mb
    index = zigzag_indices(mb.cu_seqlens_padded, cp_size, cp_rank)
    return replace(mb, **{name: getattr(mb, name)[index] for name in TOKEN_FIELDS})
