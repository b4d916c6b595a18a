"""Compute accounting: parameters N (with and without embeddings) and training FLOPs per token.

FLOPs per token = 6 x (weights used in matmuls, LM head included) + 12 x layers x query heads x
head dim x attention context. The context is the sequence length (the PaLM convention, what dense
attention kernels compute) or the window for sliding-window attention (what a block-sparse kernel
computes). K/V projections of GQA/MQA are counted at their real, smaller size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llm.model.config import ModelConfig


@dataclass(frozen=True)
class ModelSize:
    params: int  # every parameter once (tied embeddings counted once)
    non_embedding: int  # without token/position embeddings and an untied LM head
    embedding: int
    matmul_params: int  # weights that take part in a matmul per token (the 6N of C = 6ND)
    flops_per_token: float  # training: forward + backward

    def as_dict(self) -> dict:
        return asdict(self)


def count_block(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, matmul weights) of one transformer block."""
    d, hd, h, kv, hid = cfg.d_model, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_size
    attn_w = d * h * hd * 2 + d * kv * hd * 2
    attn_b = (h * hd + 2 * kv * hd + d) if cfg.attention.bias else 0
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    mlp_w = n_mats * d * hid
    mlp_b = ((n_mats - 1) * hid + d) if cfg.bias else 0
    return attn_w + attn_b + mlp_w + mlp_b + 2 * norm_params(cfg), attn_w + mlp_w


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
    block_all, block_mm = count_block(cfg)
    embedding = V * d + (cfg.max_seq_len * d if cfg.position.kind == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * d
    final_norm = norm_params(cfg) if cfg.norm_placement == "pre" else 0
    non_embedding = L * block_all + final_norm
    matmul = L * block_mm + V * d
    attention = 12 * L * cfg.n_heads * cfg.head_size * attention_context(cfg, seq_len)
    return ModelSize(
        params=non_embedding + embedding + head,
        non_embedding=non_embedding,
        embedding=embedding,
        matmul_params=matmul,
        flops_per_token=float(6 * matmul + attention),
    )
