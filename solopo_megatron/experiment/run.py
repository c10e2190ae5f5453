"""``solopo-experiment --config EXPERIMENT.yaml``: train every variant, then write the comparison.

    solopo-experiment --config experiments/paper-small-cpu.yaml          # runs what is not done yet
    solopo-experiment --config experiments/paper-small-cpu.yaml --rerun  # runs every variant again
    solopo-experiment --config experiments/paper-small-cpu.yaml --report-only

Each variant is one ``solopo-train`` process (under ``torchrun --standalone`` when
``nproc_per_node`` > 1) with the base recipe, the experiment's overrides and its own, logging to
``OUTPUT_DIR/runs/NAME/`` (train.log, metrics.jsonl, TensorBoard). Every variant's recipe is
checked before the first one starts. A finished variant keeps its ``summary.json``; running the
experiment again skips it, so an interrupted experiment resumes where it stopped. Finally
``results.json``, ``results.md`` and the plots are written to ``OUTPUT_DIR`` (``report``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..recipe.errors import RecipeError
from ..recipe.loading import load_config
from ..recipe.preflight import folder_problem
from ..recipe.validation import config_problems
from .report import (
    git_commit,
    markdown_table,
    readme_markers,
    summarize_run,
    write_readme_block,
    write_report,
)
from .spec import ExperimentSpec, Variant, load_experiment

SUMMARY = "summary.json"
EVAL_RECORDS = "eval_records.jsonl"  # per held-out record, length and evaluation (logger.eval_records_file)


def variant_command(
    spec: ExperimentSpec, variant: Variant, run_dir: Path, *, saves_checkpoints: bool = False
) -> list[str]:
    """The command line that trains one variant (logging into ``run_dir``; its checkpoints, when the
    recipe saves any, into ``run_dir/checkpoints``, so no variant resumes another's)."""
    launcher = [sys.executable, "-m", "solopo_megatron.train"]
    if spec.nproc_per_node > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(spec.nproc_per_node), "-m", "solopo_megatron.train",
        ]  # fmt: skip
    logging = [
        f"logger.metrics_file={run_dir / 'metrics.jsonl'}",
        f"logger.tensorboard_dir={run_dir / 'tensorboard'}",
    ]
    logging.append(f"logger.eval_records_file={run_dir / EVAL_RECORDS}")
    if saves_checkpoints:
        logging.append(f"checkpoint.save={run_dir / 'checkpoints'}")
    flags = ["--eval-only"] if variant.eval_only else []
    return [*launcher, "--config", str(spec.recipe), *flags, *spec.variant_overrides(variant), *logging]


def check_variants(spec: ExperimentSpec) -> None:
    """``output_dir`` can be written, and every variant's recipe loads and passes the configuration
    checks (before anything runs)."""
    problems = []
    if (problem := folder_problem(spec.output_dir, "output_dir")) is not None:
        problems.append(problem)
    for variant in spec.variants:
        try:
            cfg = load_config(spec.recipe, spec.variant_overrides(variant))
        except ValueError as error:
            problems.append(f"variant {variant.name}: {error}")
            continue
        problems.extend(f"variant {variant.name}: {p}" for p in config_problems(cfg, spec.nproc_per_node))
        if cfg.checkpoint.load:
            problems.append(
                f"variant {variant.name}: checkpoint.load: variants train from the initial weights (set "
                "checkpoint.pretrained_hf to start from a model); remove checkpoint.load"
            )
        if variant.eval_only:
            if not cfg.eval.long_lengths:
                problems.append(f"variant {variant.name}: eval_only: needs eval.long_lengths to evaluate")
        elif not cfg.train.eval_interval:
            problems.append(
                f"variant {variant.name}: train.eval_interval: must be set (the comparison reads evaluations)"
            )
    if problems:
        raise RecipeError(f"{spec.path}:\n  " + "\n  ".join(problems))


def held_out_records(spec: ExperimentSpec, variant: Variant) -> tuple[int | None, int | None]:
    """How many validation records a variant's evaluation scores: at every long length (eval.num_records
    of them), and in the validation pass behind the short accuracy (train.eval_iters x
    train.global_batch_size of them); (None, None) when the validation file cannot be counted."""
    cfg = load_config(spec.recipe, spec.variant_overrides(variant))
    if cfg.dataset.valid_path is None and cfg.dataset.train_path is None:
        count = cfg.dataset.synthetic.num_valid
    elif cfg.dataset.valid_path is not None and Path(cfg.dataset.valid_path).is_file():
        with open(cfg.dataset.valid_path, encoding="utf-8") as handle:
            count = sum(1 for line in handle if line.strip())
    else:
        return None, None
    long = min(count, cfg.eval.num_records) if cfg.eval.num_records else count
    short = min(count, cfg.train.eval_iters * cfg.train.global_batch_size) if cfg.train.eval_iters else count
    return long, short


def _record_counts(spec: ExperimentSpec, variant: Variant) -> dict[str, int | None]:
    long, short = held_out_records(spec, variant)
    return {"held_out_records": long, "valid_records": short}


def run_variant(spec: ExperimentSpec, variant: Variant, run_dir: Path, *, echo: bool = True) -> dict:
    """Trains one variant from scratch; returns its summary (also written to ``run_dir/summary.json``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    saves = bool(load_config(spec.recipe, spec.variant_overrides(variant)).checkpoint.save)
    command = variant_command(spec, variant, run_dir, saves_checkpoints=saves)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        assert process.stdout is not None
        tail: list[str] = []
        for line in process.stdout:
            log.write(line)
            if "records/s" in line or not line.strip():  # tokenisation progress bars: the log keeps them
                continue
            tail = (tail + [line.rstrip()])[-20:]
            if echo:
                print(f"[{variant.name}] {line.rstrip()}", flush=True)
        returncode = process.wait()
    wall = time.perf_counter() - start
    summary = summarize_run(run_dir / "metrics.jsonl", eval_only=variant.eval_only) if returncode == 0 else {}
    summary.update(
        name=variant.name,
        overrides=spec.variant_overrides(variant),
        eval_only=variant.eval_only,
        **_record_counts(spec, variant),
        command=command,
        exit_code=returncode,
        wall_seconds=wall,
        commit=git_commit(),  # the code this variant trained with
    )
    if returncode != 0:
        summary["log_tail"] = tail
    else:
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def run_experiment(spec: ExperimentSpec, *, rerun: bool = False, echo: bool = True) -> list[dict]:
    """Runs the variants that have no summary yet (all with ``rerun``); returns every variant's summary."""
    check_variants(spec)
    summaries = []
    for i, variant in enumerate(spec.variants, 1):
        run_dir = spec.output_dir / "runs" / variant.name
        done = run_dir / SUMMARY
        if done.exists() and not rerun:
            print(f"[{i}/{len(spec.variants)}] {variant.name}: done before, kept ({done})", flush=True)
            summaries.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        doing = "evaluating the initial weights" if variant.eval_only else "training"
        print(f"[{i}/{len(spec.variants)}] {variant.name}: {doing} (log {run_dir / 'train.log'})", flush=True)
        summary = run_variant(spec, variant, run_dir, echo=echo)
        state = "done" if summary["exit_code"] == 0 else f"FAILED (exit {summary['exit_code']})"
        print(
            f"[{i}/{len(spec.variants)}] {variant.name}: {state} in {summary['wall_seconds']:.0f} s",
            flush=True,
        )
        summaries.append(summary)
    return summaries


def finished_summaries(spec: ExperimentSpec) -> list[dict]:
    """Every variant's summary for ``--report-only``: its run folder's, else the one a previous report
    kept in ``results.json`` (run folders are not committed; the report can be redrawn from the JSON)."""
    previous = spec.output_dir / "results.json"
    kept = {}
    if previous.exists():
        variants = json.loads(previous.read_text(encoding="utf-8")).get("variants", [])
        kept = {s["name"]: s for s in variants if s.get("exit_code") == 0}
    summaries = []
    for variant in spec.variants:
        done = spec.output_dir / "runs" / variant.name / SUMMARY
        if done.exists():
            summary = json.loads(done.read_text(encoding="utf-8"))
        elif variant.name in kept:
            summary = kept[variant.name]
        else:
            raise RecipeError(
                f"--report-only: variant {variant.name} has not finished ({done} is missing, and "
                f"{previous} does not list it as finished)"
            )
        if summary.get("valid_records") is None:  # summaries written before the counts were recorded
            summary.update(_record_counts(spec, variant))
        summaries.append(summary)
    return summaries


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="solopo-experiment",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--config", required=True, help="the experiment YAML")
    parser.add_argument("--rerun", action="store_true", help="train every variant again")
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the report from the finished variants"
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the variants' output")
    parser.add_argument(
        "--readme",
        action="append",
        default=[],
        metavar="MARKDOWN",
        help="with compare: rewrite the experiment's block in this Markdown file (between "
        "<!-- experiment:NAME:start --> and <!-- experiment:NAME:end -->; NAME: output_dir's name); repeatable",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``solopo-experiment``; exit 0, 1 if a variant failed, 2 for a bad experiment file or recipe."""
    args = parse_args(argv)
    try:
        spec = load_experiment(args.config)
        if args.report_only:
            summaries = finished_summaries(spec)
        else:
            summaries = run_experiment(spec, rerun=args.rerun, echo=not args.quiet)
    except (RecipeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = write_report(spec, summaries, argv=sys.argv if argv is None else ["solopo-experiment", *argv])
    print(markdown_table(summaries))
    for path in written:
        print(f"wrote {path}")
    for markdown in map(Path, args.readme):
        if spec.compare is None or not write_readme_block(markdown, spec.output_dir / "results.json"):
            start, end = readme_markers(spec.output_dir / "results.json")
            why = "the experiment has no compare:" if spec.compare is None else f"it has no {start} ... {end}"
            print(f"error: --readme {markdown}: not updated ({why})", file=sys.stderr)
            return 2
        print(f"wrote the experiment's block in {markdown}")
    failed = [s["name"] for s in summaries if s["exit_code"] != 0]
    if failed:
        print(f"error: variant(s) failed: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
