"""Hugging Face Llama / Qwen2 checkpoints -> our Megatron GPTModel.

The checkpoint's ``config.json`` is parsed by ``recipe.hf_config`` (pure json, usable before any
process group). ``hf_to_megatron_state_dict`` converts HF tensors to the full single-process
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
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..recipe.errors import RecipeError
from ..recipe.hf_config import check_model_matches_hf, effective_value
from ..recipe.schema import ModelSection

# HF keys that hold no weights (older checkpoints store RoPE's inverse frequencies).
_IGNORED_HF_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^decoder\.layers\.\d+\.")


# ---------------------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class _Conversion:
    """One Megatron tensor: the HF tensors it is made of and how (``combine``), and back (``split``)."""

    hf_keys: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...], ...]  # expected HF shapes; None: any size (vocab rows)
    combine: Callable[..., Tensor]
    split: Callable[[Tensor], tuple[Tensor, ...]]


def _fuse_qkv(groups: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def fuse(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]  # [groups, rows of the group, ...]
        return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])

    return fuse


def _split_qkv(groups: int, q_rows: int, kv_rows: int) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """The inverse of ``_fuse_qkv``: per query group [q heads, k, v] rows back to q, k and v."""
    per_group = (q_rows // groups, kv_rows // groups, kv_rows // groups)

    def split(fused: Tensor) -> tuple[Tensor, ...]:
        grouped = fused.reshape(groups, -1, *fused.shape[1:])
        return tuple(part.reshape(-1, *fused.shape[1:]) for part in grouped.split(per_group, dim=1))

    return split


def _drop_rows(rows: int) -> Callable[[Tensor], tuple[Tensor]]:
    """The inverse of ``pad_rows``: the vocabulary's rows without Megatron's padding."""

    def drop(t: Tensor) -> tuple[Tensor]:
        if t.shape[0] < rows:
            raise RecipeError(f"the checkpoint has {t.shape[0]} vocabulary rows, fewer than the run's {rows}")
        return (t[:rows],)

    return drop


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


def _unkeep(tensor: Tensor) -> tuple[Tensor]:
    return (tensor,)


def _cat_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    return torch.cat([gate, up])


def _split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = fc1.chunk(2)
    return gate, up


def _plan(
    model: ModelSection, fused_norms: bool, padded_vocab: int | None, vocab: int | None = None
) -> dict[str, _Conversion]:
    """Megatron key -> conversion, for the whole model (norm names: TE's fused ones or the local spec's).

    ``padded_vocab``: rows the import pads the vocabulary to; ``vocab``: rows the export keeps."""
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    heads, groups, head_dim = (
        effective_value(model, key) for key in ("num_attention_heads", "num_query_groups", "kv_channels")
    )
    q_rows, kv_rows = heads * head_dim, groups * head_dim
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    vocab_rows, vocab_back = pad_rows(padded_vocab), _drop_rows(vocab) if vocab else _unkeep

    def same(hf_key: str, shape: tuple[int | None, ...]) -> _Conversion:
        return _Conversion((hf_key,), (shape,), _keep, _unkeep)

    plan = {
        "embedding.word_embeddings.weight": _Conversion(
            ("model.embed_tokens.weight",), ((None, hidden),), vocab_rows, vocab_back
        )
    }
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        qkv = tuple(f"{attn}{p}_proj." for p in "qkv")
        plan[mg + attn_norm] = same(hf + "input_layernorm.weight", (hidden,))
        plan[mg + "self_attention.linear_qkv.weight"] = _Conversion(
            tuple(p + "weight" for p in qkv),
            ((q_rows, hidden), (kv_rows, hidden), (kv_rows, hidden)),
            _fuse_qkv(groups),
            _split_qkv(groups, q_rows, kv_rows),
        )
        if model.add_qkv_bias:
            plan[mg + "self_attention.linear_qkv.bias"] = _Conversion(
                tuple(p + "bias" for p in qkv),
                ((q_rows,), (kv_rows,), (kv_rows,)),
                _fuse_qkv(groups),
                _split_qkv(groups, q_rows, kv_rows),
            )
        plan[mg + "self_attention.linear_proj.weight"] = same(attn + "o_proj.weight", (hidden, q_rows))
        plan[mg + mlp_norm] = same(hf + "post_attention_layernorm.weight", (hidden,))
        plan[mg + "mlp.linear_fc1.weight"] = _Conversion(
            (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
            ((ffn, hidden), (ffn, hidden)),
            _cat_gate_up,
            _split_gate_up,
        )
        plan[mg + "mlp.linear_fc2.weight"] = same(mlp + "down_proj.weight", (hidden, ffn))
    plan["decoder.final_layernorm.weight"] = same("model.norm.weight", (hidden,))
    if not model.share_embeddings_and_output_weights:
        plan["output_layer.weight"] = _Conversion(
            ("lm_head.weight",), ((None, hidden),), vocab_rows, vocab_back
        )
    return plan


def megatron_to_hf_plan(model: ModelSection, fused_norms: bool, vocab: int) -> dict[str, _Conversion]:
    """Megatron key (global layer index) -> how its tensor splits into HF tensors (``split``) and their
    names (``hf_keys``); the vocabulary's padded rows beyond ``vocab`` are dropped. For the export."""
    return _plan(model, fused_norms, None, vocab)


def _template(name: str) -> str:
    return _LAYER.sub("decoder.layers.*.", name)


def _select(plan: dict[str, _Conversion], param_names: Iterable[str] | None) -> dict[str, _Conversion]:
    if param_names is None:
        return plan
    names = set(param_names)
    known = {_template(key) for key in plan}
    unknown = sorted(name for name in names if _template(name) not in known)
    if unknown:
        raise RecipeError(f"model parameters with no Hugging Face counterpart: {', '.join(unknown)}")
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
        raise RecipeError(
            f"{source} has tensors the model has no place for: {', '.join(unused[:5])}{more} "
            "(do num_layers, add_qkv_bias or share_embeddings_and_output_weights differ "
            "from the checkpoint?)"
        )


def _convert(key: str, conversion: _Conversion, hf_state: Mapping[str, Tensor]) -> Tensor:
    tensors = []
    for hf_key, shape in zip(conversion.hf_keys, conversion.shapes):
        tensor = hf_state[hf_key]
        fits = tensor.dim() == len(shape) and all(w is None or w == h for w, h in zip(shape, tensor.shape))
        if not fits:
            expected = tuple("*" if s is None else s for s in shape)
            raise RecipeError(
                f"shape mismatch: HF {hf_key} is {tuple(tensor.shape)}, but Megatron {key} "
                f"needs {expected} for this model section"
            )
        tensors.append(tensor)
    return conversion.combine(*tensors)


def _check_tied_copy(hf_state: Mapping[str, Tensor], model: ModelSection) -> None:
    if model.share_embeddings_and_output_weights and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
            raise RecipeError(
                "model.share_embeddings_and_output_weights is set but the checkpoint's "
                "lm_head.weight differs from model.embed_tokens.weight"
            )


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
        raise FileNotFoundError(
            f"no Hugging Face weights in {directory}: expected *.safetensors "
            "(or model.safetensors.index.json), or pytorch_model*.bin"
        )
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
        raise RecipeError(
            f"the model does not match {directory}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    gpt = _unwrap(model)
    names = set(_global_layer_names(gpt).values())
    full = _lazy_megatron_state(load_hf_state_dict(directory), model_section, names, gpt.vocab_size, None)
    load_full_state_dict(model, full, tp_group)
