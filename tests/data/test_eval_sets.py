"""Held-out long contexts at several lengths: parsing, the distractor pool, the rebuilt records and
the candidate records."""

from __future__ import annotations

import pytest

from solopo_megatron.data.eval_sets import (
    LongLength,
    candidate_records,
    distractor_pool,
    long_eval_records,
    parse_long_length,
)
from solopo_megatron.data.synthetic import count_words, generate_synthetic_records


@pytest.mark.parametrize(
    "value, expected",
    [
        ("4096", LongLength("4096", tokens=4096)),
        (512, LongLength("512", tokens=512)),
        ("2x", LongLength("2x", multiple=2.0)),
        (" 0.5x ", LongLength("0.5x", multiple=0.5)),
        ("2.0x", LongLength("2x", multiple=2.0)),
    ],
)
def test_parse_long_length(value, expected):
    assert parse_long_length(value) == expected


@pytest.mark.parametrize("value", ["0", "0x", "-5", "x", "2y", "", "1e3"])
def test_parse_long_length_rejects(value):
    with pytest.raises(ValueError, match="token count .* or a multiple"):
        parse_long_length(value)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_synthetic_records(
        12, seed=2, long_target_words=150, facts_per_context=3, rejected_kinds=["in_context"]
    )


def test_distractor_pool_holds_no_evidence(records):
    pool = distractor_pool(records)
    assert len(pool) == len(set(pool)) > 10
    for record in records:
        for fact in record["short_context"].split("\n\n"):
            assert fact not in pool
    attributes = ("code", "serial", "password", "pin", "ticket", "badge", "locker", "voucher")
    assert not any(word in doc.split() for doc in pool for word in attributes)


@pytest.mark.parametrize("label", ["1x", "2x", "4x", "600"])
def test_long_eval_records_reach_their_length(records, label):
    length = parse_long_length(label)
    pool = distractor_pool(records)
    built = long_eval_records(records, length, pool, count_tokens=count_words, seed=5)
    assert built == long_eval_records(records, length, pool, count_tokens=count_words, seed=5)
    assert built != long_eval_records(records, length, pool, count_tokens=count_words, seed=6)
    longest_document = max(map(count_words, pool))
    for source, record in zip(records, built):
        target = length.target_tokens(count_words(source["long_context"]))
        assert (
            target
            <= count_words(record["long_context"])
            < target + longest_document + count_words(source["short_context"])
        )
        assert record["id"] == f"{source['id']}@{length.label}"
        assert record["short_context"] in record["long_context"]  # the evidence, verbatim
        assert record["metadata"]["source_id"] == source["id"]
        assert record["metadata"]["long_tokens"] == count_words(record["long_context"])
        assert {k: record[k] for k in ("question", "chosen", "rejected")} == {
            k: source[k] for k in ("question", "chosen", "rejected")
        }
    depths = [record["metadata"]["evidence_depth"] for record in built]
    if label == "4x":
        assert min(depths) < 0.3 and max(depths) > 0.7  # the evidence at random depths


def test_candidate_records(records):
    candidates = candidate_records(records)
    assert len(candidates) == 2 * len(records)  # 3 answers each: the chosen one and two others
    first = [c for c in candidates if c["id"].startswith(records[0]["id"] + "#")]
    assert [c["id"] for c in first] == [f"{records[0]['id']}#1", f"{records[0]['id']}#2"]
    assert {c["rejected"] for c in first} == set(records[0]["metadata"]["candidates"][1:])
    assert all(c["chosen"] == records[0]["chosen"] for c in first)
    assert candidate_records(generate_synthetic_records(3, seed=0)) == []  # no candidates, none
