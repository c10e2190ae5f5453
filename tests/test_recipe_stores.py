"""Reference stores checked before anything runs: a store built for other data or cut short is named by
``solopo.reference_store`` at launch and by ``--dry-run``; ``solopo-ref-logps`` refuses a target it
could not write before computing anything; a failed write leaves no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from solopo_megatron.data.errors import DataError
from solopo_megatron.data.reference_store import ReferenceStore, load_reference_store
from solopo_megatron.recipe.errors import RecipeError
from solopo_megatron.recipe.loading import load_config
from solopo_megatron.recipe.validation import validate_recipe
from solopo_megatron.train import main, ref_logps_main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
ROLES = ("short_chosen", "short_rejected")


@pytest.fixture
def data(tmp_path: Path) -> list[str]:
    """Overrides naming small train/valid files and a store path (not written yet)."""
    from solopo_megatron.data.synthetic import generate_synthetic_records, write_jsonl

    for name, seed in (("train", 0), ("valid", 1)):
        write_jsonl(
            generate_synthetic_records(3, seed=seed, long_target_words=40, id_prefix=name),
            tmp_path / f"{name}.jsonl",
        )
    return [
        f"dataset.train_path={tmp_path / 'train.jsonl'}",
        f"dataset.valid_path={tmp_path / 'valid.jsonl'}",
        f"solopo.reference_store={tmp_path / 'ref.jsonl'}",
    ]


def _write_store(path: Path, fingerprint: str | None, entries: int = 3) -> None:
    store = ReferenceStore(ROLES, data_fingerprint=fingerprint)
    for i in range(entries):
        store.add(f"ex-{i}", {"short_chosen": -1.5 - i, "short_rejected": -2.5 - i})
    store.save(path)


def _matching_store(overrides: list[str], entries: int = 3) -> Path:
    from solopo_megatron.recipe.sources import expected_reference_fingerprint

    path = Path(overrides[-1].partition("=")[2])
    _write_store(path, expected_reference_fingerprint(load_config(RECIPE, overrides)), entries)
    return path


def _cut(path: Path, how: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    if how == "fewer entries":  # whole lines, but not all the header counts
        path.write_text("".join(lines[:-1]))
    else:  # a copy that stopped mid-line
        path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])


CUT = {
    "fewer entries": "field 'entries': the header says 3 entries, the file has 2",
    "cut mid-line": ":4: the last entry is cut off: the store is incomplete or corrupt",
}


@pytest.mark.parametrize("how", list(CUT))
def test_a_truncated_store_is_reported_before_launch(data: list[str], how: str):
    store = _matching_store(data)
    validate_recipe(load_config(RECIPE, data), world_size=2)  # whole: valid
    _cut(store, how)
    with pytest.raises(RecipeError) as info:
        validate_recipe(load_config(RECIPE, data), world_size=2)
    assert "\n  - solopo.reference_store: " in str(info.value) and CUT[how] in str(info.value)
    with pytest.raises(DataError, match=CUT[how].replace("(", r"\(")):
        load_reference_store(store)  # the trainer's read refuses it too


def test_the_dry_run_reports_a_store_for_other_data(data: list[str], capsys):
    _matching_store(data)
    assert main(["--dry-run", "--config", str(RECIPE), *data]) == 0
    capsys.readouterr()
    changed = [*data, "dataset.prompt_template='Q: {question}\n{context}'"]
    assert main(["--dry-run", "--config", str(RECIPE), *changed]) == 2
    err = capsys.readouterr().err
    assert (
        "solopo.reference_store: " in err and "field 'data_fingerprint': the store was built for other" in err
    )


@pytest.mark.parametrize("how", list(CUT))
def test_the_dry_run_reports_a_truncated_store(data: list[str], how: str, capsys):
    _cut(_matching_store(data), how)
    assert main(["--dry-run", "--config", str(RECIPE), *data]) == 2
    assert CUT[how] in capsys.readouterr().err


def test_the_dry_run_only_lists_a_store_this_machine_lacks(data: list[str], capsys):
    assert (
        main(["--dry-run", "--config", str(RECIPE), *data, "solopo.compute_reference_if_missing=false"]) == 0
    )
    out = capsys.readouterr().out
    assert "not checked on this machine" in out and "solopo.reference_store: dpo needs reference" in out


def test_a_store_without_an_entry_count_still_loads(tmp_path: Path):
    """Stores written before the header counted its entries stay readable."""
    import json

    path = tmp_path / "old.jsonl"
    _write_store(path, "abc")
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["entries"]
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    assert len(load_reference_store(path, data_fingerprint="abc")) == 3


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_ref_logps_refuses_an_unwritable_store_before_computing(tmp_path: Path, where: str, capsys):
    if where == "a directory":
        target = tmp_path / "stores"
        target.mkdir()
        message = f"solopo.reference_store: {target} is a directory; name the store file"
    else:
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "sub" / "ref.jsonl"
        message = f"solopo.reference_store: {tmp_path / 'file'} is a file, not a folder"
    cfg = load_config(RECIPE, [f"solopo.reference_store={target}"])
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        validate_recipe(cfg, world_size=1, check_reference=False)
    # The entry point stops there (exit 2): no process group, no model, no data tokenised.
    assert ref_logps_main(["--config", str(RECIPE), f"solopo.reference_store={target}"]) == 2
    assert message in capsys.readouterr().err


def test_a_failed_store_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    folder = tmp_path / "stores"
    folder.mkdir()
    with pytest.raises(DataError, match=r"stores: cannot write reference store: is a directory"):
        _write_store(folder, "abc")
    good = tmp_path / "ref.jsonl"
    _write_store(good, "abc")
    before = good.read_bytes()

    def fail(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", fail)
    with pytest.raises(DataError, match=r"ref\.jsonl: cannot write reference store: No space left on device"):
        _write_store(good, "abc", entries=5)
    assert good.read_bytes() == before  # the old store is untouched
    assert not list(tmp_path.rglob("*.tmp-*"))
