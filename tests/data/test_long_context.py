"""Short-to-long construction: corpus loading, one long context, record streams."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solopo_megatron.data.errors import DataError
from solopo_megatron.data.long_context import (
    build_long_context,
    build_long_records,
    load_distractor_corpus,
    record_seed,
)


def words(text: str) -> int:
    return len(text.split())


# Distinct documents of 3..9 words, so each can be located in the output.
CORPUS = [" ".join(f"d{i}w{j}" for j in range(3 + i % 7)) for i in range(40)]
EVIDENCE = "The key fact is 42. It is stated here."


def make_records(n: int, prefix: str = "r") -> list[dict]:
    return [
        {
            "id": f"{prefix}{i}",
            "question": "q?",
            "short_context": f"Evidence number {i} is {i * 7}.",
            "long_context": "",
            "chosen": "yes",
            "rejected": "no",
            "metadata": {"source": "test", "n": i},
        }
        for i in range(n)
    ]


def pieces(long_context: str) -> list[str]:
    return long_context.split("\n\n")


# --------------------------------------------------------------------------- corpus loading


def test_load_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\n  \nsecond doc\r\n\r\nthird doc\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    fourth = json.dumps({"text": "fourth ünïcode doc"}, ensure_ascii=False)
    lines = [fourth, "", json.dumps({"text": "fifth"})]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_distractor_corpus([txt, str(jsonl)])
    assert docs == ["first doc\nline two", "second doc", "third doc", "fourth ünïcode doc", "fifth"]
    assert load_distractor_corpus(txt) == docs[:3]


@pytest.mark.parametrize(
    "lines, line_no, field",
    [
        (['{"text": "ok"}', "{not json"], 2, None),
        (['{"text": "ok"}', '{"body": "x"}'], 2, "text"),
        (['{"text": "ok"}', '{"text": "ok"}', '{"text": "  "}'], 3, "text"),
        (['{"text": 5}'], 1, "text"),
        (["[1, 2]"], 1, None),
        (['{"text": "ok"}', '{"text": "a", "text": "b"}'], 2, "text"),  # duplicate key
        (['{"text": "ok \\ud800"}'], 1, "text"),  # lone surrogate: invalid unicode
    ],
)
def test_jsonl_errors_name_file_line_field(tmp_path, lines, line_no, field):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_distractor_corpus([path])
    message = str(info.value)
    assert f"{path}:{line_no}" in message
    if field:
        assert f"'{field}'" in message


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text'.*UTF-8"):
        load_distractor_corpus([path])
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"fine\n\nfine\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.txt:4"):
        load_distractor_corpus(txt)


def test_empty_unreadable_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_distractor_corpus([empty])
    with pytest.raises(DataError, match="missing.txt"):
        load_distractor_corpus([tmp_path / "missing.txt"])
    other = tmp_path / "corpus.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus\.csv.*extension"):
        load_distractor_corpus([other])
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match=r"docs: is a directory"):
        (tmp_path / "docs").mkdir()
        load_distractor_corpus([tmp_path / "docs"])


# --------------------------------------------------------------------------- one long context


@settings(max_examples=60, deadline=None)
@given(
    target=st.integers(0, 400),
    depth=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
    corpus_size=st.integers(1, 40),
)
def test_long_context_properties(target, depth, seed, corpus_size):
    corpus = CORPUS[:corpus_size]
    long, info = build_long_context(
        EVIDENCE, corpus, target_tokens=target, count_tokens=words, depth=depth, rng=random.Random(seed)
    )
    parts = pieces(long)
    # The evidence is inserted verbatim, as one piece.
    assert EVIDENCE in long and parts.count(EVIDENCE) == 1
    docs = [p for p in parts if p != EVIDENCE]
    assert len(docs) == info["num_distractors"] and all(d in corpus for d in docs)
    # Target reached, overshooting by less than one document.
    assert info["long_tokens"] == words(long)
    needed = max(0, target - words(EVIDENCE))
    distractor_tokens = sum(words(d) for d in docs)
    assert distractor_tokens >= needed
    if docs:
        assert distractor_tokens - words(docs[-1]) < needed
    # The same document never twice in a row (the corpus has distinct documents).
    if corpus_size > 1:
        assert all(a != b for a, b in zip(docs, docs[1:]))
    # Depth: reported position matches the actual one and is the nearest achievable.
    before = parts.index(EVIDENCE)
    if docs:
        assert info["depth"] == before / len(docs)
        assert abs(info["depth"] - depth) <= 0.5 / len(docs) + 1e-12
    else:
        assert info["depth"] == 0.0 and long == EVIDENCE


def test_depth_extremes_and_determinism():
    kwargs = dict(target_tokens=200, count_tokens=words)
    first, info0 = build_long_context(EVIDENCE, CORPUS, depth=0.0, rng=random.Random(3), **kwargs)
    last, info1 = build_long_context(EVIDENCE, CORPUS, depth=1.0, rng=random.Random(3), **kwargs)
    assert first.startswith(EVIDENCE + "\n\n") and info0["depth"] == 0.0
    assert last.endswith("\n\n" + EVIDENCE) and info1["depth"] == 1.0
    again, _ = build_long_context(EVIDENCE, CORPUS, depth=0.0, rng=random.Random(3), **kwargs)
    other, _ = build_long_context(EVIDENCE, CORPUS, depth=0.0, rng=random.Random(4), **kwargs)
    assert again == first and other != first


def test_custom_separator_and_single_document_corpus():
    long, info = build_long_context(
        EVIDENCE, ["only doc here"], target_tokens=30, count_tokens=words, depth=0.5,
        rng=random.Random(0), separator=" || ",
    )  # fmt: skip
    parts = long.split(" || ")
    # 30 - 9 evidence words = 21 -> seven 3-word documents; a one-document corpus must repeat.
    assert parts.count(EVIDENCE) == 1 and info["num_distractors"] == len(parts) - 1 == 7
    assert info["depth"] == 4 / 7


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(depth=1.5), "depth"),
        (dict(depth=float("nan")), "depth"),
        (dict(target_tokens=-1), "target_tokens"),
        (dict(target_tokens=10.0), "target_tokens"),
        (dict(rng=0), "rng"),
        (dict(distractors=[]), "distractors"),
        (dict(distractors=["   "]), "distractors"),
        (dict(short_context=""), "short_context"),
    ],
)
def test_build_long_context_rejects_bad_arguments(kwargs, name):
    args = dict(
        short_context=EVIDENCE, distractors=CORPUS, target_tokens=100, count_tokens=words, depth=0.5,
        rng=random.Random(0),
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        build_long_context(args.pop("short_context"), args.pop("distractors"), **args)


# --------------------------------------------------------------------------- record streams


def test_records_stream_and_keep_fields():
    records = make_records(6)
    out = build_long_records(iter(records), CORPUS, count_tokens=words, target_tokens=80, seed=1)
    assert iter(out) is out  # a generator: nothing is built up front
    results = list(out)
    assert [r["id"] for r in results] == [r["id"] for r in records]
    for rec, res in zip(records, results):
        assert res["short_context"] in res["long_context"]
        assert res["metadata"]["long_tokens"] >= 80
        assert res["metadata"]["source"] == "test" and res["metadata"]["n"] == rec["metadata"]["n"]
        assert set(res["metadata"]) >= {"evidence_depth", "long_tokens", "num_distractors"}
        assert {k: res[k] for k in ("question", "chosen", "rejected")} == {
            k: rec[k] for k in ("question", "chosen", "rejected")
        }
    assert records[0]["long_context"] == "" and "long_tokens" not in records[0]["metadata"]  # not mutated


def test_records_stream_lazily():
    def endless():
        i = 0
        while True:
            yield make_records(1, prefix=f"x{i}-")[0]
            i += 1

    out = build_long_records(endless(), CORPUS, count_tokens=words, target_tokens=50)
    assert len([next(out) for _ in range(5)]) == 5


def test_records_without_metadata():
    record = {k: v for k, v in make_records(1)[0].items() if k not in ("metadata", "long_context")}
    (res,) = build_long_records([record], CORPUS, count_tokens=words, target_tokens=30)
    assert set(res["metadata"]) == {"evidence_depth", "long_tokens", "num_distractors"}


def test_random_mode_record_independent_of_others():
    records = make_records(8)
    alone = list(build_long_records(records[5:6], CORPUS, count_tokens=words, target_tokens=120, seed=7))
    together = list(build_long_records(records, CORPUS, count_tokens=words, target_tokens=120, seed=7))
    shuffled = list(build_long_records(records[::-1], CORPUS, count_tokens=words, target_tokens=120, seed=7))
    assert alone[0] == together[5] == shuffled[2]
    reseeded = list(build_long_records(records[5:6], CORPUS, count_tokens=words, target_tokens=120, seed=8))
    assert reseeded[0]["long_context"] != alone[0]["long_context"]
    depths = {r["metadata"]["evidence_depth"] for r in together}
    assert len(depths) > 1


def test_record_seed_is_stable():
    # A fixed value: the seed must not change between interpreter runs or Python versions.
    assert record_seed(0, "abc") == 0x7869B21142FE8E58
    assert record_seed(1, "abc") != record_seed(0, "abc") != record_seed(0, "abd")


def test_fixed_depth_mode():
    out = list(
        build_long_records(
            make_records(4), CORPUS, count_tokens=words, target_tokens=100, depth_mode="fixed", depth=0.0
        )
    )
    assert all(r["long_context"].startswith(r["short_context"]) for r in out)
    out = list(
        build_long_records(
            make_records(4), CORPUS, count_tokens=words, target_tokens=100, depth_mode="fixed", depth=1.0
        )
    )
    assert all(r["long_context"].endswith(r["short_context"]) for r in out)
    assert all(r["metadata"]["evidence_depth"] == 1.0 for r in out)


def test_uniform_depth_mode_cycles():
    # 12 documents of 5 words each -> 60 distractor tokens, so every depth in {0, .25, .5, .75, 1}
    # is achievable exactly.
    corpus = [" ".join(f"u{i}w{j}" for j in range(5)) for i in range(12)]
    records = [dict(r, short_context="one two three") for r in make_records(11)]
    out = list(
        build_long_records(
            records, corpus, count_tokens=words, target_tokens=63, depth_mode="uniform", num_depths=5
        )
    )
    depths = [r["metadata"]["evidence_depth"] for r in out]
    assert depths == [0.0, 0.25, 0.5, 0.75, 1.0] * 2 + [0.0]
    assert all(r["metadata"]["num_distractors"] == 12 for r in out)


def test_compression_ratio():
    records = make_records(5)
    out = list(build_long_records(records, CORPUS, count_tokens=words, compression_ratio=8.0, seed=2))
    for rec, res in zip(records, out):
        short = words(rec["short_context"])
        assert res["metadata"]["long_tokens"] >= 8 * short
        assert res["metadata"]["long_tokens"] < 8 * short + 9  # corpus documents have <= 9 words
    (same,) = build_long_records(records[:1], CORPUS, count_tokens=words, compression_ratio=1.0)
    assert same["long_context"] == records[0]["short_context"]
    assert same["metadata"]["num_distractors"] == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(), "target_tokens"),
        (dict(target_tokens=10, compression_ratio=2.0), "compression_ratio"),
        (dict(compression_ratio=0.5), "compression_ratio"),
        (dict(compression_ratio=float("inf")), "compression_ratio"),
        (dict(target_tokens=-3), "target_tokens"),
        (dict(target_tokens=10, depth_mode="middle"), "depth_mode"),
        (dict(target_tokens=10, depth=-0.1), "depth"),
        (dict(target_tokens=10, num_depths=1), "num_depths"),
        (dict(target_tokens=10, seed="x"), "seed"),
        (dict(target_tokens=10, distractors=[]), "distractors"),
        (dict(target_tokens=10, count_tokens=None), "count_tokens"),
    ],
)
def test_build_long_records_rejects_bad_arguments(kwargs, name):
    args = dict(distractors=CORPUS, count_tokens=words)
    args.update(kwargs)
    # Raised at call time, before any record is read.
    with pytest.raises(ValueError, match=name):
        build_long_records(make_records(2), args.pop("distractors"), **args)


def test_bad_records_name_the_field():
    bad = dict(make_records(1)[0], short_context="")
    with pytest.raises(DataError, match="short_context"):
        list(build_long_records([bad], CORPUS, count_tokens=words, target_tokens=10))
    bad = dict(make_records(1)[0], metadata=[1])
    with pytest.raises(DataError, match="metadata"):
        list(build_long_records([bad], CORPUS, count_tokens=words, target_tokens=10))
    bad = {k: v for k, v in make_records(1)[0].items() if k != "id"}
    with pytest.raises(DataError, match="'id'"):
        list(build_long_records([bad], CORPUS, count_tokens=words, target_tokens=10))
