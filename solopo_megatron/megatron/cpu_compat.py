"""Runs megatron-core's real schedules, DDP and optimizer on CPU with gloo (tests, the laptop demo).

megatron-core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as an allocation
device, literal ``device="cuda"`` allocations (schedules, optimizer, grad clipping), CUDA RNG state
in the tensor-parallel RNG tracker, ``torch.cuda.synchronize`` in p2p communication, and
``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizers. ``with enabled():`` redirects
each to the CPU for the duration of a run and restores every patched function on exit; it is a
no-op on a CUDA machine. It is version-checked: an unsupported megatron-core, or one whose internals
this layer relies on have moved, raises instead of silently running something else.

Random streams: a CPU process has one generator, so under this layer the "CUDA" generator IS the
CPU one: ``torch.cuda.manual_seed(s)`` reseeds the CPU generator, and the CUDA ``get/set_rng_state``
read and write its state. Megatron's tensor-parallel tracker keeps its streams as saved states and
swaps them in only inside ``fork()`` regions (``model_parallel_cuda_manual_seed(seed)`` seeds the
default stream with ``seed``, the value ``init_parallel_state`` also gives ``torch.manual_seed``, and
the tensor-parallel stream with seed + 2718 + tp_rank), so those streams stay apart; but any other
code that seeds "CUDA" also reseeds the CPU stream.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import torch
from packaging.version import Version
from torch.overrides import TorchFunctionMode

# The megatron-core releases CI runs on CPU (.ci/run: the default suite on 0.19.2, the compat job on
# 0.16.1). Any other release may have moved what this layer patches: it is refused, not guessed at.
SUPPORTED_VERSIONS = ("0.16.1", "0.19.2")
_CPU = torch.device("cpu")
_lock = threading.RLock()


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


class _CpuStream:
    """What megatron-core asks of a CUDA stream, for CPU work that is already in order: nothing to wait
    for, nothing to record (megatron-core 0.19 waits on ``torch.cuda.current_stream()`` before every
    gradient reduction)."""

    device = _CPU

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_STREAM = _CpuStream()


def check_version() -> str:
    """The installed megatron-core version; MegatronCompatError when CI does not test it on CPU."""
    from megatron.core import package_info

    version = package_info.__version__
    # A local build tag (0.19.2+f6a5b40, as some indexes ship it) is the same release; rc/dev are not.
    if Version(version).public not in SUPPORTED_VERSIONS:
        raise MegatronCompatError(
            f"megatron-core {version} is not one the CPU compatibility layer is tested with "
            f"({', '.join(SUPPORTED_VERSIONS)}); install one of those to run on CPU "
            "(on CUDA the layer is not used), or extend solopo_megatron.megatron.cpu_compat"
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


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Runs megatron-core on CPU for the duration of the block and restores what it patched on exit.

    Re-entrant (nested blocks share one installation); a no-op on a CUDA machine. Enter it before
    ``init_parallel_state`` and leave it after ``destroy``.
    """
    global _depth
    if torch.cuda.is_available():
        yield
        return
    with _lock:
        if _depth == 0:
            _install()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _uninstall()


def is_enabled() -> bool:
    """Whether a ``with enabled():`` block is active in this process."""
    return _depth > 0


def _install() -> None:
    check_version()
    import megatron.core.tensor_parallel.random as tp_random

    _required(tp_random, "_get_cuda_rng_state", "_set_cuda_rng_state", "model_parallel_cuda_manual_seed")
    for owner, name in _PATCHED:
        _saved.append((owner, name, getattr(owner(), name)))

    def get_state(*args, **kwargs):
        return torch.get_rng_state()

    def set_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    def seed_cpu_generator(seed: int) -> None:
        """``torch.cuda.manual_seed`` on CPU: reseeds the one CPU generator (see the module docstring)."""
        torch.manual_seed(seed)

    # The optimizers accept only parameters whose type() is a torch.cuda.* tensor type.
    plain_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        name = plain_type(self, dtype, non_blocking, **kwargs)
        if (
            dtype is None
            and not kwargs
            and _called_from_megatron()
            and name.startswith("torch.")
            and not name.startswith("torch.cuda.")
        ):
            return "torch.cuda." + name[len("torch.") :]
        return name

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.current_stream = lambda *args, **kwargs: _STREAM
    torch.cuda.default_stream = lambda *args, **kwargs: _STREAM
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.manual_seed = seed_cpu_generator
    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state
    torch.Tensor.type = tensor_type
    mode = _CudaAllocationsOnCpu()
    mode.__enter__()
    _modes.append(mode)


def _uninstall() -> None:
    while _modes:
        _modes.pop().__exit__(None, None, None)
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner(), name, original)


def _tp_random():
    import megatron.core.tensor_parallel.random as tp_random

    return tp_random


# (owner, attribute) pairs the layer replaces; owners are callables so megatron is imported lazily.
_PATCHED = [
    (lambda: torch.cuda, name)
    for name in (
        "current_device",
        "current_stream",
        "default_stream",
        "stream",
        "synchronize",
        "empty_cache",
        "get_rng_state",
        "set_rng_state",
        "manual_seed",
    )
]
_PATCHED += [
    (_tp_random, "_get_cuda_rng_state"),
    (_tp_random, "_set_cuda_rng_state"),
    (lambda: torch.Tensor, "type"),
]
_saved: list = []
_modes: list = []
_depth = 0
