"""The Corpus protocol and the helpers every corpus shares: split checks, path hashing, fingerprints."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

SPLITS = ("train", "val")


@runtime_checkable
class Corpus(Protocol):
    """A named source of text documents, split into train and val."""

    name: str

    def documents(self, split: str) -> Iterator[str]:
        """The documents of `split` ("train" or "val"), always in the same order."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex of everything documents() yields (both splits) and the settings."""
        ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def hash_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for `key`: splits must not depend on list order."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def fingerprint(settings: dict[str, Any], fields: Iterable[str]) -> str:
    """sha256 over the settings and a stream of strings, each length-prefixed so that
    ("ab", "c") and ("a", "bc") hash differently."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for field in fields:
        data = field.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def split_documents(corpus: Corpus) -> Iterator[str]:
    """(split, document) pairs of both splits, in order, flattened into fingerprint() fields."""
    for split in SPLITS:
        for document in corpus.documents(split):
            yield split
            yield document
