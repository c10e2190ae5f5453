"""Process groups: torch.distributed start-up (torchrun or a lone process) and the one carrier of
parallel state, ``ParallelState``.

This is the only module that asks Megatron's global ``parallel_state``: it initialises the groups
once and packs them, with the sizes, ranks and device, into a ``ParallelState`` that is passed to the
model provider (``pg_collection=``), the step, the reductions and the checkpoints.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..recipe.schema import ModelSection

_LONE_PROCESS_STORE_DIRS: list[str] = []  # file stores of one-process groups, removed by destroy()


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks, device and Megatron's ``ProcessGroupCollection`` of this rank (TP fastest)."""

    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    device: torch.device
    groups: Any  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The last pipeline stage's first replica: it holds the losses and reports."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        """The tensor-parallel group, or None on one rank (the math's single-process default)."""
        return self.groups.tp if self.tp > 1 else None

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.groups.cp if self.cp > 1 else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel group without CP (replicas that see different examples), or None."""
        return self.groups.dp if self.dp > 1 else None

    @property
    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "dp": self.dp}


def check_layout(model: ModelSection, world_size: int) -> None:
    """Raises RecipeError naming every layout problem (the same checks as the recipe validation)."""
    from ..recipe.validation import RecipeError, layout_problems

    problems = layout_problems(model, world_size)
    if problems:
        raise RecipeError("invalid layout:\n" + "\n".join(f"  - {p}" for p in problems))


def init_process_group() -> None:
    """Joins the torchrun job described by the environment, or starts a one-process group (whose
    temporary rendezvous folder ``destroy()`` removes)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=int(os.environ.get("SOLOPO_DIST_TIMEOUT_MIN", "30")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        die_with_parent()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
        return
    folder = tempfile.mkdtemp(prefix="solopo-dist-")
    _LONE_PROCESS_STORE_DIRS.append(folder)
    store = os.path.join(folder, "store")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Asks Linux to send ``sig`` to this process when its parent (the torchrun agent) dies, so a
    killed launcher leaves no worker behind that could still write checkpoints while a restarted run
    resumes. Returns whether it is armed (False off Linux or without libc's prctl)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), sig)
    return True


PEERS_EXIT_GRACE_S = 30.0  # how long a rank that does not print an error waits for the one that does


def report_error(message: str, *, here: bool) -> None:
    """Says ``error: message`` once per job: on stderr where ``here`` (the rank chosen to report it; the
    process of a lone run), and under torchrun also in that worker's error file, which torchrun's failure
    summary shows instead of a link to its documentation.

    The other ranks of a job wait up to ``PEERS_EXIT_GRACE_S`` with SIGINT and SIGTERM at their default
    action: torchrun stops every worker at the first exit, so the reporting rank, exiting first, is the
    summary's root cause and is not stopped before its line is out. A rank still running after the wait
    (the reporting rank is slower, or its error is this rank's own) writes its error file, or prints the
    line where no torchrun would show it."""
    line = f"error: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not here:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        _wait_quietly(PEERS_EXIT_GRACE_S)
    if here or not error_file:
        print(line, file=sys.stderr, flush=True)
    if error_file:  # the format of torch.distributed.elastic's ErrorHandler.record_exception
        record = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        try:
            with open(error_file, "w") as handle:
                json.dump({"message": record}, handle)
        except OSError:
            pass  # the summary falls back to its generic text


def _wait_quietly(seconds: float) -> None:
    """Sleeps with SIGINT/SIGTERM at their default action (ending the process without a traceback)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in signals}
    except ValueError:  # not the main thread: handlers cannot change; sleep as they are
        previous = {}
    try:
        time.sleep(seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def init_parallel_state(model: ModelSection, seed: int) -> ParallelState:
    """Megatron's TP/PP/CP/DP groups (TP fastest) and its model-parallel RNG seeds, as one carrier.

    On a machine without CUDA the CPU compatibility layer must be entered first (``cpu_compat.enabled()``).
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    check_layout(model, dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=model.tensor_model_parallel_size,
            pipeline_model_parallel_size=model.pipeline_model_parallel_size,
            context_parallel_size=model.context_parallel_size,
        )
    initialised = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )
    wanted = (
        model.tensor_model_parallel_size,
        model.pipeline_model_parallel_size,
        model.context_parallel_size,
    )
    if (
        initialised != wanted
    ):  # an earlier initialisation in this process: its groups would not fit the recipe
        raise RuntimeError(
            f"Megatron's parallel state is already initialised with tp x pp x cp = {initialised}, the recipe "
            f"asks for {wanted}: call destroy() first"
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return ParallelState(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=model.tensor_model_parallel_size,
        pp=model.pipeline_model_parallel_size,
        cp=model.context_parallel_size,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        groups=ProcessGroupCollection.use_mpu_process_groups(
            ["tp", "pp", "cp", "dp", "dp_cp", "embd", "pos_embd"]
        ),
    )


def destroy() -> None:
    """Tears down Megatron's groups and the process group; removes a one-process group's temp folder."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    while _LONE_PROCESS_STORE_DIRS:
        shutil.rmtree(_LONE_PROCESS_STORE_DIRS.pop(), ignore_errors=True)
