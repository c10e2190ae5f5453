"""Plots a token log-prob benchmark JSON and writes its table into docs/benchmarks.md.

    python benchmarks/kernels/report.py benchmarks/results/logprobs-<device>.json [--readme]

The table lists every shape's forward+backward and forward-only rows: median ms, GB/s, fraction of
the measured copy bandwidth, extra memory per token, and our speed-up over each baseline. With
--readme it replaces the text between the benchmark markers (docs/benchmarks.md); numbers come only from the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- bench:logprobs:start -->", "<!-- bench:logprobs:end -->"
OURS = "solopo_triton"


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(report: dict) -> str:
    rows = report["results"]
    by_key = {(r["provider"], r["tokens"], r["vocab_local"], r["mode"]): r for r in rows}
    lines = [
        f"Device: {report['device']}; copy bandwidth {_fmt(report['copy_bandwidth_GBps'], '.0f')} GB/s; "
        f"torch {report['versions']['torch']}, triton {report['versions'].get('triton')}; "
        f"{report['date']}, commit {(report['commit'] or '?')[:12]}.",
        "",
        "| T | V_local | mode | provider | ms | GB/s | of copy BW | extra B/token | ours faster by | max abs err vs fp32 |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    shapes = sorted({(r["tokens"], r["vocab_local"]) for r in rows})
    for tokens, vocab in shapes:
        for mode in ("fwd+bwd", "fwd"):
            ours = by_key.get((OURS, tokens, vocab, mode))
            for r in sorted(
                (r for r in rows if (r["tokens"], r["vocab_local"], r["mode"]) == (tokens, vocab, mode)),
                key=lambda r: r["ms"],
            ):
                speedup = None if ours is None or r["provider"] == OURS else r["ms"] / ours["ms"]
                lines.append(
                    f"| {tokens} | {vocab} | {mode} | {r['provider']} | {r['ms']:.3f} | {r['GBps']:.0f} | "
                    f"{_fmt(r.get('fraction_of_copy_bandwidth'), '.0%')} | {_fmt(r['extra_bytes_per_token'], '.1f')} | "
                    f"{_fmt(speedup, '.2f')}{'x' if speedup else ''} | {_fmt(r.get('max_abs_error_vs_fp32'), '.1e')} |"
                )
    # One line per provider, shape and reason (the modes it covers listed together).
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for skip in report.get("skipped", []):
        grouped[(skip["provider"], skip.get("tokens"), skip.get("vocab_local"), skip["reason"])].append(
            skip.get("mode", "")
        )
    for (provider, tokens, vocab, reason), modes in grouped.items():
        where = f" at T={tokens}, V_local={vocab}" if tokens is not None else ""
        which = f" ({', '.join(m for m in modes if m)})" if any(modes) else ""
        lines.append(f"\nSkipped {provider}{where}{which}: {reason}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["mode"] == "fwd+bwd"]
    shapes = sorted({(r["tokens"], r["vocab_local"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    values = defaultdict(dict)
    for r in rows:
        frac = r.get("fraction_of_copy_bandwidth")
        values[r["provider"]][(r["tokens"], r["vocab_local"])] = frac if frac is not None else r["GBps"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(shapes)), 4))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs = [j + i * width for j, shape in enumerate(shapes) if shape in values[provider]]
        ys = [values[provider][shape] for shape in shapes if shape in values[provider]]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"T={t}\nV={v}" for t, v in shapes], fontsize=8)
    ax.set_ylabel("fraction of copy bandwidth" if report["copy_bandwidth_GBps"] else "GB/s")
    ax.set_title(f"token log-probs fwd+bwd, bf16 ({report['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    text = table(report)
    print(text)
    plot(report, args.results.with_suffix(".png"))
    print(f"wrote {args.results.with_suffix('.png')}")
    if args.readme:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from readme_section import write_readme_section

        print(f"updated {write_readme_section(START, END, text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
