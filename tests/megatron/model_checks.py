"""Workers for the packed-attention tests (spawned: Megatron's parallel state is per process)."""

from __future__ import annotations

import torch
from distributed import grid_groups, megatron_on_cpu

from solopo_megatron.data.packing import Group, pack_microbatch
from solopo_megatron.data.tokenize import EncodedSequence
from solopo_megatron.megatron.lm_head import output_weight
from solopo_megatron.megatron.model import build_gpt_model, transformer_config
from solopo_megatron.megatron.parallel import init_parallel_state
from solopo_megatron.megatron.step import StepContext, microbatch_sequence_logps, packed_seq_params
from solopo_megatron.objectives import SoLoPOConfig
from solopo_megatron.recipe.schema import ModelSection

ROLES = ("short_chosen", "short_rejected")


def row_params(cu: torch.Tensor, branch_ids: torch.Tensor | None = None):
    """The packed-sequence parameters of a row with slot bounds ``cu`` as the training step passes
    them (the bounds as both real and padded offsets), with the row's ``branch_ids`` if it shares prompts."""
    from solopo_megatron.megatron.shared_prompt import SharedPromptSeqParams

    longest = int(torch.diff(cu).max())
    return SharedPromptSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        branch_ids=branch_ids,
    )


def thd_params(lengths: list[int], device: str = "cpu"):
    """Megatron's PackedSeqParams (THD) for one row of sequences of ``lengths``, no padding."""
    return row_params(
        torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    )


def assert_block_mask_is_create_block_masks(got, dense: torch.Tensor, block_size: int) -> None:
    """``got`` (a BlockMask) has create_block_mask's block structure over the dense mask ``dense`` and
    its mask function is ``dense`` elementwise."""
    from torch.nn.attention.flex_attention import create_block_mask

    want = create_block_mask(
        lambda b, h, q, k: dense[q, k], None, None, *dense.shape, device="cpu", BLOCK_SIZE=block_size
    )
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)
    assert torch.equal(got.to_dense(), want.to_dense())
    rows = torch.arange(dense.shape[0])[:, None]
    keys = torch.arange(dense.shape[1])[None, :]
    assert torch.equal(got.mask_mod(0, 0, rows, keys), dense)


def core_attention(backend: str, heads: int = 4, groups: int = 2, head_dim: int = 32):
    """A PackedCoreAttention on its own (no parallel state needed at CP = 1)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from solopo_megatron.megatron.attention import PackedCoreAttention

    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return PackedCoreAttention(config, layer_number=1, attn_mask_type=None, backend=backend)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """THD [t, heads, d] of a whole row -> [t, heads * d] in float64 with the dense oracle mask (and its
    branch rule with ``branch_ids``), GQA expanded."""
    from solopo_megatron.megatron.attention import packed_attention_mask

    repeat = q.shape[1] // k.shape[1]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))
    k, v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    branches = None if branch_ids is None else branch_ids.cpu()
    mask = packed_attention_mask(cu.cpu(), 1, 0, branches).to(q.device)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def packed_row(lengths: list[int], vocab: int, seed: int = 0):
    """(input ids [1, t], position ids [1, t], PackedSeqParams) of one packed THD row of random tokens."""
    params = thd_params(lengths)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (1, int(params.cu_seqlens_q[-1])), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return tokens, positions, params


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


def attention_backend_matches_oracle(rank: int, world_size: int, backend: str) -> None:
    """CP = world_size: this rank's zigzag share of a packed row (several sequences, uneven lengths, padded
    slots and a tail slot) through ``PackedCoreAttention(backend)`` equals the dense-mask SDPA of the whole
    row at this rank's rows, and so do the gradients of q, k and v where the backend trains on this device
    (flex: forward only on CPU; with CUDA and CP = 1 it runs, compiled, on the GPU with its backward)."""
    import types

    import torch.nn.functional as F
    from megatron.core.packed_seq_params import PackedSeqParams

    from solopo_megatron.data.cp_sharding import zigzag_indices
    from solopo_megatron.megatron.attention import PackedCoreAttention, packed_attention_mask

    _, cp_group, _, _ = grid_groups(1, world_size)
    dtype = torch.float64 if backend == "sdpa" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    device = "cuda" if backend == "flex" and world_size == 1 and torch.cuda.is_available() else "cpu"
    with_grad = backend == "sdpa" or device == "cuda"
    cu = torch.tensor([0, 8, 20, 44, 48, 64])  # the last slot: a row's tail padding, its own slot
    real = torch.tensor([0, 5, 19, 40, 48, 48])
    t, heads, groups, d = 64, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(t, n, d, generator=g, dtype=torch.float64).to(dtype) for n in (heads, groups, groups)
    )
    weights = torch.randn(t, heads * d, generator=g, dtype=torch.float64).to(dtype)
    mine = zigzag_indices(cu, world_size, rank)
    local = [x[mine].clone().requires_grad_(with_grad) for x in (q, k, v)]
    config = types.SimpleNamespace(context_parallel_size=world_size, attention_dropout=0.0)
    groups_ = types.SimpleNamespace(cp=cp_group)
    attention = PackedCoreAttention(
        config, layer_number=1, attn_mask_type=None, pg_collection=groups_, backend=backend
    )
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=real,
        cu_seqlens_kv=real,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=24,
        max_seqlen_kv=24,
    )
    out = attention(*local, None, packed_seq_params=params)
    full = [x.clone().requires_grad_(with_grad) for x in (q, k, v)]
    expand = lambda x: x.repeat_interleave(heads // groups, dim=1).transpose(0, 1)[None]  # noqa: E731
    mask = packed_attention_mask(cu, 1, 0).to(device)
    oracle = F.scaled_dot_product_attention(
        full[0].transpose(0, 1)[None], expand(full[1]), expand(full[2]), attn_mask=mask
    )
    oracle = oracle[0].transpose(0, 1).reshape(t, -1)
    torch.testing.assert_close(out, oracle[mine], rtol=tol, atol=tol)
    if with_grad:
        (out * weights[mine]).sum().backward()
        (oracle * weights).sum().backward()
        for got, want in zip(local, full):
            torch.testing.assert_close(got.grad, want.grad[mine], rtol=tol, atol=tol)
