"""Shared prompts in packing: the answers of one context as branches of one slot (dataset.share_prompt).

The property that makes sharing exact: every scored token sees, through the branch rule, the same
(position, token) context as in its own unshared sequence, and predicts the same label.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_packing import PAD, ROLE_SETS

from solopo_megatron.data.packing import (
    IGNORE_INDEX,
    PROMPT_BRANCH,
    TAIL_SEGMENT,
    Group,
    context_slots,
    pack_microbatch,
    pad_multiple_for,
    padded_group_lengths,
    shard_microbatch,
)
from solopo_megatron.data.tokenize import EncodedSequence


@st.composite
def shared_groups(draw, max_groups: int = 4):
    """Groups whose roles of one context have the same prompt (as the tokenizer gives them)."""
    roles = draw(st.sampled_from(ROLE_SETS))
    groups = []
    for g in range(draw(st.integers(1, max_groups))):
        prompts = {kind: draw(st.integers(1, 12)) for kind in ("short", "long")}
        answers = {answer: draw(st.integers(1, 6)) for answer in ("chosen", "rejected")}
        sequences = {}
        for role in roles:
            kind, answer = role.split("_")
            base = 10_000 * g + 1
            prompt = tuple(
                range(base + 100 * (kind == "long"), base + 100 * (kind == "long") + prompts[kind])
            )
            start = (
                base + 5000 + 1000 * (answer == "rejected")
            )  # distinct answer tokens expose misplaced labels
            sequences[role] = EncodedSequence(
                prompt + tuple(range(start, start + answers[answer])), len(prompt)
            )
        groups.append(Group(f"ex-{g}", sequences, {role: -float(g + 1) for role in roles}))
    return roles, groups


def _visible(mb, t: int) -> list[tuple[int, int]]:
    """(position, token) of every key token t attends to in the whole row, by the branch rule."""
    cu = mb.cu_seqlens_padded.tolist()
    slot = next(s for s in range(len(cu) - 1) if cu[s] <= t < cu[s + 1])
    branches = mb.shared.branch_ids if mb.shared is not None else torch.zeros_like(mb.tokens)
    keys = [k for k in range(cu[slot], t + 1) if branches[k] == PROMPT_BRANCH or branches[k] == branches[t]]
    return [(int(mb.position_ids[k]), int(mb.tokens[k])) for k in keys]


def _scored(mb) -> dict[int, list]:
    """sequence -> [(visible context, label)] of its scored tokens, in position order."""
    out: dict[int, list] = {}
    for t in mb.loss_mask.nonzero().flatten().tolist():
        out.setdefault(int(mb.segment_ids[t]), []).append((_visible(mb, t), int(mb.labels[t])))
    return out


@settings(max_examples=40, deadline=None)
@given(shared_groups(), st.sampled_from([1, 2, 3]), st.booleans())
def test_every_scored_token_sees_what_it_sees_unshared(data, cp, pad_row):
    roles, groups = data
    multiple = pad_multiple_for(cp)
    shared_need = sum(g.padded_length(multiple, share_prompt=True) for g in groups)
    unshared = pack_microbatch(groups, roles, pad_multiple=multiple, pad_id=PAD)
    shared = pack_microbatch(
        groups,
        roles,
        pad_multiple=multiple,
        pad_id=PAD,
        share_prompt=True,
        row_length=shared_need + 2 * multiple if pad_row else None,
    )
    # The planner's length is the packer's.
    assert shared.tokens.numel() == shared_need + (2 * multiple if pad_row else 0)
    assert _scored(shared) == _scored(unshared)
    # Per-sequence and per-group fields do not depend on the layout.
    for name in ("seq_roles", "seq_groups", "num_response_tokens", "valid"):
        assert torch.equal(getattr(shared, name), getattr(unshared, name)), name
    torch.testing.assert_close(shared.ref_logps, unshared.ref_logps)
    # Slots: padded to the multiple; the tail slot is branch 0, segment TAIL_SEGMENT.
    lengths = shared.cu_seqlens_padded.diff()
    assert bool((lengths % multiple == 0).all())
    if pad_row:
        assert bool((shared.segment_ids[-2 * multiple :] == TAIL_SEGMENT).all())
    any_pair = any(len(slot) > 1 for slot in context_slots(roles, True))
    assert (shared.shared is not None) == any_pair
    if any_pair:
        assert torch.equal(shared.shared.position_ids, shared.position_ids)
        assert shared.tokens.numel() <= unshared.tokens.numel() + (2 * multiple if pad_row else 0)


def test_a_long_pair_shares_its_prompt_exactly_as_laid_out():
    prompt, chosen, rejected = (11, 12, 13, 14), (21, 22, 2), (31, 2)
    group = Group(
        "ex",
        {
            "long_chosen": EncodedSequence(prompt + chosen, len(prompt)),
            "long_rejected": EncodedSequence(prompt + rejected, len(prompt)),
        },
    )
    mb = pack_microbatch(
        [group], ("long_chosen", "long_rejected"), pad_multiple=4, pad_id=0, share_prompt=True
    )
    I = IGNORE_INDEX  # noqa: E741
    # The prompt's first tokens once; each branch: its copy of the prompt's last token, then its answer.
    assert mb.tokens.tolist() == [11, 12, 13, 14, 21, 22, 2, 14, 31, 2, 0, 0]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7]
    assert mb.shared.branch_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert mb.labels.tolist() == [12, 13, I, 21, 22, 2, I, 31, 2, I, I, I]
    assert mb.loss_mask.tolist() == [False] * 3 + [True] * 3 + [False, True, True] + [False] * 3
    assert mb.segment_ids.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert mb.cu_seqlens.tolist() == [0, 10] and mb.cu_seqlens_padded.tolist() == [0, 12]
    assert mb.num_response_tokens.tolist() == [[3, 2]]
    # Unshared, the same row takes 8 + 8 tokens.
    alone = pack_microbatch([group], ("long_chosen", "long_rejected"), pad_multiple=4, pad_id=0)
    assert alone.tokens.numel() == 16 and alone.shared is None


def test_context_slots_group_the_roles_of_one_context():
    roles = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")
    assert context_slots(roles, True) == [(0, 1), (2, 3)]
    assert context_slots(roles, False) == [(0,), (1,), (2,), (3,)]
    assert context_slots(("short_chosen", "short_rejected", "long_chosen"), True) == [(0, 1), (2,)]


def test_padded_group_lengths_count_the_prompt_once():
    # Two groups of long_chosen / long_rejected: lengths [N, R] and response starts [N, R].
    lengths = np.array([[100, 90], [7, 9]])
    starts = np.array([[80, 80], [5, 5]])
    roles = ("long_chosen", "long_rejected")
    assert padded_group_lengths(lengths, starts, roles, 2, False).tolist() == [190, 18]
    # 79 prompt tokens once + (21 + 11) branch tokens = 111 -> 112; 4 + (3 + 5) = 12.
    assert padded_group_lengths(lengths, starts, roles, 2, True).tolist() == [112, 12]


def test_different_prompts_cannot_share():
    group = Group(
        "ex-7",
        {
            "long_chosen": EncodedSequence((1, 2, 3, 4), 3),
            "long_rejected": EncodedSequence((1, 9, 3, 5), 3),
        },
    )
    with pytest.raises(ValueError, match="ex-7.*different prompts"):
        pack_microbatch(
            [group], ("long_chosen", "long_rejected"), pad_multiple=2, pad_id=0, share_prompt=True
        )


def test_cp_shards_a_shared_slot_as_one_sequence_and_keeps_the_layout_whole():
    group = Group(
        "ex",
        {
            "long_chosen": EncodedSequence(tuple(range(1, 12)), 8),
            "long_rejected": EncodedSequence(tuple(range(1, 9)) + (40, 41), 8),
        },
    )
    mb = pack_microbatch(
        [group], ("long_chosen", "long_rejected"), pad_multiple=4, pad_id=0, share_prompt=True
    )
    parts = [shard_microbatch(mb, 2, rank) for rank in range(2)]
    assert sum(p.tokens.numel() for p in parts) == mb.tokens.numel()
    for part in parts:
        assert part.shared is mb.shared  # attention and RoPE look up every rank's keys in it
    # Each rank's positions are its zigzag share of the tree positions.
    chunk = mb.tokens.numel() // 4
    assert parts[0].position_ids.tolist() == (
        mb.position_ids[:chunk].tolist() + mb.position_ids[3 * chunk :].tolist()
    )
