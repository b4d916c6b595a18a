"""Position schemes. Each hooks into the transformer at exactly one place:

- absolute (learned, sinusoidal): `embed` adds a vector to the token embeddings;
- RoPE: `rotary` returns the cos/sin that rotate queries and keys;
- ALiBi: `slopes` gives the per-head linear distance penalty added to attention scores;
- none (NoPE): causality alone tells the model where it is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from llm.model.config import ModelConfig


class Position(nn.Module):
    """No explicit positions (NoPE). The base of every scheme: all hooks are no-ops."""

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x

    def rotary(self, positions: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        return None

    def slopes(self) -> Optional[Tensor]:
        return None


class LearnedPosition(Position):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.table(positions)


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """The fixed encoding of Vaswani et al.: sin on even, cos on odd channels."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


class SinusoidalPosition(Position):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)

    def reset_parameters(self) -> None:  # not saved; recompute after meta-device init
        self.table = sinusoidal_table(*self.table.shape).to(self.table.device)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.table[positions].to(x.dtype)


class RotaryPosition(Position):
    """RoPE in the rotate-half layout (as Hugging Face's Llama), so weights map 1:1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.base = cfg.position.rope_base
        self.dim = cfg.head_size
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def reset_parameters(self) -> None:  # buffers are not saved; recompute after meta-device init
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., T, dim/2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def alibi_slopes(n_heads: int) -> Tensor:
    """Press et al.'s geometric slopes; for head counts that are not powers of two, the slopes of
    the closest smaller power of two followed by every other slope of the next one."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class AlibiPosition(Position):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.register_buffer("head_slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def reset_parameters(self) -> None:
        self.head_slopes = alibi_slopes(self.n_heads).to(self.head_slopes.device)

    def slopes(self) -> Tensor:
        return self.head_slopes


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys; cos/sin are (T, D) or (B, T, D)."""
    if cos.dim() == 3:  # per-row positions (left-padded batches)
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


SCHEMES = {
    "none": lambda cfg: Position(),
    "learned": LearnedPosition,
    "sinusoidal": SinusoidalPosition,
    "rope": RotaryPosition,
    "alibi": AlibiPosition,
}


def build_position(cfg: ModelConfig) -> Position:
    return SCHEMES[cfg.position.kind](cfg)
