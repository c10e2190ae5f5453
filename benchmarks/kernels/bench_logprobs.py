"""Token log-probs from vocab-parallel logits: ours against the field, on the same shapes in one run.

    python benchmarks/kernels/bench_logprobs.py                 # CUDA: the full grid, results JSON
    python benchmarks/kernels/bench_logprobs.py --quick         # CUDA: two shapes (not yet timed on a GPU; run_all.sh runs one)
    python benchmarks/kernels/bench_logprobs.py --smoke         # CPU, tiny shapes (checks the script runs)

Per-rank shapes (T tokens x V_local vocab columns) with a single-rank process group; bf16 logits;
labels all valid (Megatron's CE has no ignore_index). For each provider and shape: median time
(triton.testing.do_bench) of the forward-only pass (no autograd: what a reference-model pass costs),
forward+backward, and the backward alone (forward+backward minus a forward that records autograd
state). Every backward is ``torch.autograd.grad`` to the logits, never ``.backward()`` into a leaf's
``.grad``: AccumulateGrad would copy the gradient there, one more [T, V] write and buffer than the
provider makes (an in-place provider's row would carry a gradient copy it never made). Achieved GB/s
against the bytes that must move (2 bytes per
logit forward, 4 backward, 6 both) and its fraction of the measured device copy bandwidth; peak memory
beyond the inputs and outputs (the outputs being the [T] result and, unless it shares the logits'
storage, the [T, V_local] gradient). Results go to benchmarks/results/logprobs-<device>.json (rewritten after every
provider and shape, so a run stopped early keeps what it measured); report.py plots them and writes the table into docs/benchmarks.md.

Honest at the edges: inputs are made in bf16 (no fp32 [T, V] temporary); a shape whose inputs cannot
fit the free device memory, and a provider that runs out of memory in a mode, are reported per
provider and mode; ``torch.compile`` is reset and rebuilt per shape, and dynamo's recompile limit
raises instead of silently falling back to eager. The exit status is 1 when nothing was measured, or
when a provider failed on a shape for a reason other than memory (or one of ours did not import).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FULL_TOKENS = (8192, 32768, 131072)
FULL_VOCABS = (19008, 152064, 128256)  # Qwen2.5 152064/tp8, Qwen2.5 tp1, Llama-3 tp1
QUICK_SHAPES = ((32768, 19008), (16384, 152064))  # --quick: a TP=8 shard and a whole Qwen2.5 vocabulary
SMOKE_SHAPES = ((64, 512), (128, 512))
BYTES_PER_LOGIT = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- providers
# Each builder returns fn(logits, labels) -> [T] per-token value to backpropagate (log-prob or
# cross entropy, which is its negative) and whether the gradient is written into the logits buffer.


def _ours(tp_group, inplace: bool) -> tuple[Fn, bool]:
    from solopo_kernels.triton_logprobs import token_logprobs_triton

    def fn(logits, labels):
        return token_logprobs_triton(logits, labels, tp_group=tp_group, inplace_backward=inplace)

    return fn, inplace


def _torch_eager(tp_group) -> tuple[Fn, bool]:
    def fn(logits, labels):
        return torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)

    return fn, False


def _torch_compile(tp_group) -> tuple[Fn, bool]:
    # Built afresh for every shape after torch._dynamo.reset() (see main): one shape's graphs never count
    # towards another's recompile limit, and hitting it raises (fail_on_recompile_limit_hit).
    eager, _ = _torch_eager(tp_group)
    return torch.compile(eager, dynamic=False), False


def _megatron(tp_group) -> tuple[Fn, bool]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def fn(logits, labels):
        return vocab_parallel_cross_entropy(logits[:, None, :], labels[:, None]).squeeze(1)

    return fn, False


def _megatron_fused(tp_group) -> tuple[Fn, bool]:
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    def fn(logits, labels):
        return fused_vocab_parallel_cross_entropy(logits[:, None, :], labels[:, None], tp_group).squeeze(1)

    return fn, False


def _liger(tp_group) -> tuple[Fn, bool]:
    from liger_kernel.transformers import LigerVocabParallelCrossEntropy

    ce = LigerVocabParallelCrossEntropy()

    def fn(logits, labels):
        return ce(logits[:, None, :], labels[:, None], tp_group=tp_group).squeeze(1)

    return fn, False


def _transformer_engine(tp_group) -> tuple[Fn, bool]:
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

    def fn(logits, labels):
        return parallel_cross_entropy(logits[None], labels[None], 0.0, False, tp_group).reshape(-1)

    return fn, False


PROVIDERS: dict[str, Callable] = {
    "solopo_triton": lambda g: _ours(g, inplace=False),
    "solopo_triton_inplace": lambda g: _ours(g, inplace=True),
    "torch_eager": _torch_eager,
    "megatron_vocab_parallel_ce": _megatron,
    "megatron_fused_vocab_parallel_ce": _megatron_fused,
    "liger_vocab_parallel_ce": _liger,
    "transformer_engine_parallel_ce": _transformer_engine,
    "torch_compile": _torch_compile,  # last: its compilation is the slowest part of a shape
}
# Providers that return the cross entropy (the negative log-prob); the check below flips their sign.
RETURNS_CROSS_ENTROPY = frozenset(
    {
        "megatron_vocab_parallel_ce",
        "megatron_fused_vocab_parallel_ce",
        "liger_vocab_parallel_ce",
        "transformer_engine_parallel_ce",
    }
)
CHECKED_ROWS = 1024  # rows compared with an fp32 reference per provider and shape
SMOKE_PROVIDERS = ("solopo_triton", "solopo_triton_inplace", "torch_eager")


# ----------------------------------------------------------------------------- measurement


def _bench(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def copy_bandwidth_gbps(device: str) -> float | None:
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() / ms / 1e6


def make_inputs(tokens: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 logits (std 4, made in bf16: no fp32 [T, V] temporary), labels and an upstream gradient."""
    gen = torch.Generator(device=device).manual_seed(tokens + vocab)
    logits = torch.randn(tokens, vocab, generator=gen, device=device, dtype=torch.bfloat16).mul_(4)
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    grad_out = torch.randn(tokens, device=device, generator=gen)
    return logits, labels, grad_out


def input_bytes(tokens: int, vocab: int, writes_in_place: bool) -> int:
    """The logits and, unless written into them, their gradient: what a provider needs before any workspace."""
    return tokens * vocab * 2 * (1 if writes_in_place else 2)


def _max_error(provider: str, fn: Fn, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Largest |log-prob - fp32 reference| over the first rows: a timed provider also computes the right thing."""
    got = fn(logits, labels)[:CHECKED_ROWS].float()
    if provider in RETURNS_CROSS_ENTROPY:
        got = -got
    head = logits[:CHECKED_ROWS].float()
    want = torch.log_softmax(head, dim=-1).gather(1, labels[:CHECKED_ROWS, None]).squeeze(1)
    return float((got - want).abs().max())


class ModeSkipped(Exception):
    """A mode that could not be measured (out of memory, an error): reported, never dropped."""

    def __init__(self, mode: str, reason: str):
        super().__init__(f"{mode}: {reason}")
        self.mode, self.reason = mode, reason


def measure(provider: str, fn: Fn, inputs: tuple, device: str, skipped: list[dict]) -> list[dict]:
    """Rows for the modes that ran; each mode that did not is appended to ``skipped`` with its reason."""
    logits, labels, grad_out = inputs
    tokens, vocab = logits.shape
    leaf = logits.requires_grad_()
    rows = []

    def row(mode: str, ms: float) -> dict:
        return {
            "provider": provider,
            "tokens": tokens,
            "vocab_local": vocab,
            "mode": mode,
            "ms": ms,
            "GBps": BYTES_PER_LOGIT[mode] * tokens * vocab / ms / 1e6,
            "peak_extra_bytes": None,
            "extra_bytes_per_token": None,
        }

    def timed(mode: str, call: Callable[[], object]) -> float:
        try:
            return _bench(call, device)
        except torch.OutOfMemoryError:
            raise ModeSkipped(mode, "out of memory") from None
        except Exception as error:  # noqa: BLE001  (a baseline that breaks on this shape)
            raise ModeSkipped(mode, f"error: {error!r}"[:300]) from None

    def fwd_bwd():
        # autograd.grad: the gradient the provider returns, without AccumulateGrad's copy into .grad
        torch.autograd.grad(fn(leaf, labels), leaf, grad_out)

    try:
        with torch.no_grad():
            rows.append(row("fwd", timed("fwd", lambda: fn(logits, labels))))
            rows[0]["max_abs_error_vs_fp32"] = _max_error(provider, fn, logits, labels)
        fwd_bwd_ms = timed("fwd+bwd", fwd_bwd)
        rows.append(row("fwd+bwd", fwd_bwd_ms))
        # Backward alone = (forward + backward) - (forward recording autograd state): several baselines
        # modify saved tensors in their backward, so a retained graph cannot be replayed.
        fwd_train_ms = timed("bwd", lambda: fn(leaf, labels))
        rows.append(row("bwd", max(fwd_bwd_ms - fwd_train_ms, 1e-6)))
    except ModeSkipped as skip:
        modes = ("fwd", "fwd+bwd", "bwd")
        for mode in modes[modes.index(skip.mode) :]:  # the modes after it need at least as much
            skipped.append(
                {
                    "provider": provider,
                    "tokens": tokens,
                    "vocab_local": vocab,
                    "mode": mode,
                    "reason": skip.reason,
                }
            )

    if device == "cuda" and any(r["mode"] == "fwd+bwd" for r in rows):
        fwd_bwd_row = next(r for r in rows if r["mode"] == "fwd+bwd")
        fwd_bwd_row["peak_extra_bytes"] = _peak_extra_bytes(fn, leaf, labels, grad_out)
        fwd_bwd_row["extra_bytes_per_token"] = fwd_bwd_row["peak_extra_bytes"] / tokens
    leaf.requires_grad_(False)
    return rows


def _peak_extra_bytes(fn: Fn, leaf: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor) -> int:
    """Peak CUDA memory of one forward+backward beyond its inputs and outputs: the [T] result and the
    gradient, unless that is written into the logits' own storage (an in-place backward)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(leaf, labels)
    (grad,) = torch.autograd.grad(result, leaf, grad_out)
    torch.cuda.synchronize()
    outputs = result.numel() * result.element_size()
    if grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr():
        outputs += grad.numel() * grad.element_size()
    return torch.cuda.max_memory_allocated() - base - outputs


# ----------------------------------------------------------------------------- driver


def _single_rank_group(device: str, megatron: bool):
    """A one-rank process group; with ``megatron``, megatron-core's parallel state over it too."""
    backend = "nccl" if device == "cuda" else "gloo"
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if not megatron:  # no megatron-core baseline asked for: no need to import it
        return dist.new_group([0])
    try:  # Megatron's non-fused CE reads its TP group from parallel_state.
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(1, 1)
    except Exception as error:  # noqa: BLE001  (megatron-core missing or refusing CPU): skip its rows
        print(f"megatron parallel_state unavailable: {error}", file=sys.stderr)
    return dist.new_group([0])


def _versions() -> dict:
    """From the installed distributions' metadata: nothing imported only to read a version."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name, distribution in (
        ("triton", "triton"),
        ("megatron.core", "megatron-core"),
        ("liger_kernel", "liger-kernel"),
        ("transformer_engine", "transformer-engine"),
    ):
        try:
            versions[name] = version(distribution)
        except PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def _commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return sha.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _shapes(args) -> list[tuple[int, int]]:
    if args.tokens or args.vocabs:
        default_tokens, default_vocabs = zip(*SMOKE_SHAPES) if args.smoke else (FULL_TOKENS, FULL_VOCABS)
        return [
            (t, v)
            for t in args.tokens or sorted(set(default_tokens))
            for v in args.vocabs or sorted(set(default_vocabs))
        ]
    if args.smoke:
        return list(SMOKE_SHAPES)
    if args.quick:
        return list(QUICK_SHAPES)
    return [(t, v) for t in FULL_TOKENS for v in FULL_VOCABS]


def _print_row(r: dict, copy_bw: float | None) -> None:
    frac = f" ({r['fraction_of_copy_bandwidth']:.0%} of copy)" if copy_bw else ""
    mem = (
        f", extra {r['extra_bytes_per_token']:.1f} B/token" if r["extra_bytes_per_token"] is not None else ""
    )
    if r.get("max_abs_error_vs_fp32") is not None:
        mem += f", max |error| {r['max_abs_error_vs_fp32']:.1e}"
    print(
        f"{r['provider']:34s} T={r['tokens']:6d} V={r['vocab_local']:6d} {r['mode']:8s} "
        f"{r['ms']:9.3f} ms {r['GBps']:8.1f} GB/s{frac}{mem}",
        flush=True,
    )


OURS = frozenset({"solopo_triton", "solopo_triton_inplace"})
# bf16 logits, fp32 accumulation: log-probs are off the fp32 reference by a few ulps of |lse| (~1e-5
# relative); 1e-2 is far above that and far below what a wrong kernel gives (NaN is over it too).
MAX_ERROR_VS_FP32 = 1e-2


def problems(report: dict) -> list[str]:
    """Why the run is no pass: a provider that failed on a shape other than by memory (out of memory,
    inputs over the free memory: the measurement's limits, not failures), one of ours that did not
    import (an optional baseline may be missing), or no measurement at all. Empty when it passed."""
    found = []
    for entry in report["skipped"]:
        reason = entry["reason"]
        if reason.startswith("error:") or (reason.startswith("unavailable:") and entry["provider"] in OURS):
            where = (
                f" T={entry['tokens']} V={entry['vocab_local']} {entry['mode']}" if "tokens" in entry else ""
            )
            found.append(f"{entry['provider']}{where}: {reason}")
    for row in report["results"]:  # ours must also be right: a fast wrong kernel is no pass
        error = row.get("max_abs_error_vs_fp32")
        if row["provider"] in OURS and error is not None and not error <= MAX_ERROR_VS_FP32:
            found.append(
                f"{row['provider']} T={row['tokens']} V={row['vocab_local']} {row['mode']}: max |error| vs "
                f"fp32 {error:.3g}, over {MAX_ERROR_VS_FP32:g}"
            )
    if not report["results"]:
        found.append("no provider and shape produced a measurement")
    return found


def _skip(report: dict, entry: dict) -> None:
    report["skipped"].append(entry)
    where = (
        f" T={entry['tokens']:6d} V={entry['vocab_local']:6d} {entry.get('mode', '')}"
        if "tokens" in entry
        else ""
    )
    print(f"skip {entry['provider']}{where}: {entry['reason']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreted Triton")
    parser.add_argument("--quick", action="store_true", help=f"CUDA, the shapes {QUICK_SHAPES}")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), help="default: all that import")
    parser.add_argument("--tokens", nargs="+", type=int, help=f"default {FULL_TOKENS}")
    parser.add_argument("--vocabs", nargs="+", type=int, help=f"default {FULL_VOCABS}")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/logprobs-<device>.json)"
    )
    args = parser.parse_args(argv)

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check")
    shapes = _shapes(args)
    providers = args.providers or (SMOKE_PROVIDERS if args.smoke else tuple(PROVIDERS))
    tp_group = _single_rank_group(device, megatron=any(name.startswith("megatron") for name in providers))
    device_name = (
        torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    )
    # A compiled baseline never silently runs eager (the flag's older name is tried for older torch).
    for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(torch._dynamo.config, flag):
            setattr(torch._dynamo.config, flag, True)
            report_flag = flag
            break
    else:
        report_flag = None

    report = {
        "benchmark": "token_logprobs",
        "device": device_name,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "dtype": "bfloat16",
        "copy_bandwidth_GBps": copy_bandwidth_gbps(device),
        "smoke": args.smoke,
        "quick": args.quick,
        "dynamo_recompile_limit_raises": report_flag,
        "shapes": shapes,
        "results": [],
        "skipped": [],
    }
    copy_bw = report["copy_bandwidth_GBps"]
    print(f"device {device_name}; copy bandwidth {copy_bw and round(copy_bw)} GB/s", flush=True)
    slug = "smoke-cpu" if args.smoke else device_name.lower().replace(" ", "-")
    out = args.out or RESULTS / f"logprobs-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    available = []
    for name in providers:
        try:
            PROVIDERS[name](tp_group)
            available.append(name)
        except Exception as error:  # noqa: BLE001  (optional baselines may be missing)
            _skip(report, {"provider": name, "reason": f"unavailable: {error}"})

    for t, v in shapes:
        for name in available:
            torch._dynamo.reset()  # compiled baselines: this shape's graphs only
            fn, in_place = PROVIDERS[name](tp_group)
            need = input_bytes(t, v, in_place)
            free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
            if free is not None and need > free:
                reason = f"its inputs ({need / 2**30:.1f} GiB of bf16 logits and gradient) exceed the free device memory ({free / 2**30:.1f} GiB)"
                for mode in ("fwd", "fwd+bwd", "bwd"):
                    _skip(
                        report,
                        {"provider": name, "tokens": t, "vocab_local": v, "mode": mode, "reason": reason},
                    )
                continue
            skipped: list[dict] = []
            try:
                # Fresh inputs per provider: an in-place backward overwrites its logits with the gradient.
                rows = measure(name, fn, make_inputs(t, v, device), device, skipped)
            except torch.OutOfMemoryError:  # making the inputs, or the peak-memory pass
                rows, skipped = (
                    [],
                    [
                        {
                            "provider": name,
                            "tokens": t,
                            "vocab_local": v,
                            "mode": m,
                            "reason": "out of memory",
                        }
                        for m in ("fwd", "fwd+bwd", "bwd")
                    ],
                )
            for entry in skipped:
                _skip(report, entry)
            for r in rows:
                r["fraction_of_copy_bandwidth"] = r["GBps"] / copy_bw if copy_bw else None
                report["results"].append(r)
                _print_row(r, copy_bw)
            del fn
            if device == "cuda":
                torch.cuda.empty_cache()
            out.write_text(json.dumps(report, indent=1) + "\n")  # a stopped run keeps what it measured

    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    dist.destroy_process_group()
    found = problems(report)
    for problem in found:
        print(f"FAILED: {problem}", flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
