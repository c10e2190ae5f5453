"""Record validation: one test per bad-input class, each message naming file, line and field."""

from __future__ import annotations

import json

import pytest

from solopo_megatron.data.errors import DataError
from solopo_megatron.data.records import ReadReport, evidence_pieces, iter_records, validate_file


def good(i: int = 0, **overrides) -> dict:
    record = {
        "id": f"ex-{i}",
        "question": "What is the code of the red fox?",
        "short_context": "The code of the red fox is 42.",
        "long_context": "Filler text.\n\nThe code of the red fox is 42.\n\nMore filler.",
        "chosen": "The code is 42.",
        "rejected": "The text does not say.",
    }
    record.update(overrides)
    return record


def write_lines(path, lines) -> str:
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            handle.write(b"\n")
    return str(path)


BAD_LINES = {
    "invalid json": ('{"id": "x",', None, "invalid JSON"),
    "not an object": ("[1, 2]", None, "expected a JSON object"),
    "missing field": ({k: v for k, v in good().items() if k != "chosen"}, "chosen", "missing"),
    "empty field": (good(question="   "), "question", "empty"),
    "wrong type": (good(rejected=3), "rejected", "must be a string, got int"),
    "wrong optional type": (good(metadata=[1]), "metadata", "must be a JSON object"),
    "misspelt field": ({**good(), "choosen": "x"}, "choosen", "did you mean 'chosen'"),
    "evidence missing from long": (
        good(long_context="only filler here"),
        "long_context",
        "does not contain evidence piece 0",
    ),
    "chosen equals rejected": (good(rejected="The code is 42."), "rejected", "identical to chosen"),
    "line break in id": (good(id="a\nb"), "id", "contains a line break"),
    # JSON text with a lone surrogate escape: it decodes, but no tokenizer can encode it.
    "lone surrogate": (
        json.dumps(good()).replace('"The code is 42."', '"The code is \\ud800."'),
        "chosen",
        "invalid unicode",
    ),
    "lone surrogate in system": (
        json.dumps(good(system="x")).replace('"x"', '"\\udfff"'),
        "system",
        "invalid unicode",
    ),
    "lone surrogate in metadata": (
        json.dumps(good(metadata={"a": ["x"]})).replace('"x"', '"\\ud800"'),
        "metadata",
        "invalid unicode",
    ),
    "lone surrogate in a field name": (
        '{"\\ud800": 1, ' + json.dumps(good())[1:],
        "\\ud800",
        "invalid unicode",
    ),
    "duplicate key": (json.dumps(good())[:-1] + ', "chosen": "Other."}', "chosen", "duplicate key"),
    "duplicate key in metadata": (
        json.dumps(good())[:-1] + ', "metadata": {"k": 1, "k": 2}}',
        "k",
        "duplicate key",
    ),
    "chosen equals rejected up to whitespace": (
        good(rejected="  The code\n is  42. "),
        "rejected",
        "identical to chosen up to whitespace",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_names_file_line_and_field(tmp_path, case):
    bad, field, message = BAD_LINES[case]
    path = write_lines(tmp_path / "data.jsonl", [good(0), good(1), bad, good(3)])
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    text = str(info.value)
    assert text.startswith(f"{path}:3")
    if field:
        assert f"field '{field}'" in text
    assert message in text


def test_non_utf8_bytes(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good(0), b'{"id": "\xff\xfe"}'])
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid UTF-8"):
        list(iter_records(path))


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good(0), good(1), good(0)])
    with pytest.raises(DataError, match=r"data.jsonl:3: field 'id': duplicate id 'ex-0' \(first on line 1\)"):
        list(iter_records(path))


def test_empty_file(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"data.jsonl: no records \(empty file\)"):
        list(iter_records(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: does not exist"):
        list(iter_records(tmp_path / "nope.jsonl"))


def test_directory_is_not_reported_as_missing(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(DataError, match=r"data.jsonl: is a directory, not a data file"):
        list(iter_records(tmp_path / "data.jsonl"))


def test_skip_policy_counts_unicode_and_duplicate_key_problems(tmp_path):
    lines = [
        good(0),
        json.dumps(good(1)).replace('"The code is 42."', '"\\ud800"'),
        json.dumps(good(2))[:-1] + ', "id": "ex-9"}',
        good(3, rejected="The code is  42."),
        good(4),
    ]
    path = write_lines(tmp_path / "data.jsonl", lines)
    report = ReadReport(path)
    ids = [r.id for r in iter_records(path, on_error="skip", report=report)]
    assert ids == ["ex-0", "ex-4"] and report.num_skipped == 3
    assert [str(p).split(": ", 1)[1] for p in report.problems] == [
        "field 'chosen': invalid unicode",
        "field 'id': duplicate key",
        "field 'rejected': identical to chosen up to whitespace",
    ]


def test_whole_file_report_lists_every_bad_line(tmp_path):
    lines = [good(0), '{"broken', good(2), good(3, chosen=""), good(2), good(5)]
    path = write_lines(tmp_path / "data.jsonl", lines)
    report = validate_file(path)
    assert [p.line for p in report.problems] == [2, 4, 5]
    assert report.num_records == 3 and report.num_skipped == 3 and not report.ok
    assert "3 valid records, 3 problems, 3 lines skipped" in report.summary()


def test_skip_policy_counts_and_yields_the_rest(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good(0), "{}", good(2)])
    report = ReadReport(path)
    ids = [r.id for r in iter_records(path, on_error="skip", report=report)]
    assert ids == ["ex-0", "ex-2"] and report.num_skipped == 1
    assert {p.field for p in report.problems} >= {"id", "question", "chosen"}


def test_multi_piece_evidence_each_piece_checked(tmp_path):
    short = "Fact one is here.\n\nFact two is there."
    ok = good(short_context=short, long_context="x\n\nFact one is here.\n\ny\n\nFact two is there.")
    bad = good(1, short_context=short, long_context="x\n\nFact one is here.\n\ny")
    path = write_lines(tmp_path / "data.jsonl", [ok, bad])
    report = validate_file(path)
    assert report.num_records == 1
    assert "evidence piece 1" in str(report.problems[0]) and report.problems[0].line == 2
    assert evidence_pieces(short) == ["Fact one is here.", "Fact two is there."]


def test_records_keep_optional_fields_and_source(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [good(0, system="Be brief.", metadata={"gold": "42"})])
    (record,) = list(iter_records(path))
    assert record.system == "Be brief." and record.metadata == {"gold": "42"}
    assert record.source == f"{path}:1"
    assert record.to_json()["metadata"] == {"gold": "42"}
