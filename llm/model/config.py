"""The one typed place for the architecture (LitGPT-style): every knob, derived fields computed once.

These dataclasses are plain Python: the model knows nothing of Hydra. `llm.config` registers
them as the schemas of the `model`, `attention` and `position` config groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

from llm.fields import Choice, at_least, plain_choices, positive, unit_interval


class Norm(Choice):
    rmsnorm = "rmsnorm"
    layernorm = "layernorm"


class NormPlacement(Choice):
    pre = "pre"
    post = "post"


class MLP(Choice):
    swiglu = "swiglu"
    gelu = "gelu"
    gelu_tanh = "gelu_tanh"  # GPT-2's tanh approximation (transformers' "gelu_new")
    relu = "relu"


class PositionKind(Choice):
    rope = "rope"
    alibi = "alibi"
    learned = "learned"
    sinusoidal = "sinusoidal"
    none = "none"


class AttentionKernel(Choice):
    sdpa = "sdpa"  # any device
    flash = "flash"  # CUDA, no bias or window
    flex = "flex"  # CUDA, FlexAttention


NORMS, NORM_PLACEMENTS, MLPS = Norm.values(), NormPlacement.values(), MLP.values()
POSITIONS, KERNELS = PositionKind.values(), AttentionKernel.values()

# Sanity caps, far beyond any model that fits a cluster: a typo such as n_layers=1e6 is refused
# instead of allocating until the machine runs out of memory.
MAX_LAYERS, MAX_WIDTH, MAX_HEADS = 1024, 2**16, 1024
MAX_SEQ_LEN, MAX_VOCAB = 2**22, 2**24


@dataclass
class AttentionConfig:
    """Multi-head (n_kv_heads = n_heads), multi-query (1) or grouped-query (a divisor) attention."""

    n_kv_heads: Optional[int] = at_least(1, None, high=MAX_HEADS, null="for as many as query heads (MHA)")
    window: Optional[int] = at_least(1, None, null="to attend to the whole prefix")  # sliding window, in tokens
    kernel: AttentionKernel = AttentionKernel.sdpa
    bias: bool = False  # biases on the q/k/v/o projections

    def __post_init__(self) -> None:
        plain_choices(self)  # plain strings from here on (checkpoints store this config)


@dataclass
class PositionConfig:
    kind: PositionKind = PositionKind.rope
    rope_base: float = positive(10000.0, high=1e12)  # Llama 3: 5e5; long-context models up to ~1e8

    def __post_init__(self) -> None:
        plain_choices(self)


@dataclass
class ModelConfig:
    n_layers: int = at_least(1, 4, high=MAX_LAYERS)
    d_model: int = at_least(1, 128, high=MAX_WIDTH)
    n_heads: int = at_least(1, 4, high=MAX_HEADS)
    head_dim: Optional[int] = at_least(1, None, high=MAX_WIDTH, null="for d_model // n_heads")
    max_seq_len: int = at_least(1, 256, high=MAX_SEQ_LEN)
    vocab_size: Optional[int] = at_least(1, None, high=MAX_VOCAB, null="to take the tokenizer's, padded to pad_vocab_to")
    pad_vocab_to: int = at_least(1, 64, high=MAX_VOCAB)  # 1: no padding
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: Norm = Norm.rmsnorm
    norm_placement: NormPlacement = NormPlacement.pre
    norm_eps: float = positive(1e-5, high=0.1)  # a guard against division by zero, not a scale
    mlp: MLP = MLP.swiglu
    mlp_hidden: Optional[int] = at_least(1, None, high=2**20, null="for 4 d_model (gelu/gelu_tanh/relu) or ~8/3 d_model (swiglu)")
    mlp_multiple_of: int = at_least(1, 32, high=MAX_WIDTH)
    bias: bool = False  # biases in the MLP
    tie_embeddings: bool = True
    dropout: float = unit_interval(0.0, high_open=True)
    init_std: float = positive(0.02, high=1.0)
    scaled_residual_init: bool = True  # output projections get std / sqrt(2 n_layers), as GPT-2
    # model=ladder: the target non-embedding parameters the shape was chosen for
    size: Optional[float] = positive(None, null="for a preset's fixed shape")

    def __post_init__(self) -> None:
        plain_choices(self)

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
