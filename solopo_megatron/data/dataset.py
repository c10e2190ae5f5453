"""Tokenised SoLoPO data on disk (the per-step microbatches of a DP rank are built by ``loading``).

Tokenising streams the JSONL file into a cache directory keyed by the file's content, the
tokenizer, the prompt format, the length limits and the roles, so memory stays bounded whatever
the file size and a second run reuses the work. The cache holds flat int32 token ids, an int64
index [N, R, 3] of (offset, length, response start) and the example ids; it is memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import DataError, Problem
from .files import cache_directory, input_file_problem, remove_stale_scratch
from .packing import Group, padded_group_lengths
from .records import ReadReport, Record, iter_records, record_line
from .reference_store import ReferenceStore
from .tokenize import EncodedSequence, SequenceEncoder, tokenizer_fingerprint

# 3: records with lone surrogates, duplicate keys or chosen == rejected up to whitespace are now
# rejected, so a version-2 cache of the same file may hold examples a fresh build would skip.
CACHE_VERSION = 3
MAX_SKIPPED_PROBLEMS = 10  # problem lines kept for the trainer's start-up message
DEFAULT_CACHE_DIR = Path(os.environ.get("SOLOPO_CACHE_DIR", Path.home() / ".cache" / "solopo_megatron"))


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(path: str | Path, encoder: SequenceEncoder, roles: Sequence[str]) -> str:
    """Identifies tokenised content: file bytes, tokenizer, prompt format, limits and roles."""
    parts = {
        "cache_version": CACHE_VERSION,
        "file": file_digest(path),
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "format": dataclasses.asdict(encoder.fmt),
        "limits": dataclasses.asdict(encoder.limits),
        "roles": list(roles),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def encode_records(
    path: str | Path, encoder: SequenceEncoder, roles: Sequence[str], *, on_error: str, report: ReadReport
) -> Iterator[tuple[Record, dict[str, EncodedSequence]]]:
    """Streams (record, role -> encoded sequence); bad records raise or are skipped into ``report``."""
    for record in iter_records(path, on_error=on_error, report=report):
        try:
            yield record, encoder.encode_group(record, tuple(roles))
        except DataError as error:
            if on_error == "raise":
                raise
            report.num_records -= 1
            report.num_skipped += 1
            report.problems.append(error.problem or Problem(str(path), record.line, None, str(error)))


class TokenizedDataset:
    """Memory-mapped tokenised examples; ``group(i)`` rebuilds example i's sequences."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.roles: tuple[str, ...] = tuple(self.meta["roles"])
        self.fingerprint: str = self.meta["fingerprint"]
        # Everything is read per example with pread, not memory-mapped or loaded: mapped pages would
        # count toward this process's resident memory, and both would grow with the file.
        self._num_examples = self.meta["num_examples"]
        # Records dropped under on_error=skip, and the first problem lines, kept in meta.json so a
        # reused cache reports them as well as a fresh build.
        self.skipped: int = int(self.meta.get("num_skipped", 0))
        self.skipped_problems: list[str] = list(
            self.meta.get(
                "skipped_problems",
                [str(Problem(**p)) for p in self.meta.get("problems", [])[:MAX_SKIPPED_PROBLEMS]],
            )
        )
        names = ("tokens.bin", "index.bin", "id_index.bin", "ids.bin")
        self._fds = {name: os.open(directory / name, os.O_RDONLY) for name in names}

    def __len__(self) -> int:
        return self._num_examples

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _read(self, name: str, dtype, offset: int, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        data = os.pread(self._fds[name], size * count, size * offset)
        if len(data) != size * count:
            raise DataError(
                f"{self.directory / name}: truncated cache file (delete the folder to rebuild it)"
            )
        return np.frombuffer(data, dtype=dtype)

    def index_rows(self, i: int) -> np.ndarray:
        """[R, 3] int64 of example i: per role (token offset, length, response start)."""
        return self._read("index.bin", np.int64, i * len(self.roles) * 3, len(self.roles) * 3).reshape(-1, 3)

    def example_id(self, i: int) -> str:
        start, length = self._read("id_index.bin", np.int64, 2 * i, 2)
        return self._read("ids.bin", np.uint8, int(start), int(length)).tobytes().decode("utf-8")

    @property
    def example_ids(self) -> list[str]:
        """All ids (O(N) memory: for inspection and tests, not the training path)."""
        return [self.example_id(i) for i in range(len(self))]

    def lengths(self) -> np.ndarray:
        """[N, R, 2] int64 (sequence length, response start), read in one pass (for inspection)."""
        rows = np.fromfile(self.directory / "index.bin", dtype=np.int64).reshape(
            len(self), len(self.roles), 3
        )
        return rows[:, :, 1:3]

    def padded_group_lengths(
        self, pad_multiple: int, share_prompt: bool = False, block: int = 1 << 16
    ) -> Iterator[np.ndarray]:
        """Every example's padded group length (all its sequences, as a microbatch holds them, prompts
        shared or not), in order, ``block`` examples at a time (memory stays bounded whatever the file size)."""
        width = len(self.roles) * 3
        for start in range(0, len(self), block):
            count = min(block, len(self) - start)
            rows = self._read("index.bin", np.int64, start * width, count * width).reshape(count, -1, 3)
            yield padded_group_lengths(rows[:, :, 1], rows[:, :, 2], self.roles, pad_multiple, share_prompt)

    def padded_length(self, i: int, pad_multiple: int, share_prompt: bool = False) -> int:
        """Example i's padded group length (see ``padded_group_lengths``)."""
        rows = self.index_rows(i)[None]
        return int(
            padded_group_lengths(rows[:, :, 1], rows[:, :, 2], self.roles, pad_multiple, share_prompt)[0]
        )

    def group(
        self, i: int, roles: Sequence[str] | None = None, ref_store: ReferenceStore | None = None
    ) -> Group:
        roles = tuple(roles or self.roles)
        rows = self.index_rows(i)
        sequences = {}
        for role in roles:
            offset, length, response_start = rows[self.roles.index(role)]
            ids = self._read("tokens.bin", np.int32, int(offset), int(length))
            sequences[role] = EncodedSequence(ids, int(response_start))
        example_id = self.example_id(i)
        refs = ref_store.lookup(example_id, roles) if ref_store is not None else None
        return Group(example_id, sequences, refs)

    @classmethod
    def build(
        cls,
        path: str | Path,
        encoder: SequenceEncoder,
        roles: Sequence[str],
        *,
        cache_dir: str | Path | None = None,
        on_error: str = "raise",
        progress: bool = True,
    ) -> tuple[TokenizedDataset, ReadReport]:
        """Tokenises ``path`` into the cache (or reuses a complete earlier build).

        The dataset's ``skipped`` and ``skipped_problems`` say how many records ``on_error="skip"``
        dropped and why (the first :data:`MAX_SKIPPED_PROBLEMS` ``file:line: problem`` lines).
        """
        unreadable = input_file_problem(path)
        if unreadable:
            raise DataError.at(str(path), None, None, unreadable)
        roles = tuple(roles)
        fingerprint = data_fingerprint(path, encoder, roles)
        target = Path(cache_dir or DEFAULT_CACHE_DIR) / "tokenized" / fingerprint
        report = ReadReport(str(path))
        remove_stale_scratch(target.parent)  # a killed build's folder, whichever data it was for
        if (target / "meta.json").exists():
            dataset = cls(target)
            meta = dataset.meta
            report.num_records, report.num_skipped = meta["num_examples"], meta["num_skipped"]
            report.problems = [Problem(**p) for p in meta["problems"]]
            return dataset, report
        with cache_directory(target, "the tokenised cache", marker="meta.json") as tmp:
            num_tokens = _write_cache_files(
                tmp,
                encode_records(path, encoder, roles, on_error=on_error, report=report),
                roles,
                progress,
                f"tokenising {path}",
            )
            meta = {
                "cache_version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "source": str(path),
                "roles": list(roles),
                "num_examples": report.num_records,
                "num_tokens": num_tokens,
                "num_skipped": report.num_skipped,
                "num_truncated": encoder.num_truncated,
                "problems": [dataclasses.asdict(p) for p in report.problems],
                "skipped_problems": [str(p) for p in report.problems[:MAX_SKIPPED_PROBLEMS]],
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: it marks the cache complete
        return cls(target), report


def check_group_budget(
    dataset: TokenizedDataset,
    path: str | Path,
    *,
    max_tokens: int,
    pad_multiple: int,
    share_prompt: bool = False,
    label: str = "dataset.max_tokens",
) -> None:
    """Raises a DataError naming ``path:line``, the id and the token count of the first example whose
    preference group does not fit one microbatch of ``max_tokens`` (``label`` names that setting).

    A group is never split across microbatches, so such an example would stop the run when a step first
    draws it; checked before training instead. It is an error under either ``on_error`` policy: skipping
    it would make the data depend on ``max_tokens`` and the padding, which the data fingerprint (the
    reference store's key) leaves out. The length limits are in it: over-limit records are skipped."""
    over, first, offset = 0, None, 0
    for lengths in dataset.padded_group_lengths(pad_multiple, share_prompt):
        hits = np.flatnonzero(lengths > max_tokens)
        if first is None and hits.size:
            first = (offset + int(hits[0]), int(lengths[hits[0]]))
        over += int(hits.size)
        offset += lengths.size
    if first is None:
        return
    index, tokens = first
    example_id = dataset.example_id(index)
    layout = "prompts shared, slots" if share_prompt else "each"
    more = f" ({over} of {len(dataset)} examples are over it)" if over > 1 else ""
    raise DataError.at(
        str(path),
        record_line(path, example_id),
        None,
        f"example {example_id!r} needs {tokens} tokens ({len(dataset.roles)} sequences, {layout} padded to "
        f"multiples of {pad_multiple}), more than {label}={max_tokens}, and a preference group is never split across "
        f"microbatches{more}; raise {label} or set dataset.max_long_length (longer records are then "
        "refused, skipped under dataset.on_error=skip, or cut with dataset.truncate_long_context)",
    )


def _write_cache_files(directory: Path, stream, roles, progress: bool, description: str) -> int:
    """Appends each example's token ids, index rows and id to the cache files; returns the token count."""
    num_tokens = id_bytes = 0
    with (
        open(directory / "tokens.bin", "wb") as tokens,
        open(directory / "index.bin", "wb") as index,
        open(directory / "id_index.bin", "wb") as id_index,
        open(directory / "ids.bin", "wb") as ids,
    ):
        for record, sequences in _with_progress(stream, progress, description):
            rows = np.zeros((len(roles), 3), dtype=np.int64)
            for r, role in enumerate(roles):
                seq = sequences[role]
                np.asarray(seq.ids, dtype=np.int32).tofile(tokens)
                rows[r] = (num_tokens, len(seq.ids), seq.response_start)
                num_tokens += len(seq.ids)
            rows.tofile(index)
            encoded_id = record.id.encode("utf-8")
            np.array([id_bytes, len(encoded_id)], dtype=np.int64).tofile(id_index)
            ids.write(encoded_id)
            id_bytes += len(encoded_id)
    return num_tokens


def _with_progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: a terminal only. In a log file the bar's carriage returns would share a line with
    # whatever comes next (an error message among them).
    return tqdm(iterable, desc=description, unit=" records", mininterval=2.0, leave=False, disable=None)
