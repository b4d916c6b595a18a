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


def _rotate_into(out: Tensor, x: Tensor, sin: Tensor, sign: float) -> Tensor:
    """out += rotate_half(x) * sin, rotate_half(x) = (-x2, x1), without building rotate_half(x):
    two in-place multiply-adds on the halves (sign=-1: the transposed rotation, for gradients)."""
    half = x.shape[-1] // 2
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


class _Rotary(torch.autograd.Function):
    """RoPE as one autograd node: the rotation is linear in x, so its backward is the transposed
    rotation of the gradient and nothing but cos/sin is saved. Eager autograd over
    `x * cos + cat(-x2, x1) * sin` runs neg, cat, two slice backwards (zero-filled copies) and
    adds; this runs one multiply and two multiply-adds each way."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate_into(x * cos, x, sin, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate_into(grad * cos, grad, sin, -1.0).to(ctx.dtype), None, None


def rotate_heads(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys laid out (B, T, heads, D), as the projections produce them (no
    transposed copy first); cos/sin are (T, D) or (B, T, D) as `RotaryPosition.rotary` returns.
    The same numbers as `apply_rotary` on the (B, heads, T, D) view."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling():  # plain ops: inductor fuses them
        half = x.shape[-1] // 2
        return (x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _Rotary.apply(x, cos, sin)
    return _rotate_into(x * cos, x, sin, 1.0).to(x.dtype)


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
