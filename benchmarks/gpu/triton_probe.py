"""The preflight's trivial Triton kernel (benchmarks/gpu/preflight.py): x += 1, checked on the host.

A module of its own: ``@triton.jit`` resolves ``tl`` among the module's globals, and importing it only
inside the check keeps the preflight's report alive where Triton itself does not import. On CUDA the
first launch compiles the kernel and its C launcher (the system C compiler, Python's headers); under
TRITON_INTERPRET=1 (a CPU, --cpu-smoke) the interpreter runs it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)


def launch(device: str, n: int = 1000) -> None:
    """Adds one to ``arange(n)`` with the kernel; RuntimeError if the result is wrong."""
    x = torch.arange(n, dtype=torch.float32, device=device)
    _add_one[(triton.cdiv(n, BLOCK),)](x, n, BLOCK=BLOCK)
    if not torch.equal(x.cpu(), torch.arange(n, dtype=torch.float32) + 1):
        raise RuntimeError("the trivial Triton kernel returned a wrong result")
