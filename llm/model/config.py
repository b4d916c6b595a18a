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


class Router(Choice):
    topk_softmax = "topk_softmax"  # Mixtral, OLMoE: softmax over the k selected logits (weights sum to 1)
    softmax_topk = "softmax_topk"  # Switch, Qwen2-MoE, DeepSeek-V2: the top k of a softmax over all, as they are


class AttentionKernel(Choice):
    sdpa = "sdpa"  # any device
    flash = "flash"  # CUDA, no bias or window
    flex = "flex"  # CUDA, FlexAttention


NORMS, NORM_PLACEMENTS, MLPS = Norm.values(), NormPlacement.values(), MLP.values()
ROUTERS = Router.values()
POSITIONS, KERNELS = PositionKind.values(), AttentionKernel.values()

# Sanity caps, far beyond any model that fits a cluster: a typo such as n_layers=1e6 is refused
# instead of allocating until the machine runs out of memory.
MAX_LAYERS, MAX_WIDTH, MAX_HEADS = 1024, 2**16, 1024
MAX_SEQ_LEN, MAX_VOCAB = 2**22, 2**24
MAX_EXPERTS = 2**14


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
class MoEConfig:
    """Sparse mixture-of-experts MLPs (`model.moe.*`): each token goes to `top_k` of `n_experts`
    routed expert MLPs (plus `n_shared_experts` that every token goes to). n_experts=0 is a dense model.

    Layer i is MoE when i >= first_dense and (i + 1) % every == 0 (Qwen2-MoE's rule: every=2 makes
    layers 1, 3, 5, ... MoE). Router losses are added to the training loss with their coefficients;
    `bias_update_rate` turns on DeepSeek-V3's auxiliary-loss-free balancing (a per-expert bias on
    the selection scores, moved after every optimizer step toward equal load)."""

    n_experts: int = at_least(0, 0, high=MAX_EXPERTS)  # routed experts; 0: dense MLPs everywhere
    top_k: int = at_least(1, 2, high=MAX_EXPERTS)  # routed experts per token
    n_shared_experts: int = at_least(0, 0, high=MAX_EXPERTS)  # always-on experts (one MLP of n x expert_hidden)
    expert_hidden: Optional[int] = at_least(1, None, high=2**20, null="for the dense MLP's hidden size")
    every: int = at_least(1, 1, high=MAX_LAYERS)  # every n-th layer is MoE
    first_dense: int = at_least(0, 0, high=MAX_LAYERS)  # the first k layers keep a dense MLP
    router: Router = Router.topk_softmax
    # Switch/GShard load balance: n_experts x sum_i f_i P_i (1.0 at perfect balance), times this
    aux_loss_coef: float = at_least(0, 0.01, high=100.0)
    z_loss_coef: float = at_least(0, 0.001, high=100.0)  # ST-MoE: mean of logsumexp(router logits)^2, times this
    bias_update_rate: float = at_least(0, 0.0, high=1.0)  # DeepSeek-V3 uses 0.001; 0: no bias
    # Each expert takes at most ceil(capacity_factor x tokens x top_k / n_experts) assignments of a
    # training batch, the best-scored ones; the rest skip the MoE (the residual carries them).
    capacity_factor: Optional[float] = positive(None, high=1e4, null="for dropless routing")

    def __post_init__(self) -> None:
        plain_choices(self)

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE instead of a dense MLP."""
        return self.enabled and layer >= self.first_dense and (layer + 1) % self.every == 0

    def problems(self, n_layers: int) -> list[str]:
        """What makes no sense across keys, one line each naming the key (ranges are the fields')."""
        found = []
        if not self.enabled:
            if self.n_shared_experts:
                found.append(f"model.moe.n_shared_experts={self.n_shared_experts}: shared experts belong to an MoE "
                             "layer, and model.moe.n_experts=0 is a dense model; set model.moe.n_experts >= 1, or "
                             "make the dense MLP wider with model.mlp_hidden")
            return found
        if self.top_k > self.n_experts:
            found.append(f"model.moe.top_k={self.top_k}: a token cannot go to more than the model.moe.n_experts="
                         f"{self.n_experts} experts; allowed: 1..{self.n_experts}")
        if not any(self.is_moe_layer(i) for i in range(n_layers)):
            found.append(f"model.moe.first_dense={self.first_dense}, model.moe.every={self.every}: no layer of the "
                         f"{n_layers} (model.n_layers) is MoE (layer i is when i >= first_dense and (i + 1) % every "
                         "== 0); e.g. first_dense < n_layers and every <= n_layers - first_dense, or "
                         "model.moe.n_experts=0 for a dense model")
        return found


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
    moe: MoEConfig = field(default_factory=MoEConfig)  # n_experts=0 (default): dense
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
        values["moe"] = MoEConfig(**values.get("moe", {}))  # checkpoints from before MoE: dense
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
    def expert_hidden_size(self) -> int:
        """The hidden width of one (routed or shared) expert."""
        return self.moe.expert_hidden or self.hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.is_moe_layer(layer)

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unset: set it, or let the tokenizer set it")
        m = self.pad_vocab_to or 1
        return m * math.ceil(self.vocab_size / m)
