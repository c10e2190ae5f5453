"""Checkpoints with megatron-core's dist_checkpointing: model, optimizer, scheduler, RNG and data position.

Layout of ``checkpoint.save``::

    iter_0000100/                   one complete sharded checkpoint (dist_checkpointing format)
    latest_checkpointed_iteration.txt
    reference_logps.jsonl           the reference store the run trains against (``reference`` copies it)

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed only when every rank has finished, and
the ``latest`` file is replaced atomically after that, so a crash mid-save leaves the previous
checkpoint as the latest loadable one. Only the last ``keep_last`` checkpoints are kept. The data
position is the step: the global-batch sampler is a pure function of (seed, step).

While a run writes ``checkpoint.save``, rank 0 holds ``solopo-train.lock`` there (host, pid): a second
run on the same folder is refused, a lock left by a run that died on this host is taken over.
The checks of a folder's files (``recipe.checkpoints``) run before any process group.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..recipe.checkpoints import (
    LATEST,
    LOCK,
    busy_message,
    damage,
    is_ours,
    is_stale,
    iter_dir,
    iteration_folders,
    read_lock,
    resolve_resume,
    this_process,
)
from ..recipe.errors import RecipeError
from .build import ModelAndOptimizer
from .parallel import ParallelState

_HELD_LOCKS: list[Path] = []  # run locks this process took, removed by release_run_locks()


def latest_checkpoint(root: str | Path, key: str = "checkpoint.load") -> Path | None:
    """The checkpoint ``root/latest`` names, a checkpoint directory itself, or None (a fresh
    ``checkpoint.save``). RecipeError when it cannot be resumed from (corrupt latest, damaged
    checkpoint, checkpoints without a latest; ``checkpoint.load`` without any checkpoint)."""
    path, problem = resolve_resume(root, key, required=key == "checkpoint.load")
    if problem is not None:
        raise RecipeError(problem)
    return path


def take_run_lock(root: str | Path, rank: int, log: Callable[[str], None]) -> None:
    """Rank 0 creates ``root/solopo-train.lock`` (host, pid) or refuses a live owner's; a lock left by
    a process that died on this host is taken over (with a message). Collective: every rank calls it,
    every rank raises the same RecipeError. ``release_run_locks()`` removes it."""
    outcome: list[str | None] = [None, None]  # [refusal, note]
    if rank == 0:
        try:
            outcome = list(_take_lock(Path(root) / LOCK))
        except OSError as error:
            outcome = [f"checkpoint.save: cannot create the run lock in {root}: {error}", None]
    dist.broadcast_object_list(outcome, src=0)
    refusal, note = outcome
    if refusal is not None:
        raise RecipeError(refusal)
    if note is not None and rank == 0:
        log(note)


def _take_lock(lock: Path) -> tuple[str | None, str | None]:
    """(refusal, note). The owner's record is written to a temporary file first and hard-linked to the
    lock's name, which fails if the lock exists: of two runs starting at once only one gets it, and a
    lock is never seen half-written."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    record = lock.with_name(f".{lock.name}.{os.getpid()}.tmp")
    record.write_text(json.dumps({**this_process(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    note = None
    try:
        for _ in range(3):
            try:
                os.link(record, lock)
            except FileExistsError:
                owner = read_lock(lock)
                if owner is None:  # released meanwhile
                    continue
                if is_ours(owner):
                    return None, None
                if is_stale(owner, lock):
                    # Re-read just before removing: never delete a lock another starter has just taken.
                    if read_lock(lock) == owner:
                        lock.unlink(missing_ok=True)
                    note = (
                        f"checkpoint.save: took over the stale lock {lock} of pid {owner.get('pid')} on "
                        f"{owner.get('host')} (that process or job has ended)"
                    )
                    continue
                return busy_message(lock, owner), None
            _HELD_LOCKS.append(lock)
            return None, note
        return busy_message(lock, read_lock(lock) or {}), None
    finally:
        record.unlink(missing_ok=True)


def release_run_locks() -> None:
    """Removes the run locks this process holds (at the end of a run, also after an error or SIGINT)."""
    while _HELD_LOCKS:
        lock = _HELD_LOCKS.pop()
        owner = read_lock(lock)
        if owner is not None and is_ours(owner):
            lock.unlink(missing_ok=True)


atexit.register(release_run_locks)  # API callers that never reach the entry point's clean-up


def _metadata(distributed_optimizer: bool) -> dict | None:
    if distributed_optimizer:
        # Resharding across DP sizes; the fully sharded layouts need TE/Apex optimizers on CPU.
        return {"distrib_optim_sharding_type": "dp_reshardable"}
    return None


def _sharded_state_dict(
    state: ModelAndOptimizer, parallel: ParallelState, *, distributed_optimizer: bool, is_loading: bool
) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = state.chunks[0].module.sharded_state_dict()
    if is_loading and distributed_optimizer:
        _initialise_optimizer_state(state.optimizer)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        rng.update(cuda=torch.cuda.get_rng_state(), tracker=get_cuda_rng_tracker().get_states())
    return {
        "model": model_sd,
        "optimizer": state.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_metadata(distributed_optimizer)
        ),
        "rng": ShardedObject("rng_state", rng, (parallel.world_size,), (parallel.rank,), replica_id=0),
    }


def _initialise_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state to load into (without TE/Apex): create it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(inner, "init_state_fn", None)
        if init is None:
            continue
        init(inner.optimizer, inner.config)
        for state in inner.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def save_checkpoint(
    root: str | Path,
    step: int,
    state: ModelAndOptimizer,
    parallel: ParallelState,
    *,
    distributed_optimizer: bool,
    keep_last: int | None,
    vocab_size: int | None = None,
) -> Path:
    """Saves model, optimizer, scheduler and per-rank RNG as ``root/iter_<step>`` (atomically: written
    as ``.tmp`` and renamed once every rank is done), updates ``latest`` and prunes to ``keep_last``.
    ``vocab_size``, the true vocabulary the softmax ran over (the embedding holds Megatron's padded
    size), is kept with it. Collective: every rank calls it. Returns the checkpoint's directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iter_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if parallel.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    sharded = _sharded_state_dict(
        state, parallel, distributed_optimizer=distributed_optimizer, is_loading=False
    )
    sharded["common"] = {
        "step": step,
        "scheduler": state.scheduler.state_dict(),
        "world_size": parallel.world_size,
        "layout": parallel.sizes,
        "distributed_optimizer": distributed_optimizer,
        "vocab_size": vocab_size,
    }
    dist_checkpointing.save(sharded, str(tmp))
    _fault_injection("kill_during_save", step)
    dist.barrier()
    if parallel.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomically(root / LATEST, f"{step}\n")
        _prune(root, keep_last)
    dist.barrier()
    return final


def _fault_injection(point: str, step: int) -> None:
    """Tests simulate a crash here: SOLOPO_FAULT_INJECT=kill_during_save:STEP SIGKILLs this process."""
    if os.environ.get("SOLOPO_FAULT_INJECT") == f"{point}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int | None) -> None:
    """Keeps the newest ``keep_last`` complete checkpoints (by step number); damaged folders are not counted."""
    if not keep_last:
        return
    complete = [path for path in iteration_folders(root) if damage(path) is None]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _check_reshard(common: dict, now: dict[str, int], distributed_optimizer: bool, path: Path) -> None:
    """Model and the plain optimizer reshard across any TP/PP/CP/DP change (their sharded tensors
    carry global shapes); the distributed optimizer's ``dp_reshardable`` state only across DP and CP."""
    saved = common.get("layout")
    if saved is None or not (common.get("distributed_optimizer") and distributed_optimizer):
        return
    if (saved["tp"], saved["pp"]) != (now["tp"], now["pp"]):
        raise RecipeError(
            f"checkpoint.load: {path} holds distributed-optimizer state saved with tensor_model_parallel_size="
            f"{saved['tp']}, pipeline_model_parallel_size={saved['pp']}; this run has {now['tp']}, {now['pp']}. "
            "That state reshards across data (and context) parallel sizes only: resume with the saved tp/pp, "
            "or with optimizer.use_distributed_optimizer=false"
        )


def _check_vocab(saved: int | None, now: int | None, path: Path) -> None:
    """The softmax must keep running over the vocabulary the checkpoint was trained with; with the same
    padded embedding a changed tokenizer would otherwise move the padding boundary silently."""
    if saved is None or now is None or saved == now:
        return
    raise RecipeError(
        f"checkpoint.load: {path} was trained over a vocabulary of {saved} tokens; this run's tokenizer "
        f"and model.vocab_size give {now}. Resume with the run's own tokenizer (dataset.tokenizer) and "
        "model.vocab_size"
    )


def load_checkpoint(
    path: Path,
    state: ModelAndOptimizer,
    parallel: ParallelState,
    *,
    distributed_optimizer: bool,
    log: Callable[[str], None],
    vocab_size: int | None = None,
) -> int:
    """Restores model, optimizer, scheduler and (same layout) RNG into ``state``; returns the step to
    resume after. Refuses a checkpoint trained over another true vocabulary than ``vocab_size``.
    Collective: every rank calls it."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))["common"]
    _check_reshard(common, parallel.sizes, distributed_optimizer, path)
    _check_vocab(common.get("vocab_size"), vocab_size, path)
    sharded = _sharded_state_dict(
        state, parallel, distributed_optimizer=distributed_optimizer, is_loading=True
    )
    same_layout = common.get("layout", {}) == parallel.sizes
    if not same_layout:  # per-rank RNG states do not map onto another layout
        del sharded["rng"]
    loaded = dist_checkpointing.load(sharded, str(path))
    state.chunks[0].module.load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 distributed-optimizer main params are views of trainable params
        state.optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_steps(state.optimizer)
    state.scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        rng = loaded["rng"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and "cuda" in rng:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            torch.cuda.set_rng_state(rng["cuda"])
            get_cuda_rng_tracker().set_states(rng["tracker"])
    else:
        saved = (
            " x ".join(f"{k} {v}" for k, v in common.get("layout", {}).items())
            or f"world {common.get('world_size')}"
        )
        log(
            f"resharded from layout {saved}: model and optimizer state restored, per-rank RNG states not "
            "(they belong to the old ranks)"
        )
    return int(common["step"])


def _restore_torch_adam_steps(optimizer) -> None:
    """Without TE/Apex, megatron-core's distributed optimizer runs torch Adam, whose per-parameter
    ``step`` the dp_reshardable load overwrites with the placeholder it was given (0), although the
    saved step is in the param groups. Put the saved step back (a no-op for the other optimizers)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None or not hasattr(inner, "data_parallel_group"):  # distributed optimizer only
            continue
        for group in torch_optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = torch_optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def clean_partial_saves(root: str | Path) -> None:
    """Removes ``*.tmp`` leftovers of saves a crash interrupted (rank 0, before training)."""
    for partial in Path(root).glob("iter_*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
