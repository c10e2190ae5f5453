"""Held-out long contexts at several lengths, built from the same validation records.

For ``eval.long_lengths``: each record's short context is buried anew among distractor documents at
every requested length with the short-to-long construction (:func:`build_long_context`: the evidence
verbatim, at a random depth), one rng per (seed, record, length), so every run and every parallel
layout evaluates the same texts. The distractors are the validation long contexts' own non-evidence
documents, so no extra corpus is needed and the filler matches the training data's.

Records that carry ``metadata.candidates`` (alternative answers; the synthetic generator writes them
with ``facts_per_context >= 2``) also yield one *candidate record* per other answer: the record with
that answer as its rejected response, for likelihood-based answer accuracy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .long_context import build_long_context, record_seed
from .records import evidence_pieces

__all__ = [
    "LongLength",
    "candidate_records",
    "distractor_pool",
    "long_eval_records",
    "parse_long_length",
]

_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*$")


@dataclass(frozen=True)
class LongLength:
    """One evaluated length: ``tokens`` of context, or ``multiple`` x the record's own long context."""

    label: str
    tokens: int | None = None
    multiple: float | None = None

    def target_tokens(self, own_long_tokens: int) -> int:
        """Context tokens to build for a record whose long context has ``own_long_tokens``."""
        if self.tokens is not None:
            return self.tokens
        assert self.multiple is not None
        return max(1, round(self.multiple * own_long_tokens))


def parse_long_length(value: Any) -> LongLength:
    """``4096`` (context tokens) or ``"2x"`` / ``"0.5x"`` (a multiple of each record's long context).

    Raises ValueError saying which forms are accepted."""
    text = str(value).strip()
    if text.isdigit() and int(text) > 0:
        return LongLength(label=str(int(text)), tokens=int(text))
    match = _MULTIPLE.match(text)
    if match and float(match.group(1)) > 0:
        number = float(match.group(1))
        label = f"{int(number) if number.is_integer() else number}x"
        return LongLength(label=label, multiple=number)
    raise ValueError(
        f"must be a positive token count (4096) or a multiple of the long context (2x), got {value!r}"
    )


def distractor_pool(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The records' long-context documents that are not evidence (not in their short context),
    each once, in order of first appearance."""
    pool: dict[str, None] = {}
    for record in records:
        evidence = set(evidence_pieces(record["short_context"]))
        for doc in evidence_pieces(record["long_context"]):  # its documents: the same blank-line split
            if doc not in evidence:
                pool.setdefault(doc, None)
    return list(pool)


def long_eval_records(
    records: Sequence[Mapping[str, Any]],
    length: LongLength,
    pool: Sequence[str],
    *,
    count_tokens: Callable[[str], int],
    seed: int,
) -> list[dict[str, Any]]:
    """Copies of ``records`` with a long context of ``length`` built from their short context.

    Ids become ``"<id>@<label>"``; ``metadata`` gains ``source_id``, ``evidence_depth``,
    ``long_tokens`` and ``num_distractors``. Deterministic per (seed, record id, length label)."""
    out = []
    for record in records:
        rng = random.Random(record_seed(seed, f"{record['id']}@{length.label}"))
        target = length.target_tokens(count_tokens(record["long_context"]))
        long_context, info = build_long_context(
            record["short_context"], pool, target_tokens=target, count_tokens=count_tokens,
            depth=rng.random(), rng=rng,
        )  # fmt: skip
        metadata = dict(record.get("metadata") or {})
        metadata.update(
            source_id=record["id"],
            evidence_depth=info["depth"],
            long_tokens=info["long_tokens"],
            num_distractors=info["num_distractors"],
        )
        out.append(
            dict(record, id=f"{record['id']}@{length.label}", long_context=long_context, metadata=metadata)
        )
    return out


def candidate_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per alternative answer in ``metadata.candidates`` (other than the chosen one), with
    that answer as its rejected response; ids ``"<id>#<j>"`` (j: the candidate's index)."""
    out = []
    for record in records:
        candidates = (record.get("metadata") or {}).get("candidates") or []
        for j, answer in enumerate(candidates):
            if isinstance(answer, str) and answer.strip() and answer != record["chosen"]:
                out.append(dict(record, id=f"{record['id']}#{j}", rejected=answer))
    return out
