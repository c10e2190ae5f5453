"""``solopo-data``: build, validate and inspect SoLoPO data.

solopo-data synthetic --out train.jsonl --num-records 2000 --seed 0
solopo-data validate train.jsonl [--tokenizer tiny --max-long-length 4096]
solopo-data build-long short.jsonl --distractors docs/ --out long.jsonl --target-tokens 32768
solopo-data inspect train.jsonl --tokenizer tiny --max-tokens 4096 --cp 2
solopo-data tiny-tokenizer --out DIR [--overwrite]

Every output is written to a temporary file beside it and renamed into place only when complete;
an output that is also an input is refused.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from .data.errors import DataError, Problem
from .data.synthetic import DEFAULT_REJECTED_KINDS, REJECTED_KINDS
from .objectives import MODES, SoLoPOConfig, required_roles

# --------------------------------------------------------------------------- argparse types
# They turn a bad value into argparse's "error: argument --x: ..." (exit code 2) before any work.


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f"a finite number >= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _prompt_template(text: str) -> str:
    from .data.tokenize import prompt_template_problem

    problem = prompt_template_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer", default="tiny", help="'tiny' (bundled) or a local HF tokenizer directory"
    )
    parser.add_argument("--mode", choices=MODES, default="solopo")
    parser.add_argument("--align-rejected", action="store_true", help="SoLo-RA on both answers (4 sequences)")
    parser.add_argument("--max-short-length", type=_positive_int)
    parser.add_argument("--max-long-length", type=_positive_int)
    parser.add_argument("--truncate-long-context", action="store_true", help="cut distractor text to fit")
    parser.add_argument(
        "--prompt-template",
        type=_prompt_template,
        default=None,
        help="format string with {context} and {question}",
    )


def _encoder(args):
    from .data.tokenize import (
        DEFAULT_PROMPT_TEMPLATE,
        LengthLimits,
        PromptFormat,
        SequenceEncoder,
        load_tokenizer,
    )

    limits = LengthLimits(args.max_short_length, args.max_long_length, args.truncate_long_context)
    fmt = PromptFormat(prompt_template=args.prompt_template or DEFAULT_PROMPT_TEMPLATE)
    roles = required_roles(SoLoPOConfig(mode=args.mode, solo_ra_chosen_only=not args.align_rejected))
    return SequenceEncoder(load_tokenizer(args.tokenizer, label="--tokenizer"), fmt, limits), roles


def cmd_validate(args) -> int:
    """Checks data files record by record; prints every problem as file:line: field: problem."""
    from .data.dataset import encode_records
    from .data.records import ReadReport, validate_file

    if args.tokenizer_check:
        encoder, roles = _encoder(args)
        report = ReadReport(str(args.file))
        for _ in encode_records(args.file, encoder, roles, on_error="skip", report=report):
            pass
        if encoder.num_truncated:
            print(f"{encoder.num_truncated} long contexts would be truncated to fit", file=sys.stderr)
    else:
        report = validate_file(args.file)
    for problem in report.problems[: args.max_problems]:
        print(problem)
    if len(report.problems) > args.max_problems:
        print(f"... and {len(report.problems) - args.max_problems} more problems")
    # Warnings (allowed, likely mistakes) do not change the exit code.
    for warning in report.warnings[: args.max_problems]:
        print(f"warning: {warning}")
    if report.num_warnings > args.max_problems:
        print(f"... and {report.num_warnings - args.max_problems} more warnings")
    print(report.summary())
    return 0 if report.ok else 1


def cmd_synthetic(args) -> int:
    """Writes synthetic long-context QA records (JSONL) for tests and demos."""
    from .data.files import check_output_path
    from .data.synthetic import generate_synthetic_records, write_jsonl

    check_output_path(args.out, label=f"--out {args.out}")
    try:
        records = generate_synthetic_records(
            args.num_records,
            seed=args.seed,
            long_target_words=args.long_target_words,
            facts_per_context=args.facts_per_context,
            rejected_kinds=tuple(args.rejected_kinds),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    count = write_jsonl(records, args.out)
    print(f"wrote {count} records to {args.out}")
    return 0


def cmd_build_long(args) -> int:
    """Builds each record's long context from its short one by burying it in distractor text."""
    from .data.files import atomic_write, check_output_path, input_file_problem
    from .data.long_context import build_long_records, load_distractor_corpus
    from .data.records import IdRegistry, check_record
    from .data.tokenize import load_tokenizer

    # Every path is checked before any work, so no mistake leaves an output behind or empties an input.
    unreadable = input_file_problem(args.input)
    if unreadable:
        raise DataError.at(str(args.input), None, None, unreadable)
    paths = []
    for item in args.distractors:
        item = Path(item)
        if not item.exists():
            raise DataError(f"--distractors {item}: does not exist")
        found = (
            sorted(p for p in item.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if item.is_dir()
            else [item]
        )
        if not found:
            raise DataError(
                f"--distractors {item}: the distractor corpus is empty (no .txt or .jsonl files in the folder)"
            )
        paths.extend(found)
    check_output_path(args.out, [args.input, *paths], label=f"--out {args.out}")
    tokenizer = load_tokenizer(args.tokenizer, label="--tokenizer")

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    corpus = load_distractor_corpus(paths)
    current = {"line": 0}  # the input line of the record being built, for messages about it

    def short_records():
        # Short-context input: long_context may be absent or a placeholder, so read it leniently.
        for n, line in _numbered_lines(args.input):
            current["line"] = n
            yield _read_short_record(line, args.input, n)

    built = build_long_records(
        short_records(),
        corpus,
        count_tokens=count_tokens,
        target_tokens=args.target_tokens,
        compression_ratio=args.compression_ratio,
        depth_mode=args.depth_mode,
        depth=args.depth,
        num_depths=args.num_depths,
        seed=args.seed,
    )
    count = 0
    ids = IdRegistry()
    try:
        with atomic_write(args.out, [args.input, *paths], label=f"--out {args.out}") as handle:
            for record in built:
                # Each output record must pass validation; a failure names the input line it came from.
                line = current["line"]
                _, problems = check_record(record, str(args.input), line)
                first = None if problems else ids.add(record["id"], line)
                if first is not None:
                    problems = [
                        Problem(
                            str(args.input),
                            line,
                            "id",
                            f"duplicate id {record['id']!r} (first on line {first})",
                        )
                    ]
                if problems:
                    raise DataError("\n".join(str(p) for p in problems), problems[0])
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            if count == 0:
                raise DataError.at(str(args.input), None, None, "no records (empty file)")
    finally:
        ids.close()
    print(f"wrote {count} records with long contexts to {args.out}")
    return 0


def _numbered_lines(path):
    """(1-based line number, text) of the non-blank lines; invalid UTF-8 is a DataError naming the line."""
    with open(path, "rb") as handle:
        for n, raw in enumerate(handle, start=1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # a UTF-8 byte order mark is no part of the data
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError.at(
                    str(path), n, None, f"not valid UTF-8 (byte {error.start} of the line)"
                ) from None
            yield n, text


def _read_short_record(line: str, path, n: int) -> dict:
    from .data.files import DuplicateKeyError, has_invalid_unicode, loads_json, printable

    try:
        record = loads_json(line)
    except DuplicateKeyError as error:
        raise DataError.at(str(path), n, printable(error.key), "duplicate key") from None
    except json.JSONDecodeError as error:
        raise DataError.at(str(path), n, None, f"invalid JSON: {error.msg}") from None
    if not isinstance(record, dict):
        raise DataError.at(str(path), n, None, "expected a JSON object")
    for field in ("id", "question", "short_context", "chosen", "rejected"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise DataError.at(str(path), n, field, "missing, empty or not a string")
    for field, value in record.items():  # before the tokenizer sees a lone surrogate
        if has_invalid_unicode(field) or has_invalid_unicode(value):
            raise DataError.at(str(path), n, printable(field), "invalid unicode")
    return record


def cmd_inspect(args) -> int:
    """Tokenises a file and prints length statistics and how a global batch packs into microbatches."""
    from .data.dataset import TokenizedDataset
    from .data.loading import GlobalBatchSampler, step_microbatches
    from .data.packing import context_slots, pad_multiple_for, padded_group_lengths
    from .data.tokenize import pad_token_id

    # The layout options first: a budget that no padding multiple divides is refused before tokenising.
    multiple = pad_multiple_for(args.cp, args.tp, args.sequence_parallel)
    if args.max_tokens % multiple:
        factors = f"2 x --cp {args.cp}" + (f" x --tp {args.tp}" if args.sequence_parallel else "")
        raise DataError(
            f"--max-tokens {args.max_tokens}: must be a multiple of {multiple} ({factors}, the per-sequence "
            f"padding), e.g. {args.max_tokens // multiple * multiple or multiple}"
        )
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise DataError(f"--cache-dir {args.cache_dir}: is a file, not a folder")
    encoder, roles = _encoder(args)
    dataset, report = TokenizedDataset.build(
        args.file, encoder, roles, cache_dir=args.cache_dir, on_error="skip"
    )
    print(report.summary())
    if len(dataset) == 0:
        raise DataError(f"{args.file}: no valid records to inspect")
    print(f"cache: {dataset.directory}")
    table = dataset.lengths()
    for r, role in enumerate(roles):
        lengths = table[:, r, 0]
        responses = lengths - table[:, r, 1]
        print(
            f"{role:15s} tokens mean {statistics.fmean(lengths.tolist()):8.1f} max {int(lengths.max()):7d}"
            f"   response tokens mean {statistics.fmean(responses.tolist()):6.1f}"
        )
    share = args.share_prompt != "false"
    for slot in context_slots(roles, share):
        if len(slot) < 2:
            continue
        names = [roles[r] for r in slot]
        apart = table[:, slot, 0].sum(axis=1)
        together = apart - (len(slot) - 1) * (table[:, slot[0], 1] - 1)
        print(
            f"shared slot {' + '.join(names)}: tokens mean {statistics.fmean(together.tolist()):8.1f} max "
            f"{int(together.max()):7d}   ({statistics.fmean(apart.tolist()):.1f} apart: the prompt once, "
            f"{statistics.fmean(together.tolist()) / statistics.fmean(apart.tolist()):.0%} of the tokens)"
        )
    if share and all(len(slot) < 2 for slot in context_slots(roles, share)):
        print("prompts: no context carries two answers in this mode, nothing to share")
    # A preference group is never split across microbatches, so the largest one must fit the budget.
    group_tokens = padded_group_lengths(table[:, :, 0], table[:, :, 1], roles, multiple, share)
    largest = int(group_tokens.argmax())
    if group_tokens[largest] > args.max_tokens:
        raise DataError(
            f"--max-tokens {args.max_tokens}: the largest preference group ({args.file}: example "
            f"{dataset.example_id(largest)!r}, all its sequences together{', prompts shared' if share else ''}) needs {int(group_tokens[largest])} "
            f"padded tokens, and a group is never split across microbatches; raise --max-tokens to at least "
            f"{int(group_tokens[largest])} or lower --max-short-length/--max-long-length"
        )
    batch_size = min(args.global_batch_size, len(dataset))
    batch = GlobalBatchSampler(len(dataset), batch_size, seed=0).batch(0)
    pad_id = pad_token_id(encoder.tokenizer)
    mbs = step_microbatches(
        dataset,
        batch,
        roles,
        max_tokens=args.max_tokens,
        pad_multiple=multiple,
        pad_id=pad_id,
        dp_size=args.dp,
        dp_rank=0,
        share_prompt=share,
    )
    used = sum(int((mb.cu_seqlens[1:] - mb.cu_seqlens_padded[:-1]).sum()) for mb in mbs)
    print(
        f"first global batch ({batch_size} examples, dp={args.dp}, cp={args.cp}): {len(mbs)} microbatches of "
        f"{args.max_tokens} tokens per DP rank; rank 0 fill {used / (len(mbs) * args.max_tokens):.0%}; "
        f"{args.max_tokens // args.cp} tokens per CP rank; prompts {'shared' if share else 'not shared'} "
        f"(--share-prompt {args.share_prompt})"
    )
    return 0


def cmd_tiny_tokenizer(args) -> int:
    """Rebuilds the bundled tiny byte-level BPE tokenizer."""
    from .data.tiny_tokenizer import main

    return main(["--out", str(args.out)] + (["--overwrite"] if args.overwrite else []))


def build_parser() -> argparse.ArgumentParser:
    """The ``solopo-data`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="solopo-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a JSONL file; lists every bad line")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--max-problems", type=_non_negative_int, default=50, help="problems (and warnings) to list"
    )
    p.add_argument(
        "--no-tokenizer-check",
        dest="tokenizer_check",
        action="store_false",
        help="schema only: skip tokenising and the length limits",
    )
    _add_tokenizer_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("synthetic", help="generate synthetic multi-document QA records")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-records", type=_positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-target-words", type=_non_negative_int, default=300)
    p.add_argument(
        "--facts-per-context",
        type=_positive_int,
        default=1,
        help="facts per context: the asked one plus confounders (other subjects, same attribute)",
    )
    p.add_argument(
        "--rejected-kinds",
        nargs="+",
        choices=REJECTED_KINDS,
        default=list(DEFAULT_REJECTED_KINDS),
        help="rejected answer per record, drawn among these (in_context needs --facts-per-context >= 2)",
    )
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser("build-long", help="bury each short context among distractor documents")
    p.add_argument("input", type=Path, help="JSONL with id, question, short_context, chosen, rejected")
    p.add_argument("--distractors", nargs="+", required=True, help=".txt/.jsonl files or directories of them")
    p.add_argument("--out", type=Path, required=True)
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--target-tokens", type=_positive_int)
    length.add_argument(
        "--compression-ratio",
        type=_float_in(1.0, math.inf),
        help="long tokens = ratio x short-context tokens (>= 1)",
    )
    p.add_argument("--depth-mode", choices=("fixed", "uniform", "random"), default="random")
    p.add_argument(
        "--depth",
        type=_float_in(0.0, 1.0),
        default=0.5,
        help="evidence depth in [0, 1] for --depth-mode fixed",
    )
    p.add_argument(
        "--num-depths", type=_int_at_least(2), default=5, help="depth levels for --depth-mode uniform"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="tiny", help="tokenizer that counts the target length")
    p.set_defaults(func=cmd_build_long)

    p = sub.add_parser("inspect", help="tokenise (cached) and show lengths and packing")
    p.add_argument("file", type=Path)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--max-tokens", type=_positive_int, default=4096, help="tokens per packed microbatch")
    p.add_argument("--global-batch-size", type=_positive_int, default=32, help="examples per step")
    p.add_argument("--dp", type=_positive_int, default=1)
    p.add_argument("--cp", type=_positive_int, default=1)
    p.add_argument("--tp", type=_positive_int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument(
        "--share-prompt",
        choices=("auto", "true", "false"),
        default="auto",
        help="the answers of one context share a slot, as dataset.share_prompt (auto: shared, as with flex or "
        "sdpa attention; false for Transformer Engine's)",
    )
    _add_tokenizer_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tiny-tokenizer", help="rebuild the bundled tiny tokenizer")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder")
    p.set_defaults(func=cmd_tiny_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``solopo-data``: runs one subcommand; data and file errors print one line and exit with code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. permission denied, disk full: the file and the reason, no traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
