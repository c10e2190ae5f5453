"""Model provider: megatron-core GPTModel for the Llama / Qwen2 family (RoPE, GQA, SwiGLU, RMSNorm).

Transformer Engine's layer spec when TE is importable (its attention does THD packing and CP);
otherwise Megatron's local spec with ``PackedCoreAttention`` as the core attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..recipe.errors import RecipeError
from ..recipe.schema import ModelSection
from ..recipe.sizing import padded_vocab_size


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch API imports here."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a broken CUDA/TE install)
        return False
    return True


def resolve_transformer_impl(model: ModelSection) -> str:
    """``model.transformer_impl`` resolved: auto is TE on CUDA when importable, else local."""
    if model.transformer_impl == "auto":
        return (
            "transformer_engine" if torch.cuda.is_available() and transformer_engine_available() else "local"
        )
    if model.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise RecipeError("model.transformer_impl: transformer_engine is not importable here")
    return model.transformer_impl


def transformer_config(model: ModelSection, *, bf16: bool, max_tokens: int):
    """Megatron's TransformerConfig for the recipe's model section (fp32 or bf16)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=model.tensor_model_parallel_size,
        pipeline_model_parallel_size=model.pipeline_model_parallel_size,
        context_parallel_size=model.context_parallel_size,
        cp_comm_type=model.cp_comm_type,
        sequence_parallel=model.sequence_parallel,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=model.use_cpu_initialization
        if model.use_cpu_initialization is not None
        else not torch.cuda.is_available(),
        calculate_per_token_loss=True,
        variable_seq_lengths=False,
    )


def layer_spec(model: ModelSection, impl: str):
    """The layer spec: Transformer Engine's, or the local spec with ``PackedCoreAttention``."""
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if model.sequence_parallel:
        raise RecipeError(
            "model.sequence_parallel needs the Transformer Engine layer spec (its norms support it)"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .attention import PackedCoreAttention

    spec = get_gpt_layer_local_spec(normalization=model.normalization)
    spec.submodules.self_attention.submodules.core_attention = PackedCoreAttention
    return spec


def build_gpt_model(model: ModelSection, config, vocab_size: int, max_tokens: int, impl: str, parallel):
    """This pipeline stage's GPTModel (embedding on the first stage, output layer on the last), built
    with the process groups of ``parallel`` (a ``parallel.ParallelState``)."""
    from megatron.core.models.gpt import GPTModel

    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, impl),
        vocab_size=padded_vocab_size(vocab_size, model),
        max_sequence_length=max_tokens,
        pre_process=parallel.is_first_stage,
        post_process=parallel.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        pg_collection=parallel.groups,
    )
    if model.logits == "response_only" and parallel.is_last_stage:
        from .lm_head import defer_output_layer

        defer_output_layer(gpt)
    return gpt
