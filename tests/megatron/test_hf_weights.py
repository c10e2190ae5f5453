"""Hugging Face Llama / Qwen2 checkpoints -> our GPTModel: config mapping, conversion, logits equal to HF's.

Tiny random models built from transformers configs (no download) are saved as safetensors, loaded
into the local-spec GPTModel (fp32, one process and TP=2 on gloo) and compared with HF's logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from distributed import megatron_on_cpu, run_distributed

from solopo_megatron.megatron.hf_weights import hf_to_megatron_state_dict, load_hf_state_dict
from solopo_megatron.recipe.hf_config import check_model_matches_hf, model_section_from_hf_config
from solopo_megatron.recipe.schema import ModelSection

TOKENS = 256  # long enough for llama3 rope scaling's low frequencies to move the logits
VOCAB = 256
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "intermediate_size": 176,
    "rms_norm_eps": 1e-6,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
CHECKPOINTS = {  # name: (model type, config overrides)
    "llama": ("llama", {}),
    "llama3-rope": (
        "llama",
        {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    ),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}
# One-process runs: (name, checkpoint, ModelSection overrides). The default make_vocab_size_divisible_by
# (128) needs no padding for VOCAB=256 at TP 1 or 2.
RUNS = [
    ("llama", "llama", {}),
    ("llama3-rope", "llama3-rope", {}),
    ("llama3-rope-unscaled", "llama3-rope", {"rope_scaling": False}),  # control: the scaling matters
    ("qwen2", "qwen2", {}),
    ("qwen2-tied", "qwen2-tied", {}),
    ("llama-padded", "llama", {"make_vocab_size_divisible_by": 96}),  # 256 -> 288 rows
]
TP2_RUNS = [("qwen2", "qwen2", {}), ("llama3-rope", "llama3-rope", {}), ("qwen2-tied", "qwen2-tied", {})]


def hf_config(model_type: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    kind = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    return kind(**{**TINY, **overrides})


def build_hf_model(model_type: str, seed: int, **overrides):
    """A random HF model whose every weight matters: norms around 1, nonzero biases, attention not uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(model_type, **overrides), attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            param.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model.float().eval()


def config_json(root, name: str) -> dict:
    return json.loads((root / name / "config.json").read_text())


def section(root, name: str, **overrides) -> ModelSection:
    """The ModelSection of a saved checkpoint, with overrides."""
    return ModelSection(**{**model_section_from_hf_config(root / name), **overrides})


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(11))


# ----------------------------------------------------------------------------- workers (spawned)


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V_local] of one sequence as a packed (THD) row, as the training step feeds it."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from solopo_megatron.megatron.attention import packed_attention_mask

    n = ids.numel()
    cu = torch.tensor([0, n], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=n,
        max_seqlen_kv=n,
    )
    with torch.no_grad():
        logits = model(
            input_ids=ids[None],
            position_ids=torch.arange(n)[None],
            attention_mask=packed_attention_mask(cu, 1, 0),
            packed_seq_params=params,
        )
    return logits.reshape(n, -1)


@megatron_on_cpu
def megatron_logits(rank: int, world_size: int, root: str, runs: list, out: str) -> None:
    """Each run's GPTModel (local spec, fp32, TP=world_size) loaded from its checkpoint: saves its logits."""
    import torch.distributed as dist

    from solopo_megatron.megatron.hf_weights import load_hf_weights_into
    from solopo_megatron.megatron.model import build_gpt_model, transformer_config
    from solopo_megatron.megatron.parallel import init_parallel_state
    from solopo_megatron.megatron.weights import _global_layer_names, load_full_state_dict

    results = {}
    for name, checkpoint, overrides in runs:
        directory = os.path.join(root, checkpoint)
        fields = {**model_section_from_hf_config(directory), **overrides}
        model_section = ModelSection(
            **fields, tensor_model_parallel_size=world_size, transformer_impl="local", logits="full"
        )
        parallel = init_parallel_state(model_section, seed=0)
        tp_group = parallel.tp_group
        config = transformer_config(model_section, bf16=False, max_tokens=TOKENS)
        model = build_gpt_model(model_section, config, VOCAB, TOKENS, impl="local", parallel=parallel).eval()
        if overrides.get("rope_scaling") is False:  # the recipe check would (rightly) refuse this model
            names = _global_layer_names(model).values()
            hf = load_hf_state_dict(directory)
            full = hf_to_megatron_state_dict(hf, model_section, names, model.vocab_size)
            load_full_state_dict(model, full, tp_group)
        else:
            load_hf_weights_into(model, directory, model_section, tp_group)
        logits = _forward(model, tokens())
        if world_size > 1:  # vocab-parallel shards -> the full vocab
            shards = [torch.empty_like(logits) for _ in range(world_size)]
            dist.all_gather(shards, logits.contiguous(), group=tp_group)
            logits = torch.cat(shards, dim=1)
        results[name] = logits
    if rank == 0:
        torch.save(results, out)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved HF checkpoints and their HF logits on ``tokens()``."""
    root = tmp_path_factory.mktemp("hf")
    logits, models = {}, {}
    for seed, (name, (model_type, overrides)) in enumerate(CHECKPOINTS.items()):
        model = build_hf_model(model_type, seed, **overrides)
        model.save_pretrained(root / name)
        with torch.no_grad():
            logits[name] = model(tokens()[None]).logits[0].float()
        models[name] = model
    return root, logits, models


def _megatron_logits(checkpoints, world_size: int, runs: list) -> dict[str, torch.Tensor]:
    root = checkpoints[0]
    out = str(root / f"megatron-tp{world_size}.pt")
    run_distributed(megatron_logits, world_size, str(root), runs, out)
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process(checkpoints):
    return _megatron_logits(checkpoints, 1, RUNS)


@pytest.fixture(scope="module")
def tp2(checkpoints):
    return _megatron_logits(checkpoints, 2, TP2_RUNS)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, name: str) -> float:
    """Max abs difference, required below 1e-4 of the logits' scale."""
    assert got.shape == want.shape, name
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert diff <= 1e-4 * scale, f"{name}: max |megatron - hf| = {diff:.3g}, logits scale {scale:.3g}"
    return diff


# ------------------------------------------------------------------------------- logits vs HF


@pytest.mark.parametrize("name", ["llama", "llama3-rope", "qwen2", "qwen2-tied"])
def test_one_process_logits_match_hf(checkpoints, one_process, name):
    _, hf_logits, _ = checkpoints
    assert_logits_close(one_process[name], hf_logits[name], name)


@pytest.mark.parametrize("name", [run[0] for run in TP2_RUNS])
def test_tp2_logits_match_hf(checkpoints, tp2, name):
    _, hf_logits, _ = checkpoints
    assert_logits_close(tp2[name], hf_logits[name], f"tp2 {name}")


def test_llama3_rope_scaling_matters_and_matches_megatron_frequencies(checkpoints, one_process):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    _, hf_logits, models = checkpoints
    want = hf_logits["llama3-rope"]
    unscaled = float((one_process["llama3-rope-unscaled"] - want).abs().max())
    assert unscaled > 1e-2 * float(want.abs().max())  # 100x the tolerance: the test sees the scaling
    fields = model_section_from_hf_config(models["llama3-rope"].config)
    rope = RotaryEmbedding(
        kv_channels=fields["kv_channels"],
        rotary_percent=1.0,
        rotary_base=fields["rotary_base"],
        rope_scaling=fields["rope_scaling"],
        rope_scaling_factor=fields["rope_scaling_factor"],
        use_cpu_initialization=True,
    )
    hf_rope = models["llama3-rope"].model.rotary_emb
    assert hf_rope.attention_scaling == 1.0
    torch.testing.assert_close(rope.inv_freq, hf_rope.inv_freq, rtol=1e-6, atol=0)


def test_padded_vocab_rows_give_zero_logits(checkpoints, one_process):
    """Documents the padding: real columns equal HF's; the 32 padded ones are exactly 0 and enter a
    softmax over the padded vocab, shifting every log-prob by lse - logaddexp(lse, log(32))."""
    _, hf_logits, _ = checkpoints
    want, got = hf_logits["llama"], one_process["llama-padded"]
    assert got.shape == (TOKENS, 288)
    assert_logits_close(got[:, :VOCAB], want, "llama-padded")
    assert torch.equal(got[:, VOCAB:], torch.zeros(TOKENS, 288 - VOCAB))
    lse = want.logsumexp(-1)
    shift = got.log_softmax(-1)[:, :VOCAB] - want.log_softmax(-1)
    expected = lse - torch.logaddexp(lse, torch.tensor(32.0).log())
    torch.testing.assert_close(shift, expected[:, None].expand_as(shift), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- config mapping


def test_model_section_from_hf_config(checkpoints):
    root = checkpoints[0]
    llama = model_section_from_hf_config(root / "llama")
    assert llama == {
        "num_layers": 2,
        "hidden_size": 64,
        "ffn_hidden_size": 176,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "kv_channels": 16,
        "normalization": "RMSNorm",
        "layernorm_epsilon": 1e-6,
        "add_qkv_bias": False,
        "share_embeddings_and_output_weights": False,
        "rotary_base": 10000,
        "rope_scaling": False,
        "rope_scaling_factor": 8.0,
    }
    ModelSection(**llama)  # every key is a ModelSection field
    rope = model_section_from_hf_config(root / "llama3-rope" / "config.json")
    assert (rope["rope_scaling"], rope["rope_scaling_factor"], rope["rotary_base"]) == (True, 8.0, 500000)
    qwen = model_section_from_hf_config(root / "qwen2-tied")
    assert qwen["add_qkv_bias"] and qwen["share_embeddings_and_output_weights"]
    # transformers 4.x-style config.json: rope_theta and rope_scaling at the top level.
    legacy_rope = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}
    legacy = {**config_json(root, "llama"), "rope_theta": 500000.0, "rope_scaling": legacy_rope}
    legacy.pop("rope_parameters", None)
    assert model_section_from_hf_config(legacy) == {**llama, "rotary_base": 500000, "rope_scaling": True}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture MistralForCausalLM"),
        ({"architectures": None, "model_type": "gemma"}, "unsupported architecture model_type 'gemma'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "'dynamic'"),
        (
            {"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0, "rope_theta": 10000.0}},
            "low_freq_factor=1",
        ),
        (
            {
                "rope_parameters": {
                    **LLAMA3_ROPE,
                    "original_max_position_embeddings": 4096,
                    "rope_theta": 10000.0,
                }
            },
            "original_max_position_embeddings=8192",
        ),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_configs_are_rejected(checkpoints, change, message):
    config = {**config_json(checkpoints[0], "llama"), **change}
    with pytest.raises(ValueError, match=message):
        model_section_from_hf_config(config)


def test_qwen2_sliding_window_is_rejected(checkpoints):
    config = {**config_json(checkpoints[0], "qwen2"), "use_sliding_window": True}
    with pytest.raises(ValueError, match="sliding-window"):
        model_section_from_hf_config(config)


def test_check_model_matches_hf_names_keys(checkpoints):
    root = checkpoints[0]
    matching = section(root, "qwen2", tensor_model_parallel_size=2)
    assert check_model_matches_hf(matching, root / "qwen2") == []
    wrong = ModelSection(hidden_size=32, num_attention_heads=4, rotary_base=10000)  # MHA, no bias, 1e-6
    problems = check_model_matches_hf(wrong, root / "qwen2")
    assert "model.hidden_size: recipe 32, checkpoint 64" in problems
    assert "model.num_query_groups: recipe 4, checkpoint 2" in problems
    assert "model.add_qkv_bias: recipe False, checkpoint True" in problems
    assert "model.kv_channels: recipe 8, checkpoint 16" in problems
    assert len(problems) == 4
    factor4 = section(root, "llama3-rope", rope_scaling_factor=4.0)
    assert check_model_matches_hf(factor4, root / "llama3-rope") == [
        "model.rope_scaling_factor: recipe 4.0, checkpoint 8.0"
    ]
    assert check_model_matches_hf(wrong, {"architectures": ["GPT2LMHeadModel"]})[0].startswith("model: ")


# ------------------------------------------------------------------------------ conversion


def test_qkv_and_fc1_layouts(checkpoints):
    """Per query group: [q heads of the group, k, v]; fc1 = [gate; up]; biases likewise."""
    root = checkpoints[0]
    hf = dict(load_hf_state_dict(root / "qwen2"))
    full = hf_to_megatron_state_dict(hf, section(root, "qwen2"))
    attn = "model.layers.1.self_attn."
    for suffix in ("weight", "bias"):
        q, k, v = (hf[f"{attn}{p}_proj.{suffix}"] for p in "qkv")
        fused = full[f"decoder.layers.1.self_attention.linear_qkv.{suffix}"]
        for group in range(2):  # 2 heads (32 rows) of q, then 16 of k and 16 of v per group
            rows = fused[group * 64 : (group + 1) * 64]
            assert torch.equal(rows[:32], q[group * 32 : (group + 1) * 32])
            assert torch.equal(rows[32:48], k[group * 16 : (group + 1) * 16])
            assert torch.equal(rows[48:], v[group * 16 : (group + 1) * 16])
    gate_up = torch.cat([hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]])
    assert torch.equal(full["decoder.layers.1.mlp.linear_fc1.weight"], gate_up)
    assert torch.equal(
        full["decoder.layers.1.pre_mlp_layernorm.weight"],
        hf["model.layers.1.post_attention_layernorm.weight"],
    )
    assert "output_layer.weight" in full and len(full) == 3 + 2 * 7


def test_param_names_pick_transformer_engine_norm_names_and_a_stage(checkpoints):
    root = checkpoints[0]
    hf = load_hf_state_dict(root / "qwen2-tied")
    tied = section(root, "qwen2-tied")
    names = [
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
        "embedding.word_embeddings.weight",
    ]
    full = hf_to_megatron_state_dict(hf, tied, names, padded_vocab=384)
    assert sorted(full) == sorted(names)
    assert torch.equal(full[names[0]], hf["model.layers.1.input_layernorm.weight"])
    assert torch.equal(full[names[2]], hf["model.layers.1.post_attention_layernorm.weight"])
    assert full[names[3]].shape == (384, 64) and not full[names[3]][VOCAB:].any()
    with pytest.raises(ValueError, match="no Hugging Face counterpart: decoder.layers.0.mlp.linear_fc1.bias"):
        hf_to_megatron_state_dict(hf, tied, names + ["decoder.layers.0.mlp.linear_fc1.bias"])
    with pytest.raises(ValueError, match="padded vocab 128 is smaller than the checkpoint's 256 rows"):
        hf_to_megatron_state_dict(hf, tied, padded_vocab=128)


def test_missing_tensor_names_hf_key_and_directory(checkpoints, tmp_path):
    from safetensors.torch import save_file

    root = checkpoints[0]
    hf = dict(load_hf_state_dict(root / "llama"))
    del hf["model.layers.1.mlp.up_proj.weight"]
    save_file(hf, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=rf"{tmp_path}.*'model.layers.1.mlp.up_proj.weight'.*linear_fc1"):
        hf_to_megatron_state_dict(load_hf_state_dict(tmp_path), section(root, "llama"))


def test_shape_mismatch_names_both_keys_and_shapes(checkpoints):
    root = checkpoints[0]
    narrow = section(root, "llama", ffn_hidden_size=128)
    message = (
        r"HF model.layers.0.mlp.gate_proj.weight is \(176, 64\), but Megatron "
        r"decoder.layers.0.mlp.linear_fc1.weight needs \(128, 64\)"
    )
    with pytest.raises(ValueError, match=message):
        hf_to_megatron_state_dict(load_hf_state_dict(root / "llama"), narrow)


def test_unused_tensors_and_untied_lm_head_are_errors(checkpoints):
    root = checkpoints[0]
    hf = dict(load_hf_state_dict(root / "llama"))
    one_layer = section(root, "llama", num_layers=1)
    with pytest.raises(ValueError, match="no place for: model.layers.1."):
        hf_to_megatron_state_dict(hf, one_layer)
    tied = section(root, "llama", share_embeddings_and_output_weights=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_to_megatron_state_dict(hf, tied)


def test_load_hf_state_dict_sharded_single_and_missing(checkpoints, tmp_path):
    root, _, models = checkpoints
    single = load_hf_state_dict(root / "qwen2")
    models["qwen2"].save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = load_hf_state_dict(tmp_path / "sharded")
    assert sorted(sharded) == sorted(single) and "model.layers.0.self_attn.q_proj.bias" in single
    for key in single:
        assert torch.equal(sharded[key], single[key]), key
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no Hugging Face weights in {tmp_path / 'empty'}"):
        load_hf_state_dict(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_state_dict(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ recipe wiring


@megatron_on_cpu
def recipe_start_weights(rank: int, world_size: int, recipe: str, overrides: list, out: str) -> None:
    """setup() of a recipe with checkpoint.pretrained_hf, on TP=world_size: the full initial weights."""

    from solopo_megatron.megatron import trainer as training
    from solopo_megatron.megatron.weights import gather_full_state_dict
    from solopo_megatron.recipe.loading import load_config

    trainer = training.setup(load_config(recipe, overrides), log=lambda text: None)
    full = gather_full_state_dict(trainer.chunks[0], trainer.parallel.groups.tp, trainer.parallel.groups.pp)
    if rank == 0:
        torch.save(full, out)


def test_recipe_starts_from_the_hf_weights(tmp_path):
    """``checkpoint.pretrained_hf`` in a recipe: TP=2 training starts from exactly the HF weights, with the
    embedding sized by the checkpoint (its rows exceed the tokenizer's 1024 tokens here)."""
    from pathlib import Path

    from solopo_megatron.recipe.loading import load_config
    from solopo_megatron.recipe.validation import RecipeError, validate_recipe

    directory = tmp_path / "hf"
    build_hf_model("qwen2", 5, vocab_size=1280).save_pretrained(directory)
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml")
    fields = model_section_from_hf_config(directory)
    overrides = [f"model.{key}={'null' if value is None else value}" for key, value in fields.items()]
    overrides += [
        "model.context_parallel_size=1",
        "model.tensor_model_parallel_size=2",
        "solopo.preference_loss=simpo",
        "dataset.synthetic.num_train=8",
        "dataset.synthetic.num_valid=4",
        "train.global_batch_size=8",  # setup() refuses data that cannot fill one step
        f"dataset.cache_dir={tmp_path / 'cache'}",
        f"checkpoint.pretrained_hf={directory}",
    ]
    validate_recipe(load_config(recipe, overrides), world_size=2)
    out = str(tmp_path / "start.pt")
    run_distributed(recipe_start_weights, 2, recipe, overrides, out)
    got = torch.load(out)
    want = hf_to_megatron_state_dict(load_hf_state_dict(directory), ModelSection(**fields), got.keys(), 1280)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value.float(), rtol=0, atol=0, msg=key)

    with pytest.raises(
        RecipeError, match=r"model\.hidden_size: recipe 32, checkpoint 64 \(checkpoint\.pretrained_hf="
    ):
        validate_recipe(load_config(recipe, [*overrides, "model.hidden_size=32"]), world_size=2)
    with pytest.raises(
        RecipeError, match=r"checkpoint\.pretrained_hf: .* is not a Hugging Face checkpoint directory"
    ):
        validate_recipe(
            load_config(recipe, [*overrides, f"checkpoint.pretrained_hf={tmp_path}"]), world_size=2
        )
