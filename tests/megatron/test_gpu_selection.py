"""On any machine: what ``pytest -m gpu`` would run is the production path, not the CPU tests' reference kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_marker_collects_the_triton_kernel_and_training_tests():
    done = _pytest("--collect-only", "-q", "-m", "gpu", "tests")
    assert done.returncode == 0, done.stdout[-2000:]
    collected = done.stdout
    assert "tests/test_kernels_gpu.py::test_real_shapes_against_float64" in collected
    assert "tests/megatron/test_gpu_training.py::test_training_steps_with_local_spec[flex]" in collected
    assert "tests/megatron/test_gpu_training.py::test_gpu_tests_run_the_triton_kernels" in collected


def test_solopo_kernels_from_the_environment_does_not_leak_into_gpu_tests():
    """The CPU tests force the torch kernels; a gpu test must see Triton even when the shell says torch."""
    test = "tests/megatron/test_gpu_training.py::test_gpu_tests_run_the_triton_kernels"
    done = _pytest("-q", "-m", "gpu", test, SOLOPO_KERNELS="torch", TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 passed" in done.stdout


def test_cpu_tests_see_no_gpu():
    """Also on a GPU machine: the default suite hides GPUs from this process before CUDA initialises,
    and a CPU test's subprocesses and ranks see none even in a session that runs gpu tests."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()


@pytest.mark.parametrize(
    ("markexpr", "selects"),
    [
        ("not slow and not gpu", False),
        ("slow", False),
        ("gpu", True),
        ("gpu or slow", True),
        ("", True),
        ("not slow", True),
    ],
)
def test_which_sessions_keep_the_gpu(markexpr, selects):
    from session_devices import selects_gpu_tests

    assert selects_gpu_tests(markexpr) is selects


@pytest.mark.gpu
@pytest.mark.cpu_ok
def test_gpu_sessions_keep_the_gpu():
    """Run by the test below in a ``-m gpu`` session: nothing hides the device from gpu tests."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def test_a_gpu_session_does_not_hide_the_gpu():
    test = "tests/megatron/test_gpu_selection.py::test_gpu_sessions_keep_the_gpu"
    done = _pytest("-q", "-m", "gpu", test, CUDA_VISIBLE_DEVICES="0")
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 passed" in done.stdout
