"""The reference pass: per-sequence log-prob sums of the initial weights, stored once per (data, seed)
and reused by every run (``solopo-ref-logps`` writes it ahead of time; training computes it when missing).

Where the store lives is one rule, ``recipe.sources.resolve_reference_store``; this module computes,
loads, and keeps a copy next to a run's checkpoints (so a resumed run trains against its original store).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
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
from .inputs import Data, step_batches
from .step import StepContext, run_schedule


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
    ctx: StepContext, chunks: list, data: Data, *, batch_size: int, path: str | Path, fingerprint: str
) -> ReferenceStore:
    """Per-sequence log-prob sums of the current weights over ``reference_datasets(data)``, written to
    ``path`` (by the logging replica's last stage) and loaded back on every rank."""
    parallel = ctx.parallel
    ctx = dataclasses.replace(ctx, forward_only_logps=True)
    entries: list[tuple[str, dict[str, float]]] = []
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        for dataset, roles in reference_datasets(data):
            for start in range(0, len(dataset), batch_size):
                indices = list(range(start, min(start + batch_size, len(dataset))))
                mbs = step_batches(data, dataset, indices, roles, parallel, None)
                reports = run_schedule(ctx, chunks, mbs, seq_length=data.max_tokens, forward_only=True)
                for mb, report in zip(mbs, reports):
                    sums = report["sequence_logps"].cpu()
                    for g, example_id in enumerate(mb.example_ids):
                        if mb.valid[g]:
                            entries.append((example_id, dict(zip(roles, sums[g].tolist()))))
    for chunk in chunks:
        chunk.train()
    if parallel.is_last_stage and parallel.tp_rank == 0 and parallel.cp_rank == 0:
        gathered: list = [entries]
        if parallel.dp_group is not None:
            gathered = [None] * parallel.dp
            dist.all_gather_object(gathered, entries, group=parallel.dp_group)
        if parallel.dp_rank == 0:
            store = ReferenceStore(ROLES, data_fingerprint=fingerprint, info={"source": "initial weights"})
            for part in gathered:
                for example_id, sums in part:
                    store.add(example_id, sums)
            store.save(path)
    dist.barrier()
    return load_reference_store(path, data_fingerprint=fingerprint)


def ensure_reference_store(
    cfg: RecipeConfig, ctx: StepContext, chunks: list, data: Data, log: Callable[[str], None]
) -> ReferenceStore | None:
    """The store the loss needs (None when it needs none): loaded where ``resolve_reference_store``
    finds it, else computed from the current (initial) weights when the recipe allows."""
    if not cfg.solopo.loss_config().needs_reference:
        return None
    fingerprint = reference_fingerprint(data)
    path = reference_store_path(cfg, data)
    if path.exists():
        return load_reference_store(path, data_fingerprint=fingerprint)
    if not cfg.solopo.compute_reference_if_missing:
        raise RecipeError(
            f"solopo.reference_store: {path} does not exist (run solopo-ref-logps, or set "
            "solopo.compute_reference_if_missing=true)"
        )
    log(f"computing reference log-probs from the initial weights -> {path}")
    return compute_reference_store(
        ctx, chunks, data, batch_size=cfg.train.global_batch_size, path=path, fingerprint=fingerprint
    )


def keep_reference_with_checkpoints(store: ReferenceStore | None, root: str | Path) -> None:
    """Copies the store a run trains against into its checkpoint root once (call on one rank)."""
    root = Path(root)
    if store is None or (root / REFERENCE_COPY).exists():
        return
    tmp = root / f"{REFERENCE_COPY}.tmp"
    try:
        shutil.copyfile(store.path, tmp)
        os.replace(tmp, root / REFERENCE_COPY)
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
