"""build_tokenizer: one entry point for every kind, with trained tokenizers cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Protocol

import tokenizers

from llm.tokenizer.kinds import MIN_VOCAB, TRAINERS, byte_backend
from llm.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer, load_backend

log = logging.getLogger(__name__)

KINDS = ("bpe", "unigram", "wordpiece", "byte", "pretrained")


class _Corpus(Protocol):  # the slice of llm.data.Corpus used here
    name: str

    def documents(self, split: str) -> Iterator[str]: ...

    def fingerprint(self) -> str: ...


def build_tokenizer(
    corpus: _Corpus | None,
    cache_dir: str | os.PathLike,
    kind: str = "bpe",
    vocab_size: int = 2048,
    min_frequency: int = 2,
    path: str | None = None,
    max_training_bytes: int | None = None,
) -> Tokenizer:
    """Make a tokenizer of `kind`; trained kinds learn from corpus.documents("train").

    A trained tokenizer is cached as cache_dir/tokenizers/<hash>.json, the hash covering the
    corpus fingerprint, every training setting and the tokenizers version; the same call again
    loads it (and sets `.cached`). `byte` and `pretrained` need no corpus, ignore vocab_size,
    min_frequency and max_training_bytes, and are not cached.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "byte":
        return Tokenizer(byte_backend())
    if kind == "pretrained":
        if path is None:
            raise ValueError("tokenizer kind 'pretrained' needs `path` to a tokenizer.json")
        return _pretrained(path)

    if vocab_size < MIN_VOCAB[kind]:
        raise ValueError(f"{kind} tokenizer needs vocab_size >= {MIN_VOCAB[kind]}, got {vocab_size}")
    if corpus is None:
        raise ValueError(f"tokenizer kind {kind!r} is trained and needs a corpus")
    settings = [corpus.fingerprint(), kind, vocab_size, min_frequency, max_training_bytes,
                tokenizers.__version__]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    cache_path = Path(cache_dir) / "tokenizers" / f"{key}.json"
    if cache_path.is_file():
        try:
            tokenizer = Tokenizer.load(cache_path)
            tokenizer.cached = True
            return tokenizer
        except ValueError:
            pass  # unreadable cache entry: train again and overwrite it

    start = time.perf_counter()
    backend = TRAINERS[kind](_capped(corpus.documents("train"), max_training_bytes),
                             vocab_size, min_frequency)
    tokenizer = Tokenizer(backend)
    tokenizer.save(cache_path)
    log.info(f"trained {kind} tokenizer on {corpus.name} ({tokenizer.vocab_size} tokens, "
             f"{time.perf_counter() - start:.1f}s) -> {cache_path}")
    return tokenizer


def _capped(texts: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    """The texts up to `max_bytes` UTF-8 bytes in all; the last one is cut to fit."""
    if max_bytes is None:
        yield from texts
        return
    left = max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= left:
            yield data[:left].decode("utf-8", errors="ignore")  # never split a character
            return
        left -= len(data)
        yield text


def _pretrained(path: str) -> Tokenizer:
    backend = load_backend(path)
    missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens(missing)
    # Our encode() promises plain ids; a shipped truncation/padding setting would break that.
    backend.no_truncation()
    backend.no_padding()
    return Tokenizer(backend)
