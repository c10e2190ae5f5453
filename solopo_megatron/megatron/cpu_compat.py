"""Runs megatron-core's real schedules, DDP and optimizer on CPU with gloo (tests, the laptop demo).

megatron-core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as an allocation
device, literal ``device="cuda"`` allocations (schedules, optimizer, grad clipping), CUDA RNG state
in the tensor-parallel RNG tracker, ``torch.cuda.synchronize`` in p2p communication, and
``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizers. ``enable()`` redirects each to
the CPU. It is version-checked: an unsupported megatron-core, or one whose internals this layer
relies on have moved, raises instead of silently running something else. Never used on CUDA.
"""

from __future__ import annotations

import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_VERSIONS = ("0.16", "0.17", "0.18", "0.19")
_CPU = torch.device("cpu")
_lock = threading.Lock()
_enabled = False


class MegatronCompatError(RuntimeError):
    """megatron-core changed under the CPU compatibility layer."""


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device()'s int as a device
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaAllocationsOnCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments (and pin_memory) of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def check_version() -> str:
    from megatron.core import package_info

    version = package_info.__version__
    if not version.startswith(tuple(v + "." for v in SUPPORTED_VERSIONS)):
        raise MegatronCompatError(
            f"megatron-core {version} is not supported by the CPU compatibility layer "
            f"(supported: {', '.join(SUPPORTED_VERSIONS)}.x); run on CUDA or update solopo_megatron.megatron.cpu_compat"
        )
    return version


def _required(module, *names: str) -> None:
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise MegatronCompatError(
            f"{module.__name__} no longer has {', '.join(missing)}: megatron-core changed under the CPU "
            "compatibility layer (solopo_megatron.megatron.cpu_compat); update it before running on CPU"
        )


def _called_from_megatron() -> bool:
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__", "").startswith("megatron.")


def enable() -> None:
    """Installs the CPU redirections in this process (idempotent). Call before building the model."""
    global _enabled
    if torch.cuda.is_available():
        raise MegatronCompatError("the CPU compatibility layer must not be enabled on a CUDA machine")
    with _lock:
        if _enabled:
            return
        check_version()
        import megatron.core.tensor_parallel.random as tp_random

        _required(tp_random, "_get_cuda_rng_state", "_set_cuda_rng_state", "model_parallel_cuda_manual_seed")

        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.empty_cache = lambda *args, **kwargs: None

        # The tensor-parallel RNG tracker snapshots and restores "CUDA" RNG states: use the CPU generator.
        def get_state(*args, **kwargs):
            return torch.get_rng_state()

        def set_state(state, *args, **kwargs):
            torch.set_rng_state(state)

        torch.cuda.get_rng_state = get_state
        torch.cuda.set_rng_state = set_state
        torch.cuda.manual_seed = torch.manual_seed
        tp_random._get_cuda_rng_state = get_state
        tp_random._set_cuda_rng_state = set_state

        # The optimizers accept only parameters whose type() is a torch.cuda.* tensor type.
        plain_type = torch.Tensor.type

        def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
            name = plain_type(self, dtype, non_blocking, **kwargs)
            if dtype is None and not kwargs and _called_from_megatron() and name.startswith("torch.") \
                    and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name

        torch.Tensor.type = tensor_type
        _CudaAllocationsOnCpu().__enter__()  # process-wide for the main thread, for the process's life
        _enabled = True
