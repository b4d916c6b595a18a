"""JSON Lines in and out: prompt and task files read with errors that name the key and line,
results written atomically (a reader sees the old file or the whole new one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from llm.config import ConfigError
from llm.data.atomic import atomic_file


def read_records(path: str | Path, fields: tuple[str, ...], key: str) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped), each with string values for `fields`.
    `key` is the config key that named the file, for the error messages."""
    records, problems = [], []
    for number, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), start=1):
        if len(problems) >= 5:  # enough to see the pattern
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{key}={str(path)!r}: line {number} is not JSON ({e.msg})")
            continue
        bad = [f for f in fields if not isinstance(record, dict) or not isinstance(record.get(f), str)]
        if bad:
            problems.append(f"{key}={str(path)!r}: line {number} needs a string field {bad[0]!r}")
            continue
        records.append(record)
    if not records and not problems:
        problems.append(f"{key}={str(path)!r}: no records (one JSON object per line, with {', '.join(fields)})")
    if problems:
        raise ConfigError(problems)
    return records


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically; the parent directory is created."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return path
