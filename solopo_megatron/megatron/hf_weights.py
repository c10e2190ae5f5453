"""Hugging Face Llama / Qwen2 checkpoints -> our Megatron GPTModel.

``model_section_from_hf_config`` turns a checkpoint's ``config.json`` into ModelSection values (and
rejects what GPTModel cannot express); ``check_model_matches_hf`` lists a recipe's disagreements
with a checkpoint. ``hf_to_megatron_state_dict`` converts HF tensors to the full single-process
Megatron state dict that ``weights.load_full_state_dict`` shards into any TP/PP layout;
``load_hf_weights_into`` does read + convert + load, converting one parameter at a time.

Megatron's layouts: ``linear_qkv`` rows are grouped per query group, [q heads of the group, k, v],
groups concatenated (its bias likewise); ``linear_fc1`` is [gate_proj; up_proj]. Both use RoPE on
halves (HF's ``rotate_half``), so q/k rows need no permutation. Vocab rows beyond the checkpoint's,
up to Megatron's padded vocab, are zeros (the output layer's give logit 0: see ``pad_rows``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelSection

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Megatron's RotaryEmbedding._apply_scaling takes only the factor; these are fixed there.
MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}
# HF keys that hold no weights (older checkpoints store RoPE's inverse frequencies).
_IGNORED_HF_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^decoder\.layers\.\d+\.")

ConfigSource = Any  # a checkpoint directory, a config.json path, its dict, or a transformers PretrainedConfig


# --------------------------------------------------------------------------------------------- config


def _config_dict(hf_config: ConfigSource) -> dict[str, Any]:
    if isinstance(hf_config, (str, os.PathLike)):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config at {path}")
        return json.loads(path.read_text())
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError("expected a checkpoint directory, a config.json path, a dict or a PretrainedConfig, "
                    f"got {type(hf_config)}")


def _architecture(cfg: Mapping[str, Any]) -> str:
    architectures = cfg.get("architectures")
    if not architectures:  # a config built in code names only its model type
        model_type = cfg.get("model_type")
        architectures = [_ARCHITECTURE_OF_MODEL_TYPE.get(model_type, f"model_type {model_type!r}")]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {', '.join(architectures)}: only "
                         f"{' and '.join(SUPPORTED_ARCHITECTURES)} checkpoints can be converted")
    return architectures[0]


def _rope(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) from transformers 5's ``rope_parameters`` or 4.x's keys."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), params


def _rope_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    theta, params = _rope(cfg)
    if theta != int(theta):
        raise ValueError(f"rope_theta {theta} is not an integer (model.rotary_base is one)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    default = next(f.default for f in dataclasses.fields(ModelSection) if f.name == "rope_scaling_factor")
    fields = {"rotary_base": int(theta), "rope_scaling": False, "rope_scaling_factor": default}
    if rope_type == "default":
        return fields
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} cannot be expressed by Megatron's GPTModel "
                         "(supported: none, or llama3)")
    for key, fixed in MEGATRON_LLAMA3_ROPE.items():
        if float(params.get(key, fixed)) != fixed:
            raise ValueError(f"llama3 rope scaling with {key}={params[key]}: "
                             f"Megatron's GPTModel fixes {key}={fixed:g}")
    return {**fields, "rope_scaling": True, "rope_scaling_factor": float(params["factor"])}


def model_section_from_hf_config(hf_config_or_dir: ConfigSource) -> dict[str, Any]:
    """ModelSection field values describing a Llama / Qwen2 checkpoint.

    Accepts a checkpoint directory, a ``config.json`` path, its dict or a transformers
    ``PretrainedConfig``. Raises ValueError for another architecture or for what our GPTModel cannot
    express: rope scaling other than llama3 (with Megatron's fixed parameters), biases other than
    Qwen2's q/k/v ones, sliding-window attention, partial rotary, activations other than SiLU.
    Parallelism, vocab padding and run-time settings are left to the recipe.
    """
    cfg = _config_dict(hf_config_or_dir)
    architecture = _architecture(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{architecture} with hidden_act {cfg['hidden_act']!r}: "
                         "only silu (SwiGLU) is supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{architecture} with attention_bias / mlp_bias: "
                         "only Qwen2's q/k/v biases are supported")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise ValueError(f"{architecture} with sliding-window attention is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{architecture} with partial_rotary_factor {cfg['partial_rotary_factor']} "
                         "is not supported")
    heads = int(cfg["num_attention_heads"])
    return {
        "num_layers": int(cfg["num_hidden_layers"]),
        "hidden_size": int(cfg["hidden_size"]),
        "ffn_hidden_size": int(cfg["intermediate_size"]),
        "num_attention_heads": heads,
        "num_query_groups": int(cfg.get("num_key_value_heads") or heads),
        "kv_channels": int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(cfg["rms_norm_eps"]),
        "add_qkv_bias": architecture == "Qwen2ForCausalLM",
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings", False)),
        **_rope_fields(cfg),
    }


def vocab_size_from_hf_config(hf_config_or_dir: ConfigSource) -> int:
    """The checkpoint's embedding rows (may exceed the tokenizer's vocab, e.g. Qwen2.5)."""
    return int(_config_dict(hf_config_or_dir)["vocab_size"])


def _effective(model: ModelSection, key: str) -> Any:
    value = getattr(model, key)
    if key == "num_query_groups" and value is None:
        return model.num_attention_heads
    if key == "kv_channels" and value is None:
        return model.hidden_size // model.num_attention_heads
    return value


def check_model_matches_hf(model: ModelSection, hf_config: ConfigSource) -> list[str]:
    """Problems, one per ``model.*`` key, where the recipe's model differs from the checkpoint's."""
    try:
        expected = model_section_from_hf_config(hf_config)
    except ValueError as error:
        return [f"model: the checkpoint cannot be loaded: {error}"]
    problems = []
    for key, want in expected.items():
        if key == "rope_scaling_factor" and not expected["rope_scaling"]:
            continue
        have = _effective(model, key)
        same = math.isclose(have, want, rel_tol=1e-6) if isinstance(want, float) else have == want
        if not same:
            problems.append(f"model.{key}: recipe {have!r}, checkpoint {want!r}")
    rows = vocab_size_from_hf_config(hf_config)
    if model.vocab_size is not None and model.vocab_size != rows:
        problems.append(f"model.vocab_size: recipe {model.vocab_size}, checkpoint {rows}")
    return problems


# ---------------------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class _Conversion:
    """One Megatron tensor: the HF tensors it is made of and how."""

    hf_keys: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...], ...]  # expected HF shapes; None: any size (vocab rows)
    combine: Callable[..., Tensor]


def _fuse_qkv(groups: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def fuse(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]  # [groups, rows of the group, ...]
        return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])

    return fuse


def pad_rows(rows: int | None) -> Callable[[Tensor], Tensor]:
    """Appends zero rows up to ``rows`` (Megatron's padded vocab).

    Zero output-layer rows give logit 0 for the padded ids, which a softmax over the padded vocab
    includes in its normaliser (HF's does not have them).
    """

    def pad(t: Tensor) -> Tensor:
        if rows is None or rows == t.shape[0]:
            return t
        if rows < t.shape[0]:
            raise ValueError(f"padded vocab {rows} is smaller than the checkpoint's {t.shape[0]} rows")
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])

    return pad


def _keep(tensor: Tensor) -> Tensor:
    return tensor


def _cat_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    return torch.cat([gate, up])


def _plan(model: ModelSection, fused_norms: bool, padded_vocab: int | None) -> dict[str, _Conversion]:
    """Megatron key -> conversion, for the whole model (norm names: TE's fused ones or the local spec's)."""
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    heads, groups, head_dim = (_effective(model, key) for key in ("num_attention_heads", "num_query_groups",
                                                                    "kv_channels"))
    q_rows, kv_rows = heads * head_dim, groups * head_dim
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    vocab_rows = pad_rows(padded_vocab)
    plan = {"embedding.word_embeddings.weight": _Conversion(("model.embed_tokens.weight",), ((None, hidden),),
                                                            vocab_rows)}
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        qkv = tuple(f"{attn}{p}_proj." for p in "qkv")
        plan[mg + attn_norm] = _Conversion((hf + "input_layernorm.weight",), ((hidden,),), _keep)
        plan[mg + "self_attention.linear_qkv.weight"] = _Conversion(
            tuple(p + "weight" for p in qkv), ((q_rows, hidden), (kv_rows, hidden), (kv_rows, hidden)),
            _fuse_qkv(groups))
        if model.add_qkv_bias:
            plan[mg + "self_attention.linear_qkv.bias"] = _Conversion(
                tuple(p + "bias" for p in qkv), ((q_rows,), (kv_rows,), (kv_rows,)), _fuse_qkv(groups))
        plan[mg + "self_attention.linear_proj.weight"] = _Conversion(
            (attn + "o_proj.weight",), ((hidden, q_rows),), _keep)
        plan[mg + mlp_norm] = _Conversion((hf + "post_attention_layernorm.weight",), ((hidden,),), _keep)
        plan[mg + "mlp.linear_fc1.weight"] = _Conversion(
            (mlp + "gate_proj.weight", mlp + "up_proj.weight"), ((ffn, hidden), (ffn, hidden)), _cat_gate_up)
        plan[mg + "mlp.linear_fc2.weight"] = _Conversion((mlp + "down_proj.weight",), ((hidden, ffn),), _keep)
    plan["decoder.final_layernorm.weight"] = _Conversion(("model.norm.weight",), ((hidden,),), _keep)
    if not model.share_embeddings_and_output_weights:
        plan["output_layer.weight"] = _Conversion(("lm_head.weight",), ((None, hidden),), vocab_rows)
    return plan


def _template(name: str) -> str:
    return _LAYER.sub("decoder.layers.*.", name)


def _select(plan: dict[str, _Conversion], param_names: Iterable[str] | None) -> dict[str, _Conversion]:
    if param_names is None:
        return plan
    names = set(param_names)
    known = {_template(key) for key in plan}
    unknown = sorted(name for name in names if _template(name) not in known)
    if unknown:
        raise ValueError(f"model parameters with no Hugging Face counterpart: {', '.join(unknown)}")
    return {key: conversion for key, conversion in plan.items() if key in names}


def _check_keys(
    plan: dict[str, _Conversion], hf_state: Mapping[str, Tensor], model: ModelSection, source: str
) -> None:
    """Every needed HF tensor is there and every HF tensor is used (before any is read)."""
    for key, conversion in plan.items():
        for hf_key in conversion.hf_keys:
            if hf_key not in hf_state:
                raise KeyError(f"{source} has no tensor {hf_key!r} (needed for {key!r})")
    used = {hf_key for conversion in plan.values() for hf_key in conversion.hf_keys}
    if model.share_embeddings_and_output_weights:
        used.add("lm_head.weight")  # some tied checkpoints store the copy; it is checked when read
    unused = sorted(k for k in hf_state if k not in used and not _IGNORED_HF_KEY.search(k))
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ValueError(f"{source} has tensors the model has no place for: {', '.join(unused[:5])}{more} "
                         "(do num_layers, add_qkv_bias or share_embeddings_and_output_weights differ "
                         "from the checkpoint?)")


def _convert(key: str, conversion: _Conversion, hf_state: Mapping[str, Tensor]) -> Tensor:
    tensors = []
    for hf_key, shape in zip(conversion.hf_keys, conversion.shapes):
        tensor = hf_state[hf_key]
        fits = tensor.dim() == len(shape) and all(w is None or w == h for w, h in zip(shape, tensor.shape))
        if not fits:
            expected = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"shape mismatch: HF {hf_key} is {tuple(tensor.shape)}, but Megatron {key} "
                             f"needs {expected} for this model section")
        tensors.append(tensor)
    return conversion.combine(*tensors)


def _check_tied_copy(hf_state: Mapping[str, Tensor], model: ModelSection) -> None:
    if model.share_embeddings_and_output_weights and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
            raise ValueError("model.share_embeddings_and_output_weights is set but the checkpoint's "
                             "lm_head.weight differs from model.embed_tokens.weight")


class _LazyStateDict(Mapping[str, Tensor]):
    """A state dict whose values are converted when read (one parameter in memory at a time)."""

    def __init__(self, plan: dict[str, _Conversion], hf_state: Mapping[str, Tensor]):
        self._plan, self._hf_state = plan, hf_state

    def __getitem__(self, key: str) -> Tensor:
        return _convert(key, self._plan[key], self._hf_state)

    def __contains__(self, key: object) -> bool:
        return key in self._plan

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


def _lazy_megatron_state(
    hf_state: Mapping[str, Tensor],
    model: ModelSection,
    param_names: Iterable[str] | None,
    padded_vocab: int | None,
    source: str | None,
) -> _LazyStateDict:
    names = None if param_names is None else list(param_names)
    fused = names is not None and any(name.endswith("linear_qkv.layer_norm_weight") for name in names)
    plan = _plan(model, fused, padded_vocab)
    source = source or getattr(hf_state, "source", None) or "the Hugging Face state dict"
    _check_keys(plan, hf_state, model, source)
    _check_tied_copy(hf_state, model)
    return _LazyStateDict(_select(plan, names), hf_state)


def hf_to_megatron_state_dict(
    hf_state: Mapping[str, Tensor],
    model_section: ModelSection,
    param_names: Iterable[str] | None = None,
    padded_vocab: int | None = None,
    *,
    source: str | None = None,
) -> dict[str, Tensor]:
    """The full single-process Megatron state dict of a Llama / Qwen2 HF state dict.

    Args:
        hf_state: HF tensors by name (``model.layers.0.self_attn.q_proj.weight``, ...), any dtype.
        model_section: the model the tensors are for (its shapes are checked).
        param_names: the Megatron model's parameter names with global layer indices (the keys of
            ``weights.load_full_state_dict``); they pick the layer spec's norm names (Transformer
            Engine's ``linear_qkv.layer_norm_weight`` or the local spec's ``input_layernorm.weight``)
            and only their tensors are produced. None: every tensor, with the local spec's names.
        padded_vocab: Megatron's padded vocab; the embedding / output rows are zero-padded to it.
        source: where the tensors came from, for error messages.

    Raises KeyError naming the HF key (and source) for a missing tensor, ValueError for a shape
    mismatch (naming the HF and Megatron keys and shapes), for HF tensors the model has no place
    for, and for model parameters with no HF counterpart.
    """
    lazy = _lazy_megatron_state(hf_state, model_section, param_names, padded_vocab, source)
    return {key: lazy[key] for key in lazy}


# ------------------------------------------------------------------------------------------- reading


class HFCheckpoint(Mapping[str, Tensor]):
    """The tensors of a checkpoint directory, read (to CPU) when accessed; ``dict(...)`` reads all."""

    def __init__(self, files: dict[str, Path], source: str):
        self._files = files  # tensor name -> file
        self.source = source
        self._opened: dict[Path, Any] = {}

    def _open(self, path: Path) -> Any:
        if path not in self._opened:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._opened[path] = safe_open(str(path), framework="pt", device="cpu")
            else:
                self._opened[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._opened[path]

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._files:
            raise KeyError(f"{self.source} has no tensor {key!r}")
        path = self._files[key]
        handle = self._open(path)
        return handle.get_tensor(key) if path.suffix == ".safetensors" else handle[key]

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _tensor_files(directory: Path) -> dict[str, Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {key: directory / name for key, name in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise FileNotFoundError(f"{index} lists {path.name}, which is missing")
            return files
    paths = sorted(directory.glob("*.safetensors"))
    if paths:
        from safetensors import safe_open

        files = {}
        for path in paths:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                files.update(dict.fromkeys(handle.keys(), path))
        return files
    paths = sorted(directory.glob("pytorch_model*.bin"))
    files = {}
    for path in paths:
        files.update(dict.fromkeys(torch.load(path, map_location="cpu", mmap=True, weights_only=True), path))
    if not files:
        raise FileNotFoundError(f"no Hugging Face weights in {directory}: expected *.safetensors "
                                "(or model.safetensors.index.json), or pytorch_model*.bin")
    return files


def load_hf_state_dict(directory: str | os.PathLike) -> HFCheckpoint:
    """The checkpoint's tensors by HF name: sharded (index json) or single safetensors, else
    ``pytorch_model*.bin``. Tensors are read to CPU on access, in the checkpoint's dtype."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist")
    return HFCheckpoint(_tensor_files(path), source=f"Hugging Face checkpoint {path}")


def load_hf_weights_into(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    model_section: ModelSection,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> None:
    """Loads a Llama / Qwen2 checkpoint directory into this rank's (TP/PP-sharded) GPTModel.

    Checks the model section against the checkpoint's config first (ValueError listing every
    difference), then converts and copies one parameter at a time.
    """
    from .weights import _global_layer_names, _unwrap, load_full_state_dict

    problems = check_model_matches_hf(model_section, directory)
    if problems:
        raise ValueError(f"the model does not match {directory}:\n" + "\n".join(f"  - {p}" for p in problems))
    gpt = _unwrap(model)
    names = set(_global_layer_names(gpt).values())
    full = _lazy_megatron_state(load_hf_state_dict(directory), model_section, names, gpt.vocab_size, None)
    load_full_state_dict(model, full, tp_group)
