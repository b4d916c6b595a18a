"""JSON Lines in and out: prompt and task files read with errors that name the key and line,
results written atomically (a reader sees the old file or the whole new one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from llm.config import ConfigError
from llm.files import atomic_write, read_input_jsonl


JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def fix_for(fields: tuple[str, ...]) -> str:
    """How to write a JSONL file of records with these string fields."""
    example = ", ".join(f'"{f}": "..."' for f in fields)
    return f"give a UTF-8 JSONL file with one JSON object per line, e.g. {{{example}}}"


def read_records(path: str | Path, fields: tuple[str, ...], key: str) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped), each with string values for `fields`.
    `key` is the config key that named the file, for the error messages. A file that cannot be read
    as UTF-8 text is an InputError; bad lines are a ConfigError naming them by number."""
    records, problems = [], []
    for line in read_input_jsonl(path, key, fix_for(fields)):
        if len(problems) >= 5:  # enough to see the pattern
            break
        if line.error is not None:
            problems.append(f"{key}={str(path)!r}: line {line.number} is not JSON ({line.error})")
            continue
        bad = [f for f in fields if not isinstance(line.value, dict) or not isinstance(line.value.get(f), str)]
        if bad:
            got = (f"it holds {JSON_TYPES[type(line.value)]}, not an object" if not isinstance(line.value, dict)
                   else f"{bad[0]!r} is {JSON_TYPES[type(line.value[bad[0]])]}" if bad[0] in line.value
                   else f"it has no {bad[0]!r}")
            problems.append(f"{key}={str(path)!r}: line {line.number} needs a string field {bad[0]!r} ({got})")
            continue
        records.append(line.value)
    if problems:
        problems.append(f"{key}: {fix_for(fields)}")
        raise ConfigError(problems)
    return records


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically; the parent directory is created."""
    path = Path(path).expanduser()
    with atomic_write(path) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return path
