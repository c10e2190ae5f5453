"""Plots a long-context step benchmark JSON and writes its tables into docs/long-contexts.md and README.md.

    python benchmarks/long_context/report.py benchmarks/results/long-context-cpu.json [--readme]

The plot: peak memory, step time and the cost ratio (a preference example's step over the long sequence
alone's, with the 1.15 goal for long_po shared) against the long-context length, one line per mode,
sharing of prompts and LM-head path. The table: every case, the cost ratios, the fitted growth exponent
of response-only memory (4K..16K where measured), solopo vs long_po at their longest common length,
shared vs unshared tokens, the packing mix and the budget probe. With --readme it replaces the text
between the markers in docs/long-contexts.md and, for a CPU run with cost ratios, the shared-prompt
table in README.md; numbers come only from the file.
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
# README.md's "Shared prompts" section: the cost-ratio table of the CPU run.
README_MARKERS = ("<!-- bench:shared-prompts:start -->", "<!-- bench:shared-prompts:end -->")
NO_LONG_CONTEXT = "short_po forwards no long context"
ALONE = "long_alone"
RATIO_MODES = ("solopo", "solopo-both", "long_po", "short_po")  # the cost ratio tables' row order
GOAL = 1.15  # long_po shared: one example at most 1.15 x its long sequence alone
README_LENGTHS = (4096, 16384, 32768)  # README's short table: these where measured


def _shared(r: dict) -> bool:
    return bool(r.get("share_prompt", False))  # files before shared prompts: never shared


def _ok(report: dict, mode: str, logits: str, share: bool = False) -> dict[int, dict]:
    return {
        r["long_length"]: r
        for r in report["results"]
        if r["mode"] == mode and r["logits"] == logits and r["status"] == "ok" and _shared(r) == share
    }


def _ratios(report: dict, logits: str = "response_only") -> dict[tuple[str, bool], dict[int, dict]]:
    """(mode, shared) -> long length -> the file's cost ratio record (bench_step.cost_ratios)."""
    out: dict[tuple[str, bool], dict[int, dict]] = {}
    for r in report.get("cost_ratio", []):
        if r["logits"] == logits and r["mode"] != ALONE:
            out.setdefault((r["mode"], bool(r["share_prompt"])), {})[r["long_length"]] = r
    return dict(sorted(out.items(), key=lambda item: (_mode_order(item[0][0]), item[0][1])))


def _mode_order(mode: str) -> int:
    return RATIO_MODES.index(mode) if mode in RATIO_MODES else len(RATIO_MODES)


def _prompts(share: bool) -> str:
    return "shared" if share else "apart"


def ratio_table(report: dict, lengths=None, logits: str = "response_only") -> list[str]:
    """Markdown rows: one per mode and sharing, one column per long length: the step-time cost ratio
    and, in parentheses, the real tokens' ratio. Empty when the file has no cost ratios."""
    ratios = _ratios(report, logits)
    measured = sorted({n for by_length in ratios.values() for n in by_length})
    # The lengths asked for where measured; else (a smoke run's lengths) the measured ones.
    lengths = [n for n in lengths or () if n in measured] or measured
    if not ratios or not lengths:
        return []
    lines = [
        "| mode | prompts | "
        + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)
        + " |",
        "|---|---|" + "---:|" * len(lengths),
    ]
    for (mode, share), by_length in ratios.items():
        cells = [
            f"{by_length[n]['time']:.2f} ({by_length[n]['real_tokens']:.2f})" if n in by_length else "-"
            for n in lengths
        ]
        lines.append(f"| {mode} | {_prompts(share)} | " + " | ".join(cells) + " |")
    return lines


def first_loss_difference(report: dict) -> tuple[float, int] | None:
    """The largest relative difference of the first step's loss (from the same initial weights) between
    a case shared and apart, and the number of such pairs; None without pairs."""
    first = {
        (r["mode"], _shared(r), r["logits"], r["long_length"]): r["first_loss"]
        for r in report["results"]
        if r["status"] == "ok" and r.get("first_loss") is not None
    }
    apart = {key[:1] + key[2:]: value for key, value in first.items() if not key[1]}
    pairs = [
        (value, apart[key[:1] + key[2:]])
        for key, value in first.items()
        if key[1] and key[:1] + key[2:] in apart
    ]
    if not pairs:
        return None
    return max(abs(s - a) / max(abs(a), abs(s), 1e-30) for s, a in pairs), len(pairs)


def _load_facts(report: dict) -> list[str]:
    """How much other processes used the machine during the cases (bench_step's --busy-limit)."""
    limit = report["settings"].get("busy_limit")
    runs = [r for r in report["results"] + report.get("packing", []) if r.get("other_cpu") is not None]
    if not limit or not runs:
        return []
    again = sum(r.get("attempts", 1) - 1 for r in runs)
    over = [r for r in runs if r["other_cpu"] > limit]
    worst = max(runs, key=lambda r: r["other_cpu"])
    line = (
        f"- Other processes on the machine used at most {worst['other_cpu']:.0%} of its CPU during a case "
        f"(each case starts when they use at most {limit:.0%}, and runs again when they used more during "
        f"it; runs again: {again})"
    )
    if over:
        line += "; still over after the retries: " + ", ".join(
            f"{r['mode']} {_prompts(_shared(r))} {r['long_length']} ({r['other_cpu']:.0%})" for r in over
        )
    return [line + "."]


def sharing_facts(report: dict) -> list[str]:
    """Shared vs unshared: long_po's tokens and step at 16K (else its longest length), its cost ratio
    against the goal at every measured length, solopo's, and the first-step losses."""
    ratios = _ratios(report)
    shared, apart = ratios.get(("long_po", True), {}), ratios.get(("long_po", False), {})
    common = sorted(set(shared) & set(apart))
    if not common:
        return []
    difference = first_loss_difference(report)
    n = 16384 if 16384 in common else common[-1]
    s_row, a_row = (
        _ok(report, "long_po", "response_only", True)[n],
        _ok(report, "long_po", "response_only")[n],
    )
    over = [m for m in sorted(shared) if shared[m]["time"] > GOAL]
    each = ", ".join(f"{m}: {shared[m]['time']:.2f}" for m in sorted(shared))
    lines = [
        f"- long_po at {n} tokens, shared vs apart: {s_row['real_tokens']} vs {a_row['real_tokens']} real tokens "
        f"(x{s_row['real_tokens'] / a_row['real_tokens']:.2f}), step {s_row['step_s']:.2f} s vs "
        f"{a_row['step_s']:.2f} s (x{s_row['step_s'] / a_row['step_s']:.2f}), peak {s_row['peak_gib']:.2f} vs "
        f"{a_row['peak_gib']:.2f} GiB; cost ratio {shared[n]['time']:.2f} shared, {apart[n]['time']:.2f} apart.",
        f"- long_po shared against the goal (cost ratio <= {GOAL}): "
        + ("met at every length" if not over else "over at " + ", ".join(str(m) for m in over))
        + f" ({each}).",
    ]
    for mode in ("solopo", "solopo-both"):
        s_mode, a_mode = ratios.get((mode, True), {}), ratios.get((mode, False), {})
        if n in s_mode and n in a_mode:
            lines.append(
                f"- {mode} at {n} tokens: cost ratio {s_mode[n]['time']:.2f} shared, {a_mode[n]['time']:.2f} apart "
                f"(real tokens x{s_mode[n]['real_tokens']:.2f} and x{a_mode[n]['real_tokens']:.2f} "
                "the long sequence's)."
            )
    if difference:
        lines.append(
            f"- First-step loss (the same initial weights), shared vs apart: largest relative difference "
            f"{difference[0]:.1e} over {difference[1]} pairs."
        )
    return lines


def readme_table(report: dict) -> str:
    """README.md's shared-prompt block: the cost ratios at a few lengths, and where they come from."""
    rows = ratio_table(report, README_LENGTHS)
    if not rows:
        return ""
    s = report["settings"]
    return "\n".join(
        [
            "Cost of one preference example in units of one forward and backward of its long sequence alone "
            "(training-step time; in parentheses, real tokens), response-only LM head, from "
            "[the CPU run](docs/long-contexts.md#long-contexts-what-makes-long-sequences-cheap) "
            f"({report['device']}, {s['layers']} layers, hidden {s['hidden']}, short contexts {s['short_length']} "
            f"and answers {s['response']} tokens; {report['date'][:10]}):",
            "",
            *rows,
            "",
            *sharing_facts(report)[:2],
        ]
    )


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


def _more_steps(settings: dict) -> str:
    """The settings' extra steps for short ones (bench_step's --min-measure-s), in words."""
    seconds = settings.get("min_measure_s", 0.0)
    return f" (more, up to 10, until the measured steps add up to {seconds:g} s)" if seconds else ""


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
        f"{s['short_length']} tokens, responses {s['response']} tokens; {s['steps']} measured steps after "
        f"{s['warmup']} warm-up{_more_steps(s)}.",
        "",
        "short_po forwards only the short sequences: its row is the same at every long-context length. "
        "Prompts *shared*: the answers of one context are branches after one copy of its prompt "
        "(`dataset.share_prompt`); *apart*: each sequence in a slot of its own. long_alone is the long "
        "chosen sequence alone (the same model, LM head and optimizer step; a mean response NLL as its "
        "loss). *fast half s*: the mean of a case's fastest half of steps (another process on the machine "
        "only ever adds time); a case's cost ratio is its fast half over long_alone's at the same length and "
        "LM head. *first loss*: the first step's, from the initial weights (the same shared and apart). "
        "Model TFLOP/s counts a shared slot as one causal sequence of its real tokens.",
        "",
        "| mode | prompts | LM head | long ctx | row tokens | real tokens | peak GiB | median s | fast half s | "
        "tokens/s | model TFLOP/s | MFU | first loss | cost ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratio = {
        (r["mode"], bool(r["share_prompt"]), r["logits"], r["long_length"]): r["time"]
        for r in report.get("cost_ratio", [])
    }
    for r in report["results"]:
        if r.get("reason") == NO_LONG_CONTEXT:  # older files listed short_po at every length
            continue
        head = f"| {r['mode']} | {_prompts(_shared(r))} | {r['logits']} | {r['long_length']} |"
        if r["status"] == "ok":
            cost = ratio.get((r["mode"], _shared(r), r["logits"], r["long_length"]))
            lines.append(
                f"{head} {r['row_tokens']} | {r.get('real_tokens', '-')} | {r['peak_gib']:.3f} | "
                f"{r['step_s']:.2f} | {r.get('step_fast_s', r['step_s']):.2f} | {r['tokens_per_s']:.0f} | "
                f"{r.get('model_tflops_per_s', 0):.1f} | "
                f"{'-' if r.get('mfu') is None else format(r['mfu'], '.1%')} | "
                f"{'-' if r.get('first_loss') is None else format(r['first_loss'], '.6g')} | "
                f"{'-' if cost is None else format(cost, '.2f')} |"
            )
        else:
            lines.append(f"{head} - | - | {r['status']}: {r['reason']} | | | | | | | |")
    ratios = ratio_table(report)
    if ratios:
        lines += [
            "",
            "Cost ratio, response-only head: step time (fast half) of one preference example over that of its "
            "long sequence alone at the same length (in parentheses: real tokens computed, over the long "
            "sequence's).",
            "",
            *ratios,
        ]
    facts = summary(report)
    lines.append("")
    lines += sharing_facts(report)
    lines += _load_facts(report)
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
    packing = {(r["padded"], _shared(r)): r for r in report.get("packing", []) if r["status"] == "ok"}
    if (True, False) in packing and (False, False) in packing:
        padded, lean = packing[True, False], packing[False, False]
        lines.append(
            f"- Packing a mix of {padded['groups_in_mix']} solopo groups (long contexts log-normal around "
            f"{padded['long_length']} tokens, dataset.max_tokens {padded['max_tokens']}, {padded['rows']} rows): "
            f"rows padded to max_tokens compute {padded['row_tokens']} tokens in {padded['step_s']:.2f} s; "
            f"unpadded rows {lean['row_tokens']} tokens in {lean['step_s']:.2f} s "
            f"(x{padded['step_s'] / lean['step_s']:.2f} faster, {lean['real_tokens']} real tokens)."
        )
    if (False, True) in packing and (False, False) in packing:
        shared, lean = packing[False, True], packing[False, False]
        lines.append(
            f"- The same mix with shared prompts (solopo shares the short pair's context), unpadded: "
            f"{shared['rows']} rows, {shared['real_tokens']} real tokens in {shared['step_s']:.2f} s "
            f"(apart: {lean['rows']} rows, {lean['real_tokens']} in {lean['step_s']:.2f} s)."
        )
    probes = facts["probe"]
    stopped = any(p.get("stopped_by_time_budget") for p in probes.values())  # lower bounds: no ratio
    if "solopo" in probes and "long_po" in probes and probes["long_po"]["max_long_length"] and not stopped:
        ratio = probes["solopo"]["max_long_length"] / probes["long_po"]["max_long_length"]
        lines.append(f"- solopo / long_po trainable length under the same budget: x{ratio:.2f}.")
    return "\n".join(lines)


COLORS = {ALONE: "black", "solopo": "C0", "solopo-both": "C2", "long_po": "C1", "short_po": "C3"}
STYLES = {  # (shared, LM head) -> line style
    (False, "response_only"): "-",
    (True, "response_only"): "--",
    (False, "full"): ":",
    (True, "full"): "-.",
}


def plot(report: dict, path: Path) -> Path:
    """Three panels against the long length: peak memory, step time, and the cost ratio (with the
    1.15 goal) where the file has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, time_ax, ratio_ax) = plt.subplots(1, 3, figsize=(17, 4.8))
    modes = sorted({r["mode"] for r in report["results"]}, key=lambda m: (m != ALONE, _mode_order(m)))
    for mode in modes:
        for (share, logits), style in STYLES.items():
            rows = sorted(_ok(report, mode, logits, share).items())
            if not rows:
                continue
            xs = [n for n, _ in rows]
            label = f"{mode} / {_prompts(share)} / {logits}"
            kwargs = {"color": COLORS.get(mode), "marker": "^" if share else "o", "label": label}
            mem.plot(xs, [r["peak_gib"] for _, r in rows], style, **kwargs)
            time_ax.plot(xs, [r["step_s"] for _, r in rows], style, **kwargs)
    for logits in ("response_only", "full"):
        for (mode, share), by_length in _ratios(report, logits).items():
            xs = sorted(by_length)
            ratio_ax.plot(
                xs,
                [by_length[n]["time"] for n in xs],
                STYLES[share, logits],
                color=COLORS.get(mode),
                marker="^" if share else "o",
                label=f"{mode} / {_prompts(share)} / {logits}",
            )
    ratio_ax.axhline(GOAL, color="grey", linewidth=1)
    ratio_ax.annotate(f"goal for long_po shared: {GOAL}", (0.98, GOAL), xycoords=("axes fraction", "data"),
                      ha="right", va="bottom", fontsize=8, color="grey")  # fmt: skip
    for ax, title in (
        (mem, "peak memory of the step (GiB)"),
        (time_ax, "step time (s)"),
        (ratio_ax, "cost ratio: example / long sequence alone"),
    ):
        ax.set_xscale("log", base=2)
        if ax is not ratio_ax:
            ax.set_yscale("log")
        ax.set_xlabel("long-context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=7)
    if ratio_ax.lines[1:]:
        ratio_ax.legend(fontsize=7)
    fig.suptitle(f"One training step, {report['device']} (dashed: prompts shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument(
        "--readme",
        action="store_true",
        help="replace the long-context table in docs/long-contexts.md (and, for a CPU run, README.md's "
        "shared-prompt table)",
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
        shared = readme_table(report)
        if section(report) == "cpu" and shared:  # README's table is the CPU run's
            print(f"updated {write_readme_section(*README_MARKERS, shared)}")
        elif section(report) == "cpu":
            print("README.md's shared-prompt table left as it is: this file has no cost ratios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
