"""Builds this rank's model chunk (DDP-wrapped), Megatron optimizer and learning-rate scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..recipe.schema import RecipeConfig
from .model import build_gpt_model, resolve_attention_backend, resolve_transformer_impl, transformer_config
from .parallel import ParallelState


@dataclass
class ModelAndOptimizer:
    """What a training step updates and a checkpoint saves."""

    chunks: list[Any]  # [DistributedDataParallel]: one model chunk (no virtual pipeline stages)
    optimizer: Any  # megatron.core.optimizer.MegatronOptimizer
    scheduler: Any  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    transformer_impl: str  # "local" | "transformer_engine"
    attention_backend: str  # "te" | "flex" | "sdpa"

    @property
    def config(self):
        """The model's TransformerConfig."""
        return self.chunks[0].config


def build_model_and_optimizer(
    cfg: RecipeConfig,
    parallel: ParallelState,
    vocab_size: int,
    max_tokens: int,
    *,
    init_state: dict | None = None,
    pretrained_hf: str | None = None,
) -> ModelAndOptimizer:
    """This rank's DDP-wrapped model chunk, optimizer and scheduler; initial weights from ``init_state``
    (a full state dict), else from a Hugging Face directory, else Megatron's initialisation."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = cfg.model.bf16 if cfg.model.bf16 is not None else parallel.device.type == "cuda"
    impl = resolve_transformer_impl(cfg.model)
    attention = resolve_attention_backend(cfg.model, impl)
    config = transformer_config(cfg.model, bf16=bf16, max_tokens=max_tokens)
    module = build_gpt_model(cfg.model, config, vocab_size, max_tokens, impl, parallel, attention)
    if init_state is not None:
        from .weights import load_full_state_dict

        load_full_state_dict(module, init_state, parallel.tp_group)
    elif pretrained_hf is not None:
        from .hf_weights import load_hf_weights_into

        load_hf_weights_into(module, pretrained_hf, cfg.model, parallel.tp_group)
    module.to(parallel.device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        average_in_collective=False,
    )
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=o.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        chunks,
    )
    s = cfg.scheduler
    train_iters = cfg.train.train_iters
    decay_iters = s.lr_decay_iters or train_iters  # warmup < decay: checked by the recipe validation
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if s.lr_warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.lr_warmup_iters,
        lr_decay_steps=max(1, decay_iters),
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(1, train_iters),
        wd_incr_style="constant",
    )
    return ModelAndOptimizer(chunks, optimizer, scheduler, impl, attention)
