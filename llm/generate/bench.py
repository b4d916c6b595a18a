"""Decoding speed: tokens/s of greedy generation, with or without the KV cache.

    from llm.generate.bench import decode_speed
    decode_speed(model, prompt_len=16, new_tokens=512, use_cache=True)

Not a test: figures depend on the machine (and on whoever else is using it).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from llm.generate.decode import generate


def decode_speed(
    model: nn.Module, prompt_len: int, new_tokens: int = 512, use_cache: bool = True, batch: int = 1, seed: int = 0
) -> float:
    """New tokens per second (all rows together) of greedy decoding from random prompts,
    prefill included. A short warm-up run first, so one-off allocations are not timed."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()
    generate(model, prompts, min(8, new_tokens), use_cache=use_cache)
    if model.embed.weight.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, use_cache=use_cache)
    if model.embed.weight.is_cuda:
        torch.cuda.synchronize()
    return sum(len(row) for row in out) / (time.perf_counter() - start)


def compare(model: nn.Module, prompt_len: int = 16, new_tokens: int = 512, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` tokens/s for cached and uncached decoding, interleaved so machine noise
    hits both alike, and the speed-up."""
    cached, uncached = [], []
    for _ in range(repeats):
        cached.append(decode_speed(model, prompt_len, new_tokens, use_cache=True))
        uncached.append(decode_speed(model, prompt_len, new_tokens, use_cache=False))
    return {"cached": max(cached), "uncached": max(uncached), "speedup": max(cached) / max(uncached)}
