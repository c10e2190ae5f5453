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
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recipe.errors import RecipeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEYS = {"recipe", "output_dir", "nproc_per_node", "overrides", "grid", "variants"}


@dataclass
class Variant:
    """One training run of the experiment: a name and its overrides (after the common ones)."""

    name: str
    overrides: list[str]


@dataclass
class ExperimentSpec:
    """A parsed experiment file; paths are resolved against its folder."""

    path: Path
    recipe: Path
    output_dir: Path
    nproc_per_node: int = 1
    overrides: list[str] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)

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
        if not isinstance(item, dict) or set(item) - {"name", "overrides"} or "name" not in item:
            raise RecipeError(f"{path}: variants[{i}]: must be {{name: ..., overrides: [...]}}, got {item!r}")
        name = item["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise RecipeError(
                f"{path}: variants[{i}].name: letters, digits, '.', '_' and '-' only, got {name!r}"
            )
        out.append(Variant(name, _string_list(path, f"variants[{i}].overrides", item.get("overrides", []))))
    return out
