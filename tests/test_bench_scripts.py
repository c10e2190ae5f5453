"""The kernel benchmark stays runnable: a tiny CPU run writes a complete results file and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_logprob_benchmark_smoke_run_and_report(tmp_path):
    out = tmp_path / "logprobs.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/kernels/bench_logprobs.py"),
        "--smoke",
        "--tokens",
        "16",
        "--vocabs",
        "64",
        "--providers",
        "solopo_triton",
        "torch_eager",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert {"device", "versions", "date", "commit", "copy_bandwidth_GBps", "results"} <= report.keys()
    modes = {(r["provider"], r["mode"]) for r in report["results"]}
    assert modes == {(p, m) for p in ("solopo_triton", "torch_eager") for m in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["tokens"] == 16 and r["vocab_local"] == 64 for r in report["results"])

    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/kernels/report.py"), str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "| 16 | 64 | fwd+bwd | solopo_triton |" in done.stdout
    assert out.with_suffix(".png").stat().st_size > 0


def test_long_context_benchmark_smoke_run_and_report(tmp_path):
    """Tiny shapes: every mode x LM-head case, the packing pair and the budget probe land in the JSON;
    the report's table, facts and plot come from it."""
    out = tmp_path / "long-context.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/long_context/bench_step.py"), "--smoke", "--lengths", "128"]
    cmd += ["--modes", "solopo,long_po", "--memory-budget-gib", "0.000001", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert {
        "device",
        "versions",
        "date",
        "commit",
        "settings",
        "results",
        "packing",
        "budget_probe",
    } <= report.keys()
    cases = {(r["mode"], r["logits"]): r for r in report["results"]}
    assert cases.keys() == {(m, h) for m in ("solopo", "long_po") for h in ("response_only", "full")}
    for r in cases.values():
        assert r["status"] == "ok" and r["step_s"] > 0 and r["peak_gib"] > -1 and r["row_tokens"] >= 256
    padded, lean = sorted(report["packing"], key=lambda r: not r["padded"])
    assert padded["row_tokens"] == padded["rows"] * 1024 and lean["row_tokens"] < padded["row_tokens"]
    assert padded["real_tokens"] == lean["real_tokens"]
    # A budget nothing fits: the probe says 0 tokens fit and names the first length over it.
    assert [(p["mode"], p["max_long_length"], p["first_over_budget"]) for p in report["budget_probe"]] == [
        ("solopo", 0, 128),
        ("long_po", 0, 128),
    ]
    sys.path.insert(0, str(ROOT / "benchmarks/long_context"))
    from report import table

    text = table(report)
    assert "| solopo | response_only | 128 |" in text and "Packing a mix of 4 solopo groups" in text
    assert out.with_suffix(".png").stat().st_size > 0
