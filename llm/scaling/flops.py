"""Compute accounting: parameters N (with and without embeddings) and training FLOPs per token.

FLOPs per token = 6 x (weights used in matmuls, LM head included) + 12 x layers x query heads x
head dim x attention context. The context is the sequence length (the PaLM convention, what dense
attention kernels compute) or the window for sliding-window attention (what a block-sparse kernel
computes). K/V projections of GQA/MQA are counted at their real, smaller size.

A mixture-of-experts layer holds every expert but a token uses only its router, its `top_k` routed
experts and the shared ones: `params` counts all of them, `active` (and the matmul weights behind
the FLOPs) only what one token uses. For a dense model active == params.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llm.model.config import ModelConfig


@dataclass(frozen=True)
class ModelSize:
    params: int  # every parameter once (tied embeddings counted once)
    non_embedding: int  # without token/position embeddings and an untied LM head
    embedding: int
    matmul_params: int  # weights that take part in a matmul per token (the 6N of C = 6ND): active ones
    flops_per_token: float  # training: forward + backward
    active: int  # parameters one token uses (MoE: the experts it is not routed to left out); dense: = params
    active_non_embedding: int

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """'X parameters (Y non-embedding)'; an MoE model's also says how many are active per token."""
        active = f"{self.active:,} active, " if self.active != self.params else ""
        return f"{self.params:,} parameters ({active}{self.non_embedding:,} non-embedding)"


@dataclass(frozen=True)
class BlockCount:
    params: int  # all parameters of the block
    active: int  # those one token uses
    matmul: int  # the active weights that take part in a matmul


def mlp_params(cfg: ModelConfig, hidden: int) -> tuple[int, int]:
    """(weights, biases) of one MLP of cfg.mlp's kind with this hidden width."""
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    return n_mats * cfg.d_model * hidden, ((n_mats - 1) * hidden + cfg.d_model) if cfg.bias else 0


def count_block(cfg: ModelConfig, layer: int = 0) -> BlockCount:
    """Parameters of transformer block `layer` (all, active per token, active matmul weights)."""
    d, hd, h, kv = cfg.d_model, cfg.head_size, cfg.n_heads, cfg.kv_heads
    attn_w = d * h * hd * 2 + d * kv * hd * 2
    attn_b = (h * hd + 2 * kv * hd + d) if cfg.attention.bias else 0
    common = attn_w + attn_b + 2 * norm_params(cfg)  # attention and norms
    if not cfg.is_moe_layer(layer):
        mlp_w, mlp_b = mlp_params(cfg, cfg.hidden_size)
        return BlockCount(common + mlp_w + mlp_b, common + mlp_w + mlp_b, attn_w + mlp_w)
    moe = cfg.moe
    expert_w, expert_b = mlp_params(cfg, cfg.expert_hidden_size)
    shared_w, shared_b = mlp_params(cfg, moe.n_shared_experts * cfg.expert_hidden_size) if moe.n_shared_experts \
        else (0, 0)  # the shared experts are one MLP of n_shared_experts x expert_hidden
    always_w, always_b = d * moe.n_experts + shared_w, shared_b  # router and shared experts: every token
    routed_w, routed_b = moe.top_k * expert_w, moe.top_k * expert_b
    return BlockCount(params=common + always_w + always_b + moe.n_experts * (expert_w + expert_b),
                      active=common + always_w + always_b + routed_w + routed_b,
                      matmul=attn_w + always_w + routed_w)


def norm_params(cfg: ModelConfig) -> int:
    if cfg.norm == "layernorm" and cfg.bias:
        return 2 * cfg.d_model
    return cfg.d_model


def attention_context(cfg: ModelConfig, seq_len: int) -> int:
    window = cfg.attention.window
    return min(window, seq_len) if window else seq_len


def model_size(cfg: ModelConfig, seq_len: int | None = None) -> ModelSize:
    seq_len = seq_len or cfg.max_seq_len
    V, d, L = cfg.padded_vocab_size, cfg.d_model, cfg.n_layers
    blocks = [count_block(cfg, i) for i in range(L)]
    embedding = V * d + (cfg.max_seq_len * d if cfg.position.kind == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * d
    final_norm = norm_params(cfg) if cfg.norm_placement == "pre" else 0
    non_embedding = sum(b.params for b in blocks) + final_norm
    active_non_embedding = sum(b.active for b in blocks) + final_norm
    matmul = sum(b.matmul for b in blocks) + V * d
    attention = 12 * L * cfg.n_heads * cfg.head_size * attention_context(cfg, seq_len)
    return ModelSize(
        params=non_embedding + embedding + head,
        non_embedding=non_embedding,
        embedding=embedding,
        matmul_params=matmul,
        flops_per_token=float(6 * matmul + attention),
        active=active_non_embedding + embedding + head,
        active_non_embedding=active_non_embedding,
    )
