"""Packed (THD) attention: the mask, and a GPT forward that gives each sequence the same log-probs alone or packed."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from model_checks import attention_backend_matches_oracle, packed_equals_alone

from solopo_megatron.data.cp_sharding import zigzag_indices
from solopo_megatron.megatron.model import flex_attention_available


def test_mask_is_block_causal_in_global_positions():
    from solopo_megatron.megatron.attention import packed_attention_mask

    cu = torch.tensor([0, 4, 12])
    full = packed_attention_mask(cu, 1, 0)
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[:4, :4] = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    expected[4:, 4:] = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(full, expected)
    # A CP rank's rows are the global mask's rows at its zigzag positions, keys in all-gather order.
    keys = torch.cat([zigzag_indices(cu, 2, r) for r in range(2)])
    for rank in range(2):
        rows = zigzag_indices(cu, 2, rank)
        assert torch.equal(packed_attention_mask(cu, 2, rank), expected[rows][:, keys])


def test_gpt_packed_rows_do_not_leak_between_sequences():
    run_distributed(packed_equals_alone, 1)


def test_sequence_spans_cover_exactly_the_dense_mask():
    """Per-sequence attention sees, for every query, exactly the keys the dense oracle allows."""
    from solopo_megatron.megatron.attention import packed_attention_mask, sequence_spans

    cu = torch.tensor([0, 8, 8, 20, 32])  # an empty slot included
    for cp in (1, 2):
        for rank in range(cp):
            dense = packed_attention_mask(cu, cp, rank)
            covered = torch.zeros_like(dense)
            spans = sequence_spans(cu, cp, rank)
            assert [s.start for s in spans] == [b // cp for b in (0, 8, 20)] and spans[-1].end == 32 // cp
            for span in spans:
                keys = span.key_rows if span.key_rows is not None else torch.arange(span.start, span.end)
                mask = (
                    span.mask
                    if span.mask is not None
                    else torch.tril(torch.ones(len(keys), len(keys), dtype=torch.bool))
                )
                covered[span.start : span.end][:, keys] = mask
            assert torch.equal(covered, dense), (cp, rank)


@pytest.mark.parametrize("cp", [1, 2], ids=["cp1", "cp2"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_backends_equal_the_dense_oracle(backend, cp):
    """Outputs (and, where the backend trains here, gradients) on packed rows with padding, CP 1 and 2.
    flex: forward only on CPU (torch's flex_attention backward needs CUDA); the GPU tests run its backward."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    run_distributed(attention_backend_matches_oracle, cp, backend, gpu=backend == "flex" and cp == 1)


@pytest.mark.parametrize("block_size", [16, 128])
def test_block_mask_is_create_block_masks_without_the_dense_grid(block_size, monkeypatch):
    """The blockwise builder gives create_block_mask's block structure (empty / partial / full blocks and
    the dense mask they stand for), tile by tile, for CP ranks and rows that are not block multiples."""
    if not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    from torch.nn.attention.flex_attention import create_block_mask

    from solopo_megatron.megatron import attention

    monkeypatch.setattr(attention, "_MASK_TILE_ELEMENTS", 16 * 16 * 3)  # several tiles per row
    cu = torch.tensor([0, 8, 20, 44, 48, 64, 100])
    for cp in (1, 2):
        for rank in range(cp):
            got = attention.document_causal_block_mask(cu, cp, rank, torch.device("cpu"), block_size)
            dense = attention.packed_attention_mask(cu, cp, rank)
            want = create_block_mask(
                lambda b, h, q, k, dense=dense: dense[q, k],
                None,
                None,
                *dense.shape,
                device="cpu",
                BLOCK_SIZE=block_size,
            )
            assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
            assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)
            assert torch.equal(got.to_dense(), want.to_dense())
            rows = torch.arange(dense.shape[0])[:, None]
            keys = torch.arange(dense.shape[1])[None, :]
            assert torch.equal(got.mask_mod(0, 0, rows, keys), dense)


def test_compiled_flex_attention_does_not_recompile_per_row():
    """The production call (compiled with dynamic shapes, a fresh mask closure per microbatch) on rows of
    many lengths: the graphs stop at two (a size that first equals another, like 2 query blocks and 2 KV
    groups, is traced as one symbol, then generalised once), so dynamo's recompile limit (8) never
    sends flex attention back to eager.
    Dynamo's guards are what is tested, so the graph runs on the eager backend (inductor's CPU flex
    template fails to build some of these shapes; the GPU tests run the Triton one)."""
    if not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from solopo_megatron.megatron import attention

    compiled = torch.compile(flex_attention, dynamic=True, backend="eager")
    graphs = [counters["stats"]["unique_graphs"]]
    gen = torch.Generator().manual_seed(0)
    for lengths in ([136, 120], [200, 8, 176], [264], [72, 312, 40], [1000, 24], [520, 520, 8]):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        t = int(cu[-1])
        q, k, v = (torch.randn(1, h, t, 32, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
        mask = attention.document_causal_block_mask(cu, 1, 0, torch.device("cpu"))
        got = compiled(q.float(), k.float(), v.float(), block_mask=mask, enable_gqa=True)
        dense = attention.packed_attention_mask(cu, 1, 0)
        scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 32**0.5
        want = scores.masked_fill(~dense, float("-inf")).softmax(-1) @ v.repeat_interleave(2, dim=1)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] - graphs[0] <= 2 and graphs[-1] == graphs[2]  # none after the second row


@pytest.mark.parametrize("cp", [1, 2], ids=["cp1", "cp2"])
def test_packed_seq_params_follow_transformer_engines_thd_contract(cp):
    """TE takes lengths from cu_seqlens and offsets from cu_seqlens_padded. We pass the padded slot
    offsets as both (global, before CP sharding): every slot is read as one sequence of its padded
    length, starting where the sequence starts, so no sequence is read past its slot into the next."""
    from solopo_megatron.data.packing import Group, pack_microbatch, pad_multiple_for, shard_microbatch
    from solopo_megatron.data.tokenize import EncodedSequence
    from solopo_megatron.megatron.step import packed_seq_params

    multiple = pad_multiple_for(cp)
    lengths = [5, 13, 4, 9]  # uneven padding: 1, 1, 0, 1 tokens at cp=1; 3, 3, 0, 3 at cp=2
    groups = [
        Group(f"ex{i}", {"short_chosen": EncodedSequence(tuple(range(3, 3 + n)), n - 2)})
        for i, n in enumerate(lengths)
    ]
    mb = pack_microbatch(groups, ("short_chosen",), pad_multiple=multiple, pad_id=0, row_length=64)
    for rank in range(cp):
        params = packed_seq_params(shard_microbatch(mb, cp, rank))
        padded = params.cu_seqlens_q_padded
        assert torch.equal(params.cu_seqlens_q, padded) and torch.equal(params.cu_seqlens_kv, padded)
        assert torch.equal(params.cu_seqlens_kv_padded, padded) and torch.equal(padded, mb.cu_seqlens_padded)
        assert padded.dtype == torch.int32 and int(padded[0]) == 0 and int(padded[-1]) == 64  # global row
        slots = torch.diff(padded)
        assert (slots % (2 * cp) == 0).all() and params.max_seqlen_q == params.max_seqlen_kv == int(
            slots.max()
        )
        # Each sequence's real tokens start at its slot and end inside it (the tail slot holds none).
        real_ends = mb.cu_seqlens[1:]
        assert (real_ends <= padded[1:]).all() and (real_ends >= padded[:-1]).all()
        for s, n in enumerate(lengths):
            assert int(padded[s]) + n == int(real_ends[s]) and mb.tokens[
                padded[s] : padded[s] + n
            ].tolist() == list(range(3, 3 + n))
