"""solopo-data end to end: synthetic -> validate -> build-long -> inspect, and its error exit."""

from __future__ import annotations

import json

from solopo_megatron.cli import main
from solopo_megatron.data.records import iter_records


def test_synthetic_validate_build_long_inspect(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    assert main(["synthetic", "--out", str(train), "--num-records", "12", "--seed", "4"]) == 0
    assert main(["validate", str(train)]) == 0
    assert "12 valid records" in capsys.readouterr().out

    assert main(["validate", str(train), "--max-long-length", "50", "--max-problems", "2"]) == 1
    out = capsys.readouterr().out
    assert "train.jsonl:1: field 'long_context': sequence of" in out and "... and 10 more problems" in out

    short = tmp_path / "short.jsonl"
    with open(short, "w") as handle:
        for line in train.read_text().splitlines():
            record = json.loads(line)
            del record["long_context"]
            handle.write(json.dumps(record) + "\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(
        "\n\n".join(f"Filler document number {i} about rivers and hills." for i in range(20))
    )
    long = tmp_path / "long.jsonl"
    assert (
        main(
            [
                "build-long",
                str(short),
                "--distractors",
                str(docs),
                "--out",
                str(long),
                "--target-tokens",
                "150",
                "--depth-mode",
                "fixed",
                "--depth",
                "1.0",
            ]
        )
        == 0
    )
    records = list(iter_records(long))
    assert len(records) == 12
    assert all(r.long_context.endswith(r.short_context) for r in records)  # depth 1: evidence last

    assert (
        main(
            [
                "inspect",
                str(long),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--max-tokens",
                "1024",
                "--cp",
                "2",
                "--global-batch-size",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "long_chosen" in out and "microbatches of 1024 tokens" in out


def test_build_long_names_bad_input_line(tmp_path, capsys):
    short = tmp_path / "short.jsonl"
    short.write_text(
        '{"id": "a", "question": "q", "short_context": "s", "chosen": "c", "rejected": "r"}\n{"id": "b"}\n'
    )
    (tmp_path / "d.txt").write_text("doc one\n\ndoc two")
    code = main(
        [
            "build-long",
            str(short),
            "--distractors",
            str(tmp_path / "d.txt"),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--target-tokens",
            "20",
        ]
    )
    assert code == 2
    assert "short.jsonl:2: field 'question': missing, empty or not a string" in capsys.readouterr().err


def test_synthetic_with_confounder_facts(tmp_path, capsys):
    out = tmp_path / "hard.jsonl"
    argv = ["synthetic", "--out", str(out), "--num-records", "5", "--facts-per-context", "3"]
    assert main([*argv, "--rejected-kinds", "in_context"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["metadata"]["candidates"]) == 3 for r in records)
    assert {r["metadata"]["rejected_kind"] for r in records} == {"in_context"}
    assert main(["validate", str(out)]) == 0
    capsys.readouterr()
    one_fact = ["synthetic", "--out", str(tmp_path / "x.jsonl"), "--rejected-kinds", "in_context"]
    assert main(one_fact) == 2
    assert "in_context' needs facts_per_context >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_inspect_shows_the_shared_layout(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    assert main(["synthetic", "--out", str(data), "--num-records", "6", "--long-target-words", "200"]) == 0
    capsys.readouterr()
    common = ["inspect", str(data), "--cache-dir", str(tmp_path / "cache"), "--mode", "long_po"]
    assert main([*common, "--max-tokens", "1024"]) == 0
    out = capsys.readouterr().out
    assert "shared slot long_chosen + long_rejected: tokens mean" in out and "the prompt once" in out
    assert "prompts shared (--share-prompt auto)" in out
    # Unshared, a group takes about twice the tokens: 512 per row no longer holds the largest one.
    assert main([*common, "--max-tokens", "512"]) == 0
    capsys.readouterr()
    assert main([*common, "--max-tokens", "512", "--share-prompt", "false"]) == 2
    assert "all its sequences together) needs 640 padded tokens" in capsys.readouterr().err
