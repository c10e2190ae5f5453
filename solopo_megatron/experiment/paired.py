"""Paired statistics of two training runs scored on the same held-out records, and the verdict of a
pre-registered comparison (``compare:`` in an experiment file, :class:`ComparisonSpec`).

Every held-out record gets a decision per run (chosen reward above rejected: 1, else 0). Because both
runs decide on the same records, their difference is judged per record: a paired bootstrap of the mean
difference, and McNemar's exact test on the records where the runs disagree. An arm "improves" when its
accuracy gain over step 0, again paired per record, is at least ``improvement_se`` standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .spec import ComparisonSpec


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (stays inside [0, 1], sane at 0 and n)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = _z(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _z(quantile: float) -> float:
    """The standard normal quantile (bisection on erf: no scipy needed for two numbers)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < quantile:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: the discordant records split as a fair coin would split them."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2 * tail)


@dataclass
class PairedDifference:
    """mean(a - b) over paired records, its paired standard error, bootstrap bounds and McNemar's test."""

    mean: float
    se: float
    interval: tuple[float, float]  # two-sided, at the confidence level
    lower_one_sided: float  # one-sided bound at the confidence level
    upper_one_sided: float
    only_a: int  # records a gets right and b wrong
    only_b: int
    mcnemar_p: float
    records: int

    @property
    def z(self) -> float:
        return (
            self.mean / self.se
            if self.se > 0
            else (0.0 if self.mean == 0 else math.copysign(math.inf, self.mean))
        )


def paired_difference(
    a: Sequence[bool], b: Sequence[bool], *, confidence: float = 0.95, samples: int = 10000, seed: int = 0
) -> PairedDifference:
    """Compares decisions ``a`` and ``b`` of the same records (same order)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired decisions need two equal, non-empty lists, got {x.shape} and {y.shape}")
    d = x - y
    n = d.size
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    tail = 1 - confidence
    only_a, only_b = int((d > 0).sum()), int((d < 0).sum())
    return PairedDifference(
        mean=float(d.mean()),
        se=float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        interval=(float(np.quantile(means, tail / 2)), float(np.quantile(means, 1 - tail / 2))),
        lower_one_sided=float(np.quantile(means, tail)),
        upper_one_sided=float(np.quantile(means, 1 - tail)),
        only_a=only_a,
        only_b=only_b,
        mcnemar_p=mcnemar_exact(only_a, only_b),
        records=n,
    )


def verdict(
    spec: ComparisonSpec,
    difference: PairedDifference,
    treatment_gain: PairedDifference,
    control_gain: PairedDifference,
) -> str:
    """The pre-registered rule (see :class:`ComparisonSpec`) applied to one length."""
    control_improves = control_gain.mean >= spec.improvement_se * control_gain.se
    treatment_improves = treatment_gain.mean >= spec.improvement_se * treatment_gain.se
    if difference.upper_one_sided < 0 or (control_improves and not treatment_improves):
        return "fails"
    if control_improves and treatment_improves:
        if difference.lower_one_sided > 0:
            return "beats"
        if difference.lower_one_sided > -spec.non_inferiority_margin:
            return "matches"
    return "inconclusive"


def decisions_by_run(
    rows: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, int, str], dict[str, Mapping[str, Any]]]:
    """(variant, step, length) -> record id -> row, from per-record rows that carry ``variant``."""
    out: dict[tuple[str, int, str], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["variant"], int(row["step"]), row["length"]), {})[row["id"]] = row
    return out


def compare_runs(spec: ComparisonSpec, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The comparison of ``spec`` from every variant's per-record rows: per length, each arm's accuracy at
    step 0 and at its last evaluation (with 95% Wilson intervals), each arm's paired gain over step 0, the
    paired difference treatment - control at the end, and the verdict; the headline verdict is the
    primary length's."""
    table = decisions_by_run(rows)
    final_step = {
        name: max((step for (variant, step, _) in table if variant == name), default=None)
        for name in (spec.treatment, spec.control)
    }
    for name, step in final_step.items():
        if not step:
            raise ValueError(f"compare: variant {name} has no per-record evaluation rows after training")
    start_of = {name: (spec.baseline or name, 0) for name in (spec.treatment, spec.control)}
    lengths = sorted({length for (_, _, length) in table}, key=length_order)
    primary = spec.primary_length or (lengths[0] if lengths else None)
    if primary not in lengths:
        raise ValueError(
            f"compare.primary_length: {primary!r} was not evaluated (lengths: {', '.join(lengths)})"
        )
    out: dict[str, Any] = {"spec": asdict(spec), "final_steps": final_step, "lengths": {}}
    for length in lengths:
        runs = {
            (name, "step0"): table.get((*start_of[name], length)) for name in (spec.treatment, spec.control)
        } | {(name, "final"): table.get((name, final_step[name], length)) for name in final_step}
        out["lengths"][length] = _compare_length(spec, length, runs)
    out["primary_length"] = primary
    out["verdict"] = out["lengths"][primary]["verdict"]
    return out


def _compare_length(
    spec: ComparisonSpec, length: str, runs: dict[tuple[str, str], dict[str, Mapping[str, Any]] | None]
) -> dict[str, Any]:
    """One length's accuracies, gains over step 0, difference and verdict; ``runs`` maps (variant,
    "step0" | "final") to that evaluation's rows by record id."""
    missing = [f"{name} {when}" for (name, when), got in runs.items() if not got]
    if missing:
        raise ValueError(f"compare: no per-record rows at {length} for {', '.join(missing)}")
    scored = {key: got for key, got in runs.items() if got}
    ids = sorted(set.intersection(*(set(got) for got in scored.values())))
    if any(len(got) != len(ids) for got in scored.values()):
        raise ValueError(f"compare: at {length} the runs scored different held-out records")

    def decisions(key: tuple[str, str], field: str = "long_correct") -> list[bool]:
        return [bool(scored[key][i][field]) for i in ids]

    stats = {"confidence": spec.confidence, "samples": spec.bootstrap_samples, "seed": spec.seed}
    accuracy: dict[str, dict[str, Any]] = {}
    for name, when in scored:
        hits, short = decisions((name, when)), decisions((name, when), "short_correct")
        low, high = wilson_interval(sum(hits), len(hits), spec.confidence)
        accuracy.setdefault(name, {})[when] = {
            "accuracy": sum(hits) / len(hits), "interval": [low, high],
            "short_accuracy": sum(short) / len(short),
        }  # fmt: skip
    gains = {
        name: paired_difference(decisions((name, "final")), decisions((name, "step0")), **stats)
        for name in (spec.treatment, spec.control)
    }
    difference = paired_difference(
        decisions((spec.treatment, "final")), decisions((spec.control, "final")), **stats
    )
    return {
        "records": len(ids),
        "accuracy": accuracy,
        "gain_over_step0": {name: _as_dict(gain) for name, gain in gains.items()},
        "difference": _as_dict(difference),
        "verdict": verdict(spec, difference, gains[spec.treatment], gains[spec.control]),
    }


def _as_dict(value: PairedDifference) -> dict[str, Any]:
    return {**asdict(value), "interval": list(value.interval), "z": value.z}


def length_order(label: str) -> tuple[int, float]:
    """Sort key of evaluated lengths: token counts by value first, then multiples by factor."""
    return (1, float(label[:-1])) if label.endswith("x") else (0, float(label))
