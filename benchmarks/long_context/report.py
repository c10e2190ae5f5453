"""Plots a long-context step benchmark JSON and writes its table into docs/long-contexts.md.

    python benchmarks/long_context/report.py benchmarks/results/long-context-cpu.json [--readme]

The plot: peak memory and step time against the long-context length, one line per mode and LM-head
path. The table: every case, the fitted growth exponent of response-only memory (4K..16K where
measured), solopo vs long_po at their longest common length, and the budget probe. With --readme it
replaces the text between the markers in docs/long-contexts.md; numbers come only from the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKERS = {  # docs/long-contexts.md sections: the CPU run and the GPU run (benchmarks/gpu/run_all.sh)
    "cpu": ("<!-- bench:long-context:start -->", "<!-- bench:long-context:end -->"),
    "gpu": ("<!-- bench:long-context-gpu:start -->", "<!-- bench:long-context-gpu:end -->"),
}
NO_LONG_CONTEXT = "short_po forwards no long context"


def _ok(report: dict, mode: str, logits: str) -> dict[int, dict]:
    return {
        r["long_length"]: r
        for r in report["results"]
        if r["mode"] == mode and r["logits"] == logits and r["status"] == "ok"
    }


def growth_exponent(report: dict, mode: str, logits: str, low: int = 4096, high: int = 16384) -> float | None:
    """Least-squares slope of log(peak memory) against log(length) over [low, high]."""
    points = [(n, r["peak_gib"]) for n, r in _ok(report, mode, logits).items() if low <= n <= high]
    if len(points) < 2 or any(p <= 0 for _, p in points):
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(p) for _, p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary(report: dict) -> dict:
    """The claims' numbers: exponent, logits-size comparison, solopo vs long_po ratios, budget probe."""
    vocab = report["settings"]["vocab"]
    out = {"exponent": {}, "below_logits": {}, "ratios": None, "probe": {}}
    for mode in ("solopo", "long_po"):
        out["exponent"][mode] = growth_exponent(report, mode, "response_only")
        row = _ok(report, mode, "response_only").get(16384)
        if row is not None:
            logits_gib = row["row_tokens"] * vocab * 4 / 2**30
            out["below_logits"][mode] = (row["peak_gib"], logits_gib)
    solo, long_po = _ok(report, "solopo", "response_only"), _ok(report, "long_po", "response_only")
    common = sorted(set(solo) & set(long_po))
    if common:
        n = common[-1]
        out["ratios"] = {
            "length": n,
            "time": long_po[n]["step_s"] / solo[n]["step_s"],
            "memory": long_po[n]["peak_gib"] / solo[n]["peak_gib"],
        }
    for probe in report.get("budget_probe", []):
        out["probe"][probe["mode"]] = probe
    return out


def _extras(settings: dict) -> str:
    extras = [
        label for key, label in (("qkv_bias", "QKV bias"), ("tied", "tied embeddings")) if settings.get(key)
    ]
    if settings.get("recompute", "none") != "none":
        extras.append(f"{settings['recompute']} activation recomputation")
    return "".join(", " + e for e in extras)


def section(report: dict) -> str:
    """Which docs section the report belongs in: its device's."""
    return "cpu" if report["device"].startswith("cpu") else "gpu"


def table(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Device: {report['device']}; torch {report['versions']['torch']}, megatron-core "
        f"{report['versions'].get('megatron_core')}; {report['date']}, commit {(report['commit'] or '?')[:12]}. "
        f"Model: {s['layers']} layers, hidden {s['hidden']}, FFN {s['ffn']}, {s['heads']} heads / {s['groups']} "
        f"KV groups, vocab {s['vocab']}{_extras(s)}, {'bf16' if s['bf16'] else 'fp32'}, Adam; short sequences "
        f"{s['short_length']} tokens, responses {s['response']} tokens; median of {s['steps']} steps after "
        f"{s['warmup']} warm-up.",
        "",
        "short_po forwards only the short sequences: its row is the same at every long-context length.",
        "",
        "| mode | LM head | long ctx | row tokens | peak GiB | step s | tokens/s | model TFLOP/s | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r.get("reason") == NO_LONG_CONTEXT:  # older files listed short_po at every length
            continue
        if r["status"] == "ok":
            lines.append(
                f"| {r['mode']} | {r['logits']} | {r['long_length']} | {r['row_tokens']} | {r['peak_gib']:.3f} | "
                f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r.get('model_tflops_per_s', 0):.1f} | "
                f"{'-' if r.get('mfu') is None else format(r['mfu'], '.1%')} |"
            )
        else:
            lines.append(
                f"| {r['mode']} | {r['logits']} | {r['long_length']} | - | {r['status']}: {r['reason']} | | | | |"
            )
    facts = summary(report)
    lines.append("")
    for mode, exponent in facts["exponent"].items():
        if exponent is not None:
            lines.append(
                f"- {mode}, response-only: peak memory grows as length^{exponent:.2f} from 4K to 16K tokens."
            )
    for mode, (peak, logits) in facts["below_logits"].items():
        lines.append(
            f"- {mode} at a 16K long context: step peak {peak:.2f} GiB vs {logits:.2f} GiB for that row's fp32 "
            f"[T, V] logits alone."
        )
    if facts["ratios"]:
        r = facts["ratios"]
        lines.append(
            f"- long_po / solopo at {r['length']} tokens (response-only): step time x{r['time']:.2f}, "
            f"peak memory x{r['memory']:.2f}."
        )
    for mode, probe in facts["probe"].items():
        bound = " (the probe's upper limit)" if probe["bounded_by_probe_max"] else ""
        if probe.get("stopped_by_time_budget"):  # --time-budget-s ended the probe: a lower bound
            bound = " or more (the run's time budget stopped the probe)"
        lines.append(
            f"- Largest long context under {probe['budget_gib']} GiB, {mode}: {probe['max_long_length']} tokens{bound}"
            + (f"; {probe['first_over_budget']} is over" if probe["first_over_budget"] else "")
            + "."
        )
    packing = {r["padded"]: r for r in report.get("packing", []) if r["status"] == "ok"}
    if True in packing and False in packing:
        padded, lean = packing[True], packing[False]
        lines.append(
            f"- Packing a mix of {padded['groups_in_mix']} solopo groups (long contexts log-normal around "
            f"{padded['long_length']} tokens, dataset.max_tokens {padded['max_tokens']}, {padded['rows']} rows): "
            f"rows padded to max_tokens compute {padded['row_tokens']} tokens in {padded['step_s']:.2f} s; "
            f"unpadded rows {lean['row_tokens']} tokens in {lean['step_s']:.2f} s "
            f"(x{padded['step_s'] / lean['step_s']:.2f} faster, {lean['real_tokens']} real tokens)."
        )
    probes = facts["probe"]
    stopped = any(p.get("stopped_by_time_budget") for p in probes.values())  # lower bounds: no ratio
    if "solopo" in probes and "long_po" in probes and probes["long_po"]["max_long_length"] and not stopped:
        ratio = probes["solopo"]["max_long_length"] / probes["long_po"]["max_long_length"]
        lines.append(f"- solopo / long_po trainable length under the same budget: x{ratio:.2f}.")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in ("solopo", "long_po", "short_po"):
        for logits, style in (("response_only", "-"), ("full", "--")):
            rows = sorted(_ok(report, mode, logits).items())
            if not rows:
                continue
            xs = [n for n, _ in rows]
            label = f"{mode} / {logits}"
            mem.plot(xs, [r["peak_gib"] for _, r in rows], style, marker="o", label=label)
            time_ax.plot(xs, [r["step_s"] for _, r in rows], style, marker="o", label=label)
    for ax, title in ((mem, "peak memory of the step (GiB)"), (time_ax, "step time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("long-context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle(f"One training step, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument(
        "--readme", action="store_true", help="replace the long-context table in docs/long-contexts.md"
    )
    args = p.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    text = table(report)
    print(text)
    plot(report, Path(args.json).with_suffix(".png"))
    if args.readme:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from readme_section import write_readme_section

        print(f"updated {write_readme_section(*MARKERS[section(report)], text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
