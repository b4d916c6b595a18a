"""Causal self-attention with n_kv_heads covering MHA, GQA and MQA.

K and V are projected to n_kv_heads heads only (the parameter and KV-cache saving is real);
SDPA broadcasts them over the query groups natively (`enable_gqa`). Head counts are read from
the tensors, not the config, so a tensor-parallel plan that shards the projections just works.
For generation, a layer's KV cache (`llm.generate.cache.LayerCache`) stores those few heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.config import ModelConfig
from llm.model.layers import fusable, fused_linear
from llm.model.position import rotate_heads

if TYPE_CHECKING:  # only a type: the model does not depend on the generation package
    from llm.generate.cache import LayerCache


def attention_bias(
    q_pos: Tensor,
    k_pos: Tensor,
    window: Optional[int],
    slopes: Optional[Tensor],
    dtype: torch.dtype,
    q_valid: Optional[Tensor] = None,
    k_valid: Optional[Tensor] = None,
    documents: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """Additive float mask (1 or H, Tq, Tk): causal, optional sliding window, optional ALiBi.

    Positions are (T,) or per row (B, T); with per-row inputs the mask is (B, 1 or H, Tq, Tk).
    `k_valid` (B, Tk) is False at padding keys (left-padded batches): real queries never see
    them. A padded query (`q_valid` False) ignores padding, so it still sees itself and its
    softmax row is never all -inf (NaN there would leak into every later layer's values).
    `documents` (B, T) numbers the documents packed into each row (no cache): a token sees only
    earlier tokens of its own document.

    Returns None for plain causal attention over aligned positions, so SDPA can take its
    fastest `is_causal` path.
    """
    aligned = q_pos.shape == k_pos.shape and q_pos.dim() == 1
    if window is None and slopes is None and k_valid is None and documents is None and aligned:
        return None
    distance = (q_pos[..., :, None] - k_pos[..., None, :]).unsqueeze(-3)  # (..., 1, Tq, Tk)
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    if k_valid is not None:
        visible = k_valid[:, None, None, :]
        if q_valid is not None:
            visible = visible | ~q_valid[:, None, :, None]
        allowed = allowed & visible
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :]).unsqueeze(1)
    bias = torch.zeros(distance.shape, dtype=dtype, device=q_pos.device)
    if slopes is not None:  # a linear penalty on distance, one slope per head
        bias = -slopes.to(dtype).view(-1, 1, 1) * distance.clamp(min=0).to(dtype)
    bias = torch.where(allowed, bias, float("-inf"))  # where, not masked_fill: padding may add a batch dim
    return bias if bias.dim() == 4 else bias.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd, bias = cfg.head_size, cfg.attention.bias
        self.head_dim = hd
        self.kernel = cfg.attention.kernel
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=bias)
        self.k = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=bias)
        self.v = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=bias)
        self.o = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        bias: Optional[Tensor] = None,
        cache: Optional[LayerCache] = None,
    ) -> Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        if fusable(x, self.q, self.k, self.v):  # one matmul; RoPE on queries and keys at once
            n_q, n_kv = self.q.weight.shape[0], self.k.weight.shape[0]
            qk, v = fused_linear(x, self.q, self.k, self.v).split((n_q + n_kv, n_kv), dim=-1)
            qk = qk.view(B, T, -1, hd)
            if rotary is not None:
                qk = rotate_heads(qk, *rotary)
            q, k = qk.split((n_q // hd, n_kv // hd), dim=2)
        else:  # adapted (LoRA), quantized or sharded (tensor-parallel) projections: one by one
            q, k = self.q(x).view(B, T, -1, hd), self.k(x).view(B, T, -1, hd)
            if rotary is not None:
                q, k = rotate_heads(q, *rotary), rotate_heads(k, *rotary)
            v = self.v(x)
        # (B, heads, T, D) views of the (B, T, heads, D) projections: SDPA takes the strides as they are
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, -1, hd).transpose(1, 2)
        if cache is None:
            y = self.attend(q, k, v, bias)
        else:  # decoding: attend to every cached key; the explicit mask (never is_causal) says which
            k, v = cache.update(k, v)
            y = cached_attention(q, k, v, bias)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
        gqa = q.shape[1] != k.shape[1]
        dropout = self.dropout if self.training else 0.0
        if self.kernel == "flash":  # CUDA only; validation rules out masks with this kernel
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
        if self.kernel == "flex":
            return flex_attend(q, k, v, bias)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=bias is None, dropout_p=dropout, enable_gqa=gqa
        )


def cached_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
    """SDPA over cached keys with an explicit mask (B, 1 or n_heads, T, keys) or None.

    A decoding step (T = 1) under GQA/MQA hands SDPA the query heads that share a KV head as that
    head's query rows: one call over n_kv_heads heads with `group` queries each, instead of a
    broadcast over n_heads heads with one query each (the CPU kernel, which works in blocks of query
    rows, runs 1.2-2x faster; the same sums, head by head)."""
    B, H, T, D = q.shape
    kv_heads = k.shape[1]
    if T != 1 or kv_heads == H:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=kv_heads != H)
    group = H // kv_heads
    if bias is not None:  # (B, 1 or H, 1, keys) -> (B, kv_heads, group, keys): query head h = kv head h // group
        bias = bias.expand(B, H, 1, bias.shape[-1]).reshape(B, kv_heads, group, bias.shape[-1])
    y = F.scaled_dot_product_attention(q.reshape(B, kv_heads, group, D), k, v, attn_mask=bias)
    return y.view(B, H, 1, D)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
    """FlexAttention (CUDA): the additive mask becomes a score_mod, so ALiBi and windows need no
    dense kernel. Compiled once per process; PyTorch has no CPU backward for it."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    T = q.shape[-2]
    if bias is None:
        bias = torch.full((T, k.shape[-2]), float("-inf"), device=q.device, dtype=q.dtype).triu(1)[None, None]
    heads = bias.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[0, h if heads > 1 else 0, q_idx, kv_idx]

    return _compiled_flex(q, k, v, score_mod=score_mod, enable_gqa=q.shape[1] != k.shape[1])


_compiled_flex = None
