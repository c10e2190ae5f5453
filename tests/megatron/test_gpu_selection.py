"""On any machine: what ``pytest -m gpu`` would run is the production path, not the CPU tests' reference kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
