"""Megatron's padded vocabulary columns stay out of the log-softmax in every kernel path.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by x tp``. Imported models get
zero rows there, so each padding logit is 0 and, counted in the normaliser, would shift every log-prob
by log(1 + pad x e^-lse). With ``vocab_size`` the kernels read only the true columns. Here the padding
logits are large and random (as a trained model's could be), so counting even one of them would show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from triton_support import triton_runs_on_cpu

from solopo_kernels import common, linear_token_logprobs, token_logprobs

IGNORE = -100
VOCAB, PADDED = 37, 48  # 11 padding columns: divisor 16 at TP=1, or 24 columns a shard at TP=2


def _skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and (dtype == torch.float64 or not triton_runs_on_cpu()):
        pytest.skip("the Triton kernels take bf16/fp16/fp32, and run on CPU tensors only when interpreted")


def _padded_logits(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, PADDED, generator=g, dtype=torch.float64) * 2
    logits[:, VOCAB:] += 6.0  # padding logits that would dominate the normaliser if counted
    labels = torch.randint(0, VOCAB, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.2] = IGNORE
    grad = torch.randn(tokens, generator=g, dtype=torch.float64)
    return logits, labels, grad


def _oracle(real_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 log-probs under the softmax of the true vocabulary only."""
    logp = F.log_softmax(real_logits.double(), dim=-1)
    picked = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels == IGNORE, torch.zeros_like(picked), picked)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=str)
def test_token_logprobs_leave_padding_columns_out(backend, dtype, tol, monkeypatch):
    _skip_unsupported(backend, dtype)
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 5 * PADDED)  # several row chunks (torch path)
    logits, labels, grad = _padded_logits(19, seed=3)
    mine = logits.to(dtype).clone().requires_grad_()
    out = token_logprobs(mine, labels, ignore_index=IGNORE, vocab_size=VOCAB, backend=backend)
    out.backward(grad.to(out.dtype))
    want = logits.clone().requires_grad_()
    expected = _oracle(want[:, :VOCAB], labels)
    expected.backward(grad)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(mine.grad.double(), want.grad, rtol=tol, atol=tol)
    assert torch.all(mine.grad[:, VOCAB:] == 0)
    # Without vocab_size the padding is counted: the guard above is not vacuous.
    counted = token_logprobs(logits.to(dtype), labels, ignore_index=IGNORE, backend=backend)
    assert (counted.double() - expected).abs().max() > 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_backward_zeroes_the_padding_columns(backend):
    _skip_unsupported(backend, torch.float32)
    logits, labels, grad = _padded_logits(7, seed=4)
    leaf = logits.float().requires_grad_()
    storage = leaf.detach().clone()  # the in-place gradient overwrites this copy's columns, padding too
    out = token_logprobs(
        storage.requires_grad_(), labels, ignore_index=IGNORE, vocab_size=VOCAB, backend=backend,
        inplace_backward=True,
    )  # fmt: skip
    (got,) = torch.autograd.grad(out, storage, grad.float())
    (want,) = torch.autograd.grad(
        token_logprobs(leaf, labels, ignore_index=IGNORE, vocab_size=VOCAB, backend=backend),
        leaf,
        grad.float(),
    )
    torch.testing.assert_close(got, want)
    assert torch.all(got[:, VOCAB:] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=str)
def test_linear_token_logprobs_leave_padding_rows_out(backend, dtype, tol, monkeypatch):
    _skip_unsupported(backend, dtype)
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 4 * PADDED)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(17, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(PADDED, 8, generator=g, dtype=torch.float64)
    weight[VOCAB:] = hidden.mean(0) * 3  # padding rows aligned with the hidden states: large logits
    _, labels, grad = _padded_logits(17, seed=6)
    x, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
    out = linear_token_logprobs(x, w, labels, ignore_index=IGNORE, vocab_size=VOCAB, backend=backend)
    out.backward(grad.to(out.dtype))
    xo, wo = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = _oracle(xo @ wo[:VOCAB].T, labels)
    expected.backward(grad)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), xo.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double(), wo.grad, rtol=tol, atol=tol)
    assert torch.all(w.grad[VOCAB:] == 0)


def test_vocab_size_must_be_positive():
    logits, labels, _ = _padded_logits(3, seed=7)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        token_logprobs(logits, labels, ignore_index=IGNORE, vocab_size=0)


def _check_shards(rank: int, world_size: int, local: int, vocab: int, backend: str) -> None:
    """Each rank holds ``local`` columns; global ids >= ``vocab`` are padding (maybe whole shards)."""
    import torch.distributed as dist

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(11)
    full = torch.randn(13, local * world_size, generator=g) * 2
    full[:, vocab:] += 6.0
    labels = torch.randint(0, vocab, (13,), generator=g)
    grad = torch.randn(13, generator=g)
    start = rank * local
    shard = full[:, start : start + local].clone().requires_grad_()
    out = token_logprobs(
        shard, labels, vocab_start_index=start, tp_group=group, vocab_size=vocab, backend=backend
    )
    out.backward(grad)
    want = full.double().requires_grad_()
    expected = _oracle(want[:, :vocab], labels)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(shard.grad.double(), want.grad[:, start : start + local], rtol=2e-5, atol=2e-5)

    hidden = torch.randn(13, 6, generator=g)
    weight = torch.randn(local * world_size, 6, generator=g)
    x, w = hidden.clone().requires_grad_(), weight[start : start + local].clone().requires_grad_()
    out = linear_token_logprobs(
        x, w, labels, vocab_start_index=start, tp_group=group, vocab_size=vocab, backend=backend
    )
    out.backward(grad)
    xo, wo = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = _oracle(xo @ wo[:vocab].T, labels)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    grad_x = x.grad.clone()
    dist.all_reduce(grad_x, group=group)  # the column-parallel head's reduction of dX
    torch.testing.assert_close(grad_x.double(), xo.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wo.grad[start : start + local], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "world, local, vocab",
    [(2, 24, VOCAB), (4, 8, 10)],  # the last shard part padding; at TP=4 the last two all padding
    ids=["tp2-partly-padded", "tp4-whole-shards-padded"],
)
def test_tensor_parallel_shards_leave_padding_out(world, local, vocab):
    run_distributed(_check_shards, world, local, vocab, "torch")


@pytest.mark.parametrize(
    "world, local, vocab", [(2, 24, VOCAB), (4, 8, 10)], ids=["tp2-partly-padded", "tp4-whole-shards-padded"]
)
def test_tensor_parallel_triton_shards_leave_padding_out(world, local, vocab):
    if not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    run_distributed(_check_shards, world, local, vocab, "triton")
