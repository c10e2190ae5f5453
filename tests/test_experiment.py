"""solopo-experiment: the experiment file, a 2-variant few-step run end to end (JSON, table, plots),
resuming, a failing variant, and the checks before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from solopo_megatron.experiment.report import length_labels, markdown_table, write_report
from solopo_megatron.experiment.run import main, variant_command
from solopo_megatron.experiment.spec import load_experiment
from solopo_megatron.recipe.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "train.train_iters=2", "train.eval_interval=2", "train.log_interval=1", "scheduler.lr_warmup_iters=0",
    "train.global_batch_size=8", "dataset.synthetic.num_train=32", "dataset.synthetic.num_valid=8",
    "dataset.synthetic.long_target_words=60", "eval.long_lengths=[1x,2x]",
]  # fmt: skip


def _experiment(tmp: Path, body: str, overrides: list[str] = ()) -> Path:
    path = tmp / "exp.yaml"
    common = {
        "recipe": str(ROOT / "recipes/paper-small-cpu.yaml"),
        "output_dir": "out",
        "overrides": [*FAST, f"dataset.cache_dir={tmp / 'cache'}", *overrides],
    }
    path.write_text(yaml.safe_dump(common) + body)
    return path


def _variants_end_to_end(tmp_path, capsys, modes: list[str]) -> None:
    """Variants of ``modes`` train and are compared; one that fails at run time is reported, the others
    still run; a second invocation keeps the finished variants; --report-only rewrites the report."""
    body = f"grid:\n  solopo.mode: [{', '.join(modes)}]\n  solopo.preference_loss: [simpo]\n"
    body += "variants:\n  - {name: broken, overrides: [dataset.tokenizer=/nonexistent/tokenizer]}\n"
    path = _experiment(tmp_path, body)
    assert main(["--config", str(path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "variant(s) failed: broken" in captured.err and "| solopo-simpo |" in captured.out
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == [*(f"{mode}-simpo" for mode in modes), "broken"]
    assert results["machine"]["cpu_count"] >= 1 and results["commit"] and results["date"]
    *trained, broken = results["variants"]
    assert broken["exit_code"] != 0 and any("tokenizer" in line for line in broken["log_tail"])
    for variant in trained:
        assert variant["exit_code"] == 0 and variant["steps"] == 2 and variant["evaluations"] == [0, 2]
        assert variant["commit"] == results["commit"]
        assert set(variant["long"]) == {"1x", "2x"}
        for values in variant["long"].values():
            assert 0 <= values["final_accuracy"] <= 1 and 0 <= values["best_answer_accuracy"] <= 1
            assert values["final_context_tokens"] > 0
        assert variant["tokens"] > 0 and variant["train_seconds"] > 0 and variant["peak_mem_gib"] > 0
        assert variant["wall_seconds"] >= variant["train_seconds"]
    if len(trained) == 2:
        assert trained[0]["tokens"] > trained[1]["tokens"]  # SoLoPO also forwards the long chosen sequences
    table = (out / "results.md").read_text()
    assert "| solopo-simpo |" in table and "long acc @2x" in table and "answer acc @1x" in table
    assert "| broken | failed" in table
    assert (out / "accuracy_vs_length.png").stat().st_size > 0 and (out / "cost.png").stat().st_size > 0
    assert (out / "runs" / "solopo-simpo" / "metrics.jsonl").exists()
    # Every evaluation's per-record rows (logger.eval_records_file): they agree with its metrics.
    rows = [
        json.loads(line) for line in (out / "runs/solopo-simpo/eval_records.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 * 2 * 8  # evaluations (steps 0 and 2) x lengths x records
    for step, result in ((entry["step"], entry) for entry in trained[0]["history"]):
        for label in ("1x", "2x"):
            mine = [r for r in rows if r["step"] == step and r["length"] == label]
            assert len({r["id"] for r in mine}) == 8
            assert sum(r["long_correct"] for r in mine) / 8 == pytest.approx(result[f"long@{label}/accuracy"])

    # A second run keeps the finished variants (and tries the failed one again).
    assert main(["--config", str(path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("done before, kept") == len(modes) and "broken: training" in captured.out
    assert main(["--config", str(path), "--report-only"]) == 2  # broken has no summary
    assert "variant broken has not finished" in capsys.readouterr().err
    path.write_text(path.read_text().split("variants:")[0])
    assert main(["--config", str(path), "--report-only"]) == 0


def test_a_variant_end_to_end(tmp_path, capsys):
    _variants_end_to_end(tmp_path, capsys, ["solopo"])


@pytest.mark.slow  # two trainings (60 s); the default suite trains one beside the failing variant
def test_variants_end_to_end(tmp_path, capsys):
    _variants_end_to_end(tmp_path, capsys, ["solopo", "short_po"])


@pytest.mark.parametrize(
    "body, message",
    [
        ("grid: {solopo.mode: []}\n", "grid.solopo.mode: must be a non-empty list"),
        ("variants: [{name: 'a b'}]\n", "variants[0].name: letters, digits"),
        ("variants: [{name: a}, {name: a}]\n", "variant name(s) a appear more than once"),
        ("colour: red\n", "unknown key(s) colour"),
        ("", "no variants"),
        ("variants: [{name: a, overrides: [solopo.mode=medium]}]\n", "variant a: solopo.mode must be one of"),
        (
            "variants: [{name: a, overrides: [train.eval_interval=null]}]\n",
            "variant a: train.eval_interval: must be set",
        ),
        (
            "variants: [{name: a, overrides: [checkpoint.load=/somewhere]}]\n",
            "variant a: checkpoint.load: variants",
        ),
        ("grid: {dataset.tokenizer: [a/b]}\n", "variant name 'a/b' (from the grid's values)"),
    ],
)
def test_bad_experiments_fail_before_anything_runs(tmp_path, capsys, body, message):
    assert main(["--config", str(_experiment(tmp_path, body))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_grid_names_overrides_and_command(tmp_path):
    spec = load_experiment(_experiment(tmp_path, "grid: {solopo.mode: [long_po], solopo.beta: [0.5, 1]}\n"))
    assert [v.name for v in spec.variants] == ["long_po-0.5", "long_po-1"]
    assert spec.variants[1].overrides == ["solopo.mode=long_po", "solopo.beta=1"]
    command = variant_command(spec, spec.variants[0], tmp_path / "run")
    assert command[1:4] == ["-m", "solopo_megatron.train", "--config"]
    assert command.index("solopo.beta=0.5") > command.index("train.train_iters=2")  # its own come last
    spec.nproc_per_node = 2
    assert "torch.distributed.run" in variant_command(spec, spec.variants[0], tmp_path / "run")
    with pytest.raises(RecipeError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")


def test_a_compared_report_from_run_folders(tmp_path):
    """write_report with compare: (no training: run folders written here) gathers records.jsonl, puts
    the comparison and the cost ratio in results.json and results.md, and an eval-only variant's command
    evaluates instead of training."""
    body = (
        "variants:\n  - {name: base, eval_only: true}\n  - {name: t}\n  - {name: c}\n"
        "compare: {treatment: t, control: c, baseline: base, bootstrap_samples: 200}\n"
    )
    spec = load_experiment(_experiment(tmp_path, body))
    assert "--eval-only" in variant_command(spec, spec.variants[0], tmp_path / "run")
    assert "--eval-only" not in variant_command(spec, spec.variants[1], tmp_path / "run")
    decisions = {"base": [True, False] * 10, "t": [True] * 15 + [False] * 5, "c": [True] * 20}
    summaries = []
    for name, correct in decisions.items():
        folder = spec.output_dir / "runs" / name
        folder.mkdir(parents=True)
        step = 0 if name == "base" else 4
        rows = [
            {"step": step, "id": f"r{i}", "length": "1x", "long_correct": ok, "short_correct": ok,
             "long_margin": 1.0 if ok else -1.0, "short_margin": 0.0}
            for i, ok in enumerate(correct)
        ]  # fmt: skip
        (folder / "eval_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summaries.append({"name": name, "exit_code": 0, "long": {}, "tokens": 30.0 if name == "t" else 20.0,
                          "train_seconds": 3.0 if name == "t" else 2.0})  # fmt: skip
    write_report(spec, summaries, argv=["solopo-experiment", "--config", "x"])
    results = json.loads((spec.output_dir / "results.json").read_text())
    comparison = results["comparison"]
    assert comparison["lengths"]["1x"]["difference"]["mean"] == pytest.approx(-0.25)
    assert comparison["lengths"]["1x"]["gain_over_step0"]["c"]["mean"] == pytest.approx(0.5)
    assert comparison["cost"]["tokens"]["ratio"] == pytest.approx(1.5) and comparison["verdict"] == "fails"
    assert len((spec.output_dir / "records.jsonl").read_text().splitlines()) == 60
    assert "Verdict at the primary length 1x: **fails**" in (spec.output_dir / "results.md").read_text()


def test_table_orders_lengths_and_marks_failures():
    assert length_labels([{"long": {"4x": {}, "512": {}, "1x": {}, "2x": {}}}]) == ["512", "1x", "2x", "4x"]
    table = markdown_table([{"name": "a", "exit_code": 3}, {"name": "b", "exit_code": 0, "long": {}}])
    assert "| a | failed (exit 3) |" in table and "| b |" in table


@pytest.mark.slow  # three processes (60-140 s); the default suite covers the parts without them
def test_a_compared_experiment_end_to_end(tmp_path):
    """An eval-only baseline and two arms with ``compare:``: each evaluation's per-record rows agree with
    its metrics, records.jsonl and the comparison land beside results.json, and a redraw without the run
    folders (which are not committed) gives the same comparison from records.jsonl."""
    body = (
        "variants:\n  - {name: base, eval_only: true}\n"
        "  - {name: t, overrides: [solopo.mode=solopo]}\n  - {name: c, overrides: [solopo.mode=long_po, eval.answer_accuracy=false]}\n"
        "compare: {treatment: t, control: c, baseline: base, primary_length: 2x, bootstrap_samples: 500}\n"
    )
    path = _experiment(tmp_path, body, ["train.eval_at_start=false", "solopo.preference_loss=simpo"])
    assert main(["--config", str(path), "--quiet"]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    base, treatment, control = results["variants"]
    assert base["eval_only"] and base["evaluations"] == [0] and base["tokens"] == 0
    assert treatment["evaluations"] == [2] and treatment["held_out_records"] == 8  # no step-0 evaluation
    assert treatment["valid_records"] == 8
    assert "final_answer_accuracy" in treatment["long"]["1x"]
    assert "final_answer_accuracy" not in control["long"]["1x"]  # eval.answer_accuracy=false: none scored
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 8  # variants x lengths x records
    for summary in (base, treatment, control):
        for label in ("1x", "2x"):
            mine = [r for r in rows if r["variant"] == summary["name"] and r["length"] == label]
            assert {r["step"] for r in mine} == {summary["steps"]} and len({r["id"] for r in mine}) == 8
            accuracy = sum(r["long_correct"] for r in mine) / 8
            assert accuracy == pytest.approx(summary["long"][label]["final_accuracy"])
            assert all(r["long_correct"] == (r["long_margin"] > 0) for r in mine)
    comparison = results["comparison"]
    assert comparison["primary_length"] == "2x" and comparison["verdict"] in (
        "matches",
        "beats",
        "fails",
        "inconclusive",
    )
    assert comparison["lengths"]["2x"]["records"] == 8 and comparison["cost"]["tokens"]["ratio"] > 1
    assert "Paired comparison (t vs c" in (out / "results.md").read_text()
    shutil.rmtree(out / "runs")
    assert main(["--config", str(path), "--report-only"]) == 0
    redrawn = json.loads((out / "results.json").read_text())
    assert redrawn["comparison"] == comparison and redrawn["date"] == results["date"]
