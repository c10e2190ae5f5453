"""Full (unsharded) weights <-> this rank's TP/PP shards, by Megatron's own partition attributes.

``gather_full_state_dict`` reassembles the single-process view of a model split over tensor and
pipeline parallelism; ``load_full_state_dict`` loads such a view into any layout. Tensor-parallel
parameters carry ``partition_dim`` and ``partition_stride`` (2 for SwiGLU's fused [gate, up], whose
shards interleave); pipeline stages number their layers locally, so keys are mapped to global layer
indices with each layer's ``layer_number``; with tied embeddings, the last stage's output-layer copy
maps to the embedding.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import Tensor, nn

_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _global_layer_names(model: nn.Module) -> dict[str, str]:
    """This stage's parameter names -> names with global layer indices."""
    gpt = _unwrap(model)
    offsets = {}
    if hasattr(gpt, "decoder"):
        for local, layer in enumerate(gpt.decoder.layers):
            offsets[str(local)] = str(layer.layer_number - 1)
    names = {}
    tied = getattr(gpt, "share_embeddings_and_output_weights", False)
    for name, _ in gpt.named_parameters():
        match = _LAYER_KEY.match(name)
        names[name] = f"{match[1]}{offsets[match[2]]}{match[3]}" if match else name
        if tied and name == "output_layer.weight":  # the last stage's copy of the tied embedding
            names[name] = "embedding.word_embeddings.weight"
    return names


def _is_tp_sharded(param: Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _shard(full: Tensor, dim: int, stride: int, rank: int, world: int) -> Tensor:
    pieces = torch.split(full, full.shape[dim] // (stride * world), dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def _unshard(shards: list[Tensor], dim: int, stride: int) -> Tensor:
    split = [torch.split(s, s.shape[dim] // stride, dim=dim) for s in shards]
    return torch.cat([split[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def gather_full_state_dict(model: nn.Module, tp_group=None, pp_group=None) -> dict[str, Tensor]:
    """The whole model's parameters (CPU, fp32) on every rank, as one process would hold them."""
    gpt = _unwrap(model)
    names = _global_layer_names(gpt)
    tp_world = dist.get_world_size(tp_group) if tp_group is not None else 1
    local = {}
    for name, param in gpt.named_parameters():
        value = param.detach().float().clone()
        if _is_tp_sharded(param) and tp_world > 1:
            shards = [torch.empty_like(value) for _ in range(tp_world)]
            dist.all_gather(shards, value.contiguous(), group=tp_group)
            value = _unshard(shards, param.partition_dim, param.partition_stride)
        local[names[name]] = value.cpu()
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return local
    parts = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, local, group=pp_group)
    full = {}
    for part in parts:
        for name, value in part.items():
            full.setdefault(name, value)  # tied embeddings appear on two stages: identical copies
    return full


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, Tensor], tp_group=None) -> None:
    """Copies this rank's shard of every parameter out of a full state dict."""
    gpt = _unwrap(model)
    names = _global_layer_names(gpt)
    tp_world = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    for name, param in gpt.named_parameters():
        key = names[name]
        if key not in full:
            raise KeyError(f"full state dict has no {key!r} (this rank's {name!r})")
        value = full[key]
        if _is_tp_sharded(param) and tp_world > 1:
            value = _shard(value, param.partition_dim, param.partition_stride, tp_rank, tp_world)
        if value.shape != param.shape:
            raise ValueError(
                f"{key}: full-state shard {tuple(value.shape)} does not fit parameter {tuple(param.shape)}"
            )
        param.copy_(value.to(param.dtype))
