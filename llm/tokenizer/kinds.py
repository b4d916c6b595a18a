"""How each tokenizer kind's backend is made: trained (bpe, unigram, wordpiece) or fixed (byte).

All kinds see raw text with no normalizer, so decode(encode(text)) gives the text back:
exactly for bpe, byte and wordpiece, and for unigram except a literal "▁" (decoded as a space).
"""

from __future__ import annotations

import json
import string
from typing import Iterable

from tokenizers import Tokenizer as Backend
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from llm.tokenizer.tokenizer import SPECIAL_TOKENS

UNK = "<|unk|>"
N_BYTES = 256
# Marks a WordPiece continuation piece. It must lie outside the byte-level alphabet (all of
# which is at most U+0143): with the usual "##" the decoder would also eat a literal "##".
CONTINUATION = "\u2042"  # ⁂
# Fewest tokens each trained kind can work with: its alphabet, specials and reserved pieces.
MIN_VOCAB = {"bpe": N_BYTES + len(SPECIAL_TOKENS) + 1, "unigram": 512, "wordpiece": 768}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    # Bytes with no printable look-alike are moved, in order, to U+0100 onwards.
    shifted = [b for b in range(N_BYTES) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(N_BYTES + i) for i, b in enumerate(shifted)})
    return mapping


def byte_backend() -> Backend:
    """256 byte tokens whose ids are the byte values, then the specials (ids 256, 257, 258)."""
    vocab = {char: b for b, char in byte_to_unicode().items()}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Backend:
    """Byte-level BPE (GPT-2 style): all 256 bytes are in the alphabet, so any text encodes."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


def train_unigram(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Backend:
    """SentencePiece-style Unigram over Metaspace pieces, with byte fallback for unseen characters.

    Words are cut as "whitespace run + non-space run", so a piece such as "\\n▁▁▁▁return" can
    hold indentation: Metaspace's own split would leave every indenting space a token of its
    own (about 2 bytes/token on Python instead of 3.4), and no split at all trains ~10x slower.
    The trainer has no min_frequency (it prunes by likelihood instead); it is accepted and unused.
    256 of the `vocab_size` slots hold the <0xXX> byte pieces, so no character decodes to nothing.
    """
    # prepend_scheme="never": no invented leading space, so a text's own leading spaces survive.
    backend = Backend(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s*\S+|\s+"), behavior="isolated"),
        pre_tokenizers.Metaspace(prepend_scheme="never", split=False),
    ])
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - N_BYTES,
        special_tokens=[*SPECIAL_TOKENS, UNK],
        unk_token=UNK,
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)

    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    # Far below any learned piece, so byte pieces only stand in for unknown characters.
    floor = min(score for _, score in vocab) - 1000.0
    vocab += [[f"<0x{b:02X}>", floor] for b in range(N_BYTES)]
    spec["model"]["byte_fallback"] = True
    backend = Backend.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="never", split=False)]
    )
    return backend


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Backend:
    """WordPiece over byte-level words, so whitespace (and any byte) survives a round trip.

    Up to 256 slots are kept for continuation pieces of single bytes the trainer did not make,
    so every word can be spelled and [UNK] never appears; the result may be under `vocab_size`.
    """
    backend = Backend(
        models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUATION,
                         max_input_chars_per_word=1_000_000)  # long indentation runs are one word
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size - N_BYTES,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        continuing_subword_prefix=CONTINUATION,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)

    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(CONTINUATION + char, len(vocab))
    backend = Backend.from_str(json.dumps(spec))
    # Drop the continuation marks, then map byte-level characters back to bytes.
    backend.decoder = decoders.Sequence([decoders.Replace(CONTINUATION, ""), decoders.ByteLevel()])
    return backend


TRAINERS = {"bpe": train_bpe, "unigram": train_unigram, "wordpiece": train_wordpiece}
