"""Triton kernels at real sizes on CUDA (``pytest -m gpu``): float64 references, memory, invariance."""

from __future__ import annotations

import pytest
import torch

from solopo_kernels import segment_sum, token_logprobs
from solopo_kernels.triton_logprobs import token_logprobs_triton

pytestmark = pytest.mark.gpu
IGNORE = -100
ROWS_PER_CHECK = 1024  # float64 references are built this many rows at a time


def _inputs(tokens: int, vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g, device="cuda") * 4).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device="cuda")
    labels[torch.rand(tokens, generator=g, device="cuda") < 0.1] = IGNORE
    grad_out = torch.randn(tokens, generator=g, device="cuda")
    return logits, labels, grad_out


def _check_rows_against_float64(logits, labels, grad_out, out, grad, value_tol, grad_ulps):
    """Chunked float64 oracle: values to value_tol; gradients to grad_ulps ulps (of the logits' dtype)
    of |g| for the final rounding, plus the fp32 arithmetic inside the kernel: exp(x - lse) with x and
    lse in fp32 is off by ~eps32 * (|x| + |lse|) relative, which at |lse| ~ 20 is several fp32 ulps."""
    eps = torch.finfo(logits.dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    for start in range(0, logits.shape[0], ROWS_PER_CHECK):
        rows = slice(start, start + ROWS_PER_CHECK)
        x = logits[rows].double()
        lab = labels[rows]
        logp = torch.log_softmax(x, dim=-1)
        picked = logp.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
        expected = torch.where(lab == IGNORE, torch.zeros_like(picked), picked)
        torch.testing.assert_close(out[rows].double(), expected, rtol=0, atol=value_tol)
        g = torch.where(lab == IGNORE, 0.0, grad_out[rows].double())
        expected_grad = -logp.exp() * g[:, None]
        hit = lab != IGNORE
        expected_grad[hit, lab[hit]] += g[hit]
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        fp32_arithmetic = 4 * eps32 * (x.abs() + lse.abs())
        bound = g.abs()[:, None] * (grad_ulps * eps + fp32_arithmetic) + 1e-30
        assert bool(((grad[rows].double() - expected_grad).abs() <= bound).all()), f"rows {rows}"


@pytest.mark.parametrize(
    "tokens, vocab, dtype",
    [
        (65536, 19008, torch.bfloat16),
        (8192, 262144, torch.bfloat16),
        (16384, 152064, torch.bfloat16),
        (8192, 128256, torch.float16),
        (8192, 128256, torch.float32),
    ],
    ids=str,
)
def test_real_shapes_against_float64(tokens, vocab, dtype):
    logits, labels, grad_out = _inputs(tokens, vocab, dtype, seed=tokens + vocab)
    leaf = logits.clone().requires_grad_()
    out = token_logprobs_triton(leaf, labels, ignore_index=IGNORE)
    out.backward(grad_out)
    value_tol = 1e-4 if dtype == torch.float32 else 2e-4
    _check_rows_against_float64(logits, labels, grad_out, out, leaf.grad, value_tol, grad_ulps=2)


def test_extra_memory_is_a_few_bytes_per_token():
    tokens, vocab = 32768, 19008
    logits, labels, grad_out = _inputs(tokens, vocab, torch.bfloat16, seed=1)
    leaf = logits.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = token_logprobs_triton(leaf, labels, ignore_index=IGNORE)
    out.backward(grad_out)
    torch.cuda.synchronize()
    outputs = out.numel() * 4 + leaf.grad.numel() * leaf.grad.element_size()
    extra = torch.cuda.max_memory_allocated() - base - outputs
    assert extra <= 16 * tokens + (64 << 10), f"{extra / tokens:.1f} bytes per token"


def test_inplace_backward_allocates_no_gradient_buffer():
    tokens, vocab = 16384, 152064
    logits, labels, grad_out = _inputs(tokens, vocab, torch.bfloat16, seed=2)
    reference = logits.clone().requires_grad_()
    token_logprobs_triton(reference, labels, ignore_index=IGNORE).backward(grad_out)
    leaf = logits.requires_grad_()
    buffer = leaf * 1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = token_logprobs_triton(buffer, labels, ignore_index=IGNORE, inplace_backward=True)
    (grad,) = torch.autograd.grad(out, buffer, grad_out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 16 * tokens + (64 << 10)
    assert grad.data_ptr() == buffer.data_ptr()
    assert torch.equal(grad, reference.grad)


def test_batch_invariance_and_determinism():
    logits, labels, grad_out = _inputs(8192, 152064, torch.bfloat16, seed=3)
    alone = slice(1000, 5096)
    first = token_logprobs(logits, labels, ignore_index=IGNORE)
    again = token_logprobs(logits, labels, ignore_index=IGNORE)
    single = token_logprobs(logits[alone].contiguous(), labels[alone], ignore_index=IGNORE)
    assert torch.equal(first, again) and torch.equal(first[alone], single)

    values = torch.randn(65536, device="cuda")
    segments = torch.repeat_interleave(torch.arange(64, device="cuda"), 1024)
    keep = torch.rand(65536, device="cuda") < 0.7
    sums = segment_sum(values, keep, segments, 64)
    alone_sum = segment_sum(values[5 * 1024 : 6 * 1024], keep[5 * 1024 : 6 * 1024], segments[:1024] * 0, 1)
    assert torch.equal(sums, segment_sum(values, keep, segments, 64))
    assert torch.equal(sums[5:6], alone_sum)
    expected = torch.zeros(64, dtype=torch.float64, device="cuda").index_add(
        0, segments, torch.where(keep, values.double(), 0.0)
    )
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)
