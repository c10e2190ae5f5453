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


def flex_attention_available() -> bool:
    """Whether this torch has ``flex_attention`` (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(model: ModelSection, impl: str) -> str:
    """``model.attention_backend`` resolved for the layer implementation ``impl`` on this machine.

    auto: TE's attention with the TE layer spec; otherwise flex attention on CUDA (where torch has it);
    otherwise the per-sequence SDPA path. ``te`` needs the TE spec; ``flex`` needs CUDA to train (torch
    runs flex_attention's backward on CUDA only).
    """
    choice = model.attention_backend
    if choice == "auto":
        if impl == "transformer_engine":
            return "te"
        return "flex" if torch.cuda.is_available() and flex_attention_available() else "sdpa"
    if choice == "te" and impl != "transformer_engine":
        raise RecipeError(
            "model.attention_backend: te needs Transformer Engine's layer spec (model.transformer_impl="
            f"transformer_engine, or auto with TE importable); this run uses the {impl} spec"
        )
    if choice == "flex" and not (torch.cuda.is_available() and flex_attention_available()):
        raise RecipeError(
            "model.attention_backend: flex needs CUDA and torch >= 2.5 (flex_attention's backward runs on "
            "CUDA only); use sdpa or auto here"
        )
    return choice


def resolve_share_prompt(setting: str, attention: str) -> bool:
    """``dataset.share_prompt`` resolved for the attention backend ``attention`` (resolved too): whether
    the answers of one context share a slot. Transformer Engine's THD attention cannot keep branches
    apart, so ``auto`` does not share under it and ``true`` is an error there."""
    if setting == "false":
        return False
    if attention != "te":
        return True
    if setting == "true":
        raise RecipeError(
            "dataset.share_prompt: true needs attention that keeps answers apart, but model.attention_backend "
            "resolves to te here (Transformer Engine's THD attention cannot express branches); set "
            "model.attention_backend to flex or sdpa, or dataset.share_prompt to auto or false"
        )
    return False


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
        # Rows have their own lengths (never padded to dataset.max_tokens): under PP the stages exchange
        # each activation's shape first (megatron-core's variable-length p2p).
        variable_seq_lengths=model.pipeline_model_parallel_size > 1,
        # Dense model: no MoE dispatch happens; megatron-core refuses variable lengths with its default
        # (allgather) dispatcher type even so.
        moe_token_dispatcher_type="alltoall",
    )


def layer_spec(model: ModelSection, impl: str, attention: str = "sdpa"):
    """The layer spec: Transformer Engine's or the local one; its core attention TE's own (``te``) or
    ``PackedCoreAttention`` with the ``sdpa`` or ``flex`` backend."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from .attention import PackedCoreAttention

    packed = ModuleSpec(module=PackedCoreAttention, params={"backend": attention})
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
        if attention != "te":
            spec.submodules.self_attention.submodules.core_attention = packed
        return spec
    if model.sequence_parallel:
        raise RecipeError(
            "model.sequence_parallel needs the Transformer Engine layer spec (its norms support it)"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=model.normalization)
    spec.submodules.self_attention.submodules.core_attention = packed
    return spec


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``module`` in ``dtype`` (in place: the same Parameter objects,
    with the attributes Megatron set on them), as Megatron-LM's Float16Module does for bf16 models.

    Megatron's linear and embedding layers are built in ``config.params_dtype``, but the local spec's
    norms (``WrappedTorchNorm``: torch.nn.RMSNorm / LayerNorm) ignore it and stay fp32; torch's fused
    rms_norm then refuses the bf16 activations ("Mismatch dtype") and runs unfused. Buffers keep their
    dtype; the optimizer keeps fp32 main copies of bf16 parameters.
    """
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def build_gpt_model(
    model: ModelSection,
    config,
    vocab_size: int,
    max_tokens: int,
    impl: str,
    parallel,
    attention: str = "sdpa",
):
    """This pipeline stage's GPTModel (embedding on the first stage, output layer on the last), built
    with the process groups of ``parallel`` (a ``parallel.ParallelState``), core attention ``attention``
    (see ``resolve_attention_backend``), every parameter in ``config.params_dtype`` (``cast_parameters``),
    and the output layer deferred for ``model.logits=response_only``."""
    from megatron.core.models.gpt import GPTModel

    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, impl, attention),
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
    cast_parameters(gpt, config.params_dtype)
    from .shared_prompt import use_tree_positions

    use_tree_positions(gpt)  # rows with shared prompts carry tree positions (a no-op for the others)
    if model.logits == "response_only" and parallel.is_last_stage:
        from .lm_head import defer_output_layer

        defer_output_layer(gpt)
    return gpt
