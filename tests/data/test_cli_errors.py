"""solopo-data and user mistakes: nothing lost, nothing cryptic.

Every case runs ``main(argv)`` in-process and checks: exit code 2 (1 for ``validate`` finding bad
records), a message naming the file, line and field or the option, no traceback, and every file in the
folder byte-identical afterwards with nothing added (no partial output, no temporary file left).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
from pathlib import Path

import pytest

from solopo_megatron.cli import main
from solopo_megatron.data.synthetic import generate_synthetic_records
from solopo_megatron.data.tiny_tokenizer import TINY_TOKENIZER_DIR

SHORT_FIELDS = ("id", "question", "short_context", "chosen", "rejected")


@pytest.fixture()
def folder(tmp_path, monkeypatch) -> Path:
    """A working folder with train.jsonl (full records), short.jsonl (no long contexts) and d.txt."""
    records = generate_synthetic_records(3, seed=0, long_target_words=40)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    short = [{k: r[k] for k in SHORT_FIELDS} for r in records]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    (tmp_path / "d.txt").write_text("\n\n".join(f"Filler document {i} about hills." for i in range(8)))
    (tmp_path / "subdir").mkdir()
    monkeypatch.chdir(tmp_path)  # argv below uses relative paths, as a user would
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for folders) under ``folder``, hidden ones too."""
    return {
        str(p.relative_to(folder)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``solopo-data ARGV``; argparse errors arrive as SystemExit(2)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


def assert_refused(capsys, folder: Path, argv: list[str], *messages: str, code: int = 2) -> None:
    """The command exits with ``code``, prints every one of ``messages`` and changes no file."""
    before = snapshot(folder)
    got, text = run(capsys, argv)
    assert got == code, text
    for message in messages:
        assert message in text, text
    assert snapshot(folder) == before


def replace_line(path: Path, line: int, edit) -> None:
    """Rewrites 1-based ``line`` of ``path`` (JSON text) with ``edit(text)``."""
    lines = path.read_text().splitlines()
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


BUILD = ["--distractors", "d.txt", "--target-tokens", "30"]

# ----------------------------------------------------------------------------- 1. no data loss


@pytest.mark.parametrize(
    "argv, named",
    [
        (["build-long", "short.jsonl", *BUILD, "--out", "short.jsonl"], "short.jsonl"),
        (["build-long", "short.jsonl", *BUILD, "--out", "./subdir/../short.jsonl"], "short.jsonl"),
        (["build-long", "short.jsonl", *BUILD, "--out", "d.txt"], "d.txt"),
        (
            ["build-long", "short.jsonl", "--distractors", ".", "--target-tokens", "30", "--out", "d.txt"],
            "d.txt",
        ),
    ],
    ids=[
        "out is the input",
        "same input spelt differently",
        "out is a distractor",
        "out in a distractor dir",
    ],
)
def test_output_that_is_an_input_is_refused(capsys, folder, argv, named):
    assert_refused(capsys, folder, argv, "--out", "is also an input", named)


def test_output_that_is_a_hard_link_to_the_input_is_refused(capsys, folder):
    (folder / "link.jsonl").hardlink_to(folder / "short.jsonl")
    assert_refused(
        capsys, folder, ["build-long", "short.jsonl", *BUILD, "--out", "link.jsonl"], "is also an input"
    )


def test_failed_build_long_keeps_the_old_output(capsys, folder):
    assert run(capsys, ["build-long", "short.jsonl", *BUILD, "--out", "long.jsonl"])[0] == 0
    replace_line(folder / "short.jsonl", 2, lambda text: text.replace('"question"', '"questin"'))
    assert_refused(
        capsys,
        folder,
        ["build-long", "short.jsonl", *BUILD, "--out", "long.jsonl"],
        "short.jsonl:2: field 'question': missing, empty or not a string",
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.replace('"question": "', '"question": "\\ud800', 1),
            "short.jsonl:2: field 'question': invalid unicode",
        ),
        (lambda t: t[:-1] + ', "chosen": "x"}', "short.jsonl:2: field 'chosen': duplicate key"),
        (
            lambda t: json.dumps(
                {**json.loads(t), "rejected": " " + json.loads(t)["chosen"].replace(" ", "\n")}
            ),
            "short.jsonl:2: field 'rejected': identical to chosen up to whitespace",
        ),
        (
            lambda t: json.dumps({**json.loads(t), "id": "syn-000000"}),
            "short.jsonl:2: field 'id': duplicate id",
        ),
        (
            lambda t: json.dumps({**json.loads(t), "colour": "red"}),
            "short.jsonl:2: field 'colour': unknown field",
        ),
    ],
    ids=["lone surrogate", "duplicate key", "equal up to whitespace", "duplicate id", "unknown field"],
)
def test_build_long_bad_record_leaves_no_output(capsys, folder, edit, message):
    replace_line(folder / "short.jsonl", 2, edit)
    assert_refused(capsys, folder, ["build-long", "short.jsonl", *BUILD, "--out", "long.jsonl"], message)


def test_build_long_non_utf8_input_names_the_line(capsys, folder):
    with open(folder / "short.jsonl", "ab") as handle:
        handle.write(b'{"id": "caf\xe9"}\n')
    assert_refused(
        capsys,
        folder,
        ["build-long", "short.jsonl", *BUILD, "--out", "long.jsonl"],
        "short.jsonl:4: not valid UTF-8",
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build-long", "missing.jsonl", *BUILD, "--out", "long.jsonl"], "missing.jsonl: does not exist"),
        (["build-long", "subdir", *BUILD, "--out", "long.jsonl"], "subdir: is a directory"),
        (
            [
                "build-long",
                "short.jsonl",
                "--distractors",
                "nope",
                "--target-tokens",
                "9",
                "--out",
                "long.jsonl",
            ],
            "--distractors nope: does not exist",
        ),
        (
            [
                "build-long",
                "short.jsonl",
                "--distractors",
                "subdir",
                "--target-tokens",
                "9",
                "--out",
                "o.jsonl",
            ],
            "the distractor corpus is empty",
        ),
        (
            ["build-long", "short.jsonl", *BUILD, "--out", "nope/long.jsonl"],
            "--out nope/long.jsonl: the output folder",
        ),
        (["build-long", "short.jsonl", *BUILD, "--out", "subdir"], "--out subdir: is a directory"),
        (
            ["synthetic", "--out", "nope/train.jsonl", "--num-records", "2"],
            "output folder nope does not exist",
        ),
        (["synthetic", "--out", "subdir", "--num-records", "2"], "--out subdir: is a directory"),
        (["tiny-tokenizer", "--out", "train.jsonl"], "--out train.jsonl: is a file, not a folder"),
        (["tiny-tokenizer", "--out", "nope/tok"], "--out nope/tok: the output folder nope does not exist"),
        (["tiny-tokenizer", "--out", "subdir"], "--out subdir: already exists; pass --overwrite"),
    ],
    ids=[
        "missing input",
        "input is a folder",
        "missing distractors",
        "no distractor files",
        "output in a missing folder",
        "output is a folder",
        "synthetic output in a missing folder",
        "synthetic output is a folder",
        "tokenizer output is a file",
        "tokenizer output in a missing folder",
        "tokenizer output exists",
    ],
)
def test_path_mistakes_are_one_line_errors(capsys, folder, argv, message):
    assert_refused(capsys, folder, argv, "error: ", message)


def test_tiny_tokenizer_overwrite_only_replaces_a_tokenizer_folder(capsys, folder):
    (folder / "subdir" / "notes.txt").write_text("keep me")
    assert_refused(
        capsys, folder, ["tiny-tokenizer", "--out", "subdir", "--overwrite"], "refusing to replace a folder"
    )
    old = folder / "tok"
    old.mkdir()
    (old / "tokenizer_config.json").write_text("{}")
    (old / "stale.txt").write_text("from an older build")
    assert run(capsys, ["tiny-tokenizer", "--out", "tok", "--overwrite"])[0] == 0
    assert not (old / "stale.txt").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(old / name, TINY_TOKENIZER_DIR / name, shallow=False)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp or old folder


# ----------------------------------------------------------------------------- 2. data that must not pass


def test_validate_rejects_bad_unicode_duplicate_keys_and_whitespace_equal_answers(capsys, folder):
    train = folder / "train.jsonl"
    replace_line(train, 1, lambda t: t.replace('"question": "', '"question": "\\ud800', 1))
    replace_line(train, 2, lambda t: t[:-1] + ', "rejected": "x"}')
    replace_line(
        train, 3, lambda t: json.dumps({**json.loads(t), "rejected": json.loads(t)["chosen"] + "  "})
    )
    for extra in ([], ["--no-tokenizer-check"]):
        assert_refused(
            capsys,
            folder,
            ["validate", "train.jsonl", *extra],
            "train.jsonl:1: field 'question': invalid unicode",
            "train.jsonl:2: field 'rejected': duplicate key",
            "train.jsonl:3: field 'rejected': identical to chosen up to whitespace",
            "0 valid records, 3 problems",
            code=1,
        )


@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_directory_as_data_file_is_named_a_directory(capsys, folder, command):
    assert_refused(capsys, folder, [command, "subdir"], "error: subdir: is a directory, not a data file")


def test_inspect_without_valid_records_is_an_error(capsys, folder, tmp_path_factory):
    replace_line(folder / "train.jsonl", 1, lambda t: "{}")
    (folder / "train.jsonl").write_text((folder / "train.jsonl").read_text().splitlines()[0] + "\n")
    cache = tmp_path_factory.mktemp("cache")
    assert_refused(capsys, folder, ["inspect", "train.jsonl", "--cache-dir", str(cache)], "no valid records")


# ----------------------------------------------------------------------------- 5. bad numbers, 3. templates


@pytest.mark.parametrize(
    "argv, option, problem",
    [
        (["synthetic", "--out", "x.jsonl", "--num-records", "-5"], "--num-records", "must be >= 1, got -5"),
        (["synthetic", "--out", "x.jsonl", "--num-records", "0"], "--num-records", "must be >= 1, got 0"),
        (["synthetic", "--out", "x.jsonl", "--long-target-words", "-1"], "--long-target-words", ">= 0"),
        (
            [
                "build-long",
                "short.jsonl",
                "--distractors",
                "d.txt",
                "--out",
                "o.jsonl",
                "--target-tokens",
                "-1",
            ],
            "--target-tokens",
            ">= 1",
        ),
        (
            [
                "build-long",
                "short.jsonl",
                "--distractors",
                "d.txt",
                "--out",
                "o.jsonl",
                "--compression-ratio",
                "0",
            ],
            "--compression-ratio",
            ">= 1",
        ),
        (
            [
                "build-long",
                "short.jsonl",
                "--distractors",
                "d.txt",
                "--out",
                "o.jsonl",
                "--compression-ratio",
                "nan",
            ],
            "--compression-ratio",
            "finite",
        ),
        (["build-long", "short.jsonl", *BUILD, "--out", "o.jsonl", "--depth", "1.5"], "--depth", "in [0, 1]"),
        (
            ["build-long", "short.jsonl", *BUILD, "--out", "o.jsonl", "--depth", "-0.1"],
            "--depth",
            "in [0, 1]",
        ),
        (
            ["build-long", "short.jsonl", *BUILD, "--out", "o.jsonl", "--num-depths", "1"],
            "--num-depths",
            ">= 2",
        ),
        (["inspect", "train.jsonl", "--max-tokens", "0"], "--max-tokens", ">= 1"),
        (["inspect", "train.jsonl", "--dp", "-1"], "--dp", ">= 1"),
        (["inspect", "train.jsonl", "--cp", "0"], "--cp", ">= 1"),
        (["inspect", "train.jsonl", "--tp", "0"], "--tp", ">= 1"),
        (["inspect", "train.jsonl", "--global-batch-size", "0"], "--global-batch-size", ">= 1"),
        (["validate", "train.jsonl", "--max-problems", "-1"], "--max-problems", "must be >= 0, got -1"),
        (["validate", "train.jsonl", "--max-long-length", "0"], "--max-long-length", ">= 1"),
        (["validate", "train.jsonl", "--max-short-length", "x"], "--max-short-length", "must be an integer"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.startswith("--") else None,
)
def test_bad_numbers_name_the_option(capsys, folder, argv, option, problem):
    assert_refused(capsys, folder, argv, f"error: argument {option}: ", problem)


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{contxt} {question}", "unknown placeholder {contxt}; allowed: {context}, {question}"),
        ("{context}", "must contain {context} and {question}, got '{context}'"),
        ("Question: {question}", "must contain {context} and {question}"),
        ("{context} {question", "malformed braces"),
        ("{context} {question} }", "malformed braces"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_bad_prompt_template_names_the_option(capsys, folder, command, template, problem):
    assert_refused(
        capsys,
        folder,
        [command, "train.jsonl", "--prompt-template", template],
        "argument --prompt-template: ",
        problem,
    )


def test_good_prompt_template_with_literal_braces_passes(capsys, folder):
    code, text = run(
        capsys, ["validate", "train.jsonl", "--prompt-template", "{{JSON}} {question}\n{context}"]
    )
    assert code == 0 and "3 valid records" in text
