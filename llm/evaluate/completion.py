"""From prompt strings to completion strings with one model: encoding, a decoding strategy
(greedy, sample, beam, speculative), stop strings, batching and streaming.

Stop strings are enforced twice. They are encoded with the tokenizer and handed to the decoder
as token sequences, so a row stops as soon as it emits one; but BPE may spell the same text
with other tokens in context (a merge across the boundary), so the decoded text is also cut at
the first stop string. The text-level cut is what guarantees the result; the token-level stop
only saves work. Beam search and speculative decoding take no stop sequences, so for them the
cut is all there is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, TextIO

import torch
from torch import nn

from llm.generate import SpeculativeStats, beam_search, generate, speculative_generate
from llm.generate.decode import ABSOLUTE_POSITIONS

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer


@dataclass
class DecodeSettings:
    strategy: str = "greedy"  # greedy | sample | beam | speculative
    max_new_tokens: int = 64
    temperature: float = 1.0  # sample and speculative; 0 makes speculative decoding greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    beam_width: int = 4
    speculative_k: int = 4
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    add_bos: bool = False
    batch_size: int = 8  # prompts decoded together (greedy and sample; beam and speculative take one)
    compile: bool = False  # greedy and sample: a compiled decoding step (llm.generate.static)


@dataclass
class Completion:
    prompt: str
    completion: str  # the decoded new text, cut before the first stop string
    n_tokens: int  # tokens generated, up to and including the one that completes a stop string (or EOS)

    def record(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "n_tokens": self.n_tokens}


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, Optional[int]]:
    """`text` before the earliest stop string, and where that stop string ends (None: no stop)."""
    hits = [(i, -len(s), s) for s in stops if (i := text.find(s)) >= 0]
    if not hits:
        return text, None
    i, _, stop = min(hits)  # earliest; at equal starts the longest stop string
    return text[:i], i + len(stop)


class TextStream:
    """Writes a completion as its tokens arrive (a `generate(stream=...)` callback for one row).

    Decodes everything so far and writes the new part, holding back what may still change: a
    trailing partial UTF-8 character, and the last characters that could begin a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], out: Optional[TextIO] = None):
        self.decode, self.stops, self.out = decode, stops, out
        self.tokens: list[int] = []
        self.shown = 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def __call__(self, row: int, token: int) -> None:
        if self.stopped:
            return
        self.tokens.append(token)
        text, end = cut_at_stop(self.decode(self.tokens), self.stops)
        if end is not None:
            self.stopped = True
            self._show(text, len(text))
            return
        safe = len(text) - self.hold - (1 if text.endswith("\ufffd") else 0)
        self._show(text, safe)

    def _show(self, text: str, upto: int) -> None:
        if upto > self.shown:
            self._write(text[self.shown : upto])
            self.shown = upto

    def close(self, final: str) -> None:
        """Write the rest of the final completion, and end the line."""
        self._write(final[self.shown :] + "\n")

    def _write(self, text: str) -> None:
        out = self.out or sys.stdout  # looked up per call: tests and pipes may swap sys.stdout
        out.write(text)
        out.flush()


class Completer:
    """Completes prompts with `model` (a `Transformer`, or its int8 copy) and `tokenizer`.

    One seeded generator serves every prompt in turn, so a run over the same prompts, batch size
    and seed draws the same samples. `stats` accumulates speculative decoding's acceptance.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, settings: DecodeSettings,
                 draft: Optional[nn.Module] = None):
        if settings.strategy == "speculative" and draft is None:
            raise ValueError("strategy=speculative needs a draft model")
        self.model, self.tokenizer, self.settings, self.draft = model, tokenizer, settings, draft
        self.device = model.embed.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.stop_sequences = [ids for ids in (tokenizer.encode(s) for s in settings.stop) if ids]
        self.stats = SpeculativeStats()

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        return [self.tokenizer.bos_id, *ids] if self.settings.add_bos else ids

    def prompt_problems(self, prompts: list[str], key: str) -> list[str]:
        """Prompts the model cannot complete, each named with `key` (the config key they came from)."""
        problems = []
        cfg, new = self.model.cfg, self.settings.max_new_tokens
        for number, prompt in enumerate(prompts, start=1):
            where = f"{key} (line {number})" if len(prompts) > 1 else key
            ids = self.encode(prompt)
            if not ids:
                problems.append(f"{where}={prompt!r}: encodes to no tokens; give some text, or add_bos=true to start "
                                "from the beginning-of-sequence token")
            elif cfg.position.kind in ABSOLUTE_POSITIONS and len(ids) + new > cfg.max_seq_len:
                problems.append(f"{where}: {len(ids)} prompt tokens + max_new_tokens={new} exceed the model's "
                                f"max_seq_len={cfg.max_seq_len} ({cfg.position.kind} positions end there)")
        return problems[:5]

    def complete(self, prompts: list[str], stream: Optional[TextStream] = None) -> list[Completion]:
        """One completion per prompt, in order. `stream` (one prompt, greedy or sample) sees each token."""
        encoded = [self.encode(p) for p in prompts]
        s = self.settings
        if s.strategy in ("greedy", "sample"):
            new: list[list[int]] = []
            for start in range(0, len(encoded), s.batch_size):
                new += self._sample(encoded[start : start + s.batch_size], stream)
        else:
            new = [self._one(ids) for ids in encoded]
        return [self._finish(p, tokens) for p, tokens in zip(prompts, new)]

    def _sample(self, batch: list[list[int]], stream: Optional[TextStream]) -> list[list[int]]:
        s, tok = self.settings, self.tokenizer
        return generate(
            self.model, batch, s.max_new_tokens, temperature=0.0 if s.strategy == "greedy" else s.temperature,
            top_k=s.top_k, top_p=s.top_p, eos_id=tok.eos_id, stop_sequences=self.stop_sequences, pad_id=tok.pad_id,
            generator=self.generator, vocab_size=tok.vocab_size, stream=stream, compile=s.compile,
        )

    def _one(self, prompt: list[int]) -> list[int]:
        s, tok = self.settings, self.tokenizer
        if s.strategy == "beam":
            return beam_search(self.model, prompt, s.beam_width, s.max_new_tokens, eos_id=tok.eos_id,
                               vocab_size=tok.vocab_size)
        tokens, stats = speculative_generate(
            self.model, self.draft, prompt, s.max_new_tokens, k=s.speculative_k, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, generator=self.generator, eos_id=tok.eos_id, vocab_size=tok.vocab_size,
        )
        self.stats.drafted += stats.drafted
        self.stats.accepted += stats.accepted
        self.stats.rounds += stats.rounds
        return tokens

    def _finish(self, prompt: str, tokens: list[int]) -> Completion:
        """Cut at the first stop string; n_tokens counts the tokens up to the one that completed it."""
        decode = self.tokenizer.decode
        full = decode(tokens)
        text, end = cut_at_stop(full, self.settings.stop)
        if end is not None:
            start = len(text)
            target = full[start:end]
            tokens = next(tokens[:k] for k in range(1, len(tokens) + 1) if decode(tokens[:k])[start:end] == target)
        return Completion(prompt, text, len(tokens))
