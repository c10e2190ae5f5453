"""Records -> token ids per role: chat template (or a plain template), response masks, length limits.

A sequence is ``prompt + response + eos``: the prompt is the tokenizer's chat template over
[system?, user: prompt_template.format(context=..., question=...)] with the generation prompt, the
response is tokenised on its own (no merges across the boundary). Only response tokens are scored.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .records import ROLES, Record, evidence_pieces

DEFAULT_PROMPT_TEMPLATE = "{context}\n\nQuestion: {question}"
PROMPT_PLACEHOLDERS = ("context", "question")
_MAX_TRUNCATION_ROUNDS = 64


def prompt_template_problem(template: str) -> str | None:
    """What is wrong with a prompt template (None if nothing): it must be a str.format template using
    exactly the placeholders {context} and {question}, each at least once, with literal braces doubled.

    The one rule for ``dataset.prompt_template`` and ``solopo-data --prompt-template``; the message has
    no key prefix, the caller names the key or option.
    """
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    allowed = ", ".join(f"{{{name}}}" for name in PROMPT_PLACEHOLDERS)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:  # a lone "{" or "}"
        return f"malformed braces ({error}) in {template!r}; write a literal brace as {{{{ or }}}}"
    for field in fields:
        if field not in PROMPT_PLACEHOLDERS:
            return f"unknown placeholder {{{field}}}; allowed: {allowed}"
    if not all(name in fields for name in PROMPT_PLACEHOLDERS):
        return f"must contain {{context}} and {{question}}, got {template!r}"
    try:  # format specs and conversions can still fail ("{context:d}", nested fields)
        template.format(context="", question="")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        return f"cannot be formatted ({error}): {template!r}"
    return None


@dataclass(frozen=True)
class PromptFormat:
    """How a record becomes the user turn: the prompt template and an optional system prompt."""

    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system: str | None = None  # default system prompt; a record's own "system" wins
    plain_template: str = "{system}{user}\n\nAnswer: "  # used when the tokenizer has no chat template

    def __post_init__(self) -> None:
        problem = prompt_template_problem(self.prompt_template)
        if problem:
            raise ValueError(f"prompt_template: {problem}")


@dataclass(frozen=True, eq=False)
class EncodedSequence:
    """A sequence's token ids and where its response (the scored tokens) starts."""

    ids: Sequence[int]  # a tuple when freshly tokenised, an int32 array when read from the cache
    response_start: int  # index of the first response token

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodedSequence):
            return NotImplemented
        return self.response_start == other.response_start and list(self.ids) == list(other.ids)

    @property
    def num_response_tokens(self) -> int:
        return len(self.ids) - self.response_start


@dataclass(frozen=True)
class LengthLimits:
    """Token limits of short and long sequences, and whether long contexts may be cut to fit."""

    max_short_length: int | None = None  # tokens of a whole short sequence (prompt + response)
    max_long_length: int | None = None
    truncate_long_context: bool = False  # cut distractor text (never evidence, question, response)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_available(name_or_path: str) -> bool:
    """Whether ``load_tokenizer`` can look here: ``tiny`` (bundled) or an existing local folder."""
    return name_or_path == "tiny" or Path(name_or_path).is_dir()


def load_tokenizer(name_or_path: str, label: str = "tokenizer"):
    """``tiny`` (the bundled tokenizer) or a local Hugging Face tokenizer directory; never downloads.

    A path that is not a directory, or a directory Hugging Face cannot load a tokenizer from, is a
    DataError whose message starts with ``label`` (the caller's key or option, e.g. ``--tokenizer``).
    """
    from transformers import AutoTokenizer

    if name_or_path == "tiny":
        from .tiny_tokenizer import TINY_TOKENIZER_DIR

        name_or_path = str(TINY_TOKENIZER_DIR)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise DataError(
            f"{label}: {name_or_path!r} is not a directory (use 'tiny' or a local tokenizer folder)"
        )
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception as error:  # transformers raises ValueError, OSError, KeyError, JSONDecodeError, ...
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            reason = f"it holds none of {', '.join(_TOKENIZER_FILES)}"
        else:
            first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            reason = f"{type(error).__name__}: {first_line[:200]}" if first_line else type(error).__name__
        raise DataError(f"{label}: {name_or_path!r} is not a tokenizer folder ({reason})") from None


def pad_token_id(tokenizer) -> int:
    """The id that pads packed rows: the tokenizer's pad token, else its eos token (the one rule)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer: it has neither a pad nor an eos token to pad sequences with")
    return int(tokenizer.eos_token_id)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever tokenisation could: vocabulary/merges, template and special tokens."""
    parts: dict[str, Any] = {
        "backend": tokenizer.backend_tokenizer.to_str()
        if hasattr(tokenizer, "backend_tokenizer")
        else repr(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SequenceEncoder:
    """Encodes the roles of a record; checks (and optionally enforces) length limits."""

    def __init__(self, tokenizer, fmt: PromptFormat | None = None, limits: LengthLimits | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt or PromptFormat()
        self.limits = limits or LengthLimits()
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer: it has no eos token, which ends every response")
        self.eos = tokenizer.eos_token_id
        self.num_truncated = 0  # long contexts shortened by truncate_long_context

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, record: Record, context: str) -> list[int]:
        system = record.system if record.system is not None else self.fmt.system
        user = self.fmt.prompt_template.format(context=context, question=record.question)
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}
            ]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self._text_ids(text)
        text = self.fmt.plain_template.format(system=f"{system}\n\n" if system else "", user=user)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._text_ids(text)

    def encode_group(self, record: Record, roles: tuple[str, ...] = ROLES) -> dict[str, EncodedSequence]:
        """role -> EncodedSequence for the requested roles; over-long -> DataError (or truncation)."""
        responses = {
            "chosen": self._text_ids(record.chosen) + [self.eos],
            "rejected": self._text_ids(record.rejected) + [self.eos],
        }
        out = {}
        for kind in ("short", "long"):
            wanted = [role for role in roles if role.startswith(kind)]
            if not wanted:
                continue
            longest = max(len(responses[role.split("_")[1]]) for role in wanted)
            prompt = self._prompt_within_limit(record, kind, longest)
            for role in wanted:
                out[role] = EncodedSequence(tuple(prompt + responses[role.split("_")[1]]), len(prompt))
        return out

    def _prompt_within_limit(self, record: Record, kind: str, response_tokens: int) -> list[int]:
        limit = self.limits.max_short_length if kind == "short" else self.limits.max_long_length
        context = record.short_context if kind == "short" else record.long_context
        prompt = self.prompt_ids(record, context)
        if limit is None or len(prompt) + response_tokens <= limit:
            return prompt
        field = f"{kind}_context"
        if kind == "short" or not self.limits.truncate_long_context:
            hint = "" if kind == "short" else " (or set truncate_long_context to cut distractor text)"
            raise DataError.at(
                record.path,
                record.line,
                field,
                f"sequence of {len(prompt) + response_tokens} tokens exceeds max_{kind}_length={limit}{hint}",
            )
        for _ in range(_MAX_TRUNCATION_ROUNDS):
            excess = len(prompt) + response_tokens - limit
            if excess <= 0:
                self.num_truncated += 1
                return prompt
            shorter = cut_distractor_text(context, evidence_pieces(record.short_context), excess, len(prompt))
            if shorter == context:
                break
            context = shorter
            prompt = self.prompt_ids(record, context)
        raise DataError.at(
            record.path,
            record.line,
            field,
            f"cannot fit max_long_length={limit} by cutting distractor text: evidence, question and "
            f"response alone need {len(prompt) + response_tokens} tokens",
        )


def _distractor_spans(context: str, evidence: list[str]) -> list[tuple[int, int]]:
    """Character spans of ``context`` outside every evidence occurrence (first occurrence each)."""
    protected = sorted(
        (start, start + len(piece)) for piece in evidence if (start := context.find(piece)) >= 0
    )
    spans, cursor = [], 0
    for start, end in protected:
        if start > cursor:
            spans.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < len(context):
        spans.append((cursor, len(context)))
    return spans


def cut_distractor_text(context: str, evidence: list[str], excess_tokens: int, prompt_tokens: int) -> str:
    """Removes about ``excess_tokens`` tokens of distractor text from the largest distractor span.

    A leading span loses its head, any other its tail (away from the evidence before it), at a
    whitespace boundary; the cut is sized by the prompt's characters per token (slightly over, so a few rounds suffice).
    """
    spans = _distractor_spans(context, evidence)
    if not spans:
        return context
    start, end = max(spans, key=lambda span: span[1] - span[0])
    chars_per_token = max(1.0, len(context) / max(1, prompt_tokens))
    cut = min(end - start, int(excess_tokens * chars_per_token * 1.1) + 1)
    if start > 0:  # a trailing or middle span: cut its tail; a leading span: cut its head
        new_end = end - cut
        while new_end > start and not context[new_end - 1].isspace():
            new_end -= 1
        return context[:new_end] + context[end:]
    new_start = start + cut
    while new_start < end and not context[new_start].isspace():
        new_start += 1
    return context[:start] + context[new_start:]
