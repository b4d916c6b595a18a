"""Beam search: keep the beam_width most likely continuations, one cache row each.

The semantics are Hugging Face's `generate(num_beams=W, do_sample=False, early_stopping=True)`
(transformers 5), so the same weights give the same tokens:

- Each step ranks every (beam, next token) pair by total log-probability and looks at the best
  2W; the best W that do not end in EOS go on, their cache rows reordered to follow them.
- A candidate ending in EOS becomes a finished hypothesis only if it is among the best W of the
  step (the next W are there so that W beams can carry on). Its score is its total log-probability
  over (new tokens, EOS included) ** length_penalty.
- The search stops once W hypotheses have finished, and returns the best of them: beams still
  running then are not candidates, though one of them might have scored better.
- At max_new_tokens the best W candidates of the last step all finish, EOS or not, and compete
  with those that finished earlier.

With beam_width=1 this is greedy decoding. Batch size 1.
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
    """The new tokens of the best finished hypothesis (ending with eos_id if it finished on it).

    `vocab_size` defaults to model.cfg.vocab_size. Of exactly equal scores the hypothesis that
    finished first wins (transformers' torch.topk breaks such ties in no fixed order).
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
        last = step == max_new_tokens - 1
        log_probs = mask_padded_vocab(logits.float(), vocab_size).log_softmax(dim=-1)
        V = log_probs.shape[-1]
        # 2W candidates: even if W of them end in EOS, W remain to carry on.
        top, index = (scores[:, None] + log_probs).view(-1).topk(min(2 * W, W * V))
        live: list[tuple[int, list[int], float]] = []  # (cache row it extends, tokens, total log-prob)
        for rank, (score, i) in enumerate(zip(top.tolist(), index.tolist())):
            if score == float("-inf"):
                break
            row, token = divmod(i, V)
            seq = beams[row] + [token]
            if rank < W and (token == eos_id or last):  # only the W best may finish
                finished.append((normalized(score, len(seq), length_penalty), seq))
            elif token != eos_id and len(live) < W:
                live.append((row, seq, score))
        if len(finished) >= W or last or not live:
            break
        live += [(live[0][0], live[0][1], float("-inf"))] * (W - len(live))  # tiny vocab: dead fillers
        rows, beams, totals = zip(*live)
        beams, scores = list(beams), torch.tensor(totals, device=device)
        cache.reorder(torch.tensor(rows, device=device))
        logits = model(torch.tensor([b[-1] for b in beams], device=device)[:, None], cache=cache)[:, -1]
    return max(finished, key=lambda hypothesis: hypothesis[0])[1]
