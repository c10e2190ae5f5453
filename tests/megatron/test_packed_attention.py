"""Packed (THD) attention: the mask, and a GPT forward that gives each sequence the same log-probs alone or packed."""

from __future__ import annotations

import sys

import pytest
import torch
from distributed import megatron_on_cpu, run_distributed
from model_checks import (
    assert_block_mask_is_create_block_masks,
    attention_backend_matches_oracle,
    core_attention,
    dense_attention,
    packed_equals_alone,
    packed_row,
    thd_params,
)

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

    from solopo_megatron.megatron import attention

    monkeypatch.setattr(attention, "_MASK_TILE_ELEMENTS", 16 * 16 * 3)  # several tiles per row
    cu = torch.tensor([0, 8, 20, 44, 48, 64, 100])
    for cp in (1, 2):
        for rank in range(cp):
            got = attention.document_causal_block_mask(cu, cp, rank, torch.device("cpu"), block_size)
            dense = attention.packed_attention_mask(cu, cp, rank)
            assert_block_mask_is_create_block_masks(got, dense, block_size)


# Rows of many lengths: 2 query blocks first (the size of the 2 KV groups: duck-shaped before), one
# of a single block (0/1-specialised before), rows that are not block multiples.
FLEX_ROWS = ([136, 120], [200, 8, 176], [264], [72, 312, 40], [1000, 24], [64, 40], [520, 520, 8], [130])


def _compiled_flex_over_rows(monkeypatch, device: str, compile_backend: str, train: bool, tol: float):
    """``FLEX_ROWS`` through PackedCoreAttention's compiled flex path (a fresh block mask and closure per
    row), alternating no_grad (reference pass, full recomputation's first forward) and grad mode (its
    recomputation); each output and, with ``train``, the q/k/v gradients against the float64 dense
    oracle. Returns the count of compiled graphs after each row."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from solopo_megatron.megatron import attention

    counter = CompileCounterWithBackend(compile_backend)
    monkeypatch.setattr(attention, "_COMPILED", {})
    monkeypatch.setattr(attention, "_COMPILE_BACKEND", counter)
    monkeypatch.setattr(attention, "_compiles_flex", lambda device: True)
    core = core_attention("flex")
    gen = torch.Generator().manual_seed(0)
    graphs = []
    torch._dynamo.reset()
    try:
        for i, lengths in enumerate(FLEX_ROWS):
            grad = i % 2 == 1
            params = thd_params(lengths, device)
            t = sum(lengths)
            q = torch.randn(t, 4, 32, generator=gen).to(device).requires_grad_(grad and train)
            kv = torch.randn(t, 2, 64, generator=gen).to(device).requires_grad_(grad and train)
            k, v = kv.split(32, dim=-1)  # views, as Megatron's QKV split makes them
            with torch.set_grad_enabled(grad):
                out = core(q, k, v, None, packed_seq_params=params)
            q64, kv64 = (x.detach().double().requires_grad_(grad and train) for x in (q, kv))
            want = dense_attention(q64, *kv64.split(32, dim=-1), params.cu_seqlens_q_padded)
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
            if grad and train:
                weights = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(device)
                (out.double() * weights).sum().backward()
                (want * weights).sum().backward()
                torch.testing.assert_close(q.grad.double(), q64.grad, rtol=tol, atol=tol)
                torch.testing.assert_close(kv.grad.double(), kv64.grad, rtol=tol, atol=tol)
            graphs.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    return graphs


def test_compiled_flex_attention_traces_at_most_two_graphs(monkeypatch):
    """The production flex call over many row lengths and both grad modes: one graph per grad mode,
    none per row length (before: 4 graphs over these rows), so dynamo's recompile limit (8) never sends
    flex attention back to eager. Rows of one query block run eager (a 0/1-specialised graph otherwise).
    Dynamo's guards are what is counted, so the graph runs on the eager backend (inductor's CPU flex
    template fails to build some of these shapes; the GPU test runs the Triton one), forward only
    (flex_attention's backward needs CUDA)."""
    if not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    graphs = _compiled_flex_over_rows(monkeypatch, "cpu", "eager", train=False, tol=2e-5)
    assert graphs[-1] <= 2 and graphs[1] == graphs[-1], graphs  # none after the first of each grad mode


@pytest.mark.gpu
def test_compiled_flex_attention_on_cuda_traces_at_most_two_graphs(monkeypatch):
    """The same on CUDA with inductor (whose own shape guards join dynamo's), with the backward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    graphs = _compiled_flex_over_rows(monkeypatch, "cuda", "inductor", train=True, tol=1e-3)
    assert graphs[-1] <= 2 and graphs[1] == graphs[-1], graphs


@megatron_on_cpu
def row_derived_once_per_microbatch(rank: int, world_size: int, backend: str, out: str) -> None:
    """A 3-layer GPT forward (sdpa: forward and backward under full recomputation) of two microbatches:
    how often the row's spans (sdpa) or block mask (flex) were built, and the outputs."""

    from solopo_megatron.megatron import attention
    from solopo_megatron.megatron.model import build_gpt_model, transformer_config
    from solopo_megatron.megatron.parallel import init_parallel_state
    from solopo_megatron.recipe.schema import ModelSection

    name = {"sdpa": "sequence_spans", "flex": "document_causal_block_mask"}[backend]
    built = []
    original = getattr(attention, name)
    setattr(attention, name, lambda *args, **kwargs: built.append(1) or original(*args, **kwargs))
    cfg = ModelSection(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    parallel = init_parallel_state(cfg, seed=3)
    model = build_gpt_model(
        cfg, transformer_config(cfg, bf16=False, max_tokens=256), 256, 256, "local", parallel, backend
    )
    counts, outputs = [], []
    for lengths in ([10, 24, 30], [40, 8]):
        tokens, positions, params = packed_row(lengths, 256, seed=len(lengths))
        with torch.set_grad_enabled(backend == "sdpa"):  # flex_attention's backward needs CUDA
            logits = model(
                input_ids=tokens, position_ids=positions, attention_mask=None, packed_seq_params=params
            )
            if backend == "sdpa":
                logits.float().square().mean().backward()
        counts.append(len(built))
        outputs.append(logits.detach())
    torch.save({"counts": counts, "outputs": outputs}, out)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_row_spans_and_block_mask_are_built_once_per_microbatch(backend, tmp_path):
    """Every layer of a forward (and of its recomputation in the backward) shares one build of what is
    derived from the row: one device-to-host copy of its bounds per microbatch, not one per layer."""
    if backend == "flex" and not flex_attention_available():
        pytest.skip("this torch has no flex_attention")
    out = str(tmp_path / "counts.pt")
    run_distributed(row_derived_once_per_microbatch, 1, backend, out)
    result = torch.load(out)
    assert result["counts"] == [1, 2], result["counts"]
    assert all(bool(torch.isfinite(x).all()) for x in result["outputs"])


def test_flash_attn_import_is_tried_once(monkeypatch):
    """The flash-attn lookup is cached per process (the import is not retried on every layer's call)."""
    import types

    from solopo_megatron.megatron import attention

    looked_up = []

    def lookup(name: str):  # the module's attribute hook: counts the lookups of the varlen function
        if name != "flash_attn_varlen_func":
            raise AttributeError(name)
        looked_up.append(name)
        return lambda *args, **kwargs: None

    fake = types.ModuleType("flash_attn")
    fake.__getattr__ = lookup
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    attention._flash_varlen.cache_clear()
    try:
        found = [attention._flash_varlen() for _ in range(3)]
    finally:
        attention._flash_varlen.cache_clear()
    assert looked_up == ["flash_attn_varlen_func"] and found[0] is found[1] is found[2] is not None


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
