"""Token cache: a split tokenised once into shard files on disk, reused while its inputs match.

The files and how they are written and checked are llm.data.token_shards'; this module names a
cache (its key: the corpus's and the tokenizer's fingerprints and the split, not how it was built)
and decides between reusing and building it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from llm.data.corpus import Corpus, check_split
from llm.data.token_shards import (FORMAT, OFFSET, VERSION, CacheInvalid, ShardedTokens, _Tokenizer, fingerprint,
                                   read_index, token_dtype, verify_shards, write_shards)
from llm.files import atomic_write

log = logging.getLogger(__name__)

SHARD_MB = 16.0  # MiB of text per shard (data.tokenize.shard_mb): the unit of work of one worker


class TokenCache:
    """A built cache: `tokens` is every document followed by EOS, read-only and memory-mapped (a
    np.memmap for one shard, a `ShardedTokens` over several), never read whole.

    `doc_offsets[i]` is where document i starts in `tokens` (read from the shards on first use).
    """

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path = path  # the index
        self.directory = path.parent
        self.dtype = np.dtype(index["dtype"])
        self.n_tokens: int = index["n_tokens"]
        self.n_documents: int = index["n_documents"]
        self.n_bytes: int = index["n_bytes"]
        self.fingerprint: str = index["fingerprint"]
        self.index = index
        self.shards = [self.directory / s["file"] for s in index["shards"]]
        self._tokens: Optional[Union[np.memmap, ShardedTokens]] = None
        self._doc_offsets: Optional[np.ndarray] = None

    @property
    def tokens(self) -> Union[np.memmap, ShardedTokens]:
        if self._tokens is None:
            lengths = [s["n_tokens"] for s in self.index["shards"]]
            if len(self.shards) == 1:
                self._tokens = np.memmap(self.shards[0], dtype=self.dtype, mode="r", shape=(lengths[0],))
            else:
                self._tokens = ShardedTokens(self.shards, lengths, self.dtype)
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start of each document in `tokens`; ValueError if a shard's offsets are not in order."""
        if self._doc_offsets is None:
            parts, start = [], 0
            for path, shard in zip(self.shards, self.index["shards"]):
                n, d = shard["n_tokens"], shard["n_documents"]
                own = np.fromfile(path, dtype=OFFSET, count=d, offset=n * self.dtype.itemsize)
                if len(own) != d or own[0] != 0 or np.any(np.diff(own) <= 0) or own[-1] >= n:
                    raise ValueError(f"token cache {path}: its document offsets are not in order; delete it to rebuild")
                parts.append(own + start)
                start += n
            self._doc_offsets = np.concatenate(parts)
        return self._doc_offsets

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of the split per token (document-separating EOS tokens not counted)."""
        return self.n_bytes / max(1, self.n_tokens - self.n_documents)

    def verify(self) -> None:
        """Hash the shards against the index (reads the whole cache); CacheInvalid on a difference."""
        verify_shards(self.directory, self.index)

    def __repr__(self) -> str:
        return (f"TokenCache({self.path.name}, {len(self.shards)} shards, {self.n_documents} documents, "
                f"{self.n_tokens} tokens)")


def cache_key(corpus: Corpus, tokenizer: _Tokenizer, split: str) -> str:
    parts = [corpus.fingerprint(), tokenizer.content_hash(), split]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def build_token_cache(corpus: Corpus, tokenizer: _Tokenizer, split: str, cache_dir: str | os.PathLike,
                      workers: int = 1, shard_mb: float = SHARD_MB) -> TokenCache:
    """Tokenise `split` of `corpus` into cache_dir/tokens/<key>.<n>.bin shards and the <key>.json
    index, or reuse them.

    `workers` > 1 encodes shards in that many processes; `shard_mb` is the text per shard. Neither
    is part of the key: the tokens are the same whatever they are, and a complete cache is reused
    as it is. The shards are written first and the index last, each atomically: a cache counts
    only when its index exists and checks out against the shards on disk, so an interrupted or
    damaged build is rebuilt (saying why) rather than trusted.
    """
    check_split(split)
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not shard_mb > 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb!r}")
    key = cache_key(corpus, tokenizer, split)
    directory = Path(cache_dir) / "tokens"
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / f"{key}.json"

    try:
        index = read_index(index_path, key)
        if index is not None:
            return TokenCache(index_path, index)
    except CacheInvalid as e:
        log.warning(f"token cache {index_path}: {e}; rebuilding it")

    index_path.unlink(missing_ok=True)  # a stale index must not vouch for the new shards midway
    dtype = token_dtype(tokenizer.vocab_size)
    shards = write_shards(corpus.documents(split), tokenizer, directory, key, dtype,
                          max(1, round(shard_mb * 2**20)), workers)
    if not shards:
        from llm.config import ConfigError  # an input problem: exit code 2, no traceback

        raise ConfigError([f"data.corpus: corpus {corpus.name!r} has no documents in split {split!r} (its files "
                           "are empty, unreadable, or not UTF-8 text); point data.corpus at text files"])

    index = {"format": FORMAT, "version": VERSION, "key": key, "dtype": dtype.name,
             "n_tokens": sum(s["n_tokens"] for s in shards), "n_documents": sum(s["n_documents"] for s in shards),
             "n_bytes": sum(s["n_bytes"] for s in shards), "fingerprint": fingerprint(dtype.name, shards),
             "shards": shards, "corpus": corpus.name, "split": split, "corpus_fingerprint": corpus.fingerprint(),
             "tokenizer_hash": tokenizer.content_hash()}
    with atomic_write(index_path) as f:
        f.write(json.dumps(index, indent=0).encode("utf-8"))
    _remove_stale(directory, key, len(shards))
    used = min(workers, len(shards)) if getattr(tokenizer, "backend", None) is not None else 1  # started lazily
    log.info(f"token cache: {corpus.name}/{split}: {index['n_documents']:,} documents -> {index['n_tokens']:,} "
             f"tokens in {len(shards)} shard{'s' * (len(shards) > 1)}"
             f"{f' by {used} workers' if used > 1 else ''} ({index_path})")
    return TokenCache(index_path, index)


def _remove_stale(directory: Path, key: str, n_shards: int) -> None:
    """Shards of an earlier build of this key beyond the new count (another shard size), and the
    single .bin of the format before shards. Another process building the same key at once writes
    the same shards, so nothing it needs is removed."""
    stale = [directory / f"{key}.bin"]
    for path in directory.glob(f"{key}.*.bin"):
        number = path.name[len(key) + 1:-len(".bin")]
        if number.isdigit() and int(number) >= n_shards:
            stale.append(path)
    for path in stale:
        path.unlink(missing_ok=True)
