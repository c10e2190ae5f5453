"""The SoLoPO forward step and loss closure for Megatron's pipeline schedules.

Loss contract (``calculate_per_token_loss=True``, stable across megatron-core 0.16-0.19): the closure
returns (sum of per-example losses in this microbatch, valid examples if cp_rank == 0 else 0, report).
Megatron sums gradients over DP x CP and divides by the global example count: the gradient of the
batch mean for any TP/PP/CP/DP layout. The report holds [sum, count] pairs per metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..data.packing import Microbatch
from ..logprobs import sequence_logprobs, token_logprobs
from ..objectives import SoLoPOConfig, solopo_loss
from .lm_head import output_weight, scored_sequence_logps
from .parallel import ParallelState


@dataclass(frozen=True)
class StepContext:
    """What the forward step and the loss closure need besides the microbatch."""

    loss: SoLoPOConfig
    parallel: ParallelState
    inplace_logits_backward: bool = True  # model.logits=full only
    forward_only_logps: bool = False  # reference pass: report per-sequence sums, no loss
    response_only: bool = True  # model.logits=response_only: the model returns hidden states (lm_head)
    # The true vocabulary: the LM head's rows from it up to Megatron's padded size stay out of the softmax.
    # None: every row is vocabulary (a model whose size needs no padding, or a test's).
    vocab_size: int | None = None


def packed_seq_params(mb: Microbatch):
    """Megatron's PackedSeqParams (THD) of a microbatch, with the padded slot offsets as both
    ``cu_seqlens_*`` and ``cu_seqlens_*_padded`` (global, before CP sharding).

    Transformer Engine reads the sequence lengths from ``cu_seqlens`` (cumulative REAL lengths) and the
    offsets from ``cu_seqlens_padded``; passing one padded tensor as both makes every slot a sequence of
    its padded length. That is exactly what the local attention computes: the padding sits after a
    sequence's real tokens, so causal masking keeps every real token from seeing it, and its own
    outputs are never scored. It also keeps TE's FlashAttention backend eligible (it takes no separate
    padded offsets), and an empty tail or dummy slot stays well formed. The cost: attention over at
    most ``pad_multiple - 1`` padding tokens per sequence.

    A row with shared prompts also carries its branch ids and tree positions (``SharedPromptSeqParams``:
    None for the other rows, which then take exactly the plain path).
    """
    from .shared_prompt import SharedPromptSeqParams

    padded = mb.cu_seqlens_padded
    max_len = int((padded[1:] - padded[:-1]).max())
    shared = mb.shared
    return SharedPromptSeqParams(
        branch_ids=shared.branch_ids if shared is not None else None,
        position_ids=shared.position_ids if shared is not None else None,
        qkv_format="thd",
        cu_seqlens_q=padded,
        cu_seqlens_kv=padded,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def forward_step(ctx: StepContext, data_iterator, model):
    """Megatron forward_step_func: this rank's (CP-sharded) microbatch through this pipeline stage."""
    mb: Microbatch = next(data_iterator)
    output = model(
        input_ids=mb.tokens[None],
        position_ids=mb.position_ids[None],
        attention_mask=None,  # THD: sequences are delimited by packed_seq_params
        packed_seq_params=packed_seq_params(mb),
    )
    weight = output_weight(model) if ctx.response_only and ctx.parallel.is_last_stage else None
    return output, partial(loss_func, ctx, mb, weight)


def microbatch_sequence_logps(
    ctx: StepContext, mb: Microbatch, output: Tensor, weight: Tensor | None
) -> Tensor:
    """Per-sequence response log-prob sums [S] (complete over TP and CP) from the last stage's output:
    hidden states and the LM head's weight (response-only), or vocab-parallel logits (weight None)."""
    if weight is not None:
        return scored_sequence_logps(mb, output, weight, ctx.parallel, vocab_size=ctx.vocab_size)
    logits = output.reshape(-1, output.shape[-1])  # [t, 1, V_local] -> [t, V_local]
    if logits.shape[0] != mb.labels.numel():
        raise ValueError(f"logits cover {logits.shape[0]} tokens but the microbatch has {mb.labels.numel()}")
    token_logps = token_logprobs(
        logits,
        mb.labels,
        vocab_start_index=ctx.parallel.tp_rank * logits.shape[1],
        tp_group=ctx.parallel.tp_group,
        inplace_backward=ctx.inplace_logits_backward and not ctx.forward_only_logps,
        vocab_size=ctx.vocab_size,
    )
    return sequence_logprobs(
        token_logps, mb.loss_mask, mb.segment_ids, mb.num_sequences, cp_group=ctx.parallel.cp_group
    )


def loss_func(ctx: StepContext, mb: Microbatch, weight: Tensor | None, output_tensor: Tensor):
    """The loss closure: (loss sum, valid examples on CP rank 0 else 0, report), or per-sequence sums in forward-only mode."""
    sums = microbatch_sequence_logps(ctx, mb, output_tensor, weight)
    valid = mb.valid
    count = (
        valid.sum().to(torch.int)
        if ctx.parallel.cp_rank == 0
        else torch.zeros((), dtype=torch.int, device=valid.device)
    )
    if ctx.forward_only_logps:
        report = {"sequence_logps": sums.detach().view(mb.num_groups, len(mb.roles))}
        return sums.sum() * 0.0, count, report
    logps = mb.per_role(sums)
    num_tokens = {role: mb.num_response_tokens[:, i] for i, role in enumerate(mb.roles)}
    ref = {role: mb.ref_logps[:, i] for i, role in enumerate(mb.roles)} if ctx.loss.needs_reference else None
    loss, metrics = solopo_loss(logps, num_tokens, ctx.loss, ref)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    loss_sum = torch.where(valid, loss, zero).sum()
    weight = valid.to(loss.dtype)
    report = {
        name: torch.stack([torch.where(valid, value, zero).sum(), weight.sum()])
        for name, value in metrics.items()
    }
    return loss_sum, count, report


def run_schedule(
    ctx: StepContext,
    chunks: list,
    mbs: list[Microbatch],
    *,
    seq_length: int,
    forward_only: bool,
    step: Callable = forward_step,
) -> list[dict]:
    """One pass of Megatron's schedule (PP included) over ``mbs``; the reports (last pipeline stage only).
    ``step(ctx, data_iterator, model)``: the forward step (a benchmark's baseline may give its own)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=partial(step, ctx),
        data_iterator=iter(mbs),
        model=chunks,
        num_microbatches=len(mbs),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )
