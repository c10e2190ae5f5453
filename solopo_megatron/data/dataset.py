"""Tokenised SoLoPO data on disk, global batches, and this rank's packed microbatches for a step.

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
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, Problem
from .packing import Group, Microbatch, dummy_group, pack_microbatch, plan_microbatches
from .records import ReadReport, Record, iter_records
from .reference_store import ReferenceStore
from .tokenize import EncodedSequence, SequenceEncoder, tokenizer_fingerprint

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("SOLOPO_CACHE_DIR", Path.home() / ".cache" / "solopo_megatron"))


def file_digest(path: str | Path) -> str:
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
        # Token ids are read per sequence with pread, not memory-mapped: mapped pages would count
        # toward this process's resident memory and grow with the file.
        self._tokens_fd = os.open(directory / "tokens.bin", os.O_RDONLY)
        count = self.meta["num_examples"]
        self.index = np.fromfile(directory / "index.bin", dtype=np.int64).reshape(count, len(self.roles), 3)
        self.example_ids = (directory / "ids.txt").read_text(encoding="utf-8").split("\n")[:count]

    def __len__(self) -> int:
        return len(self.example_ids)

    def __del__(self) -> None:
        fd = getattr(self, "_tokens_fd", None)
        if fd is not None:
            os.close(fd)

    def _read_tokens(self, offset: int, length: int) -> np.ndarray:
        data = os.pread(self._tokens_fd, 4 * length, 4 * offset)
        if len(data) != 4 * length:
            raise DataError(f"{self.directory / 'tokens.bin'}: truncated cache file (delete the folder to rebuild it)")
        return np.frombuffer(data, dtype=np.int32)

    def padded_length(self, i: int, pad_multiple: int) -> int:
        lengths = self.index[i, :, 1]
        return int((-(-lengths // pad_multiple) * pad_multiple).sum())

    def group(self, i: int, roles: Sequence[str] | None = None, ref_store: ReferenceStore | None = None) -> Group:
        roles = tuple(roles or self.roles)
        sequences = {}
        for role in roles:
            offset, length, response_start = self.index[i, self.roles.index(role)]
            sequences[role] = EncodedSequence(self._read_tokens(int(offset), int(length)), int(response_start))
        example_id = self.example_ids[i]
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
        """Tokenises ``path`` into the cache (or reuses a complete earlier build)."""
        roles = tuple(roles)
        fingerprint = data_fingerprint(path, encoder, roles)
        target = Path(cache_dir or DEFAULT_CACHE_DIR) / "tokenized" / fingerprint
        report = ReadReport(str(path))
        if (target / "meta.json").exists():
            dataset = cls(target)
            meta = dataset.meta
            report.num_records, report.num_skipped = meta["num_examples"], meta["num_skipped"]
            report.problems = [Problem(**p) for p in meta["problems"]]
            return dataset, report
        tmp = target.with_name(f"{fingerprint}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            num_tokens = _write_cache_files(tmp, encode_records(path, encoder, roles, on_error=on_error, report=report),
                                            roles, progress, f"tokenising {path}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta = {
            "cache_version": CACHE_VERSION, "fingerprint": fingerprint, "source": str(path), "roles": list(roles),
            "num_examples": report.num_records, "num_tokens": num_tokens, "num_skipped": report.num_skipped,
            "num_truncated": encoder.num_truncated, "problems": [dataclasses.asdict(p) for p in report.problems],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(target), report


def _write_cache_files(directory: Path, stream, roles, progress: bool, description: str) -> int:
    """Appends each example's token ids, index rows and id to the cache files; returns the token count."""
    num_tokens = 0
    with open(directory / "tokens.bin", "wb") as tokens, open(directory / "index.bin", "wb") as index, \
            open(directory / "ids.txt", "w", encoding="utf-8") as ids:
        for record, sequences in _with_progress(stream, progress, description):
            rows = np.zeros((len(roles), 3), dtype=np.int64)
            for r, role in enumerate(roles):
                seq = sequences[role]
                np.asarray(seq.ids, dtype=np.int32).tofile(tokens)
                rows[r] = (num_tokens, len(seq.ids), seq.response_start)
                num_tokens += len(seq.ids)
            rows.tofile(index)
            ids.write(record.id + "\n")
    return num_tokens


def _with_progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, unit=" records", mininterval=2.0, leave=False)


@dataclass(frozen=True)
class GlobalBatchSampler:
    """Example indices of each step's global batch: a fresh permutation per epoch, fixed by seed.

    ``global_batch_size`` counts examples (preference groups), not sequences or tokens. The last
    incomplete batch of an epoch is dropped (counted in ``dropped_per_epoch``).
    """

    num_examples: int
    global_batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.num_examples < self.global_batch_size:
            raise ValueError(f"{self.num_examples} examples cannot fill one global batch of {self.global_batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_examples - self.steps_per_epoch * self.global_batch_size

    def batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        start = within * self.global_batch_size
        return [int(i) for i in order[start : start + self.global_batch_size]]


def step_microbatches(
    dataset: TokenizedDataset,
    example_indices: Sequence[int],
    roles: Sequence[str],
    *,
    max_tokens: int,
    pad_multiple: int,
    pad_id: int,
    dp_size: int = 1,
    dp_rank: int = 0,
    ref_store: ReferenceStore | None = None,
    pad_to_max_tokens: bool = True,
) -> list[Microbatch]:
    """This DP rank's microbatches for one global batch (the same count on every DP rank)."""
    if max_tokens % pad_multiple:
        raise ValueError(f"max_tokens={max_tokens} must be a multiple of the padding multiple {pad_multiple}")
    lengths = [dataset.padded_length(i, pad_multiple) for i in example_indices]
    plan = plan_microbatches(lengths, max_tokens, dp_size)
    out = []
    for slot in plan[dp_rank]:
        if slot:
            groups = [dataset.group(example_indices[k], roles, ref_store) for k in slot]
            valid = None
        else:
            groups, valid = [dummy_group(roles, pad_multiple, pad_id)], [False]
        out.append(
            pack_microbatch(groups, roles, pad_multiple=pad_multiple, pad_id=pad_id,
                            row_length=max_tokens if pad_to_max_tokens else None, valid=valid)
        )
    return out
