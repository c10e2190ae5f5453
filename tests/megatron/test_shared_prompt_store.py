"""``solopo-ref-logps`` writes the same store with prompts shared and not (``dataset.share_prompt``):
long_po, one process and ``torchrun`` at CP=2 (the shared slot zigzag-sharded as one sequence)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from solopo_megatron.data.reference_store import load_reference_store

ROOT = Path(__file__).resolve().parents[2]


def reference_store(tmp_path: Path, share: str, processes: int, words: int) -> Path:
    """The store ``solopo-ref-logps`` writes for the tiny recipe in long_po mode (fp32, torch kernels)."""
    store = tmp_path / f"share-{share}-{processes}.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SOLOPO_KERNELS"] = "torch"
    overrides = [
        "solopo.mode=long_po",
        f"model.context_parallel_size={processes}",
        f"dataset.share_prompt={share}",
        "dataset.synthetic.num_train=4",
        "dataset.synthetic.num_valid=2",
        f"dataset.synthetic.long_target_words={words}",
        f"dataset.max_tokens={max(2048, 4 * words)}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"solopo.reference_store={store}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
         "--no-python", "solopo-ref-logps", "--config", str(ROOT / "recipes/tiny-cpu.yaml"), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return store


def largest_difference(tmp_path: Path, processes: int, words: int) -> float:
    """The largest difference of a per-sequence sum between the shared and the unshared store."""
    want = load_reference_store(reference_store(tmp_path, "false", processes, words))
    got = load_reference_store(reference_store(tmp_path, "true", processes, words))
    assert len(want) == len(got) == 6 and set(want.values) == set(got.values)  # train and valid examples
    return max(
        abs(got.values[example][role] - value)
        for example, roles in want.values.items()
        for role, value in roles.items()
    )


@pytest.mark.parametrize(
    "processes",
    [
        # Slow (19 s): one process stays in the default suite in tests/megatron/test_shared_prompt.py.
        pytest.param(1, id="one-process", marks=pytest.mark.slow),
        pytest.param(2, id="cp2"),
    ],
)
def test_shared_and_unshared_prompts_write_the_same_store(tmp_path, processes):
    assert largest_difference(tmp_path, processes, words=120) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "cp2"])
def test_the_same_store_at_6400_words_of_context(tmp_path, processes):
    """The issue's must-show: a synthetic long context of about 6,400 words (about 8,700 tokens)."""
    assert largest_difference(tmp_path, processes, words=6400) <= 1e-4
