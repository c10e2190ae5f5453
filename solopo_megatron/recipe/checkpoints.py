"""Checkpoint folders judged from their files alone, before any process group exists.

A run's ``checkpoint.save`` folder (written by ``megatron.checkpoint``)::

    iter_0000100/                       one dist_checkpointing checkpoint: metadata.json, shards (and
                                        common.pt before megatron-core 0.19)
    latest_checkpointed_iteration.txt   the step of the checkpoint to resume from
    config.yaml                         the recipe the run was started with (its model: section is checked)
    solopo-train.lock                   host and pid of the run writing the folder (while it runs)

``checkpoint_problems(cfg)`` names every problem that would otherwise surface as a traceback mid-run
(or silently overwrite checkpoints), each with the path and what to do. The lock helpers here only
read; ``megatron.checkpoint`` takes and releases the lock.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

from ..data.files import nearest_existing
from ..objectives import SoLoPOConfig, required_roles
from .hf_config import effective_value
from .preflight import folder_problem
from .schema import LAYOUT_MODEL_KEYS, ModelSection, RecipeConfig

LATEST = "latest_checkpointed_iteration.txt"
CONFIG = "config.yaml"
LOCK = "solopo-train.lock"
_ITER = re.compile(r"iter_(\d+)")

# model.* keys a resumed run may change: the parallel layout and how the same weights are computed
# (dropout, recomputation, attention implementation, precision, initialisation, which a resume replaces).
RESUMABLE_MODEL_KEYS = LAYOUT_MODEL_KEYS | frozenset(
    {
        "transformer_impl",
        "attention_backend",
        "logits",
        "bf16",
        "use_cpu_initialization",
        "init_method_std",
        "attention_dropout",
        "hidden_dropout",
    }
)


def iter_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` lives under ``root``."""
    return Path(root) / f"iter_{step:07d}"


def iteration_folders(root: Path) -> list[Path]:
    """``root``'s ``iter_<step>`` folders (not the ``.tmp`` of an unfinished save), oldest first."""
    found = [p for p in root.glob("iter_*") if _ITER.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len("iter_") :]))


def damage(path: Path) -> str | None:
    """Why ``path`` is not a complete dist_checkpointing checkpoint (a phrase), or None if it is.

    The common state (iteration, RNG, our ``common`` dict) is ``common.pt`` up to megatron-core 0.18 and
    the ``common_state`` entry of the torch_dist shards from 0.19; either is accepted, whichever the
    checkpoint's own ``.metadata`` says it has."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder"
    metadata = path / "metadata.json"
    if not metadata.is_file():
        return "has no metadata.json (an unfinished or damaged save)"
    try:
        backend = json.loads(metadata.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError):
        return "has an unreadable metadata.json (a damaged save)"
    torch_dist = backend == "torch_dist"
    if torch_dist and not (path / ".metadata").is_file():
        return "has no .metadata (an unfinished or damaged save)"
    shards = _read_shard_metadata(path) if torch_dist else None
    if isinstance(shards, str):
        return shards
    common = path / "common.pt"
    if common.is_file():
        if (problem := _common_problem(common)) is not None:
            return problem
    elif shards is None or not any(key.startswith("common_state") for key in shards.state_dict_metadata):
        return "has no common.pt (an unfinished or damaged save)"
    return _shards_problem(path, shards) if shards is not None else None


def _common_problem(common: Path) -> str | None:
    """A ``common.pt`` written as a zip archive (torch.save's format) whose end is cut off."""
    with common.open("rb") as handle:
        is_zip_format = handle.read(4) == b"PK\x03\x04"
    if is_zip_format and not zipfile.is_zipfile(common):
        return f"has a truncated common.pt ({common.stat().st_size} bytes; a damaged save)"
    return None


def _read_shard_metadata(path: Path):
    """torch.distributed.checkpoint's ``Metadata`` of a torch_dist checkpoint, or the problem (a phrase)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # a pickle cut short raises EOFError, UnpicklingError, ...
        return f"has an unreadable .metadata ({type(error).__name__}; a damaged save)"


def _shards_problem(path: Path, metadata) -> str | None:
    """Every file the checkpoint's ``.metadata`` lists is there and reaches the end of its last item."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            return f"is missing {name}, a shard its .metadata lists (an unfinished or damaged save)"
        if (size := shard.stat().st_size) < end:
            return f"has a truncated {name} ({size} bytes, its .metadata needs {end}; a damaged save)"
    return None


def _complete(root: Path) -> list[Path]:
    return [p for p in iteration_folders(root) if damage(p) is None]


def how_to_resume(root: Path, key: str) -> str:
    """What to do when ``root``'s latest cannot be used: resume from (``--checkpoint``, solopo-export:
    export) its newest complete checkpoint, or start afresh elsewhere."""
    latest = root / LATEST
    complete = _complete(root)
    afresh = (
        "point checkpoint.save at a new folder to start afresh"
        if key == "checkpoint.save"
        else "point checkpoint.load at another checkpoint"
    )
    if not complete:
        if key == "--checkpoint":
            return (
                f"no complete checkpoint is left in {root}: restore the missing or truncated file from a copy"
            )
        return f"no complete checkpoint is left in {root}: {afresh}"
    newest = complete[-1]
    step = int(newest.name[len("iter_") :])
    if key == "--checkpoint":  # solopo-export
        return f"the newest complete checkpoint is {newest.name}: export it with --iteration {step}"
    return (
        f"to resume from the newest complete checkpoint, `echo {step} > {latest}` "
        f"(or set checkpoint.load={newest}); or {afresh}"
    )


def resolve_resume(root: str | Path, key: str, *, required: bool) -> tuple[Path | None, str | None]:
    """(the checkpoint a run with ``key`` = ``root`` resumes from, or None; the problem, or None).

    ``root`` is a run's checkpoint folder (resumed from its ``latest``) or one ``iter_*`` folder.
    ``required``: a folder without any checkpoint is a problem (``checkpoint.load``), else a fresh start.
    """
    root = Path(root)
    if not root.exists():
        return None, (f"{key}: {root} does not exist" if required else None)
    if not root.is_dir():
        return None, (
            f"{key}: {root} is a file; point {key} at a checkpoint folder "
            "(a run's checkpoint.save or one of its iter_* folders)"
        )
    if (root / "metadata.json").exists() or _ITER.fullmatch(root.name):  # one checkpoint itself
        reason = damage(root)
        if reason is None:
            return root, None
        return (
            None,
            f"{key}: {root} {reason}; point {key} at a complete checkpoint ({_available(root.parent)})",
        )
    latest = root / LATEST
    if latest.exists():
        try:
            text = latest.read_text()
        except OSError as error:
            return None, f"{key}: cannot read {latest} ({error.strerror}); fix its permissions"
        try:
            step = int(text.strip())
        except ValueError:
            shown = text.strip()[:40]
            return None, (
                f"{key}: {latest} is corrupt (it holds {shown!r}, not a step number); "
                + how_to_resume(root, key)
            )
        path = iter_dir(root, step)
        reason = damage(path)
        if reason is None:
            return path, None
        return None, f"{key}: {latest} names {path.name}, which {reason}; " + how_to_resume(root, key)
    if iteration_folders(root):
        return None, orphans_problem(root, key)
    if required:
        return None, (
            f"{key}: no checkpoint in {root} (no {LATEST}, no iter_* folders); point {key} at a "
            "run's checkpoint folder or one of its iter_* folders"
        )
    return None, None


def _available(root: Path) -> str:
    complete = _complete(root) if root.is_dir() else []
    if not complete:
        return f"none is left in {root}"
    return "complete: " + ", ".join(str(p) for p in complete[-3:])


def orphans_problem(root: Path, key: str = "checkpoint.save") -> str:
    """``root`` holds ``iter_*`` folders but no latest file: refuse rather than start over there."""
    names = ", ".join(p.name for p in iteration_folders(root)[-3:])
    if key == "checkpoint.load":
        return f"{key}: {root} holds checkpoints ({names}) but no {LATEST}; " + how_to_resume(root, key)
    return (
        f"{key}: {root} holds checkpoints ({names}) but no {LATEST}, so this run would start over there "
        "and overwrite them; nothing was changed. " + how_to_resume(root, key)
    )


def save_folder_problem(save: str | Path) -> str | None:
    """``checkpoint.save`` is (or can be created as) a writable folder, or the problem."""
    path = Path(save)
    if path.exists() and not path.is_dir():
        return (
            f"checkpoint.save: {path} is a file, not a folder; point checkpoint.save at a folder "
            "(it is created if missing)"
        )
    existing, problem = nearest_existing(path)
    if problem == "is a file":
        return f"checkpoint.save: cannot create {path}: {existing} is a file; point checkpoint.save elsewhere"
    if problem is None:  # the permission bits allow it: a real write decides (read-only mounts, root)
        return folder_problem(path, "checkpoint.save")
    if problem is not None:
        what = (
            f"{path} is not writable"
            if existing == path
            else f"cannot create {path}: {existing} is not writable"
        )
        return (
            f"checkpoint.save: {what} (checkpoints, config.yaml and the run lock go there); fix its "
            f"permissions (chmod u+w {existing}) or point checkpoint.save at a writable folder"
        )
    return None


def model_problem(model: ModelSection, checkpoint: Path, key: str) -> str | None:
    """The recipe's ``model:`` against the one the checkpoint's run saved in ``config.yaml`` next to it,
    key by key (the parallel layout and other RESUMABLE_MODEL_KEYS may change), or None."""
    config = checkpoint.parent / CONFIG
    if not config.is_file():
        return None  # not written by solopo-train: nothing to compare with
    try:
        saved = (yaml.safe_load(config.read_text()) or {}).get("model")
        if not isinstance(saved, dict):
            raise ValueError("no model: section")
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as error:
        return (
            f"{key}: {config} (the saved recipe of {checkpoint.parent}) cannot be read ({error}); "
            "fix it, or remove it to resume without comparing the model"
        )
    names = {f.name for f in dataclasses.fields(ModelSection)} - RESUMABLE_MODEL_KEYS
    saved_model = ModelSection(**{k: v for k, v in saved.items() if k in names})
    differences = []
    for name in sorted(names & saved.keys()):
        if name == "rope_scaling_factor" and not (model.rope_scaling or saved_model.rope_scaling):
            continue
        have, want = effective_value(model, name), effective_value(saved_model, name)
        if not _same(have, want):
            differences.append(f"model.{name}: recipe {have!r}, checkpoint {want!r}")
    if not differences:
        return None
    afresh = (
        "point checkpoint.save at a new folder to start afresh"
        if key == "checkpoint.save"
        else "point checkpoint.load at a checkpoint of this model"
    )
    return (
        f"{key}: {checkpoint} holds another model than the recipe's ({'; '.join(differences)}; "
        f"the checkpoint's values from {config}): resume with the checkpoint's model.* values, or {afresh}"
    )


def objective_change(cfg: RecipeConfig, checkpoint: Path) -> tuple[str | None, str | None]:
    """(refusal, warning) for resuming ``checkpoint`` with ``cfg.solopo``, against the ``solopo:`` its run
    saved in ``config.yaml`` beside it (nothing to compare without one).

    Other training roles (``solopo.mode``, or ``solo_ra_chosen_only`` under solopo) are refused: the
    roles decide what the data holds, the reference store kept beside the checkpoints, and what the steps
    so far optimised. Any other loss key (``preference_loss``, ``beta``, ...) is a warning: the run
    continues with the recipe's value, from the checkpoint's weights, optimizer state and step."""
    config = checkpoint.parent / CONFIG
    try:
        saved = (yaml.safe_load(config.read_text()) or {}).get("solopo")
        before = SoLoPOConfig(
            **{f.name: saved[f.name] for f in dataclasses.fields(SoLoPOConfig) if f.name in saved}
        )
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        # No readable record of the run's objective (an unreadable config.yaml is refused before launch).
        return None, None
    now = cfg.solopo.loss_config()
    changed = [
        f.name for f in dataclasses.fields(SoLoPOConfig) if getattr(before, f.name) != getattr(now, f.name)
    ]
    if not changed:
        return None, None

    def described(c: SoLoPOConfig, keys: list[str]) -> str:
        return ", ".join(f"solopo.{key}={_yaml_value(getattr(c, key))}" for key in keys)

    if required_roles(before) != required_roles(now):  # mode, or solo_ra_chosen_only under solopo
        role_keys = ["mode"] + (["solo_ra_chosen_only"] if "solo_ra_chosen_only" in changed else [])
        key = "solopo.mode" if "mode" in changed else "solopo.solo_ra_chosen_only"
        refusal = (
            f"{key}: {checkpoint} was trained with {described(before, role_keys)} (roles "
            f"{', '.join(required_roles(before))}; from {config}), this recipe has "
            f"{described(now, role_keys)} (roles {', '.join(required_roles(now))}), and a run cannot change "
            f"the roles it trains on: resume with {described(before, role_keys)}, or train {now.mode} in a "
            "new checkpoint.save folder (from these weights: solopo-export, then checkpoint.pretrained_hf)"
        )
        return refusal, None
    return None, (
        f"warning: {checkpoint} was trained with {described(before, changed)} (from {config}); this run "
        f"continues it with {described(now, changed)}"
    )


def _yaml_value(value: object) -> str:
    """A recipe value as an override would write it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, float) or isinstance(want, float):
        try:
            return math.isclose(float(have), float(want), rel_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return have == want


# ----------------------------------------------------------------------------- the run lock


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner (``host``, ``pid``, ``start``, ``since``), ``{}`` if unreadable, None if absent."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished


def this_process() -> dict[str, Any]:
    """What a lock taken by this process records (and the SLURM job, so a requeued job may take it over)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": process_start(os.getpid()),
        "job": os.environ.get("SLURM_JOB_ID"),
    }


def is_ours(owner: dict[str, Any]) -> bool:
    me = this_process()
    return owner.get("host") == me["host"] and owner.get("pid") == me["pid"]


UNREADABLE_LOCK_GRACE_S = 60  # a lock being written is unreadable for a moment; longer means abandoned


def is_stale(owner: dict[str, Any], lock: Path | None = None) -> bool:
    """The owner is gone: it ran on this host and its process ended (or its pid now belongs to another
    process), or it belonged to this same SLURM job (a requeued job restarts, maybe on another node),
    or the lock has been unreadable for a minute (its writer died mid-write). Owners on other hosts
    cannot be checked from here: they count as alive."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("job") == job:
        return True
    if not owner:
        try:
            return lock is not None and time.time() - lock.stat().st_mtime > UNREADABLE_LOCK_GRACE_S
        except OSError:
            return False
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid <= 0:
        return True  # no process has that pid: a broken lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    start = process_start(pid)
    if os.path.exists("/proc/self/stat") and start is None:
        return True  # a zombie: it has finished
    return owner.get("start") is not None and start is not None and start != owner["start"]


def busy_message(lock: Path, owner: dict[str, Any]) -> str:
    """The refusal when another run holds ``lock``."""
    if not owner:
        who = "another run (the lock file is unreadable)"
    else:
        since = f", since {owner['since']}" if owner.get("since") else ""
        who = f"another run (host {owner.get('host')}, pid {owner.get('pid')}{since})"
    return (
        f"checkpoint.save: {lock.parent} is in use by {who}: two runs writing the same checkpoints "
        f"would overwrite each other. Wait for that run to end, or point checkpoint.save at another "
        f"folder; if that run is gone (e.g. its node was lost), delete {lock}"
    )


def lock_problem(save: str | Path) -> str | None:
    """A live lock of another run in ``save`` (checked again, and taken, at process-group start)."""
    lock = Path(save) / LOCK
    owner = read_lock(lock)
    if owner is None or is_ours(owner) or is_stale(owner, lock):
        return None
    return busy_message(lock, owner)


# ----------------------------------------------------------------------------- all of them


def checkpoint_problems(
    cfg: RecipeConfig, *, check_lock: bool = True, check_objective: bool = True
) -> list[str]:
    """Every problem of ``checkpoint.save`` / ``checkpoint.load`` visible from files, each naming the
    path and what to do: an unusable save folder, a corrupt or dangling latest file, a damaged
    checkpoint, checkpoints without a latest file (which a fresh start would overwrite), a checkpoint
    of another model or (``check_objective``: training resumes it) trained on other roles, a folder
    another live run is writing."""
    c = cfg.checkpoint
    problems: list[str] = []
    save_ok = False
    if c.save is not None:
        problem = save_folder_problem(c.save)
        if problem is not None:
            problems.append(problem)
        else:
            save_ok = True
    if c.load is not None:
        key, root, required = "checkpoint.load", Path(c.load), True
        if not root.exists():
            root = None  # reported by path_problems
    else:
        key, root, required = "checkpoint.save", Path(c.save) if save_ok else None, False
    if root is not None:
        checkpoint, problem = resolve_resume(root, key, required=required)
        if problem is None and checkpoint is not None:
            problem = model_problem(cfg.model, checkpoint, key)
        if problem is None and checkpoint is not None and check_objective:
            problem = objective_change(cfg, checkpoint)[0]
        if problem is not None:
            problems.append(problem)
    if save_ok:
        save = Path(c.save)
        # With checkpoint.load elsewhere, checkpoints in save without a latest would still be overwritten.
        if (
            c.load is not None
            and save.is_dir()
            and not (save / LATEST).exists()
            and iteration_folders(save)
            and not _inside(Path(c.load), save)
        ):
            problems.append(orphans_problem(save))
        if check_lock and (problem := lock_problem(save)) is not None:
            problems.append(problem)
    return problems


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
