"""Evaluation at several long-context lengths (``eval.long_lengths``), under the run's own layout.

At set-up, rank 0 builds the held-out records of every length from the validation file
(``data.eval_sets``) and every rank tokenises them (from the cache); DPO's rewards also need their
reference sums, which are computed once from the initial weights into a second store (kept in the
cache and beside the checkpoints, like the training store). At every evaluation each length's
records are scored forward-only with the same packing, CP sharding, TP vocabulary split, pipeline
schedule and response-only LM head as training, and reduced to:

- ``accuracy``: the chosen answer's reward above the rejected one's, under the long context;
- ``margin``: the mean of that reward difference;
- ``solo_ra_gap``: the mean of r(short context, chosen) - r(long context, chosen), the quantity the
  SoLo-RA term drives to zero (and ``solo_ra_gap_abs``, the mean of its absolute value);
- ``answer_accuracy`` (records with ``metadata.candidates``): the chosen answer has the highest
  log-prob sum among all candidate answers under the long context;
- ``context_tokens``: the mean context length in tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.dataset import TokenizedDataset
from ..data.eval_sets import (
    LongLength,
    candidate_records,
    distractor_pool,
    long_eval_records,
    parse_long_length,
)
from ..data.files import cache_directory
from ..data.records import ROLES, iter_records
from ..data.reference_store import ReferenceStore, load_reference_store, read_store_header
from ..data.synthetic import write_jsonl
from ..objectives import SoLoPOConfig, sequence_rewards
from ..recipe.errors import RecipeError
from ..recipe.schema import RecipeConfig
from ..recipe.sources import cache_dir, data_paths, initial_model_fingerprint, sequence_encoder
from .inputs import Data, rank_zero_first
from .scoring import Scores, score_dataset
from .step import StepContext

EVAL_REFERENCE_COPY = "eval_reference_logps.jsonl"  # a checkpoint root's copy of the eval store
CANDIDATE_ROLES = ("long_rejected",)  # a candidate record scores its alternative answer only
METRICS = ("accuracy", "answer_accuracy", "solo_ra_gap", "solo_ra_gap_abs", "margin", "context_tokens")


@dataclass
class LengthSet:
    """One evaluated length: its records (every role) and candidate records (the other answers)."""

    length: LongLength
    records: TokenizedDataset
    candidates: TokenizedDataset | None
    context_tokens: float  # mean context tokens of its records


def metric_key(label: str, name: str) -> str:
    """The eval-metrics key of one length's metric: ``long@2x/accuracy``."""
    return f"long@{label}/{name}"


def prepare_long_eval(cfg: RecipeConfig, rank: int, data: Data) -> list[LengthSet]:
    """The held-out sets of ``eval.long_lengths`` (rank 0 writes and tokenises first); [] when unset."""
    if not cfg.eval.long_lengths:
        return []
    valid_path = data_paths(cfg)[1]
    if data.valid is None or valid_path is None:
        raise RecipeError(
            "eval.long_lengths: needs validation data (dataset.valid_path or the synthetic data)"
        )
    lengths = []
    for i, value in enumerate(cfg.eval.long_lengths):
        try:
            lengths.append(parse_long_length(value))
        except ValueError as error:
            raise RecipeError(f"eval.long_lengths[{i}]: {error}") from None
    spec = {"valid": data.valid.fingerprint, "eval": asdict(cfg.eval), "on_error": cfg.dataset.on_error}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir(cfg) / "long_eval" / key
    encoder = sequence_encoder(cfg.dataset)
    failure: list[str | None] = [None]
    if rank == 0 and not (folder / "done").exists():
        try:
            _write_length_files(cfg, valid_path, lengths, folder, encoder.tokenizer)
        except Exception as error:  # every rank learns of it (no rank waits at a barrier for rank 0)
            failure = [str(error)]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RecipeError(f"eval.long_lengths: rank 0 could not build the evaluation sets: {failure[0]}")
    sets = rank_zero_first(
        rank, lambda: [_length_set(cfg, folder, length, encoder, rank == 0) for length in lengths]
    )
    for s in sets:
        _check_fits(s, data)
    return sets


def _write_length_files(
    cfg: RecipeConfig, valid_path: str, lengths: list[LongLength], folder: Path, tokenizer
) -> None:
    records = [record.to_json() for record in iter_records(valid_path, on_error=cfg.dataset.on_error)]
    records = records[: cfg.eval.num_records] if cfg.eval.num_records else records
    pool = distractor_pool(records)
    if not pool:
        raise RecipeError(
            f"eval.long_lengths: the validation long contexts of {valid_path} have no document outside their "
            "short context (documents are separated by blank lines) to use as distractors"
        )
    token_counts: dict[str, int] = {}

    def count_tokens(text: str) -> int:
        if text not in token_counts:
            token_counts[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return token_counts[text]

    with cache_directory(folder, "the evaluation sets", marker="done") as tmp:
        for length in lengths:
            built = long_eval_records(records, length, pool, count_tokens=count_tokens, seed=cfg.eval.seed)
            write_jsonl(built, tmp / f"{length.label}.jsonl")
            candidates = candidate_records(built) if cfg.eval.answer_accuracy else []  # empty: none scored
            write_jsonl(candidates, tmp / f"{length.label}-candidates.jsonl")
        (tmp / "done").write_text("")  # last: it marks the folder complete


def _length_set(cfg: RecipeConfig, folder: Path, length: LongLength, encoder, progress: bool) -> LengthSet:
    def build(name: str, roles: tuple[str, ...]) -> TokenizedDataset:
        return TokenizedDataset.build(
            folder / name, encoder, roles, cache_dir=cache_dir(cfg), on_error="raise", progress=progress
        )[0]

    path = folder / f"{length.label}.jsonl"
    with open(path, encoding="utf-8") as handle:
        tokens = [json.loads(line)["metadata"]["long_tokens"] for line in handle if line.strip()]
    has_candidates = (folder / f"{length.label}-candidates.jsonl").stat().st_size > 0
    return LengthSet(
        length,
        build(path.name, ROLES),
        build(f"{length.label}-candidates.jsonl", CANDIDATE_ROLES) if has_candidates else None,
        sum(tokens) / max(len(tokens), 1),
    )


def _check_fits(length_set: LengthSet, data: Data) -> None:
    if not len(length_set.records):
        raise RecipeError("eval.long_lengths: the validation data has no records to evaluate")
    for dataset in filter(None, (length_set.records, length_set.candidates)):
        longest = max(
            dataset.padded_length(i, data.pad_multiple, data.share_prompt) for i in range(len(dataset))
        )
        if longest > data.max_tokens:
            raise RecipeError(
                f"eval.long_lengths: {length_set.length.label} gives preference groups of {longest} tokens, "
                f"above dataset.max_tokens={data.max_tokens}; raise dataset.max_tokens or shorten the length"
            )


# ----------------------------------------------------------------------------- reference sums


def eval_fingerprint(sets: list[LengthSet]) -> str:
    parts = [(s.records.fingerprint, s.candidates.fingerprint if s.candidates else None) for s in sets]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def ensure_eval_reference(
    cfg: RecipeConfig,
    ctx: StepContext,
    chunks: list,
    data: Data,
    sets: list[LengthSet],
    log: Callable[[str], None],
    *,
    weights_are_initial: bool = True,
) -> ReferenceStore | None:
    """The eval sets' reference sums (DPO only; None otherwise): loaded from the cache or a checkpoint
    root's copy, else computed from the current weights (call before a checkpoint is loaded).

    ``weights_are_initial=False`` (a resumed run that started from ``checkpoint.pretrained_hf``: the
    model holds the seeded random init until the checkpoint loads) makes a missing store an error
    rather than a store of the wrong weights; so does ``solopo.compute_reference_if_missing: false``."""
    if not sets or not cfg.solopo.loss_config().needs_reference:
        return None
    from .reference import compute_reference_store

    fingerprint = eval_fingerprint(sets)
    path = cache_dir(cfg) / "reference" / f"eval-{fingerprint}-{initial_model_fingerprint(cfg)}.jsonl"
    if path.exists():
        return load_reference_store(path, data_fingerprint=fingerprint)
    # A resumed run's copy, unless it belongs to other evaluation sets (eval.* changed since).
    for root in filter(None, (cfg.checkpoint.load, cfg.checkpoint.save)):
        copy = Path(root) / EVAL_REFERENCE_COPY
        if copy.exists() and read_store_header(copy).get("data_fingerprint") == fingerprint:
            return load_reference_store(copy, data_fingerprint=fingerprint)
    if not weights_are_initial or not cfg.solopo.compute_reference_if_missing:
        why = (
            "this run resumes a checkpoint that started from checkpoint.pretrained_hf, whose weights are not "
            "loaded here"
            if not weights_are_initial
            else "solopo.compute_reference_if_missing is false"
        )
        raise RecipeError(
            f"eval.long_lengths: DPO's evaluation needs the initial weights' log-probs of these sets ({path}, "
            f"or {EVAL_REFERENCE_COPY} beside the checkpoints), and {why}; start the evaluation from the "
            "initial weights once (a fresh run, or --eval-only without checkpoint.load), or change eval.* back"
        )
    log(f"computing the long-context evaluation's reference log-probs from the initial weights -> {path}")
    # Candidates need none: answer accuracy compares the policy's own log-probs.
    return compute_reference_store(
        ctx, chunks, data, batch_size=cfg.train.global_batch_size, path=path, fingerprint=fingerprint,
        datasets=[(s.records, ROLES) for s in sets],
    )  # fmt: skip


# ----------------------------------------------------------------------------- evaluation


def evaluate_long_contexts(
    ctx: StepContext,
    chunks: list,
    data: Data,
    sets: list[LengthSet],
    reference: ReferenceStore | None,
    *,
    batch_size: int,
    records: list[dict] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Every length's metrics (keys ``long@<label>/<metric>``) on the logging rank; {} elsewhere.

    ``records``: a list that receives, on the logging rank, one row per held-out record and length
    (:meth:`RecordTable.rows`), for paired statistics between runs. ``log``: told when each length
    starts (an evaluation of long contexts can take minutes)."""
    out: dict[str, float] = {}
    for s in sets:
        if log is not None:
            log(
                f"evaluating {len(s.records)} held-out records at {s.length.label} (~{s.context_tokens:.0f} tokens)"
            )
        scores = score_dataset(ctx, chunks, data, s.records, ROLES, batch_size=batch_size)
        candidates = None
        if s.candidates is not None:
            candidates = score_dataset(
                ctx, chunks, data, s.candidates, CANDIDATE_ROLES, batch_size=batch_size
            )
        if scores is None:
            continue
        table = RecordTable.build(ctx.loss, scores, candidates, reference)
        metrics = table.metrics()
        metrics["context_tokens"] = s.context_tokens
        out.update({metric_key(s.length.label, name): value for name, value in metrics.items()})
        if records is not None:
            records.extend(table.rows(s.length.label))
    return out


@dataclass
class RecordTable:
    """Per held-out record (in id order): the reward margins (chosen - rejected) under the short and the
    long context, the SoLo-RA gap and, with candidates, whether the chosen answer is the likeliest."""

    ids: list[str]
    short_margin: torch.Tensor  # float64
    long_margin: torch.Tensor
    gap: torch.Tensor  # r(short, chosen) - r(long, chosen)
    answer_correct: dict[str, bool]  # records with candidates only

    @classmethod
    def build(
        cls, cfg: SoLoPOConfig, scores: Scores, candidates: Scores | None, reference: ReferenceStore | None
    ) -> RecordTable:
        ids = sorted(scores)
        logps = {role: torch.tensor([scores[i][0][role] for i in ids], dtype=torch.float64) for role in ROLES}
        counts = {
            role: torch.tensor([scores[i][1][role] for i in ids], dtype=torch.float64) for role in ROLES
        }
        ref = None
        if cfg.needs_reference:
            assert reference is not None, "DPO rewards need the evaluation's reference store"
            looked_up = [reference.lookup(i, ROLES) for i in ids]
            ref = {
                role: torch.tensor([entry[role] for entry in looked_up], dtype=torch.float64)
                for role in ROLES
            }
        rewards = sequence_rewards(cfg, logps, counts, ref)
        best_other: dict[str, float] = {}
        for example_id, (sums, _) in (candidates or {}).items():
            source = example_id.rpartition("#")[0]
            best_other[source] = max(best_other.get(source, -float("inf")), sums["long_rejected"])
        return cls(
            ids=ids,
            short_margin=rewards["short_chosen"] - rewards["short_rejected"],
            long_margin=rewards["long_chosen"] - rewards["long_rejected"],
            gap=rewards["short_chosen"] - rewards["long_chosen"],
            answer_correct={i: scores[i][0]["long_chosen"] > best_other[i] for i in ids if i in best_other},
        )

    def metrics(self) -> dict[str, float]:
        """Accuracy (margin > 0: a tie counts as wrong), mean margin, mean SoLo-RA gap and its mean
        absolute value, and answer accuracy where candidates were scored."""
        metrics = {
            "accuracy": (self.long_margin > 0).double().mean().item(),
            "margin": self.long_margin.mean().item(),
            "solo_ra_gap": self.gap.mean().item(),
            "solo_ra_gap_abs": self.gap.abs().mean().item(),
        }
        if self.answer_correct:
            metrics["answer_accuracy"] = sum(self.answer_correct.values()) / len(self.answer_correct)
        return metrics

    def rows(self, label: str) -> list[dict]:
        """One JSON-ready row per record: its source id, the length, both margins and decisions."""
        out = []
        for k, example_id in enumerate(self.ids):
            row = {
                "id": example_id.rpartition("@")[0] or example_id,
                "length": label,
                "short_margin": self.short_margin[k].item(),
                "long_margin": self.long_margin[k].item(),
                "short_correct": bool(self.short_margin[k] > 0),
                "long_correct": bool(self.long_margin[k] > 0),
            }
            if example_id in self.answer_correct:
                row["answer_correct"] = self.answer_correct[example_id]
            out.append(row)
        return out


def length_metrics(
    cfg: SoLoPOConfig, scores: Scores, candidates: Scores | None, reference: ReferenceStore | None
) -> dict[str, float]:
    """Accuracy, margin and SoLo-RA gap of the records' rewards; answer accuracy over their candidates."""
    return RecordTable.build(cfg, scores, candidates, reference).metrics()


def format_long_metrics(metrics: dict[str, float], sets: list[LengthSet]) -> str:
    """One log line's worth: per length, its tokens and metrics."""
    parts = []
    for s in sets:
        label = s.length.label
        values = " ".join(
            f"{name} {metrics[metric_key(label, name)]:.4g}"
            for name in METRICS
            if name != "context_tokens" and metric_key(label, name) in metrics
        )
        parts.append(f"{label} (~{s.context_tokens:.0f} tokens): {values}")
    return " | ".join(parts)
