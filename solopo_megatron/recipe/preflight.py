"""Every path a run writes and every environment variable it reads, checked in one place before launch.

A mistake here would otherwise surface deep inside a rank (a traceback from ``open``, ``mkdir`` or
``int()``), after process groups, data and model have been set up. Each problem is one line naming the
recipe key or the variable, the path, and what to do. Writability is probed by creating (and removing)
a temporary file in the nearest existing folder: permission bits alone miss read-only file systems,
and root passes every permission check.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..data.files import nearest_existing
from .schema import RecipeConfig

# solopo_kernels.dispatch.BACKENDS (a test keeps them equal): the recipe layer does not import the
# kernels' dispatch, whose module imports Triton lazily and would trip the no-Triton import contract.
BACKENDS = ("auto", "triton", "torch")

# The variables a run reads (tests-only ones included): name -> what it is, for the messages and docs.
ENVIRONMENT_VARIABLES = {
    "SOLOPO_CACHE_DIR": "the cache folder when dataset.cache_dir is unset",
    "SOLOPO_KERNELS": f"the default kernel backend ({' | '.join(BACKENDS)})",
    "SOLOPO_DIST_TIMEOUT_MIN": "the collective timeout in whole minutes (>= 1)",
    "SOLOPO_FAULT_INJECT": "tests only: kill_during_save:STEP",
}
_FAULT_POINTS = ("kill_during_save",)


def folder_problem(path: str | os.PathLike, label: str) -> str | None:
    """Why ``path`` cannot be used (or created) as a writable folder, or None; ``label`` starts the line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{label}: {path} is a file, not a folder; point it at a folder (it is created if missing)"
    return _creatable(path, label, "folder")


def file_problem(path: str | os.PathLike, label: str) -> str | None:
    """Why ``path`` cannot be appended to as a file (its folder created if missing), or None."""
    path = Path(path)
    if path.is_dir():
        return f"{label}: {path} is a folder; name a file in it (e.g. {path / 'metrics.jsonl'})"
    if path.exists():
        if not os.access(path, os.W_OK):
            return f"{label}: {path} is not writable; fix its permissions or name another file"
        return None
    return _creatable(path.parent, label, "file's folder", target=path)


def _creatable(folder: Path, label: str, what: str, *, target: Path | None = None) -> str | None:
    target = target or folder
    existing, _ = nearest_existing(folder)  # its permission-bit verdict is replaced by a real write
    if not existing.is_dir():
        return f"{label}: cannot create {target}: {existing} is a file; point it elsewhere"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".solopo-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        where = "" if existing == folder else f" ({target}'s nearest existing folder)"
        return f"{label}: cannot write in {existing}{where}: {reason}; point it at a writable {what}"
    return None


def environment_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """The problems of the SOLOPO_* variables a run reads (``environ`` defaults to ``os.environ``)."""
    env = os.environ if environ is None else environ
    problems = []
    kernels = env.get("SOLOPO_KERNELS")
    if kernels is not None and kernels.strip().lower() not in BACKENDS:
        problems.append(f"SOLOPO_KERNELS: must be one of {', '.join(BACKENDS)} (or unset); got {kernels!r}")
    timeout = env.get("SOLOPO_DIST_TIMEOUT_MIN")
    if timeout is not None:
        try:
            minutes = int(timeout.strip())
        except ValueError:
            minutes = 0
        if minutes < 1:
            problems.append(
                f"SOLOPO_DIST_TIMEOUT_MIN: must be a whole number of minutes >= 1 (or unset for 30); "
                f"got {timeout!r}"
            )
    fault = env.get("SOLOPO_FAULT_INJECT")
    if fault:
        point, _, step = fault.partition(":")
        if point not in _FAULT_POINTS or not step.isdigit():
            problems.append(
                f"SOLOPO_FAULT_INJECT: tests only, must be kill_during_save:STEP (or unset); got {fault!r}"
            )
    return problems


def output_path_problems(cfg: RecipeConfig) -> list[str]:
    """The folders and files the run writes: the data cache, the metrics file, the TensorBoard folder.
    (``checkpoint.save`` is judged with the checkpoints it holds, in ``recipe.checkpoints``.)"""
    from .sources import cache_dir

    cache = cache_dir(cfg)
    if cfg.dataset.cache_dir:
        label = "dataset.cache_dir"
    elif os.environ.get("SOLOPO_CACHE_DIR"):
        label = "SOLOPO_CACHE_DIR (dataset.cache_dir is unset)"
    else:
        label = f"dataset.cache_dir (unset: the default {cache}; or set SOLOPO_CACHE_DIR)"
    problems = []
    if (problem := folder_problem(cache, label)) is not None:
        problems.append(problem)
    logger = cfg.logger
    for key in ("metrics_file", "eval_records_file"):
        path = getattr(logger, key)
        if path and (problem := file_problem(path, f"logger.{key}")):
            problems.append(problem)
    if logger.tensorboard_dir and (
        problem := folder_problem(logger.tensorboard_dir, "logger.tensorboard_dir")
    ):
        problems.append(problem)
    return problems
