"""Tokens per second of the models llm-eval compares (fp32 and its quantised copy), measured alike:
the same tokens for every model, a warm-up run each, then `repeats` rounds that time every model
once (interleaved, so a busy moment of the machine hits them all), and the best round of each.

Two figures, because weight-only quantisation helps them differently: greedy decoding (one row,
KV cache: small matmuls whose cost is reading the weights) and a forward pass over a whole batch
(the perplexity pass: large matmuls whose cost is arithmetic).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from llm.generate.decode import generate

PROMPT_TOKENS = 16


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds `fn` took, and its result; on CUDA, from an idle device until it has finished too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


@torch.no_grad()
def throughput(models: dict[str, nn.Module], batch: Optional[Tensor], new_tokens: int, repeats: int,
               seed: int = 0) -> dict[str, dict[str, float]]:
    """{name: {"decode_tokens_per_s", "forward_tokens_per_s" (with a batch)}}, best of `repeats`.

    Decoding starts from the first PROMPT_TOKENS tokens of the batch's first row (seeded random
    tokens without a batch) and never stops early (no EOS), so every model makes the same
    `new_tokens` steps (fewer when the model's context is shorter)."""
    first = next(iter(models.values()))
    device = first.embed.weight.device
    if batch is not None:
        prompt = batch[0, :PROMPT_TOKENS].tolist()
    else:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, first.cfg.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
    steps = max(1, min(new_tokens, first.cfg.max_seq_len - len(prompt)))
    inputs = batch[:, :-1].to(device) if batch is not None else None

    def jobs(model: nn.Module) -> dict[str, tuple[Callable[[], object], int]]:
        out = {"decode_tokens_per_s": (lambda: generate(model, [prompt], steps), steps)}
        if inputs is not None:
            out["forward_tokens_per_s"] = (lambda: model(inputs), inputs.numel())
        return out

    for model in models.values():  # warm-up: one-off allocations and kernel selection are not timed
        model.eval()
        for fn, _ in jobs(model).values():
            fn()
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            for key, (fn, tokens) in jobs(model).items():
                rate = tokens / max(timed(fn, device)[0], 1e-9)
                best[name][key] = max(best[name].get(key, 0.0), rate)
    return best
