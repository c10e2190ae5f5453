"""Closed-form parameter counts and FLOPs against the real models; metric writers."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from distributed import megatron_on_cpu, run_distributed

from solopo_megatron.recipe.schema import LoggerSection, ModelSection
from solopo_megatron.recipe.sizing import (
    estimate_memory,
    parameter_counts,
    peak_tflops_for,
    sequence_training_flops,
    stage_parameters,
)

VARIANTS = {
    "mha": dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4),
    "gqa-bias": dict(
        num_layers=3,
        hidden_size=96,
        ffn_hidden_size=160,
        num_attention_heads=6,
        num_query_groups=2,
        add_qkv_bias=True,
    ),
    "tied-kv": dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=1,
        kv_channels=32,
        share_embeddings_and_output_weights=True,
    ),
}
VOCAB = 384


@megatron_on_cpu
def count_model_parameters(rank: int, world_size: int, out: str) -> None:
    from solopo_megatron.megatron.model import build_gpt_model, transformer_config
    from solopo_megatron.megatron.parallel import init_parallel_state

    counts = {}
    for name, fields in VARIANTS.items():
        m = ModelSection(**fields, transformer_impl="local")
        parallel = init_parallel_state(m, seed=0)
        model = build_gpt_model(
            m, transformer_config(m, bf16=False, max_tokens=64), VOCAB, 64, "local", parallel
        )
        counts[name] = sum(p.numel() for p in model.parameters())
    torch.save(counts, out)


def test_parameter_counts_match_the_built_model(tmp_path):
    out = str(tmp_path / "counts.pt")
    run_distributed(count_model_parameters, 1, out)
    built = torch.load(out)
    for name, fields in VARIANTS.items():
        assert parameter_counts(ModelSection(**fields), VOCAB).total == built[name], name


def test_published_model_sizes():
    qwen = ModelSection(
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        add_qkv_bias=True,
    )
    llama = ModelSection(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8
    )
    assert parameter_counts(qwen, 152064).total == 7_615_616_512  # Qwen2.5-7B
    assert parameter_counts(llama, 128256).total == 8_030_261_248  # Llama-3.1-8B


@pytest.mark.parametrize("length", [16, 200])
def test_flops_match_a_flop_counter(length):
    """Forward FLOPs of an HF Llama (eager attention: full s x s scores) counted by torch equal ours / 3
    plus the masked half of the scores, which eager attention computes and we do not count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = VARIANTS["gqa-bias"]
    config = LlamaConfig(
        hidden_size=fields["hidden_size"],
        num_hidden_layers=fields["num_layers"],
        num_attention_heads=fields["num_attention_heads"],
        num_key_value_heads=fields["num_query_groups"],
        intermediate_size=fields["ffn_hidden_size"],
        vocab_size=VOCAB,
        attention_bias=True,
    )
    config._attn_implementation = "eager"  # explicit matmuls the counter sees
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, VOCAB, (1, length)))
    m = ModelSection(**fields)
    masked_half = (
        2 * m.num_layers * m.num_attention_heads * (m.hidden_size // m.num_attention_heads) * length**2
    )
    assert counter.get_total_flops() == pytest.approx(
        sequence_training_flops(m, VOCAB, length) / 3 + masked_half, rel=1e-9
    )


def test_stage_parameters_and_memory():
    m = ModelSection(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)
    counts = parameter_counts(m, VOCAB)
    assert stage_parameters(m, VOCAB) == counts.total
    pp2 = ModelSection(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        pipeline_model_parallel_size=2,
        tensor_model_parallel_size=2,
    )
    assert stage_parameters(pp2, VOCAB) == (2 * counts.per_layer + counts.embedding + counts.final_norm) / 2
    plain = estimate_memory(
        m, VOCAB, tokens_per_microbatch=1024, microbatches=4, dp=8, distributed_optimizer=False
    )
    sharded = estimate_memory(
        m, VOCAB, tokens_per_microbatch=1024, microbatches=4, dp=8, distributed_optimizer=True
    )
    assert plain.optimizer == 12 * counts.total and sharded.optimizer == plain.optimizer / 8
    assert plain.weights == 2 * counts.total
    # The response-only head (default) holds one [chunk, V] block and the fp32 dW; full logits [T, V] bf16.
    assert plain.logits == 6 * 1024 * VOCAB + 4 * VOCAB * 64
    whole = estimate_memory(
        ModelSection(**{**m.__dict__, "logits": "full"}),
        VOCAB,
        tokens_per_microbatch=1024,
        microbatches=4,
        dp=8,
        distributed_optimizer=False,
    )
    assert whole.logits == 2 * 1024 * VOCAB
    full = estimate_memory(
        ModelSection(**{**m.__dict__, "recompute_granularity": "full"}),
        VOCAB,
        tokens_per_microbatch=1024,
        microbatches=4,
        dp=8,
        distributed_optimizer=False,
    )
    assert full.activations < plain.activations


def test_peak_tflops_by_device_name():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for("NVIDIA H200") == 989.4
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Some CPU") is None


# ------------------------------------------------------------------------------ metric writers


def test_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from solopo_megatron.megatron.metric_writers import MetricWriters

    logger = LoggerSection(metrics_file=str(tmp_path / "m.jsonl"), tensorboard_dir=str(tmp_path / "tb"))
    writers = MetricWriters(logger, {}, enabled=True)
    writers.write({"step": 1, "train": {"loss": 0.5, "grad_norm": float("nan")}})
    writers.write({"step": 2, "train": {"loss": 0.25}, "eval": {"accuracy/long": 0.75}})
    writers.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy/long")] == [(2, 0.75)]
    assert "train/grad_norm" not in events.Tags()["scalars"]  # non-finite values stay in the JSON lines only
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    MetricWriters(logger, {}, enabled=False).write(
        {"step": 3, "train": {"loss": 1.0}}
    )  # other ranks: nothing
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_wandb_gets_config_and_scalars(monkeypatch):
    calls = {}

    class Run:
        def log(self, scalars, step):
            calls.setdefault("log", []).append((step, scalars))

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kwargs: calls.setdefault("init", kwargs) and Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from solopo_megatron.megatron.metric_writers import MetricWriters
    from solopo_megatron.recipe.validation import wandb_problem

    logger = LoggerSection(wandb_project="solopo", wandb_run_name="r1", wandb_mode="offline")
    assert wandb_problem(logger) is None
    writers = MetricWriters(logger, {"model": {"num_layers": 2}}, enabled=True)
    writers.write({"step": 5, "train": {"loss": 0.5}})
    writers.close()
    assert calls["init"]["project"] == "solopo" and calls["init"]["mode"] == "offline"
    assert calls["init"]["config"] == {"model": {"num_layers": 2}}
    assert calls["log"] == [(5, {"train/loss": 0.5})] and calls["finished"]


def test_missing_wandb_is_a_recipe_problem(monkeypatch):
    from solopo_megatron.recipe.validation import wandb_problem

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    assert "logger.wandb_project: wandb is not installed" in wandb_problem(LoggerSection(wandb_project="p"))
