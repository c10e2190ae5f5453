"""Whether the Triton kernels can serve CPU tensors in this test run."""

from __future__ import annotations

import torch


def triton_runs_on_cpu() -> bool:
    """True in interpreter mode (machines without CUDA, where tests/conftest.py sets TRITON_INTERPRET=1)."""
    from solopo_kernels.dispatch import triton_can_run

    return triton_can_run(torch.empty(0))
