"""SoLoPO loss: hand-computed values, an independent scalar reference, float64 gradients, errors."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from solopo_megatron.objectives import (
    ORPO_MAX_MEAN_LOGP,
    ROLES,
    SoLoPOConfig,
    orpo_log_odds,
    required_roles,
    solopo_loss,
)

# Every combination of the switches that changes the formula.
CONFIGS = [
    SoLoPOConfig(
        mode=mode, preference_loss=loss, solo_ra_chosen_only=chosen_only, solo_ra_distance=distance, **extra
    )
    for mode, loss, chosen_only, distance, extra in itertools.product(
        ("solopo", "short_po", "long_po"),
        ("dpo", "simpo", "orpo"),
        (True, False),
        ("abs", "squared"),
        ({}, {"beta": 0.7, "solo_ra_weight": 0.3, "simpo_gamma": 1.3, "orpo_lambda": 0.25}),
    )
    if mode == "solopo" or (chosen_only and distance == "abs")  # SoLo-RA switches matter in solopo only
] + [
    SoLoPOConfig(preference_loss="dpo", label_smoothing=0.2),
    SoLoPOConfig(preference_loss="dpo", sft_loss_weight=0.5, mode="long_po"),
    SoLoPOConfig(preference_loss="simpo", sft_loss_weight=1.5, solo_ra_chosen_only=False),
]


def _id(cfg: SoLoPOConfig) -> str:
    return "-".join(f"{k}={v}" for k, v in vars(cfg).items() if v != getattr(SoLoPOConfig, k))


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def scalar_reference_loss(example: dict[str, tuple[float, int, float]], cfg: SoLoPOConfig) -> float:
    """docs/loss.md written out with Python floats, one example at a time."""

    def reward(role: str) -> float:
        s, n, s_ref = example[role]
        if cfg.preference_loss == "dpo":
            return cfg.beta * (s - s_ref)
        if cfg.preference_loss == "simpo":
            return cfg.beta * s / n
        p = math.exp(min(s / n, ORPO_MAX_MEAN_LOGP))
        return math.log(p / (1.0 - p))

    ctx = "long" if cfg.mode == "long_po" else "short"
    m = reward(f"{ctx}_chosen") - reward(f"{ctx}_rejected")
    s_c, n_c, _ = example[f"{ctx}_chosen"]
    if cfg.preference_loss == "dpo":
        eps = cfg.label_smoothing
        loss = -(1 - eps) * _logsigmoid(m) - eps * _logsigmoid(-m)
    elif cfg.preference_loss == "simpo":
        loss = -_logsigmoid(m - cfg.simpo_gamma)
    else:
        loss = -s_c / n_c - cfg.orpo_lambda * _logsigmoid(m)
    loss += cfg.sft_loss_weight * (-s_c / n_c)
    if cfg.mode == "solopo":
        for y in ("chosen",) if cfg.solo_ra_chosen_only else ("chosen", "rejected"):
            gap = reward(f"short_{y}") - reward(f"long_{y}")
            loss += cfg.solo_ra_weight * (abs(gap) if cfg.solo_ra_distance == "abs" else gap * gap)
    return loss


def random_batch(batch: int, seed: int, dtype=torch.float64):
    """Per-role sums of plausible magnitude: n tokens with mean log-prob in (-3, -0.05)."""
    g = torch.Generator().manual_seed(seed)
    num_tokens = {role: torch.randint(1, 60, (batch,), generator=g) for role in ROLES}
    logps = {
        role: -(0.05 + 3 * torch.rand(batch, generator=g, dtype=dtype)) * num_tokens[role] for role in ROLES
    }
    ref = {role: logps[role] + torch.randn(batch, generator=g, dtype=dtype) * 4 for role in ROLES}
    return logps, num_tokens, ref


def test_hand_computed_dpo_solopo():
    # short: r_w = 0.1 * (-10 + 12) = 0.2, r_l = 0.1 * (-15 + 14) = -0.1, margin 0.3
    # long:  r_w = 0.1 * (-20 + 21) = 0.1; SoLo-RA = |0.2 - 0.1| = 0.1
    # loss = log(1 + exp(-0.3)) + 0.1 = 0.5543552 + 0.1
    logps = {
        "short_chosen": torch.tensor([-10.0]),
        "short_rejected": torch.tensor([-15.0]),
        "long_chosen": torch.tensor([-20.0]),
    }
    ref = {
        "short_chosen": torch.tensor([-12.0]),
        "short_rejected": torch.tensor([-14.0]),
        "long_chosen": torch.tensor([-21.0]),
    }
    n = {role: torch.tensor([5]) for role in logps}
    loss, metrics = solopo_loss(logps, n, SoLoPOConfig(), ref)
    assert loss.item() == pytest.approx(0.6543552, abs=1e-6)
    assert metrics["margin/short"].item() == pytest.approx(0.3, abs=1e-6)
    assert metrics["accuracy/short"].item() == 1.0
    assert metrics["solo_ra_gap/chosen"].item() == pytest.approx(0.1, abs=1e-6)
    assert "accuracy/long" not in metrics  # no long_rejected in chosen-only solopo


def test_hand_computed_simpo_and_orpo():
    # simpo, beta=2: r_w = 2 * -4/4 = -2, r_l = 2 * -9/3 = -6, m = 4; loss = -logsigmoid(4 - 0.5)
    logps = {"short_chosen": torch.tensor([-4.0]), "short_rejected": torch.tensor([-9.0])}
    n = {"short_chosen": torch.tensor([4]), "short_rejected": torch.tensor([3])}
    loss, _ = solopo_loss(logps, n, SoLoPOConfig(mode="short_po", preference_loss="simpo", beta=2.0))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.5)), abs=1e-6)
    # orpo: mean log p = log(0.5) for both -> log-odds 0, m = 0
    # loss = -log(0.5) - 0.1 * log(0.5) = 1.1 * log 2
    half = math.log(0.5)
    logps = {"short_chosen": torch.tensor([2 * half]), "short_rejected": torch.tensor([3 * half])}
    n = {"short_chosen": torch.tensor([2]), "short_rejected": torch.tensor([3])}
    loss, metrics = solopo_loss(logps, n, SoLoPOConfig(mode="short_po", preference_loss="orpo"))
    assert loss.item() == pytest.approx(1.1 * math.log(2), abs=1e-6)
    assert metrics["rewards/short_chosen"].item() == pytest.approx(0.0, abs=1e-6)


def test_policy_equals_reference_gives_log2():
    logps, n, _ = random_batch(4, seed=0)
    loss, metrics = solopo_loss(logps, n, SoLoPOConfig(), ref_logps=logps)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2), dtype=torch.float64))
    assert torch.all(metrics["rewards/long_chosen"] == 0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_scalar_reference(cfg):
    batch = 6
    logps, n, ref = random_batch(batch, seed=zlib.crc32(_id(cfg).encode()))
    loss, metrics = solopo_loss(logps, n, cfg, ref)
    assert loss.shape == (batch,) and loss.dtype == torch.float64
    expected = [
        scalar_reference_loss({r: (logps[r][i].item(), n[r][i].item(), ref[r][i].item()) for r in ROLES}, cfg)
        for i in range(batch)
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["loss"], loss.detach())
    # The parts add up to the total.
    parts = metrics["po_loss"] + metrics.get("solo_ra_loss", 0) + metrics.get("sft_loss", 0)
    torch.testing.assert_close(parts, loss.detach())
    assert all(not value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_float64_gradcheck(cfg):
    logps, n, ref = random_batch(3, seed=1)
    roles = required_roles(cfg)
    inputs = tuple(logps[r].clone().requires_grad_() for r in roles)

    def fn(*values):
        return solopo_loss(dict(zip(roles, values)), n, cfg, ref)[0]

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("distance", ["abs", "squared"])
def test_solo_ra_gradient_flows_through_short_and_long(distance):
    cfg = SoLoPOConfig(preference_loss="simpo", solo_ra_distance=distance, solo_ra_chosen_only=False)
    logps, n, _ = random_batch(5, seed=2)
    leaves = {r: logps[r].clone().requires_grad_() for r in ROLES}
    loss, metrics = solopo_loss(leaves, n, cfg)
    loss.sum().backward()
    # Only SoLo-RA touches the long roles: d/dS_long = -weight * d'(gap) * beta / n.
    for y in ("chosen", "rejected"):
        gap = metrics[f"solo_ra_gap/{y}"]
        dd = gap.sign() if distance == "abs" else 2 * gap
        expected = -cfg.solo_ra_weight * dd * cfg.beta / n[f"long_{y}"]
        torch.testing.assert_close(leaves[f"long_{y}"].grad, expected)
        assert leaves[f"short_{y}"].grad.abs().sum() > 0


def test_required_roles():
    assert required_roles(SoLoPOConfig()) == ("short_chosen", "short_rejected", "long_chosen")
    assert required_roles(SoLoPOConfig(solo_ra_chosen_only=False)) == ROLES
    assert required_roles(SoLoPOConfig(mode="short_po")) == ("short_chosen", "short_rejected")
    assert required_roles(SoLoPOConfig(mode="long_po", solo_ra_chosen_only=False)) == (
        "long_chosen",
        "long_rejected",
    )


def test_long_accuracy_reported_when_long_rejected_present():
    logps, n, ref = random_batch(4, seed=3)
    _, metrics = solopo_loss(logps, n, SoLoPOConfig(solo_ra_chosen_only=False), ref)
    margin = (logps["long_chosen"] - ref["long_chosen"]) - (logps["long_rejected"] - ref["long_rejected"])
    torch.testing.assert_close(metrics["accuracy/long"], (margin > 0).double())
    assert {"rewards/long_rejected", "solo_ra_gap/rejected", "margin/long"} <= metrics.keys()


def test_only_required_roles_enter_the_loss_extra_roles_add_metrics():
    logps, n, ref = random_batch(2, seed=4)
    cfg = SoLoPOConfig(mode="short_po")
    short = {r: logps[r] for r in ("short_chosen", "short_rejected")}
    leaves = {r: v.clone().requires_grad_() for r, v in logps.items()}
    loss_all, metrics_all = solopo_loss(leaves, n, cfg, ref)
    loss_short, metrics = solopo_loss(short, n, cfg, ref)
    torch.testing.assert_close(loss_all, loss_short)
    assert not any("long" in key for key in metrics)
    margin = 0.1 * (
        (logps["long_chosen"] - ref["long_chosen"]) - (logps["long_rejected"] - ref["long_rejected"])
    )
    torch.testing.assert_close(metrics_all["margin/long"], margin)
    loss_all.sum().backward()
    assert leaves["long_chosen"].grad is None or torch.all(leaves["long_chosen"].grad == 0)


def test_orpo_log_odds_is_stable():
    u = torch.tensor([-80.0, -20.0, -1.0, -1e-3, -1e-9, 0.0], dtype=torch.float64)
    odds = orpo_log_odds(u)
    assert torch.isfinite(odds).all()
    p = u[:4].exp()
    torch.testing.assert_close(odds[:4], (p / (1 - p)).log())
    assert odds[4] == odds[5] == orpo_log_odds(torch.tensor(ORPO_MAX_MEAN_LOGP, dtype=torch.float64))
    # fp32 keeps full precision far into the tail where log(p) - log1p(-p) would lose it.
    torch.testing.assert_close(orpo_log_odds(torch.tensor([-60.0])), torch.tensor([-60.0]))


def test_dummy_example_without_tokens_is_finite():
    logps, n, ref = random_batch(3, seed=5)
    for role in ROLES:
        logps[role][1] = 0.0
        n[role][1] = 0
    for loss_name in ("dpo", "simpo", "orpo"):
        loss, _ = solopo_loss(logps, n, SoLoPOConfig(preference_loss=loss_name), ref)
        assert torch.isfinite(loss).all()


def test_fp32_and_bf16_inputs_compute_in_fp32():
    logps, n, ref = random_batch(3, seed=6, dtype=torch.float32)
    low = {r: v.bfloat16() for r, v in logps.items()}
    loss, _ = solopo_loss(low, n, SoLoPOConfig(preference_loss="simpo"))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "long"}, "mode must be one of solopo, short_po, long_po"),
        ({"preference_loss": "ipo"}, "preference_loss must be one of dpo, simpo, orpo"),
        ({"solo_ra_distance": "l1"}, "solo_ra_distance must be one of abs, squared"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": float("nan")}, "beta must be finite"),
        ({"beta": "0.1"}, "beta must be a number"),
        ({"label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
        ({"label_smoothing": 0.1, "preference_loss": "simpo"}, "label_smoothing applies to dpo only"),
        ({"sft_loss_weight": -1.0}, "sft_loss_weight must be >= 0"),
        ({"sft_loss_weight": 1.0, "preference_loss": "orpo"}, "orpo already contains the NLL term"),
        ({"solo_ra_weight": -0.1}, "solo_ra_weight must be >= 0"),
        ({"orpo_lambda": -0.1}, "orpo_lambda must be >= 0"),
        ({"solo_ra_chosen_only": "yes"}, "solo_ra_chosen_only must be true or false"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        SoLoPOConfig(**kwargs)


def test_missing_inputs_are_named():
    logps, n, ref = random_batch(2, seed=7)
    cfg = SoLoPOConfig()
    del logps["long_chosen"]
    with pytest.raises(ValueError, match="logps is missing role\\(s\\) long_chosen"):
        solopo_loss(logps, n, cfg, ref)
    logps, n, ref = random_batch(2, seed=7)
    with pytest.raises(ValueError, match="ref_logps is required"):
        solopo_loss(logps, n, cfg)
    del ref["short_rejected"]
    with pytest.raises(ValueError, match="ref_logps is missing role\\(s\\) short_rejected"):
        solopo_loss(logps, n, cfg, ref)
    n["long_chosen"] = n["long_chosen"][:1]
    with pytest.raises(ValueError, match="num_tokens\\['long_chosen'\\] has 1 examples, expected 2"):
        solopo_loss(logps, n, SoLoPOConfig(preference_loss="simpo"))
    logps["short_chosen"] = logps["short_chosen"][:, None]
    with pytest.raises(ValueError, match="must be a 1-D tensor"):
        solopo_loss(logps, n, SoLoPOConfig(preference_loss="simpo"))


@pytest.mark.parametrize("loss_name", ["dpo", "simpo", "orpo"])
def test_abs_solo_ra_has_no_gradient_at_the_noise_floor(loss_name):
    """At step 1 (policy == reference) a SoLo-RA gap is rounding noise: abs keeps its value but gives it
    no gradient, so the step does not depend on the noise's sign; above the floor the gradient is sign(gap)."""
    cfg = SoLoPOConfig(preference_loss=loss_name, solo_ra_distance="abs", beta=0.1)
    base = torch.tensor([-120.0, -80.0])
    num_tokens = {role: torch.tensor([40, 30]) for role in ROLES}
    ref = {role: base.clone() for role in ROLES}
    for shift, expect_gradient in ((torch.tensor([3e-6, -3e-6]), False), (torch.tensor([0.5, -0.5]), True)):
        logps = {role: base.clone().requires_grad_() for role in ROLES}
        with torch.no_grad():
            logps["long_chosen"] += shift  # fp32 noise-sized (about 0.4 ULP of 120) or a real difference
        loss, metrics = solopo_loss(logps, num_tokens, cfg, ref if loss_name == "dpo" else None)
        gap = metrics["solo_ra_gap/chosen"]
        assert torch.allclose(metrics["solo_ra_loss"], cfg.solo_ra_weight * gap.abs())  # the value is kept
        loss.sum().backward()
        grad = logps["long_chosen"].grad
        if expect_gradient:
            assert torch.all(grad != 0) and torch.equal(
                grad.sign(), -gap.sign()
            )  # d|gap|/dS_long = -sign(gap) dr/dS
        else:
            assert torch.all(grad == 0), grad
