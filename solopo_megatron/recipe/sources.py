"""Where a recipe's data comes from, how it is encoded, and the fingerprint a reference store must carry.

Shared by the trainer and by recipe validation, which checks a reference store against the data
before any process group exists (hashing the files and loading the tokenizer; nothing is tokenised).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from ..data.dataset import data_fingerprint
from ..data.records import ROLES
from ..data.tokenize import LengthLimits, PromptFormat, SequenceEncoder, load_tokenizer
from ..objectives import required_roles
from .errors import RecipeError
from .schema import LAYOUT_MODEL_KEYS, DatasetSection, RecipeConfig


def cache_dir(cfg: RecipeConfig) -> Path:
    """``dataset.cache_dir``, else ``$SOLOPO_CACHE_DIR`` as set now (default ~/.cache/solopo_megatron)."""
    if cfg.dataset.cache_dir:
        return Path(cfg.dataset.cache_dir)
    from_env = os.environ.get("SOLOPO_CACHE_DIR")
    return Path(from_env) if from_env else Path.home() / ".cache" / "solopo_megatron"


def synthetic_paths(cfg: RecipeConfig) -> tuple[Path, Path]:
    """The bundled synthetic train/valid files for ``dataset.synthetic`` (keyed by its settings)."""
    spec = dataclasses.asdict(cfg.dataset.synthetic)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir(cfg) / "synthetic" / key
    return folder / "train.jsonl", folder / "valid.jsonl"


def write_synthetic_files(cfg: RecipeConfig) -> None:
    """Materialises the synthetic files if missing (deterministic; call from one rank). A write that
    fails (a full disk) is a DataError naming the file and leaves nothing half-written."""
    from ..data.files import cache_file, remove_stale_scratch
    from ..data.synthetic import generate_synthetic_records, write_json_lines

    s = cfg.dataset.synthetic
    for path, count, seed, prefix in zip(
        synthetic_paths(cfg), (s.num_train, s.num_valid), (s.seed, s.seed + 1), ("train", "valid")
    ):
        remove_stale_scratch(path.parent)  # a killed writer's file, in this older naming too: train.tmp-PID
        if path.exists():
            continue
        records = generate_synthetic_records(
            count,
            seed=seed,
            long_target_words=s.long_target_words,
            id_prefix=prefix,
            facts_per_context=s.facts_per_context,
            rejected_kinds=tuple(s.rejected_kinds),
        )
        with cache_file(path, "the synthetic data") as handle:
            write_json_lines(records, handle)


def data_paths(cfg: RecipeConfig) -> tuple[str, str | None]:
    """(train, valid) files: the recipe's, or the synthetic ones when ``dataset.train_path`` is unset."""
    ds = cfg.dataset
    if ds.train_path is not None:
        return ds.train_path, ds.valid_path
    train, valid = synthetic_paths(cfg)
    return str(train), ds.valid_path or str(valid)


def sequence_encoder(ds: DatasetSection) -> SequenceEncoder:
    """The tokenizer, prompt format and length limits of the dataset section."""
    return SequenceEncoder(
        load_tokenizer(ds.tokenizer, label="dataset.tokenizer"),
        PromptFormat(prompt_template=ds.prompt_template, system=ds.system_prompt),
        LengthLimits(ds.max_short_length, ds.max_long_length, ds.truncate_long_context),
    )


def model_vocab_size(
    cfg: RecipeConfig, tokenizer_size: int | None, pretrained_rows: int | None = None
) -> int | None:
    """Embedding rows before Megatron's padding: model.vocab_size, else the larger of the tokenizer's size
    and the pretrained checkpoint's rows (Qwen2.5: 152064 rows for 151665 tokens); None if neither is known.

    ``pretrained_rows``: the checkpoint's rows when the caller has them (solopo-export reads the config a
    run kept); else they are read from ``checkpoint.pretrained_hf``'s config.json, if it is there."""
    if cfg.model.vocab_size is not None:
        if tokenizer_size is not None and cfg.model.vocab_size < tokenizer_size:
            raise RecipeError(
                f"model.vocab_size: {cfg.model.vocab_size} is below the tokenizer's {tokenizer_size} tokens"
            )
        return cfg.model.vocab_size
    sizes = [tokenizer_size, pretrained_rows]
    hf = cfg.checkpoint.pretrained_hf
    if pretrained_rows is None and hf and (Path(hf) / "config.json").is_file():
        from .hf_config import vocab_size_from_hf_config

        sizes.append(vocab_size_from_hf_config(hf))
    known = [size for size in sizes if size is not None]
    return max(known) if known else None


def combined_fingerprint(train_fingerprint: str, valid_fingerprint: str | None) -> str:
    """The fingerprint a reference store for this train (+ valid) data carries."""
    return hashlib.sha256(f"{train_fingerprint}|{valid_fingerprint or ''}".encode()).hexdigest()[:24]


def expected_reference_fingerprint(cfg: RecipeConfig) -> str | None:
    """The reference store fingerprint this recipe's data needs; None while the data files do not exist yet."""
    train, valid = data_paths(cfg)
    if not Path(train).is_file() or (valid is not None and not Path(valid).is_file()):
        return None
    encoder = sequence_encoder(cfg.dataset)
    roles = required_roles(cfg.solopo.loss_config())
    # Validation forwards every role, so long-context accuracy is measured even in chosen-only mode.
    valid_fp = data_fingerprint(valid, encoder, ROLES) if valid else None
    return combined_fingerprint(data_fingerprint(train, encoder, roles), valid_fp)


REFERENCE_COPY = "reference_logps.jsonl"  # a checkpoint root's copy of the store its run trained against


def initial_model_fingerprint(cfg: RecipeConfig) -> str:
    """Identifies the initial weights a reference pass scores: the model section (but its layout keys:
    the initial weights are the same on every layout), the pretrained checkpoint and the seed."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in LAYOUT_MODEL_KEYS}
    spec = {"model": model, "pretrained_hf": cfg.checkpoint.pretrained_hf, "seed": cfg.rng.seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_reference_store_path(cfg: RecipeConfig, fingerprint: str) -> Path:
    """Where a run without ``solopo.reference_store`` keeps its store: the cache, keyed by the data and
    by the initial weights (so recipes with other models never share a store)."""
    return cache_dir(cfg) / "reference" / f"{fingerprint}-{initial_model_fingerprint(cfg)}.jsonl"


def reference_store_target(cfg: RecipeConfig, fingerprint: str | None = None) -> Path | None:
    """Where ``solopo-ref-logps`` writes a store: ``solopo.reference_store``, else the default cache
    path of this data (None while the data files do not exist yet). Never a checkpoint's copy: that
    one belongs to the run that trained against it."""
    if cfg.solopo.reference_store:
        return Path(cfg.solopo.reference_store)
    if fingerprint is None:
        fingerprint = expected_reference_fingerprint(cfg)
    return default_reference_store_path(cfg, fingerprint) if fingerprint is not None else None


def resolve_reference_store(cfg: RecipeConfig, fingerprint: str | None = None) -> Path | None:
    """The reference store a run reads, or the path where it writes one when none exists yet.

    In order: ``solopo.reference_store`` (or, when unset, the default cache path of this data) if it
    exists; else a checkpoint root's copy (a resumed run keeps its original reference); else the
    first candidate, to be written. ``fingerprint`` is the data's (``combined_fingerprint``); None
    computes it from the files (hashing them and loading the tokenizer); it stays None while the
    data files do not exist yet, and then an unset ``solopo.reference_store`` resolves to None.
    The trainer, ``solopo-ref-logps`` and the validation before launch all call this one rule.
    """
    if fingerprint is None and not cfg.solopo.reference_store:
        fingerprint = expected_reference_fingerprint(cfg)
    if cfg.solopo.reference_store:
        candidate: Path | None = Path(cfg.solopo.reference_store)
    else:
        candidate = default_reference_store_path(cfg, fingerprint) if fingerprint is not None else None
    if candidate is not None and candidate.exists():
        return candidate
    for root in (cfg.checkpoint.load, cfg.checkpoint.save):
        if root and (Path(root) / REFERENCE_COPY).exists():
            return Path(root) / REFERENCE_COPY
    return candidate
