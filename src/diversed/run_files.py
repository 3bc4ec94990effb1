"""Small file helpers for run folders (`diversed eval/train/mine --out`): atomic writes, a folder
lock, and the recorded settings a resumed run must match."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import UserInputError

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class RunSettings:
    """What every run folder over a task records first: the task, its split, the pair and how it samples.

    Evaluation and mining settings extend it (their settings.json keeps these keys first).
    """

    task: str
    split: str
    target: str
    draft: str
    dtype: str
    temperature: float


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the new one, never half."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def writable_folder(folder: Path) -> Path:
    """`folder`, created if needed and proven writable; a one-line error when it cannot be (an
    existing file, a path under a file, a read-only place, /proc)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserInputError(f"cannot write to the folder {str(folder)[:300]!r}: {exc.strerror or exc}; choose another --out") from None
    return folder


@contextmanager
def locked_folder(folder: Path, command: str = "diversed eval") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if needed) so two runs cannot interleave rows."""
    writable_folder(folder)
    with open(folder / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"another {command} is writing to {folder}; wait for it to finish or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def read_settings(path: Path) -> dict[str, Any]:
    """A run's recorded settings (a JSON object), or a one-line error when it is cut off or not an object."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is unreadable ({exc}); restore it or choose another --out") from None
    if not isinstance(stored, dict):
        raise UserInputError(f"{path} is not a settings object; restore it or choose another --out")
    return stored


def check_settings(path: Path, current: dict[str, Any], defaults: dict[str, Any], what: str = "run") -> None:
    """Record a new run's settings in `path`; refuse to resume a run whose recorded settings differ.

    A setting missing from the record counts as its value in `defaults` (settings added after a
    run started keep their default), so older runs still resume. Sections that are objects are
    compared key by key, with `defaults[section]` as their defaults.
    """
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(current, indent=2) + "\n")
        return
    differing = _differences(read_settings(path), current, defaults)
    if differing:
        raise UserInputError(
            f"{path.parent} holds a {what} with other settings ({'; '.join(differing)}); "
            "rerun with the same settings to resume it, or choose another --out"
        )


def _differences(stored: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    differing = []
    for key, value in current.items():
        before = stored.get(key, defaults.get(key))
        if isinstance(value, dict) and isinstance(before, dict):
            differing += _differences(before, value, defaults.get(key) or {})
        elif before != value:
            differing.append(f"{key}: {before!r} there, {value!r} now")
    return differing


def read_rows(path: Path, required: tuple[str, ...], kind: str) -> list[dict[str, Any]]:
    """The JSON rows of a run's `path` written so far (an empty list before the first).

    A last line cut off by an interruption is dropped from the file; an unreadable line is
    skipped with a warning; a row lacking a `required` key is an error (it is not `kind`).
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    rows = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"line {number} of {path} is not UTF-8; remove it to resume") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: ignoring unreadable line {number} of {path}", file=sys.stderr)
            continue
        if not isinstance(row, dict) or any(key not in row for key in required):
            raise UserInputError(f"line {number} of {path} is not {kind} (needs {', '.join(required)}); remove it to resume")
        rows.append(row)
    return rows
