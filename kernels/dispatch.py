"""Chooses between the Triton kernels and the pure-torch reference.

``SOLOPO_KERNELS`` = ``auto`` (default): Triton for CUDA tensors, and for CPU tensors when Triton runs
in interpreter mode (TRITON_INTERPRET=1 set before import, as the CPU tests do); the reference
otherwise. ``triton`` forces the kernels (an error where they cannot run); ``torch`` forces the reference.
"""

from __future__ import annotations

import os

import torch

try:
    from . import segment_sum as _segment_sum_module  # noqa: F401  (imports triton)
    from . import triton_logprobs as _triton_logprobs

    TRITON_ERROR: str | None = None
    TRITON_LOGPROBS_DTYPES = _triton_logprobs.SUPPORTED_DTYPES
except ImportError as error:  # triton missing (e.g. macOS): the reference serves everything
    _triton_logprobs = None
    TRITON_ERROR = str(error)
    TRITON_LOGPROBS_DTYPES = ()

CHOICES = ("auto", "triton", "torch")


def kernel_choice() -> str:
    choice = os.environ.get("SOLOPO_KERNELS", "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"SOLOPO_KERNELS must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def triton_can_run(tensor: torch.Tensor) -> bool:
    if _triton_logprobs is None:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and _triton_logprobs.INTERPRETED)


def use_triton(tensor: torch.Tensor, *, supported_dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """Whether the Triton path serves ``tensor`` (see the module docstring)."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    dtype_ok = supported_dtypes is None or tensor.dtype in supported_dtypes
    if choice == "triton":
        if not triton_can_run(tensor):
            why = TRITON_ERROR or f"{tensor.device} tensors need CUDA or TRITON_INTERPRET=1"
            raise RuntimeError(f"SOLOPO_KERNELS=triton but Triton cannot run here: {why}")
        if not dtype_ok:
            raise RuntimeError(f"SOLOPO_KERNELS=triton but the kernel does not take {tensor.dtype}")
        return True
    return dtype_ok and triton_can_run(tensor)
