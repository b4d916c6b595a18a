"""Post-training batches: tokenise examples (with a seq_len policy), pack them, collate them.

Every training batch is a dict of right-padded (B, T) tensors:

    tokens     token ids, pad_id at padding
    labels     tokens where the token is trained, -100 elsewhere (prompt, template, padding, and
               the first token of every document, which nothing in its own document predicts)
    positions  0, 1, ... within each document; 0 at padding
    documents  index of the document within its row, from 0; -1 at padding
    mask       True at real tokens

logits[:, t] predict tokens[:, t + 1], so a loss compares logits[:, :-1] with labels[:, 1:]. An
example is prompt + completion + EOS, and the EOS is trained when the completion is. With packing,
several examples share a row; `documents` lets attention stay inside each one (the model's
`documents` argument) and positions restart at 0 for each.

Truncation policy (seq_len is the longest row): a row whose prompt alone fills seq_len (no room
for one completion token) is dropped; a longer completion is cut at seq_len, losing its EOS. A
preference pair is dropped when its prompt does not fit, or when truncation makes chosen and
rejected identical. `Tokenized.summary()` reports the counts; no row left is a DatasetError.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from llm.data.formats import DatasetError, PreferenceExample, PromptExample, SFTExample
from llm.tokenizer.tokenizer import Tokenizer

IGNORE_INDEX = -100  # what torch's cross_entropy skips by default


@dataclass(frozen=True)
class TokenizedExample:
    """One document: its token ids and, for each, whether the loss is computed on it."""

    tokens: tuple[int, ...]
    trained: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class TokenizedPreference:
    """prompt + chosen + EOS and prompt + rejected + EOS, the completions trained."""

    chosen: TokenizedExample
    rejected: TokenizedExample


@dataclass(frozen=True)
class TokenizedPrompt:
    tokens: tuple[int, ...]
    meta: dict[str, Any]


Pack = tuple[TokenizedExample, ...]  # several documents that share one row


@dataclass
class Tokenized:
    """Tokenised examples and what the seq_len policy did to the rows."""

    examples: list[Any]
    rows: int
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0

    def summary(self) -> str:
        dropped = "; ".join(f"{n} dropped: {reason}" for reason, n in self.dropped.items())
        return (f"kept {len(self.examples)} of {self.rows} rows" + (f" ({dropped})" if dropped else "")
                + (f"; {self.truncated} completions truncated" if self.truncated else ""))

    def require_some(self, what: str) -> Tokenized:
        if not self.examples:
            raise DatasetError([f"{what}: no usable rows after tokenisation: {self.summary()}"])
        return self


def _fit(prompt: list[int], completion: list[int], trained: list[bool], seq_len: int) -> tuple[TokenizedExample, bool]:
    """prompt (untrained) + completion, cut at seq_len; also whether it was cut."""
    tokens, flags = prompt + completion, [False] * len(prompt) + trained
    return TokenizedExample(tuple(tokens[:seq_len]), tuple(flags[:seq_len])), len(tokens) > seq_len


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a prompt token and a completion token), got {seq_len}")


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: Tokenizer, seq_len: int) -> Tokenized:
    """Each example's segments, encoded separately and concatenated, then EOS (trained when the
    last segment is). The prompt is everything before the first trained token."""
    _check_seq_len(seq_len)
    texts = [segment.text for example in examples for segment in example.segments]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    result = Tokenized([], len(examples))
    for example in examples:
        tokens: list[int] = []
        trained: list[bool] = []
        for segment in example.segments:
            ids = next(encoded)
            tokens += ids
            trained += [segment.trained] * len(ids)
        tokens.append(tokenizer.eos_id)
        trained.append(bool(example.segments) and example.segments[-1].trained)
        if True not in trained:
            result.dropped["no trained tokens"] += 1
            continue
        if trained.index(True) >= seq_len:
            result.dropped[f"prompt alone has >= seq_len={seq_len} tokens"] += 1
            continue
        fitted, cut = _fit([], tokens, trained, seq_len)
        result.examples.append(fitted)
        result.truncated += cut
    return result


def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer: Tokenizer, seq_len: int) -> Tokenized:
    """prompt + chosen + EOS and prompt + rejected + EOS, each cut at seq_len."""
    _check_seq_len(seq_len)
    texts = [text for e in examples for text in (e.prompt, e.chosen, e.rejected)]
    encoded = tokenizer.encode_batch(texts) if texts else []
    result = Tokenized([], len(examples))
    for i in range(len(examples)):
        prompt, chosen, rejected = encoded[3 * i: 3 * i + 3]
        if len(prompt) >= seq_len:
            result.dropped[f"prompt alone has >= seq_len={seq_len} tokens"] += 1
            continue
        (c, c_cut), (r, r_cut) = (_fit(prompt, ids + [tokenizer.eos_id], [True] * (len(ids) + 1), seq_len)
                                  for ids in (chosen, rejected))
        if c.tokens == r.tokens:
            result.dropped[f"chosen and rejected identical once cut at seq_len={seq_len}"] += 1
            continue
        result.examples.append(TokenizedPreference(c, r))
        result.truncated += c_cut + r_cut
    return result


def tokenize_prompts(examples: Sequence[PromptExample], tokenizer: Tokenizer, max_prompt_length: int) -> Tokenized:
    """Prompt token ids (no EOS), dropping prompts longer than max_prompt_length (which should
    leave room for the tokens to be generated within the model's sequence length)."""
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    encoded = tokenizer.encode_batch([e.prompt for e in examples]) if examples else []
    result = Tokenized([], len(examples))
    for example, ids in zip(examples, encoded):
        if not ids:
            result.dropped["prompt encodes to no tokens"] += 1
        elif len(ids) > max_prompt_length:
            result.dropped[f"prompt has > max_prompt_length={max_prompt_length} tokens"] += 1
        else:
            result.examples.append(TokenizedPrompt(tuple(ids), dict(example.meta)))
    return result


def pack(examples: Sequence[TokenizedExample], seq_len: int) -> list[Pack]:
    """Examples grouped into rows of at most seq_len tokens, by best-fit decreasing: each example,
    longest first, goes to the fullest row it still fits in. Deterministic for a given input."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first that fits
    for i in order:
        size = len(examples[i])
        if size > seq_len:
            raise ValueError(f"an example of {size} tokens does not fit seq_len={seq_len}; tokenise with that seq_len")
        j = bisect.bisect_left(free, (size, -1))
        if j < len(free):
            room, row = free.pop(j)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - size, row))
    return [tuple(examples[i] for i in sorted(row)) for row in rows]


def collate_sft(items: Sequence[Union[TokenizedExample, Pack]], pad_id: int,
                length: int | None = None) -> dict[str, Tensor]:
    """A training batch (see the module docstring) of single examples or packs, right-padded to
    the longest row, or to `length`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    rows = [(item,) if isinstance(item, TokenizedExample) else tuple(item) for item in items]
    longest = max(sum(len(doc) for doc in row) for row in rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"a row of {longest} tokens does not fit length={length}")
    tokens, labels, positions, documents = [], [], [], []
    for row in rows:
        t: list[int] = []
        lab: list[int] = []
        pos: list[int] = []
        doc: list[int] = []
        for index, example in enumerate(row):
            t += example.tokens
            # The first token of a document is predicted from the previous document (or nothing).
            lab += [IGNORE_INDEX] + [tok if flag else IGNORE_INDEX
                                     for tok, flag in zip(example.tokens[1:], example.trained[1:])]
            pos += range(len(example))
            doc += [index] * len(example)
        pad = length - len(t)
        tokens.append(t + [pad_id] * pad)
        labels.append(lab + [IGNORE_INDEX] * pad)
        positions.append(pos + [0] * pad)
        documents.append(doc + [-1] * pad)
    documents_tensor = torch.tensor(documents, dtype=torch.long)
    return {
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "positions": torch.tensor(positions, dtype=torch.long),
        "documents": documents_tensor,
        "mask": documents_tensor >= 0,
    }


def collate_preferences(items: Sequence[TokenizedPreference], pad_id: int) -> dict[str, dict[str, Tensor]]:
    """{"chosen": batch, "rejected": batch}, both padded to the same T, row i of each a pair."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    length = max(max(len(p.chosen), len(p.rejected)) for p in items)
    return {"chosen": collate_sft([p.chosen for p in items], pad_id, length),
            "rejected": collate_sft([p.rejected for p in items], pad_id, length)}


def collate_prompts(items: Sequence[TokenizedPrompt]) -> dict[str, list]:
    """{"prompts": un-padded token id lists, "meta": what the reward function reads}."""
    return {"prompts": [list(p.tokens) for p in items], "meta": [dict(p.meta) for p in items]}


def collator(kind: str, pad_id: int) -> Callable[[Sequence[Any]], dict]:
    """The collate function of `kind` ("sft", "preference" or "prompt"), picklable for workers."""
    if kind == "sft":
        return partial(collate_sft, pad_id=pad_id)
    if kind == "preference":
        return partial(collate_preferences, pad_id=pad_id)
    if kind == "prompt":
        return collate_prompts
    raise ValueError(f"unknown kind {kind!r}; expected sft, preference or prompt")
