"""TextCorpus: local text files picked by glob patterns."""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Iterator

from llm.data.corpus import check_split
from llm.data.files import Entry, FileCorpus, read_text


def match_files(patterns: list[str]) -> list[Path]:
    """Files matching any pattern (`**` recurses), deduplicated; each pattern must match a file."""
    paths: set[Path] = set()
    for pattern in patterns:
        found = [Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(f"no file matches the pattern {pattern!r}")
        paths.update(found)
    return sorted(paths)


class TextCorpus(FileCorpus):
    """Local text files as documents, split train/val by a hash of their path.

    Paths are taken relative to the matched files' common directory, so the split and the
    fingerprint do not depend on where that directory lives. A single file is split by
    characters instead: its last `val_fraction` (at least one character) is val.
    """

    def __init__(self, paths: str | list[str], val_fraction: float = 0.05,
                 max_bytes: int | None = None):
        patterns = [paths] if isinstance(paths, str) else list(paths)
        files = match_files(patterns)
        base = files[0].parent if len(files) == 1 else Path(os.path.commonpath([f.parent for f in files]))
        entries: list[Entry] = [(f.relative_to(base).as_posix(), f) for f in files]
        self._single = len(files) == 1
        super().__init__(f"text:{','.join(patterns)}", entries, val_fraction, max_bytes,
                         settings={"corpus": "text", "single": self._single})

    def files(self, split: str) -> list[Path]:
        if self._single:  # both splits are parts of the one file
            check_split(split)
            return [path for _, path in self._entries]
        return super().files(split)

    def documents(self, split: str) -> Iterator[str]:
        if not self._single:
            yield from super().documents(split)
            return
        check_split(split)
        text = read_text(self._entries[0][1]) or ""
        if self.max_bytes is not None:
            text = text.encode("utf-8")[: self.max_bytes].decode("utf-8", errors="ignore")
        n_val = math.ceil(len(text) * self.val_fraction) if self.val_fraction > 0 and text else 0
        part = text[len(text) - n_val:] if split == "val" else text[: len(text) - n_val]
        if part:
            yield part

    def _fields(self) -> Iterator[str]:
        if not self._single:
            yield from super()._fields()
            return
        for split in ("train", "val"):
            for document in self.documents(split):
                yield split
                yield document
