"""JSON Lines in and out: prompt and task files read with errors that name the key and line,
results written atomically (a reader sees the old file or the whole new one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from llm.config import ConfigError
from llm.files import atomic_write, json_lines


def read_records(path: str | Path, fields: tuple[str, ...], key: str) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped), each with string values for `fields`.
    `key` is the config key that named the file, for the error messages."""
    records, problems = [], []
    for line in json_lines(path):
        if len(problems) >= 5:  # enough to see the pattern
            break
        if line.error is not None:
            problems.append(f"{key}={str(path)!r}: line {line.number} is not JSON ({line.error})")
            continue
        bad = [f for f in fields if not isinstance(line.value, dict) or not isinstance(line.value.get(f), str)]
        if bad:
            problems.append(f"{key}={str(path)!r}: line {line.number} needs a string field {bad[0]!r}")
            continue
        records.append(line.value)
    if not records and not problems:
        problems.append(f"{key}={str(path)!r}: no records (one JSON object per line, with {', '.join(fields)})")
    if problems:
        raise ConfigError(problems)
    return records


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically; the parent directory is created."""
    path = Path(path).expanduser()
    with atomic_write(path) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return path
