"""The Triton log-prob kernels address rows past 2^31 elements (int64 row offsets), on CPU in the interpreter.

A [T, V] logits view whose rows start 2^30 + 64 elements apart (a stride that still fits an int32
argument, as a row of a wide strided buffer does) puts row 2 at element 2^31 + 128: computed in int32,
``row * row_stride`` wraps to a negative offset and the kernel reads (or writes) 4 GiB before the buffer.
The buffer is ``torch.empty`` of about 2^31 bf16 elements: 4 GiB of address space, of which only the
pages of the three rows are ever touched. The kernels run in a subprocess, so a bad address is a
failed test rather than a crashed pytest. Values and gradients (both backward variants: a new gradient
tensor, and the gradient written in place into the strided logits) against float64 on the same rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from triton_support import triton_runs_on_cpu

ROW_STRIDE = (1 << 30) + 64  # row 2 starts at 2^31 + 128 elements
TOKENS, VOCAB = 3, 1000  # a vocabulary that is no power of two: the last block is masked
CANNOT_ALLOCATE = 3  # the subprocess's exit status when the 4 GiB of address space is refused


def check_rows_past_2_to_the_31(inplace_backward: bool) -> None:
    """Runs in the subprocess: Triton log-probs and their gradient on the far rows against float64."""
    import torch
    import torch.nn.functional as F

    import solopo_kernels
    from solopo_kernels import token_logprobs

    try:
        buffer = torch.empty((TOKENS - 1) * ROW_STRIDE + VOCAB, dtype=torch.bfloat16)
    except RuntimeError:
        sys.exit(CANNOT_ALLOCATE)
    logits = buffer.as_strided((TOKENS, VOCAB), (ROW_STRIDE, 1))
    assert logits.storage_offset() + (TOKENS - 1) * logits.stride(0) > 2**31
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(TOKENS, VOCAB, generator=g, dtype=torch.float64) * 4).to(torch.bfloat16)
    with torch.no_grad():
        logits.copy_(values)
    labels = torch.tensor([5, VOCAB - 1, 517])
    grad_out = torch.randn(TOKENS, generator=g, dtype=torch.float32)

    logits.requires_grad_()  # a leaf view: its gradient is [T, V], never the buffer's size
    got = token_logprobs(logits, labels, backend="triton", inplace_backward=inplace_backward)
    got.backward(grad_out)

    exact = values.double().requires_grad_()
    want = F.log_softmax(exact, dim=-1).gather(1, labels[:, None]).squeeze(1)
    want.backward(grad_out.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # Formed in fp32 and rounded once to bf16: within one bf16 ulp of the largest entry (bounded by |g|),
    # the budget of tests/test_logprobs.py.
    scale = grad_out.abs().max().double()
    torch.testing.assert_close(logits.grad.double() / scale, exact.grad / scale, rtol=0, atol=2**-7)
    print(f"row offsets ok (inplace_backward={inplace_backward}): {solopo_kernels.__file__}")


def _run_check(tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "SOLOPO_KERNELS": "triton", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, __file__],
        cwd=tmp_path,  # imports solopo_kernels from the install (or PYTHONPATH), not from the cwd
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_triton_kernels_address_rows_past_2_to_the_31_elements(tmp_path):
    if not triton_runs_on_cpu():
        pytest.skip("CPU tensors run Triton only in interpreter mode (machines without CUDA)")
    done = _run_check(tmp_path)
    if done.returncode == CANNOT_ALLOCATE:
        pytest.skip("this machine refuses 4 GiB of address space for the strided buffer")
    # A negative status is the signal that killed it (-11: a segmentation fault, an int32 row offset).
    assert done.returncode == 0, f"status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert done.stdout.count("row offsets ok") == 2, done.stdout


if __name__ == "__main__":
    for inplace in (False, True):
        check_rows_past_2_to_the_31(inplace)
