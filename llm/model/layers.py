"""Norms and feed-forward blocks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.config import ModelConfig


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def build_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """SwiGLU (down(silu(gate x) * up x)) or a plain two-layer GELU/ReLU MLP. `gelu` is the exact
    (erf) GELU, `gelu_tanh` the tanh approximation GPT-2 was trained with."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.gated = cfg.mlp == "swiglu"
        self.activation = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}[cfg.mlp]
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down(self.activation(self.gate(x)) * self.up(x))
        return self.down(self.activation(self.up(x)))
