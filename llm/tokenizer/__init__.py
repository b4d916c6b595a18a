"""Tokenizers: byte-level BPE, Unigram, WordPiece, raw bytes or a pretrained tokenizer.json."""

from llm.tokenizer.build import KINDS, build_tokenizer
from llm.tokenizer.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer, bytes_per_token

__all__ = [
    "BOS",
    "EOS",
    "KINDS",
    "PAD",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "build_tokenizer",
    "bytes_per_token",
]
