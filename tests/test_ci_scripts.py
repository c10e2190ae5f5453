"""The main job's install check (.ci/installed.py): it passes where .ci/install has run, and names
what is missing otherwise."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _installed_module():
    spec = importlib.util.spec_from_file_location("ci_installed", ROOT / ".ci" / "installed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_install_check_passes_where_ci_installed_everything():
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "installed.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


def test_the_install_check_names_what_is_missing(monkeypatch):
    installed = _installed_module()
    monkeypatch.setattr(installed, "PINNED", {**installed.PINNED, "megatron-core": "0.99.0"})
    assert installed.missing() == [f"megatron-core==0.99.0 (have {_public('megatron-core')})"]
    monkeypatch.setattr(installed, "ROOT", ROOT / "elsewhere")
    assert any(problem.startswith("solopo_megatron from this checkout") for problem in installed.missing())


def _public(name: str) -> str:
    from importlib import metadata

    from packaging.version import Version

    return Version(metadata.version(name)).public
