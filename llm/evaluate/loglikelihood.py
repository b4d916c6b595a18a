"""Log-likelihood of a continuation given a context: what multiple-choice scoring and the
lm-evaluation-harness `loglikelihood` requests ask of a model.

Splitting and truncation follow lm-evaluation-harness's HFLM, so that our model here and its
Hugging Face export in the harness score the same tokens: the context and the continuation are
encoded as one text and the continuation is what follows the context's own encoding (`encode_pair`);
a sequence longer than the model's window keeps its last max_length + 1 tokens (the continuation
whole). The log-probabilities are over the model's whole (padded) vocabulary, as transformers'
are for the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Scored:
    """log p(continuation | context), summed over its tokens, and whether greedy decoding from
    the context would have produced exactly those tokens."""

    logprob: float
    is_greedy: bool
    n_tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-evaluation-harness splits them (TemplateLM._encode_pair):
    trailing whitespace of the context moves to the continuation, the whole text is encoded once and the
    continuation is what follows the context's own encoding (BPE may merge across the boundary)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def score_continuations(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                        max_length: Optional[int] = None) -> list[Scored]:
    """Score each (context ids, continuation ids) pair with `model` (a `Transformer`, eval mode).

    Rows are right-padded: with a causal mask a real token never sees the padding after it, so
    a batch gives each row the logits it would get alone. Longest first, so a batch holds rows of
    similar length (and the first batch shows at once whether memory suffices).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.embed.weight.device
    max_length = max_length or model.cfg.max_seq_len
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("a continuation needs at least one token")
        if not context:
            raise ValueError("a context needs at least one token (give the BOS or EOS token for an empty one)")
        # The model reads all but the last token; keep the last max_length of those (HFLM's truncation).
        inputs = (context + continuation)[-(max_length + 1):][:-1]
        rows.append((inputs, continuation))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Optional[Scored]] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(len(rows[i][0]) for i in batch)
        tokens = torch.zeros(len(batch), longest, dtype=torch.long)
        for r, i in enumerate(batch):
            tokens[r, :len(rows[i][0])] = torch.tensor(rows[i][0])
        logprobs = F.log_softmax(model(tokens.to(device)).float(), dim=-1)
        for r, i in enumerate(batch):
            inputs, continuation = rows[i]
            n = len(continuation)
            # The continuation's tokens are predicted at the last n input positions.
            lp = logprobs[r, len(inputs) - n:len(inputs)]
            target = torch.tensor(continuation, device=lp.device)
            out[i] = Scored(logprob=float(lp.gather(1, target[:, None]).sum()),
                            is_greedy=bool((lp.argmax(-1) == target).all()), n_tokens=n)
    return out  # type: ignore[return-value]
