"""solopo_kernels: log-prob kernels for SoLoPO, independent of Megatron.

Named ``solopo_kernels`` (not ``kernels``) so it never clashes with the unrelated PyPI package
``kernels``. This module only re-exports the public API:

- ``token_logprobs`` (``logprobs``): vocab-parallel token log-probs, Triton or pure torch;
- ``linear_token_logprobs`` (``linear_logprobs``): fused LM head + token log-probs, pure torch;
- ``segment_sum`` (``segmented_sum``): deterministic per-segment sums with autograd;
- ``token_logprobs_reference``, ``segment_sum_reference`` (``reference``): the pure-torch oracles;
- ``default_backend``, ``kernel_choice`` (``dispatch``): the backend that ``backend=None`` means.

Entry points take ``backend`` = ``auto`` | ``triton`` | ``torch`` | None (``SOLOPO_KERNELS``, read
once). Importing this package does not import Triton; the kernels load on first use.
"""

from __future__ import annotations

from .dispatch import BACKENDS, default_backend, kernel_choice
from .linear_logprobs import linear_token_logprobs
from .logprobs import token_logprobs
from .reference import segment_sum_reference, token_logprobs_reference
from .segmented_sum import segment_sum

__all__ = [
    "BACKENDS",
    "default_backend",
    "kernel_choice",
    "linear_token_logprobs",
    "segment_sum",
    "segment_sum_reference",
    "token_logprobs",
    "token_logprobs_reference",
]
