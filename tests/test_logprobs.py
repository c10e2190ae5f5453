"""Single-process token log-probs and per-sequence sums against float64 references."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from triton_support import set_default_backend

from solopo_kernels import common, segment_sum
from solopo_kernels.dispatch import default_backend, triton_interpret_enabled
from solopo_megatron.data.cp_sharding import zigzag_indices
from solopo_megatron.logprobs import sequence_logprobs, token_logprobs

IGNORE = -100


def oracle_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 log_softmax gathered at the labels, 0 at IGNORE."""
    logp = F.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels == IGNORE, torch.zeros_like(picked), picked)


def random_inputs(tokens: int, vocab: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 0.2] = IGNORE
    grad_out = torch.randn(tokens, generator=g, dtype=torch.float64)
    return logits, labels, grad_out


# (values, gradient) tolerances. bf16/fp16 inputs are exact in float64, so the float64 oracle sees
# the same numbers; what differs is fp32 accumulation and the gradient's single rounding to the input
# dtype: at most one ulp of the largest gradient entry (2^-7 relative for bf16, 2^-10 for fp16).
BUDGET = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-4, 2**-7),
    torch.float16: (1e-4, 2**-10),
}


@pytest.mark.parametrize("dtype", list(BUDGET), ids=str)
@pytest.mark.parametrize("tokens, vocab", [(1, 7), (37, 301), (24, 5000)])
def test_token_logprobs_against_float64(kernel_impl, dtype, tokens, vocab):
    if kernel_impl == "triton" and dtype == torch.float64:
        pytest.skip("fp64 logits always take the reference path")
    logits, labels, grad_out = random_inputs(tokens, vocab, dtype, seed=tokens * vocab)
    value_tol, grad_tol = BUDGET[dtype]
    leaf = logits.clone().requires_grad_()
    out = token_logprobs(leaf, labels, ignore_index=IGNORE)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = oracle_token_logprobs(logits, labels)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=value_tol)

    (out.double() * grad_out).sum().backward()
    oracle_leaf = logits.double().requires_grad_()
    (oracle_token_logprobs(oracle_leaf, labels) * grad_out).sum().backward()
    assert leaf.grad.dtype == dtype
    # Gradient entries are bounded by |g|; compare relative to that scale.
    scale = grad_out.abs().max()
    torch.testing.assert_close(leaf.grad.double() / scale, oracle_leaf.grad / scale, rtol=0, atol=grad_tol)
    assert torch.all(leaf.grad[labels == IGNORE] == 0)


def test_gradcheck_float64():
    logits, labels, _ = random_inputs(9, 13, torch.float64, seed=3)
    fn = lambda x: token_logprobs(x, labels, ignore_index=IGNORE)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(),))


def test_row_chunking_gives_identical_results(monkeypatch):
    logits, labels, grad_out = random_inputs(50, 64, torch.float32, seed=4)
    results = []
    for chunk in (1 << 24, 64 * 3, 64):  # one chunk, 3 rows per chunk, one row per chunk
        monkeypatch.setattr(common, "CHUNK_ELEMENTS", chunk)
        leaf = logits.clone().requires_grad_()
        out = token_logprobs(leaf, labels, ignore_index=IGNORE, backend="torch")  # the reference's row chunks
        out.backward(grad_out.float())
        results.append((out, leaf.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_keeps_no_fp32_copy_of_the_logits():
    """Reference: saved for backward are the caller's logits (same storage), labels and an fp32 [T] lse."""
    logits, labels, _ = random_inputs(32, 256, torch.bfloat16, seed=5)
    leaf = logits.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(leaf, labels, ignore_index=IGNORE, backend="torch")
    big = [t for t in saved if t.numel() >= leaf.numel()]
    assert len(big) == 1 and big[0].data_ptr() == leaf.data_ptr() and big[0].dtype == torch.bfloat16
    assert all(t.numel() <= leaf.shape[0] for t in saved if t is not big[0])


def test_no_grad_saves_nothing_and_matches(kernel_impl):
    logits, labels, _ = random_inputs(16, 40, torch.float32, seed=6)
    with torch.no_grad():
        out = token_logprobs(logits, labels, ignore_index=IGNORE)
    torch.testing.assert_close(out.double(), oracle_token_logprobs(logits, labels), rtol=0, atol=1e-5)


def test_vocab_start_index_shifts_label_ownership(kernel_impl):
    """Single process, one shard: labels outside [start, start + V) are owned by nobody -> target 0."""
    logits, _, _ = random_inputs(6, 10, torch.float32, seed=7)
    labels = torch.tensor([100, 105, 109, 99, 110, IGNORE])
    out = token_logprobs(logits, labels, vocab_start_index=100, ignore_index=IGNORE)
    lse = torch.logsumexp(logits, dim=1)
    expected = (
        torch.stack([logits[0, 0], logits[1, 5], logits[2, 9], torch.tensor(0.0), torch.tensor(0.0)])
        - lse[:5]
    )
    torch.testing.assert_close(out[:5], expected)
    assert out[5] == 0 and out.dtype == torch.float32


@pytest.mark.parametrize("bad", ["logits", "labels", "dtype"])
def test_token_logprobs_rejects_bad_shapes(kernel_impl, bad):
    logits, labels, _ = random_inputs(4, 5, torch.float32, seed=8)
    if bad == "logits":
        logits = logits[None]
    elif bad == "labels":
        labels = labels[:3]
    else:
        labels = labels.float()
    with pytest.raises(ValueError, match=bad if bad != "dtype" else "integer"):
        token_logprobs(logits, labels)


def loop_reference_sums(token_logps, loss_mask, segment_ids, num_segments):
    sums = torch.zeros(num_segments, dtype=torch.float64)
    for t in range(token_logps.numel()):
        if loss_mask[t] and segment_ids[t] >= 0:
            sums[segment_ids[t]] += token_logps[t].double()
    return sums


def test_sequence_logprobs_matches_loop_and_has_unit_gradient(kernel_impl):
    g = torch.Generator().manual_seed(9)
    tokens, num_segments = 200, 7
    segment_ids = torch.sort(torch.randint(-1, num_segments, (tokens,), generator=g)).values
    loss_mask = torch.rand(tokens, generator=g) < 0.6
    token_logps = (-5 * torch.rand(tokens, generator=g, dtype=torch.float64)).requires_grad_()
    sums = sequence_logprobs(token_logps, loss_mask, segment_ids, num_segments)
    torch.testing.assert_close(sums, loop_reference_sums(token_logps, loss_mask, segment_ids, num_segments))
    weights = torch.randn(num_segments, generator=g, dtype=torch.float64)
    (sums * weights).sum().backward()
    keep = loss_mask & (segment_ids >= 0)
    expected = torch.where(keep, weights[segment_ids.clamp(min=0)], torch.zeros(()))
    torch.testing.assert_close(token_logps.grad, expected)


def test_sequence_logprobs_masked_nan_does_not_leak(kernel_impl):
    token_logps = torch.tensor([-1.0, float("nan"), -2.0, float("-inf"), -0.5], requires_grad=True)
    loss_mask = torch.tensor([1, 0, 1, 1, 1])
    segment_ids = torch.tensor([0, 0, 1, -1, 1])
    sums = sequence_logprobs(token_logps, loss_mask, segment_ids, 3)
    torch.testing.assert_close(sums, torch.tensor([-1.0, -2.5, 0.0]))
    sums.sum().backward()
    torch.testing.assert_close(token_logps.grad, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))


def test_sequence_logprobs_packing_invariance(kernel_impl):
    """A sequence alone or packed among others gets bitwise the same sum."""
    g = torch.Generator().manual_seed(10)
    alone = -3 * torch.rand(30, generator=g)
    others = -3 * torch.rand(50, generator=g)
    packed = torch.cat([others[:20], alone, others[20:]])
    segments = torch.cat([torch.zeros(20), torch.ones(30), torch.full((30,), 2)]).long()
    mask = torch.ones(80, dtype=torch.bool)
    packed_sums = sequence_logprobs(packed, mask, segments, 3)
    alone_sum = sequence_logprobs(alone, torch.ones(30, dtype=torch.bool), torch.zeros(30).long(), 1)
    assert torch.equal(packed_sums[1:2], alone_sum)


def test_sequence_logprobs_rejects_mismatched_shapes(kernel_impl):
    with pytest.raises(ValueError, match="1-D of one length"):
        sequence_logprobs(torch.zeros(4), torch.ones(3), torch.zeros(4).long(), 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_token_logprobs_batch_invariant_and_deterministic(kernel_impl, dtype):
    """A sequence's log-probs and gradients alone equal, bitwise, those it gets packed among others."""
    logits, labels, grad_out = random_inputs(60, 777, dtype, seed=11)
    alone = slice(17, 41)
    results = []
    for rows in (slice(0, 60), alone, slice(0, 60)):
        leaf = logits[rows].clone().requires_grad_()
        out = token_logprobs(leaf, labels[rows], ignore_index=IGNORE)
        out.backward(grad_out[rows].float())
        results.append((out.detach(), leaf.grad))
    packed, single, again = results
    assert torch.equal(packed[0][alone], single[0]) and torch.equal(packed[1][alone], single[1])
    assert torch.equal(packed[0], again[0]) and torch.equal(packed[1], again[1])


def test_triton_saves_only_logits_labels_and_lse(cpu_triton, monkeypatch):
    logits, labels, _ = random_inputs(32, 300, torch.bfloat16, seed=12)
    leaf = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(leaf, labels, ignore_index=IGNORE)
    assert [tuple(t.shape) for t in saved] == [(32, 300), (32,), (32,)]
    assert saved[0].data_ptr() == leaf.data_ptr() and saved[2].dtype == torch.float32


def test_triton_inplace_backward_writes_gradient_into_logits(cpu_triton, monkeypatch):
    logits, labels, grad_out = random_inputs(20, 130, torch.bfloat16, seed=13)
    expected_leaf = logits.clone().requires_grad_()
    token_logprobs(expected_leaf, labels, ignore_index=IGNORE).backward(grad_out.float())

    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1  # an intermediate, like the output layer's logits
    token_logprobs(buffer, labels, ignore_index=IGNORE, inplace_backward=True).backward(grad_out.float())
    assert torch.equal(leaf.grad, expected_leaf.grad)
    assert torch.equal(buffer.detach(), expected_leaf.grad)  # the logits' storage now holds the gradient


def test_forced_triton_rejects_unsupported_dtype(cpu_triton, monkeypatch):
    logits, labels, _ = random_inputs(3, 5, torch.float64, seed=14)
    with pytest.raises(RuntimeError, match="does not take torch.float64"):
        token_logprobs(logits, labels)
    set_default_backend(monkeypatch, "cuda")
    with pytest.raises(ValueError, match="SOLOPO_KERNELS must be one of auto, triton, torch"):
        token_logprobs(logits, labels)


def test_backend_argument_overrides_the_default(monkeypatch):
    """``backend=`` beats SOLOPO_KERNELS either way; fp64 shows which path ran (only Triton rejects it)."""
    logits, labels, _ = random_inputs(3, 5, torch.float64, seed=17)
    set_default_backend(monkeypatch, "torch")
    expected = token_logprobs(logits, labels)
    with pytest.raises(RuntimeError, match="'triton' backend"):
        token_logprobs(logits, labels, backend="triton")  # forced, on fp64 (or, with CUDA, on a CPU tensor)
    set_default_backend(monkeypatch, "triton")
    assert torch.equal(token_logprobs(logits, labels, backend="torch"), expected)
    assert torch.equal(token_logprobs(logits, labels, backend="auto"), expected)  # auto: fp64 -> reference
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch or None, got 'cuda'"):
        token_logprobs(logits, labels, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        segment_sum(
            logits[:, 0], torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), 1, backend="cuda"
        )


def test_default_backend_is_read_once(monkeypatch):
    set_default_backend(monkeypatch, "torch")
    assert default_backend() == "torch"
    monkeypatch.setenv("SOLOPO_KERNELS", "triton")
    assert default_backend() == "torch"  # cached: the variable is read once
    default_backend.cache_clear()
    assert default_backend() == "triton"
    monkeypatch.delenv("SOLOPO_KERNELS")
    default_backend.cache_clear()
    assert default_backend() == "auto"


def test_segment_sum_backends_agree(cpu_triton):
    """Explicit backends on one input: Triton (the default here) and the reference, values and gradients."""
    g = torch.Generator().manual_seed(18)
    values = torch.randn(300, generator=g, dtype=torch.float64)
    keep = torch.rand(300, generator=g) < 0.7
    segments = torch.sort(torch.randint(-1, 6, (300,), generator=g)).values
    results = {}
    for backend in ("triton", "torch"):
        leaf = values.clone().requires_grad_()
        sums = segment_sum(leaf, keep, segments, 6, backend=backend)
        sums.backward(torch.arange(6, dtype=torch.float64))
        results[backend] = (sums.detach(), leaf.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(results["triton"][1], results["torch"][1])


def test_interpreter_flag_falls_back_to_the_environment(monkeypatch):
    """Older Triton releases (no ``triton.knobs``) read TRITON_INTERPRET; so does the dispatch."""
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))  # an old Triton: no knobs
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpret_enabled() is expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_interpret_enabled() is False


@pytest.mark.parametrize(
    "code",
    [
        "import solopo_kernels, solopo_megatron.logprobs",
        # The CPU-only data CLI and the dry-run planner never pay for Triton's import.
        "from solopo_megatron.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "from solopo_megatron.train import main\nassert main(['--dry-run', '--config', 'recipes/tiny-cpu.yaml']) == 0",
    ],
    ids=["import", "solopo-data --help", "solopo-train --dry-run"],
)
def test_triton_is_not_imported_until_a_kernel_runs(code):
    env = {**os.environ, "TRITON_INTERPRET": "1", "SOLOPO_KERNELS": "triton"}
    check = "\nimport sys\nassert 'triton' not in sys.modules, 'triton was imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code + check], check=True, env=env, cwd=root, capture_output=True)


def test_masked_vocab_gives_finite_log_probs(kernel_impl):
    """-inf logits (a masked vocab block or a whole shard) must not turn into NaN."""
    logits, labels, grad_out = random_inputs(6, 4200, torch.float32, seed=15)
    logits[:, :4100] = float("-inf")  # the whole first Triton block, most of the second
    labels = 4100 + labels % 100
    leaf = logits.clone().requires_grad_()
    out = token_logprobs(leaf, labels, ignore_index=IGNORE)
    out.backward(grad_out.float())
    torch.testing.assert_close(out.double(), oracle_token_logprobs(logits, labels), rtol=0, atol=1e-5)
    assert torch.isfinite(leaf.grad).all() and torch.all(leaf.grad[:, :4100] == 0)


def test_strided_logits_and_int32_labels(kernel_impl):
    logits, labels, grad_out = random_inputs(20, 300, torch.bfloat16, seed=16)
    wide = torch.cat([logits, torch.randn(20, 44).bfloat16()], dim=1)
    view = wide[:, :300]  # row stride 344, not 300
    leaf = wide.clone().requires_grad_()
    out = token_logprobs(leaf[:, :300], labels.int(), ignore_index=IGNORE)
    out.backward(grad_out.float())
    torch.testing.assert_close(out.double(), oracle_token_logprobs(view, labels), rtol=0, atol=1e-4)
    assert torch.all(leaf.grad[:, 300:] == 0)


def test_segment_sum_ignores_out_of_range_ids_forward_and_backward(kernel_impl):
    values = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    sums = sequence_logprobs(values, torch.ones(4, dtype=torch.bool), torch.tensor([0, 1, 5, -1]), 2)
    torch.testing.assert_close(sums, torch.tensor([1.0, 2.0]))
    sums.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    empty = sequence_logprobs(
        values.detach(), torch.ones(4, dtype=torch.bool), torch.tensor([0, 1, 5, -1]), 0
    )
    assert empty.shape == (0,)


def test_segment_spans_handle_padding_and_empty_segments():
    from solopo_kernels.segmented_sum import segment_spans

    first, end = segment_spans(torch.tensor([-1, 0, 0, 2, 2, 2, -1, 7]), 4)
    assert first.tolist() == [1, 8, 3, 8] and end.tolist() == [3, 0, 6, 0]


def test_zigzag_matches_transformer_engine_order():
    assert zigzag_indices([0, 8, 16], 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert zigzag_indices([0, 8, 16], 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_partitions_every_sequence(cp):
    cu = [0]
    for length in (2 * cp, 6 * cp, 4 * cp, 2 * cp):
        cu.append(cu[-1] + length)
    shards = [zigzag_indices(cu, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(cu[-1]))
    assert len({s.numel() for s in shards}) == 1  # balanced


def test_zigzag_rejects_bad_lengths():
    with pytest.raises(ValueError, match="sequence 1 has length 6, not a multiple of 2\\*cp = 4"):
        zigzag_indices([0, 8, 14], 2, 0)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        zigzag_indices([0, 8], 2, 2)
