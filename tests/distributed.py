"""Run a function on N gloo processes on this CPU machine (the multi-rank tests' harness)."""

from __future__ import annotations

import datetime
import functools
import os
import tempfile
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, gpu: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not gpu:
        # Before CUDA initialises in this rank: gloo ranks build everything on the CPU, also on a GPU machine.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, gpu: bool = False) -> None:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; re-raise any failure.

    ``fn`` must be importable by module name (define it at module level). The ranks see no GPU unless
    ``gpu`` (one rank on CUDA: a single GPU cannot serve several NCCL ranks, and gloo takes CPU tensors).
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _entry, args=(world_size, os.path.join(tmp, "store"), fn, args, gpu), nprocs=world_size, join=True
        )


def grid_groups(tp: int, cp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup, int, int]:
    """TP and CP groups of a tp x cp grid (TP fastest, as in Megatron): (tp_group, cp_group, tp_rank, cp_rank).

    Every rank must call this, in the same order, since new_group is collective.
    """
    rank = dist.get_rank()
    tp_group = cp_group = None
    for c in range(cp):
        group = dist.new_group([c * tp + t for t in range(tp)])
        if rank // tp == c:
            tp_group = group
    for t in range(tp):
        group = dist.new_group([c * tp + t for c in range(cp)])
        if rank % tp == t:
            cp_group = group
    return tp_group, cp_group, rank % tp, rank // tp


def megatron_on_cpu(fn: Callable) -> Callable:
    """Runs ``fn`` inside solopo's CPU compatibility layer (a no-op on CUDA), as the entry points do."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from solopo_megatron.megatron import cpu_compat

        with cpu_compat.enabled():
            return fn(*args, **kwargs)

    return wrapper
