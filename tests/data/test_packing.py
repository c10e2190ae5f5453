"""Packing and CP sharding: properties (hypothesis) and the exact layout of a small case."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from solopo_megatron.data.packing import (
    IGNORE_INDEX,
    TAIL_SEGMENT,
    Group,
    dummy_group,
    pack_microbatch,
    pad_multiple_for,
    plan_microbatches,
    shard_microbatch,
)
from solopo_megatron.data.tokenize import EncodedSequence
from solopo_megatron.objectives import SoLoPOConfig, required_roles

ROLE_SETS = [
    required_roles(SoLoPOConfig(mode=m, solo_ra_chosen_only=c))
    for m in ("solopo", "short_po", "long_po")
    for c in (True, False)
]
PAD = 0


@st.composite
def groups_strategy(draw, max_groups: int = 5):
    roles = draw(st.sampled_from(ROLE_SETS))
    groups = []
    for g in range(draw(st.integers(1, max_groups))):
        sequences = {}
        for role in roles:
            prompt = draw(st.integers(1, 12))
            response = draw(st.integers(1, 6))
            # Distinct token values per position make misplaced labels detectable.
            base = 1000 * (g * 4 + len(sequences)) + 1
            sequences[role] = EncodedSequence(tuple(range(base, base + prompt + response)), prompt)
        groups.append(Group(f"ex-{g}", sequences, {role: -float(g + 1) for role in roles}))
    return roles, groups


def _sequence_bounds(mb):
    cu, cu_padded = mb.cu_seqlens.tolist(), mb.cu_seqlens_padded.tolist()
    return [(cu_padded[s], cu[s + 1]) for s in range(mb.num_sequences)]  # (start, end of real tokens)


@settings(max_examples=60, deadline=None)
@given(groups_strategy(), st.sampled_from([1, 2, 3, 4]), st.booleans())
def test_labels_stay_inside_their_sequence(data, cp, pad_row):
    roles, groups = data
    multiple = pad_multiple_for(cp)
    need = sum(g.padded_length(multiple) for g in groups)
    mb = pack_microbatch(
        groups, roles, pad_multiple=multiple, pad_id=PAD, row_length=need + 2 * multiple if pad_row else None
    )
    assert mb.tokens.numel() == (need + 2 * multiple if pad_row else need)
    for s, (start, end) in enumerate(_sequence_bounds(mb)):
        seq = groups[s // len(roles)].sequences[roles[s % len(roles)]]
        assert mb.tokens[start:end].tolist() == list(seq.ids)
        assert mb.labels[start : end - 1].tolist() == list(seq.ids[1:])  # shifted within the sequence
        assert mb.labels[end - 1 :][mb.segment_ids[end - 1 :] == s].eq(IGNORE_INDEX).all()
        assert mb.position_ids[start:end].tolist() == list(range(end - start))
        # The loss mask selects exactly the positions whose label is a response token.
        scored = mb.labels[start:end][mb.loss_mask[start:end]].tolist()
        assert scored == list(seq.ids[seq.response_start :])
    assert torch.equal(
        mb.num_response_tokens.flatten(),
        torch.tensor([g.sequences[r].num_response_tokens for g in groups for r in roles]),
    )
    assert all(length % multiple == 0 for length in torch.diff(mb.cu_seqlens_padded).tolist())
    # A padded row's tail is a slot of its own, after the last sequence's own padded span.
    assert mb.cu_seqlens.numel() == mb.num_sequences + (2 if pad_row else 1)
    if pad_row:
        tail = slice(need, need + 2 * multiple)
        assert mb.cu_seqlens_padded[-2:].tolist() == [need, need + 2 * multiple] and mb.cu_seqlens[-1] == need
        assert (mb.segment_ids[tail] == TAIL_SEGMENT).all() and not mb.loss_mask[tail].any()
        assert mb.position_ids[tail].tolist() == list(range(2 * multiple))


@settings(max_examples=60, deadline=None)
@given(groups_strategy(), st.sampled_from([1, 2, 3, 4]))
def test_cp_shards_reassemble_and_score_each_response_token_once(data, cp):
    roles, groups = data
    mb = pack_microbatch(groups, roles, pad_multiple=pad_multiple_for(cp), pad_id=PAD)
    shards = [shard_microbatch(mb, cp, r) for r in range(cp)]
    sizes = {s.tokens.numel() for s in shards}
    assert len(sizes) == 1  # balanced
    from solopo_megatron.data.cp_sharding import zigzag_indices

    rebuilt = torch.empty_like(mb.labels)
    for rank, shard in enumerate(shards):
        rebuilt[zigzag_indices(mb.cu_seqlens_padded, cp, rank)] = shard.labels
        assert torch.equal(shard.num_response_tokens, mb.num_response_tokens)  # full-sequence counts
    assert torch.equal(rebuilt, mb.labels)
    scored = torch.cat([s.labels[s.loss_mask] for s in shards]).sort().values
    expected = torch.tensor(
        sorted(t for g in groups for r in roles for t in g.sequences[r].ids[g.sequences[r].response_start :])
    )
    assert torch.equal(scored, expected)
    assert sum(int(s.loss_mask.sum()) for s in shards) == int(mb.num_response_tokens.sum())


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(64, 200), st.integers(1, 4))
def test_plan_keeps_groups_whole_within_budget_and_balanced(lengths, budget, dp):
    plan = plan_microbatches(lengths, budget, dp)
    assert len({len(rank) for rank in plan}) == 1  # same microbatch count on every DP rank
    placed = sorted(i for rank in plan for mb in rank for i in mb)
    assert placed == list(range(len(lengths)))  # every group exactly once: never split, never lost
    for rank in plan:
        for mb in rank:
            assert sum(lengths[i] for i in mb) <= budget
    assert plan == plan_microbatches(list(lengths), budget, dp)  # deterministic
    # Within twice the token lower bound (+1) of microbatches per rank.
    lower = -(-sum(lengths) // (budget * dp))
    assert len(plan[0]) <= 2 * lower + 1


def test_plan_rejects_group_over_budget():
    import pytest

    with pytest.raises(
        ValueError, match="group 1 needs 90 padded tokens, more than the microbatch budget max_tokens=64"
    ):
        plan_microbatches([10, 90, 20], 64)


def test_exact_layout_small_case():
    seq_a = EncodedSequence((11, 12, 13, 14, 15), response_start=3)  # prompt 11 12 13, response 14 15
    seq_b = EncodedSequence((21, 22, 23), response_start=2)
    group = Group(
        "ex", {"short_chosen": seq_a, "short_rejected": seq_b}, {"short_chosen": -1.5, "short_rejected": -2.5}
    )
    mb = pack_microbatch([group], ("short_chosen", "short_rejected"), pad_multiple=4, pad_id=0, row_length=16)
    assert mb.tokens.tolist() == [11, 12, 13, 14, 15, 0, 0, 0, 21, 22, 23, 0, 0, 0, 0, 0]
    I = IGNORE_INDEX  # noqa: E741
    assert mb.labels.tolist() == [12, 13, 14, 15, I, I, I, I, 22, 23, I, I, I, I, I, I]
    assert mb.loss_mask.nonzero().flatten().tolist() == [2, 3, 9]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3]
    assert mb.cu_seqlens.tolist() == [0, 5, 11, 12] and mb.cu_seqlens_padded.tolist() == [0, 8, 12, 16]
    assert mb.segment_ids.tolist() == [0] * 8 + [1] * 4 + [-1] * 4  # the row's tail: its own slot
    assert mb.num_response_tokens.tolist() == [[2, 1]] and mb.ref_logps.tolist() == [[-1.5, -2.5]]
    shard = shard_microbatch(
        mb, cp_size=2, cp_rank=0
    )  # TE order, per slot: rank 0 keeps [0,1,6,7,8,11,12,15]
    assert shard.tokens.tolist() == [11, 12, 0, 0, 21, 0, 0, 0]


def test_dummy_group_contributes_nothing():
    roles = ("short_chosen", "short_rejected", "long_chosen")
    mb = pack_microbatch([dummy_group(roles, 4, 0)], roles, pad_multiple=4, pad_id=0, valid=[False])
    assert not mb.loss_mask.any() and mb.valid.tolist() == [False]
    assert mb.num_response_tokens.tolist() == [[0, 0, 0]]
