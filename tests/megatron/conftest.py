"""Megatron tests run the pure-torch log-prob kernels.

The Triton interpreter would dominate their run time; the kernels are checked against the reference
(TP and CP included) in tests/test_logprobs.py and tests/test_parallel_logprobs.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("SOLOPO_KERNELS", "torch")  # inherited by spawned ranks
