"""summary.json of benchmarks/gpu/run_all.sh, rewritten at every stage's start and end.

    python benchmarks/gpu/summary.py init SUMMARY BUDGET_S [--smoke]
    python benchmarks/gpu/summary.py start SUMMARY NAME LIMIT_S KILL_AFTER_S
    python benchmarks/gpu/summary.py end SUMMARY NAME RC SECONDS [--junit XML] [--require-passed]
    python benchmarks/gpu/summary.py not-run SUMMARY NAME LIMIT_S KILL_AFTER_S REASON
    python benchmarks/gpu/summary.py finish SUMMARY [--stopped-after NAME]   # the verdict: exit 0 if all passed

Each write goes to a scratch file renamed over SUMMARY, so a run killed at any moment (the device's
600 s limit) leaves a complete JSON with every finished stage and the one that was running. The top
level holds the device and versions (from the preflight's preflight.json beside it, once written),
the budget, the seconds so far and, after ``finish``, the verdict. Per stage, in order: name, limit_s,
kill_after_s, rc, seconds and status (running, passed, failed, time limit, not run); a pytest stage
also has its test counts from the junit XML, so a skipped test is never counted as passed.

Standard library only: it runs in a few milliseconds between stages, without importing torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TIME_LIMIT_RCS = (124, 137)  # timeout's exit code when the limit hit, and SIGKILL after the kill-after


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def save(path: Path, summary: dict) -> None:
    """Atomic rewrite: readers (and a kill) see the old file or the new one, never half of one."""
    summary["seconds"] = round(time.time() - summary["started_unix"])
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(scratch, path)


def init(budget_s: int, smoke: bool) -> dict:
    now = time.time()
    return {
        "device": None,
        "versions": None,
        "smoke": smoke,
        "budget_s": budget_s,
        "date": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
        "started_unix": now,
        "seconds": 0,
        "finished": False,
        "passed": None,
        "stages": [],
    }


def junit_counts(xml_path: Path) -> dict:
    """passed / failed / skipped / errors over the testcases of a pytest junit XML, and what was skipped."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "skipped_tests": []}
    for case in ElementTree.parse(xml_path).iter("testcase"):
        kinds = {child.tag for child in case}
        if "error" in kinds:
            counts["errors"] += 1
        elif "failure" in kinds:
            counts["failed"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            counts["skipped_tests"].append({"test": test, "reason": reason[:200]})
        else:
            counts["passed"] += 1
    return counts


def stage_status(rc: int, tests: dict | None, pytest_stage: bool, require_passed: bool) -> str:
    """A stage passes on exit 0. A pytest stage also needs its junit XML (``tests``) with no failure or
    error and, with ``require_passed`` (the GPU run), at least one passed test: all-skipped is no pass."""
    if rc in TIME_LIMIT_RCS:
        return "time limit"
    if rc != 0:
        return "failed"
    if pytest_stage and (
        tests is None or tests["failed"] or tests["errors"] or (require_passed and not tests["passed"])
    ):
        return "failed"
    return "passed"


def _merge_preflight(path: Path, summary: dict) -> None:
    """Device and versions from the preflight's report beside the summary (once it exists)."""
    facts = path.with_name("preflight.json")
    if summary["versions"] is None and facts.is_file():
        try:
            report = load(facts)
        except (OSError, ValueError):  # a preflight killed mid-write: the next stage's write retries
            return
        summary["device"], summary["versions"] = report.get("device"), report.get("versions")


def start(summary: dict, name: str, limit_s: int, kill_after_s: int) -> None:
    summary["stages"].append(
        {
            "name": name,
            "limit_s": limit_s,
            "kill_after_s": kill_after_s,
            "rc": None,
            "seconds": None,
            "status": "running",
        }
    )


def end(
    path: Path, summary: dict, name: str, rc: int, seconds: int, junit: Path | None, require_passed: bool
) -> dict:
    entry = summary["stages"][-1]
    if entry["name"] != name or entry["status"] != "running":
        raise SystemExit(f"summary.py: stage {name!r} ends but {entry['name']!r} is the running one")
    entry.update(rc=rc, seconds=seconds)
    if junit is not None:
        if junit.is_file():
            entry["tests"] = junit_counts(junit)
        else:  # stopped before pytest wrote its report: nothing can be called passed
            entry["tests"] = None
            entry["reason"] = f"no {junit.name} (pytest was stopped before writing it)"
    entry["status"] = stage_status(rc, entry.get("tests"), junit is not None, require_passed)
    if name == "preflight" and rc != 0:
        entry["reason"] = _preflight_failure(path) or entry.get("reason") or f"exit {rc}"
    return entry


def _preflight_failure(path: Path) -> str | None:
    try:
        return load(path.with_name("preflight.json")).get("failure")
    except (OSError, ValueError):
        return None


def verdict(summary: dict, stopped_after: str | None = None) -> tuple[bool, str]:
    """(every stage passed, one line saying so or naming what did not; ``stopped_after``: the stage
    whose failure ended the run)."""
    stages = summary["stages"]
    bad = [s for s in stages if s["status"] not in ("passed", "not run")]
    tests = [s["tests"] for s in stages if s.get("tests")]
    total = {key: sum(t[key] for t in tests) for key in ("passed", "failed", "skipped", "errors")}
    counts = ", ".join(f"{n} {key}" for key, n in total.items() if n)
    skipped = _skip_reasons([t for s in tests for t in s["skipped_tests"]])
    line = f"tests: {counts or 'none'}" + (f" (skipped: {skipped})" if skipped else "")
    if stopped_after is not None:
        last = next((s for s in stages if s["name"] == stopped_after), {"status": "missing", "rc": None})
        return False, f"stopped after the {stopped_after} ({last['status']}, rc {last['rc']}{_why(last)})"
    if not stages or bad:
        what = ", ".join(f"{s['name']} ({s['status']}, rc {s['rc']}{_why(s)})" for s in bad) or "no stage ran"
        return False, f"NOT every stage passed: {what}; {line}"
    return True, f"every stage passed; {line}"


def _skip_reasons(skipped: list[dict]) -> str:
    """Skipped tests by reason: the test names where a reason has one or two, else their number."""
    by_reason: dict[str, list[str]] = {}
    for test in skipped:
        by_reason.setdefault(test["reason"], []).append(test["test"].split("::")[-1])
    return "; ".join(
        f"{reason}: {', '.join(names) if len(names) <= 2 else f'{len(names)} tests'}"
        for reason, names in by_reason.items()
    )


def _why(stage: dict) -> str:
    return f": {stage['reason']}" if stage.get("reason") else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    file = argparse.ArgumentParser(add_help=False)  # every command's first argument
    file.add_argument("summary", type=Path)
    stage = argparse.ArgumentParser(add_help=False, parents=[file])  # a stage's name and its limits
    stage.add_argument("name")
    stage.add_argument("limit_s", type=int)
    stage.add_argument("kill_after_s", type=int)
    p = sub.add_parser("init", parents=[file])
    p.add_argument("budget_s", type=int)
    p.add_argument("--smoke", action="store_true")
    sub.add_parser("start", parents=[stage])
    p = sub.add_parser("end", parents=[file])
    p.add_argument("name")
    p.add_argument("rc", type=int)
    p.add_argument("seconds", type=int)
    p.add_argument("--junit", type=Path)
    p.add_argument("--require-passed", action="store_true")
    sub.add_parser("not-run", parents=[stage]).add_argument("reason")
    p = sub.add_parser("finish", parents=[file])
    p.add_argument("--stopped-after", help="the stage whose failure stopped the run")
    args = parser.parse_args(argv)

    if args.command == "init":
        save(args.summary, init(args.budget_s, args.smoke))
        return 0
    summary = load(args.summary)
    _merge_preflight(args.summary, summary)
    if args.command == "start":
        start(summary, args.name, args.limit_s, args.kill_after_s)
    elif args.command == "end":
        end(args.summary, summary, args.name, args.rc, args.seconds, args.junit, args.require_passed)
    elif args.command == "not-run":
        start(summary, args.name, args.limit_s, args.kill_after_s)
        summary["stages"][-1].update(status="not run", reason=args.reason)
    else:
        passed, line = verdict(summary, args.stopped_after)
        summary.update(finished=True, passed=passed, verdict=line)
        save(args.summary, summary)
        print(f"run_all: {summary['seconds']} s, {line}")
        return 0 if passed else 1
    save(args.summary, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
