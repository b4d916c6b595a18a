"""Token cache: a split tokenised once into a flat on-disk array, reused while its inputs match."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from llm.files import atomic_write
from llm.data.corpus import Corpus, check_split

log = logging.getLogger(__name__)

CHUNK_DOCUMENTS = 256  # documents per encode_batch call: parallel in Rust, bounded memory here


class _Tokenizer(Protocol):  # the slice of llm.tokenizer.Tokenizer used here
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def content_hash(self) -> str: ...


class TokenCache:
    """A built cache: `tokens` is a read-only memmap of every document followed by EOS.

    `doc_offsets[i]` is where document i starts in `tokens`.
    """

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path = path
        self.dtype = np.dtype(index["dtype"])
        self.n_tokens: int = index["n_tokens"]
        self.n_documents: int = index["n_documents"]
        self.doc_offsets: list[int] = index["doc_offsets"]
        self.n_bytes: int = index["n_bytes"]
        self.index = index
        self._tokens: np.memmap | None = None

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._tokens

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of the split per token (document-separating EOS tokens not counted)."""
        return self.n_bytes / max(1, self.n_tokens - self.n_documents)

    def __repr__(self) -> str:
        return f"TokenCache({self.path.name}, {self.n_documents} documents, {self.n_tokens} tokens)"


def cache_key(corpus: Corpus, tokenizer: _Tokenizer, split: str) -> str:
    parts = [corpus.fingerprint(), tokenizer.content_hash(), split]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def build_token_cache(corpus: Corpus, tokenizer: _Tokenizer, split: str,
                      cache_dir: str | os.PathLike) -> TokenCache:
    """Tokenise `split` of `corpus` into cache_dir/tokens/<key>.bin (+ <key>.json), or reuse it.

    The .bin is written first and the .json index last, each atomically: a cache counts only
    when its index exists and the .bin holds exactly n_tokens items, so an interrupted build
    is rebuilt rather than trusted.
    """
    check_split(split)
    key = cache_key(corpus, tokenizer, split)
    directory = Path(cache_dir) / "tokens"
    directory.mkdir(parents=True, exist_ok=True)
    bin_path, index_path = directory / f"{key}.bin", directory / f"{key}.json"

    index = _valid_index(bin_path, index_path, key)
    if index is not None:
        return TokenCache(bin_path, index)

    index_path.unlink(missing_ok=True)  # a stale index must not vouch for the new .bin midway
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    doc_offsets: list[int] = []
    n_tokens = n_bytes = 0
    with atomic_write(bin_path) as f:
        for chunk in _chunks(corpus.documents(split), CHUNK_DOCUMENTS):
            n_bytes += sum(len(text.encode("utf-8")) for text in chunk)
            for ids in tokenizer.encode_batch(chunk):
                doc_offsets.append(n_tokens)
                ids.append(tokenizer.eos_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)
        if n_tokens == 0:  # raising here also discards the temp file
            from llm.config import ConfigError  # an input problem: exit code 2, no traceback

            raise ConfigError([f"data.corpus: corpus {corpus.name!r} has no documents in split {split!r} (its files "
                               "are empty, unreadable, or not UTF-8 text); point data.corpus at text files"])

    index = {"key": key, "dtype": dtype.name, "n_tokens": n_tokens, "n_bytes": n_bytes,
             "n_documents": len(doc_offsets), "doc_offsets": doc_offsets,
             "corpus": corpus.name, "split": split, "corpus_fingerprint": corpus.fingerprint(),
             "tokenizer_hash": tokenizer.content_hash()}
    with atomic_write(index_path) as f:
        f.write(json.dumps(index).encode("utf-8"))
    log.info(f"token cache: {corpus.name}/{split}: {len(doc_offsets):,} documents -> "
             f"{n_tokens:,} tokens ({bin_path})")
    return TokenCache(bin_path, index)


def _valid_index(bin_path: Path, index_path: Path, key: str) -> dict[str, Any] | None:
    """The index if the cache is complete and consistent, else None."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        itemsize = np.dtype(index["dtype"]).itemsize
        complete = (index["key"] == key and index["n_tokens"] > 0 and "n_bytes" in index
                    and bin_path.stat().st_size == index["n_tokens"] * itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if complete else None


def _chunks(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for document in documents:
        if document:  # an empty document would be a lone EOS
            chunk.append(document)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
