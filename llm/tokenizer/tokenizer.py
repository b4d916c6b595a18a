"""The project's tokenizer: a thin wrapper over `tokenizers.Tokenizer` with fixed special tokens."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import tokenizers

from llm.files import InputError, read_input_json, write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


def _resolve(path: str | os.PathLike) -> Path:
    """A directory stands for the `tokenizer.json` inside it, as Hugging Face lays them out."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


class Tokenizer:
    """Thin wrapper over tokenizers.Tokenizer with explicit special tokens.

    `encode` never adds special tokens: the data pipeline places EOS between documents itself,
    so what a model sees does not depend on a backend's post-processor.
    """

    def __init__(self, backend: tokenizers.Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.bos_id: int = backend.token_to_id(BOS)
        self.eos_id: int = backend.token_to_id(EOS)
        self.pad_id: int = backend.token_to_id(PAD)
        self.cached = False  # set by build_tokenizer when this came from its on-disk cache

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def content_hash(self) -> str:
        """sha256 of the compact serialized JSON: equal for equal tokenizers, also after a reload."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically, so a reader never sees half a file."""
        write_text(_resolve(path), self.backend.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | os.PathLike, key: str = "tokenizer.path") -> Tokenizer:
        """A tokenizer.json this framework wrote (or a folder holding one); InputError naming `key`
        for a file that is not one."""
        path = _resolve(path)
        backend = load_backend(path, key)
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise InputError(f"{key}: tokenizer {path} lacks the special tokens {missing}; give the tokenizer.json "
                             "of a run (or tokenizer=pretrained, which adds them)")
        return cls(backend)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model={type(self.backend.model).__name__})"


class TokenizerNotFound(InputError, FileNotFoundError):
    """No tokenizer file where one was named: an InputError (exit 2 in every CLI), and a FileNotFoundError."""


LOAD_FIX = "give a tokenizer.json (one a run wrote, or a Hugging Face tokenizers file) or the folder holding one"


def load_backend(path: str | os.PathLike, key: str = "tokenizer.path") -> tokenizers.Tokenizer:
    """Read a tokenizer.json through the checked path: InputError naming `key` and the file for
    anything else (missing, a directory without one, not UTF-8, cut short, JSON of something else)."""
    path = _resolve(path)
    if not path.exists() and not path.is_symlink():
        raise TokenizerNotFound(f"{key}: tokenizer file not found: {path}; {LOAD_FIX}")
    spec = read_input_json(path, key, LOAD_FIX)
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises a bare Exception on JSON that is not a tokenizer
        raise InputError(f"{key}: {path} is not a valid tokenizer.json ({str(e).splitlines()[0]}); {LOAD_FIX}") from e


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts`: the tokenizer's compression, higher is denser."""
    n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    if n_tokens == 0:
        raise ValueError("bytes_per_token: the texts encode to no tokens")
    return n_bytes / n_tokens
