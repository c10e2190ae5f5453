"""Paired statistics and the pre-registered verdict of an experiment's ``compare:`` (experiment/paired.py):
intervals and tests against independent computations, every verdict reached from rows built for it, and
the checks on the rows and on the ``compare:`` section."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import yaml

from solopo_megatron.experiment.paired import (
    compare_runs,
    mcnemar_exact,
    paired_difference,
    verdict,
    wilson_interval,
)
from solopo_megatron.experiment.spec import ComparisonSpec, load_experiment
from solopo_megatron.recipe.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def test_wilson_interval_matches_its_closed_form_and_stays_in_range():
    # 81 of 100 at 95%, by hand: centre (0.81 + z^2/200) / (1 + z^2/100) = 0.79853, half-width
    # z sqrt(0.81 * 0.19 / 100 + z^2 / 40000) / (1 + z^2/100) = 0.07632 (z = 1.959964)
    low, high = wilson_interval(81, 100)
    assert low == pytest.approx(0.79853 - 0.07632, abs=2e-5) and high == pytest.approx(
        0.79853 + 0.07632, abs=2e-5
    )
    assert wilson_interval(0, 10)[0] == pytest.approx(0, abs=1e-12) and wilson_interval(10, 10)[
        1
    ] == pytest.approx(1)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_mcnemar_exact_is_the_two_sided_binomial_test_of_the_discordant_records():
    for b, c in [(0, 0), (3, 0), (7, 2), (10, 10), (1, 12)]:
        n = b + c
        # brute force: every split of n fair coins at least as uneven as (b, c)
        extreme = sum(math.comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= abs(b - c))
        assert mcnemar_exact(b, c) == pytest.approx(min(1.0, extreme / 2**n) if n else 1.0)
    assert mcnemar_exact(12, 1) == mcnemar_exact(1, 12) < 0.01


def test_paired_difference_agrees_with_the_normal_approximation_on_many_records():
    rng = random.Random(7)
    n = 2000
    a = [rng.random() < 0.7 for _ in range(n)]
    b = [x if rng.random() < 0.8 else not x for x in a]  # correlated with a, as two runs on one set are
    got = paired_difference(a, b, samples=4000, seed=1)
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
    assert got.mean == pytest.approx(mean) and got.se == pytest.approx(se)
    assert got.interval[0] == pytest.approx(mean - 1.96 * se, abs=0.25 * se)
    assert got.interval[1] == pytest.approx(mean + 1.96 * se, abs=0.25 * se)
    assert got.lower_one_sided == pytest.approx(mean - 1.645 * se, abs=0.25 * se)
    assert got.interval[0] < got.lower_one_sided < got.upper_one_sided < got.interval[1]
    assert got.only_a == sum(x and not y for x, y in zip(a, b)) and got.records == n
    assert paired_difference(a, b, samples=500, seed=3) == paired_difference(a, b, samples=500, seed=3)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([True], [True, False])


def _stub(mean: float, se: float, low: float = 0.0, high: float = 0.0):
    from solopo_megatron.experiment.paired import PairedDifference

    return PairedDifference(mean, se, (low, high), low, high, 0, 0, 1.0, 100)


@pytest.mark.parametrize(
    "control_gain, treatment_gain, lower, upper, expected",
    [
        ((0.10, 0.03), (0.09, 0.03), -0.05, 0.04, "matches"),  # both improve, lower bound above -0.08
        ((0.10, 0.03), (0.20, 0.03), 0.02, 0.15, "beats"),  # lower bound above 0
        ((0.10, 0.03), (0.02, 0.03), -0.12, -0.01, "fails"),  # upper bound below 0
        ((0.10, 0.03), (0.05, 0.03), -0.10, 0.02, "fails"),  # control improves, treatment does not
        ((0.10, 0.03), (0.09, 0.03), -0.09, 0.03, "inconclusive"),  # lower bound below -0.08
        ((0.02, 0.03), (0.02, 0.03), -0.05, 0.05, "inconclusive"),  # the control does not improve
        ((0.02, 0.03), (0.20, 0.03), 0.05, 0.20, "inconclusive"),  # ... so not "beats" either
    ],
)
def test_verdict_applies_the_pre_registered_rule(control_gain, treatment_gain, lower, upper, expected):
    spec = ComparisonSpec(treatment="t", control="c")
    difference = _stub(0.0, 0.02, lower, upper)
    assert verdict(spec, difference, _stub(*treatment_gain), _stub(*control_gain)) == expected


def _rows(variant: str, step: int, length: str, correct: list[bool], short: list[bool] | None = None):
    short = short or correct
    return [
        {"variant": variant, "step": step, "length": length, "id": f"r{i}", "long_correct": c,
         "short_correct": s, "long_margin": 1.0 if c else -1.0, "short_margin": 0.0}
        for i, (c, s) in enumerate(zip(correct, short))
    ]  # fmt: skip


def test_compare_runs_pairs_records_and_reaches_the_verdict_per_length():
    n = 200
    base = [i % 2 == 0 for i in range(n)]  # 0.5 at step 0
    control = [i % 4 != 3 for i in range(n)]  # 0.75: +0.25 over step 0
    treatment = [i % 5 != 4 for i in range(n)]  # 0.8
    rows = [
        *_rows("base", 0, "1x", base), *_rows("base", 0, "2x", base),
        *_rows("t", 3, "1x", treatment), *_rows("t", 3, "2x", base),  # no gain at 2x
        *_rows("c", 3, "1x", control), *_rows("c", 3, "2x", control),
    ]  # fmt: skip
    spec = ComparisonSpec(
        treatment="t", control="c", baseline="base", primary_length="1x", bootstrap_samples=2000
    )
    got = compare_runs(spec, rows)
    one = got["lengths"]["1x"]
    assert one["records"] == n and one["accuracy"]["t"]["final"]["accuracy"] == pytest.approx(0.8)
    assert one["accuracy"]["c"]["step0"]["accuracy"] == pytest.approx(0.5)
    low, high = one["accuracy"]["c"]["final"]["interval"]
    assert (low, high) == pytest.approx(wilson_interval(150, n))
    assert one["gain_over_step0"]["c"]["mean"] == pytest.approx(0.25)
    assert one["difference"]["mean"] == pytest.approx(0.05)
    pairs = list(zip(treatment, control))
    assert one["difference"]["only_a"] == sum(t and not c for t, c in pairs)
    assert one["verdict"] in ("matches", "beats") and got["verdict"] == one["verdict"]
    assert got["lengths"]["2x"]["verdict"] == "fails"  # control improves, treatment does not
    assert got["primary_length"] == "1x" and got["final_steps"] == {"t": 3, "c": 3}


def test_compare_runs_uses_each_arms_own_step_0_without_a_baseline_and_refuses_bad_rows():
    correct = [True, False] * 10
    rows = [*_rows("t", 0, "1x", correct), *_rows("t", 5, "1x", correct), *_rows("c", 0, "1x", correct)]
    spec = ComparisonSpec(treatment="t", control="c", bootstrap_samples=200)
    with pytest.raises(ValueError, match="variant c has no per-record evaluation rows after training"):
        compare_runs(spec, rows)
    rows += _rows("c", 5, "1x", correct)
    assert compare_runs(spec, rows)["lengths"]["1x"]["gain_over_step0"]["t"]["mean"] == 0
    with pytest.raises(ValueError, match="different held-out records"):
        compare_runs(spec, rows + _rows("c", 5, "1x", correct + [True]))
    with pytest.raises(ValueError, match="primary_length: '4x' was not evaluated"):
        compare_runs(ComparisonSpec(treatment="t", control="c", primary_length="4x"), rows)
    with pytest.raises(ValueError, match="variant t has no per-record evaluation rows after training"):
        compare_runs(spec, [r for r in rows if r["variant"] != "t"])


@pytest.mark.parametrize(
    "compare, message",
    [
        ({"treatment": "a"}, "compare: "),
        ({"treatment": "a", "control": "zzz"}, "compare.control: no variant named 'zzz'"),
        ({"treatment": "a", "control": "a"}, "treatment and control are the same"),
        ({"treatment": "a", "control": "b", "confidence": 1.5}, "compare.confidence: out of range"),
        ({"treatment": "a", "control": "b", "colour": 1}, "compare: must be a mapping"),
        ({"treatment": "a", "control": "b", "bootstrap_samples": 10}, "compare.bootstrap_samples"),
    ],
)
def test_bad_compare_sections_name_the_key(tmp_path, compare, message):
    path = tmp_path / "exp.yaml"
    body = {
        "recipe": str(ROOT / "recipes/paper-small-cpu.yaml"), "output_dir": "out",
        "variants": [{"name": "a"}, {"name": "b"}, {"name": "base", "eval_only": True}], "compare": compare,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_experiment(path)


def test_eval_only_must_be_a_boolean(tmp_path):
    path = tmp_path / "exp.yaml"
    body = {
        "recipe": str(ROOT / "recipes/paper-small-cpu.yaml"),
        "output_dir": "o",
        "variants": [{"name": "b", "eval_only": "yes"}],
    }
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(RecipeError, match=r"variants\[0\]\.eval_only: must be true or false"):
        load_experiment(path)


def test_the_instruct_experiment_file_pre_registers_its_comparison():
    spec = load_experiment(ROOT / "experiments/smollm2-instruct-cpu.yaml")
    assert spec.compare == ComparisonSpec(
        treatment="solopo-orpo", control="long_po-orpo", baseline="base", primary_length="1x",
        non_inferiority_margin=0.08, improvement_se=2.0, confidence=0.95, bootstrap_samples=10000, seed=0,
    )  # fmt: skip
    assert [v.eval_only for v in spec.variants] == [True, False, False]
    assert any(o.startswith("train.eval_at_start=false") for o in spec.overrides)
