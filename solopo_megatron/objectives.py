"""SoLoPO objectives: rewards, preference losses and short-to-long reward alignment.

Pure torch, no torch.distributed: every function maps per-example sequence log-prob sums to
per-example losses and metrics. docs/loss.md writes out every formula (rewards, the three preference
losses, the SFT term, SoLo-RA and its rounding floor, the batch mean); in short:

    L = L_PO(c, y_w, y_l) + sft_loss_weight * NLL(c, y_w)
        + solo_ra_weight * sum_y d(r(short, y) - r(long, y))   (the last term in mode solopo only)

where c is the short context (modes ``solopo``, ``short_po``) or the long one (``long_po``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

ROLES = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")

MODES = ("solopo", "short_po", "long_po")
PREFERENCE_LOSSES = ("dpo", "simpo", "orpo")
SOLO_RA_DISTANCES = ("abs", "squared")

# ORPO's log-odds diverge as the mean token log-prob u -> 0 (p -> 1). Mean log-probs above this
# value (a geometric-mean token probability above 1 - 1e-6) are clamped so the loss stays finite.
ORPO_MAX_MEAN_LOGP = -1e-6


@dataclass(frozen=True)
class SoLoPOConfig:
    """Hyper-parameters of the SoLoPO loss (the ``solopo:`` section of a recipe)."""

    mode: str = "solopo"  # solopo | short_po | long_po
    preference_loss: str = "dpo"  # dpo | simpo | orpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    sft_loss_weight: float = 0.0
    solo_ra_weight: float = 1.0  # alpha
    solo_ra_chosen_only: bool = True
    solo_ra_distance: str = "abs"  # abs | squared

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("preference_loss", self.preference_loss, PREFERENCE_LOSSES)
        _check_choice("solo_ra_distance", self.solo_ra_distance, SOLO_RA_DISTANCES)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"SoLoPOConfig.{f.name} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"SoLoPOConfig.{f.name} must be finite, got {value!r}")
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"SoLoPOConfig.{f.name} must be true or false, got {value!r}")
        if self.preference_loss in ("dpo", "simpo") and self.beta <= 0:
            raise ValueError(f"SoLoPOConfig.beta must be > 0 for {self.preference_loss}, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"SoLoPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.preference_loss != "dpo":
            raise ValueError(
                "SoLoPOConfig.label_smoothing applies to dpo only, "
                f"got {self.label_smoothing} with preference_loss={self.preference_loss}"
            )
        if self.sft_loss_weight < 0:
            raise ValueError(f"SoLoPOConfig.sft_loss_weight must be >= 0, got {self.sft_loss_weight}")
        if self.sft_loss_weight and self.preference_loss == "orpo":
            raise ValueError(
                "SoLoPOConfig.sft_loss_weight is for dpo/simpo; orpo already contains the NLL term "
                "(set sft_loss_weight: 0)"
            )
        if self.orpo_lambda < 0:
            raise ValueError(f"SoLoPOConfig.orpo_lambda must be >= 0, got {self.orpo_lambda}")
        if self.solo_ra_weight < 0:
            raise ValueError(f"SoLoPOConfig.solo_ra_weight must be >= 0, got {self.solo_ra_weight}")

    @property
    def po_context(self) -> str:
        """The context the preference term is computed on: ``short`` or ``long``."""
        return "long" if self.mode == "long_po" else "short"

    @property
    def needs_reference(self) -> bool:
        return self.preference_loss == "dpo"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SoLoPOConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def required_roles(cfg: SoLoPOConfig) -> tuple[str, ...]:
    """The sequences (roles) each example needs under ``cfg``; only these are packed and forwarded."""
    if cfg.mode == "short_po":
        return ("short_chosen", "short_rejected")
    if cfg.mode == "long_po":
        return ("long_chosen", "long_rejected")
    if cfg.solo_ra_chosen_only:
        return ("short_chosen", "short_rejected", "long_chosen")
    return ROLES


def _solo_ra_responses(cfg: SoLoPOConfig) -> tuple[str, ...]:
    return ("chosen",) if cfg.solo_ra_chosen_only else ("chosen", "rejected")


def _gather_roles(
    what: str, values: Mapping[str, Tensor] | None, roles: tuple[str, ...], batch: int | None
) -> tuple[dict[str, Tensor], int]:
    """Checks that ``values`` has every role as a 1-D tensor of one common length."""
    if values is None:
        raise ValueError(f"{what} is required (roles {', '.join(roles)})")
    missing = [role for role in roles if role not in values]
    if missing:
        raise ValueError(f"{what} is missing role(s) {', '.join(missing)}; needs {', '.join(roles)}")
    out = {}
    for role in roles:
        value = values[role]
        if not isinstance(value, Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{what}[{role!r}] must be a 1-D tensor [B], got {shape}")
        if batch is None:
            batch = value.shape[0]
        elif value.shape[0] != batch:
            raise ValueError(f"{what}[{role!r}] has {value.shape[0]} examples, expected {batch}")
        out[role] = value
    assert batch is not None
    return out, batch


def _rewards(
    cfg: SoLoPOConfig,
    logps: dict[str, Tensor],
    mean_logps: dict[str, Tensor],
    ref_logps: dict[str, Tensor] | None,
) -> dict[str, Tensor]:
    if cfg.preference_loss == "dpo":
        assert ref_logps is not None
        return {role: cfg.beta * (logps[role] - ref_logps[role]) for role in logps}
    if cfg.preference_loss == "simpo":
        return {role: cfg.beta * mean_logps[role] for role in logps}
    return {role: orpo_log_odds(mean_logps[role]) for role in logps}


def sequence_rewards(
    cfg: SoLoPOConfig,
    logps: Mapping[str, Tensor],
    num_tokens: Mapping[str, Tensor],
    ref_logps: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """role -> the loss's implicit reward of each sequence (DPO: beta (S - S_ref), SimPO: beta S / n,
    ORPO: log-odds of S / n), from sums ``logps`` of ``num_tokens`` response tokens; for metrics."""
    mean = {role: logps[role] / num_tokens[role].to(logps[role].dtype).clamp(min=1) for role in logps}
    ref = dict(ref_logps) if ref_logps is not None else None
    return _rewards(cfg, dict(logps), mean, ref)


def orpo_log_odds(mean_logp: Tensor) -> Tensor:
    """log(p / (1 - p)) for log p = ``mean_logp`` < 0, computed as u - log(-expm1(u))."""
    u = mean_logp.clamp(max=ORPO_MAX_MEAN_LOGP)
    return u - torch.log(-torch.expm1(u))


def _po_loss(cfg: SoLoPOConfig, margin: Tensor, chosen_mean_logp: Tensor) -> Tensor:
    if cfg.preference_loss == "dpo":
        eps = cfg.label_smoothing
        return -(1.0 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    if cfg.preference_loss == "simpo":
        return -F.logsigmoid(margin - cfg.simpo_gamma)
    return -chosen_mean_logp - cfg.orpo_lambda * F.logsigmoid(margin)


# Slack, in units of finfo(dtype).eps, for log-prob sums accumulated in another order (other packing,
# layout or machine): the SoLo-RA noise floor here and the trainer's step-1 reward check use it.
ROUNDING_ULPS = 64


def _reward_noise(
    cfg: SoLoPOConfig, role: str, s: dict, mean: dict, n: dict, ref: dict | None, eps: float
) -> Tensor:
    """How far rounding alone can move a role's reward: the reward's sensitivity to its log-prob sums
    times their unit roundoff (``eps`` of the dtype they were accumulated in), with ``ROUNDING_ULPS``
    of slack. Detached."""
    with torch.no_grad():
        if cfg.preference_loss == "dpo":
            return cfg.beta * eps * ROUNDING_ULPS * (s[role].abs() + ref[role].abs())
        scale = eps * ROUNDING_ULPS * s[role].abs() / n[role].to(s[role].dtype).clamp(min=1)
        if cfg.preference_loss == "simpo":
            return cfg.beta * scale
        u = mean[role].clamp(max=ORPO_MAX_MEAN_LOGP)  # d log-odds / du = 1 / (1 - e^u)
        return scale / -torch.expm1(u)


def _distance(cfg: SoLoPOConfig, gap: Tensor, noise_floor: Tensor) -> Tensor:
    """d(gap). ``abs``: the value is |gap| everywhere, but its gradient is zero while |gap| is within
    ``noise_floor``: there (e.g. at step 1, where policy == reference and every gap is rounding noise)
    the sign of the gap, and so abs's gradient, would be noise that differs by layout and machine."""
    if cfg.solo_ra_distance == "squared":
        return gap.square()
    magnitude = gap.abs()
    return torch.where(magnitude > noise_floor, magnitude, magnitude.detach())


def solopo_loss(
    logps: Mapping[str, Tensor],
    num_tokens: Mapping[str, Tensor],
    cfg: SoLoPOConfig,
    ref_logps: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example SoLoPO loss and metrics.

    Args:
        logps: role -> [B] policy sums of response-token log-probs (any float dtype; computed in fp32,
            or fp64 if given fp64).
        num_tokens: role -> [B] number of response tokens of the *full* sequence (not a CP shard).
        cfg: the loss configuration.
        ref_logps: role -> [B] reference-model sums; required for dpo, ignored otherwise.

    The loss reads only the roles of ``required_roles(cfg)``; other roles given with everything their
    reward needs (e.g. long_rejected at evaluation) add metrics only (rewards, long margin and
    accuracy). Returns the per-example loss [B] (autograd connected to ``logps``) and a dict of
    detached per-example metrics [B].
    """
    roles = required_roles(cfg)
    s, batch = _gather_roles("logps", logps, roles, None)
    n, _ = _gather_roles("num_tokens", num_tokens, roles, batch)
    ref = _gather_roles("ref_logps", ref_logps, roles, batch)[0] if cfg.needs_reference else None

    dtype = torch.float32
    for value in s.values():
        dtype = torch.promote_types(dtype, value.dtype)
    # Unit roundoff of the sums as given (fp32 from the kernels; fp64 in float64 checks).
    eps = max(torch.finfo(value.dtype).eps for value in s.values())
    s = {role: value.to(dtype) for role, value in s.items()}
    # A dummy example (padding group) may have no response tokens; clamp so it yields finite values.
    mean = {role: s[role] / n[role].to(dtype).clamp(min=1) for role in roles}
    if ref is not None:
        ref = {role: value.to(dtype) for role, value in ref.items()}
    rewards = _rewards(cfg, s, mean, ref)

    ctx = cfg.po_context
    margin = rewards[f"{ctx}_chosen"] - rewards[f"{ctx}_rejected"]
    po_loss = _po_loss(cfg, margin, mean[f"{ctx}_chosen"])
    loss = po_loss
    metrics: dict[str, Tensor] = {"po_loss": po_loss}

    if cfg.sft_loss_weight:
        sft_loss = cfg.sft_loss_weight * -mean[f"{ctx}_chosen"]
        loss = loss + sft_loss
        metrics["sft_loss"] = sft_loss

    if cfg.mode == "solopo":
        solo_ra_loss = torch.zeros_like(po_loss)
        for response in _solo_ra_responses(cfg):
            short, long = f"short_{response}", f"long_{response}"
            gap = rewards[short] - rewards[long]
            floor = sum(_reward_noise(cfg, role, s, mean, n, ref, eps) for role in (short, long))
            solo_ra_loss = solo_ra_loss + _distance(cfg, gap, floor)
            metrics[f"solo_ra_gap/{response}"] = gap
        solo_ra_loss = cfg.solo_ra_weight * solo_ra_loss
        loss = loss + solo_ra_loss
        metrics["solo_ra_loss"] = solo_ra_loss

    metrics["loss"] = loss
    # Roles beyond the required ones (e.g. long_rejected at evaluation) feed metrics only.
    extra = _extra_roles(logps, num_tokens, ref_logps if cfg.needs_reference else None, roles, batch)
    with torch.no_grad():
        for role, (s_extra, n_extra, ref_extra) in extra.items():
            s[role] = s_extra.to(dtype)
            mean[role] = s[role] / n_extra.to(dtype).clamp(min=1)
            rewards.update(
                _rewards(
                    cfg,
                    {role: s[role]},
                    {role: mean[role]},
                    None if ref_extra is None else {role: ref_extra.to(dtype)},
                )
            )
    for role in s:
        metrics[f"rewards/{role}"] = rewards[role]
        metrics[f"logps/{role}"] = s[role]
    for context in ("short", "long"):
        if f"{context}_chosen" in s and f"{context}_rejected" in s:
            context_margin = rewards[f"{context}_chosen"] - rewards[f"{context}_rejected"]
            metrics[f"margin/{context}"] = context_margin
            metrics[f"accuracy/{context}"] = (context_margin > 0).to(dtype)
    return loss, {name: value.detach() for name, value in metrics.items()}


def _extra_roles(
    logps, num_tokens, ref_logps, required, batch
) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
    """Roles given beyond ``required`` with everything their reward needs (else ignored)."""
    extra = {}
    for role in ROLES:
        if role in required or role not in logps or role not in num_tokens:
            continue
        if ref_logps is not None and role not in ref_logps:
            continue
        values = (logps[role], num_tokens[role], None if ref_logps is None else ref_logps[role])
        if all(v is None or (isinstance(v, Tensor) and v.shape == (batch,)) for v in values):
            extra[role] = values
    return extra
