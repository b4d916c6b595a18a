"""JSON-lines files a command is given (post-training datasets, prompts, tasks), read through the
one checked path (`llm.files.read_input_text`): a missing, unreadable, non-UTF-8 or empty file is an
`InputError` naming the key, the file and the fix; what remains is each line parsed, with its number,
so a bad line is reported by number rather than skipped."""

from __future__ import annotations

import json
import os

from llm.files import JsonLine, read_input_text


def input_json_lines(path: str | os.PathLike, key: str, fix: str = "", allow_empty: bool = False) -> list[JsonLine]:
    """Every non-blank line of the file, parsed (numbered from 1, as an editor shows them)."""
    lines = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and the like, which are not line ends here
    for number, line in enumerate(read_input_text(path, key, fix, allow_empty).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            lines.append(JsonLine(number, json.loads(line)))
        except json.JSONDecodeError as e:
            lines.append(JsonLine(number, error=f"{e.msg} at column {e.colno}"))
    return lines
