"""Multiple-choice scoring of the built-in tasks (llm.data.tasks), as lm-evaluation-harness
scores its multiple_choice tasks: the model's log-likelihood of each choice after the prompt.

A question is a held-out (val) prompt of a task, its answer and `n_choices - 1` distinct
corruptions of it (the plausible mistakes of `Task.corrupt`), shuffled by a seed. `acc` counts the
questions whose answer has the highest summed log-likelihood; `acc_norm` divides each sum by the
choice's length in characters first (the harness's length normalisation). Neither needs
lm-evaluation-harness, so a training run of any size can log them; the same questions also load
into the harness (`llm.evaluate.harness_tasks`), where they score the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from llm.data.tasks import TaskMix
from llm.evaluate.loglikelihood import encode_pair, score_continuations

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer

MAX_CORRUPT_TRIES = 50  # per choice: a task with few wrong answers near the right one gives fewer choices


@dataclass(frozen=True)
class Question:
    prompt: str
    choices: tuple[str, ...]
    gold: int  # index of the correct choice

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "choices": list(self.choices), "gold": self.gold}


def questions(task: str, knobs: Optional[Mapping[str, Any]] = None, n: int = 64, n_choices: int = 4,
              seed: int = 0, val_fraction: float = 0.1) -> list[Question]:
    """`n` questions of one built-in task from its held-out (val) prompts: a pure function of the
    arguments (the TaskMix of the run's data=tasks corpus keeps its held-out prompts with the same
    task knobs, seed and val_fraction)."""
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    mix = TaskMix({task: dict(knobs or {})}, seed=seed, val_fraction=val_fraction)
    rng = np.random.default_rng([seed, 7])  # its own stream: the prompts are those of mix.samples
    out = []
    for sample in mix.samples(n, "val"):
        choices = [sample.answer]
        for _ in range(MAX_CORRUPT_TRIES * (n_choices - 1)):
            if len(choices) == n_choices:
                break
            wrong = mix.tasks[0].corrupt(sample.answer, rng)
            if wrong not in choices:
                choices.append(wrong)
        order = rng.permutation(len(choices))
        out.append(Question(sample.prompt, tuple(choices[i] for i in order), int(np.argmax(order == 0))))
    return out


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float
    count: int

    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "acc_norm": self.acc_norm}


def choose(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """The chosen index by summed log-likelihood, and by log-likelihood per character (acc_norm)."""
    lls = np.asarray(logprobs, dtype=np.float64)
    lengths = np.asarray([max(1, len(c)) for c in choices], dtype=np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def score_questions(model: nn.Module, tokenizer: Tokenizer, items: Sequence[Question], batch_size: int = 16,
                    delimiter: str = "") -> ChoiceResult:
    """acc and acc_norm of `model` on the questions (every choice of every question in batches)."""
    if not items:
        raise ValueError("no questions to score")
    pairs, spans = [], []
    for q in items:
        start = len(pairs)
        pairs += [encode_pair(tokenizer, q.prompt, delimiter + c) for c in q.choices]
        spans.append((start, len(pairs)))
    scored = score_continuations(model, pairs, batch_size)
    correct = correct_norm = 0
    for q, (start, end) in zip(items, spans):
        best, best_norm = choose([s.logprob for s in scored[start:end]], q.choices)
        correct += best == q.gold
        correct_norm += best_norm == q.gold
    return ChoiceResult(correct / len(items), correct_norm / len(items), len(items))
