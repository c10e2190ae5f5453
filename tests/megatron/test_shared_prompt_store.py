"""``solopo-ref-logps`` writes the same store with prompts shared and not (``dataset.share_prompt``):
long_po, one process and ``torchrun`` at CP=2 (the shared slot zigzag-sharded as one sequence).

The runs are benchmarks/long_context/shared_prompt_run.py's store check, the issue's must-show at
6,400 words of context (slow) and at 120 words in the default suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "long_context" / "shared_prompt_run.py"


def store_check(tmp_path: Path, words: int, processes: int) -> dict:
    spec = importlib.util.spec_from_file_location("shared_prompt_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.store_check(tmp_path, words, processes)


@pytest.mark.parametrize(
    "processes",
    [
        # Slow (19 s): one process stays in the default suite in tests/megatron/test_shared_prompt.py.
        pytest.param(1, id="one-process", marks=pytest.mark.slow),
        pytest.param(2, id="cp2"),
    ],
)
def test_shared_and_unshared_prompts_write_the_same_store(tmp_path, processes):
    result = store_check(tmp_path, words=120, processes=processes)
    assert result["sums"] == 4 * 2 + 2 * 4  # train: the long pair; valid: every role (validation scores all)
    assert result["largest_difference"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "cp2"])
def test_the_same_store_at_6400_words_of_context(tmp_path, processes):
    """The issue's must-show: a synthetic long context of about 6,400 words (about 7,800 tokens)."""
    assert store_check(tmp_path, words=6400, processes=processes)["largest_difference"] <= 1e-4
