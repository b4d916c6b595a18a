"""Pre-tokenised data that other tools write, read in place (memory-mapped), no text and no cache.

Three layouts of a flat array of token ids, one file per split:

- raw ids with no header (nanoGPT's train.bin / val.bin, OLMo's .npy-named memmaps): the dtype
  comes from `dtype`, or from a sidecar `<file>.json` holding {"dtype": "uint16"};
- llm.c's .bin: a 256 x int32 header (magic 20240520: uint16 ids, 20240801: uint32; version;
  number of tokens) then the ids;
- NumPy .npy with a real header (np.save): its own dtype; never unpickled.

Documents are whatever separators the tool wrote (nanoGPT and llm.c put an EOT id between them);
blocks are cut from the flat array as from our own token caches. The ids must come from the run's
tokenizer (tokenizer=pretrained with the same tokenizer.json, or byte for byte-level ids): a
trained tokenizer would give other ids to the same text, so it is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from llm.data.corpus import check_split
from llm.files import InputError

LLMC_MAGIC = {20240520: np.uint16, 20240801: np.uint32}
LLMC_HEADER_INTS = 256
DTYPES = ("uint16", "uint32")
HASHED_BYTES = 1 << 20  # the fingerprint reads this much from each end of a file (they may be GBs)


def _sidecar_dtype(path: Path) -> Optional[str]:
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")).get("dtype")
    except (OSError, ValueError, AttributeError):
        raise InputError(f"{sidecar}: not a JSON object with a dtype; write {{\"dtype\": \"uint16\"}}") from None


def read_token_file(path: str | Path, dtype: Optional[str], key: str) -> np.ndarray:
    """The file's token ids as a read-only 1-D memmap; InputError naming `key` when it cannot be."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{key}={str(path)!r}: no such file; give a flat token file (nanoGPT/OLMo raw ids, "
                         "llm.c .bin or .npy)")
    with path.open("rb") as f:
        head = f.read(LLMC_HEADER_INTS * 4)
    if head[:6] == b"\x93NUMPY":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim != 1 or array.dtype.kind not in "ui":
            raise InputError(f"{key}={str(path)!r}: a .npy of {array.dtype} with shape {array.shape}; expected "
                             "1-D integer token ids")
        return array
    if len(head) == LLMC_HEADER_INTS * 4:
        header = np.frombuffer(head, dtype=np.int32)
        if int(header[0]) in LLMC_MAGIC:
            item = np.dtype(LLMC_MAGIC[int(header[0])])
            n = int(header[2])
            if path.stat().st_size != len(head) + n * item.itemsize:
                raise InputError(f"{key}={str(path)!r}: llm.c header says {n} tokens of {item.name}, but the file "
                                 f"holds {path.stat().st_size - len(head)} bytes after it; the file is truncated")
            return np.memmap(path, dtype=item, mode="r", offset=len(head), shape=(n,))
    chosen = dtype or _sidecar_dtype(path)
    if chosen not in DTYPES:
        raise InputError(f"{key}={str(path)!r}: raw token ids need their width; give data.corpus.dtype=uint16 "
                         f"(vocabularies up to 65,536, as nanoGPT's GPT-2 ids) or uint32, or a sidecar "
                         f"{path.name}.json with {{\"dtype\": ...}} (got {chosen!r})")
    item = np.dtype(chosen)
    if path.stat().st_size % item.itemsize:
        raise InputError(f"{key}={str(path)!r}: {path.stat().st_size} bytes is not a whole number of {chosen} ids; "
                         "check data.corpus.dtype")
    return np.memmap(path, dtype=item, mode="r")


class TokenFiles:
    """A pre-tokenised source: `train` and `val` token files (see the module docstring)."""

    def __init__(self, train: str, val: str, dtype: Optional[str] = None):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or null, got {dtype!r}")
        self.paths = {"train": Path(train).expanduser(), "val": Path(val).expanduser()}
        self.dtype = dtype
        self.name = f"tokens:{self.paths['train']}"
        self._tokens: dict[str, np.ndarray] = {}
        self._fingerprint: Optional[str] = None

    def tokens(self, split: str) -> np.ndarray:
        """The split's ids, memory-mapped."""
        split = check_split(split)
        if split not in self._tokens:
            self._tokens[split] = read_token_file(self.paths[split], self.dtype, f"data.corpus.{split}")
        return self._tokens[split]

    def max_id(self, split: str, chunk: int = 1 << 24) -> int:
        """The largest id of the split (read in chunks: the file may be larger than memory)."""
        tokens = self.tokens(split)
        return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))

    def documents(self, split: str) -> Iterator[str]:
        """No text to give: a tokenizer cannot be trained on ids."""
        raise InputError(f"data.corpus: {self.name} is already tokenised; a trained tokenizer cannot learn from it "
                         "(use tokenizer=pretrained tokenizer.path=<the tokenizer that made it>, or tokenizer=byte)")

    def fingerprint(self) -> str:
        """sha256 of each file's size and its first and last MiB, with the settings: enough to tell a
        changed file on resume without reading gigabytes."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps({"corpus": "tokens", "dtype": self.dtype}).encode())
            for split, path in self.paths.items():
                size = path.stat().st_size
                h.update(f"{split}:{size}".encode())
                with path.open("rb") as f:
                    h.update(f.read(HASHED_BYTES))
                    f.seek(max(0, size - HASHED_BYTES))
                    h.update(f.read(HASHED_BYTES))
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class PreTokenised:
    """A split of a `TokenFiles` source, shaped like a built TokenCache for the recipe: no text, so
    no bytes per token."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.n_tokens = len(tokens)
        self.n_bytes: Optional[int] = None
        self.bytes_per_token: Optional[float] = None


def split_tokens(corpus, tokenizer, split: str, cache_dir, key: str = "data.corpus", **tokenize):
    """The token array of `split`: a TokenFiles source's own ids (checked against the tokenizer's
    vocabulary), any other corpus tokenised into the token cache (`tokenize`: data.tokenize's
    workers and shard_mb)."""
    if not isinstance(corpus, TokenFiles):
        from llm.data.token_cache import build_token_cache

        return build_token_cache(corpus, tokenizer, split, cache_dir, **tokenize)
    try:
        tokens = corpus.tokens(split)
        if len(tokens) == 0:
            raise InputError(f"data.corpus.{split}={str(corpus.paths[split])!r}: holds no token ids")
        largest = corpus.max_id(split)
    except InputError as e:
        raise InputError(str(e).replace("data.corpus", key, 1)) from None
    if largest >= tokenizer.vocab_size:
        raise InputError(f"{key}.{split}={str(corpus.paths[split])!r}: holds id {largest}, outside the tokenizer's "
                         f"{tokenizer.vocab_size} ids; give the tokenizer that made the file "
                         "(tokenizer=pretrained tokenizer.path=.../tokenizer.json), or check data.corpus.dtype")
    return PreTokenised(tokens)
