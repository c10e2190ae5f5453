"""A recipe's token limits per role and per preference group, padded as packing pads them.

Shared by validation (is ``dataset.max_tokens`` enough for the largest group?) and the dry-run planner.
"""

from __future__ import annotations

from ..data.packing import context_slots, pad_multiple_for, padded_sequence_length
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


def prompts_shared(cfg: RecipeConfig) -> bool | None:
    """Whether ``dataset.share_prompt`` shares prompts, as far as the recipe tells: None where that
    depends on the machine (``auto`` with ``model.attention_backend=auto``: Transformer Engine's
    attention, where it is installed, cannot share)."""
    setting, attention = cfg.dataset.share_prompt, cfg.model.attention_backend
    if setting == "false" or attention == "te":
        return False
    if setting == "true" or attention in ("flex", "sdpa"):
        return True
    return None


def slot_limits(cfg: RecipeConfig, share_prompt: bool) -> list[int] | None:
    """Each slot of the largest possible group, padded (None when a needed limit is unset).

    A shared slot holds the prompt once: its answers after the first add their own tokens only, each
    at most ``dataset.max_short_length`` (an answer fits a short sequence: enforced where the short roles
    are trained, assumed otherwise). Without that limit a shared slot is bounded as its sequences apart.
    """
    ds, m = cfg.dataset, cfg.model
    multiple = pad_multiple_for(m.context_parallel_size, m.tensor_model_parallel_size, m.sequence_parallel)
    roles = required_roles(cfg.solopo.loss_config())
    slots = []
    for slot in context_slots(roles, share_prompt):
        limit = ds.max_short_length if roles[slot[0]].startswith("short") else ds.max_long_length
        if limit is None:
            return None
        tokens = len(slot) * limit
        if ds.max_short_length is not None:
            tokens = min(tokens, limit + (len(slot) - 1) * ds.max_short_length)
        slots.append(padded_sequence_length(tokens, multiple))
    return slots


def largest_group_tokens(cfg: RecipeConfig, share_prompt: bool = False) -> int | None:
    """Tokens of the largest possible preference group (every role at its limit, padded), or None."""
    slots = slot_limits(cfg, share_prompt)
    return sum(slots) if slots else None
