"""FileCorpus: documents that are whole text files, split by a hash of their path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from llm.data.corpus import SPLITS, check_split, fingerprint, hash_fraction

Entry = tuple[str, Path]  # (relative path in POSIX form, absolute path)


def read_text(path: Path) -> str | None:
    """The file's text, or None when it cannot be read or is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def assign_splits(entries: list[Entry], val_fraction: float) -> dict[str, list[Entry]]:
    """Files whose path hashes below val_fraction go to val; the rest to train, order kept.

    With two or more files neither split is left empty (the lowest / highest hash moves over):
    a handful of files would otherwise often give no validation data at all.
    """
    fraction = {rel: hash_fraction(rel) for rel, _ in entries}
    val = [e for e in entries if fraction[e[0]] < val_fraction]
    if len(entries) >= 2 and val_fraction > 0:
        if not val:
            val = [min(entries, key=lambda e: fraction[e[0]])]
        elif len(val) == len(entries):
            val.remove(max(entries, key=lambda e: fraction[e[0]]))
    in_val = {rel for rel, _ in val}
    return {"train": [e for e in entries if e[0] not in in_val], "val": val}


class FileCorpus:
    """Whole files as documents, in sorted relative-path order.

    With `max_bytes`, train takes files in order while they fit in max_bytes * (1 - val_fraction)
    bytes and val in max_bytes * val_fraction; a file that would overflow is skipped, not cut,
    and later (smaller) files may still fill the budget. Unreadable or non-UTF-8 files are skipped.
    """

    def __init__(self, name: str, entries: list[Entry], val_fraction: float,
                 max_bytes: int | None, settings: dict[str, Any]):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
        self.name = name
        self.val_fraction = val_fraction
        self.max_bytes = max_bytes
        self._entries = sorted(entries)
        self._settings = {**settings, "val_fraction": val_fraction, "max_bytes": max_bytes}
        self._selected: dict[str, list[Entry]] | None = None
        self._fingerprint: str | None = None

    def _selection(self) -> dict[str, list[Entry]]:
        if self._selected is None:
            splits = assign_splits(self._entries, self.val_fraction)
            shares = {"train": 1.0 - self.val_fraction, "val": self.val_fraction}
            self._selected = {
                split: self._take(splits[split],
                                  None if self.max_bytes is None else self.max_bytes * shares[split])
                for split in SPLITS
            }
        return self._selected

    def _readable(self, path: Path) -> bool:
        """Whether a file can join the corpus: here, one that cannot be read as UTF-8 is skipped."""
        return read_text(path) is not None

    def _take(self, entries: list[Entry], budget: float | None) -> list[Entry]:
        taken, used = [], 0
        for rel, path in entries:
            try:
                size = path.stat().st_size  # = UTF-8 bytes of the text, and needs no read
            except OSError:
                continue
            if budget is not None and used + size > budget:
                continue
            if not self._readable(path):
                continue
            taken.append((rel, path))
            used += size
        return taken

    def files(self, split: str) -> list[Path]:
        """The files of `split`, in document order."""
        return [path for _, path in self._selection()[check_split(split)]]

    def documents(self, split: str) -> Iterator[str]:
        for path in self.files(split):
            text = read_text(path)
            if text is not None:
                yield text

    def fingerprint(self) -> str:
        """Hashes relative paths and contents of the selected files and the settings (cached)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._settings, self._fields())
        return self._fingerprint

    def _fields(self) -> Iterator[str]:
        for split in SPLITS:
            for rel, path in self._selection()[split]:
                yield split
                yield rel
                yield read_text(path) or ""
