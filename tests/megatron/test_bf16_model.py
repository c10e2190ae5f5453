"""A bf16 model (``model.bf16=true``) on CPU: every parameter bf16 (the norms included), fp32 main params in
the optimizer, fp32 weights loaded into it, and a forward whose norms take the fused rms_norm."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from distributed import megatron_on_cpu, run_distributed
from model_checks import packed_row

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256


@megatron_on_cpu
def bf16_model_checks(rank: int, world_size: int, out: str) -> None:
    from solopo_megatron.megatron.build import build_model_and_optimizer
    from solopo_megatron.megatron.parallel import init_parallel_state
    from solopo_megatron.megatron.weights import gather_full_state_dict
    from solopo_megatron.recipe.loading import load_config

    overrides = [
        "model.context_parallel_size=1",
        "model.attention_backend=sdpa",
        "model.logits=full",
        "model.transformer_impl=local",
    ]
    fp32_cfg = load_config(str(ROOT / "recipes/tiny-cpu.yaml"), [*overrides, "model.bf16=false"])
    bf16_cfg = load_config(str(ROOT / "recipes/tiny-cpu.yaml"), [*overrides, "model.bf16=true"])
    parallel = init_parallel_state(fp32_cfg.model, seed=1)
    fp32 = build_model_and_optimizer(fp32_cfg, parallel, VOCAB, 256)
    full = gather_full_state_dict(fp32.chunks[0].module)
    bf16 = build_model_and_optimizer(bf16_cfg, parallel, VOCAB, 256, init_state=full)
    model = bf16.chunks[0].module
    result = {
        "dtypes": {name: p.dtype for name, p in model.named_parameters()},
        "fp32_dtypes": {name: p.dtype for name, p in fp32.chunks[0].module.named_parameters()},
        "main_dtypes": [p.dtype for group in bf16.optimizer.param_groups for p in group["params"]],
        "loaded": all(
            torch.equal(p, full[name].to(torch.bfloat16)) for name, p in gather_full_state_dict(model).items()
        ),
    }
    tokens, positions, params = packed_row([10, 24, 30], VOCAB)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        logits = model(
            input_ids=tokens, position_ids=positions, attention_mask=None, packed_seq_params=params
        )
        reference = fp32.chunks[0].module(
            input_ids=tokens, position_ids=positions, attention_mask=None, packed_seq_params=params
        )
    result["warnings"] = [str(w.message) for w in caught]
    result["logits"], result["reference"] = logits, reference
    torch.save(result, out)


def test_bf16_model_holds_bf16_parameters_and_loads_fp32_weights(tmp_path):
    out = str(tmp_path / "bf16.pt")
    run_distributed(bf16_model_checks, 1, out)
    result = torch.load(out)
    dtypes = result["dtypes"]
    norms = [name for name in dtypes if "norm" in name]
    assert norms and all(result["fp32_dtypes"][name] == torch.float32 for name in dtypes)
    assert all(dtype == torch.bfloat16 for dtype in dtypes.values()), dtypes  # norms included
    assert result["main_dtypes"] and all(d == torch.float32 for d in result["main_dtypes"])
    assert result["loaded"]
    assert not [w for w in result["warnings"] if "Mismatch dtype" in w], result["warnings"]
    logits, reference = result["logits"], result["reference"]
    assert logits.dtype == torch.bfloat16 and reference.dtype == torch.float32
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)
