"""The CPU compatibility layer refuses megatron-core versions and internals it was not written for."""

from __future__ import annotations

import types

import pytest

from solopo_megatron.megatron import cpu_compat


def test_unsupported_version_fails_loudly(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.21.0")
    with pytest.raises(cpu_compat.MegatronCompatError, match="megatron-core 0.21.0 is not supported"):
        cpu_compat.check_version()
    monkeypatch.setattr(package_info, "__version__", "0.16.1")
    assert cpu_compat.check_version() == "0.16.1"


def test_moved_internals_fail_loudly():
    fake = types.ModuleType("megatron.core.tensor_parallel.random")
    with pytest.raises(cpu_compat.MegatronCompatError, match="no longer has _get_cuda_rng_state"):
        cpu_compat._required(fake, "_get_cuda_rng_state")
