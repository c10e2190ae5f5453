"""The go/no-go probe of an instruct-model experiment: the base model's reward accuracy, before any
training, under the short context and under long contexts of several sizes.

    python experiments/probe_base_model.py --config recipes/smollm2-135m-cpu.yaml \
        --long-words 150 300 600 --records 64 --out experiments/results/NAME/probe.json \
        dataset.synthetic.facts_per_context=3 'dataset.synthetic.rejected_kinds=[in_context]'

It scores the recipe's synthetic validation records (``dataset.synthetic``, regenerated with each
``--long-words`` as ``long_target_words``) with the recipe's pretrained model through Hugging Face
transformers (forward only, fp32), and reports per context the share of records whose chosen answer
gets the higher reward (the recipe's preference loss's reward; DPO's is 0 before training, so the
probe uses the mean log-prob for it). An experiment can only show long-context skill transferring if
the base model's long accuracy leaves room and is below its short accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _response_logps(model, sequences) -> tuple[list[float], list[int]]:
    """Sum and count of the response tokens' log-probs of each EncodedSequence, one forward each."""
    sums, counts = [], []
    for seq in sequences:
        ids = torch.tensor([list(seq.ids)], dtype=torch.long)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        sums.append(logps[seq.response_start - 1 :].sum().item())
        counts.append(len(seq.ids) - seq.response_start)
    return sums, counts


def probe(cfg, long_words: list[int], num_records: int, log=print) -> dict:
    """Per long-context size: the base model's short and long reward accuracy on ``num_records`` records."""
    from transformers import AutoModelForCausalLM

    from solopo_megatron.data.records import Record
    from solopo_megatron.data.synthetic import generate_synthetic_records
    from solopo_megatron.objectives import sequence_rewards
    from solopo_megatron.recipe.sources import sequence_encoder

    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint.pretrained_hf, torch_dtype=torch.float32)
    model.eval()
    encoder = sequence_encoder(cfg.dataset)
    loss = cfg.solopo.loss_config()
    if loss.needs_reference:  # DPO's reward is beta * (S - S_ref) = 0 for the base model itself
        loss = type(loss)(**{**loss.__dict__, "preference_loss": "simpo", "simpo_gamma": 0.0})
    syn = cfg.dataset.synthetic
    rows = []
    for words in long_words:
        start = time.perf_counter()
        raw = generate_synthetic_records(
            num_records, seed=syn.seed + 1, long_target_words=words, rejected_kinds=syn.rejected_kinds,
            facts_per_context=syn.facts_per_context, id_prefix="probe",
        )  # fmt: skip  # seed + 1: the validation records' seed (recipe/sources)
        fields = set(Record.__dataclass_fields__) - {"path", "line"}
        groups = [encoder.encode_group(Record(**{k: v for k, v in r.items() if k in fields})) for r in raw]
        logps, counts = {}, {}
        for role in ("short_chosen", "short_rejected", "long_chosen", "long_rejected"):
            sums, n = _response_logps(model, [g[role] for g in groups])
            logps[role] = torch.tensor(sums, dtype=torch.float64)
            counts[role] = torch.tensor(n, dtype=torch.float64)
        rewards = sequence_rewards(loss, logps, counts)
        short = (rewards["short_chosen"] > rewards["short_rejected"]).double()
        long = (rewards["long_chosen"] > rewards["long_rejected"]).double()
        row = {
            "long_target_words": words,
            "records": num_records,
            "short_tokens": sum(len(g["short_chosen"].ids) for g in groups) / num_records,
            "long_tokens": sum(len(g["long_chosen"].ids) for g in groups) / num_records,
            "short_accuracy": short.mean().item(),
            "long_accuracy": long.mean().item(),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        log(
            f"long_target_words {words}: short {row['short_tokens']:.0f} tokens acc {row['short_accuracy']:.3f} | "
            f"long {row['long_tokens']:.0f} tokens acc {row['long_accuracy']:.3f} ({row['seconds']:.0f} s)"
        )
    return {"model": cfg.checkpoint.pretrained_hf, "reward": loss.preference_loss, "sizes": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--long-words", type=int, nargs="+", required=True)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from solopo_megatron.recipe.loading import load_config

    cfg = load_config(args.config, args.overrides)
    result = {"config": args.config, "overrides": args.overrides, **probe(cfg, args.long_words, args.records)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
