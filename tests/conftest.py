"""Test set-up: without CUDA, Triton kernels run in interpreter mode on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit decoration, so it is set here, before the
tests import the kernels; spawned gloo workers inherit it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_support import triton_runs_on_cpu  # noqa: E402  (after TRITON_INTERPRET is set)

IMPLEMENTATIONS = ("torch", "triton")


@pytest.fixture()
def cpu_triton(monkeypatch):
    """Forces the Triton kernels for CPU tensors; skips where they cannot run (CUDA machines)."""
    if not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    monkeypatch.setenv("SOLOPO_KERNELS", "triton")


@pytest.fixture(params=IMPLEMENTATIONS)
def kernel_impl(request, monkeypatch):
    """Runs a test once with the pure-torch reference and once with the Triton kernels (CPU tensors)."""
    if request.param == "triton" and not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    monkeypatch.setenv("SOLOPO_KERNELS", request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
