"""Attention over rows with shared prompts: a slot's prompt (branch 0) is seen by its branches, and no
branch sees another. The dense oracle, the flex block mask, the sdpa spans and both backends' outputs
(CP 1 and 2) against it, and the equivalence the feature rests on: a branch attends as its sequence
alone would."""

from __future__ import annotations

import bisect
import types

import pytest
import torch
from distributed import grid_groups, run_distributed
from model_checks import assert_block_mask_is_create_block_masks, core_attention, dense_attention, row_params

from solopo_megatron.data.cp_sharding import zigzag_indices
from solopo_megatron.megatron.model import flex_attention_available

# One row: (prompt length, branch lengths, padding) per slot; no branches: an unshared sequence whose
# tokens are all "prompt" (branch 0). Uneven branches, the padding on the last branch, an empty
# prompt, an unshared slot, an empty slot and the row's tail slot. Every slot a multiple of 2 * 2 (CP 2).
SLOTS = ((12, (20, 9), 3), (0, (10, 18, 7), 1), (14, (), 2), (0, (), 0), (20, (36, 5, 23), 0), (12, (), 0))
HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def shared_row(slots=SLOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_padded int32, branch_ids int64) of the whole row described by ``slots``."""
    bounds, branch_ids = [0], []
    for prompt, branches, pad in slots:
        ids = [0] * prompt
        for b, n in enumerate(branches, start=1):
            ids += [b] * n
        ids += [ids[-1] if ids else 0] * pad  # the slot's padding belongs to its last branch
        branch_ids += ids
        bounds.append(bounds[-1] + len(ids))
    return torch.tensor(bounds, dtype=torch.int32), torch.tensor(branch_ids, dtype=torch.int64)


def shared_params(cu: torch.Tensor, branch_ids: torch.Tensor | None):
    """The row's SharedPromptSeqParams, as the training step passes them (padded bounds everywhere)."""
    return row_params(cu, branch_ids)


def random_qkv(t: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """q [t, heads, d], k and v [t, groups, d] (grouped-query attention)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(t, n, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
        for n in (HEADS, GROUPS, GROUPS)
    ]


def brute_force_mask(cu: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """bool [t, t] of the whole row, pair by pair from the rule's words: same slot, key not after the
    query, and the key on the prompt (branch 0) or on the query's own branch."""
    bounds, branch = cu.tolist(), branch_ids.tolist()
    slot = [bisect.bisect_right(bounds, i) - 1 for i in range(bounds[-1])]  # empty slots never own a token
    return torch.tensor(
        [
            [slot[q] == slot[k] and k <= q and branch[k] in (0, branch[q]) for k in range(len(slot))]
            for q in range(len(slot))
        ]
    )


def _rows_of_branch(slot: int, branch: int) -> slice:
    """The row indices of ``branch`` (0: the prompt) of ``SLOTS[slot]``, padding included."""
    cu, branch_ids = shared_row()
    begin, end = int(cu[slot]), int(cu[slot + 1])
    rows = (branch_ids[begin:end] == branch).nonzero()[:, 0] + begin
    return slice(int(rows[0]), int(rows[-1]) + 1)


def test_oracle_is_the_per_pair_rule():
    """The dense oracle equals the rule checked pair by pair, on every CP rank's rows (zigzag) and keys
    (all-gather order); with branch ids all zero (or None) it is the plain document-causal mask."""
    from solopo_megatron.megatron.attention import packed_attention_mask

    cu, branch_ids = shared_row()
    brute = brute_force_mask(cu, branch_ids)
    for cp in (1, 2):
        keys = torch.cat([zigzag_indices(cu, cp, r) for r in range(cp)])
        for rank in range(cp):
            rows = zigzag_indices(cu, cp, rank)
            assert torch.equal(packed_attention_mask(cu, cp, rank, branch_ids), brute[rows][:, keys]), (
                cp,
                rank,
            )
            plain = packed_attention_mask(cu, cp, rank)
            assert torch.equal(packed_attention_mask(cu, cp, rank, torch.zeros_like(branch_ids)), plain)
            assert torch.equal(plain, brute_force_mask(cu, torch.zeros_like(branch_ids))[rows][:, keys])
    # The rule in one picture: slot 0's second branch sees its prompt and itself, never the first branch.
    mask = packed_attention_mask(cu, 1, 0, branch_ids)
    prompt, first, second = (_rows_of_branch(0, b) for b in (0, 1, 2))
    assert mask[second, prompt].all() and not mask[second, first].any() and not mask[first, second].any()
    assert mask[second, second].equal(torch.ones(12, 12, dtype=torch.bool).tril())


@pytest.mark.parametrize("block_size", [8, 16])
def test_block_mask_with_branches_is_create_block_masks(block_size, monkeypatch):
    """The blockwise builder with branch ids gives create_block_mask's block structure over the dense
    oracle (tile by tile, CP 1 and both ranks of CP 2), and reports blocks between two branches of one
    slot empty: flex skips them."""
    if not flex_attention_available():
        pytest.skip("this torch has no flex_attention")

    from solopo_megatron.megatron import attention

    monkeypatch.setattr(
        attention, "_MASK_TILE_ELEMENTS", block_size * block_size * 3
    )  # several tiles per row
    cu, branch_ids = shared_row()
    cpu = torch.device("cpu")
    for cp in (1, 2):
        for rank in range(cp):
            got = attention.document_causal_block_mask(cu, cp, rank, cpu, block_size, branch_ids=branch_ids)
            dense = attention.packed_attention_mask(cu, cp, rank, branch_ids)
            assert_block_mask_is_create_block_masks(got, dense, block_size)
            plain = attention.document_causal_block_mask(cu, cp, rank, cpu, block_size)
            skipped = (plain.to_dense() > 0) & (got.to_dense() == 0)
            assert skipped.any() and not ((got.to_dense() > 0) & (plain.to_dense() == 0)).any(), (cp, rank)


def test_sequence_spans_with_branches_cover_exactly_the_dense_mask():
    """sdpa's spans see, for every query, exactly the keys the oracle allows (CP 1 and 2). At CP = 1 a
    shared slot is its prompt (causal) and then each branch over [prompt keys; its own keys], in row
    order: no span of a shared slot has the slot's keys."""
    from solopo_megatron.megatron.attention import packed_attention_mask, sequence_spans

    cu, branch_ids = shared_row()
    for cp in (1, 2):
        for rank in range(cp):
            dense = packed_attention_mask(cu, cp, rank, branch_ids)
            covered = torch.zeros_like(dense)
            for span in sequence_spans(cu, cp, rank, branch_ids):
                keys = span.key_rows if span.key_rows is not None else torch.arange(span.start, span.end)
                mask = span.mask if span.mask is not None else torch.ones(len(keys), len(keys)).tril().bool()
                covered[span.start : span.end][:, keys] = mask
            assert torch.equal(covered, dense), (cp, rank)
    expected, offset = [], 0  # (start, end, key rows or None: causal over its own rows) per CP = 1 span
    for prompt, branches, pad in SLOTS:
        if not branches:  # an unshared slot: one causal span (none if empty)
            expected += [(offset, offset + prompt + pad, None)] if prompt + pad else []
            offset += prompt + pad
            continue
        expected += [(offset, offset + prompt, None)] if prompt else []
        start = offset + prompt
        for n in (*branches[:-1], branches[-1] + pad):
            keys = [*range(offset, offset + prompt), *range(start, start + n)] if prompt else None
            expected.append((start, start + n, keys))
            start += n
        offset = start
    spans = sequence_spans(cu, 1, 0, branch_ids)
    assert [(s.start, s.end, None if s.key_rows is None else s.key_rows.tolist()) for s in spans] == expected


@pytest.mark.parametrize(
    "ids", [[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 2, 2, 1, 1, 1, 1], [0, 1, 1, 2, 2, 1, 1, 1]]
)
def test_sequence_spans_refuse_a_branch_layout_they_cannot_split(ids):
    """A slot's prompt comes first and each branch is contiguous with increasing ids, or it is an error."""
    from solopo_megatron.megatron.attention import sequence_spans

    for cp in (1, 2):
        with pytest.raises(ValueError, match="branch ids"):
            sequence_spans(torch.tensor([0, 8]), cp, 0, torch.tensor(ids))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_equal_the_dense_oracle_with_branches(backend):
    """CP = 1: PackedCoreAttention on the shared row equals float64 dense-masked attention, and (sdpa)
    so do the gradients of q, k and v. flex: forward only on CPU (its backward needs CUDA)."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    cu, branch_ids = shared_row()
    train = backend == "sdpa"
    dtype, tol = (torch.float64, 1e-10) if train else (torch.float32, 2e-5)
    q, k, v = (x.requires_grad_(train) for x in random_qkv(int(cu[-1]), dtype, seed=1))
    core = core_attention(backend, HEADS, GROUPS, HEAD_DIM)
    with torch.set_grad_enabled(train):
        out = core(q, k, v, None, packed_seq_params=shared_params(cu, branch_ids))
    full = [x.detach().double().requires_grad_(train) for x in (q, k, v)]
    want = dense_attention(*full, cu, branch_ids)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    if train:
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (out * weights).sum().backward()
        (want * weights).sum().backward()
        for got, expected in zip((q, k, v), full):
            torch.testing.assert_close(got.grad, expected.grad, rtol=tol, atol=tol)


def shared_row_matches_oracle_under_cp(rank: int, world_size: int, backend: str) -> None:
    """CP = world_size: this rank's zigzag share of the shared row through ``backend`` equals the dense
    oracle's rows (and, sdpa, the gradients of q, k and v; flex: forward only on CPU)."""
    from solopo_megatron.megatron.attention import PackedCoreAttention

    _, cp_group, _, _ = grid_groups(1, world_size)
    cu, branch_ids = shared_row()
    params = shared_params(cu, branch_ids)
    mine = zigzag_indices(cu, world_size, rank)
    train = backend == "sdpa"
    dtype, tol = (torch.float64, 1e-10) if train else (torch.float32, 2e-5)
    q, k, v = random_qkv(int(cu[-1]), dtype, seed=3)
    local = [x[mine].clone().requires_grad_(train) for x in (q, k, v)]
    attention = PackedCoreAttention(
        types.SimpleNamespace(context_parallel_size=world_size, attention_dropout=0.0),
        layer_number=1,
        attn_mask_type=None,
        pg_collection=types.SimpleNamespace(cp=cp_group),
        backend=backend,
    )
    with torch.set_grad_enabled(train):
        out = attention(*local, None, packed_seq_params=params)
    full = [x.double().requires_grad_(train) for x in (q, k, v)]
    want = dense_attention(*full, cu, branch_ids)
    torch.testing.assert_close(out.double(), want[mine], rtol=tol, atol=tol)
    if train:
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        (out * weights[mine]).sum().backward()
        (want * weights).sum().backward()
        for got, expected in zip(local, full):
            torch.testing.assert_close(got.grad, expected.grad[mine], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "backend",
    [
        "sdpa",
        # Slow (14 s, two processes): flex's CP=2 block mask stays in the default suite against the
        # dense oracle and create_block_mask on both ranks (test_block_mask_with_branches_is_create_block_masks).
        pytest.param("flex", marks=pytest.mark.slow),
    ],
)
def test_backends_equal_the_dense_oracle_with_branches_under_cp2(backend):
    """CP = 2 on two gloo ranks: keys all-gathered, each slot's mask (sdpa) and the block mask (flex)
    in global positions with the branch rule."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    run_distributed(shared_row_matches_oracle_under_cp, 2, backend)


def _prompt_and_branches(prompt: int, branches: tuple[int, ...], seed: int = 5):
    """q, k, v (float32) of a prompt and then the branches, each a list of per-part tensors."""
    parts = [random_qkv(n, torch.float32, seed=seed + i) for i, n in enumerate((prompt, *branches))]
    return [[part[j] for part in parts] for j in range(3)]  # [q parts, k parts, v parts]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_branch_attends_as_its_sequence_alone(backend):
    """The point of sharing: in a slot [prompt, branch 1, branch 2] every token's attention output equals
    the one it has in the unshared sequence [prompt, its branch] (same q, k, v vectors)."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    prompt, branches = 40, (70, 52)  # even: flex rows are zigzag-checked
    qkv = _prompt_and_branches(prompt, branches)
    core = core_attention(backend, HEADS, GROUPS, HEAD_DIM)
    cu, branch_ids = shared_row(((prompt, branches, 0),))
    # The unshared sequences [prompt, branch 1] and [prompt, branch 2], packed in one plain row.
    alone_cu, _ = shared_row(((prompt + branches[0], (), 0), (prompt + branches[1], (), 0)))
    with torch.no_grad():
        shared = core(
            *(torch.cat(parts) for parts in qkv), None, packed_seq_params=shared_params(cu, branch_ids)
        )
        alone = core(
            *(torch.cat([parts[0], parts[1], parts[0], parts[2]]) for parts in qkv),
            None,
            packed_seq_params=shared_params(alone_cu, None),
        )
    first, second = prompt + branches[0], prompt + branches[0] + prompt
    torch.testing.assert_close(shared[:first], alone[:first], rtol=1e-5, atol=1e-5)  # prompt, branch 1
    torch.testing.assert_close(shared[first:], alone[second:], rtol=1e-5, atol=1e-5)  # branch 2
    torch.testing.assert_close(shared[:prompt], alone[first:second], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_branch_never_sees_another(backend):
    """Changing branch 1's keys and values changes branch 1's outputs only: the prompt and branch 2 (which
    come after it in the row, and would see it under the plain causal mask) are untouched."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    prompt, branches = 24, (40, 36)
    q, k, v = (torch.cat(parts) for parts in _prompt_and_branches(prompt, branches, seed=7))
    cu, branch_ids = shared_row(((prompt, branches, 0),))
    params = shared_params(cu, branch_ids)
    core = core_attention(backend, HEADS, GROUPS, HEAD_DIM)
    first = slice(prompt, prompt + branches[0])
    k2, v2 = k.clone(), v.clone()
    k2[first] += 1.0
    v2[first] *= -2.0
    with torch.no_grad():
        before, after = (
            core(q, k, v, None, packed_seq_params=params),
            core(q, k2, v2, None, packed_seq_params=params),
        )
        plain = shared_params(cu, None)
        plain_before, plain_after = (
            core(q, k, v, None, packed_seq_params=plain),
            core(q, k2, v2, None, packed_seq_params=plain),
        )
    others = torch.ones(len(q), dtype=torch.bool)
    others[first] = False
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert (after[first] - before[first]).abs().max() > 0.1
    assert (
        plain_after[prompt + branches[0] :] - plain_before[prompt + branches[0] :]
    ).abs().max() > 0.1  # the check bites


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_row_derived_state_is_built_once_and_keyed_by_branch_ids(backend, monkeypatch):
    """Layers of one microbatch share one build of the spans (one host copy of the branch ids) or of the
    block mask; a row's state with branch ids never serves it without them, nor the reverse."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    from solopo_megatron.megatron import attention

    name = {"sdpa": "sequence_spans", "flex": "document_causal_block_mask"}[backend]
    built = []
    original = getattr(attention, name)
    monkeypatch.setattr(attention, name, lambda *args, **kwargs: built.append(1) or original(*args, **kwargs))
    monkeypatch.setattr(attention, "_LAST", {})
    cu, branch_ids = shared_row()
    q, k, v = random_qkv(int(cu[-1]), torch.float32, seed=9)
    core = core_attention(backend, HEADS, GROUPS, HEAD_DIM)
    shared, plain = shared_params(cu, branch_ids), shared_params(cu, None)
    steps = [
        (shared, branch_ids, 1),
        (shared, branch_ids, 1),
        (plain, None, 2),
        (plain, None, 2),
        (shared, branch_ids, 3),
    ]
    with torch.no_grad():
        for params, branches, builds in steps:
            out = core(q, k, v, None, packed_seq_params=params)
            assert len(built) == builds
            torch.testing.assert_close(
                out.double(), dense_attention(q, k, v, cu, branches), rtol=2e-5, atol=2e-5
            )
        shared.branch_ids = None  # the same params object, now without branches: rebuilt
        out = core(q, k, v, None, packed_seq_params=shared)
    assert len(built) == 4
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, cu), rtol=2e-5, atol=2e-5)


# Rows of several lengths and layouts (every one over one 128-token block: compiled, not eager).
COMPILED_ROWS = (
    SLOTS,
    ((40, (70, 52), 0), (100, (), 0)),
    ((30, (), 2), (8, (100, 60, 2), 0)),
    ((130, (30,), 0), (50, (), 0), (0, (40, 40), 0)),
)


def test_compiled_flex_with_branches_traces_one_graph_per_kind_of_row(monkeypatch):
    """The compiled flex call over rows of many lengths, each with and without branch ids, in both grad
    modes: one graph per (branches or not, grad mode), none per row length, so dynamo's recompile limit
    (8) is not reached. Counted on the eager backend, forward only, as in test_packed_attention."""
    if not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    from torch._dynamo.testing import CompileCounterWithBackend

    from solopo_megatron.megatron import attention

    counter = CompileCounterWithBackend("eager")
    monkeypatch.setattr(attention, "_COMPILED", {})
    monkeypatch.setattr(attention, "_COMPILE_BACKEND", counter)
    monkeypatch.setattr(attention, "_compiles_flex", lambda device: True)
    core = core_attention("flex", HEADS, GROUPS, HEAD_DIM)
    graphs = []
    torch._dynamo.reset()
    try:
        for i, slots in enumerate(COMPILED_ROWS):
            cu, branch_ids = shared_row(slots)
            q, k, v = random_qkv(int(cu[-1]), torch.float32, seed=i)
            for branches in (branch_ids, None):
                with torch.set_grad_enabled(i % 2 == 1):
                    out = core(q, k, v, None, packed_seq_params=shared_params(cu, branches))
                want = dense_attention(q, k, v, cu, branches)
                torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
                graphs.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    assert graphs[-1] <= 4 and graphs[3] == graphs[-1], graphs  # none after each kind's first row


@pytest.mark.gpu
def test_flash_varlen_serves_only_rows_without_branches(monkeypatch):
    """On CUDA in bf16 at CP = 1, flash-attn's varlen kernel (causal per slot only) is skipped for a row
    with branch ids: sdpa's branch-aware spans serve it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from solopo_megatron.megatron import attention

    calls = []

    def fake_flash(query, *args, **kwargs):
        calls.append(1)
        return torch.zeros_like(query)

    monkeypatch.setattr(attention, "_flash_varlen", lambda: fake_flash)
    cu, branch_ids = shared_row()
    q, k, v = (x.cuda() for x in random_qkv(int(cu[-1]), torch.bfloat16, seed=11))
    core = core_attention("sdpa", HEADS, GROUPS, HEAD_DIM)
    out = core(q, k, v, None, packed_seq_params=shared_params(cu.cuda(), branch_ids.cuda()))
    assert not calls
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, cu, branch_ids), rtol=2e-2, atol=2e-2)
    core(q, k, v, None, packed_seq_params=shared_params(cu.cuda(), None))
    assert calls == [1]  # the fake stands where flash-attn would: the check reaches that branch
