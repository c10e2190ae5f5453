"""Forward-only scoring of a dataset: every example's per-sequence response log-prob sums, under the
run's TP/PP/CP/DP layout (the reference pass and the long-context evaluation both use it)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..data.dataset import TokenizedDataset
from .inputs import Data, step_batches
from .step import StepContext, run_schedule

# example id -> (role -> log-prob sum, role -> response tokens)
Scores = dict[str, tuple[dict[str, float], dict[str, int]]]


def score_dataset(
    ctx: StepContext,
    chunks: list,
    data: Data,
    dataset: TokenizedDataset,
    roles: tuple[str, ...],
    *,
    batch_size: int,
) -> Scores | None:
    """Every example's sums of ``dataset``, in global batches of ``batch_size`` examples; collective.

    Returned on the logging rank (the last stage's first replica: it gathers its DP peers' examples),
    None on every other rank."""
    parallel = ctx.parallel
    ctx = dataclasses.replace(ctx, forward_only_logps=True)
    entries: list[tuple[str, dict[str, float], dict[str, int]]] = []
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(start + batch_size, len(dataset))))
            mbs = step_batches(data, dataset, indices, roles, parallel, None)
            reports = run_schedule(ctx, chunks, mbs, seq_length=data.max_tokens, forward_only=True)
            for mb, report in zip(mbs, reports):
                sums = report["sequence_logps"].cpu()
                counts = mb.num_response_tokens.cpu()
                for g, example_id in enumerate(mb.example_ids):
                    if mb.valid[g]:
                        entries.append(
                            (
                                example_id,
                                dict(zip(roles, sums[g].tolist())),
                                dict(zip(roles, counts[g].tolist())),
                            )
                        )
    for chunk in chunks:
        chunk.train()
    if not (parallel.is_last_stage and parallel.tp_rank == 0 and parallel.cp_rank == 0):
        return None
    gathered: list = [entries]
    if parallel.dp_group is not None:
        gathered = [None] * parallel.dp
        dist.all_gather_object(gathered, entries, group=parallel.dp_group)
    if parallel.dp_rank != 0:
        return None
    return {example_id: (sums, counts) for part in gathered for example_id, sums, counts in part}
