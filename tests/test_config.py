"""Recipe loading: ``defaults:`` inheritance and Hydra-style overrides, errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from solopo_megatron.recipe.loading import load_config
from solopo_megatron.recipe.schema import ModelSection


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    _write(
        tmp_path, "base/model.yaml", "model:\n  num_layers: 4\n  hidden_size: 128\ntrain:\n  train_iters: 7\n"
    )
    _write(tmp_path, "base/loss.yaml", "solopo:\n  preference_loss: simpo\n  beta: 2.0\n")
    _write(
        tmp_path, "child.yaml", "defaults:\n  - base/model\n  - base/loss.yaml\nmodel:\n  hidden_size: 256\n"
    )
    return tmp_path


def test_defaults_are_inherited_and_the_file_wins(recipes: Path):
    cfg = load_config(recipes / "child.yaml")
    assert cfg.model.num_layers == 4  # from base/model
    assert cfg.model.hidden_size == 256  # the child's own value
    assert cfg.solopo.preference_loss == "simpo" and cfg.solopo.beta == 2.0
    assert cfg.model.ffn_hidden_size == ModelSection().ffn_hidden_size  # untouched: schema default


def test_self_first_lets_the_defaults_win(recipes: Path):
    path = _write(
        recipes, "self_first.yaml", "defaults:\n  - _self_\n  - base/model\nmodel:\n  num_layers: 12\n"
    )
    assert load_config(path).model.num_layers == 4


def test_chained_defaults(recipes: Path):
    path = _write(recipes, "grandchild.yaml", "defaults: [child]\ntrain:\n  train_iters: 9\n")
    cfg = load_config(path)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.train_iters) == (4, 256, 9)


@pytest.mark.parametrize(
    "text, message",
    [
        ("defaults: [missing]\n", r"child\.yaml: defaults: recipe .*missing\.yaml does not exist"),
        ("defaults: [loop]\n", r"defaults form a cycle: loop\.yaml -> loop\.yaml"),
        ("defaults:\n  - model: llama\n", r"defaults\[0\]: entries are recipe paths"),
        ("defaults: base/model\n", r"defaults: must be a list"),
    ],
)
def test_bad_defaults_name_the_file(recipes: Path, text: str, message: str):
    name = "loop.yaml" if "loop" in text else "child.yaml"
    path = _write(recipes, name, text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_a_bad_key_in_a_base_names_that_file(recipes: Path):
    _write(recipes, "base/model.yaml", "model:\n  num_layer: 4\n")
    with pytest.raises(
        ValueError, match=r"base/model\.yaml: Key 'num_layer' not in 'ModelSection'\. Did you mean"
    ):
        load_config(recipes / "child.yaml")


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path):
    path = _write(tmp_path, "broken.yaml", "model:\n  num_layers: 2\n   hidden_size: 3\n")
    with pytest.raises(ValueError, match=r"(?s)broken\.yaml: .*line 3"):
        load_config(path)


def test_plain_override_sets_a_schema_key(recipes: Path):
    cfg = load_config(recipes / "child.yaml", ["model.num_layers=6", "optimizer.lr=1e-5"])
    assert cfg.model.num_layers == 6 and cfg.optimizer.lr == 1e-5


def test_plus_adds_only_keys_the_recipe_does_not_set(recipes: Path):
    cfg = load_config(recipes / "child.yaml", ["+model.num_query_groups=2"])
    assert cfg.model.num_query_groups == 2
    with pytest.raises(
        ValueError, match=r"the recipe already sets model\.hidden_size; use model\.hidden_size=\.\.\."
    ):
        load_config(recipes / "child.yaml", ["+model.hidden_size=64"])
    assert load_config(recipes / "child.yaml", ["++model.hidden_size=64"]).model.hidden_size == 64
    assert load_config(recipes / "child.yaml", ["++model.num_query_groups=2"]).model.num_query_groups == 2


def test_tilde_removes_the_recipe_value(recipes: Path):
    cfg = load_config(recipes / "child.yaml", ["~model.hidden_size", "~solopo.beta"])
    assert cfg.model.hidden_size == ModelSection().hidden_size
    assert cfg.solopo.beta == 0.1
    assert cfg.model.num_layers == 4  # untouched
    with pytest.raises(ValueError, match=r"the recipe does not set model\.kv_channels"):
        load_config(recipes / "child.yaml", ["~model.kv_channels"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.hiden_size=3",
            r"override 'model\.hiden_size=3': Key 'hiden_size' not in 'ModelSection'\. Did you mean",
        ),
        ("+model.hiden_size=3", r"Key 'hiden_size' not in 'ModelSection'"),
        (  # OmegaConf's full_key / reference_type trailer is cut; the key leads the message
            "train.train_iters=many",
            r"^override 'train\.train_iters=many': train\.train_iters: Value 'many' of type 'str' could "
            r"not be converted to Integer$",
        ),
        (
            "eval.long_lengths=2x",
            r"^override 'eval\.long_lengths=2x': eval\.long_lengths must be a list, e\.g\. "
            r"eval\.long_lengths=\[2x\]$",
        ),
        ("model.num_layers", r"expected key=value, \+key=value, \+\+key=value or ~key"),
        ("+=3", r"expected key=value"),
    ],
)
def test_bad_overrides_name_the_override(recipes: Path, override: str, message: str):
    with pytest.raises(ValueError, match=message):
        load_config(recipes / "child.yaml", [override])


@pytest.mark.parametrize(
    "override",
    ["train.train_iters=[1,", "model.hidden_size={a", 'dataset.prompt_template="x'],
)
def test_an_override_yaml_cannot_parse_names_the_override(recipes: Path, override: str):
    with pytest.raises(ValueError) as info:
        load_config(recipes / "child.yaml", [override])
    assert str(info.value).startswith(f"override {override!r}: the value is not valid YAML (")


@pytest.mark.parametrize(
    "text, message",
    [("3\n", "got a single value"), ("- a\n- b\n", "got a list")],
)
def test_a_recipe_that_is_not_a_mapping_names_the_file(tmp_path: Path, text: str, message: str):
    path = _write(tmp_path, "odd.yaml", text)
    with pytest.raises(ValueError, match=rf"odd\.yaml: a recipe is a mapping of sections, {message}"):
        load_config(path)


def test_a_recipe_that_is_a_directory_says_so(tmp_path: Path, capsys):
    from solopo_megatron.train import main

    with pytest.raises(ValueError, match=r"recipe .* is a directory, not a recipe file"):
        load_config(tmp_path)
    assert main(["--dry-run", "--config", str(tmp_path)]) == 2
    assert f"error: recipe {tmp_path} is a directory, not a recipe file" in capsys.readouterr().err


def test_the_cli_reports_an_unparsable_override_without_a_traceback(capsys):
    from solopo_megatron.train import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
    assert main(["--dry-run", "--config", str(recipe), "train.train_iters=[1,"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'train.train_iters=[1,': the value is not valid YAML")


def test_overrides_without_a_recipe():
    cfg = load_config(None, ["model.num_layers=3", "+dataset.max_long_length=100"])
    assert cfg.model.num_layers == 3 and cfg.dataset.max_long_length == 100
