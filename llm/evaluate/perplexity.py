"""Perplexity on a held-out split: mean next-token NLL (nats/token), its exponential, and bits per
byte, which compares models whose tokenizers differ.

The batches are those of training's validation (`validation_batches`: the first blocks of the
split, in order), so with the run's seq_len, micro batch size and val_batches the loss equals
the run's own `val/loss`. Like it, the loss is over the model's whole (padded) vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.data import build_token_cache, split_inputs_targets, validation_batches


@dataclass
class Perplexity:
    loss: float  # mean NLL, nats per token
    tokens: int  # predicted tokens it averages over
    tokens_per_byte: Optional[float] = None  # of the split, for bits per byte

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))  # capped as training's val/ppl, so a diverged model gives a number

    @property
    def bits_per_byte(self) -> Optional[float]:
        """NLL in bits per UTF-8 byte of text: loss / ln 2 x tokens per byte."""
        return None if self.tokens_per_byte is None else self.loss / math.log(2) * self.tokens_per_byte

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss, "ppl": self.ppl, "tokens": float(self.tokens)}
        if self.bits_per_byte is not None:
            out["bits_per_byte"] = self.bits_per_byte
        return out


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[Tensor], tokens_per_byte: Optional[float] = None) -> Perplexity:
    """Mean NLL of `model` over (B, seq_len + 1) token batches, each token weighted alike."""
    if not batches:
        raise ValueError("perplexity: no batches to evaluate")
    device = model.embed.weight.device
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = split_inputs_targets(batch.to(device))
        logits = model(inputs)
        # Summed per batch in float32 like training's mean, then accumulated in float64.
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return Perplexity(total / count, count, tokens_per_byte)


@dataclass
class HeldOut:
    """The val split of a corpus, tokenised, and its size in bytes."""

    tokens: np.ndarray  # token ids, a read-only memmap (documents separated by EOS)
    n_tokens: int
    n_bytes: int
    corpus: str

    @property
    def tokens_per_byte(self) -> float:
        # EOS separators count as tokens (the model predicts them) that stand for no bytes.
        return self.n_tokens / self.n_bytes

    def batches(self, seq_len: int, batch_size: int, max_batches: Optional[int]) -> list[Tensor]:
        if self.n_tokens < seq_len + 1:  # an input problem, reported before any model work
            from llm.config import ConfigError

            raise ConfigError([f"seq_len={seq_len}: the val split of {self.corpus} has only {self.n_tokens} tokens, "
                               f"too few for one block of {seq_len + 1}; give a seq_len <= {self.n_tokens - 1} or "
                               "more text"])
        return validation_batches(self.tokens, seq_len, batch_size, max_batches)


def held_out(corpus, tokenizer, cache_dir: str | Path) -> HeldOut:
    """Tokenise the corpus's val split (or reuse training's token cache: same corpus, same
    tokenizer, same key) and count its bytes."""
    cache = build_token_cache(corpus, tokenizer, "val", cache_dir)
    n_bytes = sum(len(document.encode("utf-8")) for document in corpus.documents("val"))
    return HeldOut(cache.tokens, cache.n_tokens, n_bytes, corpus.name)
