"""Packed (THD) attention: the mask, and a GPT forward that gives each sequence the same log-probs alone or packed."""

from __future__ import annotations

import torch
from distributed import run_distributed
from model_checks import packed_equals_alone

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
