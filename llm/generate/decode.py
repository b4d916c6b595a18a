"""Batched autoregressive generation: left-padded prompts, a KV cache, per-row stopping.

Prompts of different lengths are padded on the LEFT, so every row's next token lands in the
same column; each row's positions start at 0 at its first real token, and padding is masked
out of attention. With the cache, the prompt is run once (prefill) and every later step feeds
one token per row; `use_cache=False` re-runs the whole sequence each step instead (the
reference the cache is tested against, and the baseline of `llm.generate.bench`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from llm.generate.cache import KVCache
from llm.generate.sampling import sample
from llm.generate.static import StaticKVCache, bucketed, compiled_step, decoding_weights

ABSOLUTE_POSITIONS = ("learned", "sinusoidal")


def check_length(model: nn.Module, total: int) -> None:
    """Learned and sinusoidal positions come from a table of max_seq_len rows: there is no
    position past it. RoPE, ALiBi and NoPE have no such limit (quality aside)."""
    cfg = model.cfg
    if cfg.position.kind in ABSOLUTE_POSITIONS and total > cfg.max_seq_len:
        raise ValueError(
            f"prompt + new tokens = {total} tokens, more than model.max_seq_len={cfg.max_seq_len}: "
            f"{cfg.position.kind} positions have no embedding past it; shorten the prompt or max_new_tokens"
        )


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, longest) tokens, padded on the left with pad_id, and the mask that is True at real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = True
    return tokens.to(device), mask.to(device)


def ends_with_stop(tokens: list[int], eos_id: Optional[int], stop_sequences: Optional[list[list[int]]]) -> bool:
    """Whether generated tokens end on EOS or on one of the stop sequences."""
    if eos_id is not None and tokens and tokens[-1] == eos_id:
        return True
    return any(seq and tokens[-len(seq) :] == list(seq) for seq in stop_sequences or ())


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    stop_sequences: Optional[list[list[int]]] = None,
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    vocab_size: Optional[int] = None,
    stream: Optional[Callable[[int, int], None]] = None,
    lockstep: bool = False,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (a `Transformer` in eval mode; temperature 0 is greedy).

    A row stops at EOS or when its output ends with a stop sequence (matched within the new
    tokens only); that EOS or stop sequence IS included at the end of its output, nothing
    after it is. Other rows go on. `vocab_size` (default: model.cfg.vocab_size, the tokenizer's)
    keeps padded vocab ids from being sampled. `stream(row, token)` is called for every token
    as it is produced. `generator` must be on the model's device. `lockstep` takes all
    `max_new_tokens` steps even after every row stopped: a sharded (FSDP) model gathers its
    weights in every forward, so all ranks must make the same number of calls.
    `compile`: the steps after the prompt run as one compiled graph over a fixed-shape cache
    (`llm.generate.static`; compiled once per model, batch and cache length): the same tokens
    (to float rounding) with less per-step overhead. Needs the cache.
    """
    device = model.embed.weight.device
    vocab_size = vocab_size if vocab_size is not None else model.cfg.vocab_size
    tokens, mask = left_pad(prompts, pad_id, device)
    check_length(model, tokens.shape[1] + max_new_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    padded = not bool(mask.all())
    if padded and not use_cache and model.cfg.attention.kernel != "sdpa":  # the cached path always uses SDPA
        raise ValueError("use_cache=False with prompts of different lengths needs model.attention.kernel=sdpa: "
                         "the flash and flex kernels take no per-row padding mask")
    # Per-row positions only when padded, so equal-length prompts keep the shared fast path.
    positions = (mask.cumsum(1) - 1).clamp(min=0) if padded else None
    next_pos = mask.sum(1, keepdim=True)  # (B, 1): each row's position for its next token
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decoding step: it needs use_cache=True")
    total = tokens.shape[1] + max_new_tokens
    cache: Optional[KVCache] = None
    if compile:
        cache = StaticKVCache.for_model(model, len(prompts), bucketed(total))
        decode_step, weights = compiled_step(), decoding_weights(model)
    elif use_cache:
        cache = KVCache.for_model(model, len(prompts), total)
    logits = model(tokens, positions, cache, mask if padded else None)[:, -1]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        new = sample(logits, temperature, top_k, top_p, vocab_size, generator)
        for row, token in enumerate(new.tolist()):
            if done[row]:  # a stopped row still computes (the batch moves together), but is not kept
                continue
            out[row].append(token)
            if stream is not None:
                stream(row, token)
            done[row] = ends_with_stop(out[row], eos_id, stop_sequences)
        if (all(done) and not lockstep) or step == max_new_tokens - 1:
            break
        new = new[:, None]
        if compile:  # positions always given: the graph never reads the cache's length
            logits = decode_step(model, new, next_pos, cache, weights)
        elif cache is not None:
            logits = model(new, next_pos if padded else None, cache)[:, -1]
        else:
            tokens = torch.cat([tokens, new], dim=1)
            if padded:
                positions = torch.cat([positions, next_pos], dim=1)
                mask = torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], dim=1)
            logits = model(tokens, positions, mask=mask if padded else None)[:, -1]
        next_pos = next_pos + 1
    return out
