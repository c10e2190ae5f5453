"""Exit 0 if what .ci/install puts in place is already here, so the main job can skip pip (about 15 s).

Checks: torch 2.13.0, megatron-core 0.19.2 (a local build tag allowed), this checkout installed as
solopo_megatron, and every requirement solopo_megatron declares (its extras' too: the tests') satisfied.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINNED = {"torch": "2.13.0", "megatron-core": "0.19.2"}


def missing() -> list[str]:
    problems = []
    for name, version in PINNED.items():
        try:
            have = Version(metadata.version(name)).public
        except metadata.PackageNotFoundError:
            have = None
        if have is None or not have.startswith(version):
            problems.append(f"{name}=={version} (have {have})")
    spec = importlib.util.find_spec("solopo_megatron")  # found, not imported (that would import torch)
    try:
        requirements = metadata.requires("solopo_megatron") or []
    except metadata.PackageNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        return problems + ["solopo_megatron"]
    if Path(spec.origin).resolve().parents[1] != ROOT:
        problems.append(f"solopo_megatron from this checkout (have {spec.origin})")
    for text in requirements:
        requirement = Requirement(text)
        marker = requirement.marker
        if (
            marker is not None
            and not marker.evaluate({"extra": "test"})
            and not marker.evaluate({"extra": ""})
        ):
            continue  # another extra's (gpu, bench, ...), or another platform's
        try:
            have = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(text)
            continue
        if requirement.name not in PINNED and not requirement.specifier.contains(have, prereleases=True):
            problems.append(f"{text} (have {have})")
    return problems


if __name__ == "__main__":
    problems = missing()
    for problem in problems:
        print(f"not installed: {problem}")
    sys.exit(1 if problems else 0)
