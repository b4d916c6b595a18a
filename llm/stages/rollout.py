"""Rollouts for on-policy methods (PPO, GRPO): sample completions of prompts with the KV-cache
sampler, lay prompt + completion out as a right-padded training batch, and score them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from llm.generate.decode import generate
from llm.model.value import ValueModel, last_token_values
from llm.stages.objectives import IGNORE_INDEX


@dataclass
class Rollout:
    """Sampled completions laid out for training: prompts left-padded to P tokens, completions
    right-padded to L, so every row's response occupies columns P .. P + L - 1."""

    tokens: Tensor  # (N, P + L)
    positions: Tensor  # (N, P + L): 0 at each row's first real token
    mask: Tensor  # (N, P + L): True at real tokens
    labels: Tensor  # (N, P + L): the completion tokens (with their EOS), IGNORE_INDEX elsewhere
    response_mask: Tensor  # (N, L): True at completion tokens
    prompts: list[list[int]]  # per row (repeated for the samples of one prompt)
    completions: list[list[int]]
    meta: list[dict]

    @property
    def prompt_width(self) -> int:
        return self.tokens.shape[1] - self.response_mask.shape[1]

    @property
    def lengths(self) -> Tensor:
        return torch.tensor([len(c) for c in self.completions], dtype=torch.float32)

    def responses(self, per_token: Tensor) -> Tensor:
        """The response columns of a next-token quantity (N, P + L - 1) -> (N, L): column t of the
        result is about completion token t (log-prob of it, value of the state before it)."""
        return per_token[:, self.prompt_width - 1:]

    def forward(self, model: nn.Module) -> Tensor:
        """Logits (or a value model's values) of the whole rows."""
        return model(self.tokens, self.positions, mask=self.mask)


@torch.no_grad()
def sample_rollout(policy: nn.Module, prompts: list[list[int]], meta: list[dict], samples_per_prompt: int,
                   max_new_tokens: int, temperature: float, eos_id: int, pad_id: int,
                   generator: Optional[torch.Generator] = None, lockstep: bool = False) -> Rollout:
    """`samples_per_prompt` completions of every prompt (consecutive rows), sampled in eval mode."""
    was_training = policy.training
    policy.eval()
    try:
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        completions = generate(policy, rows, max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id,
                               generator=generator, lockstep=lockstep)
    finally:
        policy.train(was_training)
    width, length = max(len(p) for p in rows), max(max(len(c) for c in completions), 1)
    tokens = torch.full((len(rows), width + length), pad_id, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(rows, completions)):
        tokens[i, width - len(p):width + len(c)] = torch.tensor(p + c)
        labels[i, width:width + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, width - len(p):width + len(c)] = True
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    device = policy.embed.weight.device
    return Rollout(tokens.to(device), positions.to(device), mask.to(device), labels.to(device),
                   mask[:, width:].to(device), rows, completions, [m for m in meta for _ in range(samples_per_prompt)])


class Scorer:
    """The reward of a completion: a programmatic function of its text (the synthetic tasks'
    checker) or a trained reward model (a frozen ValueModel) reading prompt + completion."""

    def __init__(self, tokenizer: Any, function: Optional[Callable[[str, dict], float]] = None,
                 model: Optional[ValueModel] = None):
        if (function is None) == (model is None):
            raise ValueError("a scorer needs exactly one of a reward function and a reward model")
        self.tokenizer, self.function, self.model = tokenizer, function, model

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> Tensor:
        if self.function is not None:
            texts = [self.tokenizer.decode(c) for c in rollout.completions]
            scores = [self.function(t, m) for t, m in zip(texts, rollout.meta)]
            return torch.tensor(scores, dtype=torch.float32, device=rollout.tokens.device)
        values = rollout.responses(rollout.forward(self.model)[:, 1:])  # the value after each response token
        return last_token_values(values, rollout.response_mask)
