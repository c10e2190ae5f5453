"""One SoLoPO training step at long contexts, side by side: modes x LM-head paths x context lengths.

    python benchmarks/long_context/bench_step.py                     # CPU grid: 1K..32K, results JSON + plot
    python benchmarks/long_context/bench_step.py --smoke             # tiny shapes, seconds (checks the script)
    python benchmarks/long_context/bench_step.py --preset qwen2.5-0.5b   # one GPU: 8K..64K, bf16, a budget probe

One process, megatron-core's GPTModel through this project's stack (the recipe's model section, the
local layer spec with the packed attention, DDP, Megatron's Adam and schedule): one packed row holds
one preference group whose long sequences have the given length. Per case: peak memory of the step
above the post-build baseline (CPU: peak RSS, reset after the build, each case in a fresh subprocess
so each peak is that case's alone; CUDA: max_memory_allocated minus the memory held after the build,
all cases in this process, which shares torch.compile's work between them), the median step time over
``--steps`` steps after ``--warmup``, tokens/s, model TFLOP/s and, on CUDA, MFU against the device's
dense bf16 peak. Then, for solopo and long_po with the response-only head, the largest long context
whose step stays under ``--memory-budget-gib`` (default on CUDA: 90% of the device's memory; grid
lengths, then doubling past the grid up to ``--probe-max``, then bisection).

``--preset qwen2.5-0.5b`` is the full GPU run: a random-init Qwen2.5-0.5B shape (24 layers, hidden
896, 14 heads / 2 KV groups, FFN 4864, vocabulary 151,936, QKV bias, tied embeddings), bf16, full
activation recomputation (what a long-context run uses), solopo vs long_po and response-only vs full
logits at 8K..64K tokens. ``--preset run-all`` is its cut for ``benchmarks/gpu/run_all.sh``'s stage:
8K and 32K, response-only, one measured step after one warm-up, a budget probe without bisection, and
``--time-budget-s 65``: a case starts only if it should end within that many seconds of the start
(estimated from the latest measured case), so the run ends by itself inside the stage's limit. The
JSON is rewritten after every case, so a run stopped early keeps what it measured.

A case that cannot run is reported with its reason, never dropped: a full-logits row whose fp32
[T, V] logits alone would exceed ``--full-logits-cap-gib``, or a case the time budget leaves out, is
skipped as such; a child that dies (out of memory) is recorded as failed. The exit status is 1 when no
case was measured or a case failed for a reason other than running out of memory (the budget probe
runs out of memory by design). Results: benchmarks/results/long-context-<device>.json; report.py
draws the plot and writes the table into docs/long-contexts.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the time budget counts from here
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("solopo", "long_po", "short_po")
HEADS = ("response_only", "full")
PROBE_MODES = ("solopo", "long_po")
BUDGET_GIB = 2.0
SMOKE = {  # --smoke: tiny shapes, seconds (explicit flags still win)
    "lengths": "128,256",
    "vocab": 512,
    "hidden": 32,
    "ffn": 64,
    "heads": 2,
    "short_length": 64,
    "response": 16,
    "steps": 1,
    "warmup": 0,
    "probe_max": 512,
    "probe_refine": 0,
    "memory_budget_gib": 64.0,
    "packing_groups": 4,
    "packing_median": 128,
    "packing_max_tokens": 1024,
}
PRESETS = {
    "qwen2.5-0.5b": {
        "device": "cuda",
        "bf16": True,
        "lengths": "8192,16384,32768,65536",
        "modes": "solopo,long_po",
        "vocab": 151936,
        "hidden": 896,
        "ffn": 4864,
        "layers": 24,
        "heads": 14,
        "groups": 2,
        "qkv_bias": True,
        "tied": True,
        "recompute": "full",
        "short_length": 1024,
        "response": 128,
        "steps": 2,
        "warmup": 1,
        "probe_max": 131072,
        "probe_refine": 1,
        "full_logits_cap_gib": 1e9,  # the device's memory decides: an out-of-memory case is reported
        "packing_groups": 0,  # the CPU run measures packing; the GPU's minutes go to the lengths
    }
}
# benchmarks/gpu/run_all.sh's stage (80 s limit): ends by itself in ~65 s. The estimate leaves out each
# case's process-group set-up and the first case's compile, hence 15 s to spare.
PRESETS["run-all"] = {
    **PRESETS["qwen2.5-0.5b"],
    "lengths": "8192,32768",
    "logits": "response_only",
    "steps": 1,
    "warmup": 1,  # the first case's warm-up step compiles flex attention; no estimate counts it
    "probe_refine": 0,
    "time_budget_s": 65.0,
}


# ----------------------------------------------------------------------------- one case (child)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _group(mode: str, long_length: int, short_length: int, response: int, vocab: int, seed: int):
    """One preference group of random tokens: the roles ``mode`` forwards, responses of ``response`` tokens."""
    import torch

    from solopo_megatron.data.packing import Group
    from solopo_megatron.data.tokenize import EncodedSequence
    from solopo_megatron.objectives import SoLoPOConfig, required_roles

    g = torch.Generator().manual_seed(seed)
    sequences = {}
    for role in required_roles(SoLoPOConfig(mode=mode)):
        length = long_length if role.startswith("long") else short_length
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        sequences[role] = EncodedSequence(tuple(ids), response_start=length - response)
    return Group("bench", sequences, ref_logps={role: -1.0 * response for role in sequences})


def _packed_rows(case: dict) -> list:
    """The case's microbatches: one group at ``long_length`` or, for a packing case, a seeded mix of
    groups planned into rows of at most ``max_tokens`` (padded to it when ``padded``)."""
    import random

    from solopo_megatron.data.packing import pack_microbatch, pad_multiple_for, plan_microbatches

    if case.get("kind") != "packing":
        group = _group(
            case["mode"], case["long_length"], case["short_length"], case["response"], case["vocab"], 1
        )
        return [pack_microbatch([group], tuple(group.sequences), pad_multiple=pad_multiple_for(), pad_id=0)]
    rng = random.Random(case["seed"])
    # A realistic mix: long contexts log-normal around the median, clipped to [1/4, 4] x median.
    median = case["long_length"]
    lengths = [
        int(min(4 * median, max(median / 4, rng.lognormvariate(0, 0.7) * median)))
        for _ in range(case["groups_in_mix"])
    ]
    groups = [
        _group(case["mode"], n, case["short_length"], case["response"], case["vocab"], seed)
        for seed, n in enumerate(lengths)
    ]
    roles = tuple(groups[0].sequences)
    padded = [g.padded_length(pad_multiple_for()) for g in groups]
    plan = plan_microbatches(padded, case["max_tokens"])[0]
    row_length = case["max_tokens"] if case["padded"] else None
    return [
        pack_microbatch(
            [groups[i] for i in slot], roles, pad_multiple=pad_multiple_for(), pad_id=0, row_length=row_length
        )
        for slot in plan
    ]


def run_case(case: dict) -> dict:
    """Builds the model and optimizer, then times ``steps`` training steps over the case's packed rows."""
    from solopo_megatron.megatron import cpu_compat
    from solopo_megatron.megatron.parallel import destroy, init_parallel_state, init_process_group
    from solopo_megatron.recipe.loading import load_config

    overrides = {
        "model.num_layers": case["layers"],
        "model.hidden_size": case["hidden"],
        "model.ffn_hidden_size": case["ffn"],
        "model.num_attention_heads": case["heads"],
        "model.num_query_groups": case["groups"],
        "model.vocab_size": case["vocab"],
        "model.logits": case["logits"],
        "model.bf16": case["bf16"],
        "model.transformer_impl": "local",
        "model.attention_backend": case["attention"],
        "model.add_qkv_bias": case.get("qkv_bias", False),
        "model.share_embeddings_and_output_weights": case.get("tied", False),
        "solopo.mode": case["mode"],
        "solopo.preference_loss": "dpo",
        "optimizer.optimizer": "adam",
    }
    if case.get("recompute") == "full":  # every layer's activations recomputed in backward
        overrides.update(
            {
                "model.recompute_granularity": "full",
                "model.recompute_method": "uniform",
                "model.recompute_num_layers": 1,
            }
        )
    cfg = load_config(None, [f"{key}={value}" for key, value in overrides.items()])
    with cpu_compat.enabled():
        init_process_group()
        try:
            return _timed_steps(case, cfg, init_parallel_state(cfg.model, seed=1))
        finally:
            destroy()


def _timed_steps(case: dict, cfg, parallel) -> dict:
    import torch

    from solopo_megatron.megatron.build import build_model_and_optimizer
    from solopo_megatron.megatron.step import StepContext, run_schedule
    from solopo_megatron.recipe.sizing import padded_vocab_size, training_flops

    device = parallel.device
    build_start = time.perf_counter()
    mbs = [mb.to(device) for mb in _packed_rows(case)]
    row_tokens = sum(mb.tokens.numel() for mb in mbs)
    longest = max(mb.tokens.numel() for mb in mbs)
    state = build_model_and_optimizer(cfg, parallel, case["vocab"], longest)
    ctx = StepContext(
        cfg.solopo.loss_config(),
        parallel,
        response_only=case["logits"] == "response_only",
        vocab_size=case["vocab"],  # as the trainer: padding rows (if any) out of the softmax
    )
    build_s = time.perf_counter() - build_start
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss_kib("VmRSS") * 1024
        _reset_peak_rss()
    times = []
    for step in range(case["warmup"] + case["steps"]):
        start = time.perf_counter()
        for chunk in state.chunks:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        reports = run_schedule(ctx, state.chunks, mbs, seq_length=longest, forward_only=False)
        state.optimizer.step()
        loss = sum(float(r["loss"][0]) for r in reports)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= case["warmup"]:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _rss_kib("VmHWM") * 1024 - baseline
    real_lengths = [n for mb in mbs for n in (mb.cu_seqlens[1:] - mb.cu_seqlens_padded[:-1]).tolist() if n]
    flops = training_flops(cfg.model, padded_vocab_size(case["vocab"], cfg.model), real_lengths)
    rows = len(mbs)
    del state, mbs  # in-process cases: this case's memory goes before the next one's
    median = statistics.median(times)
    tflops = flops / median / 1e12
    peak_tflops = _device_peak_tflops(device) if case["bf16"] else None
    return {
        "status": "ok",
        "row_tokens": row_tokens,
        "real_tokens": sum(real_lengths),
        "rows": rows,
        "peak_gib": peak / 2**30,
        "baseline_gib": baseline / 2**30,
        "step_s": median,
        "step_times_s": times,
        "build_s": build_s,
        "tokens_per_s": sum(real_lengths) / median,
        "model_tflops_per_s": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "loss": loss,
    }


def _device_peak_tflops(device) -> float | None:
    """The dense bf16 peak the trainer's MFU uses; None on CPU or an unknown GPU."""
    from solopo_megatron.megatron.metrics import peak_tflops

    return peak_tflops(None, device)


# ----------------------------------------------------------------------------- driver


def _row_tokens(mode: str, long_length: int, short_length: int) -> int:
    roles = {"solopo": (1, 2), "long_po": (2, 0), "short_po": (0, 2)}[mode]
    return roles[0] * long_length + roles[1] * short_length


def run_in_child(case: dict, timeout: float) -> dict:
    """``run_case`` in a fresh interpreter; a crash or timeout becomes a 'failed' record with its reason."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [sys.executable, __file__, "--child", json.dumps(case), "--child-out", out.name]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**case, "status": "failed", "reason": f"over the {timeout:.0f} s case timeout"}
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            killed = done.returncode < 0 or done.returncode == 137
            reason = "killed (out of memory)" if killed else " | ".join(tail)
            return {**case, "status": "failed", "reason": f"exit {done.returncode}: {reason}"}
        return {**case, **json.loads(Path(out.name).read_text())}


def run_in_process(case: dict) -> dict:
    """``run_case`` here (CUDA: peaks come from max_memory_allocated, reset per case); running out of
    memory, or any error, becomes a 'failed' record with its reason, and the next case starts clean."""
    import gc

    import torch

    try:
        return {**case, **run_case(case)}
    except torch.OutOfMemoryError:
        failure = {**case, "status": "failed", "reason": "out of memory"}
    except Exception as error:  # noqa: BLE001  (reported, never dropped)
        failure = {**case, "status": "failed", "reason": f"error: {error!r}"[:400]}
    gc.collect()  # outside the except block: the traceback's frames no longer hold the case's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return failure


def _describe(result: dict) -> str:
    head = f"{result['mode']:8} {result['logits']:13} long={result['long_length']:6}"
    if result.get("kind") == "packing" and result["status"] == "ok":
        head += f"  rows {result['rows']}: {result['row_tokens']} tokens for {result['real_tokens']} real"
    if result["status"] != "ok":
        return f"{head}  {result['status']}: {result.get('reason', '')}"
    return (
        f"{head}  peak {result['peak_gib']:7.3f} GiB  step {result['step_s']:8.2f} s  "
        f"{result['tokens_per_s']:9.0f} tok/s"
    )


class Deadline:
    """Whether a case should end within ``budget_s`` seconds of the run's start (None: no budget).

    The estimate scales the latest measured case by row tokens: its build time plus its measured step
    time per token times the new case's steps (warm-up included) and tokens, with 50% to spare for
    attention growing faster than linearly. The first case always starts; a warm-up step's compile is
    in no estimate, since only the measured steps' median enters it.
    """

    SPARE = 1.5

    def __init__(self, budget_s: float | None, clock=time.monotonic, start: float | None = None):
        self.budget_s, self.clock = budget_s, clock
        self.start = clock() if start is None else start
        self.latest: dict | None = None  # the latest case that ran ('ok')

    def estimate_s(self, case: dict) -> float:
        if self.latest is None:
            return 0.0
        groups = case.get("groups_in_mix", 1)  # a packing case: about that many groups' tokens
        tokens = groups * _row_tokens(case["mode"], case["long_length"], case["short_length"])
        per_token = self.latest["step_s"] / self.latest["row_tokens"]
        steps = case["warmup"] + case["steps"]
        return self.SPARE * (self.latest.get("build_s", 0.0) + steps * per_token * tokens)

    def allows(self, case: dict) -> bool:
        if self.budget_s is None:
            return True
        return self.clock() - self.start + self.estimate_s(case) <= self.budget_s

    def note(self, result: dict) -> dict:
        if result["status"] == "ok":
            self.latest = result
        return result

    def reason(self) -> str:
        return f"not started: it would end past --time-budget-s {self.budget_s:g} s"


OUT_OF_MEMORY = ("out of memory", "cublas_status_alloc_failed")  # the allocator's, cuBLAS's workspace


def _out_of_memory(result: dict) -> bool:
    reason = str(result.get("reason", "")).lower()
    return any(pattern in reason for pattern in OUT_OF_MEMORY)


def problems(report: dict) -> list[str]:
    """Why the run is no pass: cases that failed other than by running out of memory (the budget probe
    runs out of memory by design), or no case measured at all. Empty when the run passed."""
    probe_runs = [r for probe in report["budget_probe"] for r in probe["probe_runs"]]
    cases = report["results"] + report["packing"] + probe_runs
    found = [_describe(r) for r in cases if r["status"] == "failed" and not _out_of_memory(r)]
    if not any(r["status"] == "ok" for r in cases):
        found.append("no case produced a measurement")
    return found


def probe_max_length(
    base: dict, grid: list[dict], budget_gib: float, args, log, deadline: Deadline | None = None
) -> dict:
    """Largest long length (multiple of 64) whose step peak stays under the budget, for ``base``'s mode;
    stopped early where ``deadline`` does not allow the next run."""
    fits = [r["long_length"] for r in grid if r["status"] == "ok" and r["peak_gib"] <= budget_gib]
    over = [r["long_length"] for r in grid if r["status"] != "skipped" and r["long_length"] not in fits]
    runs = []
    base = {**base, "steps": 1, "warmup": 0}  # the probe needs the peak, not a timing
    run = args.run
    best = max(fits, default=0)
    worst = min((n for n in over if n > best), default=None)
    length = max(best, args.lengths[0]) * 2
    deadline = deadline or Deadline(None)
    stopped = False

    def allowed(case: dict) -> bool:
        nonlocal stopped
        stopped = stopped or not deadline.allows(case)
        if stopped:
            log(f"  probe stopped at {case['long_length']}: {deadline.reason()}")
        return not stopped

    while worst is None and length <= args.probe_max and allowed({**base, "long_length": length}):
        result = deadline.note(run({**base, "long_length": length}))
        runs.append(result)
        log("  probe " + _describe(result))
        if result["status"] == "ok" and result["peak_gib"] <= budget_gib:
            best, length = length, length * 2
        else:
            worst = length
    for _ in range(args.probe_refine if worst is not None else 0):
        middle = (best + worst) // 2 // 64 * 64
        if middle in (best, worst) or not allowed({**base, "long_length": middle}):
            break
        result = deadline.note(run({**base, "long_length": middle}))
        runs.append(result)
        log("  probe " + _describe(result))
        if result["status"] == "ok" and result["peak_gib"] <= budget_gib:
            best = middle
        else:
            worst = middle
    return {
        "mode": base["mode"],
        "logits": base["logits"],
        "budget_gib": budget_gib,
        "max_long_length": best,
        "first_over_budget": worst,
        "bounded_by_probe_max": worst is None and not stopped,
        "stopped_by_time_budget": stopped,
        "probe_runs": runs,
    }


def environment(device: str) -> dict:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        import megatron.core

        megatron_version = megatron.core.__version__
    except ImportError:
        megatron_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu: {platform.machine()}, {os.cpu_count()} cores"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton_version,
            "megatron_core": megatron_version,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), help="a named setting (explicit flags still win)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--lengths", default="1024,2048,4096,8192,16384,32768", help="long-context lengths (tokens)"
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--logits", default=",".join(HEADS))
    p.add_argument("--short-length", type=int, default=512, help="tokens of each short sequence")
    p.add_argument("--response", type=int, default=64, help="response tokens of every sequence")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    p.add_argument("--qkv-bias", action="store_true", help="model.add_qkv_bias (Qwen2.5)")
    p.add_argument("--tied", action="store_true", help="model.share_embeddings_and_output_weights")
    p.add_argument("--recompute", choices=("none", "full"), default="none", help="activation recomputation")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attention", default="auto", help="model.attention_backend")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help=f"the budget probe's limit (default: 90%% of the GPU's memory on CUDA, {BUDGET_GIB} on CPU)",
    )
    p.add_argument("--probe-max", type=int, default=131072, help="longest length the budget probe tries")
    p.add_argument("--probe-refine", type=int, default=2, help="bisection steps after the doubling")
    p.add_argument("--full-logits-cap-gib", type=float, default=6.0, help="skip full-logit rows above this")
    p.add_argument("--packing-groups", type=int, default=12, help="groups in the packing mix (0: skip it)")
    p.add_argument("--packing-median", type=int, default=2048, help="median long-context length of the mix")
    p.add_argument("--packing-max-tokens", type=int, default=16384, help="dataset.max_tokens of the mix")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="a subprocess case's limit (s)")
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start a case only if it should end within this many seconds of the start (default: no limit)",
    )
    p.add_argument(
        "--in-process",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run the cases in this process (auto: on CUDA) instead of one subprocess each",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes and lengths (seconds)")
    p.add_argument(
        "--out", default=None, help="results JSON (default benchmarks/results/long-context-<device>.json)"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    if known.smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    args.lengths = [int(n) for n in str(args.lengths).split(",")]
    args.modes = [m for m in str(args.modes).split(",") if m]
    args.logits = [h for h in str(args.logits).split(",") if h]
    if args.memory_budget_gib is None:
        args.memory_budget_gib = BUDGET_GIB if args.device == "cpu" else _device_memory_gib() * 0.9
    in_process = args.in_process == "yes" or (args.in_process == "auto" and args.device == "cuda")
    args.run = run_in_process if in_process else lambda case: run_in_child(case, args.case_timeout)
    args.in_process = in_process
    return args


def _device_memory_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_case(json.loads(args.child))
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    deadline = Deadline(args.time_budget_s, start=STARTED)  # imports and CUDA set-up count too
    log = lambda text: print(text, flush=True)  # noqa: E731
    shape = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "layers": args.layers,
        "heads": args.heads,
        "groups": args.groups,
        "qkv_bias": args.qkv_bias,
        "tied": args.tied,
        "recompute": args.recompute,
        "bf16": args.bf16,
        "attention": args.attention,
        "short_length": args.short_length,
        "response": args.response,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    report = {
        "benchmark": "long_context_step",
        **environment(args.device),
        "settings": {
            **shape,
            "preset": args.preset,
            "lengths": args.lengths,
            "memory_budget_gib": args.memory_budget_gib,
            "time_budget_s": args.time_budget_s,
            "cases_in_process": args.in_process,
        },
        "results": [],
        "packing": [],
        "budget_probe": [],
    }
    out = Path(args.out) if args.out else RESULTS / f"long-context-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case: a run stopped early keeps what it measured
        out.write_text(json.dumps(report, indent=1) + "\n")

    # Length outermost: a run stopped early has every mode and LM head of the lengths it finished.
    for length in args.lengths:
        for mode in args.modes:
            for logits in args.logits:
                case = {**shape, "mode": mode, "logits": logits, "long_length": length}
                logits_gib = _row_tokens(mode, length, args.short_length) * args.vocab * 4 / 2**30
                if logits == "full" and logits_gib > args.full_logits_cap_gib:
                    reason = f"its fp32 [T, V] logits alone are {logits_gib:.1f} GiB (cap {args.full_logits_cap_gib} GiB)"
                    result = {**case, "status": "skipped", "reason": reason}
                elif mode == "short_po" and length != args.lengths[0]:
                    continue  # short_po forwards no long context: one case per LM head is the whole story
                elif not deadline.allows(case):
                    result = {**case, "status": "skipped", "reason": deadline.reason()}
                else:
                    result = deadline.note(args.run(case))
                report["results"].append(result)
                save()
                log(_describe(result))
    if args.packing_groups:
        for padded in (True, False):
            case = {
                **shape,
                "kind": "packing",
                "mode": "solopo",
                "logits": "response_only",
                "long_length": args.packing_median,
                "groups_in_mix": args.packing_groups,
                "max_tokens": args.packing_max_tokens,
                "padded": padded,
                "seed": 0,
            }
            result = (
                deadline.note(args.run(case))
                if deadline.allows(case)
                else {**case, "status": "skipped", "reason": deadline.reason()}
            )
            report["packing"].append(result)
            save()
            log(f"packing, rows {'padded to max_tokens' if padded else 'unpadded'}: " + _describe(result))
    for mode in PROBE_MODES:
        if mode in args.modes and "response_only" in args.logits:
            base = {**shape, "mode": mode, "logits": "response_only"}
            grid = [r for r in report["results"] if r["mode"] == mode and r["logits"] == "response_only"]
            log(f"budget probe: {mode}, {args.memory_budget_gib:.1f} GiB")
            probe = probe_max_length(base, grid, args.memory_budget_gib, args, log, deadline)
            report["budget_probe"].append(probe)
            save()
    save()
    log(f"wrote {out}")
    if not args.no_plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import plot

        log(f"wrote {plot(report, out.with_suffix('.png'))}")
    found = problems(report)
    for problem in found:
        log(f"FAILED: {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
