"""Closed-form sizes of a GPT model: parameters, training FLOPs and per-GPU memory.

Pure arithmetic on a ModelSection; the trainer uses the FLOPs for TFLOP/s and MFU, the dry-run
planner everything. Conventions:

- FLOPs are *model* FLOPs (2 per multiply-add; backward = 2x forward; recomputation not counted, as
  in MFU), for causal attention over each packed sequence separately (its s^2 / 2 score entries).
- Memory is bf16 weights, fp32 gradient buffers (Megatron DDP ``grad_reduce_in_fp32``), Adam's fp32
  master weights and two moments (sharded over DP x CP by the distributed optimizer), and activations
  under Megatron's 1F1B schedule, where the first stage keeps up to ``pp`` microbatches in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import ModelSection

GIB = 1024**3


def padded_vocab_size(vocab_size: int, model: ModelSection) -> int:
    """Megatron's rule: pad to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size."""
    multiple = model.make_vocab_size_divisible_by * model.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


# Dense bf16 tensor-core peaks (TFLOP/s per GPU) for MFU; logger.peak_tflops_per_gpu overrides.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
    "GB200": 2500.0,
}


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name()``), or None."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name.upper():
            return PEAK_BF16_TFLOPS[key]
    return None


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a GPT model by part."""

    embedding: int  # vocab x hidden (first stage; tied: also the output layer)
    per_layer: int  # one transformer layer: attention, MLP, norms
    per_layer_matmul: int  # of which the weights of its linear layers
    final_norm: int
    output_layer: int  # 0 when tied to the embedding
    num_layers: int

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.num_layers + self.final_norm + self.output_layer

    @property
    def matmul_per_token(self) -> int:
        """Multiply-adds per token in the linear layers, the output projection included."""
        return self.per_layer_matmul * self.num_layers + self.embedding  # the logits: hidden x vocab


def head_dim(m: ModelSection) -> int:
    """Attention head size: kv_channels, else hidden_size / heads."""
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def parameter_counts(m: ModelSection, padded_vocab: int) -> ParameterCounts:
    """Parameters of the whole model (all stages) with ``padded_vocab`` embedding rows."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, head_dim(m)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    qkv = h * (heads + 2 * groups) * d
    attention = qkv + heads * d * h + (heads + 2 * groups) * d * m.add_qkv_bias
    mlp = h * 2 * f + f * h  # gated: [gate; up], then down
    norms = 2 * h
    embedding = padded_vocab * h
    return ParameterCounts(
        embedding=embedding,
        per_layer=attention + mlp + norms,
        per_layer_matmul=qkv + heads * d * h + mlp,
        final_norm=h,
        output_layer=0 if m.share_embeddings_and_output_weights else embedding,
        num_layers=m.num_layers,
    )


def sequence_training_flops(m: ModelSection, padded_vocab: int, length: int) -> float:
    """Forward + backward model FLOPs of one sequence of ``length`` tokens (causal attention)."""
    return training_flops(m, padded_vocab, [length])


def training_flops(m: ModelSection, padded_vocab: int, lengths) -> float:
    """Model FLOPs of a step over sequences of ``lengths`` tokens: linear layers scale with the tokens,
    causal attention (3 x (QK^T + AV) / 2) with each sequence's length squared."""
    lengths = [int(s) for s in lengths]
    linear = 6.0 * parameter_counts(m, padded_vocab).matmul_per_token * sum(lengths)
    attention = 6.0 * m.num_layers * m.num_attention_heads * head_dim(m) * sum(s * s for s in lengths)
    return linear + attention


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest GPU (the first pipeline stage for activations, the last for logits)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def as_gib(self) -> dict[str, float]:
        parts = {k: getattr(self, k) for k in ("weights", "gradients", "optimizer", "activations", "logits")}
        return {**{k: v / GIB for k, v in parts.items()}, "total": self.total / GIB}


def stage_parameters(m: ModelSection, padded_vocab: int) -> float:
    """Parameters on the largest pipeline stage's tensor-parallel rank (embedding or output layer included)."""
    counts = parameter_counts(m, padded_vocab)
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    layers = counts.per_layer * (m.num_layers // pp)
    first = counts.embedding
    last = (counts.output_layer or counts.embedding) + counts.final_norm  # tied: the last stage keeps a copy
    ends = counts.embedding + counts.output_layer + counts.final_norm if pp == 1 else max(first, last)
    return (layers + ends) / tp


def activation_bytes_per_token_per_layer(m: ModelSection) -> float:
    """bf16 tensors one layer keeps for its backward, per token, on one TP rank.

    Norm inputs and the inputs of the QKV and FC1 projections are full hidden vectors (split over TP
    only with sequence parallelism); Q/K/V, the attention output and the MLP's gated intermediate
    are TP-split. Flash attention keeps no s x s scores.
    """
    h, f, d = m.hidden_size, m.ffn_hidden_size, head_dim(m)
    groups = m.num_query_groups or m.num_attention_heads
    tp = m.tensor_model_parallel_size
    replicated = 4 * h  # input norm, QKV input, post-attention norm, FC1 input
    split = (
        (m.num_attention_heads * d + 2 * groups * d) + m.num_attention_heads * d + 2 * f + f
    )  # qkv, attn out, fc1 out, fc2 in
    per_token = (replicated / (tp if m.sequence_parallel else 1)) + split / tp
    if m.recompute_granularity == "full":
        per_token = h / (tp if m.sequence_parallel else 1)  # only each layer's input is kept
    return 2.0 * per_token


HEAD_CHUNK_ELEMENTS = 1 << 24  # solopo_kernels.common.CHUNK_ELEMENTS (the recipe layer imports no kernels)


def estimate_memory(
    m: ModelSection,
    padded_vocab: int,
    *,
    tokens_per_microbatch: int,
    microbatches: int,
    dp: int,
    distributed_optimizer: bool,
    inplace_logits_backward: bool = True,
) -> MemoryEstimate:
    """Per-GPU bytes for one training step; ``tokens_per_microbatch`` is before CP sharding."""
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    params = stage_parameters(m, padded_vocab)
    optimizer = 12.0 * params / (dp * cp if distributed_optimizer else 1)  # fp32 master + Adam m, v
    tokens_per_rank = tokens_per_microbatch / cp
    layers_per_stage = m.num_layers // pp
    in_flight = min(pp, microbatches)
    activations = activation_bytes_per_token_per_layer(m) * tokens_per_rank * layers_per_stage * in_flight
    if m.recompute_granularity == "full":  # one layer's full activations while it is recomputed
        activations += activation_bytes_per_token_per_layer(_no_recompute(m)) * tokens_per_rank
    vocab_per_rank = padded_vocab / tp
    if m.logits == "response_only":
        # One [chunk, V/tp] block of the fused head (bf16 logits + its fp32 working copy), plus the fp32
        # dW accumulator of backward; the chunk is bounded by solopo_kernels.common.CHUNK_ELEMENTS.
        chunk = min(tokens_per_rank, max(1.0, float(HEAD_CHUNK_ELEMENTS // int(vocab_per_rank))))
        logits = 6.0 * chunk * vocab_per_rank + 4.0 * vocab_per_rank * m.hidden_size
    else:
        logits = 2.0 * tokens_per_rank * vocab_per_rank * (1 if inplace_logits_backward else 2)
    return MemoryEstimate(
        weights=2.0 * params,
        gradients=4.0 * params,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
    )


def _no_recompute(m: ModelSection) -> ModelSection:
    from dataclasses import replace

    return replace(m, recompute_granularity=None)
