"""A recipe's token limits per role and per preference group, padded as packing pads them.

Shared by validation (is ``dataset.max_tokens`` enough for the largest group?) and the dry-run planner.
"""

from __future__ import annotations

from ..data.packing import pad_multiple_for, padded_sequence_length
from ..objectives import required_roles
from .schema import RecipeConfig


def role_limits(cfg: RecipeConfig) -> dict[str, int] | None:
    """Each required role's token limit, padded as packing pads it (None when a needed limit is unset)."""
    ds, m = cfg.dataset, cfg.model
    multiple = pad_multiple_for(m.context_parallel_size, m.tensor_model_parallel_size, m.sequence_parallel)
    limits = {}
    for role in required_roles(cfg.solopo.loss_config()):
        limit = ds.max_short_length if role.startswith("short") else ds.max_long_length
        if limit is None:
            return None
        limits[role] = padded_sequence_length(limit, multiple)
    return limits


def largest_group_tokens(cfg: RecipeConfig) -> int | None:
    """Tokens of the largest possible preference group (every role at its limit, padded), or None."""
    limits = role_limits(cfg)
    return sum(limits.values()) if limits else None
