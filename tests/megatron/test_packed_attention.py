"""Packed (THD) attention: the mask, and a GPT forward that gives each sequence the same log-probs alone or packed."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from model_checks import attention_backend_matches_oracle, packed_equals_alone

from solopo_megatron.data.cp_sharding import zigzag_indices


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


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("cp", [1, 2], ids=["cp1", "cp2"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_backends_equal_the_dense_oracle(backend, cp):
    """Outputs (and, where the backend trains here, gradients) on packed rows with padding, CP 1 and 2.
    flex: forward only on CPU (torch's flex_attention backward needs CUDA); the GPU tests run its backward."""
    if backend == "flex" and not _flex_available():
        pytest.skip("this torch has no flex_attention")
    run_distributed(attention_backend_matches_oracle, cp, backend)
