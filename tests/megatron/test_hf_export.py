"""solopo-export: Hugging Face -> import -> export -> Hugging Face is the identity, and trained checkpoints
of parallel layouts load in transformers with the Megatron model's logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import megatron_on_cpu, run_distributed
from test_hf_weights import CHECKPOINTS, build_hf_model

from solopo_megatron.recipe.hf_config import model_section_from_hf_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
HF_VOCAB = 1100  # above the tiny tokenizer's 1024 tokens, and not a multiple of 128: 52 padded rows to drop


def _import_overrides(hf_dir: Path, tmp: Path, *extra: str) -> list[str]:
    """A tiny-recipe run that starts from ``hf_dir`` (its model section read from the checkpoint)."""
    fields = model_section_from_hf_config(hf_dir)
    overrides = [f"model.{key}={'null' if value is None else value}" for key, value in fields.items()]
    return overrides + [
        "model.context_parallel_size=1",
        "dataset.synthetic.num_train=8",
        "dataset.synthetic.num_valid=4",
        "train.global_batch_size=8",  # one step's examples must fit in the 8 records
        f"dataset.cache_dir={tmp / 'cache'}",
        f"checkpoint.pretrained_hf={hf_dir}",
        *extra,
    ]


@megatron_on_cpu
def import_and_save(rank: int, world_size: int, recipe: str, overrides: list) -> None:
    """The import a user runs: solopo-train's setup from ``checkpoint.pretrained_hf``, saved untrained."""
    from solopo_megatron.megatron import trainer as training
    from solopo_megatron.recipe.loading import load_config

    trainer = training.setup(load_config(recipe, overrides), log=lambda text: None)
    trainer.save(1)


@megatron_on_cpu
def checkpoint_logits(rank: int, world_size: int, recipe: str, overrides: list, ids: list, out: str) -> None:
    """The Megatron model of a checkpoint (resumed in one process, full logits): its logits on ``ids``."""
    from test_hf_weights import _forward

    from solopo_megatron.megatron import trainer as training
    from solopo_megatron.recipe.loading import load_config

    trainer = training.setup(load_config(recipe, overrides), log=lambda text: None)
    model = trainer.chunks[0].module.eval()
    torch.save(_forward(model, torch.tensor(ids)), out)


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _export(checkpoint: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "solopo_megatron.export", "--checkpoint", str(checkpoint)]
    return subprocess.run([*command, "--out", str(out), *args], capture_output=True, text=True, timeout=300)


def _imported(tmp: Path, name: str) -> tuple[Path, Path]:
    """(HF source, run folder) of an untrained import of a random ``name`` checkpoint."""
    model_type, config = CHECKPOINTS[name]
    source = tmp / "hf"
    build_hf_model(model_type, 3, **{**config, "vocab_size": HF_VOCAB}).save_pretrained(source)
    run_distributed(
        import_and_save, 1, RECIPE, _import_overrides(source, tmp, f"checkpoint.save={tmp / 'run'}")
    )
    return source, tmp / "run"


@pytest.fixture(scope="module")
def qwen2_tied(tmp_path_factory):
    return _imported(tmp_path_factory.mktemp("qwen2-tied"), "qwen2-tied")


def _assert_identity(source: Path, out: Path, name: str) -> None:
    model_type, config = CHECKPOINTS[name]
    want, got = _safetensors(source), _safetensors(out)
    assert got.keys() == want.keys() - ({"lm_head.weight"} if config.get("tie_word_embeddings") else set())
    for key, tensor in want.items():
        if key in got:
            assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == got.keys()
    exported, original = (json.loads((d / "config.json").read_text()) for d in (out, source))
    assert model_section_from_hf_config(exported) == model_section_from_hf_config(original)
    assert exported["vocab_size"] == HF_VOCAB and exported["architectures"] == original["architectures"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


@pytest.mark.compat
def test_import_then_export_is_the_identity_qwen2_tied(qwen2_tied, tmp_path):
    """Bitwise in fp32 through the CLI: every tensor (the padded vocabulary rows dropped), sharded with an
    index, and a config that reads back as the same model; QKV biases and tied embeddings included."""
    source, run = qwen2_tied
    done = _export(run, tmp_path / "out", "--dtype", "fp32", "--max-shard-size", "100KB")
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_identity(source, tmp_path / "out", "qwen2-tied")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[] if n == "llama3-rope" else pytest.mark.slow)
        for n in CHECKPOINTS
        if n != "qwen2-tied"
    ],
)
def test_import_then_export_is_the_identity(tmp_path, name):
    """The other architectures through the Python API (Llama-3.1 rope scaling in the default suite)."""
    from solopo_megatron.megatron.hf_export import export_checkpoint

    source, run = _imported(tmp_path, name)
    export_checkpoint(run, tmp_path / "out", dtype="fp32", log=lambda text: None)
    _assert_identity(source, tmp_path / "out", name)
    from transformers import AutoConfig

    exported, original = (AutoConfig.from_pretrained(d) for d in (tmp_path / "out", source))
    assert exported.rope_parameters == original.rope_parameters  # as transformers reads them


def _copy_run(run: Path, tmp: Path) -> Path:
    import shutil

    copy = tmp / "run-copy"
    shutil.copytree(run, copy)
    return copy


def test_bad_checkpoints_and_outputs_are_clear_errors(qwen2_tied, tmp_path, capsys):
    from solopo_megatron.export import main

    _, run = qwen2_tied

    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "--checkpoint: " in error("--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert "is not a directory" in error(
        "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")
    )
    assert "no checkpoint" in error("--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")).lower()
    assert "--iteration 7" in error(
        "--checkpoint", str(run), "--iteration", "7", "--out", str(tmp_path / "o")
    )

    # An output directory that exists and is not empty: refused, untouched; replaced with --overwrite.
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in error("--checkpoint", str(run), "--out", str(out))
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()

    # A model section the Hugging Face architectures cannot express, and a tensor with no HF place.
    layernorm = _copy_run(run, tmp_path / "ln")
    config = layernorm / "config.yaml"
    config.write_text(config.read_text().replace("normalization: RMSNorm", "normalization: LayerNorm"))
    assert "model.normalization LayerNorm" in error(
        "--checkpoint", str(layernorm), "--out", str(tmp_path / "o")
    )
    no_bias = _copy_run(run, tmp_path / "bias")
    (no_bias / "hf_config.json").unlink()  # no Hugging Face origin: the model section decides (Llama)
    config = no_bias / "config.yaml"
    text = re.sub(r"pretrained_hf: .*", "pretrained_hf: null", config.read_text())
    config.write_text(text.replace("add_qkv_bias: true", "add_qkv_bias: false"))
    assert "'decoder.layers.self_attention.linear_qkv.bias' has no Hugging Face counterpart" in error(
        "--checkpoint", str(no_bias), "--out", str(tmp_path / "o")
    )
    assert not (tmp_path / "o").exists()


def _trained_checkpoint_matches_transformers(
    tmp_path: Path, name: str, layout: list[str], nproc: int
) -> None:
    model_type, config = CHECKPOINTS[name]
    source = tmp_path / "hf"
    build_hf_model(model_type, 4, **{**config, "vocab_size": HF_VOCAB}).save_pretrained(source)
    run = tmp_path / "run"
    train = _import_overrides(source, tmp_path, *layout, f"checkpoint.save={run}", "train.train_iters=2")
    train += ["train.global_batch_size=4", "scheduler.lr_warmup_iters=0", "train.eval_interval=null"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "solopo_megatron.train", "--config", RECIPE, *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    done = _export(run, tmp_path / "out", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    )
    ids = torch.randint(0, HF_VOCAB, (96,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    out = str(tmp_path / "megatron.pt")
    resume = _import_overrides(source, tmp_path, f"checkpoint.load={run}", "model.logits=full")
    run_distributed(checkpoint_logits, 1, RECIPE, resume, ids.tolist(), out)
    got = torch.load(out)[:, :HF_VOCAB]  # Megatron's padded vocabulary columns are not the model's
    trained = _safetensors(tmp_path / "out")["model.norm.weight"]
    assert not torch.equal(trained, _safetensors(source)["model.norm.weight"])  # it did train
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_trained_with_context_parallelism_exports_to_transformers(tmp_path):
    """Llama-3.1 rope scaling, trained 2 steps at CP=2: transformers' logits equal the Megatron model's."""
    _trained_checkpoint_matches_transformers(tmp_path, "llama3-rope", ["model.context_parallel_size=2"], 2)


@pytest.mark.slow
def test_trained_with_tensor_and_pipeline_parallelism_exports_to_transformers(tmp_path):
    """Qwen2 with tied embeddings, trained 2 steps at TP=2 x PP=2 (4 processes)."""
    layout = ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]
    _trained_checkpoint_matches_transformers(tmp_path, "qwen2-tied", layout, 4)


def test_layer_slices_are_read_alone(qwen2_tied):
    """The export's reader returns one layer of a layer-stacked tensor, equal to that row of the whole."""
    from solopo_megatron.megatron.hf_export import _SliceReader

    _, run = qwen2_tied
    reader = _SliceReader(next(run.glob("iter_*")))
    key = "decoder.layers.self_attention.linear_qkv.weight"
    whole = reader.read(key)
    assert whole.shape[0] == 2 and reader.shape(key) == whole.shape
    for layer in range(2):
        assert torch.equal(reader.read(key, layer), whole[layer])
    assert not any(k.startswith(("optimizer", "rng_state")) for k in reader.tensors)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_export_never_writes_into_over_or_inside_what_it_reads(qwen2_tied, tmp_path, capsys):
    """The run folder, its iteration folders, its tokenizer, a new folder inside it, a folder above it:
    each refused with --overwrite, and every file of the run is byte-identical afterwards."""
    from solopo_megatron.export import main

    _, fixture_run = qwen2_tied
    run = _copy_run(fixture_run, tmp_path / "copy")
    before = _snapshot(run)
    iteration = next(run.glob("iter_*"))
    targets = {
        run: "is .*the run folder",
        iteration: "is inside .*the run folder",
        run / "tokenizer": "is inside .*the run folder",
        iteration / "hf": "is inside .*the run folder",
        run / "new-export": "is inside .*the run folder",
        run.parent: "holds .*the run folder",
    }
    for checkpoint in (run, iteration):
        for out, message in targets.items():
            assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 2, out
            err = capsys.readouterr().err
            assert re.search(f"--out: .*{message}.*which the export reads", err), err
            assert _snapshot(run) == before, out
    assert not (iteration / "hf").exists() and not (run / "new-export").exists()


def _rewrite_tensor(run: Path, key: str, edit) -> None:
    """The run's latest checkpoint rewritten (weights only) with ``edit`` applied to tensor ``key``."""
    import torch.distributed.checkpoint as dcp

    from solopo_megatron.megatron.hf_export import _SliceReader

    folder = next(run.glob("iter_*"))
    reader = _SliceReader(folder)
    state = {name: reader.read(name) for name in reader.tensors}
    state[key] = edit(state[key])
    for path in folder.glob("*.distcp"):
        path.unlink()
    (folder / ".metadata").unlink()
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    # megatron-core 0.19 kept its common state in the shards just replaced: keep one as 0.16 does.
    torch.save({}, folder / "common.pt")


def test_non_finite_weights_are_refused_naming_the_tensor(qwen2_tied, tmp_path, capsys):
    """A checkpoint with a NaN is refused; one whose values overflow fp16 is refused for fp16 only."""
    from solopo_megatron.export import main

    _, fixture_run = qwen2_tied
    run = _copy_run(fixture_run, tmp_path / "nan")
    key = "decoder.final_layernorm.weight"
    _rewrite_tensor(run, key, lambda t: torch.where(torch.arange(t.numel()) == 3, torch.nan, t))
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{key} (model.norm.weight) holds 1 non-finite value" in err and "--iteration" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()

    # A diverged run's finite but huge weights (one update at lr 1e30): refused unless asked for.
    huge = _copy_run(fixture_run, tmp_path / "huge")
    _rewrite_tensor(huge, key, lambda t: t * 1e30)
    assert main(["--checkpoint", str(huge), "--out", str(tmp_path / "o"), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert f"{key} (model.norm.weight) has values up to 1" in err and "--allow-huge-weights" in err, err
    allow = ["--checkpoint", str(huge), "--out", str(tmp_path / "o"), "--allow-huge-weights"]
    assert main([*allow, "--dtype", "fp16"]) == 2
    assert "overflows torch.float16" in capsys.readouterr().err
    assert main([*allow, "--dtype", "fp32"]) == 0
    assert "warning: model.norm.weight has values up to 1" in capsys.readouterr().out


def test_export_failures_name_the_option_and_leave_nothing(qwen2_tied, tmp_path, capsys, monkeypatch):
    """--iteration below 1, an --out under a read-only folder and a full disk: one line naming the
    option, and no .partial folder left."""
    from solopo_megatron.export import main

    _, run = qwen2_tied
    assert main(["--checkpoint", str(run), "--iteration", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "--iteration: must be >= 1" in capsys.readouterr().err

    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["--checkpoint", str(run), "--out", str(locked / "hf")]) == 2
        assert re.search(
            r"--out: cannot write in .*locked \(.*locked/hf's nearest existing folder\)",
            capsys.readouterr().err,
        )

    from safetensors import SafetensorError
    from safetensors import torch as safetensors_torch

    def disk_full(*args, **kwargs):  # what safetensors raises on a real full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_torch, "save_file", disk_full)
    out = tmp_path / "full"
    assert main(["--checkpoint", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"--out: writing {out} failed \(.*No space left on device.*\); nothing was written", err
    ), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("full")]


def test_a_checkpoint_missing_a_shard_is_refused_naming_it(qwen2_tied, tmp_path, capsys):
    """A trained layout's checkpoint without one of its .distcp files: refused before anything is read."""
    from solopo_megatron.export import main

    _, fixture_run = qwen2_tied
    run = _copy_run(fixture_run, tmp_path / "lost")
    shard = sorted(next(run.glob("iter_*")).glob("*.distcp"))[-1]  # how many: the writer's choice
    shard.unlink()
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"is missing {shard.name}, a shard its .metadata lists" in err, err
    assert not (tmp_path / "o").exists()


def test_the_export_replaces_only_its_own_folders(qwen2_tied, tmp_path, capsys, monkeypatch):
    """Folders named like a staging or backup copy (a run folder ``hf.old``, the user's ``hf.partial``) are
    never removed; a dead export's staging folder is; a damaged shard read is one line."""
    import shutil

    from solopo_megatron.export import main

    _, fixture_run = qwen2_tied
    run = shutil.copytree(fixture_run, tmp_path / "hf.old")  # the run folder, named like a backup
    mine = tmp_path / "hf.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f"hf.tmp-{dead.pid}"  # a killed export's staging folder
    leftover.mkdir()
    before = _snapshot(run)
    assert main(["--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    assert _snapshot(run) == before and (mine / "notes.txt").read_text() == "mine"
    assert (out / "config.json").is_file() and not (out / "old.txt").exists() and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.old", "hf.partial"]

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    def damaged(*args, **kwargs):
        raise CheckpointException("read_data", {0: _wrap_exception(OSError(5, "Input/output error"))})

    monkeypatch.setattr(dcp, "load", damaged)
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"cannot read \S+ from \S+/iter_0000001 \(.*\); restore the checkpoint's files", err), (
        err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.old", "hf.partial"]


def test_the_export_checks_the_vocabulary_training_recorded(qwen2_tied, tmp_path, capsys, monkeypatch):
    """Each checkpoint records the vocabulary its softmax ran over; the export refuses another one."""
    from solopo_megatron.export import main
    from solopo_megatron.megatron import hf_export
    from solopo_megatron.recipe.checkpoints import iter_dir

    source, run = qwen2_tied
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    assert hf_export._trained_vocab(iter_dir(run, 1)) == vocab
    monkeypatch.setattr(hf_export, "_trained_vocab", lambda folder: vocab + 6)
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        f"was trained over a vocabulary of {vocab + 6} tokens, but the run's tokenizer and recipe give {vocab}"
        in err
    )
    assert not (tmp_path / "o").exists()
