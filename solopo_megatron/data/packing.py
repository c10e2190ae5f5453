"""Whole-group THD packing: a microbatch is one row of tokens holding whole preference groups.

A group is every required sequence of one example; the loss couples them, so a group is never split
across microbatches (under pipeline parallelism the loss runs once per microbatch on the last stage).
Inside the row each *slot* (an attention unit, zigzag-sharded as one under CP) has its labels shifted
*within itself* (never across slots, never after CP sharding) and is padded to a multiple of
``pad_multiple`` (2*cp, times tp under sequence parallelism). Sequences are numbered group-major,
roles in a fixed order, so the per-sequence sums reshape to [groups, roles].

A slot is one (context, answer) sequence, or, with ``share_prompt``, one *shared sequence*: the
answers of one context (chosen and rejected) as branches after their prompt, which is then read
once. Each branch starts with its own copy of the prompt's last token, at that token's position, so
the copy's hidden state equals the prompt's and predicts the branch's first answer token: every
position keeps a single label, and the branch's positions continue the prompt's (tree positions).
A branch attends to the prompt and to itself, never to another branch (``SharedLayout``).
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
PROMPT_BRANCH = (
    0  # branch id of tokens every later token of their slot sees (a shared prompt, a whole sequence)
)


def pad_multiple_for(cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """Per-sequence padding multiple: 2*cp (zigzag chunks), times tp under sequence parallelism."""
    return 2 * cp_size * (tp_size if sequence_parallel else 1)


@dataclass(frozen=True)
class Group:
    """One example's sequences (only the roles the mode needs) and its reference sums."""

    example_id: str
    sequences: Mapping[str, EncodedSequence]
    ref_logps: Mapping[str, float] | None = None

    def padded_length(self, pad_multiple: int, share_prompt: bool = False) -> int:
        """Tokens the group takes in a row: its slots, each padded to ``pad_multiple``."""
        roles = tuple(self.sequences)
        lengths = np.array([[len(self.sequences[role].ids) for role in roles]])
        starts = np.array([[self.sequences[role].response_start for role in roles]])
        return int(padded_group_lengths(lengths, starts, roles, pad_multiple, share_prompt)[0])


@dataclass
class SharedLayout:
    """The branch structure of a row with shared prompts, for its whole length (never CP-sharded:
    attention and RoPE look up every rank's keys in it). Token fields are [T]."""

    branch_ids: Tensor  # int64, PROMPT_BRANCH or b >= 1 for the b-th answer of a shared slot
    position_ids: Tensor  # int64, the position in the token's own (context, answer) sequence

    def to(self, device: torch.device | str) -> SharedLayout:
        return SharedLayout(*(t.to(device, non_blocking=True) for t in (self.branch_ids, self.position_ids)))


@dataclass
class Microbatch:
    """One packed THD row. Token fields are [T]; per-sequence [S]; per-group [G] or [G, R]."""

    tokens: Tensor  # int64 [T]
    labels: Tensor  # int64 [T], next token within the sequence, IGNORE_INDEX elsewhere
    loss_mask: Tensor  # bool [T], True where the label is a response token
    # int64 [T], the sequence a token's label counts to (its padding included; a shared prompt's tokens,
    # never scored, its first branch's); TAIL_SEGMENT for the row's tail
    segment_ids: Tensor
    position_ids: Tensor  # int64 [T], restarting at 0 in every slot; a branch's continue its prompt's
    # Slots: the sequences (shared ones hold several), then (for a row padded to a fixed length) the
    # tail padding as its own slot.
    cu_seqlens: Tensor  # int32 [slots+1], each slot's real end in the padded layout's offsets (tail: empty)
    cu_seqlens_padded: Tensor  # int32 [slots+1], padded slot boundaries
    seq_roles: Tensor  # int64 [S], index into ROLES
    seq_groups: Tensor  # int64 [S], group index in this microbatch
    num_response_tokens: Tensor  # int64 [G, R], response tokens of the *full* sequence
    ref_logps: Tensor  # float32 [G, R], reference sums (NaN where not provided)
    valid: Tensor  # bool [G], False for dummy groups
    roles: tuple[str, ...]
    example_ids: list[str]
    shared: SharedLayout | None = None  # None: no slot of this row is shared

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
            elif isinstance(value, SharedLayout):
                moved[name] = value.to(device)
        return Microbatch(**moved)


TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "segment_ids", "position_ids")


def padded_sequence_length(length, pad_multiple: int):
    """The one padding rule: a slot's length in a row, ``length`` rounded up to ``pad_multiple``.
    Works on ints and on numpy arrays of lengths."""
    return -(-length // pad_multiple) * pad_multiple


def context_slots(roles: Sequence[str], share_prompt: bool) -> list[tuple[int, ...]]:
    """Indices into ``roles`` of each slot a group takes, in order: one per role, or with
    ``share_prompt`` one per context (``short_*``, ``long_*``), holding all of its roles as branches."""
    if not share_prompt:
        return [(r,) for r in range(len(roles))]
    kinds: dict[str, list[int]] = {}
    for r, role in enumerate(roles):
        kinds.setdefault(role.split("_")[0], []).append(r)
    return [tuple(indices) for indices in kinds.values()]


def padded_group_lengths(
    lengths: np.ndarray,
    response_starts: np.ndarray,
    roles: Sequence[str],
    pad_multiple: int,
    share_prompt: bool,
) -> np.ndarray:
    """Padded tokens of each group [N] from its sequences' lengths and response starts [N, R].

    A shared slot of n sequences with a prompt of L tokens holds the prompt's first L - 1 tokens once
    and each sequence's remaining tokens (its copy of the prompt's last token, then its answer)."""
    total = np.zeros(lengths.shape[0], dtype=np.int64)
    for slot in context_slots(roles, share_prompt):
        tokens = lengths[:, slot].sum(axis=1) - (len(slot) - 1) * (response_starts[:, slot[0]] - 1)
        total += padded_sequence_length(tokens, pad_multiple)
    return total


def dummy_group(roles: Sequence[str], pad_multiple: int, pad_id: int) -> Group:
    """A group that fills an otherwise empty microbatch; masked out of the loss (valid=False)."""
    seq = EncodedSequence(ids=(pad_id,) * pad_multiple, response_start=pad_multiple)
    return Group(example_id="", sequences={role: seq for role in roles})


@dataclass
class _Slot:
    """One slot's token fields while a row is assembled (lists of [n] tensors)."""

    tokens: Tensor
    labels: Tensor
    loss_mask: Tensor
    segment_ids: Tensor
    position_ids: Tensor
    branch_ids: Tensor
    real_length: int


def _shared_prompt_length(group: Group, roles: Sequence[str]) -> int:
    """The response start the sequences of one slot share (their prompt's length), checked: the
    prompt tokens must be the same, since the slot reads them once."""
    first = group.sequences[roles[0]]
    prompt = np.asarray(first.ids[: first.response_start])
    for role in roles[1:]:
        seq = group.sequences[role]
        if seq.response_start != first.response_start or not np.array_equal(
            np.asarray(seq.ids[: seq.response_start]), prompt
        ):
            raise ValueError(
                f"example {group.example_id!r}: {roles[0]} and {role} have different prompts and cannot share one"
            )
    return first.response_start


def _slot(
    group: Group, roles: Sequence[str], sequence_ids: Sequence[int], pad_multiple: int, pad_id: int
) -> _Slot:
    """The tokens of ``roles`` (one, or several sharing their prompt) as one padded slot.

    Branch b (1-based; 0 for a lone sequence) is the b-th role's ids from its prompt's last token on;
    before the branches come the prompt's other tokens (branch 0). Labels are shifted inside each
    branch (and inside the prompt), so the prompt's last token (each branch's copy) predicts the
    branch's first answer token, exactly as in the sequence alone."""
    shared = len(roles) > 1
    keep = _shared_prompt_length(group, roles) - 1 if shared else 0  # tokens before the branches (read once)
    parts = []  # (ids, sequence id, branch id, first position, first scored index) of the prompt and branches
    for b, (role, sequence_id) in enumerate(zip(roles, sequence_ids), start=1):
        seq = group.sequences[role]
        if not 0 < seq.response_start <= len(seq.ids):
            raise ValueError(f"example {group.example_id!r} role {role}: response_start out of range")
        ids = torch.as_tensor(np.asarray(seq.ids, dtype=np.int64))
        if b == 1 and keep:
            parts.append((ids[:keep], sequence_id, PROMPT_BRANCH, 0, 0))
        parts.append(
            (ids[keep:], sequence_id, b if shared else PROMPT_BRANCH, keep, seq.response_start - 1 - keep)
        )
    real = sum(part[0].numel() for part in parts)
    padded = padded_sequence_length(real, pad_multiple)
    out = _Slot(
        tokens=torch.full((padded,), pad_id, dtype=torch.int64),
        labels=torch.full((padded,), IGNORE_INDEX, dtype=torch.int64),
        loss_mask=torch.zeros(padded, dtype=torch.bool),
        segment_ids=torch.empty(padded, dtype=torch.int64),
        position_ids=torch.empty(padded, dtype=torch.int64),
        branch_ids=torch.empty(padded, dtype=torch.int64),
        real_length=real,
    )
    cursor = 0
    for ids, sequence_id, branch, first_position, response_offset in parts:
        n = ids.numel()
        # The last part (the last branch) owns the slot's padding: positions go on, nothing is scored.
        stop = padded if cursor + n == real else cursor + n
        out.tokens[cursor : cursor + n] = ids
        out.labels[cursor : cursor + n - 1] = ids[1:]
        if branch != PROMPT_BRANCH or not shared:
            out.loss_mask[cursor + response_offset : cursor + n - 1] = True
        out.segment_ids[cursor:stop] = sequence_id
        out.position_ids[cursor:stop] = torch.arange(first_position, first_position + stop - cursor)
        out.branch_ids[cursor:stop] = branch
        cursor += n
    return out


def pack_microbatch(
    groups: Sequence[Group],
    roles: Sequence[str],
    *,
    pad_multiple: int,
    pad_id: int,
    row_length: int | None = None,
    valid: Sequence[bool] | None = None,
    share_prompt: bool = False,
) -> Microbatch:
    """Packs whole groups into one THD row, optionally padded to ``row_length`` tokens (the padding
    then forms a slot of its own at the end of the row, with no real tokens). ``share_prompt``: the
    sequences of one context share a slot (``context_slots``)."""
    roles = tuple(roles)
    if not groups:
        raise ValueError("pack_microbatch needs at least one group (use dummy_group for an empty slot)")
    valid = [True] * len(groups) if valid is None else list(valid)
    slots: list[_Slot] = []
    counts, refs = [], []
    layout = context_slots(roles, share_prompt)
    for g, group in enumerate(groups):
        missing = [role for role in roles if role not in group.sequences]
        if missing:
            raise ValueError(f"example {group.example_id!r} lacks role(s) {', '.join(missing)}")
        for indices in layout:
            sequence_ids = [g * len(roles) + r for r in indices]
            slots.append(_slot(group, [roles[r] for r in indices], sequence_ids, pad_multiple, pad_id))
        counts.append([group.sequences[role].num_response_tokens if valid[g] else 0 for role in roles])
        refs.append([float((group.ref_logps or {}).get(role, float("nan"))) for role in roles])
    offset = sum(slot.tokens.numel() for slot in slots)
    if row_length is not None:
        if row_length < offset:
            raise ValueError(f"groups need {offset} tokens, more than the row length {row_length}")
        if row_length % pad_multiple:
            raise ValueError(f"row length {row_length} is not a multiple of {pad_multiple}")
        tail = row_length - offset
        if tail:  # the row's tail padding is a slot of its own: no sequence's attention span grows
            slots.append(
                _Slot(
                    tokens=torch.full((tail,), pad_id, dtype=torch.int64),
                    labels=torch.full((tail,), IGNORE_INDEX, dtype=torch.int64),
                    loss_mask=torch.zeros(tail, dtype=torch.bool),
                    segment_ids=torch.full((tail,), TAIL_SEGMENT, dtype=torch.int64),
                    position_ids=torch.arange(tail, dtype=torch.int64),
                    branch_ids=torch.full((tail,), PROMPT_BRANCH, dtype=torch.int64),
                    real_length=0,
                )
            )
    cu, cu_padded = [0], [0]
    for slot in slots:
        cu.append(cu_padded[-1] + slot.real_length)
        cu_padded.append(cu_padded[-1] + slot.tokens.numel())
    token_fields = {
        name: torch.cat([getattr(slot, name) for slot in slots]) for name in (*TOKEN_FIELDS, "branch_ids")
    }
    branch_ids = token_fields.pop("branch_ids")
    shared = None
    if any(len(indices) > 1 for indices in layout):
        shared = SharedLayout(branch_ids, token_fields["position_ids"].clone())
    return Microbatch(
        **token_fields,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(cu_padded, dtype=torch.int32),
        seq_roles=torch.tensor([ROLES.index(role) for role in roles] * len(groups), dtype=torch.int64),
        seq_groups=torch.arange(len(groups), dtype=torch.int64).repeat_interleave(len(roles)),
        num_response_tokens=torch.tensor(counts, dtype=torch.int64).view(len(groups), len(roles)),
        ref_logps=torch.tensor(refs, dtype=torch.float32).view(len(groups), len(roles)),
        valid=torch.tensor(valid, dtype=torch.bool),
        roles=roles,
        example_ids=[group.example_id for group in groups],
        shared=shared,
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
