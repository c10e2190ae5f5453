"""The reference pass: per-sequence log-prob sums of the initial weights, stored once per (data, seed)
and reused by every run (``solopo-ref-logps`` writes it ahead of time; training computes it when missing).

Where the store lives is one rule, ``recipe.sources.resolve_reference_store``; this module computes,
loads, and keeps a copy next to a run's checkpoints (so a resumed run trains against its original store).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ..data.dataset import TokenizedDataset
from ..data.records import ROLES
from ..data.reference_store import ReferenceStore, load_reference_store
from ..recipe.errors import RecipeError
from ..recipe.schema import RecipeConfig
from ..recipe.sources import (
    REFERENCE_COPY,
    combined_fingerprint,
    reference_store_target,
    resolve_reference_store,
)
from .inputs import Data
from .scoring import score_dataset
from .step import StepContext


def reference_fingerprint(data: Data) -> str:
    """The fingerprint a store for this run's (tokenised) train and valid data carries."""
    return combined_fingerprint(data.train.fingerprint, data.valid.fingerprint if data.valid else None)


def reference_datasets(data: Data) -> list[tuple[TokenizedDataset, tuple[str, ...]]]:
    """What the store covers: the training roles of the train set, every role of the valid set."""
    return [(data.train, data.roles)] + ([(data.valid, ROLES)] if data.valid else [])


def reference_store_path(cfg: RecipeConfig, data: Data) -> Path:
    """Where this run reads its store, or writes it when none exists yet."""
    path = resolve_reference_store(cfg, reference_fingerprint(data))
    assert path is not None  # with a fingerprint, the default cache path always resolves
    return path


def compute_reference_store(
    ctx: StepContext,
    chunks: list,
    data: Data,
    *,
    batch_size: int,
    path: str | Path,
    fingerprint: str,
    datasets: list[tuple[TokenizedDataset, tuple[str, ...]]] | None = None,
) -> ReferenceStore:
    """Per-sequence log-prob sums of the current weights over ``datasets`` (default
    ``reference_datasets(data)``), written to ``path`` by the logging rank and loaded back on every rank."""
    store = ReferenceStore(ROLES, data_fingerprint=fingerprint, info={"source": "initial weights"})
    for dataset, roles in datasets if datasets is not None else reference_datasets(data):
        scores = score_dataset(ctx, chunks, data, dataset, roles, batch_size=batch_size)
        for example_id, (sums, _) in (scores or {}).items():  # scores: the logging rank only
            store.add(example_id, sums)
    if ctx.parallel.is_logging_rank:
        store.save(path)
    dist.barrier()
    return load_reference_store(path, data_fingerprint=fingerprint)


def ensure_reference_store(
    cfg: RecipeConfig,
    ctx: StepContext,
    chunks: list,
    data: Data,
    log: Callable[[str], None],
    *,
    weights_are_initial: bool = True,
) -> ReferenceStore | None:
    """The store the loss needs (None when it needs none): loaded where ``resolve_reference_store``
    finds it, else computed from the current (initial) weights when the recipe allows.

    ``weights_are_initial=False`` (a resumed run that started from ``checkpoint.pretrained_hf``: the
    model holds the seeded random init until the checkpoint loads; e.g. a simpo run resumed with dpo)
    makes a missing store an error rather than a store of the wrong weights."""
    if not cfg.solopo.loss_config().needs_reference:
        return None
    fingerprint = reference_fingerprint(data)
    path = reference_store_path(cfg, data)
    if path.exists():
        return load_reference_store(path, data_fingerprint=fingerprint)
    if not weights_are_initial:
        raise RecipeError(
            f"solopo.reference_store: dpo needs the initial weights' log-probs ({path}), and this run resumes "
            "a checkpoint that started from checkpoint.pretrained_hf, whose weights are not loaded here: "
            "write the store first with solopo-ref-logps and this recipe (it scores checkpoint.pretrained_hf)"
        )
    if not cfg.solopo.compute_reference_if_missing:
        raise RecipeError(
            f"solopo.reference_store: {path} does not exist (run solopo-ref-logps, or set "
            "solopo.compute_reference_if_missing=true)"
        )
    log(f"computing reference log-probs from the initial weights -> {path}")
    return compute_reference_store(
        ctx, chunks, data, batch_size=cfg.train.global_batch_size, path=path, fingerprint=fingerprint
    )


def keep_reference_with_checkpoints(
    store: ReferenceStore | None, root: str | Path, name: str = REFERENCE_COPY
) -> None:
    """Copies the store a run trains (or evaluates) against into its checkpoint root once as ``name``
    (call on one rank)."""
    root = Path(root)
    if store is None or (root / name).exists():
        return
    tmp = root / f"{name}.tmp"
    try:
        shutil.copyfile(store.path, tmp)
        os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed copy (disk full) leaves no partial file behind
        raise


def write_reference_store(cfg: RecipeConfig, ctx: StepContext, chunks: list, data: Data) -> tuple[Path, int]:
    """``solopo-ref-logps``: computes the store from the current weights into ``solopo.reference_store``
    (else the default cache path, where a run finds it); returns its path and the number of examples."""
    path = reference_store_target(cfg, reference_fingerprint(data))
    assert path is not None  # with a fingerprint, the default cache path always resolves
    store = compute_reference_store(
        ctx,
        chunks,
        data,
        batch_size=cfg.train.global_batch_size,
        path=path,
        fingerprint=reference_fingerprint(data),
    )
    return path, len(store)
