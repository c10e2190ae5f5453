"""Workers for the shared-prompt tests (spawned: Megatron's parallel state is per process)."""

from __future__ import annotations

import os

import torch
from distributed import megatron_on_cpu

from solopo_megatron.data.packing import Group, pack_microbatch, pad_multiple_for, shard_microbatch
from solopo_megatron.data.tokenize import EncodedSequence

ROLES = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")


def preference_groups(seed: int, count: int = 3, vocab: int = 250) -> list[Group]:
    """Random groups as the tokenizer lays them out: the roles of one context share its prompt; uneven
    answers (one of a single token: the end of sequence only)."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab, (n,), generator=g).tolist())

    groups = []
    for i in range(count):
        prompts = {"short": tokens(int(torch.randint(5, 20, (), generator=g))), "long": tokens(60 + 7 * i)}
        answers = {
            "chosen": tokens(1 + 4 * i),
            "rejected": tokens(int(torch.randint(2, 12, (), generator=g))),
        }
        sequences = {}
        for role in ROLES:
            kind, answer = role.split("_")
            sequences[role] = EncodedSequence(prompts[kind] + answers[answer], len(prompts[kind]))
        groups.append(Group(f"ex-{i}", sequences))
    return groups


@megatron_on_cpu
def shared_equals_unshared(rank: int, world_size: int, tp: int, cp: int, logits: str, out: str) -> None:
    """Per-sequence sums and the gradients of a weighted sum of them, shared vs unshared, on one model
    under TP x CP = world size (fp32). Rank 0 saves both."""
    from solopo_megatron.megatron.lm_head import output_weight
    from solopo_megatron.megatron.model import build_gpt_model, transformer_config
    from solopo_megatron.megatron.parallel import init_parallel_state
    from solopo_megatron.megatron.step import StepContext, microbatch_sequence_logps, packed_seq_params
    from solopo_megatron.objectives import SoLoPOConfig
    from solopo_megatron.recipe.schema import ModelSection

    model_cfg = ModelSection(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        logits=logits,
    )
    parallel = init_parallel_state(model_cfg, seed=3)
    config = transformer_config(model_cfg, bf16=False, max_tokens=1024)
    model = build_gpt_model(
        model_cfg, config, vocab_size=250, max_tokens=1024, impl="local", parallel=parallel
    )
    ctx = StepContext(
        SoLoPOConfig(mode="solopo"),
        parallel,
        inplace_logits_backward=False,
        response_only=logits == "response_only",
        vocab_size=250,
    )
    groups = preference_groups(seed=5)
    weights = torch.randn(len(groups) * len(ROLES), generator=torch.Generator().manual_seed(1))
    results = {}
    for share in (False, True):
        mb = pack_microbatch(groups, ROLES, pad_multiple=pad_multiple_for(cp), pad_id=0, share_prompt=share)
        mb = shard_microbatch(mb, cp, parallel.cp_rank)
        model.zero_grad()
        output = model(
            input_ids=mb.tokens[None],
            position_ids=mb.position_ids[None],
            attention_mask=None,
            packed_seq_params=packed_seq_params(mb),
        )
        weight = output_weight(model) if ctx.response_only else None
        sums = microbatch_sequence_logps(ctx, mb, output, weight)
        (sums * weights).sum().backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results[share] = {"sums": sums.detach().clone(), "grads": grads, "tokens": mb.tokens.numel()}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
