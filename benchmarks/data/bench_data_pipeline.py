"""Records/s and peak memory of validating, tokenising (into the cache) and packing SoLoPO data.

    python benchmarks/data/bench_data_pipeline.py                       # 10K, 30K and 100K records
    python benchmarks/data/bench_data_pipeline.py --sizes 2000 --out /tmp/x.json

For each file size every stage runs in a fresh subprocess, so its peak resident memory (VmHWM)
is that stage's alone; the claim to check is that the peak does not grow with the file size.
Records are synthetic (solopo-data synthetic) with the bundled tiny tokenizer, mode solopo
(3 sequences per example). Results: benchmarks/results/data-pipeline-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("validate", "tokenize", "pack")


def run_stage(stage: str, data: str, cache: str, max_tokens: int) -> dict:
    """Runs in the child process: one stage over the whole file."""
    from solopo_megatron.data.dataset import TokenizedDataset
    from solopo_megatron.data.loading import GlobalBatchSampler, step_microbatches
    from solopo_megatron.data.packing import pad_multiple_for
    from solopo_megatron.data.records import validate_file
    from solopo_megatron.data.tokenize import SequenceEncoder, load_tokenizer
    from solopo_megatron.objectives import SoLoPOConfig, required_roles

    roles = required_roles(SoLoPOConfig())
    baseline_kib = _status_kib("VmRSS")  # after the imports: what the stage itself adds is on top
    start = time.perf_counter()
    if stage == "validate":
        report = validate_file(data)
        count = report.num_records
    else:
        encoder = SequenceEncoder(load_tokenizer("tiny"))
        dataset, report = TokenizedDataset.build(data, encoder, roles, cache_dir=cache, progress=False)
        count = len(dataset)
        if stage == "pack":
            start = time.perf_counter()  # the cache exists: time the packing alone
            sampler = GlobalBatchSampler(len(dataset), 64, seed=0)
            microbatches = 0
            for step in range(sampler.steps_per_epoch):
                microbatches += len(
                    step_microbatches(
                        dataset,
                        sampler.batch(step),
                        roles,
                        max_tokens=max_tokens,
                        pad_multiple=pad_multiple_for(2),
                        pad_id=0,
                        dp_size=1,
                    )
                )
            count = sampler.steps_per_epoch * 64
    seconds = time.perf_counter() - start
    return {
        "stage": stage,
        "records": count,
        "seconds": seconds,
        "records_per_s": count / seconds,
        "peak_rss_MiB": _status_kib("VmHWM") / 1024,
        "rss_after_imports_MiB": baseline_kib / 1024,
    }


def _status_kib(key: str) -> int:
    """A /proc/self/status memory figure. VmHWM, unlike ru_maxrss, is not inherited from the parent
    across fork + exec, so it is the stage's own peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 30_000, 100_000])
    parser.add_argument("--long-target-words", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(*args.child, max_tokens=args.max_tokens)))
        return 0

    from solopo_megatron.data.synthetic import generate_synthetic_records, write_jsonl

    # Record i depends only on (seed, i), so the smaller files are prefixes of the largest.
    all_records = generate_synthetic_records(
        max(args.sizes), seed=0, long_target_words=args.long_target_words
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            data = Path(tmp) / f"train-{size}.jsonl"
            write_jsonl(all_records[:size], data)
            file_mib = data.stat().st_size / 2**20
            cache = Path(tmp) / f"cache-{size}"
            for stage in STAGES:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    stage,
                    str(data),
                    str(cache),
                    "--max-tokens",
                    str(args.max_tokens),
                ]
                out = (
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                row = {"file_records": size, "file_MiB": round(file_mib, 1), **json.loads(out)}
                results.append(row)
                print(
                    f"{size:7d} records ({file_mib:6.1f} MiB) {stage:9s} {row['records_per_s']:9.0f} records/s "
                    f"peak RSS {row['peak_rss_MiB']:7.1f} MiB (after imports {row['rss_after_imports_MiB']:.1f})",
                    flush=True,
                )

    report = {
        "benchmark": "data_pipeline",
        "device": f"cpu: {platform.processor() or platform.machine()}, {_cpu_count()} cores",
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "settings": {
            "mode": "solopo",
            "tokenizer": "tiny",
            "long_target_words": args.long_target_words,
            "max_tokens": args.max_tokens,
            "global_batch_size": 64,
        },
        "results": results,
    }
    out = args.out or ROOT / "benchmarks" / "results" / "data-pipeline-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }


def _commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return sha.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
