"""The CPU compatibility layer refuses megatron-core versions and internals it was not written for."""

from __future__ import annotations

import types

import pytest

from solopo_megatron.megatron import cpu_compat

# Also run on the oldest tested megatron-core by CI's compat job (.ci/run).
pytestmark = pytest.mark.compat


def test_unsupported_version_fails_loudly(monkeypatch):
    from megatron.core import package_info

    for untested in ("0.21.0", "0.17.0", "0.19.1", "0.19.2rc1"):  # only what CI runs is accepted
        monkeypatch.setattr(package_info, "__version__", untested)
        with pytest.raises(
            cpu_compat.MegatronCompatError,
            match=rf"megatron-core {untested} is not one .* tested with \(0\.16\.1, 0\.19\.2\)",
        ):
            cpu_compat.check_version()
        with pytest.raises(cpu_compat.MegatronCompatError), cpu_compat.enabled():  # entering checks it
            pass
    for tested in (*cpu_compat.SUPPORTED_VERSIONS, "0.19.2+f6a5b40"):  # a local build tag is the release
        monkeypatch.setattr(package_info, "__version__", tested)
        assert cpu_compat.check_version() == tested


def test_moved_internals_fail_loudly():
    fake = types.ModuleType("megatron.core.tensor_parallel.random")
    with pytest.raises(cpu_compat.MegatronCompatError, match="no longer has _get_cuda_rng_state"):
        cpu_compat._required(fake, "_get_cuda_rng_state")


def test_enabled_is_scoped_and_restores_what_it_patched():
    """The layer is entered explicitly, nests, and leaves torch as it found it."""
    import megatron.core.tensor_parallel.random as tp_random
    import torch

    if torch.cuda.is_available():
        pytest.skip("a no-op on CUDA machines")
    originals = (
        torch.cuda.current_device,
        torch.cuda.current_stream,
        torch.cuda.stream,
        torch.cuda.manual_seed,
        torch.Tensor.type,
        tp_random._get_cuda_rng_state,
    )
    assert not cpu_compat.is_enabled()
    with cpu_compat.enabled():
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"  # literal CUDA allocations land on the CPU
        stream = torch.cuda.current_stream()  # megatron-core 0.19 waits on it before reducing gradients
        stream.wait_event(None)
        stream.wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(stream):
            pass
        with cpu_compat.enabled():  # nested: one installation
            assert cpu_compat.is_enabled()
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.manual_seed(7)  # reseeds the one CPU generator (documented in the module)
        first = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(first, torch.rand(3))
    assert not cpu_compat.is_enabled()
    assert (
        torch.cuda.current_device,
        torch.cuda.current_stream,
        torch.cuda.stream,
        torch.cuda.manual_seed,
        torch.Tensor.type,
        tp_random._get_cuda_rng_state,
    ) == originals
    with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
        torch.zeros(2, device="cuda")  # no CUDA here, and no redirection any more
