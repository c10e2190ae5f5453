"""Synthetic multi-document QA records: determinism, answerability, format."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solopo_megatron.data.errors import DataError
from solopo_megatron.data.synthetic import (
    ADJECTIVES,
    ATTRIBUTES,
    NOUNS,
    PLACES,
    UNANSWERABLE,
    VERBS,
    VOCABULARY,
    count_words,
    generate_distractor_documents,
    generate_synthetic_records,
    synthetic_tokenizer_corpus,
    write_jsonl,
)

FIELDS = ("id", "question", "short_context", "long_context", "chosen", "rejected")
_FACT = re.compile(r"^The (\w+) of the (\w+ \w+) is (\d+)\.$")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_synthetic_records(60, seed=3)


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def test_deterministic_by_seed(records):
    assert generate_synthetic_records(60, seed=3) == records
    assert generate_synthetic_records(60, seed=4) != records
    # Record i depends only on (seed, i): a shorter run is a prefix of a longer one.
    assert generate_synthetic_records(7, seed=3) == records[:7]
    assert generate_distractor_documents(5, seed=1) == generate_distractor_documents(5, seed=1)
    assert generate_distractor_documents(5, seed=1) != generate_distractor_documents(5, seed=2)


def test_record_format(records):
    ids = [r["id"] for r in records]
    assert ids[:2] == ["syn-000000", "syn-000001"] and len(set(ids)) == len(ids)
    for r in records:
        assert all(isinstance(r[f], str) and r[f] for f in FIELDS)
        assert isinstance(r.get("system", ""), str)
        assert set(r["metadata"]) == {
            "gold_answer", "rejected_kind", "evidence_depth", "long_tokens", "num_distractors",
        }  # fmt: skip
        assert r["chosen"] != r["rejected"]
        assert r["short_context"] in r["long_context"]
        assert r["long_context"].count(r["short_context"]) == 1
        assert 0.0 <= r["metadata"]["evidence_depth"] <= 1.0
        assert r["metadata"]["long_tokens"] == count_words(r["long_context"])
    assert generate_synthetic_records(2, seed=0, id_prefix="demo")[1]["id"] == "demo-000001"


def test_fact_question_and_answers_agree(records):
    for r in records:
        gold = r["metadata"]["gold_answer"]
        match = _FACT.match(r["chosen"])
        assert match, r["chosen"]
        attribute, subject, value = match.groups()
        assert value == gold and attribute in ATTRIBUTES
        assert r["question"] == f"What is the {attribute} of the {subject}?"
        assert r["chosen"] in r["short_context"] and gold in r["short_context"]
        assert 1 <= len(re.findall(r"[.?!](?:\s|$)", r["short_context"])) <= 3
        if r["metadata"]["rejected_kind"] == "wrong":
            wrong = _FACT.match(r["rejected"])
            assert wrong and wrong.group(1, 2) == (attribute, subject) and wrong.group(3) != gold
        else:
            assert r["metadata"]["rejected_kind"] == "unanswerable"
            assert r["rejected"] == UNANSWERABLE


def test_fact_only_in_evidence(records):
    for r in records:
        attribute, subject, _ = _FACT.match(r["chosen"]).groups()
        key = f"{attribute} of the {subject}".lower()
        outside = r["long_context"].replace(r["short_context"], "\n")
        assert key not in outside.lower()
        assert not set(tokens(outside)) & set(ATTRIBUTES)


def test_long_target_and_depths(records):
    for r in records:
        # 300 words reached, overshooting by less than one document (<= 8 sentences of <= 14 words).
        assert 300 <= r["metadata"]["long_tokens"] < 300 + 8 * 14
        assert r["metadata"]["num_distractors"] >= 1
    depths = [r["metadata"]["evidence_depth"] for r in records]
    assert min(depths) < 0.2 and max(depths) > 0.8  # random depths cover the range
    kinds = {r["metadata"]["rejected_kind"] for r in records}
    assert kinds == {"wrong", "unanswerable"}


def test_rejected_kinds_and_short_target():
    only_wrong = generate_synthetic_records(10, seed=0, rejected_kinds=("wrong",))
    assert {r["metadata"]["rejected_kind"] for r in only_wrong} == {"wrong"}
    only_unans = generate_synthetic_records(10, seed=0, rejected_kinds=["unanswerable"])
    assert {r["rejected"] for r in only_unans} == {UNANSWERABLE}
    tiny = generate_synthetic_records(3, seed=0, long_target_words=0)
    assert all(r["long_context"] == r["short_context"] for r in tiny)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 4))
def test_property_answerable_only_from_evidence(seed, n):
    for r in generate_synthetic_records(n, seed=seed, long_target_words=120):
        assert r["short_context"] in r["long_context"]
        assert r["chosen"] != r["rejected"]
        gold = r["metadata"]["gold_answer"]
        assert gold in r["chosen"] and gold in r["short_context"]
        attribute, subject, _ = _FACT.match(r["chosen"]).groups()
        outside = r["long_context"].replace(r["short_context"], "\n")
        assert f"{attribute} of the {subject}" not in outside


def test_confounder_facts_make_the_answer_depend_on_the_context():
    """facts_per_context=3, in_context: both answers quote a value of the context; only the subject
    tells them apart, and every candidate is one of the context's values."""
    records = generate_synthetic_records(40, seed=9, facts_per_context=3, rejected_kinds=["in_context"])
    for r in records:
        sentences = re.split(r"(?<=\.) ", r["short_context"].replace("\n\n", " "))
        facts = [fact.groups() for fact in map(_FACT.match, sentences) if fact]
        assert len(facts) == 3 and len({subject for _, subject, _ in facts}) == 3
        assert len({subject.split()[1] for _, subject, _ in facts}) == 3  # distinct nouns, too
        assert len({value for _, _, value in facts}) == 3 and len({a for a, _, _ in facts}) == 1
        attribute, subject, gold = _FACT.match(r["chosen"]).groups()
        assert (attribute, subject, gold) in facts and gold == r["metadata"]["gold_answer"]
        rejected = _FACT.match(r["rejected"]).groups()
        assert rejected[:2] == (attribute, subject) and rejected[2] != gold
        assert rejected[2] in {value for _, _, value in facts}  # another value of the same context
        candidates = r["metadata"]["candidates"]
        assert candidates[0] == r["chosen"] and r["rejected"] in candidates
        assert sorted(_FACT.match(c).group(3) for c in candidates) == sorted(v for _, _, v in facts)
        assert r["short_context"] in r["long_context"]
    positions = {r["short_context"].split("\n\n").index(next(
        doc for doc in r["short_context"].split("\n\n") if r["metadata"]["gold_answer"] in doc
    )) for r in records}  # fmt: skip
    assert positions == {0, 1, 2}  # the asked fact is not always first


def test_one_fact_per_context_keeps_the_records_as_they_were():
    """The default (one fact) draws nothing new: no candidates, the same records as rejected kinds
    without in_context (the bundled recipe's data is unchanged)."""
    records = generate_synthetic_records(10, seed=0)
    assert all("candidates" not in r["metadata"] for r in records)
    assert records == generate_synthetic_records(10, seed=0, facts_per_context=1)


def test_distractor_documents():
    docs = generate_distractor_documents(30, seed=5, sentences_per_document=(2, 4))
    assert len(docs) == 30
    for doc in docs:
        sentences = re.findall(r"[.?!](?:\s|$)", doc)
        assert 2 <= len(sentences) <= 4
        assert not set(tokens(doc)) & set(ATTRIBUTES)
    assert generate_distractor_documents(0, seed=0) == []


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: generate_synthetic_records(-1, seed=0), "num_records"),
        (lambda: generate_synthetic_records(2, seed="0"), "seed"),
        (lambda: generate_synthetic_records(2, seed=0, long_target_words=-5), "long_target_words"),
        (lambda: generate_synthetic_records(2, seed=0, rejected_kinds=()), "rejected_kinds"),
        (lambda: generate_synthetic_records(2, seed=0, rejected_kinds=("odd",)), "rejected_kinds"),
        (lambda: generate_synthetic_records(2, seed=0, id_prefix=""), "id_prefix"),
        (lambda: generate_synthetic_records(2, seed=0, facts_per_context=0), "facts_per_context"),
        (lambda: generate_synthetic_records(2, seed=0, rejected_kinds=["in_context"]), "facts_per_context"),
        (lambda: generate_distractor_documents(2, seed=0, sentences_per_document=(0, 2)), "sentences"),
        (lambda: generate_distractor_documents(2, seed=0, sentences_per_document=(5, 2)), "sentences"),
    ],
)
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_vocabulary_covers_all_text(records):
    vocabulary = set(VOCABULARY)
    assert 300 <= len(vocabulary) <= 600
    assert all(w == w.lower() for w in vocabulary)
    # Attribute words are disjoint from the filler word lists, which keeps facts out of distractors.
    assert not set(ATTRIBUTES) & (set(NOUNS) | set(PLACES) | set(ADJECTIVES) | set(VERBS))
    for r in records[:20]:
        for field in (*FIELDS[1:], "system"):
            unknown = {t for t in tokens(r[field]) if not t.isdigit()} - vocabulary
            assert not unknown, (field, unknown)


def test_tokenizer_corpus_covers_vocabulary():
    lines = list(synthetic_tokenizer_corpus(seed=0))
    assert lines == list(synthetic_tokenizer_corpus(seed=0))
    seen = set()
    for line in lines:
        seen.update(line.split())
    assert set(VOCABULARY) <= seen
    assert {"The", "What", "There", "Every"} <= seen
    assert any(line.startswith("What is the") for line in lines)
    assert all(isinstance(line, str) and line for line in lines)


def test_write_jsonl_round_trip(tmp_path, records):
    extra = dict(records[0], id="unicode", question="Wie heißt der Code?")
    path = tmp_path / "out.jsonl"
    assert write_jsonl([*records[:5], extra], path) == 6
    raw = path.read_bytes()
    assert "heißt".encode() in raw  # ensure_ascii=False keeps UTF-8 text
    lines = raw.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [*records[:5], extra]


def test_write_jsonl_is_atomic(tmp_path, records):
    path = tmp_path / "out.jsonl"
    write_jsonl(records[:2], path)
    before = path.read_bytes()

    def failing():
        yield records[0]
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]  # no temporary file left
    with pytest.raises(DataError, match=r"output folder .*missing does not exist"):
        write_jsonl(records[:1], tmp_path / "missing" / "out.jsonl")
    with pytest.raises(DataError, match=r"is a directory"):
        write_jsonl(records[:1], tmp_path)
