"""Worker for the layout tests: a few SoLoPO training steps under one TP/PP/CP/DP layout."""

from __future__ import annotations

import os

import torch
from distributed import megatron_on_cpu

MODES = ("solopo", "short_po", "long_po")


def tiny_overrides(
    tmp: str, mode: str, tp: int, pp: int, cp: int, variant: str = "base", **extra
) -> list[str]:
    values = {
        "model.num_layers": 2,
        "model.hidden_size": 32,
        "model.ffn_hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.num_query_groups": 2,
        "model.tensor_model_parallel_size": tp,
        "model.pipeline_model_parallel_size": pp,
        "model.context_parallel_size": cp,
        "train.global_batch_size": 8,
        "train.train_iters": 3,
        "train.log_interval": 1,
        # SGD: updates linear in the gradients, so weights can be compared tightly (Adam's g / sqrt(v)
        # turns fp32 noise on near-zero gradients into lr-sized differences).
        "optimizer.optimizer": "sgd",
        "optimizer.lr": 0.5,
        "scheduler.lr_warmup_iters": 0,
        "dataset.max_tokens": 512,
        "dataset.cache_dir": os.path.join(tmp, "cache"),
        "dataset.synthetic.num_train": 24,
        "dataset.synthetic.num_valid": 8,
        "dataset.synthetic.long_target_words": 40,
        "solopo.mode": mode,
        "solopo.preference_loss": "dpo",
        # At step 1 the policy is the reference, so the SoLo-RA gap is fp32 noise around 0, where
        # abs() has a sign-of-noise gradient; the squared distance is smooth there.
        "solopo.solo_ra_distance": "squared",
        "solopo.reference_store": os.path.join(tmp, f"ref-{variant}-{mode}.jsonl"),
        "rng.seed": 7,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@megatron_on_cpu
def run_layout(
    rank: int,
    world_size: int,
    tmp: str,
    tp: int,
    pp: int,
    cp: int,
    tag: str,
    extra: dict,
    variant: str = "base",
    modes: tuple[str, ...] = MODES,
) -> None:
    """Trains 3 steps per mode; rank 0 saves losses, grad norms and the full weights before and after.

    Runs of one ``variant`` (same architecture and optimizer) share initial weights and reference stores.
    """
    from megatron.core import parallel_state

    from solopo_megatron.megatron import trainer as training
    from solopo_megatron.megatron.weights import gather_full_state_dict
    from solopo_megatron.recipe.loading import load_config

    results = {}
    for mode in modes:
        cfg = load_config(None, tiny_overrides(tmp, mode, tp, pp, cp, variant, **extra))
        init_path = os.path.join(tmp, f"init-{variant}-{mode}.pt")
        init_state = torch.load(init_path) if os.path.exists(init_path) else None
        trainer = training.setup(cfg, init_state=init_state, log=lambda text: None)
        groups = (trainer.parallel.groups.tp, trainer.parallel.groups.pp)
        before = gather_full_state_dict(trainer.chunks[0], *groups)
        history = training.train(trainer)
        after = gather_full_state_dict(trainer.chunks[0], *groups)
        # Losses live on the last pipeline stage; send them to rank 0.
        steps = [
            [
                entry["train"].get("loss", float("nan")),
                entry["train"]["grad_norm"],
                entry["train"]["microbatches"],
            ]
            for entry in history
        ]
        values = torch.tensor(steps, dtype=torch.float64)
        last = torch.distributed.get_world_size() - 1 if trainer.parallel.pp > 1 else 0
        torch.distributed.broadcast(values, src=last)
        results[mode] = {"steps": values, "before": before, "after": after}
        if rank == 0 and init_state is None:
            torch.save(before, init_path)
        parallel_state.destroy_model_parallel()
    if rank == 0:
        torch.save(results, os.path.join(tmp, f"result-{tag}.pt"))
