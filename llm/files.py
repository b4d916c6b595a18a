"""Files that readers can trust: one atomic writer and one JSON-lines reader.

Everything the framework leaves on disk for another process (checkpoints, run.json, summary.json,
eval.json, token caches, tokenizer.json, completions) is written through `atomic_write`: a
temporary file beside the target, fsync, an optional check of what was written, rename. A reader,
or a resume after a crash, sees the old file or the whole new one, never a torn one.

Appended files (metrics.jsonl, samples.jsonl) may end in a torn line after a kill; `read_jsonl`
skips lines that are not JSON, and `json_lines` says which ones, for readers that must refuse them.

Files a user points a command at (corpora, prompts, tasks, CSV, run.json, tokenizers) are read
through `checked_path`, `read_input_text`, `read_input_json` and `read_input_jsonl`: anything wrong with them (missing,
a directory where a file is needed or the reverse, unreadable, not UTF-8, empty, not JSON) is an
`InputError` naming the file, its key and the fix, which every CLI turns into exit code 2.

This module imports nothing of the project, so every layer (tokenizer, data, checkpoints, runs)
may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional


class InputError(ValueError):
    """A file a command was given cannot be used; the message names the key, the file and the fix.
    The CLIs print it and exit 2 (as for a ConfigError), without a traceback."""


def checked_path(path: str | os.PathLike, key: str, kind: str = "file", fix: str = "") -> Path:
    """`path` (with ~ expanded) when it exists, is a `kind` ("file" or "dir") and is readable."""
    p = Path(path).expanduser()
    if not p.exists():
        why = "is a broken symbolic link" if p.is_symlink() else "does not exist"
    elif kind == "file" and p.is_dir():
        why = "is a directory, not a file"
    elif kind == "dir" and not p.is_dir():
        why = "is a file, not a directory"
    elif kind == "file" and not p.is_file():
        why = "is not a regular file"
    elif not os.access(p, os.R_OK | (os.X_OK if kind == "dir" else 0)):
        why = "cannot be read (permission denied)"
    else:
        return p
    raise InputError(_problem(key, p, why, fix))


def read_input_text(path: str | os.PathLike, key: str, fix: str = "", allow_empty: bool = False) -> str:
    """The UTF-8 text of a file a command was given; InputError naming `key` and the file otherwise."""
    p = checked_path(path, key, "file", fix)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(_problem(key, p, f"cannot be read ({e.strerror or e})", fix)) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(_problem(key, p, f"is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x})", fix)) from e
    if not allow_empty and not text.strip():
        raise InputError(_problem(key, p, "is empty", fix))
    return text


def read_input_json(path: str | os.PathLike, key: str, fix: str = "", expect: type = dict) -> Any:
    """The JSON value of a file a command was given, of type `expect` (dict: a JSON object)."""
    p = Path(path).expanduser()
    text = read_input_text(p, key, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(_problem(key, p, f"is not JSON ({e.msg} at line {e.lineno}, column {e.colno}; cut short?)",
                                  fix)) from e
    if not isinstance(value, expect):
        want = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise InputError(_problem(key, p, f"holds {type(value).__name__}, not {want}", fix))
    return value


def _problem(key: str, path: Path, why: str, fix: str) -> str:
    return f"{key}: {path} {why}" + (f"; {fix}" if fix else "")


@contextmanager
def atomic_write(path: str | os.PathLike, check: Optional[Callable[[Path], None]] = None) -> Iterator[BinaryIO]:
    """Write `path` through a binary file object: the bytes go to a uniquely named temporary file
    beside it, which on a clean exit is fsynced, checked (`check(temp path)` may raise to refuse
    it), made readable by all (0644), renamed over `path`, and the rename made durable.

    On any exception the temporary file is removed and `path` is left as it was. Two processes
    writing the same file at once cannot interleave their bytes: the last rename wins whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")  # hidden; resume clears torn ones
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))  # e.g. a checkpoint reads back whole before it replaces the previous one
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; run files and caches are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a power loss after it cannot bring back the old file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) atomically."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON atomically (values JSON cannot hold are written as str)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSON-lines file: its number (from 1) and value, or why it is not JSON."""

    number: int
    value: Any = None
    error: Optional[str] = None  # e.g. "Expecting value at column 1"


def json_lines(path: str | os.PathLike) -> list[JsonLine]:
    """Every non-blank line of the file, parsed; FileNotFoundError when there is no file."""
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        return _parsed(f)


def read_input_jsonl(path: str | os.PathLike, key: str, fix: str = "", allow_empty: bool = False) -> list[JsonLine]:
    """Every non-blank line of a JSON-lines file a command was given (post-training data, prompts,
    tasks, a run's metrics), parsed and numbered as an editor shows them, so that a bad line is
    reported by number rather than skipped; the file itself is checked as `read_input_text` does."""
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and the like, which are not line ends here
    return _parsed(read_input_text(path, key, fix, allow_empty).split("\n"))


def _parsed(lines: Iterable[str]) -> list[JsonLine]:
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append(JsonLine(number, json.loads(line)))
        except json.JSONDecodeError as e:
            parsed.append(JsonLine(number, error=f"{e.msg} at column {e.colno}"))
    return parsed


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines file that the framework appends to (metrics, samples, sweep
    index): none when the file is absent, and lines that are not JSON (the torn last line of a
    killed writer) skipped."""
    if not Path(path).expanduser().is_file():
        return []
    return [line.value for line in json_lines(path) if line.error is None]
