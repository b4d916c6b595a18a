"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k
tokens one by one, the target model scores all of them in ONE forward pass, and rejection
sampling keeps a prefix of them so that the output is distributed exactly as the target's own
samples (greedy output, at temperature 0).

Draft token x, drawn from the draft's q, is accepted with probability min(1, p(x) / q(x)), p the
target's distribution at that point. On the first rejection the token is drawn from
norm(max(0, p - q)) instead and the round ends; if all k are accepted, a bonus token comes from
the target's distribution after them. Both models keep a KV cache, cut back after rejections.
Batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from llm.generate.cache import KVCache
from llm.generate.decode import check_length
from llm.generate.sampling import probabilities


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the target accepted
    rounds: int = 0  # target forward passes after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target pass (1.0 is plain decoding)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def draw(probs: Tensor, generator: Optional[torch.Generator]) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_or_resample(
    p: Tensor, q: Tensor, token: int, generator: Optional[torch.Generator]
) -> tuple[bool, Optional[int]]:
    """One verification: (True, None) if the draft token stands, else (False, its replacement)."""
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[token] < p[token]:  # u < p/q without dividing; q[token] > 0 since token was drawn from q
        return True, None
    residual = (p - q).clamp(min=0)
    if residual.sum() <= 0:  # p == q up to rounding: the rejection was a rounding artefact
        residual = p
    return False, draw(residual / residual.sum(), generator)


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    eos_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> tuple[list[int], SpeculativeStats]:
    """The new tokens (ending at eos_id, included, if it comes) and acceptance statistics.

    The draft must share the target's tokenizer. top_k/top_p shape both models' distributions
    alike, so the output follows the target's filtered distribution. `vocab_size` defaults to
    the target's model.cfg.vocab_size.
    """
    if not prompt or k < 1:
        raise ValueError("the prompt must be non-empty and k >= 1")
    total = len(prompt) + max_new_tokens
    for model in (target, draft):
        check_length(model, total)
    vocab_size = vocab_size if vocab_size is not None else target.cfg.vocab_size
    device = target.embed.weight.device
    stats = SpeculativeStats()

    def dist(logits: Tensor) -> Tensor:
        return probabilities(logits, temperature, top_k, top_p, vocab_size)

    def feed(model: nn.Module, cache: KVCache, tokens: list[int]) -> Tensor:
        return model(torch.tensor([tokens], device=device), cache=cache)[0]

    # Invariant: each cache holds a prefix of `seq`; the target's always all but the last token.
    seq = list(prompt)
    t_cache, d_cache = KVCache.for_model(target, 1, total), KVCache.for_model(draft, 1, total)
    if len(seq) > 1:
        feed(target, t_cache, seq[:-1])
        feed(draft, d_cache, seq[:-1])
    while len(seq) < total:
        n = min(k, total - len(seq))  # no drafting past the budget
        drafted, qs, pending = [], [], seq[d_cache.length :]
        for _ in range(n):
            q = dist(feed(draft, d_cache, pending)[-1])
            pending = [draw(q, generator)]
            drafted.append(pending[0])
            qs.append(q)
        ps = dist(feed(target, t_cache, seq[-1:] + drafted))  # (n + 1, V): after seq[-1] and each draft
        stats.rounds += 1
        stats.drafted += n
        new = []
        for i, token in enumerate(drafted):
            ok, replacement = accept_or_resample(ps[i], qs[i], token, generator)
            if not ok:
                new.append(replacement)
                break
            new.append(token)
            stats.accepted += 1
        else:  # every draft accepted: the target's next distribution is already computed
            new.append(draw(ps[n], generator))
        seq += new
        t_cache.truncate(len(seq) - 1)  # drop the keys of rejected drafts
        d_cache.truncate(len(seq) - 1)
        if eos_id is not None and eos_id in new:
            break
    out = seq[len(prompt) : total]  # a bonus token may overshoot the budget by one
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    return out, stats
