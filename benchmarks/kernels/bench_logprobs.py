"""Token log-probs from vocab-parallel logits: ours against the field, on the same shapes in one run.

    python benchmarks/kernels/bench_logprobs.py                 # CUDA: the full grid, results JSON + plot
    python benchmarks/kernels/bench_logprobs.py --smoke         # CPU, tiny shapes (checks the script runs)

Per-rank shapes (T tokens x V_local vocab columns) with a single-rank process group; bf16 logits;
labels all valid (Megatron's CE has no ignore_index). For each provider and shape: median time
(triton.testing.do_bench) of the forward-only pass (no autograd: what a reference-model pass costs),
forward+backward, and the backward alone (forward+backward minus a forward that records autograd state); achieved GB/s against the bytes that must move (2 bytes per
logit forward, 4 backward, 6 both) and its fraction of the measured device copy bandwidth; peak memory
beyond the inputs and outputs (the outputs being the [T] result and, where one is allocated, the
[T, V_local] gradient). Results go to benchmarks/results/logprobs-<device>.json; report.py plots them
and writes the README table.
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
    "torch_compile": _torch_compile,
    "megatron_vocab_parallel_ce": _megatron,
    "megatron_fused_vocab_parallel_ce": _megatron_fused,
    "liger_vocab_parallel_ce": _liger,
    "transformer_engine_parallel_ce": _transformer_engine,
}
SMOKE_PROVIDERS = ("solopo_triton", "solopo_triton_inplace", "torch_eager")


# ----------------------------------------------------------------------------- measurement


def _bench(fn: Callable[[], object], device: str, grad_to_none=None) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        for t in grad_to_none or ():
            t.grad = None
    return sorted(times)[1]


def copy_bandwidth_gbps(device: str) -> float | None:
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() / ms / 1e6


def measure(provider: str, fn: Fn, writes_in_place: bool, tokens: int, vocab: int, device: str) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(tokens + vocab)
    logits = (torch.randn(tokens, vocab, generator=gen, device=device) * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    grad_out = torch.randn(tokens, device=device, generator=gen)
    leaf = logits.requires_grad_()
    rows = []

    def row(mode: str, ms: float, extra_bytes: int | None) -> dict:
        gbps = BYTES_PER_LOGIT[mode] * tokens * vocab / ms / 1e6
        return {
            "provider": provider,
            "tokens": tokens,
            "vocab_local": vocab,
            "mode": mode,
            "ms": ms,
            "GBps": gbps,
            "peak_extra_bytes": extra_bytes,
            "extra_bytes_per_token": None if extra_bytes is None else extra_bytes / tokens,
        }

    with torch.no_grad():
        rows.append(row("fwd", _bench(lambda: fn(logits, labels), device), None))

    def fwd_bwd():
        fn(leaf, labels).backward(grad_out)

    fwd_bwd_ms = _bench(fwd_bwd, device, grad_to_none=[leaf])
    rows.append(row("fwd+bwd", fwd_bwd_ms, None))
    # Backward alone = (forward + backward) - (forward recording autograd state): several baselines
    # modify saved tensors in their backward, so a retained graph cannot be replayed.
    fwd_train_ms = _bench(lambda: fn(leaf, labels), device)
    rows.append(row("bwd", max(fwd_bwd_ms - fwd_train_ms, 1e-6), None))
    leaf.grad = None

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn(leaf, labels)
        result.backward(grad_out)
        torch.cuda.synchronize()
        outputs = result.numel() * result.element_size()
        if not writes_in_place:
            outputs += leaf.grad.numel() * leaf.grad.element_size()
        rows[1]["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base - outputs
        rows[1]["extra_bytes_per_token"] = rows[1]["peak_extra_bytes"] / tokens
    return rows


# ----------------------------------------------------------------------------- driver


def _single_rank_group(device: str):
    backend = "nccl" if device == "cuda" else "gloo"
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:  # Megatron's non-fused CE reads its TP group from parallel_state.
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(1, 1)
    except Exception as error:  # noqa: BLE001  (megatron-core missing or refusing CPU): skip its rows
        print(f"megatron parallel_state unavailable: {error}", file=sys.stderr)
    return dist.new_group([0])


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "megatron.core", "liger_kernel", "transformer_engine"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreted Triton")
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
    tokens = args.tokens or ((64, 128) if args.smoke else FULL_TOKENS)
    vocabs = args.vocabs or ((512,) if args.smoke else FULL_VOCABS)
    providers = args.providers or (SMOKE_PROVIDERS if args.smoke else tuple(PROVIDERS))
    tp_group = _single_rank_group(device)
    device_name = (
        torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    )

    report = {
        "benchmark": "token_logprobs",
        "device": device_name,
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "dtype": "bfloat16",
        "copy_bandwidth_GBps": copy_bandwidth_gbps(device),
        "smoke": args.smoke,
        "results": [],
        "skipped": [],
    }
    copy_bw = report["copy_bandwidth_GBps"]
    print(f"device {device_name}; copy bandwidth {copy_bw and round(copy_bw)} GB/s", flush=True)

    built = {}
    for name in providers:
        try:
            built[name] = PROVIDERS[name](tp_group)
        except Exception as error:  # noqa: BLE001  (optional baselines may be missing)
            report["skipped"].append({"provider": name, "reason": f"unavailable: {error}"})
            print(f"skip {name}: {error}", flush=True)

    for t in tokens:
        for v in vocabs:
            for name, (fn, in_place) in built.items():
                try:
                    rows = measure(name, fn, in_place, t, v, device)
                except torch.OutOfMemoryError:
                    report["skipped"].append(
                        {"provider": name, "tokens": t, "vocab_local": v, "reason": "out of memory"}
                    )
                    print(f"{name:34s} T={t:6d} V={v:6d}: out of memory", flush=True)
                    rows = []
                except Exception as error:  # noqa: BLE001
                    report["skipped"].append(
                        {"provider": name, "tokens": t, "vocab_local": v, "reason": repr(error)}
                    )
                    print(f"{name:34s} T={t:6d} V={v:6d}: error {error!r}", flush=True)
                    rows = []
                for r in rows:
                    r["fraction_of_copy_bandwidth"] = r["GBps"] / copy_bw if copy_bw else None
                    report["results"].append(r)
                    frac = f" ({r['fraction_of_copy_bandwidth']:.0%} of copy)" if copy_bw else ""
                    mem = (
                        f", extra {r['extra_bytes_per_token']:.1f} B/token"
                        if r["extra_bytes_per_token"] is not None
                        else ""
                    )
                    print(
                        f"{name:34s} T={t:6d} V={v:6d} {r['mode']:8s} {r['ms']:9.3f} ms {r['GBps']:8.1f} GB/s{frac}{mem}",
                        flush=True,
                    )
                if device == "cuda":
                    torch.cuda.empty_cache()

    slug = "smoke-cpu" if args.smoke else device_name.lower().replace(" ", "-")
    out = args.out or RESULTS / f"logprobs-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
