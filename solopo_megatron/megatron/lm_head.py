"""The response-only LM head: log-probs from the hidden states of the scored positions only.

``model.logits: response_only`` (docs/long-contexts.md, "what makes long sequences cheap").
megatron-core's GPTModel is used unchanged except for its output layer's forward: ``defer_output_layer``
turns the ColumnParallelLinear into a ``DeferredOutputLayer`` (same class family, same weight, same
checkpoint keys) whose forward does only the column-parallel input half (sequence-parallel
all-gather, or the TP copy whose backward all-reduces dX) and returns the hidden states. The model's
output is then [1, t, H], not [1, t, V/tp].

``scored_sequence_logps`` picks the positions whose label is scored (the loss mask, after CP
sharding) and runs the fused, chunked ``linear_token_logprobs`` on them with the output weight (the
embedding's, when tied: the gradient reaches it through the same tensor, and Megatron's embedding
group syncs it under PP). Nothing of size [t, V/tp] exists at any time.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import unwrap_model
from torch import Tensor

from ..data.packing import Microbatch
from ..logprobs import linear_token_logprobs, sequence_logprobs
from .parallel import ParallelState

__all__ = ["DeferredOutputLayer", "defer_output_layer", "output_weight", "scored_sequence_logps"]


class DeferredOutputLayer(ColumnParallelLinear):
    """The output layer with its matmul deferred to the loss: forward returns the hidden states
    [s, b, H], prepared as a column-parallel layer prepares its input."""

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output=None):
        if self.sequence_parallel:
            # Backward reduce-scatters: the sum of every TP rank's partial dX, as the layer would.
            input_ = gather_from_sequence_parallel_region(
                input_, tensor_parallel_output_grad=True, group=self.tp_group
            )
        elif self.tp_group is not None and self.tp_group.size() > 1:
            input_ = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return input_, None


def defer_output_layer(model) -> None:
    """Switches ``model.output_layer`` (a GPTModel on the last pipeline stage) to ``DeferredOutputLayer``.

    The instance keeps its parameters, buffers and sharded-state-dict behaviour; only its forward
    changes, so checkpoints of both ``model.logits`` settings are interchangeable.
    """
    layer = model.output_layer
    if type(layer) is not ColumnParallelLinear:
        raise TypeError(
            f"expected megatron-core's ColumnParallelLinear as the output layer, got {type(layer)}"
        )
    layer.__class__ = DeferredOutputLayer


def output_weight(model) -> Tensor:
    """The LM head's weight [V/tp, H] of ``model`` (DDP-wrapped or not): the embedding's when tied."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def scored_sequence_logps(
    mb: Microbatch, hidden: Tensor, weight: Tensor, parallel: ParallelState, *, vocab_size: int | None = None
) -> Tensor:
    """Per-sequence response log-prob sums [S] (complete over TP and CP) from this rank's hidden states.

    ``hidden`` [1, t, H] (the deferred output layer's output), ``weight`` this rank's vocab shard,
    ``vocab_size`` the true vocabulary (rows past it are Megatron's padding, outside the softmax).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.shape[0] != mb.labels.numel():
        raise ValueError(
            f"hidden states cover {hidden.shape[0]} tokens but the microbatch has {mb.labels.numel()}"
        )
    scored = mb.loss_mask.nonzero().squeeze(1)
    token_logps = linear_token_logprobs(
        hidden[scored].to(weight.dtype),
        weight,
        mb.labels[scored],
        vocab_start_index=parallel.tp_rank * weight.shape[0],
        tp_group=parallel.tp_group,
        vocab_size=vocab_size,
    )
    keep = torch.ones_like(scored, dtype=torch.bool)
    return sequence_logprobs(
        token_logps, keep, mb.segment_ids[scored], mb.num_sequences, cp_group=parallel.cp_group
    )
