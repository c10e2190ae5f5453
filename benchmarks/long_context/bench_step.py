"""One SoLoPO training step at long contexts, side by side: modes x shared prompts x LM heads x lengths.

    python benchmarks/long_context/bench_step.py                     # CPU grid: 1K..32K, results JSON + plot
    python benchmarks/long_context/bench_step.py --smoke             # tiny shapes, seconds (checks the script)
    python benchmarks/long_context/bench_step.py --preset qwen2.5-0.5b   # one GPU: 8K..64K, bf16, a budget probe

One process, megatron-core's GPTModel through this project's stack (the recipe's model section, the
local layer spec with the packed attention, DDP, Megatron's Adam and schedule): one packed row holds
one preference group whose long sequences have the given length, its answers packed as branches after one
copy of their context's prompt (``--share-prompt true``, ``dataset.share_prompt``) or each sequence in a
slot of its own (``false``). The group is built as the tokenizer would: one prompt per context (long,
short) and one answer per response (chosen, rejected), a sequence being a prompt and an answer.

Modes: ``solopo`` (SoLo-RA on the chosen answer: short pair + long chosen), ``solopo-both`` (solopo with
``solopo.solo_ra_chosen_only=false``: both long answers, the loss aligns both), ``long_po``, ``short_po``
and ``long_alone``, the baseline: the long chosen sequence alone, through the same model, LM head,
schedule and optimizer step, with a mean response NLL as its loss (no mode's loss trains one sequence;
the loss is a few scalar operations either way). The **cost ratio** of a case is its step time over the
``long_alone`` step at the same long length and LM head: what one preference example costs in units of
one forward and backward of its long sequence alone (also in real tokens and peak memory). Its step
time is the mean of the fastest half of the case's steps (``fast_step_s``): another process on a
shared machine only ever adds time.

Per case: peak memory of the step above the post-build baseline (CPU: peak RSS, reset after the
build, each case in a fresh subprocess so each peak is that case's alone; CUDA: max_memory_allocated
minus the memory held after the build, all cases in this process, which shares torch.compile's work
between them), the median, fastest and fast-half step times over ``--steps`` steps after ``--warmup``
(more, up to 10, while they add up to less than ``--min-measure-s``), tokens/s, model TFLOP/s and, on
CUDA, MFU against the device's dense bf16 peak, row tokens (padding included), real tokens computed,
and the first step's loss (from the initial weights: the same shared and apart). Then, for solopo and
long_po (unshared) with the response-only head, the largest long context whose step stays under
``--memory-budget-gib`` (default on CUDA: 90% of the device's memory; grid lengths, then doubling past
the grid up to ``--probe-max``, then bisection).

The CPU default is the shared-prompt comparison: long_alone, solopo, solopo-both and long_po, shared and
unshared, response-only head, 1K..32K, 2 measured steps after 1 warm-up (more for short steps: at least
15 s measured), the packing mix shared and not, and the budget probe (one bisection step): about 35
minutes on an idle 2-core CPU. ``--logits response_only,full`` adds the full-logits comparison (the
default before shared prompts, with 3 steps and 2 bisection steps) and ``--modes`` short_po.

``--preset qwen2.5-0.5b`` is the full GPU run (unshared, as before shared prompts: ``--share-prompt``
and ``--modes`` add them): a random-init Qwen2.5-0.5B shape (24 layers, hidden
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
draws the plot and writes the tables into docs/long-contexts.md and README.md ("Shared prompts").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the time budget counts from here
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
ALONE = "long_alone"  # the baseline: the long chosen sequence alone (see the module docstring)
MODES = (ALONE, "solopo", "solopo-both", "long_po")  # the default grid (--modes adds short_po)
# Mode name -> the recipe's solopo section: every place a mode becomes a loss config (the case's
# recipe, the roles of its group) goes through this table.
LOSS_OVERRIDES = {
    "solopo": {"solopo.mode": "solopo"},
    "solopo-both": {"solopo.mode": "solopo", "solopo.solo_ra_chosen_only": "false"},
    "long_po": {"solopo.mode": "long_po"},
    "short_po": {"solopo.mode": "short_po"},
    ALONE: {"solopo.mode": "long_po"},  # any valid recipe: its loss is never used (_alone_loss)
}
HEADS = ("response_only", "full")
SHARES = {"false": False, "true": True}
MAX_STEPS = 10  # measured steps at most, however short (--min-measure-s)
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
    "min_measure_s": 0.0,
    "busy_limit": 0.0,  # seconds, not a clean measurement: never wait
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
        "logits": "response_only,full",
        "share_prompt": "false",
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
        "min_measure_s": 0.0,  # --steps only: the time budget's estimate counts them
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


def loss_config(mode: str):
    """The SoLoPOConfig a mode's training step uses (``LOSS_OVERRIDES``); None for ``long_alone``,
    whose step uses ``_alone_loss``."""
    from solopo_megatron.objectives import SoLoPOConfig

    if mode == ALONE:
        return None
    overrides = LOSS_OVERRIDES[mode]
    chosen_only = overrides.get("solopo.solo_ra_chosen_only", "true") == "true"
    return SoLoPOConfig(mode=overrides["solopo.mode"], solo_ra_chosen_only=chosen_only)


def mode_roles(mode: str) -> tuple[str, ...]:
    """The sequences a mode's group holds (and its step forwards)."""
    from solopo_megatron.objectives import required_roles

    return ("long_chosen",) if mode == ALONE else required_roles(loss_config(mode))


def can_share(mode: str) -> bool:
    """Whether a mode has a context with two answers (else shared and unshared rows are the same)."""
    from solopo_megatron.data.packing import context_slots

    return any(len(slot) > 1 for slot in context_slots(mode_roles(mode), True))


def _group(mode: str, long_length: int, short_length: int, response: int, vocab: int, seed: int):
    """One preference group of random tokens, as the tokenizer makes one: a prompt per context (long,
    short) and an answer of ``response`` tokens per response (chosen, rejected), each sequence a prompt
    and an answer; only the roles ``mode`` forwards. The sequences of one context share their prompt,
    so they can share a slot; the draw order does not depend on the mode (``long_alone``'s sequence is
    the long_chosen of the other modes' group of the same seed)."""
    import torch

    from solopo_megatron.data.packing import Group
    from solopo_megatron.data.tokenize import EncodedSequence

    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, vocab, (n,), generator=g).tolist())

    prompts = {"long": draw(long_length - response), "short": draw(short_length - response)}
    answers = {"chosen": draw(response), "rejected": draw(response)}
    sequences = {}
    for role in mode_roles(mode):
        context, answer = role.split("_")
        sequences[role] = EncodedSequence(
            prompts[context] + answers[answer], response_start=len(prompts[context])
        )
    return Group("bench", sequences, ref_logps={role: -1.0 * response for role in sequences})


def _packed_rows(case: dict) -> list:
    """The case's microbatches: one group at ``long_length`` or, for a packing case, a seeded mix of
    groups planned into rows of at most ``max_tokens`` (padded to it when ``padded``); prompts shared
    when ``share_prompt``."""
    import random

    from solopo_megatron.data.packing import pack_microbatch, pad_multiple_for, plan_microbatches

    share = case.get("share_prompt", False)
    multiple = pad_multiple_for()
    if case.get("kind") != "packing":
        group = _group(
            case["mode"], case["long_length"], case["short_length"], case["response"], case["vocab"], 1
        )
        return [
            pack_microbatch(
                [group], tuple(group.sequences), pad_multiple=multiple, pad_id=0, share_prompt=share
            )
        ]
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
    padded = [g.padded_length(multiple, share) for g in groups]
    plan = plan_microbatches(padded, case["max_tokens"])[0]
    row_length = case["max_tokens"] if case["padded"] else None
    return [
        pack_microbatch(
            [groups[i] for i in slot],
            roles,
            pad_multiple=multiple,
            pad_id=0,
            row_length=row_length,
            share_prompt=share,
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
        **LOSS_OVERRIDES[case["mode"]],
        "solopo.preference_loss": "dpo",
        "dataset.share_prompt": "true" if case.get("share_prompt") else "false",
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
    step_loss, group_loss = cfg.solopo.loss_config(), loss_config(case["mode"])
    aligned = ("mode", "solo_ra_chosen_only")  # what sets the roles and which answers SoLo-RA aligns
    if group_loss and any(getattr(step_loss, f) != getattr(group_loss, f) for f in aligned):
        raise AssertionError(f"{case['mode']}: the step's loss config is not the one its group was built for")
    with cpu_compat.enabled():
        init_process_group()
        try:
            return _timed_steps(case, cfg, init_parallel_state(cfg.model, seed=1))
        finally:
            destroy()


def _timed_steps(case: dict, cfg, parallel) -> dict:
    import torch

    from solopo_megatron.megatron.build import build_model_and_optimizer
    from solopo_megatron.megatron.step import StepContext
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
    times: list[float] = []
    step, first_loss = 0, None
    while _more_steps(case, step, times):
        start = time.perf_counter()
        for chunk in state.chunks:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        reports = _schedule(ctx, state.chunks, mbs, longest, alone=case["mode"] == ALONE)
        state.optimizer.step()
        loss = sum(float(r["loss"][0]) for r in reports)
        first_loss = loss if first_loss is None else first_loss  # from the initial weights: shared == apart
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= case["warmup"]:
            times.append(time.perf_counter() - start)
        step += 1
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
        "step_min_s": min(times),
        "step_fast_s": fast_step_s(times),
        "step_times_s": times,
        "build_s": build_s,
        "tokens_per_s": sum(real_lengths) / median,
        "model_tflops_per_s": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "loss": loss,
        "first_loss": first_loss,
    }


def fast_step_s(times: list[float]) -> float:
    """The mean of the fastest half of the measured steps (the fastest of two): what the cost ratio
    divides. Another process on a shared machine only ever adds time, so the slow half goes; the mean
    of the rest is steadier than the single fastest step."""
    fastest = sorted(times)[: max(1, len(times) // 2)]
    return sum(fastest) / len(fastest)


def _more_steps(case: dict, step: int, times: list[float]) -> bool:
    """Whether to run another step: the warm-up and ``steps`` measured steps, then more while the
    measured steps add up to less than ``min_measure_s`` (at most ``MAX_STEPS``): short steps get
    enough samples that one disturbed by another process does not decide the case."""
    if step < case["warmup"] + case["steps"]:
        return True
    return sum(times) < case.get("min_measure_s", 0.0) and len(times) < max(case["steps"], MAX_STEPS)


def _schedule(ctx, chunks: list, mbs: list, seq_length: int, alone: bool) -> list[dict]:
    """One forward and backward over ``mbs``: the trainer's ``run_schedule``, or for ``long_alone`` the
    same schedule and forward step with ``_alone_loss`` as the loss closure."""
    from solopo_megatron.megatron.step import forward_step, run_schedule

    step = _alone_forward_step if alone else forward_step
    return run_schedule(ctx, chunks, mbs, seq_length=seq_length, forward_only=False, step=step)


def _alone_forward_step(ctx, data_iterator, model):
    """The trainer's forward step (same model call, same LM head) with ``_alone_loss`` for its closure."""
    from functools import partial

    from solopo_megatron.megatron.step import forward_step, loss_func

    output, closure = forward_step(ctx, data_iterator, model)
    if closure.func is not loss_func:  # the closure's arguments are read below: (ctx, mb, weight)
        raise AssertionError("step.forward_step's loss closure changed; update _alone_forward_step")
    return output, partial(_alone_loss, *closure.args)


def _alone_loss(ctx, mb, weight, output):
    """The baseline's loss: the mean response NLL of each sequence (an SFT step), from the same
    per-sequence log-prob sums the preference losses read (``microbatch_sequence_logps``)."""
    import torch

    from solopo_megatron.megatron.step import microbatch_sequence_logps

    sums = microbatch_sequence_logps(ctx, mb, output, weight)
    tokens = mb.num_response_tokens.reshape(-1).to(sums.dtype).clamp(min=1)
    loss = -(sums / tokens).sum()
    count = mb.valid.sum().to(torch.int)
    return loss, count, {"loss": torch.stack([loss.detach(), count.to(loss.dtype)])}


def _device_peak_tflops(device) -> float | None:
    """The dense bf16 peak the trainer's MFU uses; None on CPU or an unknown GPU."""
    from solopo_megatron.megatron.metrics import peak_tflops

    return peak_tflops(None, device)


# ----------------------------------------------------------------------------- driver


def _row_tokens(
    mode: str, long_length: int, short_length: int, response: int = 0, share_prompt: bool = False
) -> int:
    """Tokens of one group's row (CP = 1: no padding), by the packing's own rule for shared slots."""
    import numpy as np

    from solopo_megatron.data.packing import padded_group_lengths

    roles = mode_roles(mode)
    lengths = np.array([[long_length if role.startswith("long") else short_length for role in roles]])
    return int(padded_group_lengths(lengths, lengths - response, roles, 1, share_prompt)[0])


def _case_row_tokens(case: dict) -> int:
    return _row_tokens(
        case["mode"],
        case["long_length"],
        case["short_length"],
        case.get("response", 0),
        case.get("share_prompt", False),
    )


def cost_ratios(results: list[dict]) -> list[dict]:
    """Every measured case against the ``long_alone`` case of its long length and LM head: step time,
    real tokens and peak memory as multiples of one forward and backward of the long sequence alone.
    Time: ``fast_step_s`` over ``fast_step_s`` (files without it: the median); ``time_median``:
    median over median."""
    alone = {
        (r["long_length"], r["logits"]): r for r in results if r["mode"] == ALONE and r["status"] == "ok"
    }
    ratios = []
    for r in results:
        base = alone.get((r["long_length"], r["logits"]))
        if r["status"] != "ok" or base is None:
            continue
        ratios.append(
            {
                "mode": r["mode"],
                "share_prompt": r.get("share_prompt", False),
                "logits": r["logits"],
                "long_length": r["long_length"],
                "time": r.get("step_fast_s", r["step_s"]) / base.get("step_fast_s", base["step_s"]),
                "time_median": r["step_s"] / base["step_s"],
                "real_tokens": r["real_tokens"] / base["real_tokens"],
                "peak_gib": r["peak_gib"] / base["peak_gib"] if base["peak_gib"] > 0 else None,
            }
        )
    return ratios


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


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux /proc/stat; None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (a case's subprocess, once waited for)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def other_cpu(run, *args):
    """``run(*args)`` and the share of the machine's CPU that other processes used meanwhile (the
    machine's busy time less this process's and its children's, over wall time x cores; None where
    /proc/stat is missing)."""
    busy, own, start = _busy_cpu_s(), _own_cpu_s(), time.monotonic()
    result = run(*args)
    if busy is None:
        return result, None
    others = (_busy_cpu_s() - busy) - (_own_cpu_s() - own)
    return result, max(0.0, others) / (max(time.monotonic() - start, 1e-3) * (os.cpu_count() or 1))


def wait_for_quiet(limit: float, max_wait_s: float, log, window_s: float = 2.0) -> float:
    """Waits (at most ``max_wait_s``) until other processes use at most ``limit`` of the machine's CPU
    over a ``window_s`` window; returns the seconds waited."""
    start = time.monotonic()
    while True:
        _, share = other_cpu(time.sleep, window_s)
        waited = time.monotonic() - start
        if share is None or share <= limit or waited >= max_wait_s:
            return waited
        if waited < window_s * 1.5:  # once per wait
            log(f"  waiting for a quiet machine: other processes use {share:.0%} of the CPU")


def run_on_quiet_machine(case: dict, run, args, log) -> dict:
    """``run(case)`` in a fresh subprocess when other processes leave the machine alone: before it,
    wait until they use at most ``--busy-limit`` of the CPU; a case during which they used more is run
    again (``--busy-retries`` times at most, the last result kept). Records ``other_cpu`` (the share of
    the machine's CPU other processes used during the case), ``attempts`` and ``waited_s``."""
    waited = 0.0
    for attempt in range(1, args.busy_retries + 2):
        waited += wait_for_quiet(args.busy_limit, args.quiet_wait_s, log)
        result, share = other_cpu(run, case)
        result = {**result, "other_cpu": share, "attempts": attempt, "waited_s": round(waited, 1)}
        if result["status"] != "ok" or share is None or share <= args.busy_limit:
            return result
        if attempt <= args.busy_retries:
            log(f"  other processes used {share:.0%} of the CPU during the case: once more")
    return result


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
    shared = "shared" if result.get("share_prompt") else "apart"
    head = f"{result['mode']:11} {shared:6} {result['logits']:13} long={result['long_length']:6}"
    if result.get("kind") == "packing" and result["status"] == "ok":
        head += f"  rows {result['rows']}: {result['row_tokens']} tokens for {result['real_tokens']} real"
    if result["status"] != "ok":
        return f"{head}  {result['status']}: {result.get('reason', '')}"
    return (
        f"{head}  peak {result['peak_gib']:7.3f} GiB  step {result['step_s']:8.2f} s  "
        f"{result['tokens_per_s']:9.0f} tok/s  {result.get('real_tokens', '?')} tokens"
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
        tokens = groups * _case_row_tokens(case)
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
    base = {**base, "steps": 1, "warmup": 0, "min_measure_s": 0.0}  # the probe needs the peak, not a timing
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
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(LOSS_OVERRIDES)}")
    p.add_argument("--logits", default="response_only", help=f"LM heads, of {', '.join(HEADS)}")
    p.add_argument(
        "--share-prompt",
        default="false,true",
        help="prompts shared (dataset.share_prompt), of false, true; long_alone runs unshared only",
    )
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
    # 2 + 1: the CPU grid's ~40 cases in about half an hour (3 + 1 before shared prompts doubled them)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--min-measure-s",
        type=float,
        default=15.0,
        help=f"measure more steps (up to {MAX_STEPS}) until they add up to this many seconds (0: --steps only)",
    )
    p.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help=f"the budget probe's limit (default: 90%% of the GPU's memory on CUDA, {BUDGET_GIB} on CPU)",
    )
    p.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the budget probe (solopo and long_po, unshared, response-only)",
    )
    p.add_argument("--probe-max", type=int, default=131072, help="longest length the budget probe tries")
    p.add_argument("--probe-refine", type=int, default=1, help="bisection steps after the doubling")
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
        "--busy-limit",
        type=float,
        default=0.15,
        help="subprocess cases: start one when other processes use at most this share of the machine's CPU, "
        "and run it again when they used more during it (0: never wait)",
    )
    p.add_argument("--busy-retries", type=int, default=2, help="runs again of a case others disturbed")
    p.add_argument("--quiet-wait-s", type=float, default=600.0, help="longest wait for a quiet machine")
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
    shares = [v for v in str(args.share_prompt).lower().split(",") if v]
    for name, values, known in (("modes", args.modes, LOSS_OVERRIDES), ("logits", args.logits, HEADS)):
        if not values or any(v not in known for v in values):
            p.error(f"--{name} {','.join(values)}: each must be one of {', '.join(known)}")
    if not shares or any(v not in SHARES for v in shares):
        p.error(f"--share-prompt {args.share_prompt}: each must be one of false, true")
    args.share_prompt = [SHARES[v] for v in shares]
    if args.memory_budget_gib is None:
        args.memory_budget_gib = BUDGET_GIB if args.device == "cpu" else _device_memory_gib() * 0.9
    in_process = args.in_process == "yes" or (args.in_process == "auto" and args.device == "cuda")
    args.run = run_in_process if in_process else lambda case: run_in_child(case, args.case_timeout)
    if not in_process and args.busy_limit > 0:  # CPU timings: only on a machine others leave alone
        child = args.run
        log = lambda text: print(text, flush=True)  # noqa: E731
        args.run = lambda case: run_on_quiet_machine(case, child, args, log)
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
        "min_measure_s": args.min_measure_s,
    }
    report = {
        "benchmark": "long_context_step",
        **environment(args.device),
        "settings": {
            **shape,
            "preset": args.preset,
            "lengths": args.lengths,
            "share_prompt": args.share_prompt,
            "busy_limit": None if args.in_process or args.busy_limit <= 0 else args.busy_limit,
            "memory_budget_gib": args.memory_budget_gib,
            "time_budget_s": args.time_budget_s,
            "cases_in_process": args.in_process,
        },
        "results": [],
        "cost_ratio": [],
        "packing": [],
        "budget_probe": [],
    }
    out = Path(args.out) if args.out else RESULTS / f"long-context-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case: a run stopped early keeps what it measured
        report["cost_ratio"] = cost_ratios(report["results"])
        out.write_text(json.dumps(report, indent=1) + "\n")

    # Length outermost: a run stopped early has every mode, sharing and LM head of the lengths it
    # finished; long_alone first (in the default order), the baseline of each length's cost ratios.
    for length in args.lengths:
        for mode in args.modes:
            if mode == "short_po" and length != args.lengths[0]:
                continue  # short_po forwards no long context: one case per LM head is the whole story
            # A mode without two answers to one context packs the same row either way: run it once.
            for share in args.share_prompt if can_share(mode) else [False]:
                for logits in args.logits:
                    case = {
                        **shape,
                        "mode": mode,
                        "share_prompt": share,
                        "logits": logits,
                        "long_length": length,
                    }
                    logits_gib = _case_row_tokens(case) * args.vocab * 4 / 2**30
                    if logits == "full" and logits_gib > args.full_logits_cap_gib:
                        reason = f"its fp32 [T, V] logits alone are {logits_gib:.1f} GiB (cap {args.full_logits_cap_gib} GiB)"
                        result = {**case, "status": "skipped", "reason": reason}
                    elif not deadline.allows(case):
                        result = {**case, "status": "skipped", "reason": deadline.reason()}
                    else:
                        result = deadline.note(args.run(case))
                    report["results"].append(result)
                    save()
                    log(_describe(result))
    # The packing mix: solopo (the default mode), rows padded to max_tokens or not, for each sharing.
    for share in args.share_prompt if args.packing_groups else []:
        for padded in (True, False):
            case = {
                **shape,
                "kind": "packing",
                "mode": "solopo",
                "share_prompt": share,
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
    for mode in PROBE_MODES if args.probe else []:  # unshared: the probe predates shared prompts
        if mode in args.modes and "response_only" in args.logits and False in args.share_prompt:
            base = {**shape, "mode": mode, "share_prompt": False, "logits": "response_only"}
            grid = [
                r
                for r in report["results"]
                if r["mode"] == mode and r["logits"] == "response_only" and not r.get("share_prompt")
            ]
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
