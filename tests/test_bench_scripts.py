"""The benchmarks and the GPU script stay runnable and honest: tiny CPU runs write complete results and
reports, a failed case is a failed run, and benchmarks/gpu/run_all.sh keeps its budget and its summary."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
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


@pytest.fixture(scope="module")
def step_bench():
    return _load("benchmarks/long_context/bench_step.py")


@pytest.fixture(scope="module")
def gpu_summary():
    return _load("benchmarks/gpu/summary.py")


@pytest.fixture(scope="module")
def preflight():
    return _load("benchmarks/gpu/preflight.py")


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
    rows = kernel_bench.measure("tight", forward_fits_backward_does_not, inputs, "cpu", skipped)
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
    cmd += ["--modes", "solopo,long_po", "--logits", "response_only,full", "--share-prompt", "false"]
    cmd += ["--memory-budget-gib", "0.000001", "--out", str(out)]
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
    assert "| solopo | apart | response_only | 128 |" in text and "Packing a mix of 4 solopo groups" in text
    assert out.with_suffix(".png").stat().st_size > 0


def test_long_context_benchmark_modes_and_shared_groups(step_bench):
    """solopo-both is solopo aligning both answers; a group's sequences of one context share their
    prompt tokens (so they can share a slot), and long_alone's sequence is the other modes' long_chosen."""
    from solopo_megatron.data.packing import pack_microbatch
    from solopo_megatron.objectives import ROLES

    both = step_bench.loss_config("solopo-both")
    assert (both.mode, both.solo_ra_chosen_only) == ("solopo", False)
    assert step_bench.mode_roles("solopo-both") == ROLES
    assert (
        step_bench.mode_roles("long_alone") == ("long_chosen",)
        and step_bench.loss_config("long_alone") is None
    )
    assert [m for m in step_bench.LOSS_OVERRIDES if not step_bench.can_share(m)] == ["long_alone"]
    group = step_bench._group("solopo-both", 256, 64, 16, 512, seed=1)
    for context, n in (("long", 256), ("short", 64)):
        chosen, rejected = group.sequences[f"{context}_chosen"], group.sequences[f"{context}_rejected"]
        assert chosen.response_start == rejected.response_start == n - 16 and len(chosen.ids) == n
        assert (
            chosen.ids[: n - 16] == rejected.ids[: n - 16] and chosen.ids[n - 16 :] != rejected.ids[n - 16 :]
        )
    assert group.sequences["short_chosen"].ids[-16:] == group.sequences["long_chosen"].ids[-16:]  # one answer
    alone = step_bench._group("long_alone", 256, 64, 16, 512, seed=1)
    assert alone.sequences == {"long_chosen": group.sequences["long_chosen"]}
    shared = pack_microbatch([group], ROLES, pad_multiple=1, pad_id=0, share_prompt=True)
    assert shared.tokens.numel() == (256 - 17 + 2 * 17) + (64 - 17 + 2 * 17)
    # The driver's token count (time budget, logits cap) is the packing's.
    assert step_bench._row_tokens("solopo-both", 256, 64, 16, True) == shared.tokens.numel()
    assert step_bench._row_tokens("long_po", 16384, 512, 64, True) == 16384 + 65
    assert step_bench._row_tokens("long_po", 16384, 512, 64, False) == 2 * 16384
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--modes", "solopo-both,dpo"])
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--share-prompt", "auto"])
    args = step_bench.parse_args(["--share-prompt", "true,false"])
    assert args.share_prompt == [True, False] and args.modes == list(step_bench.MODES)
    # The cost ratio's step time: the mean of the fastest half (a step another process slowed goes).
    assert step_bench.fast_step_s([3.0, 1.0, 2.0, 10.0]) == 1.5 and step_bench.fast_step_s([2.0, 5.0]) == 2.0


def test_long_context_benchmark_runs_a_disturbed_case_again(step_bench, monkeypatch):
    """A case during which other processes used more than --busy-limit of the CPU runs again, at most
    --busy-retries times; the record says how busy the machine was and how often the case ran."""
    shares = iter([0.0, 0.5, 0.0, 0.3, 0.0, 0.05])  # (before, during) each run: the wait's window, the case

    def fake_other_cpu(run, *args):  # the wait's window is not slept
        return (None if run is time.sleep else run(*args)), next(shares)

    monkeypatch.setattr(step_bench, "other_cpu", fake_other_cpu)
    args = types.SimpleNamespace(busy_limit=0.15, busy_retries=2, quiet_wait_s=0.0)
    runs = []

    def run(case):
        runs.append(case)
        return {**case, "status": "ok"}

    result = step_bench.run_on_quiet_machine({"mode": "long_po"}, run, args, lambda text: None)
    assert len(runs) == 3 and (result["attempts"], result["other_cpu"]) == (3, 0.05)
    shares = iter([0.0, 0.5, 0.0, 0.5])
    args.busy_retries = 1
    result = step_bench.run_on_quiet_machine({"mode": "long_po"}, run, args, lambda text: None)
    assert (result["attempts"], result["other_cpu"]) == (2, 0.5)  # the last one kept, as measured


def test_long_context_benchmark_shared_prompts_smoke(tmp_path):
    """The real script, tiny, in one process: long_alone, solopo-both and long_po shared and apart land
    in the JSON with their cost ratios; shared rows compute fewer tokens for the same loss; the report's
    tables (docs and README), its facts and its plot come from the file."""
    out = tmp_path / "long-context.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/long_context/bench_step.py"), "--smoke", "--lengths", "128"]
    cmd += [
        "--modes",
        "long_alone,solopo-both,long_po",
        "--share-prompt",
        "false,true",
        "--in-process",
        "yes",
    ]
    cmd += ["--packing-groups", "2", "--no-probe", "--no-plot", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    cases = {(r["mode"], r["share_prompt"]): r for r in report["results"]}
    assert cases.keys() == {("long_alone", False)} | {
        (m, s) for m in ("solopo-both", "long_po") for s in (False, True)
    }
    assert all(r["status"] == "ok" and r["step_s"] > 0 for r in cases.values())
    # 128-token long sequences with 16-token answers: shared, the long prompt is read once.
    assert (cases["long_alone", False]["real_tokens"], cases["long_po", False]["real_tokens"]) == (128, 256)
    assert cases["long_po", True]["real_tokens"] == 128 - 17 + 2 * 17
    assert cases["solopo-both", True]["real_tokens"] == (128 - 17 + 2 * 17) + (64 - 17 + 2 * 17)
    for mode in ("solopo-both", "long_po"):  # the same initial weights and sums, so the same loss
        assert cases[mode, True]["first_loss"] == pytest.approx(cases[mode, False]["first_loss"], rel=1e-5)
    ratios = {(r["mode"], r["share_prompt"]): r for r in report["cost_ratio"]}
    assert ratios.keys() == cases.keys() and ratios["long_alone", False]["time"] == 1.0
    for key, ratio in ratios.items():
        fast = cases[key]["step_fast_s"] / cases["long_alone", False]["step_fast_s"]
        assert ratio["time"] == pytest.approx(fast) and ratio["time_median"] > 0
    assert ratios["long_po", False]["real_tokens"] == 2.0
    packing = {(r["padded"], r["share_prompt"]): r for r in report["packing"]}
    assert packing.keys() == {(p, s) for p in (True, False) for s in (False, True)}
    assert packing[False, True]["real_tokens"] < packing[False, False]["real_tokens"]

    sys.path.insert(0, str(ROOT / "benchmarks/long_context"))
    import report as report_module

    text = report_module.table(report)
    assert "| long_po | shared | response_only | 128 | 146 | 145 |" in text
    ratio = f"{ratios['long_po', True]['time']:.2f} (1.13)"
    assert f"| long_po | shared | {ratio} |" in text and "long_po shared against the goal" in text
    readme = report_module.readme_table(report)
    assert f"| long_po | shared | {ratio} |" in readme and "| solopo-both | apart |" in readme
    assert report_module.plot(report, tmp_path / "plot.png").stat().st_size > 0


# ----------------------------------------------------------------------------- no false greens


def test_kernel_benchmark_backward_never_accumulates_into_grad(kernel_bench):
    """Every timed backward is torch.autograd.grad: AccumulateGrad never runs on the logits (its copy of
    the [T, V] gradient into .grad would be timed, and counted as memory, in every row)."""
    logits, labels, grad_out = kernel_bench.make_inputs(16, 64, "cpu")
    accumulated = []
    logits.requires_grad_().register_post_accumulate_grad_hook(lambda leaf: accumulated.append(leaf))

    def provider(logits, labels):
        return logits.float().log_softmax(-1).gather(1, labels[:, None]).squeeze(1)

    skipped: list[dict] = []
    rows = kernel_bench.measure("probe", provider, (logits, labels, grad_out), "cpu", skipped)
    assert skipped == [] and [r["mode"] for r in rows] == ["fwd", "fwd+bwd", "bwd"]
    assert accumulated == [] and logits.grad is None
    provider(logits.requires_grad_(), labels).backward(grad_out)  # what .backward() would have done
    assert len(accumulated) == 1


def test_kernel_benchmark_problems(kernel_bench):
    """Memory limits are measurements; an error, one of ours missing, or nothing measured is a failure."""
    row = {"provider": "torch_eager", "tokens": 16, "vocab_local": 64, "mode": "fwd"}

    def report(results, *skips):
        return {
            "results": results,
            "skipped": [skip if "provider" in skip else {**row, **skip} for skip in skips],
        }

    assert kernel_bench.problems(report([row], {"reason": "out of memory"})) == []
    memory = {"reason": "its inputs (9.0 GiB of bf16 logits and gradient) exceed the free device memory"}
    assert kernel_bench.problems(report([row], memory)) == []
    baseline_missing = {"provider": "liger_vocab_parallel_ce", "reason": "unavailable: No module named x"}
    assert kernel_bench.problems(report([row], baseline_missing)) == []
    ours_missing = {"provider": "solopo_triton", "reason": "unavailable: No module named 'triton'"}
    assert kernel_bench.problems(report([row], ours_missing)) == [
        "solopo_triton: unavailable: No module named 'triton'"
    ]
    assert kernel_bench.problems(report([row], {"reason": "error: RuntimeError('x')"})) == [
        "torch_eager T=16 V=64 fwd: error: RuntimeError('x')"
    ]
    assert kernel_bench.problems(report([], {"reason": "out of memory"})) == [
        "no provider and shape produced a measurement"
    ]
    ours = {**row, "provider": "solopo_triton", "max_abs_error_vs_fp32": 3e-6}
    assert kernel_bench.problems(report([ours])) == []
    for wrong in (0.5, float("nan")):  # a fast wrong kernel (or NaN) is no pass
        (problem,) = kernel_bench.problems(report([{**ours, "max_abs_error_vs_fp32": wrong}]))
        assert problem.startswith("solopo_triton T=16 V=64 fwd: max |error| vs fp32")


def test_kernel_benchmark_exits_non_zero_for_a_failed_provider(tmp_path):
    """The real script (its own process: it starts a process group) with a provider that raises: the
    other provider's rows are kept, the failure is named, the exit status is 1."""
    out = tmp_path / "logprobs.json"
    driver = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("bench", {str(ROOT / "benchmarks/kernels/bench_logprobs.py")!r})
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)

        def broken(tp_group):
            def fn(logits, labels):
                raise RuntimeError("broken on purpose")
            return fn, False

        bench.PROVIDERS["broken"] = broken
        argv = ["--smoke", "--tokens", "16", "--vocabs", "64", "--providers", "torch_eager", "broken"]
        sys.exit(bench.main([*argv, "--out", {str(out)!r}]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAILED: broken T=16 V=64 fwd: error: RuntimeError('broken on purpose')" in done.stdout
    report = json.loads(out.read_text())
    assert {r["provider"] for r in report["results"]} == {"torch_eager"}


def _case(mode="solopo", length=128, status="ok", **extra):
    case = {"mode": mode, "logits": "response_only", "long_length": length, "status": status}
    if status == "ok":
        case.update(peak_gib=0.1, step_s=0.5, tokens_per_s=100.0, row_tokens=length + 128, build_s=1.0)
    return {**case, **extra}


def test_long_context_benchmark_problems(step_bench):
    """Running out of memory is what the budget probe looks for; any other failure, or no measurement
    at all, fails the run."""

    def report(results, probe_runs=()):
        probe = {"probe_runs": list(probe_runs)}
        return {"results": results, "packing": [], "budget_probe": [probe]}

    oom = _case(length=65536, status="failed", reason="out of memory")
    killed = _case(length=131072, status="failed", reason="exit -9: killed (out of memory)")
    cublas = _case(length=32768, status="failed", reason="error: RuntimeError('CUBLAS_STATUS_ALLOC_FAILED')")
    assert step_bench.problems(report([_case()], [oom, killed, cublas])) == []
    error = _case(length=256, status="failed", reason="error: ValueError('bad')")
    assert [p.split()[-1] for p in step_bench.problems(report([_case(), error]))] == ["ValueError('bad')"]
    assert step_bench.problems(report([oom, _case(status="skipped", reason="cap")])) == [
        "no case produced a measurement"
    ]


def test_long_context_benchmark_exit_status(step_bench, tmp_path, monkeypatch):
    """main() on cases that fail by a forced error, by memory only, or not at all (the case runner
    replaced: the grid, the probe and the exit status are the script's own)."""
    outcomes = {}

    def run(case):
        return {**case, **outcomes[case["long_length"]]}

    monkeypatch.setattr(step_bench, "run_in_process", run)
    argv = ["--smoke", "--lengths", "128,256", "--modes", "solopo", "--logits", "response_only"]
    argv += ["--packing-groups", "0", "--in-process", "yes", "--no-plot", "--probe-max", "256"]
    argv += ["--out", str(tmp_path / "long.json")]
    ok = {k: v for k, v in _case().items() if k not in ("mode", "logits", "long_length")}
    outcomes.update({128: ok, 256: {"status": "failed", "reason": "error: RuntimeError('forced')"}})
    assert step_bench.main(argv) == 1
    outcomes[256] = {"status": "failed", "reason": "out of memory"}
    assert step_bench.main(argv) == 0
    outcomes[128] = outcomes[256]
    assert step_bench.main(argv) == 1  # every case out of memory: nothing measured


def test_long_context_benchmark_exits_non_zero_when_no_case_runs(tmp_path):
    """The real script where every case is left out (full logits over a 0 GiB cap): exit status 1."""
    cmd = [sys.executable, str(ROOT / "benchmarks/long_context/bench_step.py"), "--smoke", "--lengths", "128"]
    cmd += ["--modes", "solopo", "--logits", "full", "--full-logits-cap-gib", "0", "--packing-groups", "0"]
    done = subprocess.run(
        [*cmd, "--no-plot", "--out", str(tmp_path / "long.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "FAILED: no case produced a measurement" in done.stdout, done.stdout
    assert json.loads((tmp_path / "long.json").read_text())["results"][0]["status"] == "skipped"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_leaves_out_what_would_end_late(step_bench):
    """A case starts only if the latest measured case, scaled by tokens (x1.5), says it ends in time."""
    clock = _Clock()
    deadline = step_bench.Deadline(60.0, clock)
    case = {"mode": "solopo", "long_length": 8192, "short_length": 1024, "warmup": 1, "steps": 1}
    clock.now = 50.0
    assert deadline.allows(case)  # nothing measured yet: the first case always starts
    deadline.note(_case(length=8192, step_s=1.0, row_tokens=10240, build_s=2.0))
    assert deadline.estimate_s(case) == pytest.approx(1.5 * (2.0 + 2 * 1.0))
    assert deadline.allows(case)  # 50 + 6 <= 60
    assert not deadline.allows({**case, "long_length": 32768})  # 1.5 * (2 + 2 * 3.4) = 13.2 s
    clock.now = 55.0
    assert not deadline.allows(case)
    assert step_bench.Deadline(None, clock).allows(case)


def test_budget_probe_stops_at_the_time_budget(step_bench):
    clock = _Clock()
    deadline = step_bench.Deadline(95.0, clock)
    runs = []

    def run(case):
        runs.append(case["long_length"])
        clock.now += 30.0
        return _case(length=case["long_length"], step_s=0.1, row_tokens=case["long_length"], build_s=5.0)

    args = types.SimpleNamespace(run=run, lengths=[128], probe_max=1 << 20, probe_refine=2)
    base = {"mode": "solopo", "logits": "response_only", "short_length": 64}
    probe = step_bench.probe_max_length(base, [_case()], 64.0, args, lambda text: None, deadline)
    assert runs == [256, 512, 1024]  # at 90 s the next (2048: 7.8 s estimated) would end past 95 s
    assert probe["stopped_by_time_budget"] and not probe["bounded_by_probe_max"]
    assert probe["max_long_length"] == 1024 and probe["first_over_budget"] is None


def test_run_all_preset_fits_its_stage(step_bench):
    """--preset run-all: 8K and 32K, response-only, one measured step, and a time budget inside the
    run_all.sh stage's limit."""
    args = step_bench.parse_args(["--preset", "run-all", "--memory-budget-gib", "70"])
    assert args.lengths == [8192, 32768] and args.logits == ["response_only"]
    assert args.modes == ["solopo", "long_po"] and (args.steps, args.warmup) == (1, 1)
    assert args.time_budget_s < _stage_table()["long-context benchmark"][0]


# ----------------------------------------------------------------------------- benchmarks/gpu


def _stage_table(*flags: str) -> dict[str, tuple[int, int]]:
    """run_all.sh --print-budget: {stage: (limit, kill-after)}; checks its total line against the rows."""
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), "--print-budget", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = re.findall(r"^stage (.+): limit (\d+) s, kill-after (\d+) s$", done.stdout, re.MULTILINE)
    table = {name: (int(limit), int(kill)) for name, limit, kill in rows}
    (budget,) = re.findall(r"^budget: (\d+) s", done.stdout, re.MULTILINE)
    assert int(budget) == sum(limit + kill for limit, kill in table.values())
    return table


STAGES = [
    "preflight",
    "kernel tests",
    "training tests",
    "kernel benchmark",
    "long-context benchmark",
    "kernel report",
    "long-context report",
]


def test_gpu_run_all_budget_fits_the_device_command_limit():
    """The GPU run's worst case (stage limits + kill-afters) is at most 540 s of the device's 600 s per
    command, the preflight at most 2 minutes; the smoke has the same stages."""
    table = _stage_table()
    assert list(table) == STAGES == list(_stage_table("--cpu-smoke"))
    assert sum(limit + kill for limit, kill in table.values()) <= 540
    assert sum(table["preflight"]) <= 120


def test_gpu_summary_counts_tests_from_junit(gpu_summary, tmp_path):
    """A skipped test is counted as skipped, never as passed; failures and errors fail the stage."""
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.t" name="test_ok"/>'
        '<testcase classname="tests.t" name="test_te"><skipped message="TE is not installed"/></testcase>'
        '<testcase classname="tests.t" name="test_bad"><failure message="assert"/></testcase>'
        '<testcase classname="tests.t" name="test_err"><error message="fixture"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu_summary.junit_counts(xml)
    assert {k: counts[k] for k in ("passed", "failed", "skipped", "errors")} == {
        "passed": 1,
        "failed": 1,
        "skipped": 1,
        "errors": 1,
    }
    assert counts["skipped_tests"] == [{"test": "tests.t::test_te", "reason": "TE is not installed"}]
    status = gpu_summary.stage_status
    clean = {"passed": 0, "failed": 0, "skipped": 3, "errors": 0}
    assert status(0, clean, True, False) == "passed"  # the CPU smoke: gpu tests skip there
    assert status(0, clean, True, True) == "failed"  # the GPU run: all skipped is no pass
    assert status(0, None, True, False) == "failed"  # no junit XML
    assert status(1, counts, True, False) == "failed"
    assert status(124, None, True, False) == status(137, None, True, False) == "time limit"
    assert status(0, None, False, False) == "passed"  # not a pytest stage


def test_gpu_summary_is_rewritten_per_stage(gpu_summary, tmp_path):
    """init, start, end, finish through the command line: each write is a complete JSON."""
    path = tmp_path / "summary.json"

    def call(*argv: str) -> int:
        return gpu_summary.main([argv[0], str(path), *argv[1:]])

    call("init", "540")
    (tmp_path / "preflight.json").write_text(json.dumps({"device": "H100", "versions": {"torch": "2.11"}}))
    call("start", "preflight", "75", "10")
    assert json.loads(path.read_text())["stages"] == [
        {
            "name": "preflight",
            "limit_s": 75,
            "kill_after_s": 10,
            "rc": None,
            "seconds": None,
            "status": "running",
        }
    ]
    call("end", "preflight", "0", "40")
    call("start", "kernel tests", "75", "10")
    call("end", "kernel tests", "124", "85", "--junit", str(tmp_path / "missing.xml"))
    summary = json.loads(path.read_text())
    assert (summary["device"], summary["finished"]) == ("H100", False)
    assert [(s["name"], s["rc"], s["seconds"], s["status"]) for s in summary["stages"]] == [
        ("preflight", 0, 40, "passed"),
        ("kernel tests", 124, 85, "time limit"),
    ]
    call("not-run", "kernel report", "15", "5", "no logprobs.json")
    assert json.loads(path.read_text())["stages"][-1]["status"] == "not run"
    assert call("finish") == 1
    summary = json.loads(path.read_text())
    assert summary["finished"] and summary["passed"] is False
    assert summary["verdict"].startswith("NOT every stage passed: kernel tests (time limit, rc 124")


def test_preflight_names_the_missing_wheels(preflight, tmp_path):
    """No .whl/ and megatron-core missing: one line says what to run and how the wheels travel."""
    with pytest.raises(RuntimeError) as error:
        preflight.install_wheels(tmp_path / ".whl", tmp_path / "site", modules=("no_such_module_here.core",))
    message = str(error.value)
    assert "\n" not in message and "fetch_wheels.sh" in message and 'carry [".whl"]' in message
    assert "no_such_module_here.core" in message
    assert preflight.install_wheels(tmp_path / ".whl", tmp_path / "site", modules=("json",)).startswith(
        "no wheels"
    )
    (tmp_path / "w").mkdir()
    for name in (
        "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl",
        "omegaconf-2.4.0-py3-none-any.whl",
    ):
        (tmp_path / "w" / name).touch()
    assert preflight.wheel_requirements(tmp_path / "w") == ["megatron_core", "omegaconf"]


def test_preflight_runs_every_check_and_names_each_failure(preflight, tmp_path):
    out = tmp_path / "preflight.json"
    report = {"device": None, "versions": None, "checks": {}, "failure": None}

    def broken():
        raise RuntimeError("cc: command not found\nwhile compiling the launcher")

    checks = [("triton", broken), ("flex", lambda: "fine"), ("megatron", lambda: 1 / 0)]
    assert preflight.run_checks(checks, report, out) is False
    written = json.loads(out.read_text())
    assert [(name, c["ok"]) for name, c in written["checks"].items()] == [
        ("triton", False),
        ("flex", True),
        ("megatron", False),
    ]
    assert written["failure"] == (
        "triton: RuntimeError: cc: command not found | while compiling the launcher; "
        "megatron: ZeroDivisionError: division by zero"
    )


def _gpu_marked_test_files() -> set[str]:
    """Test files with a gpu mark, but the session check test_gpu_selection.py (the default suite runs
    it, in a -m gpu subprocess)."""
    marked = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark = pytest\.mark\.gpu\b)", re.MULTILINE)
    found = {
        path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        for path in (ROOT / "tests").rglob("test_*.py")
        if marked.search(path.read_text())
    }
    return found - {"tests.megatron.test_gpu_selection"}


def test_gpu_run_all_names_every_gpu_marked_test_file():
    """run_all.sh's pytest stages name every test file with a gpu mark (read from the script: the
    default suite's cheap form of the check test_gpu_run_all_script_on_a_cpu makes by running it)."""
    script = (ROOT / "benchmarks" / "gpu" / "run_all.sh").read_text()
    named = {m.replace("/", ".") for m in re.findall(r"\b(tests/[\w/]+)\.py\b", script)}
    assert _gpu_marked_test_files() <= named


# Slow (29-35 s): run_all.sh's pieces stay in the default suite (preflight, summary, the budget, the
# file list above, and the killed-mid-run test below).
@pytest.mark.slow
def test_gpu_run_all_script_on_a_cpu(tmp_path):
    """benchmarks/gpu/run_all.sh --cpu-smoke: every stage runs, in order, with the smoke table's limits;
    the nine files land in OUT_DIR; the pytest stages run every gpu-marked test file and count the
    tests that skip on a CPU as skipped (the GPU run is the same script with real sizes)."""
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), str(out), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    names = {"run_all.log", "summary.json", "preflight.json", "pytest-kernels.xml", "pytest-training.xml"}
    names |= {"logprobs.json", "logprobs.png", "long-context.json", "long-context.png"}
    assert names == {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    table = _stage_table("--cpu-smoke")
    assert [
        (s["name"], s["rc"], s["status"], (s["limit_s"], s["kill_after_s"])) for s in summary["stages"]
    ] == [(name, 0, "passed", table[name]) for name in STAGES]
    assert summary["finished"] and summary["passed"] and summary["budget_s"] == sum(map(sum, table.values()))
    assert summary["device"].startswith("cpu") and summary["versions"]["torch"]
    kernel, training = (s["tests"] for s in summary["stages"][1:3])
    assert kernel["passed"] == 0 and kernel["skipped"] >= 10  # CUDA only
    assert training["passed"] == 1 and training["skipped"] >= 4  # the cpu_ok set-up check runs
    ran = {t["test"].split("::")[0] for t in kernel["skipped_tests"] + training["skipped_tests"]}
    assert ran == _gpu_marked_test_files()
    assert f"run_all: worst case {summary['budget_s']} s" in done.stdout
    assert "every stage passed; tests: 1 passed" in (out / "run_all.log").read_text()


def _session_processes(session: int) -> list[int]:
    """Live processes of a session (run_all.sh's stages run `timeout` in process groups of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _kill_session(session: int) -> None:
    """SIGKILL to every process of the session, again until none is left (one may fork meanwhile)."""
    for _ in range(50):
        pids = _session_processes(session)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of session {session} survive SIGKILL: {_session_processes(session)}")


def test_gpu_run_all_killed_mid_run_keeps_the_finished_stages(tmp_path):
    """A SIGKILL to everything the script started, right after the preflight (as the device's 600 s
    limit would): summary.json is whole and has the preflight's result and the stage it interrupted."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), str(out), "--cpu-smoke"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                stages = json.loads((out / "summary.json").read_text())["stages"]
            except (OSError, ValueError):
                stages = []
            if stages and stages[0]["rc"] is not None:
                break
            assert proc.poll() is None, "run_all.sh ended before its preflight finished"
            time.sleep(0.2)
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=60)
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["finished"] and summary["passed"] is None
    first, *rest = summary["stages"]
    assert (first["name"], first["rc"], first["status"]) == ("preflight", 0, "passed")
    assert first["limit_s"] == _stage_table("--cpu-smoke")["preflight"][0] and first["seconds"] >= 0
    assert [(s["name"], s["status"]) for s in rest] in ([], [("kernel tests", "running")])
    assert json.loads((out / "preflight.json").read_text())["failure"] is None
