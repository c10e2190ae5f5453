"""The kernel benchmark stays runnable: a tiny CPU run writes a complete results file and report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]


def _load(relative: str):
    """A benchmark script as a module (they live outside the packages)."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_under_test", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel_bench():
    return _load("benchmarks/kernels/bench_logprobs.py")


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


class _RecordOutputs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.dtype, tuple(t.shape)))
        return out


def test_kernel_benchmark_makes_its_inputs_in_bf16(kernel_bench):
    """No fp32 [T, V] temporary: at the largest shapes it alone would run out of memory first."""
    with _RecordOutputs() as recorded:
        logits, labels, grad_out = kernel_bench.make_inputs(32, 200, "cpu")
    assert logits.dtype == torch.bfloat16 and logits.shape == (32, 200) and 2.5 < logits.float().std() < 5.5
    assert all(dtype == torch.bfloat16 for dtype, shape in recorded.outputs if shape == (32, 200))


def test_kernel_benchmark_reports_out_of_memory_per_provider_and_mode(kernel_bench):
    """A provider whose backward runs out of memory keeps its forward row; the other modes are reported."""

    def forward_fits_backward_does_not(logits, labels):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return logits.float().log_softmax(-1).gather(1, labels[:, None]).squeeze(1)

    skipped: list[dict] = []
    inputs = kernel_bench.make_inputs(16, 64, "cpu")
    rows = kernel_bench.measure("tight", forward_fits_backward_does_not, False, inputs, "cpu", skipped)
    assert [r["mode"] for r in rows] == ["fwd"]
    assert [(s["provider"], s["mode"], s["reason"]) for s in skipped] == [
        ("tight", "fwd+bwd", "out of memory"),
        ("tight", "bwd", "out of memory"),
    ]


@pytest.mark.slow  # 40 s of torch.compile; the kernel benchmark's pipeline stays covered by test_logprob_benchmark_smoke_run_and_report
def test_kernel_benchmark_compiled_baseline_never_falls_back_to_eager(tmp_path):
    """Five shapes make ten graphs, past dynamo's recompile limit of eight: rebuilt per shape, every shape
    is measured compiled (without the reset, the fifth shape is reported as hitting the limit)."""
    out = tmp_path / "compiled.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/kernels/bench_logprobs.py"), "--smoke"]
    cmd += ["--providers", "torch_compile", "--tokens", "8", "16", "24", "32", "40", "--vocabs", "64"]
    subprocess.run([*cmd, "--out", str(out)], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["skipped"] == [] and len(report["results"]) == 5 * 3


def test_kernel_benchmark_presets(kernel_bench):
    def shapes(*argv):
        args = type("Args", (), {"tokens": None, "vocabs": None, "smoke": False, "quick": False})()
        for flag in argv:
            setattr(args, flag, True)
        return kernel_bench._shapes(args)

    assert shapes("quick") == list(kernel_bench.QUICK_SHAPES)
    assert len(shapes()) == len(kernel_bench.FULL_TOKENS) * len(kernel_bench.FULL_VOCABS)
    assert shapes("smoke") == list(kernel_bench.SMOKE_SHAPES)


@pytest.mark.slow  # 53 s; the benchmark and its report stay in the default suite via run_all.sh --cpu-smoke
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


def test_gpu_run_all_script_on_a_cpu(tmp_path):
    """benchmarks/gpu/run_all.sh --cpu-smoke: every stage runs, the seven files land in OUT_DIR and the
    summary names each stage's exit code (the GPU run is the same script with real sizes)."""
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), str(out), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    names = {"run_all.log", "summary.json", "pytest-gpu.xml", "logprobs.json", "logprobs.png"}
    assert names | {"long-context.json", "long-context.png"} == {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["exit"]) for s in summary["stages"]] == [
        ("pytest -m gpu", 0),
        ("kernel benchmark", 0),
        ("long-context benchmark", 0),
        ("kernel report", 0),
        ("long-context report", 0),
    ]
    assert "every stage passed" in (out / "run_all.log").read_text()
