"""An imported model's reference store does not depend on Megatron's vocabulary padding.

A random-init Hugging Face Llama with a vocabulary of 1030 is imported with ``checkpoint.pretrained_hf``.
At TP=1 with ``model.make_vocab_size_divisible_by=1`` the embedding has exactly 1030 rows; at TP=2 with
the default divisor 128 it has 1280, of which 250 are zero padding rows. Counted in the softmax, those
rows' logit 0 would move every log-prob by about log(1 + 250/1030) = 0.22 nats (the random model's
logits are near 0), several nats a sequence; with the padding left out the two stores agree to fp32
rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_hf_weights import build_hf_model

from solopo_megatron.data.reference_store import load_reference_store
from solopo_megatron.recipe.hf_config import model_section_from_hf_config

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1030  # the tiny tokenizer has 1024 tokens


def _ref_logps(tmp_path: Path, name: str, processes: int, overrides: list[str]) -> Path:
    store = tmp_path / f"{name}.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch kernels: fast on CPU
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
    ]
    done = subprocess.run(
        [*launcher, "--no-python", "solopo-ref-logps", "--config", str(ROOT / "recipes/tiny-cpu.yaml"),
         *overrides, f"solopo.reference_store={store}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return store


@pytest.mark.parametrize(
    "logits",
    [
        "response_only",  # the default LM head
        # vocab-parallel logits: slow (11 s); the kernels' padding masks in tests/test_padded_vocab.py
        pytest.param("full", marks=pytest.mark.slow),
    ],
)
def test_reference_store_is_the_same_with_and_without_vocab_padding(tmp_path, logits):
    hf = tmp_path / "hf"
    build_hf_model("llama", 7, vocab_size=VOCAB).save_pretrained(hf)
    fields = model_section_from_hf_config(hf)
    common = [f"model.{key}={'null' if value is None else value}" for key, value in fields.items()]
    common += [
        f"model.logits={logits}",
        "model.context_parallel_size=1",
        "dataset.synthetic.num_train=8",
        "dataset.synthetic.num_valid=4",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"checkpoint.pretrained_hf={hf}",
    ]
    exact = _ref_logps(tmp_path, "divisor-1", 1, [*common, "model.make_vocab_size_divisible_by=1"])
    want = load_reference_store(exact)
    got = load_reference_store(
        _ref_logps(tmp_path, "tp2-divisor-128", 2, [*common, "model.tensor_model_parallel_size=2"])
    )
    assert len(want) == len(got) == 12 and set(want.values) == set(got.values)
    worst = max(
        abs(got.values[example][role] - value)
        for example, roles in want.values.items()
        for role, value in roles.items()
    )
    assert worst <= 1e-3, f"largest difference of a per-sequence sum: {worst}"


def test_resuming_over_another_vocabulary_is_refused():
    from solopo_megatron.megatron.checkpoint import _check_vocab
    from solopo_megatron.recipe.errors import RecipeError

    _check_vocab(1030, 1030, Path("iter_0000002"))
    _check_vocab(None, 1030, Path("iter_0000002"))  # saved before the vocabulary was recorded
    with pytest.raises(
        RecipeError, match=r"checkpoint.load: iter_0000002 was trained over a vocabulary of 1030"
    ):
        _check_vocab(1030, 1100, Path("iter_0000002"))
