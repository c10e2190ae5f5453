"""The experiment's comparison: per-variant summaries from the metrics files, then ``results.json``
(with date, commit, machine and versions), a Markdown table and the plots."""

from __future__ import annotations

import datetime
import json
import math
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .paired import compare_runs, length_order, wilson_interval
from .spec import ExperimentSpec

_LONG_KEY = re.compile(r"^long@(?P<label>[^/]+)/(?P<metric>.+)$")


def summarize_run(metrics_file: Path, *, eval_only: bool = False) -> dict[str, Any]:
    """One run's numbers from its metrics file: the final and best evaluation (short accuracy and, per
    long length, accuracy, answer accuracy, SoLo-RA gap), tokens, examples, train seconds, peak memory.
    ``eval_only``: a run that only evaluated (its one evaluation is both first and final)."""
    entries = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line]
    evals = [(e["step"], e["eval"]) for e in entries if e.get("eval")]
    trained = [e["train"] for e in entries if "train" in e]
    if not evals or not (trained or eval_only):
        raise ValueError(f"{metrics_file}: no training steps or no evaluation recorded")
    last_step, last = evals[-1]
    after_training = [(step, result) for step, result in evals if step > 0] or evals
    lengths: dict[str, dict[str, Any]] = {}
    for key, value in last.items():
        match = _LONG_KEY.match(key)
        if match:
            lengths.setdefault(match["label"], {})[f"final_{match['metric']}"] = value
    for label, values in lengths.items():
        for metric in ("accuracy", "answer_accuracy"):
            series = [r[f"long@{label}/{metric}"] for _, r in after_training if f"long@{label}/{metric}" in r]
            if series:
                values[f"best_{metric}"] = max(series)
    short = [r["accuracy/short"] for _, r in after_training if "accuracy/short" in r]
    return {
        "steps": last_step,
        "evaluations": [step for step, _ in evals],
        "final_short_accuracy": last.get("accuracy/short"),
        "best_short_accuracy": max(short) if short else None,
        "final_valid_long_accuracy": last.get("accuracy/long"),
        "long": lengths,
        "tokens": sum(t.get("tokens", 0.0) for t in trained),
        "train_seconds": max((t.get("train_seconds", 0.0) for t in trained), default=None),
        "peak_mem_gib": max((t["peak_mem_gib"] for t in trained if "peak_mem_gib" in t), default=None),
        "history": [{"step": step, **result} for step, result in evals],
    }


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: host, CPU, accelerator and library versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": _cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - informational only
        info["megatron_core"] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def git_commit(folder: Path | None = None) -> str | None:
    """HEAD of the repository holding ``folder`` (default: this package's code), +dirty if modified."""
    folder = folder or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "")


def length_labels(summaries: Sequence[dict]) -> list[str]:
    """The evaluated lengths, shortest first (token counts by value, multiples by factor)."""
    return sorted({label for s in summaries for label in s.get("long", {})}, key=length_order)


def markdown_table(summaries: Sequence[dict]) -> str:
    """One row per variant: final long-context accuracy (and answer accuracy) per length, short
    accuracy, SoLo-RA gap at the longest length, tokens, train time, wall time, peak memory."""
    labels = length_labels(summaries)
    header = ["variant", "short acc"]
    header += [f"long acc @{label}" for label in labels]
    header += [f"answer acc @{label}" for label in labels]
    header += [f"\\|gap\\| @{labels[-1]}" if labels else "gap", "tokens (M)", "train s", "wall s", "peak GiB"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        if s.get("exit_code"):
            rows.append(f"| {s['name']} | failed (exit {s['exit_code']}) |" + " |" * (len(header) - 2))
            continue
        long = s.get("long", {})
        cells = [s["name"], _fmt(s.get("final_short_accuracy"))]
        cells += [_fmt(long.get(label, {}).get("final_accuracy")) for label in labels]
        cells += [_fmt(long.get(label, {}).get("final_answer_accuracy")) for label in labels]
        cells.append(_fmt(long.get(labels[-1], {}).get("final_solo_ra_gap_abs")) if labels else "")
        cells += [
            _fmt(s.get("tokens", 0) / 1e6, 2),
            _fmt(s.get("train_seconds"), 0),
            _fmt(s.get("wall_seconds"), 0),
            _fmt(s.get("peak_mem_gib"), 2),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


_LOSS_COLOURS = {"dpo": "tab:blue", "simpo": "tab:orange", "orpo": "tab:green"}
_MODE_STYLES = {"solopo": "-", "short_po": ":", "long_po": "--"}


def _style(name: str) -> dict[str, Any]:
    """Colour by preference loss, line style by mode, read from the variant's overrides or name."""
    parts = name.split("-")
    return {
        "color": next((_LOSS_COLOURS[p] for p in parts if p in _LOSS_COLOURS), None),
        "linestyle": next((_MODE_STYLES[p] for p in parts if p in _MODE_STYLES), "-."),
    }


def _interval_errors(values: Sequence[float], counts: Sequence[int | None]) -> list[list[float]]:
    """Asymmetric error bars (below, above) of the 95% Wilson interval of each accuracy over its count of
    records; none (0) where the count is unknown."""
    below, above = [], []
    for value, n in zip(values, counts):
        if not n or value is None or math.isnan(value):
            below.append(0.0)
            above.append(0.0)
            continue
        low, high = wilson_interval(round(value * n), n)
        below.append(max(0.0, value - low))  # max: the interval's clipped end may round past the value
        above.append(max(0.0, high - value))
    return [below, above]


def plot_results(summaries: Sequence[dict], folder: Path) -> list[Path]:
    """accuracy_vs_length.png (reward accuracy from the short context to the longest evaluated length,
    and answer accuracy, per variant) and cost.png (train time, tokens and peak memory per variant).
    Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in summaries if not s.get("exit_code")]
    labels = length_labels(ok)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, metric, title, with_short in (
        (axes[0], "final_accuracy", "reward accuracy (chosen above rejected)", True),
        (axes[1], "final_answer_accuracy", "answer accuracy (gold answer most likely)", False),
    ):
        ticks = (["short"] if with_short else []) + labels
        for s in ok:
            values = [s["long"].get(label, {}).get(metric, math.nan) for label in labels]
            if with_short:
                values = [s.get("final_short_accuracy", math.nan), *values]
            counts = [s.get("held_out_records")] * len(labels)
            if with_short:
                counts = [s.get("valid_records"), *counts]
            errors = _interval_errors(values, counts)
            ax.errorbar(
                ticks, values, yerr=errors, marker="o", capsize=3, label=s["name"], **_style(s["name"])
            )
        ax.axhline(0.5, color="gray", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("evaluated context (short, then multiples of the long context)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final accuracy (held-out; bars: 95% Wilson interval)")
    axes[1].legend(fontsize=7, ncol=1, loc="best")
    fig.tight_layout()
    written.append(folder / "accuracy_vs_length.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [s["name"] for s in ok]
    colours = [_style(name)["color"] or "tab:blue" for name in names]
    for ax, key, title, scale in (
        (axes[0], "train_seconds", "training time (s, steps only)", 1.0),
        (axes[1], "tokens", "tokens processed (M)", 1e-6),
        (axes[2], "peak_mem_gib", "peak memory (GiB; max RSS on CPU)", 1.0),
    ):
        ax.bar(names, [(s.get(key) or 0.0) * scale for s in ok], color=colours)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    written.append(folder / "cost.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(spec: ExperimentSpec, summaries: Sequence[dict], *, argv: Sequence[str]) -> list[Path]:
    """``results.json``, ``results.md`` and (with matplotlib) the plots in the output folder."""
    folder = spec.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    previous = folder / "results.json"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = {
        "experiment": str(spec.path),
        "recipe": str(spec.recipe),
        "command": " ".join(argv),
        "report_command": " ".join(argv),
        "date": now,
        "report_date": now,
        "commit": git_commit(),  # the code that wrote the report; each variant records its own
        "machine": machine_info(),
        "total_wall_seconds": sum(s.get("wall_seconds", 0.0) for s in summaries),
    }
    if "--report-only" in argv and previous.exists():  # a redraw: keep when, where and how it was run
        kept = json.loads(previous.read_text(encoding="utf-8"))
        header.update({key: kept[key] for key in ("command", "date", "machine") if key in kept})
    results = {**header, "base_model": base_model(spec), "variants": list(summaries)}
    written = [folder / "results.json"]
    if spec.compare is not None:
        rows = collect_records(spec)
        written.append(folder / RECORDS)
        write_jsonl_rows(rows, written[-1])
        try:
            results["comparison"] = compare_runs(spec.compare, rows)
            results["comparison"]["cost"] = cost_ratio(
                summaries, spec.compare.treatment, spec.compare.control
            )
        except ValueError as error:  # an arm failed or was not evaluated: the rest of the report stands
            print(f"warning: no paired comparison: {error}")
            results["comparison_error"] = str(error)
    written[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    machine = header["machine"]
    trained_at = sorted({s["commit"] for s in summaries if s.get("commit")}) or ["unknown"]
    lines = [
        f"Experiment `{spec.path.name}` on {machine['cpu'] or machine['platform']} "
        f"({machine['cpu_count']} cores{', ' + machine['gpu'] if machine['gpu'] else ''}), torch "
        f"{machine['torch']}; variants trained at commit {', '.join(trained_at)}, "
        f"{header['total_wall_seconds'] / 60:.1f} min in all; run reported {header['date']}, this report written {header['report_date']}.",
        "",
        markdown_table(summaries),
    ]
    if "comparison" in results:
        lines += ["", comparison_markdown(results["comparison"])]
    written.append(folder / "results.md")
    written[-1].write_text("\n".join(lines), encoding="utf-8")
    try:
        written += plot_results(summaries, folder)
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
    return written


RECORDS = "records.jsonl"  # beside results.json: every variant's per-record rows (committed with it)


def collect_records(spec: ExperimentSpec) -> list[dict]:
    """Every variant's per-record evaluation rows, tagged with the variant: from its run folder
    (``runs/NAME/eval_records.jsonl``), else from the ``records.jsonl`` a previous report wrote."""
    kept: dict[str, list[dict]] = {}
    previous = spec.output_dir / RECORDS
    if previous.exists():
        for line in previous.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                kept.setdefault(row["variant"], []).append(row)
    rows = []
    for variant in spec.variants:
        path = spec.output_dir / "runs" / variant.name / "eval_records.jsonl"
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            rows += [{"variant": variant.name, **json.loads(line)} for line in lines if line.strip()]
        else:
            rows += kept.get(variant.name, [])
    return rows


def write_jsonl_rows(rows: Sequence[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")


def base_model(spec: ExperimentSpec) -> str | None:
    """The recipe's ``checkpoint.pretrained_hf`` as written (None: the variants start from random weights)."""
    import yaml

    raw = yaml.safe_load(spec.recipe.read_text(encoding="utf-8")) or {}
    return ((raw.get("checkpoint") or {}).get("pretrained_hf")) or None


def cost_ratio(summaries: Sequence[dict], treatment: str, control: str) -> dict[str, Any]:
    """Train seconds and tokens of ``treatment`` over ``control``'s (from the same run)."""
    by_name = {s["name"]: s for s in summaries}
    out: dict[str, Any] = {}
    for key in ("train_seconds", "tokens"):
        a, b = by_name.get(treatment, {}).get(key), by_name.get(control, {}).get(key)
        out[key] = {treatment: a, control: b, "ratio": a / b if a and b else None}
    return out


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The paired comparison as a table per length, and the verdict."""
    spec = comparison["spec"]
    t, c = spec["treatment"], spec["control"]
    level = f"{spec['confidence']:.0%}"
    lines = [
        f"Paired comparison ({t} vs {c}; pre-registered, `compare:` in the experiment file). "
        f"Verdict at the primary length {comparison['primary_length']}: **{comparison['verdict']}**.",
        "",
        f"| length | records | {t} step 0 | {t} final | {c} step 0 | {c} final | gain {t} (z) | gain {c} (z) "
        f"| {t} - {c} | {level} interval | one-sided {level} bounds | McNemar p | verdict |",
        "|" + "---|" * 13,
    ]
    for length, entry in comparison["lengths"].items():
        acc, gain, diff = entry["accuracy"], entry["gain_over_step0"], entry["difference"]
        lines.append(
            f"| {length} | {entry['records']} | {acc[t]['step0']['accuracy']:.3f} | {acc[t]['final']['accuracy']:.3f} "
            f"| {acc[c]['step0']['accuracy']:.3f} | {acc[c]['final']['accuracy']:.3f} "
            f"| {gain[t]['mean']:+.3f} ({gain[t]['z']:.1f}) | {gain[c]['mean']:+.3f} ({gain[c]['z']:.1f}) "
            f"| {diff['mean']:+.3f} | [{diff['interval'][0]:+.3f}, {diff['interval'][1]:+.3f}] "
            f"| >= {diff['lower_one_sided']:+.3f}, <= {diff['upper_one_sided']:+.3f} | {diff['mcnemar_p']:.3g} "
            f"| {entry['verdict']} |"
        )
    cost = comparison.get("cost") or {}
    ratios = [
        f"{key.replace('_', ' ')} x{value['ratio']:.2f}" for key, value in cost.items() if value.get("ratio")
    ]
    if ratios:
        lines += ["", f"Cost, {t} / {c}: " + ", ".join(ratios) + "."]
    return "\n".join(lines) + "\n"


def readme_markers(results_file: Path) -> tuple[str, str]:
    """The markers around an experiment's block in a Markdown file (named by its results folder)."""
    name = results_file.parent.name
    return f"<!-- experiment:{name}:start -->", f"<!-- experiment:{name}:end -->"


def comparison_readme_block(results: dict[str, Any], results_file: Path) -> str:
    """The Markdown block that reports a compared experiment: every figure comes from ``results`` (the
    committed results.json) and ``probe.json`` beside it, so a test can regenerate and compare it."""
    comparison = results["comparison"]
    spec = comparison["spec"]
    t, c = spec["treatment"], spec["control"]
    by_name = {s["name"]: s for s in results["variants"]}
    level = f"{spec['confidence']:.0%}"
    commits = sorted({s["commit"][:7] for s in results["variants"] if s.get("commit")})
    first = by_name[t]
    records = comparison["lengths"][comparison["primary_length"]]["records"]
    lines = [
        f"From **{results.get('base_model') or 'random weights'}**, {records} held-out "
        f"records, paired (both arms scored on the same records); variants trained at commit "
        f"{', '.join(commits)} on {results['machine'].get('cpu') or results['machine']['platform']} "
        f"({results['machine']['cpu_count']} cores), {results['date'][:10]}. Reward accuracy (chosen above "
        f"rejected), {level} Wilson intervals in brackets; gains over step 0 and the difference are paired "
        f"per record (bootstrap of {spec['bootstrap_samples']:,} resamples; McNemar's exact test).",
        "",
        f"| context | step 0 | {t} | {c} | {t} - {c} [{level}] | one-sided {level} bounds | McNemar p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, entry in comparison["lengths"].items():
        acc, gain, diff = entry["accuracy"], entry["gain_over_step0"], entry["difference"]
        tokens = first["long"].get(length, {}).get("final_context_tokens")
        start = acc[t]["step0"]
        step0 = _acc_cell(start)
        if acc[c]["step0"]["accuracy"] != start["accuracy"] or not spec.get("baseline"):
            step0 = f"{_acc_cell(start)} / {_acc_cell(acc[c]['step0'])}"
        lines.append(
            f"| {length}" + (f" (~{tokens:.0f} tokens)" if tokens else "") + f" | {step0} "
            f"| {_acc_cell(acc[t]['final'])}, {gain[t]['mean']:+.3f} (z {gain[t]['z']:.1f}) "
            f"| {_acc_cell(acc[c]['final'])}, {gain[c]['mean']:+.3f} (z {gain[c]['z']:.1f}) "
            f"| {diff['mean']:+.3f} [{diff['interval'][0]:+.3f}, {diff['interval'][1]:+.3f}] "
            f"| >= {diff['lower_one_sided']:+.3f}, <= {diff['upper_one_sided']:+.3f} | {diff['mcnemar_p']:.2g} "
            f"| {entry['verdict']} |"
        )
    primary = comparison["lengths"][comparison["primary_length"]]
    short = primary["accuracy"]
    lines.append(
        f"| short (same records) | {short[t]['step0']['short_accuracy']:.3f} | {short[t]['final']['short_accuracy']:.3f} "
        f"| {short[c]['final']['short_accuracy']:.3f} | | | | |"
    )
    cost = comparison.get("cost") or {}
    seconds, tokens = cost.get("train_seconds", {}), cost.get("tokens", {})
    lines += [
        "",
        f"**Verdict** (pre-registered rule, primary length {comparison['primary_length']}): "
        f"**{comparison['verdict']}**."
        + (
            f" Cost, {t} / {c}: training time x{seconds['ratio']:.2f} ({seconds[t]:.0f} s vs {seconds[c]:.0f} s), "
            f"tokens x{tokens['ratio']:.2f} ({tokens[t] / 1e6:.2f}M vs {tokens[c] / 1e6:.2f}M)."
            if seconds.get("ratio") and tokens.get("ratio")
            else ""
        ),
    ]
    probe_file = results_file.parent / "probe.json"
    if probe_file.exists():
        probe = json.loads(probe_file.read_text(encoding="utf-8"))
        sizes = "; ".join(
            f"~{row['long_tokens']:.0f} tokens: short {row['short_accuracy']:.3f}, long {row['long_accuracy']:.3f}"
            for row in probe["sizes"]
        )
        lines += [
            "",
            f"Go/no-go probe before the run (the base model, {probe['sizes'][0]['records']} records, "
            f"`probe.json`): {sizes}.",
        ]
    return "\n".join(lines) + "\n"


def _acc_cell(entry: dict[str, Any]) -> str:
    low, high = entry["interval"]
    return f"{entry['accuracy']:.3f} [{low:.2f}, {high:.2f}]"


def write_readme_block(markdown: Path, results_file: Path) -> bool:
    """Replaces the block between the experiment's markers in ``markdown``; False if it has no markers."""
    start, end = readme_markers(results_file)
    text = markdown.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return False
    results = json.loads(results_file.read_text(encoding="utf-8"))
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    block = comparison_readme_block(results, results_file)
    markdown.write_text(f"{before}{start}\n{block}{end}{after}", encoding="utf-8")
    return True
