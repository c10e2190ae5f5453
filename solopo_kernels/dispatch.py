"""Chooses between the Triton kernels and the pure-torch reference, without importing Triton.

Backends: ``auto``: Triton for CUDA tensors, and for CPU tensors when Triton runs in interpreter
mode (TRITON_INTERPRET=1 set before the kernels are imported, as the CPU tests do); the reference
otherwise. ``triton`` forces the kernels (an error where they cannot run or do not take the dtype);
``torch`` forces the reference.

Every entry point takes ``backend=None``, which means ``default_backend()``: the environment variable
``SOLOPO_KERNELS`` (default ``auto``), read once per process and cached. Call
``default_backend.cache_clear()`` after changing the variable (tests do).

Triton itself is imported only when a Triton path is considered (a CUDA tensor, or a CPU tensor
with the interpreter on), so ``import solopo_kernels`` works, and stays light, without it.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

__all__ = [
    "BACKENDS",
    "TRITON_LOGPROBS_DTYPES",
    "default_backend",
    "kernel_choice",
    "resolve_backend",
    "triton_can_run",
    "triton_import_error",
    "triton_interpret_enabled",
    "use_triton",
]

BACKENDS = ("auto", "triton", "torch")
# Logits dtypes the Triton log-prob kernel takes (fp64 always runs the reference).
TRITON_LOGPROBS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def default_backend() -> str:
    """The backend that ``backend=None`` means: ``SOLOPO_KERNELS`` (auto|triton|torch), read once.

    Raises ValueError for any other value. Cached for the process; ``default_backend.cache_clear()``
    makes the next call read the variable again.
    """
    choice = os.environ.get("SOLOPO_KERNELS", "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"SOLOPO_KERNELS must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def kernel_choice() -> str:
    """The default backend (same as ``default_backend()``; kept for existing callers)."""
    return default_backend()


def resolve_backend(backend: str | None) -> str:
    """``backend`` validated and lower-cased, or ``default_backend()`` for None; ValueError otherwise."""
    if backend is None:
        return default_backend()
    choice = backend.lower() if isinstance(backend, str) else backend
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    return choice


def triton_interpret_enabled() -> bool:
    """Whether Triton runs (or, once imported, will run) kernels in interpreter mode.

    Reads ``triton.knobs.runtime.interpret`` where Triton is already imported and has ``knobs``
    (newer releases); otherwise the ``TRITON_INTERPRET`` environment variable, as older releases do.
    Never imports Triton.
    """
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


@functools.cache
def triton_import_error() -> str | None:
    """None when ``import triton`` succeeds, else the error's message (e.g. Triton not installed).

    Imports Triton on the first call; only call it where a Triton path is being considered.
    """
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return str(error) or type(error).__name__
    return None


def triton_can_run(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can take ``tensor``: CUDA, or CPU in interpreter mode, Triton importable.

    A CPU tensor without the interpreter flag is answered without importing Triton.
    """
    if tensor.is_cuda:
        return triton_import_error() is None
    if tensor.device.type != "cpu" or not triton_interpret_enabled():
        return False
    # Importing Triton may turn the environment variable into knobs; ask again after the import.
    return triton_import_error() is None and triton_interpret_enabled()


def use_triton(
    tensor: torch.Tensor,
    backend: str | None = None,
    *,
    supported_dtypes: tuple[torch.dtype, ...] | None = None,
) -> bool:
    """Whether the Triton path serves ``tensor`` under ``backend`` (None: ``default_backend()``).

    ``supported_dtypes`` (None: any) lists the dtypes the kernel takes. ``triton`` raises
    RuntimeError where the kernel cannot run or does not take the dtype; ``auto`` then falls back to
    the reference.
    """
    choice = resolve_backend(backend)
    if choice == "torch":
        return False
    dtype_ok = supported_dtypes is None or tensor.dtype in supported_dtypes
    if choice == "triton":
        if not triton_can_run(tensor):
            why = triton_import_error() if tensor.is_cuda or triton_interpret_enabled() else None
            why = why or f"{tensor.device} tensors need CUDA or TRITON_INTERPRET=1"
            raise RuntimeError(f"the 'triton' backend cannot run here: {why}")
        if not dtype_ok:
            raise RuntimeError(f"the 'triton' backend's kernel does not take {tensor.dtype}")
        return True
    return dtype_ok and triton_can_run(tensor)
