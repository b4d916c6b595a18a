"""Sharded token caches: a split tokenised into shard files, by one process or several worker
processes, and read back as one array through memory maps.

Layout in <cache_dir>/tokens/ for a cache key K:

    K.00000.bin, K.00001.bin, ...   one per shard: its n_tokens ids (little-endian uint16, or uint32
                                    for vocabularies over 65,535 ids), then the int64 offsets of its
                                    documents within it
    K.json                          the index: shards, their counts and sha256, the dtype and a
                                    fingerprint of the whole; written last, atomically

The document stream is cut into shards by its text: a shard closes at the first document that
brings it to `shard_bytes` UTF-8 bytes. Where the cuts fall depends only on the documents and
`shard_bytes`, never on how many workers encode them, and a document's ids do not depend on the
documents encoded beside it, so any number of workers writes the same files as one process. The
index does not say how many there were: a cache built by 2 workers is reused by a 1-worker run.

Only the parent reads the corpus, one shard of documents at a time, and hands it to a worker
process (at most two shards per worker in flight), so a corpus larger than memory is never held at
once; each worker encodes its shard with the tokenizer's `encode_batch`, a few hundred documents a
call, and writes the shard file atomically. With one worker the parent encodes the shards itself. Shard files without an index are never trusted: the index is
checked (its format, types, names and counts, each shard's size on disk) before a cache is used,
and anything wrong with it means a rebuild, with the reason logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol

import numpy as np

from llm.files import atomic_write

log = logging.getLogger(__name__)

FORMAT, VERSION = "llm-token-shards", 1
DTYPES = ("uint16", "uint32")
OFFSET = np.dtype("<i8")  # each document's start within its shard
ENCODE_DOCUMENTS = 256  # documents per encode_batch call: parallel in Rust, bounded memory here
MAX_SHARDS = 1_000_000
MAX_TOKENS = 1 << 50  # per shard and in all: far beyond any disk, small enough for exact arithmetic
MAX_INDEX_BYTES = 256 << 20
IN_FLIGHT_PER_WORKER = 2  # shards handed to the pool per worker before the parent waits
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Tokenizer(Protocol):  # the slice of llm.tokenizer.Tokenizer used here
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def content_hash(self) -> str: ...


class CacheInvalid(ValueError):
    """An index or shard that cannot be trusted; the message says why (the cache is rebuilt)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 65535 else "<u4")


def shard_name(key: str, i: int) -> str:
    return f"{key}.{i:05d}.bin"


def fingerprint(dtype: str, shards: Iterable[dict[str, Any]]) -> str:
    """sha256 of the dtype and every shard's sha256, in order: the cache's content, whatever built it."""
    h = hashlib.sha256(dtype.encode())
    for shard in shards:
        h.update(shard["sha256"].encode())
    return h.hexdigest()


# --- writing ---------------------------------------------------------------------------------------


def document_chunks(documents: Iterable[str], shard_bytes: int) -> Iterator[tuple[list[str], int]]:
    """(documents, their UTF-8 bytes) of each shard, read lazily; empty documents are left out (they
    would be a lone EOS)."""
    chunk: list[str] = []
    size = 0
    for document in documents:
        if document:
            chunk.append(document)
            size += len(document.encode("utf-8"))
            if size >= shard_bytes:
                yield chunk, size
                chunk, size = [], 0
    if chunk:
        yield chunk, size


def encode_shard(tokenizer: _Tokenizer, documents: list[str], path: Path, dtype: np.dtype) -> dict[str, Any]:
    """Encode `documents` (each followed by EOS) into the shard file `path`, written atomically;
    its counts and sha256."""
    h = hashlib.sha256()
    offsets: list[int] = []
    n_tokens = 0
    eos = tokenizer.eos_id
    with atomic_write(path) as f:
        for i in range(0, len(documents), ENCODE_DOCUMENTS):
            flat: list[int] = []
            for ids in tokenizer.encode_batch(documents[i:i + ENCODE_DOCUMENTS]):
                offsets.append(n_tokens + len(flat))
                flat.extend(ids)
                flat.append(eos)
            data = np.array(flat, dtype=dtype).tobytes()  # an id beyond the dtype raises, never wraps
            h.update(data)
            f.write(data)
            n_tokens += len(flat)
        data = np.array(offsets, dtype=OFFSET).tobytes()
        h.update(data)
        f.write(data)
    return {"file": path.name, "n_tokens": n_tokens, "n_documents": len(offsets), "sha256": h.hexdigest()}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Worker processes are `python -c "...serve()"` children talking over their stdin/stdout: each
# message is an 8-byte little-endian length and that many bytes of UTF-8 JSON. Not
# multiprocessing: its spawn start method re-runs the parent's main module in every child (the
# whole llm-train import, seconds each, and a crash in scripts without a __main__ guard), and
# fork would copy the parent's threads' locks mid-use. A child imports numpy and tokenizers only.
WORKER = "from llm.data.token_shards import serve; serve()"


def _send(stream: Any, message: dict[str, Any]) -> None:
    data = json.dumps(message, ensure_ascii=False).encode("utf-8")
    stream.write(len(data).to_bytes(8, "little"))
    stream.write(data)
    stream.flush()


def _receive(stream: Any) -> Optional[dict[str, Any]]:
    """The next message, or None at the end of the stream (the other side closed, or died midway)."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    return json.loads(data.decode("utf-8")) if len(data) == size else None


def serve() -> None:
    """A worker's loop: the tokenizer first, then shards to encode until stdin closes; each answered
    with its index entry, or the error that stopped it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes our stdin
    import tokenizers

    from llm.tokenizer.tokenizer import Tokenizer

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but messages on the channel
    setup = _receive(stdin)
    if setup is None:
        return
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(setup["tokenizer"]))
    same = tokenizer.content_hash() == setup["hash"]  # the ids must be the parent's
    while (job := _receive(stdin)) is not None:
        try:
            if not same:
                raise RuntimeError("the worker's tokenizer differs from the parent's")
            _send(stdout, {"shard": encode_shard(tokenizer, job["documents"], Path(job["path"]), np.dtype(job["dtype"]))})
        except Exception as e:  # reported by the parent, with the shard it was encoding
            _send(stdout, {"error": f"{type(e).__name__}: {e}"})


class _Workers:
    """Up to `n` worker processes, each started with the first shard it gets (a split of one shard
    starts one); shard i goes to worker i % n, so each answers its shards in order."""

    def __init__(self, n: int, tokenizer: Any):
        import llm

        self.n = n
        self.env = dict(os.environ)
        threads = max(1, available_cores() // n)  # the Rust thread pool of each: its share of the cores
        self.env.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
        root = str(Path(llm.__file__).resolve().parents[1])  # where llm is, installed or not
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH")) if p)
        self.setup = {"tokenizer": tokenizer.backend.to_str(), "hash": tokenizer.content_hash()}
        self.procs: list[subprocess.Popen] = []

    def _start(self) -> None:
        proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=self.env)
        self.procs.append(proc)
        try:
            _send(proc.stdin, self.setup)
        except OSError:
            raise self._died(len(self.procs) - 1) from None

    def submit(self, i: int, documents: list[str], path: Path, dtype: np.dtype) -> None:
        if len(self.procs) <= i % self.n:
            self._start()
        try:  # blocks while that worker is busy (its pipe full): the others keep working meanwhile
            _send(self.procs[i % self.n].stdin, {"path": str(path), "dtype": dtype.name, "documents": documents})
        except OSError:  # BrokenPipeError: it died
            raise self._died(i) from None

    def result(self, i: int) -> dict[str, Any]:
        answer = _receive(self.procs[i % self.n].stdout)
        if answer is None:
            raise self._died(i)
        if "error" in answer:
            raise RuntimeError(f"token cache: encoding shard {i} failed in a worker process: {answer['error']}")
        return answer["shard"]

    def _died(self, i: int) -> RuntimeError:
        proc = self.procs[i % self.n]
        return RuntimeError(f"token cache: the worker process encoding shard {i} died (exit code {proc.wait()}); "
                            "out of memory? try fewer data.tokenize.workers or a smaller data.tokenize.shard_mb")

    def close(self) -> None:
        """Close every worker's input (it ends after its current shard) and wait for it."""
        for proc in self.procs:
            # A worker that already died (reported by the caller with its exit code) has a broken pipe.
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def write_shards(documents: Iterable[str], tokenizer: _Tokenizer, directory: Path, key: str, dtype: np.dtype,
                 shard_bytes: int, workers: int = 1) -> list[dict[str, Any]]:
    """Tokenise `documents` into shard files K.00000.bin, ... in `directory`; their index entries,
    in order. `workers` > 1 encodes shards in that many worker processes (the files are the same).
    """
    shards: list[dict[str, Any]] = []
    sizes: list[int] = []

    def numbered() -> Iterator[tuple[int, list[str]]]:
        for i, (chunk, n_bytes) in enumerate(document_chunks(documents, shard_bytes)):
            if i >= MAX_SHARDS:
                from llm.config import ConfigError

                raise ConfigError([f"data.tokenize.shard_mb={shard_bytes / 2**20:g}: the split needs more than "
                                   f"{MAX_SHARDS:,} shards; give a larger data.tokenize.shard_mb"])
            sizes.append(n_bytes)
            yield i, chunk

    if workers > 1 and getattr(tokenizer, "backend", None) is None:
        log.info(f"token cache: {type(tokenizer).__name__} cannot be sent to worker processes; encoding in this one")
        workers = 1
    if workers == 1:
        for i, chunk in numbered():
            shards.append(encode_shard(tokenizer, chunk, directory / shard_name(key, i), dtype))
    else:
        pool = _Workers(workers, tokenizer)
        try:
            for i, chunk in numbered():
                if i >= IN_FLIGHT_PER_WORKER * workers:  # bounded: the rest of the corpus waits
                    shards.append(pool.result(len(shards)))
                pool.submit(i, chunk, directory / shard_name(key, i), dtype)
            while len(shards) < len(sizes):
                shards.append(pool.result(len(shards)))
        finally:
            pool.close()
    return [{**shard, "n_bytes": n_bytes} for shard, n_bytes in zip(shards, sizes)]


# --- reading ---------------------------------------------------------------------------------------


def _count(entry: dict[str, Any], name: str, where: str, low: int = 0) -> int:
    value = entry.get(name)
    if type(value) is not int or not low <= value <= MAX_TOKENS:  # bool is not a count
        raise CacheInvalid(f"{where}: {name}={value!r} is not a count")
    return value


def read_index(index_path: Path, key: str) -> Optional[dict[str, Any]]:
    """The index of a complete cache, None when there is none; CacheInvalid (saying why) when the
    index or a shard is not what it must be. Only data is read: JSON, never code, and only shard
    files named K.<n>.bin in the index's own directory."""
    try:
        size = index_path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_INDEX_BYTES:
        raise CacheInvalid(f"the index is {size:,} bytes, more than any cache needs")
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CacheInvalid("the index is not UTF-8 text") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than any index
        raise CacheInvalid(f"the index is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict):
        raise CacheInvalid(f"the index holds {type(index).__name__}, not a JSON object")
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CacheInvalid(f"the index is not a {FORMAT} index of version {VERSION} (an older cache?)")
    if index.get("key") != key:
        raise CacheInvalid(f"the index is of key {index.get('key')!r}, not {key}")
    dtype = index.get("dtype")
    if dtype not in DTYPES:
        raise CacheInvalid(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    itemsize = np.dtype(dtype).itemsize
    shards = index.get("shards")
    if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_SHARDS:
        raise CacheInvalid(f"shards is not a list of 1 to {MAX_SHARDS:,} entries")
    for i, shard in enumerate(shards):
        where = f"shard {i}"
        if not isinstance(shard, dict):
            raise CacheInvalid(f"{where} is {type(shard).__name__}, not a JSON object")
        if shard.get("file") != shard_name(key, i):  # the only name accepted: nothing outside the directory
            raise CacheInvalid(f"{where} names file {shard.get('file')!r}, not {shard_name(key, i)}")
        n_tokens = _count(shard, "n_tokens", where, low=1)
        n_documents = _count(shard, "n_documents", where, low=1)
        _count(shard, "n_bytes", where)
        if n_documents > n_tokens:
            raise CacheInvalid(f"{where}: {n_documents} documents in {n_tokens} tokens (each ends in EOS)")
        if not isinstance(shard.get("sha256"), str) or not HEX64.match(shard["sha256"]):
            raise CacheInvalid(f"{where}: sha256={shard.get('sha256')!r} is not a sha256")
        path = index_path.parent / shard["file"]
        try:
            st = os.lstat(path)
        except OSError:
            raise CacheInvalid(f"{where} ({path.name}) is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CacheInvalid(f"{where} ({path.name}) is not a regular file")
        expected = n_tokens * itemsize + n_documents * OFFSET.itemsize
        if st.st_size != expected:
            raise CacheInvalid(f"{where} ({path.name}) holds {st.st_size:,} bytes, not the {expected:,} its index "
                               "says (cut short or replaced)")
    for total in ("n_tokens", "n_documents", "n_bytes"):
        if _count(index, total, "the index") != sum(s[total] for s in shards):
            raise CacheInvalid(f"{total}={index[total]} is not the sum over the shards")
    if index.get("fingerprint") != fingerprint(dtype, shards):
        raise CacheInvalid("the fingerprint does not match the shards' sha256")
    return index


def verify_shards(directory: Path, index: dict[str, Any], chunk: int = 1 << 24) -> None:
    """Hash every shard file and compare with the index (CacheInvalid on a difference). Reads the
    whole cache, so it is not done on every load: sizes are (shards are written whole, by rename)."""
    for i, shard in enumerate(index["shards"]):
        h = hashlib.sha256()
        with open(directory / shard["file"], "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        if h.hexdigest() != shard["sha256"]:
            raise CacheInvalid(f"shard {i} ({shard['file']}): its content is not what the index hashed")


class ShardedTokens:
    """Shard files' token ids as one read-only 1-D array: len, integer and slice indexing, and
    integer-array indexing of any shape (what training blocks are gathered with). Nothing is read
    until indexed; the memmaps are reopened after pickling (each process maps the files itself)."""

    ndim = 1

    def __init__(self, paths: list[Path], lengths: list[int], dtype: np.dtype):
        self.paths = [Path(p) for p in paths]
        self.lengths = [int(n) for n in lengths]
        self.dtype = np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        self._maps: Optional[list[np.memmap]] = None

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) for p, n in zip(self.paths, self.lengths)]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "lengths": self.lengths, "dtype": self.dtype.str}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"], state["lengths"], np.dtype(state["dtype"]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = np.concatenate(self.maps)  # the whole cache in memory: for small ones and tests
        return array if dtype is None else array.astype(dtype)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise ValueError("assignment destination is read-only (a token cache)")

    def _shard_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, positions, side="right") - 1

    def __getitem__(self, key: Any) -> Any:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of bounds for {n} tokens")
            s = int(self._shard_of(np.int64(i)))
            return self.maps[s][i - self.starts[s]]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step, dtype=np.int64)]
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first, last = (int(s) for s in self._shard_of(np.array([start, stop - 1])))
            if first == last:  # within one shard: a view, nothing copied
                return self.maps[first][start - self.starts[first]:stop - self.starts[first]]
            return np.concatenate([self.maps[s][max(start - self.starts[s], 0):min(stop, self.starts[s + 1])
                                                - self.starts[s]] for s in range(first, last + 1)])
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise IndexError(f"token caches are indexed by integers or slices, not {index.dtype}")
        flat = index.astype(np.int64).ravel()
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"index out of bounds for {n} tokens")
        shard = self._shard_of(flat)
        out = np.empty(flat.size, dtype=self.dtype)
        for s in np.unique(shard):
            rows = shard == s
            out[rows] = self.maps[s][flat[rows] - self.starts[s]]
        return out.reshape(index.shape)

    def __iter__(self) -> Iterator[Any]:
        for m in self.maps:
            yield from m

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self.paths)} shards, {len(self):,} tokens of {self.dtype.name})"
