"""TextCorpus: local text files picked by glob patterns."""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Iterator

from llm.data.corpus import check_split
from llm.data.files import Entry, FileCorpus
from llm.files import InputError, checked_path, read_input_text

KEY = "data.corpus.paths"
FIX = "give text files or a glob that matches some (quote globs for the shell: 'data/**/*.txt')"
TEXT_FIX = f"convert it to UTF-8 text (e.g. iconv -f latin1 -t utf-8), or leave it out of {KEY}"


class NoMatchingFile(InputError, FileNotFoundError):
    """A pattern of data.corpus.paths names no file: an InputError (exit 2), and a FileNotFoundError."""


def match_files(patterns: list[str]) -> list[Path]:
    """Files matching any pattern (`**` recurses), deduplicated; each pattern must match a file.
    A pattern without wildcards is a path, checked as such (a directory, a broken link)."""
    if not patterns:
        raise NoMatchingFile(f"{KEY}: no pattern given; {FIX}")
    paths: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.escape(expanded) == expanded:  # no wildcard: one file, named
            fix = (f"give the files inside it, e.g. {KEY}='{expanded.rstrip('/')}/**/*.txt'"
                   if Path(expanded).is_dir() else FIX)
            try:
                paths.add(checked_path(expanded, KEY, "file", fix).resolve())
            except InputError as e:
                raise NoMatchingFile(str(e)) from None
            continue
        found = [Path(p).resolve() for p in glob.glob(expanded, recursive=True)]
        found = [p for p in found if p.is_file()]
        if not found:
            raise NoMatchingFile(f"{KEY}: no file matches the pattern {pattern!r}; {FIX}")
        paths.update(found)
    return sorted(paths)


class TextCorpus(FileCorpus):
    """Local text files as documents, split train/val by a hash of their path. A file that cannot
    be read as UTF-8 text (or a single file that is empty) is an InputError naming it.

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

    def _readable(self, path: Path) -> bool:
        # A user's own file that is not text is refused, not skipped: training on what is left
        # would pass for training on what was asked.
        read_input_text(path, KEY, TEXT_FIX, allow_empty=True)
        return True

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
        path = self._entries[0][1]
        text = read_input_text(path, KEY, TEXT_FIX, allow_empty=True)
        if not text.strip():
            raise InputError(f"{KEY}: {path} is empty; give a text file with something to train on")
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
