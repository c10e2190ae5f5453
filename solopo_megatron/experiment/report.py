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
    labels = {label for s in summaries for label in s.get("long", {})}

    def order(label: str) -> tuple[int, float]:
        return (1, float(label[:-1])) if label.endswith("x") else (0, float(label))

    return sorted(labels, key=order)


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
            ax.plot(ticks, values, marker="o", label=s["name"], **_style(s["name"]))
        ax.axhline(0.5, color="gray", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("evaluated context (short, then multiples of the long context)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final accuracy (held-out)")
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
    command = " ".join(argv)
    if "--report-only" in argv and previous.exists():  # keep the command that trained the variants
        command = json.loads(previous.read_text(encoding="utf-8")).get("command", command)
    header = {
        "experiment": str(spec.path),
        "recipe": str(spec.recipe),
        "command": command,
        "report_command": " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),  # the code that wrote the report; each variant records its own
        "machine": machine_info(),
        "total_wall_seconds": sum(s.get("wall_seconds", 0.0) for s in summaries),
    }
    results = {**header, "variants": list(summaries)}
    written = [folder / "results.json"]
    written[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    machine = header["machine"]
    trained_at = sorted({s["commit"] for s in summaries if s.get("commit")}) or ["unknown"]
    lines = [
        f"Experiment `{spec.path.name}` on {machine['cpu'] or machine['platform']} "
        f"({machine['cpu_count']} cores{', ' + machine['gpu'] if machine['gpu'] else ''}), torch "
        f"{machine['torch']}; variants trained at commit {', '.join(trained_at)}, "
        f"{header['total_wall_seconds'] / 60:.1f} min in all; report written {header['date']}.",
        "",
        markdown_table(summaries),
    ]
    written.append(folder / "results.md")
    written[1].write_text("\n".join(lines), encoding="utf-8")
    try:
        written += plot_results(summaries, folder)
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
    return written
