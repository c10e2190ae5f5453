"""Kernel-backend helpers for the tests: can Triton serve CPU tensors here, and setting the default backend."""

from __future__ import annotations

import pytest
import torch


def triton_runs_on_cpu() -> bool:
    """True in interpreter mode (machines without CUDA, where tests/conftest.py sets TRITON_INTERPRET=1)."""
    from solopo_kernels.dispatch import triton_can_run

    return triton_can_run(torch.empty(0))


def set_default_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Makes ``backend`` the default (``backend=None``) in this process and in ranks it spawns, for one test.

    Sets ``SOLOPO_KERNELS`` (spawned ranks read it afresh) and clears the cached default so this
    process reads it again; tests/conftest.py clears the cache again after the test.
    """
    from solopo_kernels.dispatch import default_backend

    monkeypatch.setenv("SOLOPO_KERNELS", backend)
    default_backend.cache_clear()
