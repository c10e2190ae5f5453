"""The experiment file: a base recipe and the variants that differ from it only by overrides.

recipe: ../recipes/paper-small-cpu.yaml    # relative to this file
output_dir: results/paper-small-cpu        # relative to this file
nproc_per_node: 1                          # >1: each variant runs under torchrun --standalone
overrides: [train.train_iters=300]         # applied to every variant (optional)
grid:                                      # every combination; the name joins the values
  solopo.mode: [solopo, short_po, long_po]
  solopo.preference_loss: [dpo, simpo, orpo]
variants:                                  # and/or named variants with their own overrides
  - {name: solopo-dpo-beta0.5, overrides: [solopo.beta=0.5]}
  - {name: base, eval_only: true}          # evaluates the initial weights once (solopo-train --eval-only)
compare:                                   # optional: a pre-registered paired comparison (ComparisonSpec)
  treatment: solopo-dpo
  control: long_po-dpo
  baseline: base                           # where step 0 comes from (default: each arm's own step 0)
  primary_length: 1x
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..recipe.errors import RecipeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEYS = {"recipe", "output_dir", "nproc_per_node", "overrides", "grid", "variants", "compare"}


@dataclass
class Variant:
    """One training run of the experiment: a name and its overrides (after the common ones)."""

    name: str
    overrides: list[str]
    eval_only: bool = False  # no training: the initial weights' evaluation (solopo-train --eval-only)


@dataclass
class ComparisonSpec:
    """A paired comparison fixed before the run (``compare:``) and applied by the report: the two arms
    are scored on the same held-out records, so their per-record decisions pair up.

    Verdict per evaluated length (``primary_length`` is the headline), from the arms' final accuracy
    and each arm's improvement over step 0 (the ``baseline`` variant's evaluation, or its own):
    - matches: the control improves by >= ``improvement_se`` standard errors (paired, over records),
      the treatment does too, and the one-sided ``confidence`` lower bound of (treatment - control)
      is above -``non_inferiority_margin``;
    - beats: that lower bound is above 0 (and the improvements hold);
    - fails: the one-sided upper bound is below 0, or the control improves and the treatment does not;
    - inconclusive: otherwise."""

    treatment: str
    control: str
    baseline: str | None = None
    primary_length: str | None = None  # None: the first evaluated length
    non_inferiority_margin: float = 0.08
    improvement_se: float = 2.0
    confidence: float = 0.95
    bootstrap_samples: int = 10000
    seed: int = 0


@dataclass
class ExperimentSpec:
    """A parsed experiment file; paths are resolved against its folder."""

    path: Path
    recipe: Path
    output_dir: Path
    nproc_per_node: int = 1
    overrides: list[str] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    compare: ComparisonSpec | None = None

    def variant_overrides(self, variant: Variant) -> list[str]:
        """The overrides a variant's run gets: the common ones, then its own."""
        return [*self.overrides, *variant.overrides]


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Reads and checks an experiment file; RecipeError naming the file and key for anything wrong."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the experiment file: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of {', '.join(sorted(_KEYS))}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    for key in ("recipe", "output_dir"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise RecipeError(f"{path}: {key}: a path is required")
    nproc = raw.get("nproc_per_node", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise RecipeError(f"{path}: nproc_per_node: must be a positive integer, got {nproc!r}")
    root = path.parent
    spec = ExperimentSpec(
        path=path,
        recipe=(root / raw["recipe"]).resolve(),
        output_dir=(root / raw["output_dir"]).resolve(),
        nproc_per_node=nproc,
        overrides=_string_list(path, "overrides", raw.get("overrides", [])),
        variants=_grid(path, raw.get("grid")) + _named(path, raw.get("variants")),
    )
    spec.compare = _comparison(path, raw.get("compare"), [v.name for v in spec.variants])
    if not spec.recipe.is_file():
        raise RecipeError(f"{path}: recipe: {spec.recipe} is not a file")
    if not spec.variants:
        raise RecipeError(f"{path}: no variants: give grid and/or variants")
    for variant in spec.variants:
        if not _NAME.match(variant.name):
            raise RecipeError(
                f"{path}: variant name {variant.name!r} (from the grid's values): letters, digits, '.', '_' and "
                "'-' only; name it in variants instead"
            )
    names = [v.name for v in spec.variants]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RecipeError(f"{path}: variant name(s) {', '.join(repeated)} appear more than once")
    return spec


def _string_list(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise RecipeError(f"{path}: {key}: must be a list of key=value strings, got {value!r}")
    return list(value)


def _grid(path: Path, grid: Any) -> list[Variant]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise RecipeError(f"{path}: grid: must map recipe keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{path}: grid.{key}: must be a non-empty list of values")
    keys = list(grid)
    variants = []
    for combination in itertools.product(*(grid[key] for key in keys)):
        name = "-".join(_value_text(value) for value in combination)
        overrides = [f"{key}={_value_text(value)}" for key, value in zip(keys, combination)]
        variants.append(Variant(name, overrides))
    return variants


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _named(path: Path, variants: Any) -> list[Variant]:
    if variants is None:
        return []
    if not isinstance(variants, list):
        raise RecipeError(f"{path}: variants: must be a list of {{name, overrides}}")
    out = []
    for i, item in enumerate(variants):
        if not isinstance(item, dict) or set(item) - {"name", "overrides", "eval_only"} or "name" not in item:
            raise RecipeError(
                f"{path}: variants[{i}]: must be {{name: ..., overrides: [...], eval_only: false}}, got {item!r}"
            )
        eval_only = item.get("eval_only", False)
        if not isinstance(eval_only, bool):
            raise RecipeError(f"{path}: variants[{i}].eval_only: must be true or false, got {eval_only!r}")
        name = item["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise RecipeError(
                f"{path}: variants[{i}].name: letters, digits, '.', '_' and '-' only, got {name!r}"
            )
        overrides = _string_list(path, f"variants[{i}].overrides", item.get("overrides", []))
        out.append(Variant(name, overrides, eval_only=eval_only))
    return out


def _comparison(path: Path, raw: Any, names: list[str]) -> ComparisonSpec | None:
    if raw is None:
        return None
    known = {f.name for f in fields(ComparisonSpec)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise RecipeError(f"{path}: compare: must be a mapping of {', '.join(sorted(known))}, got {raw!r}")
    try:
        spec = ComparisonSpec(**raw)
    except TypeError as error:  # a required key missing
        raise RecipeError(f"{path}: compare: {error} (treatment and control are required)") from None
    for key in ("treatment", "control", "baseline"):
        value = getattr(spec, key)
        if value is not None and value not in names:
            raise RecipeError(
                f"{path}: compare.{key}: no variant named {value!r} (variants: {', '.join(names)})"
            )
    if spec.treatment == spec.control:
        raise RecipeError(f"{path}: compare: treatment and control are the same variant ({spec.treatment})")
    checks = {
        "non_inferiority_margin": spec.non_inferiority_margin >= 0,
        "improvement_se": spec.improvement_se >= 0,
        "confidence": 0.5 < spec.confidence < 1,
        "bootstrap_samples": isinstance(spec.bootstrap_samples, int) and spec.bootstrap_samples >= 100,
    }
    for key, ok in checks.items():
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
            raise RecipeError(f"{path}: compare.{key}: out of range, got {value!r}")
    return spec
