"""Reading and writing data files safely: strict JSON lines, input checks and atomic outputs.

An output is written to a temporary sibling (same folder, so the rename cannot cross file systems)
and renamed over the target only when the whole write succeeded: a failed command leaves neither a
partial file nor an emptied input behind. The checks here run before any work, so a bad path is a
one-line :class:`DataError`, never a traceback.

The caches (tokenised data, synthetic data, evaluation sets, reference stores) write through
``cache_file`` / ``cache_directory``: their scratch sibling is named ``NAME.tmp-PID-HOST``, so a later
start can tell a leftover of a killed process (removed) from a write in progress (kept), and a write
that fails (a full disk) is a one-line DataError naming the path, with its scratch removed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO, Any

from .errors import DataError

__all__ = [
    "DuplicateKeyError",
    "atomic_directory",
    "atomic_write",
    "cache_directory",
    "cache_file",
    "check_output_path",
    "has_invalid_unicode",
    "input_file_problem",
    "loads_json",
    "printable",
    "remove_stale_scratch",
    "replace_folder",
    "same_file",
    "scratch_path",
]

PathArg = str | PathLike


# --------------------------------------------------------------------------- strict JSON


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (the standard library keeps the last silently)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


def loads_json(text: str) -> Any:
    """``json.loads`` that rejects duplicate keys in any object (DuplicateKeyError naming the key)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def has_invalid_unicode(value: Any) -> bool:
    """True if a string (or any string key or value nested in lists and dicts) holds a lone surrogate.

    JSON's ``\\ud800`` escapes decode to such code points; they cannot be encoded as UTF-8, so a
    tokenizer or a JSON writer would fail on them much later, far from the line that holds them.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_invalid_unicode(k) or has_invalid_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_invalid_unicode(v) for v in value)
    return False


def printable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so a message about it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- path checks


def input_file_problem(path: PathArg) -> str | None:
    """Why ``path`` cannot be read as a data file ('does not exist', 'is a directory, ...'), or None."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a data file"
    if not path.exists():
        return "does not exist"
    return None


def same_file(a: PathArg, b: PathArg) -> bool:
    """Whether two paths name one file: ``os.path.samefile`` when both exist (links included), else
    equal resolved paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def nearest_existing(path: PathArg) -> tuple[Path, str | None]:
    """The nearest existing folder at or above ``path`` (where a missing ``path`` would be created) and
    why nothing can be created there: ``"is a file"`` or ``"is not writable"``; None when it can."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return existing, "is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return existing, "is not writable"
    return existing, None


def check_output_path(
    path: PathArg, inputs: Iterable[PathArg] = (), *, label: str | None = None, directory: bool = False
) -> None:
    """Raises DataError unless ``path`` can be written: its folder exists, it is not a folder (or, with
    ``directory``, not a file) and it is none of ``inputs``. ``label`` names it in the message
    (default: the path; the CLI passes e.g. ``--out PATH``)."""
    path = Path(path)
    label = label or str(path)
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise DataError(f"{label}: the output folder {parent} {what}")
    if not directory and path.is_dir():
        raise DataError(f"{label}: is a directory; give a file name")
    if directory and path.exists() and not path.is_dir():
        raise DataError(f"{label}: is a file, not a folder")
    for item in inputs:
        if same_file(path, item):
            raise DataError(f"{label}: is also an input ({item}); write the output to another file")


def _new_sibling(path: Path, tag: str, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Creates a fresh hidden sibling ``.NAME.TAG-XXXXXXXX`` with ``create`` (which must fail if it exists)."""
    while True:
        candidate = path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue


# --------------------------------------------------------------------------- atomic outputs


@contextmanager
def atomic_write(
    path: PathArg, inputs: Sequence[PathArg] = (), *, label: str | None = None
) -> Iterator[IO[str]]:
    """Opens a temporary sibling of ``path`` for UTF-8 text (``\\n`` line ends); on a clean exit it
    replaces ``path``, on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    check_output_path(path, inputs, label=label)
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would (mkstemp forces 0o600).
    tmp, fd = _new_sibling(path, "tmp", lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(
    path: PathArg,
    *,
    overwrite: bool = False,
    markers: Sequence[str] = (),
    label: str | None = None,
) -> Iterator[Path]:
    """Yields a new temporary sibling folder of ``path``; on a clean exit it becomes ``path``.

    An existing ``path`` is replaced only with ``overwrite``, and only if it is empty or holds one of
    ``markers`` (so a mistyped ``--out`` never deletes an unrelated folder); the old folder is moved
    aside first and deleted after the new one is in place. On an exception the temporary folder goes.
    """
    path = Path(path)
    label = label or str(path)
    check_output_path(path, label=label, directory=True)
    if path.exists():
        if not overwrite:
            raise DataError(f"{label}: already exists; pass --overwrite to replace it")
        if markers and any(path.iterdir()) and not any((path / m).exists() for m in markers):
            raise DataError(f"{label}: refusing to replace a folder that holds none of {', '.join(markers)}")
    tmp, _ = _new_sibling(path, "tmp", lambda p: p.mkdir(0o777))
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: PathArg, path: PathArg) -> None:
    """``new`` becomes ``path``. An existing ``path`` is first moved to a fresh hidden sibling (never a
    fixed name, which could be anyone's) and deleted only once ``new`` is in place; if that fails, it is
    moved back."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    old, _ = _new_sibling(path, "old", lambda p: p.mkdir(0o700))
    old.rmdir()
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- cache writes


def _host_tag() -> str:
    """This host's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def scratch_path(path: PathArg) -> Path:
    """This process's scratch sibling of ``path``: ``NAME.tmp-PID-HOST``.

    The PID and host say whose it is: a cache may sit on a file system that several hosts share, where a
    PID means nothing on another host."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{_host_tag()}")


# NAME.tmp-PID-HOST; the older NAME.tmp-PID (no host) is judged on this host.
_SCRATCH = re.compile(r"(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-(?P<host>.+))?")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (another user's counts as alive)."""
    if pid <= 0:
        return True  # not a process id we could judge: keep what carries it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False  # no such PID can exist
    return True


def _is_stale(name: str, only: str | None) -> bool:
    """Whether ``name`` is the scratch of a process that no longer runs on this host."""
    match = _SCRATCH.fullmatch(name)
    if match is None or name.startswith(".") or (only is not None and match["name"] != only):
        return False
    if match["host"] is not None and match["host"] != _host_tag():
        return False  # another host's: its process cannot be checked from here
    return not _pid_alive(int(match["pid"]))


def remove_stale_scratch(folder: PathArg, name: str | None = None) -> list[Path]:
    """Removes the scratch files and folders in ``folder`` (of target ``name`` only, if given) left by
    processes that no longer run on this host (a SIGKILL or a lost node mid-write); returns them.

    A live process's scratch (another rank or run writing now) and another host's are kept."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet: nothing left over
        return []
    removed = []
    for entry in entries:
        if not _is_stale(entry.name, name):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _write_error(error: BaseException, path: Path, tmp: Path, what: str) -> DataError | None:
    """The one-line DataError for an OSError writing the cache ``path`` through ``tmp`` (a full disk, a
    read-only folder); None for any other error, such as one that names a file the writer was reading."""
    if not isinstance(error, OSError):
        return None
    named = error.filename
    if named is not None and not str(named).startswith((str(tmp), str(path))):
        return None
    return DataError(f"{path}: cannot write {what}: {error.strerror or error}")


def _make_parent(path: Path, what: str) -> None:
    """Creates the folder of a cache ``path`` (a DataError naming ``path`` if it cannot)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"{path}: cannot write {what}: {error.strerror or error} ({error.filename})"
        ) from error


@contextmanager
def cache_file(path: PathArg, what: str, *, fsync: bool = False) -> Iterator[IO[str]]:
    """Writes ``path`` (UTF-8 text) through its scratch sibling, renamed over it when the block ends.

    Stale scratch of ``path`` is removed first. Any failure removes the scratch; an OSError (e.g. no
    space left) becomes a DataError ``PATH: cannot write WHAT: reason``."""
    path = Path(path)
    tmp = scratch_path(path)
    if path.is_dir():
        raise DataError(f"{path}: cannot write {what}: is a directory; name a file")
    _make_parent(path, what)
    try:
        remove_stale_scratch(path.parent, path.name)
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)  # never a partial file behind (KeyboardInterrupt included)
        failure = _write_error(error, path, tmp, what)
        if failure is not None:
            raise failure from error
        raise


@contextmanager
def cache_directory(path: PathArg, what: str, *, marker: str) -> Iterator[Path]:
    """Yields a fresh scratch folder for ``path``; when the block ends it is renamed to ``path``.

    The block must write ``marker`` (the file that says the folder is complete) last. If another
    process completed ``path`` first, this copy is dropped and theirs kept. Stale scratch folders of
    any name in ``path``'s folder (which only the cache writes) are removed first. Any failure removes
    the scratch; an OSError (e.g. no space left) becomes a DataError ``PATH: cannot write WHAT: reason``."""
    path = Path(path)
    tmp = scratch_path(path)
    if path.exists() and not (path / marker).exists():  # not ours to replace, nor a cache to read
        raise DataError(f"{path}: an incomplete {what} (no {marker}) is in the way; delete it")
    _make_parent(path, what)
    try:
        remove_stale_scratch(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier failed try
        tmp.mkdir()
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / marker).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same build first
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_error(error, path, tmp, what)
        if failure is not None:
            raise failure from error
        raise
