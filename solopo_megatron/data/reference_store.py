"""Reference log-prob store: one fp32 sum per (example id, role), independent of packing and layout.

On-disk format (versioned JSON lines, UTF-8):

    {"format": "solopo-ref-logps", "version": 1, "roles": [...], "data_fingerprint": "...", "info": {...},
     "entries": N}
    {"id": "ex-1", "short_chosen": -12.5, "short_rejected": -20.25, ...}
    ...

Values are fp32 numbers written as exact decimal floats, so a store round-trips bit for bit. It is
written to a temporary file and renamed, so a crash never leaves a half-written store behind (and a
failed write removes its temporary file). ``entries`` (the number of lines after the header; absent in
older stores) lets a reader tell a whole store from a truncated copy without parsing every value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .files import cache_file
from .records import ROLES

FORMAT = "solopo-ref-logps"
VERSION = 1


def _as_fp32(value: float) -> float:
    return float(np.float32(value))


@dataclass
class ReferenceStore:
    """Reference log-prob sums per example id and role, keyed to the data by a fingerprint."""

    roles: tuple[str, ...]
    data_fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    path: str = "<memory>"

    def add(self, example_id: str, sums: Mapping[str, float]) -> None:
        unknown = set(sums) - set(self.roles)
        if unknown:
            raise ValueError(f"roles {sorted(unknown)} are not in this store's roles {self.roles}")
        entry = self.values.setdefault(example_id, {})
        for role, value in sums.items():
            if not math.isfinite(value):
                raise ValueError(f"reference log-prob of {example_id!r} {role} is not finite: {value}")
            entry[role] = _as_fp32(value)

    def lookup(self, example_id: str, roles: Iterable[str]) -> dict[str, float]:
        """role -> sum for one example; a missing entry is a DataError naming id, role and store."""
        entry = self.values.get(example_id)
        if entry is None:
            raise DataError(
                f"{self.path}: no reference log-probs for example id {example_id!r} "
                "(recompute the store with solopo-ref-logps for this data)"
            )
        missing = [role for role in roles if role not in entry]
        if missing:
            raise DataError(
                f"{self.path}: example id {example_id!r} has no reference log-prob for {', '.join(missing)}"
            )
        return {role: entry[role] for role in roles}

    def __len__(self) -> int:
        return len(self.values)

    def save(self, path: str | Path) -> None:
        """Writes the store atomically (scratch file + rename, ``files.cache_file``); on any failure the
        scratch file is removed and a write error is a DataError naming the path."""
        path = Path(path)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "roles": list(self.roles),
            "data_fingerprint": self.data_fingerprint,
            "info": self.info,
            "entries": len(self.values),
        }
        with cache_file(path, "reference store", fsync=True) as handle:
            handle.write(json.dumps(header) + "\n")
            for example_id in sorted(self.values):
                entry = {"id": example_id, **self.values[example_id]}
                handle.write(json.dumps(entry) + "\n")
        self.path = str(path)


def read_store_header(path: str | Path, *, data_fingerprint: str | None = None) -> dict:
    """The store's first line, checked: format, version, roles and (if given) the data fingerprint."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except OSError as error:
        raise DataError(f"{path}: cannot read reference store: {error.strerror or error}") from error
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path}:1: not a reference log-prob store (expected format {FORMAT!r})")
    if header.get("version") != VERSION:
        raise DataError(
            f"{path}:1: field 'version': store version {header.get('version')!r}, this code reads {VERSION}"
        )
    roles = tuple(header.get("roles") or ())
    if not roles or any(role not in ROLES for role in roles):
        raise DataError(f"{path}:1: field 'roles': expected a non-empty subset of {ROLES}, got {list(roles)}")
    if data_fingerprint is not None and header.get("data_fingerprint") != data_fingerprint:
        raise DataError(
            f"{path}:1: field 'data_fingerprint': the store was built for other data or tokenisation "
            f"({header.get('data_fingerprint')!r}, expected {data_fingerprint!r}); recompute it with solopo-ref-logps"
        )
    _check_complete(path, header)
    return header


def _check_complete(path: str, header: dict) -> None:
    """A cheap scan for a truncated or cut-off store: counts the entry lines (without parsing their
    numbers) against the header's ``entries`` and checks that the last line is whole JSON."""
    count, last, last_number = 0, b"", 1
    try:
        with open(path, "rb") as handle:
            handle.readline()
            for line_number, line in enumerate(handle, start=2):
                if line.strip():
                    count, last, last_number = count + 1, line, line_number
    except OSError as error:
        raise DataError(f"{path}: cannot read reference store: {error.strerror or error}") from error
    if last:
        try:
            whole = last.endswith(b"\n") and isinstance(json.loads(last), dict)
        except ValueError:  # invalid JSON or UTF-8
            whole = False
        if not whole:
            raise DataError(
                f"{path}:{last_number}: the last entry is cut off: the store is incomplete or corrupt; "
                "recompute it with solopo-ref-logps"
            )
    expected = header.get("entries")
    if expected is not None and expected != count:
        raise DataError(
            f"{path}: field 'entries': the header says {expected} entries, the file has {count}: "
            "the store is incomplete or corrupt; recompute it with solopo-ref-logps"
        )


def load_reference_store(path: str | Path, *, data_fingerprint: str | None = None) -> ReferenceStore:
    """Reads a store; checks its format, version and (if given) that it was built for this data."""
    header = read_store_header(path, data_fingerprint=data_fingerprint)
    path = str(path)
    roles = tuple(header["roles"])
    store = ReferenceStore(roles, header.get("data_fingerprint"), header.get("info") or {}, path=path)
    with open(path, encoding="utf-8") as handle:
        handle.readline()
        for line_number, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            example_id = entry.pop("id", None) if isinstance(entry, dict) else None
            if not isinstance(example_id, str):
                raise DataError(f"{path}:{line_number}: field 'id': missing or not a string")
            for role, value in entry.items():
                if role not in roles or not isinstance(value, (int, float)):
                    raise DataError(
                        f"{path}:{line_number}: field {role!r}: not a role of this store or not a number"
                    )
            store.values[example_id] = {role: _as_fp32(value) for role, value in entry.items()}
    return store
