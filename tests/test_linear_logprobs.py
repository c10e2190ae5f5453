"""Fused LM head + log-probs: equals the unfused computation (values, dX, dW), never builds [T, V] logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import grid_groups, run_distributed
from torch.utils._python_dispatch import TorchDispatchMode
from triton_support import triton_runs_on_cpu

from solopo_kernels import common, linear_token_logprobs

IGNORE = -100


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5 * 3).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.2] = IGNORE
    grad = torch.randn(tokens, generator=g, dtype=torch.float64)
    return x, w, labels, grad


def _oracle(x, w, labels):
    logp = F.log_softmax(x.double() @ w.double().T, dim=-1)
    picked = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels == IGNORE, torch.zeros_like(picked), picked)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=str
)
def test_matches_float64_values_and_gradients(dtype, tol, backend, monkeypatch):
    if backend == "triton" and (dtype == torch.float64 or not triton_runs_on_cpu()):
        pytest.skip("the Triton kernels take bf16/fp16/fp32, and run on CPU tensors only when interpreted")
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 7 * 50)  # several token chunks
    x, w, labels, grad = _inputs(23, 16, 50, dtype, seed=1)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_token_logprobs(xl, wl, labels, ignore_index=IGNORE, backend=backend)
    out.backward(grad.to(out.dtype))
    xo, wo = x.double().requires_grad_(), w.double().requires_grad_()
    expected = _oracle(xo, wo, labels)
    expected.backward(grad)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(xl.grad.double(), xo.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(wl.grad.double(), wo.grad, rtol=tol, atol=tol)
    assert xl.grad.dtype == dtype and wl.grad.dtype == dtype


def test_gradcheck():
    x, w, labels, _ = _inputs(5, 4, 7, torch.float64, seed=2)
    assert torch.autograd.gradcheck(
        lambda a, b: linear_token_logprobs(a, b, labels, ignore_index=IGNORE),
        (x.requires_grad_(), w.requires_grad_()),
    )


def test_saves_no_logits():
    x, w, labels, _ = _inputs(40, 8, 300, torch.float32, seed=3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_token_logprobs(x.requires_grad_(), w.requires_grad_(), labels)
    assert all(t.numel() < 40 * 300 for t in saved)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(40, 8), (300, 8), (40,), (40,)])


class _RecordAllocations(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[tuple[int, ...], torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((tuple(t.shape), t.dtype, t.untyped_storage().data_ptr()))
        return result


def test_bf16_never_builds_full_logits_nor_an_fp32_weight_copy(monkeypatch):
    """Blocks of at most 8 tokens; matmuls in bf16; the only weight-sized fp32 tensor is the dW accumulator."""
    tokens, hidden, vocab = 40, 8, 300
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 8 * vocab)
    x, w, labels, grad = _inputs(tokens, hidden, vocab, torch.bfloat16, seed=5)
    x.requires_grad_(), w.requires_grad_()
    with _RecordAllocations() as forward:
        out = linear_token_logprobs(x, w, labels, ignore_index=IGNORE, backend="torch")
    with _RecordAllocations() as backward:
        out.backward(grad.float())
    for shape, _, _ in forward.outputs + backward.outputs:
        assert not (len(shape) == 2 and shape[0] > 8 and shape[1] == vocab), f"a {shape} logits tensor"

    def fp32_weight_sized(outputs):
        return {ptr for shape, dtype, ptr in outputs if dtype == torch.float32 and shape == (vocab, hidden)}

    assert fp32_weight_sized(forward.outputs) == set()
    assert len(fp32_weight_sized(backward.outputs)) == 1  # the dW accumulator, updated in place


def _tp_worker(rank: int, world_size: int) -> None:
    tp_group, _, tp_rank, _ = grid_groups(world_size, 1)
    x, w, labels, grad = _inputs(19, 12, 40, torch.float64, seed=4)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    linear_token_logprobs(xo, wo, labels, ignore_index=IGNORE).backward(grad)
    local = 40 // world_size
    xl = x.clone().requires_grad_()
    wl = w[tp_rank * local : (tp_rank + 1) * local].clone().requires_grad_()
    out = linear_token_logprobs(
        xl, wl, labels, vocab_start_index=tp_rank * local, tp_group=tp_group, ignore_index=IGNORE
    )
    out.backward(grad)
    torch.testing.assert_close(out, _oracle(x, w, labels), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        wl.grad, wo.grad[tp_rank * local : (tp_rank + 1) * local], rtol=1e-10, atol=1e-12
    )
    dx = xl.grad.clone()
    torch.distributed.all_reduce(dx, group=tp_group)  # what the column-parallel LM head's backward does
    torch.testing.assert_close(dx, xo.grad, rtol=1e-10, atol=1e-12)


def test_tensor_parallel_matches_one_process():
    run_distributed(_tp_worker, 2)


def test_planner_chunk_constant_matches_the_kernels():
    from solopo_megatron.recipe.sizing import HEAD_CHUNK_ELEMENTS

    assert HEAD_CHUNK_ELEMENTS == common.CHUNK_ELEMENTS
