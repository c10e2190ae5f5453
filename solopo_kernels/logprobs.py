"""``token_logprobs``: vocab-parallel token log-probs, dispatched to Triton or the pure-torch reference.

The Triton kernel (``triton_logprobs``) is imported only when it is chosen (see ``dispatch``); fp64
logits always take the reference (``reference.token_logprobs_reference``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from .dispatch import TRITON_LOGPROBS_DTYPES, use_triton
from .reference import token_logprobs_reference

__all__ = ["token_logprobs"]


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    vocab_start_index: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Log-probs [T] (fp32) of ``labels`` under the full-vocab softmax of vocab-parallel ``logits``.

    ``logits`` [T, V_local] is this rank's shard of the vocab (bf16, fp16, fp32; fp64 runs the
    reference and returns fp64), ``labels`` [T] global ids or ``ignore_index`` (log-prob 0, no
    gradient). The result is identical on every rank of ``tp_group``. Gradient flows to ``logits``
    only; no fp32 [T, V_local] buffer is allocated by the Triton path. ``inplace_backward`` (Triton
    path) writes the gradient into the logits' storage. ``backend``: ``auto``, ``triton`` or
    ``torch``; None: ``dispatch.default_backend()`` (the ``SOLOPO_KERNELS`` environment variable).
    ``vocab_size``: the true vocabulary; global columns at or above it (Megatron's padding to a
    multiple of ``make_vocab_size_divisible_by x tp``) stay out of the softmax and get gradient 0.
    """
    if use_triton(logits, backend, supported_dtypes=TRITON_LOGPROBS_DTYPES):
        from .triton_logprobs import token_logprobs_triton

        return token_logprobs_triton(
            logits,
            labels,
            vocab_start_index=vocab_start_index,
            tp_group=tp_group,
            ignore_index=ignore_index,
            inplace_backward=inplace_backward,
            vocab_size=vocab_size,
        )
    return token_logprobs_reference(
        logits,
        labels,
        vocab_start_index=vocab_start_index,
        tp_group=tp_group,
        ignore_index=ignore_index,
        vocab_size=vocab_size,
    )
