"""The committed experiment results and what the docs say about them: every experiment block in README.md
and docs/claims.md is regenerated from its results.json and compared, and each compared experiment's
results.json is recomputed from its records.jsonl under the experiment file's pre-registered rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from solopo_megatron.experiment.paired import compare_runs
from solopo_megatron.experiment.report import comparison_readme_block
from solopo_megatron.experiment.spec import load_experiment

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"<!-- experiment:(?P<name>[\w.-]+):start -->\n(?P<body>.*?)<!-- experiment:(?P=name):end -->", re.S
)
COMPARED = ["smollm2-instruct-cpu"]


def _blocks() -> list[tuple[str, str, str]]:
    found = []
    for doc in ("README.md", "docs/claims.md"):
        found += [
            (doc, m["name"], m["body"]) for m in BLOCK.finditer((ROOT / doc).read_text(encoding="utf-8"))
        ]
    return found


def test_the_readme_and_the_claims_page_report_the_instruct_experiment():
    assert {(doc, name) for doc, name, _ in _blocks()} >= {
        ("README.md", "smollm2-instruct-cpu"),
        ("docs/claims.md", "smollm2-instruct-cpu"),
    }


@pytest.mark.parametrize("doc, name, body", _blocks(), ids=lambda v: v if "\n" not in str(v) else "block")
def test_every_figure_of_an_experiment_block_comes_from_its_json(doc, name, body):
    results_file = ROOT / "experiments/results" / name / "results.json"
    results = json.loads(results_file.read_text(encoding="utf-8"))
    assert body == comparison_readme_block(results, results_file), (
        f"{doc}: the {name} block differs from its results.json; rewrite it with solopo-experiment --config "
        f"experiments/{name}.yaml --report-only --readme {doc}"
    )


@pytest.mark.parametrize("name", COMPARED)
def test_a_compared_experiments_json_follows_from_its_records(name):
    folder = ROOT / "experiments/results" / name
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    spec = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    recomputed = compare_runs(spec.compare, rows)
    kept = {key: value for key, value in results["comparison"].items() if key != "cost"}
    assert json.loads(json.dumps(recomputed)) == kept  # the rule in the experiment file, applied as written
    for summary in results["variants"]:
        assert summary["exit_code"] == 0 and summary["commit"]
        for label, values in summary["long"].items():
            mine = [r for r in rows if r["variant"] == summary["name"] and r["length"] == label]
            mine = [r for r in mine if r["step"] == summary["steps"]]
            assert len(mine) == summary["held_out_records"]
            assert values["final_accuracy"] == pytest.approx(sum(r["long_correct"] for r in mine) / len(mine))
    assert results["base_model"] and results["comparison"]["verdict"] in (
        "matches",
        "beats",
        "fails",
        "inconclusive",
    )
