"""Process groups: torch.distributed start-up (torchrun or a lone process) and Megatron's parallel state."""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelSection


@dataclass(frozen=True)
class Layout:
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

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The last pipeline stage's first replica: it holds the losses and reports."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0


def check_layout(model: ModelSection, world_size: int) -> None:
    """Raises ValueError naming every layout problem (the same checks as the recipe validation)."""
    from ..validation import RecipeError, layout_problems

    problems = layout_problems(model, world_size)
    if problems:
        raise RecipeError("invalid layout:\n" + "\n".join(f"  - {p}" for p in problems))


def init_process_group() -> None:
    """Joins the torchrun job described by the environment, or starts a one-process group."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=int(os.environ.get("SOLOPO_DIST_TIMEOUT_MIN", "30")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
        return
    store = os.path.join(tempfile.mkdtemp(prefix="solopo-dist-"), "store")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)


def init_parallel_state(model: ModelSection, seed: int) -> Layout:
    """Megatron's TP/PP/CP/DP groups (TP fastest) and its model-parallel RNG seeds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    check_layout(model, dist.get_world_size())
    if not torch.cuda.is_available():
        from . import cpu_compat

        cpu_compat.enable()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=model.tensor_model_parallel_size,
            pipeline_model_parallel_size=model.pipeline_model_parallel_size,
            context_parallel_size=model.context_parallel_size,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Layout(
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
    )


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
