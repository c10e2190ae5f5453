"""Test set-up: without CUDA, Triton kernels run in interpreter mode on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit decoration, so it is set here (in
``pytest_configure``), before the tests import the kernels; spawned gloo workers inherit it.

The kernels' default backend (``backend=None``) is ``SOLOPO_KERNELS``, read once per process and
cached (``solopo_kernels.dispatch.default_backend``). Every test starts and ends with that cache
cleared, so a test (or a conftest below this one) that sets ``SOLOPO_KERNELS`` is obeyed in this
process as well as in the ranks it spawns.

On a GPU machine the default suite runs as it does on a CPU machine: unless the session's mark
expression can select ``gpu`` tests, ``pytest_configure`` hides every GPU (``CUDA_VISIBLE_DEVICES=""``)
before CUDA initialises. In a session that runs ``gpu`` tests, the CPU tests' subprocesses and spawned
ranks still see no GPU (``hide_gpus_from_cpu_tests``), since several gloo or torchrun ranks cannot
share one GPU.

``SOLOPO_CACHE_DIR`` (the default cache: tokenised data, synthetic files, reference stores) points at
a fresh folder for the session, so no test depends on what earlier runs left in ~/.cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

_SESSION_CACHE = tempfile.mkdtemp(prefix="solopo-test-cache-")
os.environ["SOLOPO_CACHE_DIR"] = _SESSION_CACHE  # before solopo_megatron reads it; subprocesses inherit it
atexit.register(shutil.rmtree, _SESSION_CACHE, True)

from session_devices import selects_gpu_tests  # noqa: E402
from triton_support import set_default_backend, triton_runs_on_cpu  # noqa: E402  (imports no Triton)

from solopo_kernels.dispatch import default_backend  # noqa: E402

IMPLEMENTATIONS = ("torch", "triton")


def pytest_configure(config):
    # Runs before any test module imports: nothing has initialised CUDA yet.
    if not selects_gpu_tests(config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not torch.cuda.is_available():
        # Before any @triton.jit decoration; spawned gloo workers inherit it.
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def hide_gpus_from_cpu_tests(request, monkeypatch):
    """A CPU test's subprocesses and spawned ranks see no GPU, also in a session that runs ``gpu`` tests."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def fresh_default_backend():
    """Clears the cached default backend around each test (see the module docstring)."""
    default_backend.cache_clear()
    yield
    default_backend.cache_clear()


@pytest.fixture()
def cpu_triton(monkeypatch):
    """Makes the Triton kernels the default for CPU tensors; skips where they cannot run (CUDA machines)."""
    if not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    set_default_backend(monkeypatch, "triton")


@pytest.fixture(params=IMPLEMENTATIONS)
def kernel_impl(request, monkeypatch):
    """Runs a test once with the pure-torch reference and once with the Triton kernels (CPU tensors).

    Sets the default backend, so calls that take no ``backend`` (e.g. ``sequence_logprobs``) use it;
    returns its name for tests that pass ``backend=`` explicitly.
    """
    if request.param == "triton" and not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    set_default_backend(monkeypatch, request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and "cpu_ok" not in item.keywords:
            item.add_marker(skip)
