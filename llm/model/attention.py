"""Causal self-attention with n_kv_heads covering MHA, GQA and MQA.

K and V are projected to n_kv_heads heads only (the parameter and KV-cache saving is real);
SDPA broadcasts them over the query groups natively (`enable_gqa`). Head counts are read from
the tensors, not the config, so a tensor-parallel plan that shards the projections just works.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.config import ModelConfig
from llm.model.position import apply_rotary


def attention_bias(
    q_pos: Tensor, k_pos: Tensor, window: Optional[int], slopes: Optional[Tensor], dtype: torch.dtype
) -> Optional[Tensor]:
    """Additive float mask (1 or H, Tq, Tk): causal, optional sliding window, optional ALiBi.

    Returns None for plain causal attention over aligned positions, so SDPA can take its
    fastest `is_causal` path.
    """
    aligned = q_pos.shape == k_pos.shape and q_pos.dim() == 1
    if window is None and slopes is None and aligned:
        return None
    distance = (q_pos[..., :, None] - k_pos[..., None, :]).unsqueeze(-3)  # (..., 1, Tq, Tk)
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    bias = torch.zeros(distance.shape, dtype=dtype, device=q_pos.device)
    if slopes is not None:  # a linear penalty on distance, one slope per head
        bias = -slopes.to(dtype).view(-1, 1, 1) * distance.clamp(min=0).to(dtype)
    bias = bias.masked_fill(~allowed, float("-inf"))
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
        self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]] = None, bias: Optional[Tensor] = None
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = self.attend(q, k, v, bias)
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
