"""Step metrics across ranks: report reduction, tokens and model FLOPs, throughput/MFU, peak memory,
the reward check before the first update, and the console formatting of all of them."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..data.packing import Microbatch
from ..objectives import ROUNDING_ULPS
from ..recipe.schema import ModelSection
from ..recipe.sizing import peak_tflops_for, training_flops
from .parallel import ParallelState

TRAIN_KEYS = ("loss", "po_loss", "solo_ra_loss", "accuracy/short", "solo_ra_gap/chosen", "grad_norm", "lr")
EVAL_KEYS = ("loss", "accuracy/short", "accuracy/long", "margin/long")


def reduce_reports(reports: list[dict], parallel: ParallelState) -> dict[str, float]:
    """Sums the loss closure's [value, count] pairs over microbatches and DP ranks -> means.

    Takes the last pipeline stage's reports (the other stages have none and get {})."""
    if not reports:
        return {}
    names = sorted(reports[0])
    totals = torch.stack([sum(r[name] for r in reports) for name in names]).double()  # [metrics, 2]
    if parallel.dp_group is not None:
        dist.all_reduce(totals, group=parallel.dp_group)
    return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


def step_work(
    mbs: list[Microbatch], model: ModelSection, padded_vocab: int, parallel: ParallelState
) -> dict[str, float]:
    """The step's real (unpadded) tokens, every role's prompt and response, and its model FLOPs, over all DP ranks.

    Sequence lengths are global (not CP shards), so every CP and TP rank of a replica counts the same.
    """
    lengths = [length for mb in mbs for length in (mb.cu_seqlens[1:] - mb.cu_seqlens_padded[:-1]).tolist()]
    work = torch.tensor(
        [sum(lengths), training_flops(model, padded_vocab, lengths)],
        dtype=torch.float64,
        device=parallel.device,
    )
    if parallel.dp_group is not None:
        dist.all_reduce(work, group=parallel.dp_group)
    return {"tokens": work[0].item(), "flops": work[1].item()}


def peak_memory_gib(parallel: ParallelState) -> float:
    """The largest peak over all ranks: CUDA memory allocated by torch, or the process's peak RSS on CPU."""
    if parallel.device.type == "cuda":
        local = torch.cuda.max_memory_allocated(parallel.device)
    else:
        import resource

        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    peak = torch.tensor(float(local), dtype=torch.float64, device=parallel.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 2**30


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """Dense bf16 peak per GPU for MFU: the recipe's ``logger.peak_tflops_per_gpu``, else known GPUs by name."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


@dataclass
class Throughput:
    """Per log interval: tokens/s, TFLOP/s per GPU and MFU from the steps' model FLOPs."""

    world_size: int
    peak_tflops: float | None
    tokens: float = 0.0
    flops: float = 0.0
    since: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, float]) -> None:
        self.tokens += metrics["tokens"]
        self.flops += metrics["flops"]

    def report(self) -> dict[str, float]:
        """The interval's rates; starts the next interval."""
        now = time.perf_counter()
        seconds = max(now - self.since, 1e-9)
        tflops = self.flops / seconds / self.world_size / 1e12
        out = {"tokens_per_s": self.tokens / seconds, "tflops_per_gpu": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        self.tokens, self.flops, self.since = 0.0, 0.0, now
        return out


def reward_check_message(
    metrics: dict[str, float], beta: float, compute_dtype: torch.dtype = torch.float32
) -> str:
    """The step-1 check that the reference store matches the initial weights.

    Before the first update policy == reference, so every DPO reward ``beta * (S - S_ref)`` is 0 up to
    rounding: the reference pass and the training pass pack rows differently, so matmuls may round
    differently (fp32 on CPU: ~1e-8 on some machines, exactly 0 on others). The bound is
    ``beta * |S| * ROUNDING_ULPS * finfo(compute_dtype).eps`` for the largest mean log-prob sum ``|S|``
    (the objectives' noise-floor rule); a store from other weights or data misses it by orders of
    magnitude in fp32. In bf16 the bound is loose: the check then only catches gross mismatches.
    """
    worst = max((abs(v) for k, v in metrics.items() if k.startswith("rewards/")), default=math.nan)
    largest_sum = max((abs(v) for k, v in metrics.items() if k.startswith("logps/")), default=1.0)
    eps = torch.finfo(compute_dtype).eps
    bound = beta * max(largest_sum, 1.0) * ROUNDING_ULPS * eps
    verdict = "within" if worst <= bound else "ABOVE (the reference store does not match these weights)"
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        compute_dtype, str(compute_dtype)
    )
    return (
        f"reward check: policy == reference before the first update, so rewards must be ~0: "
        f"max |mean reward| = {worst:.3g}, {verdict} the {precision} rounding bound {bound:.3g}"
    )


def format_metrics(metrics: dict[str, float], keys: Sequence[str]) -> str:
    """``key value`` pairs of the ``keys`` present in ``metrics``, for a log line."""
    return " ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)


def format_clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"
