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
