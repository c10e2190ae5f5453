"""What one step feeds a data-parallel rank: the global batch's example indices (``GlobalBatchSampler``)
and this DP rank's packed microbatches of whole preference groups (``step_microbatches``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dataset import TokenizedDataset
from .packing import Microbatch, dummy_group, pack_microbatch, plan_microbatches
from .reference_store import ReferenceStore


@dataclass(frozen=True)
class GlobalBatchSampler:
    """Example indices of each step's global batch: a fresh permutation per epoch, fixed by seed.

    ``global_batch_size`` counts examples (preference groups), not sequences or tokens. The last
    incomplete batch of an epoch is dropped (counted in ``dropped_per_epoch``).
    """

    num_examples: int
    global_batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.num_examples < self.global_batch_size:
            raise ValueError(
                f"{self.num_examples} examples cannot fill one global batch of {self.global_batch_size}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_examples - self.steps_per_epoch * self.global_batch_size

    def batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        start = within * self.global_batch_size
        return [int(i) for i in order[start : start + self.global_batch_size]]


def step_microbatches(
    dataset: TokenizedDataset,
    example_indices: Sequence[int],
    roles: Sequence[str],
    *,
    max_tokens: int,
    pad_multiple: int,
    pad_id: int,
    dp_size: int = 1,
    dp_rank: int = 0,
    ref_store: ReferenceStore | None = None,
    pad_to_max_tokens: bool = True,
    share_prompt: bool = False,
) -> list[Microbatch]:
    """This DP rank's microbatches for one global batch (the same count on every DP rank);
    ``share_prompt``: the sequences of one context share a slot (``packing.context_slots``)."""
    if max_tokens % pad_multiple:
        raise ValueError(f"max_tokens={max_tokens} must be a multiple of the padding multiple {pad_multiple}")
    lengths = [dataset.padded_length(i, pad_multiple, share_prompt) for i in example_indices]
    plan = plan_microbatches(lengths, max_tokens, dp_size)
    out = []
    for slot in plan[dp_rank]:
        if slot:
            groups = [dataset.group(example_indices[k], roles, ref_store) for k in slot]
            valid = None
        else:
            groups, valid = [dummy_group(roles, pad_multiple, pad_id)], [False]
        out.append(
            pack_microbatch(
                groups,
                roles,
                pad_multiple=pad_multiple,
                pad_id=pad_id,
                row_length=max_tokens if pad_to_max_tokens else None,
                valid=valid,
                share_prompt=share_prompt,
            )
        )
    return out
