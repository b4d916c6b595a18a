"""From logits to the next token: greedy, temperature, top-k and top-p (nucleus) sampling.

Filters return logits with the excluded tokens set to -inf, so they compose and can be tested
on fixed logits. The order is the usual one (as Hugging Face's): padded vocab, temperature,
top-k, then top-p. Draws take a `torch.Generator` (on the logits' device) for reproducibility.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def mask_padded_vocab(logits: Tensor, vocab_size: Optional[int]) -> Tensor:
    """-inf at ids >= vocab_size: the model's embedding is padded past the tokenizer's vocab, and
    those rows (untrained, or random) must never be chosen."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    return logits.index_fill(-1, torch.arange(vocab_size, logits.shape[-1], device=logits.device), float("-inf"))


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest logits of each row (ties broken by topk), -inf elsewhere."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    k = min(k, logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the nucleus: the most likely tokens whose probabilities first add up to >= p (always
    at least the top token), -inf elsewhere."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def filter_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    vocab_size: Optional[int] = None,
) -> Tensor:
    """Padded-vocab mask, temperature (> 0), top-k and top-p applied to (..., V) logits, in float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample (0 is greedy), got {temperature}")
    logits = mask_padded_vocab(logits.float(), vocab_size) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def probabilities(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    vocab_size: Optional[int] = None,
) -> Tensor:
    """The distribution a token is drawn from; temperature 0 is greedy, a one-hot on the argmax
    (speculative decoding needs greedy as a distribution too)."""
    if temperature == 0:
        best = mask_padded_vocab(logits.float(), vocab_size).argmax(dim=-1)
        return F.one_hot(best, logits.shape[-1]).float()
    return filter_logits(logits, temperature, top_k, top_p, vocab_size).softmax(dim=-1)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """(B, V) logits -> (B,) token ids. Temperature 0 (the default) is greedy: the argmax."""
    if temperature == 0:
        return mask_padded_vocab(logits, vocab_size).argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p, vocab_size)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
