"""Beam search: keep the beam_width most likely continuations, one cache row each.

Each step scores every (beam, next token) pair by total log-probability, keeps the best
beam_width, and reorders the cache rows to follow the beams they extend. A beam that emits EOS
is set aside as a finished hypothesis; the search ends once beam_width hypotheses are finished
(as Hugging Face's `early_stopping=True`) or after max_new_tokens. Batch size 1.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llm.generate.cache import KVCache
from llm.generate.decode import check_length
from llm.generate.sampling import mask_padded_vocab


def normalized(score: float, length: int, length_penalty: float) -> float:
    """Total log-prob / length^length_penalty: > 0 favours longer hypotheses, 0 compares totals."""
    return score / max(length, 1) ** length_penalty


@torch.no_grad()
def beam_search(
    model: nn.Module,
    prompt: list[int],
    beam_width: int,
    max_new_tokens: int,
    eos_id: Optional[int] = None,
    length_penalty: float = 1.0,
    vocab_size: Optional[int] = None,
) -> list[int]:
    """The new tokens of the best hypothesis (ending with eos_id if it finished on it).

    With beam_width=1 this is greedy decoding. `vocab_size` defaults to model.cfg.vocab_size.
    """
    if beam_width < 1 or not prompt:
        raise ValueError("beam_width must be >= 1 and the prompt non-empty")
    check_length(model, len(prompt) + max_new_tokens)
    if max_new_tokens <= 0:
        return []
    device = model.embed.weight.device
    vocab_size = vocab_size if vocab_size is not None else model.cfg.vocab_size
    W = beam_width
    cache = KVCache.for_model(model, W, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device).expand(W, -1), cache=cache)[:, -1]
    # Every row starts as the same prompt: only row 0 is live, or the beams would be W copies.
    scores = torch.full((W,), float("-inf"), device=device)
    scores[0] = 0.0
    beams: list[list[int]] = [[] for _ in range(W)]
    finished: list[tuple[float, list[int]]] = []  # (normalized score, tokens)
    for step in range(max_new_tokens):
        log_probs = mask_padded_vocab(logits.float(), vocab_size).log_softmax(dim=-1)
        V = log_probs.shape[-1]
        # 2W candidates: even if W of them end in EOS, W remain to carry on.
        top, index = (scores[:, None] + log_probs).view(-1).topk(min(2 * W, W * V))
        live: list[tuple[int, list[int], float]] = []  # (cache row it extends, tokens, total log-prob)
        for rank, (score, i) in enumerate(zip(top.tolist(), index.tolist())):
            if score == float("-inf") or len(live) == W:
                break
            row, token = divmod(i, V)
            seq = beams[row] + [token]
            if token != eos_id:
                live.append((row, seq, score))
            elif rank < W:  # only an EOS among the W best counts as a finished beam
                finished.append((normalized(score, len(seq), length_penalty), seq))
        if len(finished) >= W or not live or step == max_new_tokens - 1:
            break
        live += [(live[0][0], live[0][1], float("-inf"))] * (W - len(live))  # tiny vocab: dead fillers
        rows, beams, totals = zip(*live)
        beams, scores = list(beams), torch.tensor(totals, device=device)
        cache.reorder(torch.tensor(rows, device=device))
        logits = model(torch.tensor([b[-1] for b in beams], device=device)[:, None], cache=cache)[:, -1]
    hypotheses = finished + [(normalized(s, len(b), length_penalty), b) for _, b, s in live if s > float("-inf")]
    return max(hypotheses, key=lambda hypothesis: hypothesis[0])[1]
