"""A training checkpoint -> a Hugging Face directory that transformers (and vLLM, lm-eval) load.

``export_checkpoint`` reads megatron-core's dist checkpoint (torch.distributed.checkpoint files) on one
CPU process without any process group: dist_checkpointing stores global tensors, so any TP / PP / CP /
DP layout, with or without the distributed optimizer, reads the same. Layer-stacked tensors
(``decoder.layers.*``, layer axis first) are read one layer's slice at a time through a load planner
that asks only for that slice's bytes; each slice is split into its HF tensors (``hf_weights``'s
conversion plan, inverted), cast and buffered into safetensors shards of at most ``max_shard_bytes``.
Peak memory: one shard plus one tensor, never the model.

What the run was comes from what solopo-train keeps beside its checkpoints at the run's start: the
recipe (``config.yaml``), the tokenizer (``tokenizer/``) and, for a run from ``checkpoint.pretrained_hf``,
that checkpoint's ``config.json`` and ``generation_config.json`` (``hf_config.json``,
``hf_generation_config.json``). So the export needs neither the pretrained folder nor the tokenizer's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.files import remove_stale_scratch, replace_folder, scratch_path
from ..recipe.checkpoints import (
    CONFIG,
    LATEST,
    damage,
    how_to_resume,
    iter_dir,
    iteration_folders,
    resolve_resume,
)
from ..recipe.errors import RecipeError
from ..recipe.hf_config import (
    HF_CONFIG_COPY,
    HF_GENERATION_CONFIG_COPY,
    TOKENIZER_COPY,
    export_hf_config,
    generation_config,
)
from ..recipe.loading import load_config
from ..recipe.preflight import folder_problem
from ..recipe.schema import RecipeConfig
from ..recipe.sizing import padded_vocab_size
from ..recipe.sources import model_vocab_size
from .hf_weights import megatron_to_hf_plan

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_SHARD_BYTES = 1 << 30
INDEX = "model.safetensors.index.json"
# Checkpoint keys that hold no model weight: optimizer state, RNG, TE's extra state, our "common" dict.
_NOT_WEIGHTS = ("optimizer.", "rng_state", "common")


@dataclass(frozen=True)
class ExportSummary:
    """What ``export_checkpoint`` wrote."""

    out: Path
    iteration: int
    tensors: int
    shards: int
    bytes: int


# ----------------------------------------------------------------------------- reading the checkpoint


def _trained_vocab(folder: Path) -> int | None:
    """The true vocabulary the checkpoint's training ran its softmax over, as ``save_checkpoint``
    recorded it; None for a checkpoint saved before it was recorded. megatron-core reads its own common
    state (``common.pt`` up to 0.16, inside the shards from 0.19)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: I/O errors

    try:
        common = dist_checkpointing.load_common_state_dict(str(folder)).get("common", {})
    except (Exception, CheckpointException) as error:  # noqa: BLE001  (one line, naming the folder)
        raise _unreadable("common_state", folder, error) from None
    return common.get("vocab_size")


def _checkpoint_dir(checkpoint: str | os.PathLike, iteration: int | None) -> tuple[Path, Path, int]:
    """(run folder, iteration folder, iteration) of ``--checkpoint`` (a run folder or one iteration's)."""
    path = Path(checkpoint).resolve()
    if not path.is_dir():
        raise RecipeError(f"--checkpoint: {path} is not a directory")
    found = iteration_folders(path)  # none in one iteration's own folder
    if iteration is not None and found:
        folder = iter_dir(path, iteration)
        reason = damage(folder)
        if reason is not None:
            raise RecipeError(
                f"--iteration {iteration}: {folder} {reason}; {how_to_resume(path, '--checkpoint')}"
            )
    else:
        if found and not (path / LATEST).exists():
            raise RecipeError(
                f"--checkpoint: {path} has no {LATEST}; pass --iteration N "
                f"(it holds {', '.join(f.name for f in found[-3:])})"
            )
        folder, problem = resolve_resume(path, "--checkpoint", required=True)
        if problem is not None:
            raise RecipeError(problem)
        if iteration is not None and folder != iter_dir(folder.parent, iteration):
            raise RecipeError(f"--iteration {iteration}: {folder} is the checkpoint of another iteration")
    root = folder.parent
    try:
        step = int(folder.name.removeprefix("iter_"))
    except ValueError:
        raise RecipeError(f"--checkpoint: {folder} is not an iter_XXXXXXX checkpoint folder") from None
    return root, folder, step


class _SliceReader:
    """Global tensors of a dist checkpoint, or one index of their first axis, read without a process group."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder = folder
        self.reader = FileSystemReader(str(folder))
        self.metadata = self.reader.read_metadata()
        self.tensors = {
            key: md
            for key, md in self.metadata.state_dict_metadata.items()
            if hasattr(md, "chunks") and not key.startswith(_NOT_WEIGHTS)
        }

    def shape(self, key: str) -> torch.Size:
        return self.tensors[key].size

    def read(self, key: str, index: int | None = None) -> Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.tensors[key]
        size = list(md.size) if index is None else [1, *md.size[1:]]
        offsets = [0] * len(size) if index is None else [index] + [0] * (len(size) - 1)
        out = torch.empty(size, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))

        class OneSlice(DefaultLoadPlanner):  # the default planner would ask for the whole global tensor
            def create_local_plan(self) -> LoadPlan:
                return LoadPlan(create_read_items_for_chunk_list(key, md, [chunk]))

            def lookup_tensor(self, index) -> Tensor:  # the read items' offsets are relative to ``out``
                return out

        with warnings.catch_warnings():  # one process without a process group is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load({key: out}, storage_reader=self.reader, planner=OneSlice(), no_dist=True)
            except CheckpointException as error:  # a BaseException in torch: a damaged shard, an I/O error
                raise _unreadable(key, self.folder, error) from None
        return out if index is None else out[0]


def _unreadable(what: str, folder: Path, error: BaseException) -> RecipeError:
    """One line for a checkpoint part that cannot be read: what, where, the first line of why."""
    reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return RecipeError(
        f"cannot read {what} from {folder} ({reason[:300]}); restore the checkpoint's files "
        "or export another --iteration"
    )


def _stacked_key(megatron_key: str) -> tuple[str, int | None]:
    """``decoder.layers.3.mlp...`` -> (``decoder.layers.mlp...``, 3): how dist_checkpointing stores layers."""
    parts = megatron_key.split(".")
    if parts[:2] == ["decoder", "layers"] and parts[2].isdigit():
        return ".".join(parts[:2] + parts[3:]), int(parts[2])
    return megatron_key, None


# ----------------------------------------------------------------------------- the run's description


def _run_recipe(root: Path) -> RecipeConfig:
    path = root / CONFIG
    if not path.is_file():
        raise RecipeError(
            f"--checkpoint: {root} has no {CONFIG} (the recipe its run saved beside the checkpoints); "
            "export a folder that solopo-train wrote"
        )
    return load_config(str(path), [])


def _kept_json(root: Path, copy: str, cfg: RecipeConfig, original: str) -> tuple[dict | None, Path | None]:
    """(a Hugging Face json of the run's pretrained checkpoint, the file it came from): the copy beside
    the checkpoints, else the pretrained folder's own (runs saved before the copies were kept), else None."""
    candidates = [root / copy]
    if cfg.checkpoint.pretrained_hf:
        candidates.append(Path(cfg.checkpoint.pretrained_hf) / original)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        return None, None
    try:
        return json.loads(found.read_text()), found
    except ValueError as error:
        key = (
            "--checkpoint" if found.parent == root else "checkpoint.pretrained_hf (of the run's config.yaml)"
        )
        raise RecipeError(f"{key}: {found} is not valid JSON ({error}); restore it") from None


def _run_tokenizer(root: Path, cfg: RecipeConfig):
    """(the run's tokenizer, the folder it is read from)."""
    from ..data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from ..data.tokenize import load_tokenizer

    if (root / TOKENIZER_COPY).is_dir():
        folder = root / TOKENIZER_COPY
        return load_tokenizer(str(folder), f"the tokenizer kept in {folder}"), folder
    name = cfg.dataset.tokenizer
    tokenizer = load_tokenizer(name, "dataset.tokenizer (of the run's config.yaml)")
    return tokenizer, TINY_TOKENIZER_DIR if name == "tiny" else Path(name)


# ----------------------------------------------------------------------------- writing


def _plan_shards(items: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """HF tensor names in order, cut into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _out_problem(out: Path, sources: list[tuple[Path, str]]) -> str | None:
    """Why ``--out`` would write into, over or inside a folder the export reads, or None.

    ``sources``: (folder, what it is) of everything read. Writing inside one would mix Hugging Face files
    into it; writing over one (``--out`` a folder above it, with ``--overwrite``) would delete it."""
    for source, what in sources:
        if _within(out, source):
            where = "is" if out == source else "is inside"
            return f"--out: {out} {where} {source} ({what}), which the export reads; choose a directory outside it"
        if _within(source, out) or _within(source, scratch_path(out)):
            return f"--out: {out} holds {source} ({what}), which the export reads; choose another directory"
    return None


def _check_out(out: Path, overwrite: bool, sources: list[tuple[Path, str]]) -> None:
    """Every ``--out`` problem, raised before any tensor is read."""
    if (problem := _out_problem(out, sources)) is not None:
        raise RecipeError(problem)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RecipeError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    if (problem := folder_problem(out, "--out")) is not None:  # a probe write: root passes os.access
        raise RecipeError(problem)


def _prepare_out(out: Path) -> Path:
    """This process's staging folder beside ``out`` (``OUT.tmp-PID-HOST``; ``out`` itself is replaced only
    at the end). A killed export's staging folder is removed here, never a live one's."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(out.parent, out.name)
        staging = scratch_path(out)
        shutil.rmtree(staging, ignore_errors=True)  # this process's own, from an earlier failed try
        staging.mkdir()
    except OSError as error:
        raise RecipeError(
            f"--out: cannot create {out} ({error.strerror}); choose another directory"
        ) from None
    return staging


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    iteration: int | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_huge_weights: bool = False,
    log: Callable[[str], None] = print,
) -> ExportSummary:
    """Writes the Hugging Face directory of a solopo-train checkpoint.

    Args:
        checkpoint: a run's ``checkpoint.save`` folder (its latest iteration) or one ``iter_*`` folder.
        out: the directory to write: config.json, generation_config.json, model-*.safetensors with
            model.safetensors.index.json, and the run's tokenizer files.
        iteration: which iteration of the run folder (default: the latest).
        dtype: ``bf16``, ``fp16`` or ``fp32``: the model parameters as stored (fp32 on CPU runs, the
            model's dtype on bf16 runs, whose fp32 master copies are optimizer state), cast.
        overwrite: replace a non-empty ``out`` (written beside it first, swapped in at the end).
        max_shard_bytes: the largest safetensors shard (peak memory is about one shard).
        allow_huge_weights: export weights beyond ``SUSPICIOUS_MAGNITUDE`` (a diverged run's) with a
            warning instead of refusing them. Non-finite weights are always refused.

    Raises RecipeError for a folder that is not a checkpoint, a model the Hugging Face Llama / Qwen2
    architectures cannot express, a checkpoint tensor that has no Hugging Face place (named), and an
    ``out`` that exists and is not empty without ``overwrite``.
    """
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if iteration is not None and iteration < 1:
        raise RecipeError(f"--iteration: must be >= 1 (a checkpoint is saved after a step), got {iteration}")
    root, folder, step = _checkpoint_dir(checkpoint, iteration)
    cfg = _run_recipe(root)
    tokenizer, tokenizer_dir = _run_tokenizer(root, cfg)
    base, base_file = _kept_json(root, HF_CONFIG_COPY, cfg, "config.json")
    vocab = model_vocab_size(cfg, len(tokenizer), base.get("vocab_size") if base else None)
    try:
        hf_config = export_hf_config(cfg.model, vocab, tokenizer, base, dtype)
    except ValueError as error:
        raise RecipeError(f"cannot export {folder}: {error}") from None
    base_generation, generation_file = _kept_json(
        root, HF_GENERATION_CONFIG_COPY, cfg, "generation_config.json"
    )
    # Everything read: --out may be none of these folders, nor inside one, nor above one.
    sources = [(root, "the run folder")]
    if tokenizer_dir.is_dir():
        sources.append((tokenizer_dir.resolve(), "the run's tokenizer"))
    sources += [(f.parent.resolve(), "the pretrained checkpoint") for f in (base_file, generation_file) if f]
    out = Path(out).resolve()
    _check_out(out, overwrite, sources)  # before reading any tensor

    tensors = _SliceReader(folder)
    fused = any(key.endswith("linear_qkv.layer_norm_weight") for key in tensors.tensors)
    plan = megatron_to_hf_plan(cfg.model, fused, vocab)
    stacked = {_stacked_key(key)[0] for key in plan}
    unmapped = sorted(key for key in tensors.tensors if key not in stacked)
    if unmapped:
        raise RecipeError(
            f"cannot export {folder}: its tensor {unmapped[0]!r} has no Hugging Face counterpart"
            + (f" ({len(unmapped) - 1} more)" if len(unmapped) > 1 else "")
        )
    missing = sorted(key for key in stacked if key not in tensors.tensors)
    if missing:
        raise RecipeError(f"cannot export {folder}: it has no tensor {missing[0]!r} for this model section")
    trained = _trained_vocab(folder)
    if trained is not None and trained != vocab:  # the softmax's vocabulary must be the exported one
        raise RecipeError(
            f"cannot export {folder}: it was trained over a vocabulary of {trained} tokens, but the run's "
            f"tokenizer and recipe give {vocab} (was the tokenizer or model.vocab_size changed?)"
        )
    rows = tensors.shape("embedding.word_embeddings.weight")[0]
    if padded_vocab_size(vocab, cfg.model) != rows:  # the vocabulary rule must give training's embedding
        raise RecipeError(
            f"cannot export {folder}: its embedding has {rows} rows, but a vocabulary of {vocab} pads to "
            f"{padded_vocab_size(vocab, cfg.model)} (was the tokenizer or model.vocab_size changed?)"
        )

    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    sizes = [
        (hf_key, itemsize * _numel(shape, vocab))
        for conversion in plan.values()
        for hf_key, shape in zip(conversion.hf_keys, conversion.shapes)
    ]
    shards = _plan_shards(sizes, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shard_of = {hf_key: i for i, shard in enumerate(shards) for hf_key in shard}

    staging = _prepare_out(out)
    log(
        f"exporting {folder} (iteration {step}) to {out}: {len(sizes)} tensors, {len(shards)} shard(s), {dtype}"
    )
    try:
        total = _write_shards(tensors, plan, staging, names, shard_of, DTYPES[dtype], log, allow_huge_weights)
        weight_map = {hf_key: names[shard_of[hf_key]] for hf_key, _ in sizes}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = generation_config(hf_config, base_generation)
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_pretrained(str(staging))
        replace_folder(staging, out)
    except OSError as error:  # e.g. the disk filled up: one line naming --out, and nothing half-written
        shutil.rmtree(staging, ignore_errors=True)
        if error.filename is not None and not str(error.filename).startswith((str(staging), str(out))):
            raise  # not a write into --out (e.g. a file read on the way): its own message
        raise RecipeError(
            f"--out: writing {out} failed ({error.strerror or error}); nothing was written"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays behind
        raise
    log(f"wrote {out}: {total / 2**20:.1f} MiB of weights")
    return ExportSummary(out, step, len(sizes), len(shards), total)


def _numel(shape: tuple[int | None, ...], vocab: int) -> int:
    return math.prod(vocab if width is None else width for width in shape)


# Trained weights stay far below this (norm scales reach the hundreds at most); above it the run has
# diverged, e.g. one finite but huge update before the non-finite steps that stopped it.
SUSPICIOUS_MAGNITUDE = 1e6


def _converted(tensors: _SliceReader, plan: dict) -> Iterator[tuple[str, str, Tensor]]:
    """(Megatron name, HF name, tensor) in the plan's order, one Megatron tensor (or layer slice) read at a time."""
    for megatron_key, conversion in plan.items():
        key, layer = _stacked_key(megatron_key)
        parts = conversion.split(tensors.read(key, layer))
        for hf_key, part, shape in zip(conversion.hf_keys, parts, conversion.shapes):
            if any(w is not None and w != h for w, h in zip(shape, part.shape)):
                raise RecipeError(
                    f"checkpoint tensor {megatron_key} gives {hf_key} of shape {tuple(part.shape)}, "
                    f"but the model section needs {shape}"
                )
            yield megatron_key, hf_key, part


def _finite(
    megatron_key: str, hf_key: str, stored: Tensor, cast: Tensor, log, allow_huge: bool = False
) -> None:
    """Refuses a tensor with inf/NaN (as stored, or after the cast to the export dtype), or with values
    beyond ``SUSPICIOUS_MAGNITUDE`` unless ``allow_huge`` (then a warning)."""
    if not torch.isfinite(stored).all():
        bad = int((~torch.isfinite(stored)).sum())
        raise RecipeError(
            f"the checkpoint's tensor {megatron_key} ({hf_key}) holds {bad} non-finite value(s): the run "
            "diverged before this save; export an earlier iteration (--iteration N)"
        )
    if not torch.isfinite(cast).all():
        raise RecipeError(
            f"the checkpoint's tensor {megatron_key} ({hf_key}) overflows {cast.dtype} (largest magnitude "
            f"{stored.abs().max().item():.3g}); export with --dtype fp32 or bf16, or an earlier iteration"
        )
    largest = stored.abs().max().item() if stored.numel() else 0.0
    if largest > SUSPICIOUS_MAGNITUDE:
        if not allow_huge:
            raise RecipeError(
                f"the checkpoint's tensor {megatron_key} ({hf_key}) has values up to {largest:.3g}, far "
                f"beyond any trained model's (bound {SUSPICIOUS_MAGNITUDE:g}): the run diverged before this "
                "save; export an earlier iteration (--iteration N), or pass --allow-huge-weights to export it"
            )
        log(f"warning: {hf_key} has values up to {largest:.3g} (exported: --allow-huge-weights)")


def _write_shards(tensors, plan, staging: Path, names, shard_of, dtype, log, allow_huge: bool) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    buffer: dict[str, Tensor] = {}
    current, total = 0, 0

    def flush() -> None:
        path = staging / names[current]
        try:
            save_file(buffer, str(path), metadata={"format": "pt"})
        except SafetensorError as error:  # a full disk arrives as this, not as an OSError
            raise OSError(errno.EIO, str(error), str(path)) from None
        log(f"  {names[current]}: {len(buffer)} tensors")
        buffer.clear()

    for megatron_key, hf_key, tensor in _converted(tensors, plan):
        if shard_of[hf_key] != current:
            flush()
            current = shard_of[hf_key]
        # A copy: split parts are views of one tensor, and safetensors refuses tensors that share storage.
        buffer[hf_key] = tensor.to(dtype=dtype, copy=True).contiguous()
        _finite(megatron_key, hf_key, tensor, buffer[hf_key], log, allow_huge)
        total += buffer[hf_key].numel() * buffer[hf_key].element_size()
    flush()
    return total
