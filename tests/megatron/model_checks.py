"""Workers for the packed-attention tests (spawned: Megatron's parallel state is per process)."""

from __future__ import annotations

import torch
from distributed import megatron_on_cpu

from solopo_megatron.data.packing import Group, pack_microbatch
from solopo_megatron.data.tokenize import EncodedSequence
from solopo_megatron.megatron.lm_head import output_weight
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
            output = model(
                input_ids=mb.tokens[None],
                position_ids=mb.position_ids[None],
                attention_mask=None,
                packed_seq_params=packed_seq_params(mb),
            )
            return microbatch_sequence_logps(ctx, mb, output, output_weight(model))

    groups = _groups(seed=5)
    packed = sums(groups)
    alone = torch.cat([sums([group]) for group in groups])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Different neighbours change nothing either; different tokens in a sequence do change its sum.
    shuffled = sums(groups[::-1]).view(3, 2).flip(0).flatten()
    torch.testing.assert_close(shuffled, packed, rtol=1e-5, atol=1e-5)
    other = _groups(seed=6)
    assert not torch.allclose(sums(other[:1]), alone[:2])


@megatron_on_cpu
def deferred_head_matches_output_layer(rank: int, world_size: int, sequence_parallel: bool) -> None:
    """TP=2 (optionally with sequence parallelism): the deferred output layer + scored log-probs give the
    real ColumnParallelLinear's per-sequence sums and the same gradients for its input and weight."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from solopo_megatron.megatron.lm_head import defer_output_layer, scored_sequence_logps

    model_cfg = ModelSection(
        num_layers=1,
        hidden_size=16,
        ffn_hidden_size=32,
        num_attention_heads=2,
        tensor_model_parallel_size=world_size,
        sequence_parallel=sequence_parallel,
    )
    parallel = init_parallel_state(model_cfg, seed=11)
    config = transformer_config(model_cfg, bf16=False, max_tokens=256)
    mb = pack_microbatch(_groups(seed=9), ROLES, pad_multiple=2 * world_size, pad_id=0)
    tokens = mb.tokens.numel()

    class Holder(torch.nn.Module):  # what lm_head expects: a GPT-like module with an output_layer
        share_embeddings_and_output_weights = False

        def __init__(self):
            super().__init__()
            self.output_layer = ColumnParallelLinear(
                16,
                64,
                config=config,
                init_method=torch.nn.init.normal_,
                bias=False,
                gather_output=False,
                tp_group=parallel.groups.tp,
            )

    g = torch.Generator().manual_seed(4)
    full_hidden = torch.randn(tokens, 1, 16, generator=g, dtype=torch.float64).float()
    rows = tokens // world_size
    local = full_hidden[rank * rows : (rank + 1) * rows] if sequence_parallel else full_hidden

    def run(deferred: bool):
        torch.manual_seed(5)
        holder = Holder()
        x = local.clone().requires_grad_()
        if deferred:
            defer_output_layer(holder)
            hidden, _ = holder.output_layer(x)
            sums = scored_sequence_logps(mb, hidden.transpose(0, 1), holder.output_layer.weight, parallel)
        else:
            ctx = StepContext(SoLoPOConfig(mode="short_po"), parallel, inplace_logits_backward=False)
            logits, _ = holder.output_layer(x)
            sums = microbatch_sequence_logps(ctx, mb, logits.transpose(0, 1), None)
        (sums * torch.arange(1, sums.numel() + 1)).sum().backward()
        return sums.detach(), x.grad, holder.output_layer.weight.grad

    want, got = run(deferred=False), run(deferred=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert want[0].abs().min() > 0 and want[1].abs().max() > 0
