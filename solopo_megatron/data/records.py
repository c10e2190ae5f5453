"""SoLoPO records: the JSONL schema, streaming reads and whole-file validation.

One example per line (TRL-like, so the short half reads as a normal preference pair):

    {"id": "...", "question": "...", "short_context": "...", "long_context": "...",
     "chosen": "...", "rejected": "...", "system": "... (optional)", "metadata": {...}}

The short context is the evidence: one or more documents separated by blank lines, each of which
must appear verbatim in the long context. Every problem is reported with file, line and field; a
whole-file validation lists every bad line. Nothing is dropped silently: ``on_error="skip"`` skips
bad lines and counts them in the returned report.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The schema's roles: the four sequences a record yields. The literal lives with the loss, whose public
# API (docs/loss.md) names it and which sits below the data layer; everything above the math imports
# it from here.
from ..objectives import ROLES as ROLES
from .errors import DataError, Problem
from .files import DuplicateKeyError, has_invalid_unicode, input_file_problem, loads_json, printable

TEXT_FIELDS = ("id", "question", "short_context", "long_context", "chosen", "rejected")
OPTIONAL_FIELDS = {"system": str, "metadata": dict}
KNOWN_FIELDS = TEXT_FIELDS + tuple(OPTIONAL_FIELDS)
_EVIDENCE_SPLIT = re.compile(r"\n\s*\n")
MAX_KEPT_WARNINGS = 1000  # warnings a report keeps in full (all are counted)


@dataclass(frozen=True)
class Record:
    """One validated SoLoPO example (a line of the JSONL file)."""

    id: str
    question: str
    short_context: str
    long_context: str
    chosen: str
    rejected: str
    system: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # where the record came from, for messages about it later on
    line: int = 0

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in TEXT_FIELDS}
        if self.system is not None:
            out["system"] = self.system
        if self.metadata:
            out["metadata"] = self.metadata
        return out


def evidence_pieces(short_context: str) -> list[str]:
    """The evidence documents of a short context (split on blank lines)."""
    return [piece.strip() for piece in _EVIDENCE_SPLIT.split(short_context) if piece.strip()]


def check_record(obj: Any, path: str, line: int) -> tuple[Record | None, list[Problem]]:
    """Validates one decoded JSON value; returns the record (None if invalid) and its problems."""
    if not isinstance(obj, dict):
        return None, [Problem(path, line, None, f"expected a JSON object, got {type(obj).__name__}")]
    problems = []
    for name in obj:
        if has_invalid_unicode(name):
            problems.append(Problem(path, line, printable(name), "invalid unicode"))
        elif name not in KNOWN_FIELDS:
            close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; put extra information under 'metadata'"
            problems.append(Problem(path, line, name, f"unknown field{hint}"))
    for name in TEXT_FIELDS:
        if name not in obj:
            problems.append(Problem(path, line, name, "missing"))
        elif not isinstance(obj[name], str):
            problems.append(Problem(path, line, name, f"must be a string, got {type(obj[name]).__name__}"))
        elif not obj[name].strip():
            problems.append(Problem(path, line, name, "empty"))
        elif has_invalid_unicode(obj[name]):
            problems.append(Problem(path, line, name, "invalid unicode"))
    for name, kind in OPTIONAL_FIELDS.items():
        if name in obj and obj[name] is not None and not isinstance(obj[name], kind):
            problems.append(
                Problem(
                    path,
                    line,
                    name,
                    f"must be a {'string' if kind is str else 'JSON object'}, got {type(obj[name]).__name__}",
                )
            )
        elif name in obj and has_invalid_unicode(obj[name]):
            # A lone surrogate (JSON "\\ud800") cannot be encoded: the tokenizer would fail much later.
            problems.append(Problem(path, line, name, "invalid unicode"))
    if problems:
        return None, problems
    if any(c in obj["id"] for c in "\r\n"):
        return None, [Problem(path, line, "id", "contains a line break")]
    long_context = obj["long_context"]
    for i, piece in enumerate(evidence_pieces(obj["short_context"])):
        if piece not in long_context:
            preview = piece if len(piece) <= 60 else piece[:57] + "..."
            problems.append(
                Problem(
                    path,
                    line,
                    "long_context",
                    f"does not contain evidence piece {i} of short_context: {preview!r}",
                )
            )
    if obj["chosen"] == obj["rejected"]:
        problems.append(Problem(path, line, "rejected", "identical to chosen"))
    elif obj["chosen"].split() == obj["rejected"].split():
        # Differing only in spacing, the pair would train on tokenisation noise, not on a preference.
        problems.append(Problem(path, line, "rejected", "identical to chosen up to whitespace"))
    if problems:
        return None, problems
    record = Record(
        id=obj["id"],
        question=obj["question"],
        short_context=obj["short_context"],
        long_context=long_context,
        chosen=obj["chosen"],
        rejected=obj["rejected"],
        system=obj.get("system"),
        metadata=obj.get("metadata") or {},
        path=path,
        line=line,
    )
    return record, []


def record_warnings(record: Record) -> list[Problem]:
    """What is allowed but likely a mistake in a valid record (``solopo-data validate`` prints it)."""
    if record.long_context.split() == record.short_context.split():  # equal, or equal up to spacing
        return [
            Problem(
                record.path,
                record.line,
                "long_context",
                f"id {record.id!r}: the same text as short_context (no distractor text), so SoLo-RA "
                "has nothing to align",
            )
        ]
    return []


class IdRegistry:
    """The ids seen so far, kept in a temporary SQLite file so memory does not grow with the data."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "" = a private temporary database on disk
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("PRAGMA cache_size = -8192")  # at most 8 MiB of page cache
        self._db.execute("CREATE TABLE ids (digest BLOB PRIMARY KEY, line INTEGER) WITHOUT ROWID")

    def add(self, example_id: str, line: int) -> int | None:
        """Records ``example_id``; returns the line it was first seen on if it is a duplicate."""
        digest = hashlib.blake2b(example_id.encode("utf-8"), digest_size=16).digest()
        try:
            self._db.execute("INSERT INTO ids VALUES (?, ?)", (digest, line))
            return None
        except sqlite3.IntegrityError:
            return self._db.execute("SELECT line FROM ids WHERE digest = ?", (digest,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass
class ReadReport:
    """What a pass over a file saw: records read, problems found, lines skipped."""

    path: str
    num_records: int = 0
    num_skipped: int = 0
    problems: list[Problem] = field(default_factory=list)
    num_warnings: int = 0  # valid records that are likely mistakes (record_warnings)
    warnings: list[Problem] = field(default_factory=list)  # the first MAX_KEPT_WARNINGS of them

    @property
    def ok(self) -> bool:
        return not self.problems

    def add_warnings(self, warnings: list[Problem]) -> None:
        """Counts warnings, keeping the first few (memory must not grow with the file)."""
        self.num_warnings += len(warnings)
        self.warnings.extend(warnings[: max(0, MAX_KEPT_WARNINGS - len(self.warnings))])

    def summary(self) -> str:
        text = f"{self.path}: {self.num_records} valid records"
        if self.problems:
            text += f", {len(self.problems)} problems"
        if self.num_skipped:
            text += f", {self.num_skipped} lines skipped"
        if self.num_warnings:
            text += f", {self.num_warnings} warnings"
        return text


def iter_records(
    path: str | Path, *, on_error: str = "raise", report: ReadReport | None = None
) -> Iterator[Record]:
    """Streams the valid records of a JSONL file.

    on_error: ``raise`` stops at the first bad line with a DataError naming file, line and field;
    ``skip`` skips bad lines, recording every problem and the skipped count in ``report``.
    Duplicate ids and an empty file are problems too.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be raise or skip, got {on_error!r}")
    path = str(path)
    report = report if report is not None else ReadReport(path)
    seen = IdRegistry()

    def fail(problems: list[Problem]) -> None:
        if on_error == "raise":
            raise DataError("\n".join(str(p) for p in problems), problems[0])
        report.problems.extend(problems)
        report.num_skipped += 1

    unreadable = input_file_problem(path)
    if unreadable:
        raise DataError.at(path, None, None, unreadable)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DataError.at(path, None, None, f"cannot read: {error.strerror or error}") from error
    try:
        with handle:
            for line_number, raw in enumerate(handle, start=1):
                if line_number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows may start a file with one
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    fail(
                        [
                            Problem(
                                path, line_number, None, f"not valid UTF-8 (byte {error.start} of the line)"
                            )
                        ]
                    )
                    continue
                try:
                    obj = loads_json(text)
                except DuplicateKeyError as error:
                    fail([Problem(path, line_number, printable(error.key), "duplicate key")])
                    continue
                except json.JSONDecodeError as error:
                    fail(
                        [
                            Problem(
                                path, line_number, None, f"invalid JSON: {error.msg} at column {error.colno}"
                            )
                        ]
                    )
                    continue
                record, problems = check_record(obj, path, line_number)
                if record is not None:
                    first = seen.add(record.id, line_number)
                    if first is not None:
                        problems = [
                            Problem(
                                path, line_number, "id", f"duplicate id {record.id!r} (first on line {first})"
                            )
                        ]
                        record = None
                if problems:
                    fail(problems)
                    continue
                report.num_records += 1
                report.add_warnings(record_warnings(record))
                yield record
    finally:
        seen.close()
    if report.num_records == 0 and report.num_skipped == 0:
        problem = Problem(path, None, None, "no records (empty file)")
        if on_error == "raise":
            raise DataError(str(problem), problem)
        report.problems.append(problem)


def record_line(path: str | Path, example_id: str) -> int | None:
    """The line of ``path`` that holds the valid record ``example_id`` (None if none does); reads the
    file again, for messages about a record found after it was read."""
    for record in iter_records(path, on_error="skip"):
        if record.id == example_id:
            return record.line
    return None


def validate_file(path: str | Path) -> ReadReport:
    """Reads a whole file and reports every problem (does not raise for bad lines)."""
    report = ReadReport(str(path))
    for _ in iter_records(path, on_error="skip", report=report):
        pass
    return report
