"""A generated corpus of bad inputs, each run through a command-line entry point as a user would.

Every case must end with a non-zero exit, one message naming the file (and line and field) or the
recipe key or option at fault, no Python traceback, and every file of the case's folder unchanged
(nothing lost, nothing half-written). Inputs are generated here from the synthetic data and the tiny
recipe, then broken one way each. The entry points run in this process, so the corpus takes seconds.
"""

from __future__ import annotations

import codecs
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from checkpoint_files import write_checkpoint_files

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"


@dataclass(frozen=True)
class Case:
    # "data" (solopo-data), "train" (solopo-train), "ref-logps" (solopo-ref-logps), "export"
    # (solopo-export), "experiment" (solopo-experiment)
    command: str
    argv: list[str]
    expected: tuple[str, ...] = ()  # pieces of the message: the file/line/field, or the key or option
    pattern: str | None = None  # a regex the output must match (re.search), as well
    code: int = 2  # the exit code (0: a warning case, or input that is accepted)
    env: dict[str, str] = field(default_factory=dict)  # environment variables set for the case


def _records(tmp: Path, count: int = 6) -> list[dict]:
    from solopo_megatron.data.synthetic import generate_synthetic_records

    return list(generate_synthetic_records(count, seed=11, id_prefix="c"))


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _data_file(tmp: Path, edit_line_3: Callable[[str], str] | None = None) -> Path:
    """A valid JSONL file of synthetic records whose line 3 is replaced by ``edit_line_3(line)``."""
    lines = [json.dumps(record) for record in _records(tmp)]
    if edit_line_3 is not None:
        lines[2] = edit_line_3(lines[2])
    return _write_lines(tmp / "data.jsonl", lines)


def _distractors(tmp: Path) -> str:
    text = "The river bends twice before the mill. Nobody remembers who built the bridge.\n\n" * 20
    path = tmp / "distractors.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _with_field(line: str, field: str, raw_value: str) -> str:
    """``line`` with ``field`` set to the raw JSON text ``raw_value`` (kept invalid where it is meant to be)."""
    record = json.loads(line)
    record.pop(field, None)
    return json.dumps(record)[:-1] + f', "{field}": {raw_value}}}'


def _train(tmp: Path, *overrides: str, dry_run: bool = False) -> list[str]:
    flags = ["--dry-run"] if dry_run else []
    # One process (this one): the layout must fit a world of 1, so the case's problem is the only one.
    layout = ["model.context_parallel_size=1"]
    return [*flags, "--config", str(RECIPE), *layout, f"dataset.cache_dir={tmp / 'cache'}", *overrides]


def _checkpoint_root(tmp: Path, *, latest: str | None, iteration: int = 2, complete: bool = True) -> Path:
    """A checkpoint folder with one (fake) dist_checkpointing iteration, its run's config.yaml and a latest file."""
    root = tmp / "run"
    folder = root / f"iter_{iteration:07d}"
    if complete:
        write_checkpoint_files(folder)
    else:
        folder.mkdir(parents=True)
    from solopo_megatron.recipe.loading import load_config

    model = load_config(RECIPE).model
    (root / "config.yaml").write_text(
        yaml.safe_dump({"model": {f: getattr(model, f) for f in model.__dataclass_fields__}})
    )
    if latest is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(latest)
    return root


def _reference_store(tmp: Path, *, truncated: bool) -> Path:
    """A store for this data (its real fingerprint) with three entries, then broken."""
    from solopo_megatron.data.records import ROLES
    from solopo_megatron.data.reference_store import ReferenceStore
    from solopo_megatron.recipe.loading import load_config
    from solopo_megatron.recipe.sources import expected_reference_fingerprint, write_synthetic_files

    cfg = load_config(RECIPE, ["model.context_parallel_size=1", f"dataset.cache_dir={tmp / 'cache'}"])
    write_synthetic_files(cfg)
    fingerprint = expected_reference_fingerprint(cfg) if truncated else "0" * 24
    store = ReferenceStore(ROLES, data_fingerprint=fingerprint, info={"source": "test"})
    for i in range(3):
        store.add(
            f"x{i}",
            {"short_chosen": -1.0, "short_rejected": -2.0, "long_chosen": -3.0, "long_rejected": -4.0},
        )
    path = tmp / "ref.jsonl"
    store.save(path)
    if truncated:
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    return path


def _cases() -> dict[str, Callable[[Path], Case]]:
    cases: dict[str, Callable[[Path], Case]] = {}

    def data_record(name: str, edit: Callable[[str], str], *expected: str) -> None:
        cases[f"data: {name}"] = lambda tmp: Case(
            "data",
            ["validate", str(_data_file(tmp, edit)), "--no-tokenizer-check"],
            ("data.jsonl:3", *expected),
            code=1,  # solopo-data validate: 1 for invalid records, 2 for a bad command line
        )

    # Records that used to pass or end in a traceback.
    data_record(
        "lone surrogate",
        lambda line: _with_field(line, "question", '"\\ud800"'),
        "question",
        "invalid unicode",
    )
    data_record("duplicate key", lambda line: line[:-1] + ', "chosen": "again"}', "chosen", "duplicate key")
    data_record(
        "whitespace-equal answers",
        lambda line: _with_field(line, "rejected", json.dumps("  " + json.loads(line)["chosen"] + " \n")),
        "rejected",
    )
    data_record("invalid JSON", lambda line: line[:-5], "JSON")
    data_record(
        "missing field",
        lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "question"}),
        "question",
    )
    data_record("wrong type", lambda line: _with_field(line, "chosen", "42"), "chosen")
    cases["data: a directory as the data file"] = lambda tmp: Case(
        "data", ["validate", str(tmp), "--no-tokenizer-check"], (str(tmp), "is a directory")
    )
    # The data CLI: outputs, counts, sizes, templates.
    cases["data: build-long IN --out IN"] = lambda tmp: Case(
        "data", ["build-long", str(_data_file(tmp)), "--out", str(tmp / "data.jsonl"), "--target-tokens", "500", "--distractors", _distractors(tmp)],
        ("--out", "data.jsonl", "input"),
    )  # fmt: skip
    cases["data: build-long missing input"] = lambda tmp: Case(
        "data", ["build-long", str(tmp / "nope.jsonl"), "--out", str(tmp / "long.jsonl"), "--target-tokens", "500", "--distractors", _distractors(tmp)],
        ("nope.jsonl", "does not exist"),
    )  # fmt: skip
    for option, value in (("--target-tokens", "-1"), ("--depth", "2"), ("--compression-ratio", "0")):
        cases[f"data: build-long {option} {value}"] = lambda tmp, option=option, value=value: Case(
            "data",
            [
                "build-long",
                str(_data_file(tmp)),
                "--out",
                str(tmp / "long.jsonl"),
                "--distractors",
                _distractors(tmp),
                option,
                value,
            ],
            (option,),
        )
    for option, value in (("--max-tokens", "0"), ("--dp", "-1"), ("--cp", "0")):
        cases[f"data: inspect {option} {value}"] = lambda tmp, option=option, value=value: Case(
            "data", ["inspect", str(_data_file(tmp)), option, value], (option,)
        )
    # Options argparse accepts that used to end in a traceback once the work began.
    cases["data: inspect --max-tokens below the largest group"] = lambda tmp: Case(
        "data", ["inspect", str(_data_file(tmp)), "--max-tokens", "16"], ("--max-tokens 16", "largest", "data.jsonl")
    )  # fmt: skip
    cases["data: inspect --cp 3 (4096 is no multiple of 6)"] = lambda tmp: Case(
        "data", ["inspect", str(_data_file(tmp)), "--cp", "3"], ("--max-tokens 4096", "multiple of 6", "--cp 3")
    )  # fmt: skip
    cases["data: inspect --cache-dir a file"] = lambda tmp: Case(
        "data", ["inspect", str(_data_file(tmp)), "--cache-dir", str(_data_file(tmp))], ("--cache-dir", "data.jsonl")
    )  # fmt: skip

    def not_a_tokenizer(tmp: Path) -> str:
        folder = tmp / "notok"
        folder.mkdir()
        (folder / "readme.txt").write_text("not a tokenizer\n")
        return str(folder)

    def broken_tokenizer(tmp: Path) -> str:
        from solopo_megatron.data.tiny_tokenizer import TINY_TOKENIZER_DIR

        folder = tmp / "broken"
        folder.mkdir()
        for file in TINY_TOKENIZER_DIR.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        (folder / "tokenizer.json").write_text("{not json")
        return str(folder)

    for command in ("validate", "inspect"):
        cases[f"data: {command} --tokenizer a folder of no tokenizer"] = lambda tmp, command=command: Case(
            "data", [command, str(_data_file(tmp)), "--tokenizer", not_a_tokenizer(tmp)], ("--tokenizer", "notok", "not a tokenizer folder")
        )  # fmt: skip
    cases["data: validate --tokenizer a broken tokenizer.json"] = lambda tmp: Case(
        "data", ["validate", str(_data_file(tmp)), "--tokenizer", broken_tokenizer(tmp)], ("--tokenizer", "broken", "not a tokenizer folder")
    )  # fmt: skip
    cases["data: build-long --tokenizer a folder of no tokenizer"] = lambda tmp: Case(
        "data", ["build-long", str(_data_file(tmp)), "--out", str(tmp / "long.jsonl"), "--target-tokens", "500", "--distractors", _distractors(tmp), "--tokenizer", not_a_tokenizer(tmp)],
        ("--tokenizer", "notok", "not a tokenizer folder"),
    )  # fmt: skip

    def empty_folder(tmp: Path) -> str:
        (tmp / "docs").mkdir()
        (tmp / "docs" / "notes.md").write_text("not a distractor file\n")
        return str(tmp / "docs")

    cases["data: build-long --distractors a folder of no .txt/.jsonl"] = lambda tmp: Case(
        "data", ["build-long", str(_data_file(tmp)), "--out", str(tmp / "long.jsonl"), "--target-tokens", "500", "--distractors", empty_folder(tmp)],
        ("--distractors", "docs", ".txt"),
    )  # fmt: skip

    def raw_file(tmp: Path, content: bytes) -> str:
        (tmp / "in.jsonl").write_bytes(content)
        return str(tmp / "in.jsonl")

    for name, content in (("empty", b""), ("blank-lines", b"\n  \n\t\n"), ("binary", bytes(range(256)) * 4)):
        cases[f"data: inspect an {name} file"] = lambda tmp, content=content: Case(
            "data", ["inspect", raw_file(tmp, content)], ("in.jsonl",)
        )
        cases[f"data: build-long an {name} file"] = lambda tmp, content=content: Case(
            "data", ["build-long", raw_file(tmp, content), "--out", str(tmp / "long.jsonl"), "--target-tokens", "500", "--distractors", _distractors(tmp)],
            ("in.jsonl",),
        )  # fmt: skip
    cases["data: synthetic --num-records -5"] = lambda tmp: Case(
        "data", ["synthetic", "--num-records", "-5", "--out", str(tmp / "s.jsonl")], ("--num-records",)
    )
    cases["data: synthetic --out in a missing folder"] = lambda tmp: Case(
        "data",
        ["synthetic", "--num-records", "3", "--out", str(tmp / "nodir" / "s.jsonl")],
        ("--out", "nodir"),
    )
    cases["data: synthetic --out a folder"] = lambda tmp: Case(
        "data", ["synthetic", "--num-records", "3", "--out", str(tmp)], ("--out", "directory")
    )
    cases["data: unknown template placeholder"] = lambda tmp: Case(
        "data", ["validate", str(_data_file(tmp)), "--prompt-template", "{contxt} {question}"], ("--prompt-template", "contxt")
    )  # fmt: skip
    cases["data: tiny-tokenizer --out an existing file"] = lambda tmp: Case(
        "data", ["tiny-tokenizer", "--out", str(_data_file(tmp))], ("--out", "data.jsonl")
    )
    cases["data: validate --max-problems -1"] = lambda tmp: Case(
        "data", ["validate", str(_data_file(tmp)), "--max-problems", "-1"], ("--max-problems",)
    )

    # Recipes: each problem named by its key, before anything runs (the dry run too).
    def recipe(name: str, overrides: list[str], *expected: str, dry_run: bool = False) -> None:
        cases[f"recipe: {name}"] = lambda tmp: Case(
            "train", _train(tmp, *overrides, dry_run=dry_run), expected
        )

    recipe("hidden_size 0", ["model.hidden_size=0"], "model.hidden_size")
    recipe("num_layers -1 (dry run)", ["model.num_layers=-1"], "model.num_layers", dry_run=True)
    recipe("lr 0", ["optimizer.lr=0"], "optimizer.lr")
    recipe("lr nan", ["optimizer.lr=.nan"], "optimizer.lr")
    recipe("lr inf", ["optimizer.lr=.inf"], "optimizer.lr")
    recipe("min_lr above lr", ["optimizer.min_lr=1.0"], "optimizer.min_lr")
    recipe("decay style typo", ["scheduler.lr_decay_style=cosin"], "scheduler.lr_decay_style")
    recipe("optimizer typo", ["optimizer.optimizer=adamw"], "optimizer.optimizer")
    recipe(
        "transformer_impl typo (dry run)",
        ["model.transformer_impl=te"],
        "model.transformer_impl",
        dry_run=True,
    )
    recipe("recompute typo", ["model.recompute_granularity=ful"], "model.recompute_granularity")
    recipe(
        "prompt template without {question}",
        ["dataset.prompt_template='{context}: answer'"],
        "dataset.prompt_template",
    )
    recipe("unknown key", ["model.hiden_size=8"], "hiden_size", "hidden_size")
    recipe("unparsable override", ["train.train_iters=[1,"], "train.train_iters=[1,")
    recipe("data file is a directory", ["dataset.train_path=/"], "dataset.train_path", "is a directory")
    cases["recipe: --world-size 0"] = lambda tmp: Case(
        "train", ["--world-size", "0", *_train(tmp, dry_run=True)], ("--world-size",)
    )
    cases["recipe: --config a directory"] = lambda tmp: Case(
        "train", ["--config", str(tmp)], (str(tmp), "directory")
    )
    cases["recipe: a scalar file"] = lambda tmp: Case(
        "train", ["--config", str(_write_lines(tmp / "scalar.yaml", ["42"]))], ("scalar.yaml",)
    )
    cases["recipe: a list file"] = lambda tmp: Case(
        "train", ["--config", str(_write_lines(tmp / "list.yaml", ["- model", "- train"]))], ("list.yaml",)
    )
    cases["recipe: store for other data (dry run)"] = lambda tmp: Case(
        "train", _train(tmp, f"solopo.reference_store={_reference_store(tmp, truncated=False)}", dry_run=True),
        ("solopo.reference_store", "ref.jsonl"),
    )  # fmt: skip
    cases["recipe: truncated store"] = lambda tmp: Case(
        "train", _train(tmp, f"solopo.reference_store={_reference_store(tmp, truncated=True)}"),
        ("solopo.reference_store", "ref.jsonl"),
    )  # fmt: skip
    cases["recipe: ref-logps into a directory"] = lambda tmp: Case(
        "ref-logps", _train(tmp, f"solopo.reference_store={tmp}"), ("solopo.reference_store", "directory")
    )

    # Checkpoint folders: one message naming the path and what to do, before any compute.
    def checkpoint(name: str, make: Callable[[Path], Path], *expected: str) -> None:
        cases[f"checkpoint: {name}"] = lambda tmp: Case(
            "train", _train(tmp, f"checkpoint.save={make(tmp)}"), ("checkpoint.save", *expected)
        )

    checkpoint("corrupt latest", lambda tmp: _checkpoint_root(tmp, latest="garbage\n"), "corrupt")
    checkpoint(
        "latest names a missing iteration", lambda tmp: _checkpoint_root(tmp, latest="7\n"), "iter_0000007"
    )
    checkpoint(
        "latest names a damaged iteration",
        lambda tmp: _checkpoint_root(tmp, latest="2\n", complete=False),
        "iter_0000002",
    )
    checkpoint(
        "iterations without a latest file", lambda tmp: _checkpoint_root(tmp, latest=None), "iter_0000002"
    )
    checkpoint("save is a file", lambda tmp: _write_lines(tmp / "file", ["x"]), "is a file")

    def other_model(tmp: Path) -> Path:
        root = _checkpoint_root(tmp, latest="2\n")
        saved = yaml.safe_load((root / "config.yaml").read_text())
        saved["model"]["hidden_size"] = 128
        (root / "config.yaml").write_text(yaml.safe_dump(saved))
        return root

    checkpoint("a checkpoint of another model", other_model, "model.hidden_size")

    def locked(tmp: Path) -> Path:
        root = tmp / "run"
        root.mkdir()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        _SLEEPERS.append(sleeper)
        owner = {"host": socket.gethostname(), "pid": sleeper.pid}  # a live process, not this one
        from solopo_megatron.recipe.checkpoints import LOCK

        (root / LOCK).write_text(json.dumps(owner))
        return root

    checkpoint("a run already writing there", locked, "in use")
    cases.update(_round3_cases())
    return cases


# ----------------------------------------------------------------------------- round 3 (issue 21)


def _run_with_two_iterations(tmp: Path, break_newest: Callable[[Path], None] | None = None) -> Path:
    """A run folder (config.yaml, tokenizer/, latest = 2) with checkpoints 1 and 2; ``break_newest``
    damages iteration 2 (1 stays complete, so the fix names it)."""
    root = _checkpoint_root(tmp, latest="2\n", iteration=2)
    write_checkpoint_files(root / "iter_0000001")
    from solopo_megatron.data.tokenize import load_tokenizer

    load_tokenizer("tiny").save_pretrained(str(root / "tokenizer"))
    if break_newest is not None:
        break_newest(root / "iter_0000002")
    return root


def _lose_shard(folder: Path) -> None:
    (folder / "__0_0.distcp").unlink()


def _truncate(name: str) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return cut


def _pretrained(tmp: Path, **edits) -> Path:
    """A Hugging Face folder (config.json only: the checks read no weights) of the tiny recipe's model,
    with ``edits`` applied to its config (``None`` removes a key)."""
    from solopo_megatron.data.tokenize import load_tokenizer
    from solopo_megatron.recipe.hf_config import export_hf_config
    from solopo_megatron.recipe.loading import load_config

    model = load_config(RECIPE, ["model.context_parallel_size=1"]).model
    config = export_hf_config(model, 1024, load_tokenizer("tiny"), None, "fp32")
    for key, value in edits.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _a_file(tmp: Path) -> Path:
    return _write_lines(tmp / "a-file", ["not a folder"])


def _outside_cache(tmp: Path) -> str:
    """A cache beside the case folder: a run that tokenises writes a complete, legitimate cache."""
    return f"dataset.cache_dir={tmp.parent / (tmp.name + '-cache')}"


def _one_step(tmp: Path, data: Path, *overrides: str) -> list[str]:
    return _train(
        tmp, f"dataset.train_path={data}", "train.global_batch_size=4", "train.train_iters=1",
        "train.eval_interval=null", "scheduler.lr_warmup_iters=0", _outside_cache(tmp), *overrides,
    )  # fmt: skip


def _synthetic_on_a_full_disk(tmp: Path) -> list[str]:
    """The synthetic data's write (this process's scratch file) leads to /dev/full: ENOSPC."""
    from solopo_megatron.data.files import scratch_path
    from solopo_megatron.recipe.loading import load_config
    from solopo_megatron.recipe.sources import synthetic_paths

    argv = _train(tmp, "train.train_iters=1", "train.eval_interval=null", "scheduler.lr_warmup_iters=0")
    train, _ = synthetic_paths(load_config(RECIPE, argv[argv.index("--config") + 2 :]))
    train.parent.mkdir(parents=True)
    scratch_path(train).symlink_to("/dev/full")
    return argv


def _bom_file(tmp: Path) -> Path:
    path = _data_file(tmp)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    return path


def _round3_cases() -> dict[str, Callable[[Path], Case]]:
    cases: dict[str, Callable[[Path], Case]] = {}

    def export(name: str, make_argv: Callable[[Path], list[str]], pattern: str) -> None:
        cases[f"export: {name}"] = lambda tmp: Case("export", make_argv(tmp), pattern=pattern)

    # Data loss: the export never writes into, over or inside a folder it reads. (name, --checkpoint and
    # --out relative to the case folder, more flags, what the message says of --out)
    for name, checkpoint, out, flags, where in (
        ("--out the only iteration, --overwrite", "run", "run/iter_0000002", ["--overwrite"], "is inside"),
        ("--checkpoint ITER --out ITER", "run/iter_0000002", "run/iter_0000002", [], "is inside"),
        ("--out the run's tokenizer, --overwrite", "run", "run/tokenizer", ["--overwrite"], "is inside"),
        ("--out inside an iteration folder", "run", "run/iter_0000002/hf", [], "is inside"),
        ("--out the run folder itself", "run", "run", ["--overwrite"], "is"),
        ("--out a folder above the run, --overwrite", "run", ".", ["--overwrite"], "holds"),
    ):
        what = r"\S*/run \(the run folder\), which the export reads"
        export(
            name,
            lambda tmp, checkpoint=checkpoint, out=out, flags=flags: [
                "--checkpoint", str(_run_with_two_iterations(tmp).parent / checkpoint),
                "--out", str((tmp / out).resolve()), *flags,
            ],
            rf"--out: \S+ {where} {what}",
        )  # fmt: skip

    # Silent wrong training: a pretrained vocabulary smaller than the tokenizer's.
    small_vocab = (
        r"checkpoint\.pretrained_hf: .*hf has a vocabulary of 500 .*dataset\.tokenizer's 1024 tokens"
    )
    for dry in (False, True):
        cases[f"recipe: pretrained vocabulary 500 < tokenizer's 1024{' (dry run)' if dry else ''}"] = (
            lambda tmp, dry=dry: Case(
                "train",
                _train(tmp, f"checkpoint.pretrained_hf={_pretrained(tmp, vocab_size=500)}", dry_run=dry),
                pattern=small_vocab,
            )
        )

    # Incomplete checkpoints, judged from their own .metadata before any process group.
    for what, breaks, message in (
        ("missing a shard", _lose_shard, r"is missing __0_0\.distcp, a shard its \.metadata lists"),
        ("with a truncated shard", _truncate("__0_0.distcp"), r"has a truncated __0_0\.distcp \(\d+ bytes, its \.metadata needs \d+"),
        ("with a truncated common.pt", _truncate("common.pt"), r"has a truncated common\.pt"),
        ("with a truncated .metadata", _truncate(".metadata"), r"has an unreadable \.metadata"),
    ):  # fmt: skip
        cases[f"checkpoint: resume from an iteration {what}"] = lambda tmp, breaks=breaks, message=message: Case(
            "train",
            _train(tmp, f"checkpoint.save={_run_with_two_iterations(tmp, breaks)}"),
            pattern=rf"checkpoint\.save: .*names iter_0000002, which {message}.*`echo 1 > .*latest_checkpointed_iteration\.txt`",
        )  # fmt: skip
        export(
            f"an iteration {what}",
            lambda tmp, breaks=breaks: ["--checkpoint", str(_run_with_two_iterations(tmp, breaks)), "--out", str(tmp / "hf-out")],
            rf"--checkpoint: .*names iter_0000002, which {message}.*export it with --iteration 1",
        )  # fmt: skip

    # Paths and variables, checked before launch: one line naming the key or variable.
    def start_up(name: str, pattern: str, *overrides: Callable[[Path], str], env: dict | None = None) -> None:
        cases[f"start-up: {name}"] = lambda tmp: Case(
            "train",
            _train(tmp, *(make(tmp) for make in overrides)),
            pattern=pattern,
            env={k: v(tmp) if callable(v) else v for k, v in (env or {}).items()},
        )

    start_up(
        "dataset.cache_dir under a file",
        r"dataset\.cache_dir: cannot create .*a-file/cache: .*a-file is a file",
        lambda tmp: f"dataset.cache_dir={_a_file(tmp) / 'cache'}",
    )
    start_up(
        "dataset.cache_dir on a folder that cannot be written",
        r"dataset\.cache_dir: cannot write in /sys \(/sys/solopo-cache's nearest existing folder\)",
        lambda tmp: "dataset.cache_dir=/sys/solopo-cache",
    )
    start_up(
        "SOLOPO_CACHE_DIR a file",
        r"SOLOPO_CACHE_DIR \(dataset\.cache_dir is unset\): .*a-file is a file, not a folder",
        lambda tmp: "dataset.cache_dir=null",
        env={"SOLOPO_CACHE_DIR": lambda tmp: str(_a_file(tmp))},
    )
    start_up(
        "logger.metrics_file a folder",
        r"logger\.metrics_file: .* is a folder; name a file in it",
        lambda tmp: f"logger.metrics_file={tmp}",
    )
    start_up(
        "logger.metrics_file where nothing can be written",
        r"logger\.metrics_file: cannot write in /sys",
        lambda tmp: "logger.metrics_file=/sys/metrics.jsonl",
    )
    start_up(
        "logger.tensorboard_dir a file",
        r"logger\.tensorboard_dir: .*a-file is a file, not a folder",
        lambda tmp: f"logger.tensorboard_dir={_a_file(tmp)}",
    )
    for name, value in (
        ("SOLOPO_DIST_TIMEOUT_MIN", "abc"),
        ("SOLOPO_DIST_TIMEOUT_MIN", "0"),
        ("SOLOPO_KERNELS", "foo"),
    ):
        start_up(f"{name}={value}", rf"{name}: must be .*got '{value}'", env={name: value})  # fmt: skip

    # Clearer messages.
    export(
        "--iteration -1",
        lambda tmp: ["--checkpoint", str(_run_with_two_iterations(tmp)), "--iteration", "-1", "--out", str(tmp / "o")],
        r"--iteration: must be >= 1",
    )  # fmt: skip
    export(
        "--out where nothing can be written",
        lambda tmp: ["--checkpoint", str(_run_with_two_iterations(tmp)), "--out", "/sys/solopo-hf"],
        r"--out: cannot write in /sys \(/sys/solopo-hf's nearest existing folder\)",
    )  # fmt: skip
    cases["recipe: eval.long_lengths=2x (not a list)"] = lambda tmp: Case(
        "train", _train(tmp, "eval.long_lengths=2x"), pattern=r"eval\.long_lengths must be a list, e\.g\. eval\.long_lengths=\[2x\]"
    )  # fmt: skip
    cases["recipe: a wrong type names the key without OmegaConf's trailer"] = lambda tmp: Case(
        "train", _train(tmp, "train.train_iters=many"), pattern=r"train\.train_iters: Value 'many'"
    )
    cases["recipe: dataset.tokenizer a data folder"] = lambda tmp: Case(
        "train",
        _train(tmp, f"dataset.tokenizer={_data_file(tmp).parent}"),
        pattern=r"^error: invalid recipe:\n  - dataset\.tokenizer: .* is not a tokenizer folder",
    )

    def experiment_file(tmp: Path) -> str:
        text = (
            f"recipe: {RECIPE}\noutput_dir: {_a_file(tmp) / 'out'}\nvariants: [{{name: a, overrides: []}}]\n"
        )
        return str(_write_lines(tmp / "experiment.yaml", [text]))

    cases["experiment: output_dir under a file"] = lambda tmp: Case(
        "experiment", ["--config", experiment_file(tmp)], pattern=r"output_dir: cannot create .*a-file/out"
    )
    for name, edits, message in (
        ("no config.json", None, r"is not a Hugging Face checkpoint directory \(no config\.json\)"),
        ("GPT-2", {"architectures": ["GPT2LMHeadModel"]}, r"unsupported architecture GPT2LMHeadModel"),
        ("Mistral with a sliding window", {"architectures": ["LlamaForCausalLM"], "use_sliding_window": True}, r"sliding-window attention is not supported"),
        ("Llama with attention_bias", {"attention_bias": True}, r"attention_bias / mlp_bias"),
        ("Qwen2 (QKV bias) for a recipe without add_qkv_bias", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, r"model\.add_qkv_bias: recipe False, checkpoint True"),
    ):  # fmt: skip

        def pretrained_folder(tmp: Path, edits=edits) -> Path:
            if edits is None:
                (tmp / "hf").mkdir()
                return tmp / "hf"
            return _pretrained(tmp, **edits)

        cases[f"recipe: pretrained_hf with {name} (dry run)"] = lambda tmp, make=pretrained_folder, message=message: Case(
            "train", _train(tmp, f"checkpoint.pretrained_hf={make(tmp)}", dry_run=True), pattern=message
        )  # fmt: skip

    def not_json(tmp: Path) -> Path:
        folder = _pretrained(tmp)
        (folder / "config.json").write_text("{not json")
        return folder

    # Data that cannot fill the run, a full disk, and input that is accepted or only warned about.
    cases["data: 1 record, train.global_batch_size=4"] = lambda tmp: Case(
        "train", _one_step(tmp, _write_lines(tmp / "one.jsonl", [json.dumps(_records(tmp)[0])])),
        pattern=r"^error: dataset\.train_path \S*one\.jsonl: 1 usable example\(s\), fewer than train\.global_batch_size=4",
    )  # fmt: skip
    cases["data: a record over dataset.max_tokens"] = lambda tmp: Case(
        "train",
        _one_step(tmp, _data_file(tmp, lambda line: _with_field(line, "long_context", json.dumps(json.loads(line)["long_context"] + " filler" * 400))), "dataset.max_tokens=1024"),
        pattern=r"^error: \S*data\.jsonl:3: example 'c-000002' needs \d+ tokens .*more than dataset\.max_tokens=1024",
    )  # fmt: skip
    if Path("/dev/full").exists():
        cases["data: disk full while writing the synthetic data"] = lambda tmp: Case(
            "train", _synthetic_on_a_full_disk(tmp),
            pattern=r"^error: \S*/synthetic/\w+/train\.jsonl: cannot write the synthetic data: No space left on device$",
        )  # fmt: skip
    cases["data: a UTF-8 BOM is accepted (validate)"] = lambda tmp: Case(
        "data", ["validate", str(_bom_file(tmp))], pattern=r"data\.jsonl: 6 valid records$", code=0
    )
    cases["data: a UTF-8 BOM is accepted (train)"] = lambda tmp: Case(
        "train", _one_step(tmp, _bom_file(tmp)), pattern=r"; 6 train examples;", code=0
    )
    cases["data: long_context == short_context warns"] = lambda tmp: Case(
        "data",
        ["validate", str(_data_file(tmp, lambda line: _with_field(line, "long_context", json.dumps(json.loads(line)["short_context"]))))],
        pattern=r"^warning: \S*data\.jsonl:3: field 'long_context': id 'c-000002': the same text as short_context",
        code=0,
    )  # fmt: skip
    # Divergence: one line naming the steps and what was not finite; no save during the streak. The run
    # writes its cache and checkpoints beside the case folder (legitimate outputs).
    cases["train: a diverging run (optimizer.lr=1e30)"] = lambda tmp: Case(
        "train",
        _train(
            tmp, "optimizer.lr=1e30", "scheduler.lr_warmup_iters=0", "scheduler.lr_decay_style=constant",
            "train.train_iters=4", "train.max_skipped_steps_in_a_row=2", "train.eval_interval=null",
            "dataset.synthetic.num_train=32", "dataset.synthetic.num_valid=8", "solopo.preference_loss=simpo",
            _outside_cache(tmp), f"checkpoint.save={tmp.parent / (tmp.name + '-run')}", "checkpoint.save_interval=1",
        ),
        pattern=r"^error: training diverged: steps 2-3 had non-finite values \(2 in a row, limit "
        r"train\.max_skipped_steps_in_a_row=2\), their updates skipped and not saved; step 3: loss nan\. "
        r"Lower optimizer\.lr \(now 1e\+30\) and start afresh in a new checkpoint\.save folder \(the last "
        r"checkpoint, \S+-run/iter_0000001, keeps its learning-rate schedule\)$",
    )  # fmt: skip

    # Resume with other roles: the mode and the roles are named (not "other data").
    def trained_with_solopo(tmp: Path) -> Path:
        root = _checkpoint_root(tmp, latest="2\n")
        saved = yaml.safe_load((root / "config.yaml").read_text())
        saved["solopo"] = {"mode": "solopo", "preference_loss": "dpo"}
        (root / "config.yaml").write_text(yaml.safe_dump(saved))
        return root

    cases["checkpoint: resumed with another solopo.mode"] = lambda tmp: Case(
        "train",
        _train(tmp, f"checkpoint.save={trained_with_solopo(tmp)}", "solopo.mode=short_po"),
        pattern=r"solopo\.mode: \S+/run/iter_0000002 was trained with solopo\.mode=solopo \(roles short_chosen, "
        r"short_rejected, long_chosen; from \S+/config\.yaml\), this recipe has solopo\.mode=short_po \(roles "
        r"short_chosen, short_rejected\), and a run cannot change the roles it trains on: resume with "
        r"solopo\.mode=solopo",
    )  # fmt: skip
    cases["recipe: a world of 3 for cp 2 (torchrun's rank 0)"] = lambda tmp: Case(
        "train",
        ["--config", str(RECIPE), f"dataset.cache_dir={tmp / 'cache'}"],
        pattern=r"^error: invalid recipe:\n  - model\.tensor_model_parallel_size x pipeline_model_parallel_size x "
        r"context_parallel_size = 1 x 1 x 2 does not divide the world size 3$",
        env={"RANK": "0", "WORLD_SIZE": "3"},
    )  # fmt: skip
    cases["recipe: pretrained_hf config.json not JSON"] = lambda tmp: Case(
        "train", _train(tmp, f"checkpoint.pretrained_hf={not_json(tmp)}"), pattern=r"checkpoint\.pretrained_hf: .*hf/config\.json cannot be read"
    )  # fmt: skip
    return cases


_SLEEPERS: list[subprocess.Popen] = []  # owners of the live-lock case, ended after each test
CASES = _cases()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def end_sleepers():
    yield
    while _SLEEPERS:
        sleeper = _SLEEPERS.pop()
        sleeper.kill()
        sleeper.wait()


def _entry_point(command: str) -> Callable[[list[str]], int]:
    if command == "data":
        from solopo_megatron.cli import main
    elif command == "train":
        from solopo_megatron.train import main
    elif command == "ref-logps":
        from solopo_megatron.train import ref_logps_main as main
    elif command == "export":
        from solopo_megatron.export import main
    else:
        from solopo_megatron.experiment.run import main
    return main


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_clear_message(name, tmp_path, capsys, monkeypatch):
    case = CASES[name](tmp_path)
    capsys.readouterr()  # what building the case printed
    for variable, value in case.env.items():
        monkeypatch.setenv(variable, value)
    before = _snapshot(tmp_path)
    try:
        code = _entry_point(case.command)(case.argv)
    except SystemExit as exit_:  # argparse reports a bad option by exiting with 2
        code = exit_.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert (code or 0) == case.code, text
    assert "Traceback" not in text, text
    assert "full_key" not in text and "reference_type" not in text, text  # OmegaConf's trailer
    for piece in case.expected:
        assert piece in text, (piece, text)
    if case.pattern is not None:
        assert re.search(case.pattern, text, re.MULTILINE), (case.pattern, text)
    assert _snapshot(tmp_path) == before, "an input was changed or an output left behind"


def test_a_dead_writers_tokenised_scratch_goes_at_the_next_start(tmp_path, capsys):
    """A SIGKILLed tokenisation's ``tokenized/<key>.tmp-PID-HOST/`` is removed at the next start; a live
    writer's is kept."""
    from solopo_megatron.data.files import scratch_path
    from solopo_megatron.train import main

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # gone, as after a SIGKILL
    host = scratch_path("x").name.split("-", 2)[2]
    tokenized = tmp_path / "cache" / "tokenized"
    dead = tokenized / f"0123456789abcdef01234567.tmp-{child.pid}-{host}"
    live = tokenized / f"76543210fedcba9876543210.tmp-1-{host}"  # pid 1 is alive: kept
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "tokens.bin").write_bytes(b"\0" * 64)
    data = _write_lines(tmp_path / "one.jsonl", [json.dumps(_records(tmp_path)[0])])
    assert main(_train(tmp_path, f"dataset.train_path={data}", "train.global_batch_size=4")) == 2
    assert "fewer than train.global_batch_size=4" in capsys.readouterr().err
    assert not dead.exists() and live.exists()
