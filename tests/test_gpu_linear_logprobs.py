"""The production LM head (``linear_token_logprobs``: Triton statistics without FINALIZE, merge_logit_stats,
backward_into) against float64 at a Qwen2.5-0.5B shape in bf16 (``pytest -m gpu``).

T=2048 tokens, hidden 896, a 151,936-column vocabulary shard: the first one (``vocab_start_index`` 0,
every column vocabulary), and a later one in one process whose last columns are padding past
``vocab_size`` (Qwen2.5's 151,665 real tokens in its 151,936 rows): labels offset by the start, every
label owned, since with ``tp_group=None`` the shard is the whole softmax. Values and the gradients of
hidden and weight are compared with a float64 reference built on the device in row chunks, each
element against its own bound derived from the path's roundings (below); the padding rows' weight
gradient must be exactly 0. A CPU test runs the same check at a small shape in the Triton interpreter,
and shows that a shard-offset bug breaks it.

Bounds, from bf16 inputs with fp32 accumulation (unit roundoff u = 2^-24; ``gamma(n) = n u``, doubled
where tensor cores may truncate instead of rounding). R is one rounding to bf16: U = 2^-9 on CUDA
(round to nearest; the test turns off cuBLAS's reduced-precision split-K reductions, which would add
roundings of partial sums: the subject here is the kernels' arithmetic), 2U in the CPU interpreter,
which truncates when it stores bf16 and whose CPU GEMMs also round a partial sum (P = R, 0 on CUDA):

- logits: each formed in fp32 from exact bf16 products and rounded once to bf16, so
  ``|z~ - z| <= e = R |z| + (2 gamma(H) + P) sum_k |x_k w_k|``.
- values ``z_y - lse(z)``: ``<= 2 (e_y + sum_j p_j e_j) + 1e-4``. The softmax-weighted sum bounds the
  change of the log-sum-exp (to first order; the factor 2 covers the second order while e < 0.3);
  1e-4 covers the fp32 statistics (blocked sums over V, exp/log, ~1e-5 worst).
- softmax gradient ``G = g (onehot - p)``, formed in fp32 and rounded once to bf16:
  ``|G~ - G| <= E = |g| p (2 (e + sum p e) + 1e-4 + 4u (|z| + |lse|)) (1 + R) + R |G|``.
- ``dX = G~ W`` (fp32 accumulation over V, one rounding): ``E |W| + (2 gamma(V) + P) (|G| + E) |W|``,
  plus R of the result. ``dW = sum over token chunks of bf16(G~^T X)``, accumulated in fp32, rounded
  once: ``E^T |X| + (3 gamma(T) + R + P) (|G| + E)^T |X|``, plus R of the result.

These are worst cases (typical errors are several times smaller), yet a wrong label column, shard
offset, merge or gradient term moves values by nats and gradients by their own size: the test also
checks that the bounds stay well under that (``_BOUND_POWER``).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from solopo_kernels import common, linear_token_logprobs

IGNORE = -100
U_BF16 = 2.0**-9
U_FP32 = 2.0**-24
STATS_ABS = 1e-4  # the fp32 softmax statistics' own error (see the module docstring)
ROWS_PER_CHECK = 128  # float64 reference rows at a time: a few [128, V] fp64 blocks
# The test's power: the value bound's largest entry (nats) and each gradient bound's norm as a
# fraction of the reference gradient's norm stay under these, so an error of that size is caught.
_BOUND_POWER = {"value": 1.0, "d_hidden": 0.5, "d_weight": 0.5}


class Roundings(NamedTuple):
    """R: one rounding to bf16 (relative); P: a GEMM's rounding of a partial sum (relative to sum |terms|)."""

    rounding: float
    partial: float


CUDA = Roundings(U_BF16, 0.0)
INTERPRETER = Roundings(2 * U_BF16, 2 * U_BF16)


def _gamma(n: int) -> float:
    return n * U_FP32 / (1 - n * U_FP32)


def _inputs(tokens: int, hidden_size: int, vocab: int, start: int, valid: int, device: str, seed: int):
    """bf16 hidden states (post-norm scale 1) and weight (logits of std 3, as a trained LM's), labels in
    the shard's real columns [start, start + valid): half the rows the most likely token, the rest
    uniform, 5% ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g, device=device).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, generator=g, device=device) * 3 / hidden_size**0.5).to(
        torch.bfloat16
    )
    local = torch.randint(0, valid, (tokens,), generator=g, device=device)
    for rows in common.row_chunks(tokens, vocab):
        likely = (hidden[rows] @ weight[:valid].T).argmax(-1)
        local[rows] = torch.where(torch.arange(tokens, device=device)[rows] % 2 == 0, likely, local[rows])
    labels = local + start
    labels[torch.rand(tokens, generator=g, device=device) < 0.05] = IGNORE
    grad_out = torch.randn(tokens, generator=g, device=device)
    return hidden, weight, labels, grad_out


def _kernel(hidden, weight, labels, grad_out, start: int, vocab_size: int | None):
    """Values and (d hidden, d weight) through the production path: the Triton kernels, no fallback."""
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_token_logprobs(
        x, w, labels, vocab_start_index=start, ignore_index=IGNORE, backend="triton", vocab_size=vocab_size
    )
    d_hidden, d_weight = torch.autograd.grad(out, (x, w), grad_out)
    return out, d_hidden, d_weight


def _reference_and_bounds(
    hidden, weight, labels, grad_out, start: int, valid: int, roundings: Roundings
) -> dict[str, torch.Tensor]:
    """float64 values and gradients from the same bf16 inputs over the shard's ``valid`` real columns,
    and each element's bound (module docstring); the padding rows' gradient and bound are 0."""
    r, partial = roundings
    tokens, hidden_size = hidden.shape
    w64 = weight[:valid].double()
    abs_w = w64.abs()
    kept = labels != IGNORE
    local = torch.where(kept, labels - start, 0)
    g = torch.where(kept, grad_out.double(), 0.0)
    ref = {
        "value": torch.zeros(tokens, dtype=torch.float64, device=hidden.device),
        "value_bound": torch.zeros(tokens, dtype=torch.float64, device=hidden.device),
        "d_hidden": torch.empty_like(hidden, dtype=torch.float64),
        "d_hidden_bound": torch.empty_like(hidden, dtype=torch.float64),
        "d_weight": torch.zeros_like(weight, dtype=torch.float64),
        "d_weight_bound": torch.zeros_like(weight, dtype=torch.float64),
    }
    err_x = torch.zeros_like(w64)  # E^T |X|
    size_x = torch.zeros_like(w64)  # (|G| + E)^T |X|
    for start_row in range(0, tokens, ROWS_PER_CHECK):
        rows = slice(start_row, start_row + ROWS_PER_CHECK)
        x = hidden[rows].double()
        z = x @ w64.T
        e = r * z.abs() + (2 * _gamma(hidden_size) + partial) * (x.abs() @ abs_w.T)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        p = (z - lse).exp()
        pe = (p * e).sum(-1, keepdim=True)
        label = local[rows, None]
        ref["value"][rows] = torch.where(kept[rows], (z.gather(1, label) - lse).squeeze(1), 0.0)
        ref["value_bound"][rows] = (2 * (e.gather(1, label) + pe) + STATS_ABS).squeeze(1)
        g_rows = g[rows, None]
        grad = (-p * g_rows).scatter_add_(1, label, g_rows)
        p_error = p * (2 * (e + pe) + STATS_ABS + 4 * U_FP32 * (z.abs() + lse.abs()))
        error = g_rows.abs() * p_error * (1 + r) + r * grad.abs()
        size = grad.abs() + error
        ref["d_hidden"][rows] = grad @ w64
        ref["d_hidden_bound"][rows] = error @ abs_w + (2 * _gamma(valid) + partial) * (size @ abs_w)
        ref["d_weight"][:valid] += grad.T @ x
        err_x += error.T @ x.abs()
        size_x += size.T @ x.abs()
    ref["d_weight_bound"][:valid] = err_x + (3 * _gamma(tokens) + r + partial) * size_x
    for name in ("d_hidden", "d_weight"):  # the result's own rounding to bf16
        ref[f"{name}_bound"] += r * (ref[name].abs() + ref[f"{name}_bound"])
    return ref


def _violations(ref: dict[str, torch.Tensor], out, d_hidden, d_weight, labels) -> dict[str, int]:
    """How many values and gradient elements exceed their bounds (ignored tokens: exactly 0)."""
    ignored = labels == IGNORE
    value_error = (out.double() - ref["value"]).abs()
    return {
        "value": int((value_error[~ignored] > ref["value_bound"][~ignored]).sum()),
        "ignored": int((out[ignored] != 0).sum()),
        "d_hidden": int(((d_hidden.double() - ref["d_hidden"]).abs() > ref["d_hidden_bound"]).sum()),
        "d_weight": int(((d_weight.double() - ref["d_weight"]).abs() > ref["d_weight_bound"]).sum()),
    }


def _bound_sizes(ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """The bounds' size against what they must catch (compared with ``_BOUND_POWER``)."""
    return {
        "value": float(ref["value_bound"].max()),
        "d_hidden": float(ref["d_hidden_bound"].norm() / ref["d_hidden"].norm()),
        "d_weight": float(ref["d_weight_bound"].norm() / ref["d_weight"].norm()),
    }


def _check(
    shape: tuple[int, int, int], start: int, vocab_size: int | None, device: str, roundings: Roundings
) -> None:
    """The kernel within its bounds everywhere, and the bounds tight enough to matter."""
    tokens, hidden_size, vocab = shape
    valid = common.valid_columns(vocab, start, vocab_size)
    hidden, weight, labels, grad_out = _inputs(*shape, start, valid, device, seed=vocab + start)
    out, d_hidden, d_weight = _kernel(hidden, weight, labels, grad_out, start, vocab_size)
    assert out.dtype == torch.float32 and d_hidden.dtype == d_weight.dtype == torch.bfloat16
    ref = _reference_and_bounds(hidden, weight, labels, grad_out, start, valid, roundings)
    assert _violations(ref, out, d_hidden, d_weight, labels) == dict.fromkeys(
        ("value", "ignored", "d_hidden", "d_weight"), 0
    )
    sizes = _bound_sizes(ref)
    assert all(sizes[key] < limit for key, limit in _BOUND_POWER.items()), sizes


QWEN_ROWS, QWEN_TOKENS = 151936, 151665  # Qwen2.5's embedding rows, and its real vocabulary


@pytest.mark.gpu
@pytest.mark.parametrize(
    "start, vocab_size",
    [(0, None), (QWEN_ROWS, QWEN_ROWS + QWEN_TOKENS)],
    ids=["first-shard", "later-shard-with-padding"],
)
def test_qwen_shape_bf16_against_float64(start, vocab_size, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    _check((2048, 896, QWEN_ROWS), start, vocab_size, "cuda", CUDA)


def test_the_check_at_a_small_shape_in_the_interpreter(cpu_triton, monkeypatch):
    """Default suite: the same check on CPU tensors (several token chunks), passing for the kernel and
    failing for a shard-offset bug or padding left in the softmax, so the GPU test's reference and
    bounds are known to work and to discriminate."""
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 24 * 1000)
    shape, start, vocab_size = (96, 64, 1000), 3000, 3937  # the shard's last 63 columns are padding
    _check(shape, start, None, "cpu", INTERPRETER)
    _check(shape, start, vocab_size, "cpu", INTERPRETER)

    tokens, valid = shape[0], vocab_size - start
    hidden, weight, labels, grad_out = _inputs(*shape, start, valid, "cpu", seed=1)
    ref = _reference_and_bounds(hidden, weight, labels, grad_out, start, valid, INTERPRETER)
    shifted = _kernel(hidden, weight, labels, grad_out, start + 1, vocab_size)  # labels one column off
    found = _violations(ref, *shifted, labels)
    assert found["value"] > 0.5 * tokens and found["d_hidden"] > 0 and found["d_weight"] > 0, found
    padding_in_softmax = _kernel(hidden, weight, labels, grad_out, start, None)
    assert _violations(ref, *padding_in_softmax, labels)["d_weight"] > 0  # the padding rows' gradient
