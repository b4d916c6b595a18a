"""The one typed place for the architecture (LitGPT-style): every knob, derived fields computed once.

These dataclasses are plain Python: the model knows nothing of Hydra. `llm.config` registers
them as the schemas of the `model`, `attention` and `position` config groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("swiglu", "gelu", "relu")
POSITIONS = ("rope", "alibi", "learned", "sinusoidal", "none")
KERNELS = ("sdpa", "flash", "flex")


@dataclass
class AttentionConfig:
    """Multi-head (n_kv_heads = n_heads), multi-query (1) or grouped-query (a divisor) attention."""

    n_kv_heads: Optional[int] = None  # None: as many as query heads (MHA)
    window: Optional[int] = None  # sliding-window size in tokens; None attends to the whole prefix
    kernel: str = "sdpa"  # sdpa (any device) | flash (CUDA, no bias/window) | flex (CUDA, FlexAttention)
    bias: bool = False  # biases on the q/k/v/o projections


@dataclass
class PositionConfig:
    kind: str = "rope"
    rope_base: float = 10000.0


@dataclass
class ModelConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    head_dim: Optional[int] = None  # None: d_model // n_heads
    max_seq_len: int = 256
    vocab_size: Optional[int] = None  # None: taken from the tokenizer, padded to pad_vocab_to
    pad_vocab_to: int = 64
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: str = "rmsnorm"
    norm_placement: str = "pre"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    mlp_hidden: Optional[int] = None  # None: 4 d_model (gelu/relu) or ~8/3 d_model (swiglu)
    mlp_multiple_of: int = 32
    bias: bool = False  # biases in the MLP
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    scaled_residual_init: bool = True  # output projections get std / sqrt(2 n_layers), as GPT-2
    size: Optional[float] = None  # model=ladder: the target non-embedding parameters the shape was chosen for

    @classmethod
    def from_dict(cls, saved: dict) -> ModelConfig:
        """From `dataclasses.asdict` output (as checkpoints store it); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        values["attention"] = AttentionConfig(**values.get("attention", {}))
        values["position"] = PositionConfig(**values.get("position", {}))
        return cls(**values)

    # Derived fields, resolved once so every consumer sees the same numbers.
    @property
    def kv_heads(self) -> int:
        return self.attention.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            m = self.mlp_multiple_of
            return m * math.ceil(int(8 * self.d_model / 3) / m)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unset: set it, or let the tokenizer set it")
        m = self.pad_vocab_to or 1
        return m * math.ceil(self.vocab_size / m)
