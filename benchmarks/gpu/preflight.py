"""Pre-flight of benchmarks/gpu/run_all.sh: can this machine run the GPU proof? (under 2 minutes)

    python benchmarks/gpu/preflight.py --out OUT/preflight.json --wheels .whl --site DIR   # the GPU run
    python benchmarks/gpu/preflight.py --out preflight.json --cpu-smoke   # the same checks, small, on a CPU

Checks, each timed; all of them run, so one failure does not hide the next:

- wheels (with --wheels): installs the wheels in .whl/ into --site (no index, no dependencies); with
  no wheels there and megatron-core or omegaconf not installed, one line says what to do.
- versions: Python, torch, CUDA, Triton, megatron-core, omegaconf, Liger, Transformer Engine; the GPU
  and its driver; the C compiler and Python headers Triton compiles its launchers with.
- triton: one trivial ``@triton.jit`` kernel launched and its result checked (benchmarks/gpu/
  triton_probe.py; on CUDA its first launch compiles the kernel and its C launcher).
- flex: ``flex_attention`` with a causal block mask and grouped-query heads against SDPA: forward and
  backward compiled as training compiles it (``torch.compile``, dynamic shapes) on CUDA; the eager
  forward only on a CPU (flex attention's backward needs CUDA).
- megatron: imports megatron.core's GPTModel, omegaconf and this project's trainer.

--out gets the device, the versions, each check's result and seconds, and ``failure``: one line naming
every failed check (null when all passed); it is rewritten after every check. Exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEEDED_MODULES = ("megatron.core", "omegaconf")  # what the GPU machine's image lacks (run_all.sh)
DISTRIBUTIONS = {  # versions reported, by distribution name (read from metadata: no import)
    "torch": "torch",
    "triton": "triton",
    "megatron_core": "megatron-core",
    "omegaconf": "omegaconf",
    "liger_kernel": "liger-kernel",
    "transformer_engine": "transformer-engine",
}
FETCH_HINT = (
    "run `bash benchmarks/gpu/fetch_wheels.sh` where pip reaches the package registries and carry .whl/ "
    'with the checkout to the GPU machine (device tool: carry [".whl"])'
)


# ----------------------------------------------------------------------------- checks


def wheel_requirements(wheels: Path) -> list[str]:
    """The distribution names of the wheels in ``wheels`` (pip picks each one's file for this Python)."""
    return sorted({path.name.split("-")[0] for path in wheels.glob("*.whl")})


def missing_modules(modules: tuple[str, ...] = NEEDED_MODULES) -> list[str]:
    """The modules of ``modules`` whose top-level package cannot be found (nothing is imported)."""
    return [name for name in modules if importlib.util.find_spec(name.split(".")[0]) is None]


def install_wheels(wheels: Path, site: Path, modules: tuple[str, ...] = NEEDED_MODULES) -> str:
    """Installs the wheels of ``wheels`` into ``site`` and puts it first on sys.path; with none there,
    RuntimeError naming the fix if ``modules`` are not installed either."""
    names = wheel_requirements(wheels)
    if not names:
        missing = missing_modules(modules)
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise RuntimeError(
                f"{wheels}/ holds no wheels and {', '.join(missing)} {verb} not installed: {FETCH_HINT}"
            )
        return f"no wheels in {wheels}/; {', '.join(modules)} already installed"
    site.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    # --ignore-requires-python: megatron-core 0.19 asks for 3.12 and runs on 3.11 too (as .ci/install has it)
    command += [
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--ignore-requires-python",
        "--target",
        str(site),
    ]
    command += ["--find-links", str(wheels), *names]
    done = subprocess.run(command, capture_output=True, text=True, timeout=50)  # inside the stage's 75 s
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install {wheels}/: {_last_line(done.stderr or done.stdout)}")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return f"installed {', '.join(names)} into {site}"


def versions(report: dict, device: str) -> str:
    """Fills ``report``'s device and versions; RuntimeError where the GPU run has no CUDA device."""
    found = {"python": platform.python_version()}
    for key, distribution in DISTRIBUTIONS.items():
        found[key] = _distribution_version(distribution)
    import torch

    found["cuda"] = torch.version.cuda
    found["c_compiler"] = _c_compiler()
    found["python_headers"] = (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
    report["versions"] = found
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        props = torch.cuda.get_device_properties(0)
        report["device"] = props.name
        found["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        found["driver"] = _nvidia_smi("driver_version")
    else:
        report["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return ", ".join(f"{key} {value}" for key, value in found.items())


def _distribution_version(name: str) -> str | None:
    for candidate in (name, name.replace("-", "_")):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _c_compiler() -> str | None:
    """The compiler Triton would use: $CC, else the first of cc, gcc, clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _nvidia_smi(field: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def triton_launch(device: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import triton_probe

    triton_probe.launch(device)
    return "compiled and launched" if device == "cuda" else "interpreted"


def flex_attention(device: str) -> str:
    """flex_attention against SDPA in fp32. Tolerances: bf16 inputs (unit roundoff 2^-9) with fp32
    accumulation, the probabilities rounded to bf16 before P @ V, outputs of size ~1: errors of a few
    1e-3 expected; 3e-2 allowed on the output and 5e-2 of each gradient's largest entry (a broken mask
    or kernel is off by O(1)); fp32 on a CPU: 1e-4."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    cuda = device == "cuda"
    dtype, tolerance = (
        (torch.bfloat16, {"forward": 3e-2, "grad": 5e-2}) if cuda else (torch.float32, {"forward": 1e-4})
    )
    heads, groups, length, dim = 4, 2, 256 if cuda else 128, 64
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, groups, length, dim, generator=g, device=device, dtype=dtype) for _ in range(2))
    inputs = [t.requires_grad_(cuda) for t in (q, k, v)]
    reference = [t.detach().float().requires_grad_(cuda) for t in (q, k, v)]
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, length, length, device=device)
    attend = torch.compile(flex, dynamic=True) if cuda else flex  # as training runs it (attention.py)
    out = attend(*inputs, block_mask=mask, enable_gqa=True)
    rq, rk, rv = reference
    repeat = heads // groups
    want = F.scaled_dot_product_attention(
        rq, rk.repeat_interleave(repeat, 1), rv.repeat_interleave(repeat, 1), is_causal=True
    )
    errors = {"forward": float((out.float() - want).detach().abs().max())}
    if cuda:
        grad = torch.randn(out.shape, generator=g, device=device)
        out.backward(grad.to(dtype))
        want.backward(grad)
        for name, got, expected in zip(("dq", "dk", "dv"), inputs, reference):
            errors[name] = float((got.grad.float() - expected.grad).abs().max() / expected.grad.abs().max())
    worst = max(errors.values())
    limits = {name: tolerance["forward" if name == "forward" else "grad"] for name in errors}
    if not all(errors[name] <= limits[name] for name in errors):  # also catches NaN
        raise RuntimeError(f"flex_attention differs from SDPA: {errors} (limits {limits})")
    what = "compiled forward and backward" if cuda else "eager forward (backward needs CUDA)"
    return f"{what}, max error {worst:.1e}"


def megatron_imports() -> str:
    import megatron.core
    import omegaconf
    from megatron.core.models.gpt import GPTModel  # noqa: F401  (the model training builds)

    import solopo_megatron.train  # noqa: F401  (this project's trainer and what it imports)

    return f"megatron-core {megatron.core.__version__}, omegaconf {omegaconf.__version__}"


# ----------------------------------------------------------------------------- driver


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _reason(error: BaseException) -> str:
    """One line: the error's type and its first and last lines (compilers' errors end with the cause)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " | ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    reason = f"{type(error).__name__}: {text}"
    return reason if len(reason) <= 200 else reason[:199] + "…"


def write(path: Path, report: dict) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(scratch, path)


def run_checks(checks: list[tuple[str, Callable[[], str]]], report: dict, out: Path) -> bool:
    """Runs every check (a failure does not stop the next), recording each; True if all passed."""
    for name, check in checks:
        start = time.perf_counter()
        try:
            result = {"ok": True, "detail": check()}
        except Exception as error:  # noqa: BLE001  (every failure is reported, none stops the others)
            traceback.print_exc()
            result = {"ok": False, "reason": _reason(error)}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        print(
            f"preflight {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s: "
            f"{result.get('detail') or result.get('reason')}",
            flush=True,
        )
        failed = [f"{n}: {r['reason']}" for n, r in report["checks"].items() if not r["ok"]]
        report["failure"] = "; ".join(failed) or None
        write(out, report)
    return report["failure"] is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="a CPU, interpreted Triton, eager flex forward"
    )
    parser.add_argument("--wheels", type=Path, help="install the wheels of this folder (.whl/) first")
    parser.add_argument("--site", type=Path, help="where --wheels installs (put it on PYTHONPATH)")
    args = parser.parse_args(argv)
    if args.wheels and not args.site:
        parser.error("--wheels needs --site")
    if args.cpu_smoke:  # before the first Triton import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cpu" if args.cpu_smoke else "cuda"
    report = {"device": None, "versions": None, "checks": {}, "failure": None}
    checks = [("wheels", lambda: install_wheels(args.wheels, args.site))] if args.wheels else []
    checks += [
        ("versions", lambda: versions(report, device)),
        ("triton", lambda: triton_launch(device)),
        ("flex", lambda: flex_attention(device)),
        ("megatron", megatron_imports),
    ]
    start = time.perf_counter()
    write(args.out, report)
    passed = run_checks(checks, report, args.out)
    took = time.perf_counter() - start
    print(
        f"preflight {'passed' if passed else 'FAILED'} in {took:.0f} s"
        + ("" if passed else f": {report['failure']}")
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
