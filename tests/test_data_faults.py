"""Data faults that must end in one clear line and leave nothing behind (issue 21, the data layer).

Data that cannot fill a run (too few examples for a global batch, a record over ``dataset.max_tokens``),
a killed tokenisation's scratch folder, a full disk under each cache writer, a UTF-8 byte order mark,
and a record whose long context is its short context (a warning, not an error).
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from solopo_megatron.data import dataset as dataset_module
from solopo_megatron.data.dataset import TokenizedDataset, check_group_budget, data_fingerprint
from solopo_megatron.data.errors import DataError
from solopo_megatron.data.files import cache_directory, cache_file, remove_stale_scratch, scratch_path
from solopo_megatron.data.records import iter_records
from solopo_megatron.data.reference_store import ReferenceStore
from solopo_megatron.data.synthetic import generate_synthetic_records, write_jsonl
from solopo_megatron.data.tokenize import SequenceEncoder, load_tokenizer
from solopo_megatron.objectives import SoLoPOConfig, required_roles

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
ROLES = required_roles(SoLoPOConfig())
NO_SPACE = "No space left on device"


@pytest.fixture(scope="module")
def encoder():
    return SequenceEncoder(load_tokenizer("tiny"))


def _records(count: int = 6) -> list[dict]:
    return list(generate_synthetic_records(count, seed=11, id_prefix="c", long_target_words=120))


def _write(path: Path, records: list[dict], *, prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return path


def _host() -> str:
    """This host's tag in scratch names (NAME.tmp-PID-HOST)."""
    return scratch_path("x").name.split("-", 2)[2]


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _train_argv(tmp: Path, *overrides: str) -> list[str]:
    return [
        "--config", str(RECIPE), "model.context_parallel_size=1", f"dataset.cache_dir={tmp / 'cache'}",
        "train.train_iters=1", "train.eval_interval=null", "scheduler.lr_warmup_iters=0", *overrides,
    ]  # fmt: skip


def _run_train(tmp: Path, capsys, *overrides: str) -> tuple[int, str]:
    from solopo_megatron.train import main

    code = main(_train_argv(tmp, *overrides))
    out = capsys.readouterr()
    return code, out.out + out.err


# --------------------------------------------------------------------------- data that cannot fill the run


def test_one_record_cannot_fill_a_global_batch_of_4(tmp_path, capsys):
    data = _write(tmp_path / "data.jsonl", _records(1))
    code, text = _run_train(tmp_path, capsys, f"dataset.train_path={data}", "train.global_batch_size=4")
    assert code == 2 and "Traceback" not in text, text
    assert f"dataset.train_path {data}: 1 usable example(s), fewer than train.global_batch_size=4" in text


def test_the_batch_check_counts_what_on_error_skip_left_out(tmp_path, encoder):
    from solopo_megatron.megatron.inputs import check_fills_a_batch
    from solopo_megatron.recipe.loading import load_config

    records = _records(3)
    records[1]["chosen"] = records[1]["rejected"]  # a bad record, skipped under on_error=skip
    data = _write(tmp_path / "data.jsonl", records)
    train, _ = TokenizedDataset.build(
        data, encoder, ROLES, cache_dir=tmp_path / "c", on_error="skip", progress=False
    )
    cfg = load_config(RECIPE, [f"dataset.train_path={data}", "train.global_batch_size=4"])
    with pytest.raises(
        DataError, match=r"2 usable example\(s\) \(1 more skipped under dataset.on_error=skip\)"
    ):
        check_fills_a_batch(cfg, train, str(data))
    synthetic = load_config(RECIPE, ["dataset.synthetic.num_train=2", "train.global_batch_size=4"])
    with pytest.raises(
        DataError, match=r"dataset.synthetic.num_train=2: the synthetic data .*train.global_batch_size=4"
    ):
        check_fills_a_batch(synthetic, train, "synthetic/train.jsonl")


def test_a_record_over_max_tokens_is_named_before_training(tmp_path, capsys):
    records = _records(6)
    records[3]["long_context"] += " filler" * 400  # line 4: far above a budget the others fit
    data = _write(tmp_path / "data.jsonl", records)
    code, text = _run_train(
        tmp_path, capsys, f"dataset.train_path={data}", "train.global_batch_size=4", "dataset.max_tokens=1024"
    )
    assert code == 2 and "Traceback" not in text, text
    assert f"{data}:4: example '{records[3]['id']}' needs " in text and "dataset.max_tokens=1024" in text
    assert "group 1" not in text  # not the packer's index within a step


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_group_budget_check_names_line_id_and_tokens(tmp_path, encoder, on_error):
    records = _records(6)
    records[4]["long_context"] += " filler" * 400
    data = _write(tmp_path / "data.jsonl", records)
    dataset, _ = TokenizedDataset.build(
        data, encoder, ROLES, cache_dir=tmp_path / "c", on_error=on_error, progress=False
    )
    lengths = [dataset.padded_length(i, 2) for i in range(len(dataset))]
    check_group_budget(dataset, data, max_tokens=max(lengths), pad_multiple=2)  # fits: no error
    # Skipping it would make the data depend on the budget (not in the fingerprint): an error either way.
    with pytest.raises(DataError) as caught:
        check_group_budget(dataset, data, max_tokens=max(lengths) - 2, pad_multiple=2)
    assert str(caught.value).startswith(f"{data}:5: example '{records[4]['id']}' needs {max(lengths)} tokens")
    assert "dataset.max_tokens" in str(caught.value) and "examples are over" not in str(caught.value)
    with pytest.raises(DataError, match=r"\(6 of 6 examples are over it\)"):
        check_group_budget(dataset, data, max_tokens=2, pad_multiple=2)


# --------------------------------------------------------------------------- a killed writer's scratch


def test_stale_scratch_is_removed_live_and_foreign_kept(tmp_path):
    dead, host = _dead_pid(), _host()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f"abc.tmp-{dead}-{host}": False,  # a killed process here: removed
            f"abc.tmp-{dead}": False,  # the older naming (no host): judged on this host
            f"abc.tmp-{sleeper.pid}-{host}": True,  # a process writing now
            f"abc.tmp-{os.getpid()}-{host}": True,  # this process
            f"abc.tmp-{dead}-some-other-host": True,  # another host's: cannot be judged from here
            f".abc.tmp-{dead}": True,  # a hidden name is not this scheme's
            "abc": True,
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "tokens.bin").write_bytes(b"x")
        (tmp_path / f"ref.jsonl.tmp-{dead}-{host}").write_text("partial")
        removed = remove_stale_scratch(tmp_path, "abc")
        assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
        assert (tmp_path / f"ref.jsonl.tmp-{dead}-{host}").exists()  # another target's
        assert remove_stale_scratch(tmp_path) == [tmp_path / f"ref.jsonl.tmp-{dead}-{host}"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
    finally:
        sleeper.kill()
        sleeper.wait()


_SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    from solopo_megatron.data.dataset import TokenizedDataset
    from solopo_megatron.data.tokenize import SequenceEncoder, load_tokenizer

    class Slow(SequenceEncoder):
        def encode_group(self, *args, **kwargs):
            time.sleep(0.05)
            return super().encode_group(*args, **kwargs)

    roles = ("short_chosen", "short_rejected", "long_chosen")
    TokenizedDataset.build(sys.argv[1], Slow(load_tokenizer("tiny")), roles, cache_dir=sys.argv[2], progress=False)
    """
)


def test_a_sigkilled_tokenisation_is_cleaned_at_the_next_start(tmp_path, encoder):
    data = _write(tmp_path / "data.jsonl", _records(400))
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(data), str(cache)])
    deadline = time.monotonic() + 60
    while not list((cache / "tokenized").glob(f"*.tmp-{child.pid}-*/ids.bin")):
        assert child.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    fingerprint = data_fingerprint(data, encoder, ROLES)  # the child's encoder differs only in speed
    left = [p.name for p in (cache / "tokenized").iterdir()]
    assert left == [f"{fingerprint}.tmp-{child.pid}-{_host()}"]  # what a SIGKILL leaves
    dataset, _ = TokenizedDataset.build(data, encoder, ROLES, cache_dir=cache, progress=False)
    assert len(dataset) == 400
    assert [p.name for p in (cache / "tokenized").iterdir()] == [dataset.directory.name]


# --------------------------------------------------------------------------- a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


def test_full_disk_while_tokenising_names_the_cache_and_leaves_nothing(tmp_path, encoder, monkeypatch):
    data = _write(tmp_path / "data.jsonl", _records(6))
    real_open = open

    def open_filling_the_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if Path(file).name == "ids.bin":  # the other cache files are written by numpy, straight to the fd
            handle.write = _no_space
        return handle

    monkeypatch.setattr(dataset_module, "open", open_filling_the_disk, raising=False)
    with pytest.raises(
        DataError, match=rf"^{tmp_path}/c/tokenized/\w+: cannot write the tokenised cache: {NO_SPACE}$"
    ):
        TokenizedDataset.build(data, encoder, ROLES, cache_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c" / "tokenized").iterdir()) == []
    monkeypatch.undo()
    # The last write, meta.json (which marks the cache complete), too.
    real_write_text = Path.write_text

    def meta_fills_the_disk(self, *args, **kwargs):
        if self.name == "meta.json":
            _no_space()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", meta_fills_the_disk)
    with pytest.raises(DataError, match="cannot write the tokenised cache: No space left on device"):
        TokenizedDataset.build(data, encoder, ROLES, cache_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c" / "tokenized").iterdir()) == []


def test_a_read_error_is_not_called_a_write_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with cache_file(tmp_path / "out.jsonl", "the synthetic data"):
            open(tmp_path / "missing-input.jsonl")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_full_disk_while_writing_synthetic_data(tmp_path):
    from solopo_megatron.recipe.loading import load_config
    from solopo_megatron.recipe.sources import synthetic_paths, write_synthetic_files

    cfg = load_config(RECIPE, [f"dataset.cache_dir={tmp_path}"])
    train, _ = synthetic_paths(cfg)
    train.parent.mkdir(parents=True)
    # This process's scratch file leads to /dev/full, where every write fails with ENOSPC.
    scratch_path(train).symlink_to("/dev/full")
    with pytest.raises(DataError, match=rf"^{train}: cannot write the synthetic data: {NO_SPACE}$"):
        write_synthetic_files(cfg)
    assert list(train.parent.iterdir()) == []


def test_synthetic_writer_removes_a_killed_writers_file(tmp_path):
    from solopo_megatron.recipe.loading import load_config
    from solopo_megatron.recipe.sources import synthetic_paths, write_synthetic_files

    cfg = load_config(RECIPE, [f"dataset.cache_dir={tmp_path}", "dataset.synthetic.num_train=4"])
    train, valid = synthetic_paths(cfg)
    train.parent.mkdir(parents=True)
    dead = _dead_pid()
    stale = [train.with_name(f"train.jsonl.tmp-{dead}-{_host()}"), train.with_name(f"train.tmp-{dead}")]
    for path in stale:
        path.write_text('{"id": "cut off')
    write_synthetic_files(cfg)
    assert sorted(p.name for p in train.parent.iterdir()) == ["train.jsonl", "valid.jsonl"]
    assert len(list(iter_records(train))) == 4


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_full_disk_while_writing_a_reference_store(tmp_path):
    store = ReferenceStore(("short_chosen",), data_fingerprint="f")
    store.add("a", {"short_chosen": -1.5})
    target = tmp_path / "ref.jsonl"
    dead = _dead_pid()
    (tmp_path / f"ref.jsonl.tmp-{dead}").write_text("partial")  # a killed writer's, older naming
    scratch_path(target).symlink_to("/dev/full")
    with pytest.raises(DataError, match=rf"^{target}: cannot write reference store: {NO_SPACE}$"):
        store.save(target)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_writing_the_evaluation_sets(tmp_path, monkeypatch):
    from solopo_megatron.data.eval_sets import parse_long_length
    from solopo_megatron.megatron import long_eval
    from solopo_megatron.recipe.loading import load_config

    cfg = load_config(RECIPE, [f"dataset.cache_dir={tmp_path}"])
    valid = tmp_path / "valid.jsonl"
    write_jsonl(_records(4), valid)
    folder = tmp_path / "long_eval" / "key"
    calls = []

    def write_then_fill(records, path):
        calls.append(path)
        if len(calls) > 1:
            _no_space()
        return write_jsonl(records, path)

    monkeypatch.setattr(long_eval, "write_jsonl", write_then_fill)
    with pytest.raises(DataError, match=rf"^{folder}: cannot write the evaluation sets: {NO_SPACE}$"):
        long_eval._write_length_files(
            cfg, str(valid), [parse_long_length("2x")], folder, load_tokenizer("tiny")
        )
    assert len(calls) == 2 and list(folder.parent.iterdir()) == []


def test_an_incomplete_cache_folder_in_the_way_is_named(tmp_path):
    (tmp_path / "key").mkdir()
    (tmp_path / "key" / "tokens.bin").write_bytes(b"x")
    with pytest.raises(
        DataError, match=r"key: an incomplete test cache \(no done\) is in the way; delete it"
    ):
        with cache_directory(tmp_path / "key", "test cache", marker="done"):
            pass


# --------------------------------------------------------------------------- byte order mark, warnings


def test_a_utf8_bom_file_reads_validates_and_tokenises_as_without(tmp_path, encoder, capsys):
    from solopo_megatron.cli import main

    records = _records(4)
    plain = _write(tmp_path / "plain.jsonl", records)
    bom = _write(tmp_path / "bom.jsonl", records, prefix=codecs.BOM_UTF8)
    assert [r.to_json() for r in iter_records(bom)] == [r.to_json() for r in iter_records(plain)]
    assert main(["validate", str(bom)]) == 0
    assert "bom.jsonl: 4 valid records" in capsys.readouterr().out
    a, _ = TokenizedDataset.build(plain, encoder, ROLES, cache_dir=tmp_path / "c", progress=False)
    b, _ = TokenizedDataset.build(bom, encoder, ROLES, cache_dir=tmp_path / "c", progress=False)
    assert len(a) == len(b) == 4
    assert all(a.group(i) == b.group(i) for i in range(4))


def test_a_bom_in_build_long_input_and_distractors(tmp_path, capsys):
    from solopo_megatron.cli import main

    short = [
        {k: r[k] for k in ("id", "question", "short_context", "chosen", "rejected")} for r in _records(2)
    ]
    data = _write(tmp_path / "short.jsonl", short, prefix=codecs.BOM_UTF8)
    docs = tmp_path / "docs.txt"
    docs.write_bytes(codecs.BOM_UTF8 + b"The mill stands by the river.\n\nNobody built the bridge.\n")
    argv = ["build-long", str(data), "--out", str(tmp_path / "long.jsonl"), "--distractors", str(docs)]
    assert main([*argv, "--target-tokens", "200"]) == 0, capsys.readouterr()
    assert "\ufeff" not in (tmp_path / "long.jsonl").read_text(encoding="utf-8")


def test_long_context_equal_to_short_context_is_a_warning(tmp_path, capsys):
    from solopo_megatron.cli import main

    records = _records(6)
    for i in (1, 4):
        records[i]["long_context"] = records[i]["short_context"]
    data = _write(tmp_path / "data.jsonl", records)
    for extra in ([], ["--no-tokenizer-check"]):
        assert main(["validate", str(data), *extra]) == 0
        out = capsys.readouterr().out
        for i in (1, 4):
            assert (
                f"warning: {data}:{i + 1}: field 'long_context': id '{records[i]['id']}': the same text"
                in out
            )
        assert "6 valid records, 2 warnings" in out
    assert main(["validate", str(data), "--max-problems", "1"]) == 0
    assert "... and 1 more warnings" in capsys.readouterr().out
