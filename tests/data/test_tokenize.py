"""Tokenisation: chat template, plain template, response masks, limits, truncation, the tiny tokenizer."""

from __future__ import annotations

import filecmp

import pytest

from solopo_megatron.data.errors import DataError
from solopo_megatron.data.records import ROLES, Record, evidence_pieces
from solopo_megatron.data.synthetic import generate_synthetic_records
from solopo_megatron.data.tiny_tokenizer import TINY_TOKENIZER_DIR, build_tiny_tokenizer
from solopo_megatron.data.tokenize import (
    LengthLimits,
    PromptFormat,
    SequenceEncoder,
    cut_distractor_text,
    load_tokenizer,
    pad_token_id,
    prompt_template_problem,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def record(**overrides) -> Record:
    raw = generate_synthetic_records(1, seed=3)[0]
    raw.update(overrides)
    return Record(
        **{k: raw[k] for k in ("id", "question", "short_context", "long_context", "chosen", "rejected")},
        system=raw.get("system"),
        path="data.jsonl",
        line=7,
    )


def test_chat_template_layout_and_response_mask(tokenizer):
    rec = record()
    groups = SequenceEncoder(tokenizer).encode_group(rec)
    assert set(groups) == set(ROLES)
    for role, seq in groups.items():
        context = rec.short_context if role.startswith("short") else rec.long_context
        response = rec.chosen if role.endswith("chosen") else rec.rejected
        prompt_text = tokenizer.decode(seq.ids[: seq.response_start])
        assert prompt_text.startswith("<|bos|><|system|>\n" + rec.system + "<|end|>\n<|user|>\n" + context)
        assert prompt_text.endswith("Question: " + rec.question + "<|end|>\n<|assistant|>\n")
        assert tokenizer.decode(seq.ids[seq.response_start :]) == response + "<|end|>"
    # Chosen and rejected share the prompt token for token.
    assert (
        groups["long_chosen"].ids[: groups["long_chosen"].response_start]
        == groups["long_rejected"].ids[: groups["long_rejected"].response_start]
    )


def test_plain_template_when_tokenizer_has_none(tokenizer):
    plain = load_tokenizer("tiny")
    plain.chat_template = None
    rec = record(system=None)
    seq = SequenceEncoder(plain, PromptFormat(prompt_template="Q: {question}\nC: {context}")).encode_group(
        rec, ("short_chosen",)
    )["short_chosen"]
    text = plain.decode(seq.ids[: seq.response_start])
    assert text == f"<|bos|>Q: {rec.question}\nC: {rec.short_context}\n\nAnswer: "


def test_only_requested_roles_are_encoded(tokenizer):
    out = SequenceEncoder(tokenizer).encode_group(record(), ("short_chosen", "short_rejected"))
    assert set(out) == {"short_chosen", "short_rejected"}


def test_bad_prompt_template():
    with pytest.raises(ValueError, match=r"prompt_template: unknown placeholder \{answer\}"):
        PromptFormat(prompt_template="{context} {answer}")


@pytest.mark.parametrize(
    "template, message",
    [
        ("{context}\n\nQuestion: {question}", None),
        ("{{literal}} {question} {context} {context}", None),
        ("{contxt} {question}", "unknown placeholder {contxt}; allowed: {context}, {question}"),
        ("{} {context} {question}", "unknown placeholder {}"),
        ("{context.x} {question}", "unknown placeholder {context.x}"),
        ("Context: {context}", "must contain {context} and {question}, got 'Context: {context}'"),
        ("no placeholders", "must contain {context} and {question}"),
        ("{context} {question", "malformed braces"),
        ("{context} } {question}", "malformed braces"),
        ("{context:d} {question}", "cannot be formatted"),
        (3, "must be a string, got int"),
    ],
)
def test_prompt_template_problem(template, message):
    problem = prompt_template_problem(template)
    if message is None:
        assert problem is None
        PromptFormat(prompt_template=template)
    else:
        assert problem is not None and message in problem and not problem.startswith("prompt_template")
        with pytest.raises(ValueError, match="prompt_template: "):
            PromptFormat(prompt_template=template)


def test_length_limit_error_names_file_line_and_field(tokenizer):
    encoder = SequenceEncoder(tokenizer, limits=LengthLimits(max_long_length=100))
    with pytest.raises(
        DataError,
        match=r"data.jsonl:7: field 'long_context': sequence of \d+ tokens exceeds "
        r"max_long_length=100 \(or set truncate_long_context",
    ):
        encoder.encode_group(record())
    encoder = SequenceEncoder(tokenizer, limits=LengthLimits(max_short_length=10))
    with pytest.raises(
        DataError, match=r"data.jsonl:7: field 'short_context': .* exceeds max_short_length=10"
    ):
        encoder.encode_group(record())


@pytest.mark.parametrize("limit", [120, 200, 300])
def test_truncation_cuts_only_distractors(tokenizer, limit):
    rec = record()
    encoder = SequenceEncoder(
        tokenizer, limits=LengthLimits(max_long_length=limit, truncate_long_context=True)
    )
    out = encoder.encode_group(rec)
    for role in ("long_chosen", "long_rejected"):
        seq = out[role]
        assert len(seq.ids) <= limit
        text = tokenizer.decode(seq.ids)
        for piece in evidence_pieces(rec.short_context):
            assert piece in text
        assert rec.question in text and text.endswith(
            (rec.chosen if role == "long_chosen" else rec.rejected) + "<|end|>"
        )
    assert encoder.num_truncated == 1  # one long prompt shortened for this record


def test_truncation_impossible_is_named(tokenizer):
    encoder = SequenceEncoder(tokenizer, limits=LengthLimits(max_long_length=40, truncate_long_context=True))
    with pytest.raises(DataError, match="cannot fit max_long_length=40 by cutting distractor text"):
        encoder.encode_group(record())


def test_cut_distractor_text_keeps_evidence_and_cuts_away_from_it():
    context = "aaa bbb ccc\n\nEVIDENCE HERE\n\nddd eee fff ggg hhh"
    cut = cut_distractor_text(context, ["EVIDENCE HERE"], excess_tokens=2, prompt_tokens=len(context) // 4)
    assert "EVIDENCE HERE" in cut and cut.startswith("aaa bbb ccc") and len(cut) < len(context)
    head = cut_distractor_text("aaa bbb ccc ddd eee\n\nEVIDENCE", ["EVIDENCE"], 2, 5)
    assert head.endswith("\n\nEVIDENCE") and not head.startswith("aaa")


def test_tiny_tokenizer_is_rebuilt_identically(tmp_path):
    from solopo_megatron.data.synthetic import synthetic_tokenizer_corpus

    build_tiny_tokenizer(tmp_path, synthetic_tokenizer_corpus(seed=0))
    assert filecmp.cmp(tmp_path / "tokenizer.json", TINY_TOKENIZER_DIR / "tokenizer.json", shallow=False)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path))) == tokenizer_fingerprint(
        load_tokenizer("tiny")
    )


def test_load_tokenizer_refuses_non_directories():
    with pytest.raises(DataError, match="is not a directory"):
        load_tokenizer("Qwen/Qwen2.5-7B-Instruct")


def test_load_tokenizer_names_a_folder_that_is_no_tokenizer(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"^--tokenizer: .* is not a tokenizer folder \(it holds none of"):
        load_tokenizer(str(tmp_path), label="--tokenizer")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in TINY_TOKENIZER_DIR.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(
        DataError, match=r"^tokenizer: .*broken.* is not a tokenizer folder \(JSONDecodeError"
    ):
        load_tokenizer(str(broken))


def test_pad_token_id_falls_back_to_eos(tokenizer):
    class Stub:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_token_id(Stub(0, 2)) == 0
    assert pad_token_id(Stub(None, 2)) == 2
    assert pad_token_id(tokenizer) == (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    with pytest.raises(DataError, match="neither a pad nor an eos"):
        pad_token_id(Stub(None, None))
