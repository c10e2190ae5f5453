"""Short-to-long construction: bury a record's evidence among distractor documents.

SoLoPO trains on pairs of inputs that differ only in how much irrelevant text surrounds the
evidence. Following the paper (RULER-style synthesis), the long context is built from the short one
by drawing distractor documents until a token budget is reached and inserting the short context,
verbatim and in one piece, between two documents at a chosen fractional depth. Verbatim insertion
is what lets record validation check ``short_context in long_context``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from solopo_megatron.data.errors import DataError, Problem
from solopo_megatron.data.files import DuplicateKeyError, has_invalid_unicode, loads_json, printable

__all__ = [
    "DEPTH_MODES",
    "DataError",
    "build_long_context",
    "build_long_records",
    "load_distractor_corpus",
    "record_seed",
]

DEPTH_MODES = ("fixed", "uniform", "random")

# A blank line is a line holding only spaces or tabs; one or more of them separate documents.
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


# --------------------------------------------------------------------------- corpus loading


def load_distractor_corpus(paths: str | PathLike | Iterable[str | PathLike]) -> list[str]:
    """Distractor documents from ``.txt`` files (blank-line separated) and ``.jsonl`` files
    (one object per line with a non-empty string field ``"text"``).

    Any problem (unreadable file, non-UTF-8 bytes, bad JSON, missing or empty ``text``, no
    documents at all) raises :class:`DataError` naming the file, the 1-based line and the field.
    """
    if isinstance(paths, (str, PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    documents: list[str] = []
    for path in paths:
        if path.is_dir():
            raise _error(path, None, None, "is a directory, not a .txt or .jsonl file")
        text = _read_utf8(path)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            documents.extend(_txt_documents(text))
        elif suffix == ".jsonl":
            documents.extend(_jsonl_documents(path, text))
        else:
            raise _error(path, None, None, f"unsupported extension {suffix!r} (expected .txt or .jsonl)")
    if not documents:
        names = ", ".join(str(p) for p in paths) or "<no files>"
        raise DataError(f"{names}: the distractor corpus is empty (no documents found)")
    return documents


def _error(path: Path, line: int | None, field: str | None, message: str) -> DataError:
    return DataError(str(Problem(str(path), line, field, message)))


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a byte order mark is no part of the text
    except OSError as exc:
        raise _error(path, None, None, f"cannot read file: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        field = "text" if path.suffix.lower() == ".jsonl" else None
        raise _error(path, line, field, f"invalid UTF-8 byte at offset {exc.start}") from exc
    # Normalise Windows/old-Mac line endings so blank-line splitting and line numbers agree.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _txt_documents(text: str) -> list[str]:
    return [doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip()]


def _jsonl_documents(path: Path, text: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no document
        try:
            obj = loads_json(line)
        except DuplicateKeyError as exc:
            raise _error(path, number, printable(exc.key), "duplicate key") from None
        except json.JSONDecodeError as exc:
            raise _error(path, number, None, f"bad JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise _error(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
        if "text" not in obj:
            raise _error(path, number, "text", "missing")
        value = obj["text"]
        if not isinstance(value, str):
            raise _error(path, number, "text", f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise _error(path, number, "text", "empty")
        if has_invalid_unicode(value):  # a lone surrogate would break the tokenizer and the output
            raise _error(path, number, "text", "invalid unicode")
        documents.append(value)
    return documents


# --------------------------------------------------------------------------- one long context


def build_long_context(
    short_context: str,
    distractors: Sequence[str],
    *,
    target_tokens: int,
    count_tokens: Callable[[str], int],
    depth: float,
    rng: random.Random,
    separator: str = "\n\n",
) -> tuple[str, dict[str, Any]]:
    """Bury ``short_context`` among distractor documents drawn with ``rng``.

    Documents are drawn until their tokens reach ``target_tokens`` minus the evidence's tokens
    (so the result overshoots the target by less than one document). A small corpus is reused,
    but the same document is never drawn twice in a row (unless the corpus has only one). The
    evidence goes between documents at fractional ``depth`` (0 = first, 1 = last). Returns the
    long context and ``{"depth", "long_tokens", "num_distractors"}``, where ``depth`` is the
    position actually achieved (distractors before the evidence / all distractors; 0.0 when
    there are none).
    """
    _check_str("short_context", short_context)
    _check_int("target_tokens", target_tokens, minimum=0)
    _check_depth("depth", depth)
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    if not isinstance(separator, str):
        raise ValueError(f"separator must be a string, got {type(separator).__name__}")
    needed = max(0, target_tokens - count_tokens(short_context))
    docs = _draw_documents(distractors, needed, count_tokens, rng)
    before = math.floor(depth * len(docs) + 0.5)  # round half up; Python's round() is half-even
    parts = docs[:before] + [short_context] + docs[before:]
    long_context = separator.join(parts)
    info = {
        "depth": before / len(docs) if docs else 0.0,
        "long_tokens": count_tokens(long_context),
        "num_distractors": len(docs),
    }
    return long_context, info


def _draw_documents(
    distractors: Sequence[str], needed: int, count_tokens: Callable[[str], int], rng: random.Random
) -> list[str]:
    """Draw documents until their token total reaches ``needed``; no index twice in a row."""
    if needed == 0:
        return []
    if len(distractors) == 0:
        raise ValueError("distractors is empty but distractor tokens are needed")
    lengths: dict[int, int] = {}  # a corpus document is tokenised once per call
    docs: list[str] = []
    total, previous = 0, None
    while total < needed:
        index = _draw_index(len(distractors), previous, rng)
        if index not in lengths:
            lengths[index] = _document_tokens(distractors, index, count_tokens)
        docs.append(distractors[index])
        total += lengths[index]
        previous = index
    return docs


def _draw_index(size: int, previous: int | None, rng: random.Random) -> int:
    """Uniform over the corpus, excluding ``previous`` (shift past it rather than re-draw)."""
    if previous is None or size == 1:
        return rng.randrange(size)
    index = rng.randrange(size - 1)
    return index + 1 if index >= previous else index


def _document_tokens(distractors: Sequence[str], index: int, count_tokens: Callable[[str], int]) -> int:
    doc = distractors[index]
    if not isinstance(doc, str):
        raise ValueError(f"distractors[{index}] must be a string, got {type(doc).__name__}")
    tokens = count_tokens(doc)
    # A zero-token document would never advance the budget (and could loop forever).
    if tokens <= 0:
        raise ValueError(f"distractors[{index}] has {tokens} tokens; every document needs at least one")
    return tokens


# --------------------------------------------------------------------------- record streams


def record_seed(seed: int, record_id: str) -> int:
    """A stable 64-bit seed from (seed, record id); hashlib, because Python's hash() is salted."""
    digest = hashlib.sha256(f"{seed}\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def build_long_records(
    records: Iterable[Mapping[str, Any]],
    distractors: Sequence[str],
    *,
    count_tokens: Callable[[str], int],
    target_tokens: int | None = None,
    compression_ratio: float | None = None,
    depth_mode: str = "random",
    depth: float = 0.5,
    num_depths: int = 5,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Stream copies of ``records`` with ``long_context`` built from ``short_context``.

    Give exactly one of ``target_tokens`` (absolute long-context length) or ``compression_ratio``
    (r >= 1: target = ceil(r * short tokens)). ``depth_mode``: ``"fixed"`` (always ``depth``),
    ``"uniform"`` (record i at (i % num_depths) / (num_depths - 1)) or ``"random"`` (uniform in
    [0, 1]). Each record's draws use an rng seeded from (seed, id), so its output does not depend
    on the other records (apart from the index in ``"uniform"`` mode). ``metadata`` gains
    ``evidence_depth``, ``long_tokens`` and ``num_distractors``; other keys are kept.
    Arguments are checked at call time (ValueError naming the argument); records lazily.
    """
    _check_length_args(target_tokens, compression_ratio)
    if depth_mode not in DEPTH_MODES:
        raise ValueError(f"depth_mode must be one of {DEPTH_MODES}, got {depth_mode!r}")
    _check_depth("depth", depth)
    _check_int("num_depths", num_depths, minimum=2)
    _check_int("seed", seed)
    if not callable(count_tokens):
        raise ValueError("count_tokens must be callable (str -> int)")
    if isinstance(distractors, (str, bytes)) or not isinstance(distractors, Sequence) or not distractors:
        raise ValueError("distractors must be a non-empty sequence of documents")
    return _stream(
        records, distractors, count_tokens, target_tokens, compression_ratio,
        depth_mode, depth, num_depths, seed,
    )  # fmt: skip


def _stream(
    records: Iterable[Mapping[str, Any]],
    distractors: Sequence[str],
    count_tokens: Callable[[str], int],
    target_tokens: int | None,
    compression_ratio: float | None,
    depth_mode: str,
    depth: float,
    num_depths: int,
    seed: int,
) -> Iterator[dict[str, Any]]:
    for index, record in enumerate(records):
        record_id, short_context, metadata = _record_fields(index, record)
        rng = random.Random(record_seed(seed, record_id))
        if depth_mode == "random":
            record_depth = rng.random()
        elif depth_mode == "uniform":
            record_depth = (index % num_depths) / (num_depths - 1)
        else:
            record_depth = depth
        target = target_tokens
        if target is None:
            # The small epsilon keeps float noise (1.1 * 10 = 11.000000000000002) from adding a token.
            target = math.ceil(compression_ratio * count_tokens(short_context) - 1e-9)
        long_context, info = build_long_context(
            short_context, distractors, target_tokens=target, count_tokens=count_tokens,
            depth=record_depth, rng=rng,
        )  # fmt: skip
        out = dict(record)
        out["long_context"] = long_context
        metadata.update(
            evidence_depth=info["depth"],
            long_tokens=info["long_tokens"],
            num_distractors=info["num_distractors"],
        )
        out["metadata"] = metadata
        yield out


def _record_fields(index: int, record: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The id, short context and a copy of the metadata of one record, checked."""
    if not isinstance(record, Mapping):
        raise DataError(f"record {index}: expected a JSON object, got {type(record).__name__}")
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise DataError(f"record {index}: field 'id' must be a non-empty string, got {record_id!r}")
    where = f"record {index} (id {record_id!r})"
    short_context = record.get("short_context")
    if not isinstance(short_context, str) or not short_context.strip():
        raise DataError(f"{where}: field 'short_context' must be a non-empty string")
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise DataError(f"{where}: field 'metadata' must be an object, got {type(metadata).__name__}")
    return record_id, short_context, dict(metadata)


# --------------------------------------------------------------------------- argument checks


def _check_length_args(target_tokens: int | None, compression_ratio: float | None) -> None:
    if (target_tokens is None) == (compression_ratio is None):
        raise ValueError("give exactly one of target_tokens or compression_ratio")
    if target_tokens is not None:
        _check_int("target_tokens", target_tokens, minimum=0)
        return
    if (
        isinstance(compression_ratio, bool)
        or not isinstance(compression_ratio, (int, float))
        or not math.isfinite(compression_ratio)
        or compression_ratio < 1
    ):
        raise ValueError(f"compression_ratio must be a finite number >= 1, got {compression_ratio!r}")


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_depth(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
