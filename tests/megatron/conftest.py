"""Kernel backend and device of the Megatron tests.

CPU tests run the pure-torch log-prob kernels: the Triton interpreter would dominate their run time,
and the kernels are checked against the reference (TP and CP included) in tests/test_logprobs.py and
tests/test_parallel_logprobs.py. (``tests/distributed.run_distributed`` hides any GPU from the gloo
ranks it spawns, so they build their models on the CPU also on a GPU machine.)

``gpu``-marked tests run what production runs: the Triton kernels (``SOLOPO_KERNELS=triton``: an
error, not a fallback, where Triton cannot run), whatever the environment said.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def kernels_and_device(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.setenv("SOLOPO_KERNELS", "triton")  # inherited by the runs these tests start
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return
    monkeypatch.setenv("SOLOPO_KERNELS", "torch")  # inherited by spawned ranks
