"""Shared prompts as a user runs them: ``solopo-ref-logps`` and ``solopo-train`` with
``dataset.share_prompt=true`` and ``false``, back to back on this machine.

    python benchmarks/long_context/shared_prompt_run.py            # both checks, about 10 minutes on 2 cores
    python benchmarks/long_context/shared_prompt_run.py --smoke    # tiny sizes, about a minute

1. **Stores.** long_po on the tiny recipe with a synthetic long context of ``--store-words`` words
   (default 6,400): the reference store written with prompts shared and not, in one process and with
   ``torchrun --nproc-per-node 2`` at ``model.context_parallel_size=2``; the largest difference of a
   per-sequence sum (target: at most 1e-4).
2. **Training.** A ``--steps``-step long_po run (DPO: its reference pass included) at about
   ``--train-tokens`` tokens of long context (default 16K), one process, the benchmark model of
   ``bench_step.py`` (2 layers, hidden 256) on the tiny tokenizer: wall time of the whole command and
   its peak RSS, shared and unshared, alternating ``--repeats`` times; the ratios of the medians
   (targets: at most 0.75 of the wall time and 0.85 of the peak RSS).

Results: benchmarks/results/shared-prompt-run-<device>.json (device, versions, date, commit, every run).
The exit status is 1 when a target is missed or a command fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
TOKENS_PER_WORD = 1.21  # the tiny tokenizer on synthetic long contexts (14,600 tokens for 12,047 words)
TARGETS = {"store_difference": 1e-4, "wall_ratio": 0.75, "rss_ratio": 0.85}
MODEL = [  # bench_step.py's CPU model
    "model.num_layers=2",
    "model.hidden_size=256",
    "model.ffn_hidden_size=688",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
]


def measured(command: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Runs ``command`` in a child Python that reports the command's wall time and the peak RSS of its
    processes (its own getrusage of its children: this run's alone), and returns both."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.monotonic()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.monotonic() - start\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rc': done.returncode, 'wall_s': wall, 'peak_rss_gib': peak / 2**20, "
        "'stderr': done.stderr[-2000:], 'stdout': done.stdout[-4000:]}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command], env=env, cwd=cwd, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def launcher(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "--no-python",
    ]


def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # torch kernels: fast on CPU
    env["SOLOPO_KERNELS"] = "torch"
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def store_check(work: Path, words: int, processes: int) -> dict:
    """The largest per-sequence difference between the stores written shared and unshared."""
    from solopo_megatron.data.reference_store import load_reference_store

    stores, runs = {}, {}
    for share in ("false", "true"):
        store = work / f"store-{processes}-{share}.jsonl"
        overrides = [
            "solopo.mode=long_po",
            f"model.context_parallel_size={processes}",
            f"dataset.share_prompt={share}",
            "dataset.synthetic.num_train=4",
            "dataset.synthetic.num_valid=2",
            f"dataset.synthetic.long_target_words={words}",
            f"dataset.max_tokens={_row_budget(words, processes)}",
            f"dataset.cache_dir={work / 'cache'}",
            f"solopo.reference_store={store}",
        ]
        run = measured(
            [*launcher(processes), "solopo-ref-logps", "--config", str(RECIPE), *overrides],
            child_environment(),
            work,
        )
        if run["rc"]:
            raise SystemExit(f"solopo-ref-logps failed (share_prompt={share}):\n{run['stderr']}")
        runs[share] = {"wall_s": run["wall_s"], "peak_rss_gib": run["peak_rss_gib"]}
        stores[share] = load_reference_store(store).values
    difference = max(
        abs(stores["true"][example][role] - value)
        for example, roles in stores["false"].items()
        for role, value in roles.items()
    )
    return {"processes": processes, "words": words, "sums": sum(map(len, stores["false"].values())),
            "largest_difference": difference, "runs": runs}  # fmt: skip


def _row_budget(words: int, cp: int) -> int:
    """A row budget that holds one unshared long_po group of ``words`` words (a multiple of 2 x cp)."""
    tokens = int(2.4 * TOKENS_PER_WORD * words) + 1024
    return -(-tokens // (2 * cp)) * (2 * cp)


def training_runs(work: Path, tokens: int, steps: int, repeats: int) -> dict:
    """Wall time and peak RSS of ``steps``-step long_po runs, shared and unshared, alternating."""
    words = int(tokens / TOKENS_PER_WORD)
    common = [
        *MODEL,
        "solopo.mode=long_po",
        "model.context_parallel_size=1",
        "train.global_batch_size=1",
        f"train.train_iters={steps}",
        "train.log_interval=1",
        "scheduler.lr_warmup_iters=0",
        "train.eval_interval=null",
        f"dataset.synthetic.num_train={steps}",
        "dataset.synthetic.num_valid=1",
        f"dataset.synthetic.long_target_words={words}",
        f"dataset.max_tokens={_row_budget(words, 1)}",
        f"dataset.cache_dir={work / 'cache'}",
    ]
    # Tokenise once first (the reference pass fills the cache), so neither variant pays for it.
    warm = measured(
        [*launcher(1), "solopo-ref-logps", "--config", str(RECIPE), *common,
         f"solopo.reference_store={work / 'warm-up.jsonl'}"],
        child_environment(), work,
    )  # fmt: skip
    runs: dict[str, list[dict]] = {"false": [], "true": []}
    for repeat in range(repeats):
        for share in ("false", "true"):
            save = work / f"run-{share}-{repeat}"
            overrides = [*common, f"dataset.share_prompt={share}", f"checkpoint.save={save}",
                         f"solopo.reference_store={save}/ref.jsonl"]  # fmt: skip
            run = measured(
                [*launcher(1), "solopo-train", "--config", str(RECIPE), *overrides], child_environment(), work
            )
            if run["rc"]:
                raise SystemExit(f"solopo-train failed (share_prompt={share}):\n{run['stderr']}")
            first = next(
                (line for line in run["stdout"].splitlines() if line.startswith("solopo-train: world")), ""
            )
            runs[share].append(
                {"wall_s": run["wall_s"], "peak_rss_gib": run["peak_rss_gib"], "first_line": first}
            )
            print(
                f"  share_prompt={share}: {run['wall_s']:.1f} s, peak RSS {run['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    median = {
        share: {key: statistics.median(r[key] for r in rows) for key in ("wall_s", "peak_rss_gib")}
        for share, rows in runs.items()
    }
    return {
        "long_context_tokens": tokens,
        "long_target_words": words,
        "steps": steps,
        "warm_up_rc": warm["rc"],
        "runs": runs,
        "median": median,
        "wall_ratio": median["true"]["wall_s"] / median["false"]["wall_s"],
        "rss_ratio": median["true"]["peak_rss_gib"] / median["false"]["peak_rss_gib"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store-words", type=int, default=6400)
    p.add_argument("--train-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="shared/unshared pairs of training runs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script (no JSON written)")
    p.add_argument(
        "--out", type=Path, help="the JSON (default: benchmarks/results/shared-prompt-run-cpu.json)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.store_words, args.train_tokens, args.repeats = 200, 1024, 1
    sys.path.insert(0, str(HERE))
    from bench_step import environment

    report = {"benchmark": "shared_prompt_run", **environment("cpu"), "targets": TARGETS}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["stores"] = []
        for processes in (1, 2):
            print(f"stores: {args.store_words} words, {processes} process(es)", flush=True)
            report["stores"].append(store_check(work, args.store_words, processes))
            print(f"  largest difference {report['stores'][-1]['largest_difference']:.2e}", flush=True)
        print(
            f"training: {args.steps} long_po steps at about {args.train_tokens} tokens of long context",
            flush=True,
        )
        report["training"] = training_runs(work, args.train_tokens, args.steps, args.repeats)
    report["seconds"] = time.monotonic() - start
    training = report["training"]
    report["passed"] = {
        "stores": all(s["largest_difference"] <= TARGETS["store_difference"] for s in report["stores"]),
        "wall": training["wall_ratio"] <= TARGETS["wall_ratio"],
        "rss": training["rss_ratio"] <= TARGETS["rss_ratio"],
    }
    print(
        f"wall ratio {training['wall_ratio']:.2f} (target <= {TARGETS['wall_ratio']}), peak RSS ratio "
        f"{training['rss_ratio']:.2f} (target <= {TARGETS['rss_ratio']}); {report['passed']}"
    )
    if not args.smoke:
        out = args.out or RESULTS / "shared-prompt-run-cpu.json"
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0 if all(report["passed"].values()) or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
