"""Recipe files -> a typed RecipeConfig: ``defaults:`` inheritance, Hydra-style overrides, schema checks.

Recipes are OmegaConf YAML files that may inherit from others (``defaults:``); ``load_config(path,
overrides)`` merges them over the schema (unknown keys and wrong types are errors naming the key and
the file) and applies the overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .schema import RecipeConfig


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Schema defaults <- recipe YAML (with its ``defaults:`` chain) <- overrides; a typed RecipeConfig.

    Overrides edit the recipe layer, Hydra style: ``a.b=c`` sets a schema key, ``+a.b=c`` sets a key
    the recipe does not set yet (an error if it does), ``++a.b=c`` sets it either way, and ``~a.b``
    removes the recipe's value so the schema default applies again.
    """
    from omegaconf import OmegaConf

    _register_resolvers()
    recipe = load_recipe_layers(Path(path)) if path is not None else OmegaConf.create()
    for override in overrides:
        recipe = apply_override(recipe, override)
    config = OmegaConf.to_object(_merge_onto_schema(recipe, "overrides" if overrides else str(path)))
    try:
        config.solopo.loss_config()  # validates the loss keys
    except ValueError as error:
        raise ValueError(str(error).replace("SoLoPOConfig.", "solopo.")) from None
    _gguf_as_folders(config)
    return config


def _register_resolvers() -> None:
    """``${package_file:PACKAGE/FILE}``: a file shipped inside an installed package (recipe.gguf)."""
    from omegaconf import OmegaConf

    from .gguf import package_file

    if not OmegaConf.has_resolver("package_file"):
        import omegaconf

        # omegaconf 2.4 names it register_resolver; in 2.3 that name is the deprecated legacy API
        major_minor = tuple(int(part) for part in omegaconf.__version__.split(".")[:2])
        register = OmegaConf.register_resolver if major_minor >= (2, 4) else OmegaConf.register_new_resolver
        register("package_file", package_file)


def _gguf_as_folders(config: RecipeConfig) -> None:
    """A ``.gguf`` file as checkpoint.pretrained_hf or dataset.tokenizer -> its converted Hugging Face
    folder in the cache (converted on first use; see recipe.gguf)."""
    from .gguf import converted_folder, is_gguf
    from .sources import cache_dir

    for section, key in ((config.checkpoint, "pretrained_hf"), (config.dataset, "tokenizer")):
        if is_gguf(getattr(section, key)):
            setattr(section, key, str(converted_folder(getattr(section, key), cache_dir(config))))


def _merge_onto_schema(layer, where: str, value: str | None = None):
    """Merges one untyped layer onto the typed schema; unknown keys and bad types name the key.

    ``value``: the override's value as typed, for the example in a "must be a list" message."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(OmegaConf.structured(RecipeConfig), layer)
    except OmegaConfBaseException as error:
        raise ValueError(f"{where}: {_schema_message(error, value)}".strip()) from None


def _schema_message(error: Exception, value: str | None) -> str:
    """OmegaConf's message without its ``full_key`` / ``reference_type`` / ``object_type`` trailer, and a
    plain "must be a list" where a scalar was given for a list key."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    key = getattr(error, "full_key", None)
    if "is not a ListConfig" in first and key:
        example = f"{key}=[{value}]" if value is not None else "[...] in YAML"
        return f"{key} must be a list, e.g. {example}"
    leaf = key.rpartition(".")[2] if key else ""
    return first if not key or f"'{leaf}'" in first else f"{key}: {first}"


def load_recipe_layers(path: Path, _chain: tuple[Path, ...] = ()):
    """One recipe file merged over its ``defaults:`` (paths relative to the file, earlier first;
    ``_self_`` marks where the file's own keys go, last when absent). Each file is checked against the
    schema on its own, so a bad key is reported with the file that has it."""
    import yaml
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = path.resolve()
    if path in _chain:
        raise ValueError(f"{path}: defaults form a cycle: {' -> '.join(p.name for p in (*_chain, path))}")
    if not path.is_file():
        where = f"{_chain[-1]}: defaults: " if _chain else ""
        what = "is a directory, not a recipe file" if path.is_dir() else "does not exist"
        raise ValueError(f"{where}recipe {path} {what}")
    try:
        own = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as error:  # syntax errors carry the line
        raise ValueError(f"{path}: {error}") from None
    except OSError as error:
        if error.errno is not None:  # a real I/O error (permissions, ...)
            raise ValueError(f"{path}: cannot read the recipe: {error.strerror or error}") from None
        # OmegaConf refuses a top-level scalar with a bare OSError that names neither file nor cause.
        raise ValueError(f"{path}: a recipe is a mapping of sections, got a single value") from None
    if not isinstance(own, DictConfig):
        raise ValueError(f"{path}: a recipe is a mapping of sections, got a list")
    entries = own.pop("defaults", None)
    entries = [] if entries is None else entries
    if not isinstance(entries, (ListConfig, list)):
        raise ValueError(f"{path}: defaults: must be a list of recipe paths, got {entries!r}")
    own_keys = OmegaConf.create(own)
    _merge_onto_schema(own_keys, str(path))
    entries = list(entries)
    if "_self_" not in entries:
        entries.append("_self_")
    layers = []
    for i, entry in enumerate(entries):
        if entry == "_self_":
            layers.append(own_keys)
        elif isinstance(entry, str):
            base = path.parent / (entry if entry.endswith((".yaml", ".yml")) else f"{entry}.yaml")
            layers.append(load_recipe_layers(base, (*_chain, path)))
        else:
            raise ValueError(
                f"{path}: defaults[{i}]: entries are recipe paths relative to this file "
                f"(config groups are not supported), got {entry!r}"
            )
    return OmegaConf.merge(*layers)


_ABSENT = object()


def apply_override(recipe, override: str):
    """Applies one ``a.b=c`` / ``+a.b=c`` / ``++a.b=c`` / ``~a.b`` override to the recipe layer."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if override.startswith("~"):
        key = override[1:].split("=", 1)[0]
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(recipe, parent_key) if parent_key else recipe
        if parent is None or leaf not in parent:
            raise ValueError(
                f"override {override!r}: the recipe does not set {key}, so there is nothing to remove"
            )
        del parent[leaf]
        return recipe
    key, sep, _ = override.partition("=")
    if not sep or not key.strip("+"):
        raise ValueError(f"override {override!r}: expected key=value, +key=value, ++key=value or ~key")
    add = key.startswith("+") and not key.startswith("++")  # ``++`` sets whether or not the recipe has it
    key = key.lstrip("+")
    if add and OmegaConf.select(recipe, key, default=_ABSENT) is not _ABSENT:
        raise ValueError(
            f"override {override!r}: the recipe already sets {key}; use {key}=... or ++{key}=..."
        )
    try:
        value = OmegaConf.from_dotlist([f"{key}={override.partition('=')[2]}"])
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(
            f"override {override!r}: the value is not valid YAML ({problem}); check its quotes and brackets"
        ) from None
    # An unknown key or a wrong type, with a suggestion.
    _merge_onto_schema(value, f"override {override!r}", override.partition("=")[2])
    return OmegaConf.merge(recipe, value)


def to_dict(config: RecipeConfig) -> dict[str, Any]:
    """The recipe as plain nested dicts (for the metric writers' run config)."""
    return dataclasses.asdict(config)
