"""Hugging Face ``config.json`` of Llama / Qwen2 checkpoints -> recipe ``model.*`` values (pure json).

``model_section_from_hf_config`` turns a checkpoint's config into ModelSection values (and rejects
what Megatron's GPTModel cannot express); ``check_model_matches_hf`` lists a recipe's disagreements
with a checkpoint. The weights themselves are converted by ``megatron.hf_weights``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .schema import ModelSection

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Megatron's RotaryEmbedding._apply_scaling takes only the factor; these are fixed there.
MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

ConfigSource = Any  # a checkpoint directory, a config.json path, its dict, or a transformers PretrainedConfig


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
    raise TypeError(
        "expected a checkpoint directory, a config.json path, a dict or a PretrainedConfig, "
        f"got {type(hf_config)}"
    )


def _architecture(cfg: Mapping[str, Any]) -> str:
    architectures = cfg.get("architectures")
    if not architectures:  # a config built in code names only its model type
        model_type = cfg.get("model_type")
        architectures = [_ARCHITECTURE_OF_MODEL_TYPE.get(model_type, f"model_type {model_type!r}")]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {', '.join(architectures)}: only "
            f"{' and '.join(SUPPORTED_ARCHITECTURES)} checkpoints can be converted"
        )
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
        raise ValueError(
            f"rope scaling type {rope_type!r} cannot be expressed by Megatron's GPTModel "
            "(supported: none, or llama3)"
        )
    for key, fixed in MEGATRON_LLAMA3_ROPE.items():
        if float(params.get(key, fixed)) != fixed:
            raise ValueError(
                f"llama3 rope scaling with {key}={params[key]}: Megatron's GPTModel fixes {key}={fixed:g}"
            )
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
        raise ValueError(
            f"{architecture} with hidden_act {cfg['hidden_act']!r}: only silu (SwiGLU) is supported"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(
            f"{architecture} with attention_bias / mlp_bias: only Qwen2's q/k/v biases are supported"
        )
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise ValueError(f"{architecture} with sliding-window attention is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            f"{architecture} with partial_rotary_factor {cfg['partial_rotary_factor']} is not supported"
        )
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


def effective_value(model: ModelSection, key: str) -> Any:
    """A model key as Megatron reads it: unset query groups = heads, unset kv_channels = hidden / heads."""
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
        have = effective_value(model, key)
        same = math.isclose(have, want, rel_tol=1e-6) if isinstance(want, float) else have == want
        if not same:
            problems.append(f"model.{key}: recipe {have!r}, checkpoint {want!r}")
    rows = vocab_size_from_hf_config(hf_config)
    if model.vocab_size is not None and model.vocab_size != rows:
        problems.append(f"model.vocab_size: recipe {model.vocab_size}, checkpoint {rows}")
    return problems


# ----------------------------------------------------------------------------- export (model -> config)

# Kept beside a run's checkpoints at its start (solopo-train), read by solopo-export: the pretrained
# checkpoint's config.json and generation_config.json, and the run's tokenizer.
HF_CONFIG_COPY = "hf_config.json"
HF_GENERATION_CONFIG_COPY = "hf_generation_config.json"
TOKENIZER_COPY = "tokenizer"
_TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def export_hf_config(
    model: ModelSection, vocab_size: int, tokenizer: Any, base: Mapping[str, Any] | None, dtype: str
) -> dict[str, Any]:
    """The ``config.json`` of an exported model: ``base`` (the config the run started from, if any) with
    every architectural field set from the model section, or a Llama (Qwen2 with QKV bias) config.

    Raises ValueError for a model section the Llama / Qwen2 architectures cannot express.
    """
    if model.normalization != "RMSNorm":
        raise ValueError(f"model.normalization {model.normalization}: Llama and Qwen2 use RMSNorm")
    if base is not None:
        architecture = _architecture(base)
    else:
        architecture = "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"
    if model.add_qkv_bias != (architecture == "Qwen2ForCausalLM"):
        raise ValueError(f"model.add_qkv_bias {model.add_qkv_bias} with {architecture}")
    model_type = {v: k for k, v in _ARCHITECTURE_OF_MODEL_TYPE.items()}[architecture]
    config = {key: value for key, value in (base or {}).items() if key not in ("rope_parameters", "dtype")}
    config.update(
        {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": model.hidden_size,
            "intermediate_size": model.ffn_hidden_size,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": effective_value(model, "num_query_groups"),
            "head_dim": effective_value(model, "kv_channels"),
            "rms_norm_eps": model.layernorm_epsilon,
            "hidden_act": "silu",
            "vocab_size": vocab_size,
            "tie_word_embeddings": model.share_embeddings_and_output_weights,
            "rope_theta": float(model.rotary_base),
            "rope_scaling": (
                {"rope_type": "llama3", "factor": model.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE}
                if model.rope_scaling
                else None
            ),
            "torch_dtype": _TORCH_DTYPE_NAMES[dtype],
        }
    )
    config.setdefault("max_position_embeddings", 131072 if model.rope_scaling else 32768)
    if architecture == "LlamaForCausalLM":
        config.update({"attention_bias": False, "mlp_bias": False})
    else:
        config.setdefault("use_sliding_window", False)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if base is None or name not in base:
            value = getattr(tokenizer, name, None)
            if value is not None:
                config[name] = int(value)
    problems = check_model_matches_hf(model, config)
    if problems:  # what this config says must read back as the model it was written from
        raise ValueError("; ".join(problems))
    return config


def generation_config(hf_config: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``generation_config.json``: the pretrained one (extra eos ids, sampling defaults) if the run had
    one, else the token ids transformers' generate() reads from the config."""
    if base is not None:
        return dict(base)
    return {
        key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in hf_config
    }
