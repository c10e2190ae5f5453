"""Workers for the packed-attention tests (spawned: Megatron's parallel state is per process)."""

from __future__ import annotations

import torch
from distributed import megatron_on_cpu

from solopo_megatron.data.packing import Group, pack_microbatch
from solopo_megatron.data.tokenize import EncodedSequence
from solopo_megatron.megatron.model import build_gpt_model, transformer_config
from solopo_megatron.megatron.parallel import init_parallel_state
from solopo_megatron.megatron.step import StepContext, microbatch_sequence_logps, packed_seq_params
from solopo_megatron.objectives import SoLoPOConfig
from solopo_megatron.recipe.schema import ModelSection

ROLES = ("short_chosen", "short_rejected")


def _groups(seed: int) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(3):
        sequences = {}
        for role in ROLES:
            length = int(torch.randint(6, 30, (), generator=g))
            ids = torch.randint(3, 200, (length,), generator=g).tolist()
            sequences[role] = EncodedSequence(tuple(ids), response_start=length // 2)
        groups.append(Group(f"ex-{i}", sequences))
    return groups


@megatron_on_cpu
def packed_equals_alone(rank: int, world_size: int) -> None:
    """A sequence's log-prob sum is the same alone in its row or packed with others (no leakage)."""
    model_cfg = ModelSection(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2
    )
    parallel = init_parallel_state(model_cfg, seed=3)
    config = transformer_config(model_cfg, bf16=False, max_tokens=512)
    model = build_gpt_model(
        model_cfg, config, vocab_size=256, max_tokens=512, impl="local", parallel=parallel
    ).eval()
    ctx = StepContext(SoLoPOConfig(mode="short_po"), parallel, inplace_logits_backward=False)

    def sums(groups):
        mb = pack_microbatch(groups, ROLES, pad_multiple=2, pad_id=0, row_length=256)
        with torch.no_grad():
            logits = model(
                input_ids=mb.tokens[None],
                position_ids=mb.position_ids[None],
                attention_mask=None,
                packed_seq_params=packed_seq_params(mb),
            )
            return microbatch_sequence_logps(ctx, mb, logits)

    groups = _groups(seed=5)
    packed = sums(groups)
    alone = torch.cat([sums([group]) for group in groups])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Different neighbours change nothing either; different tokens in a sequence do change its sum.
    shuffled = sums(groups[::-1]).view(3, 2).flip(0).flatten()
    torch.testing.assert_close(shuffled, packed, rtol=1e-5, atol=1e-5)
    other = _groups(seed=6)
    assert not torch.allclose(sums(other[:1]), alone[:2])
