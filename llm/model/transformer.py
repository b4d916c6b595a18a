"""A decoder-only transformer, readable top to bottom (in the spirit of nanoGPT's model.py).

Plain PyTorch: no parallelism, no Lightning. `llm.parallel` shards it from outside, block by
block (`model.blocks`), and the stages in `llm.stages` train it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from llm.model.attention import Attention, attention_bias
from llm.model.config import ModelConfig
from llm.model.layers import MLP, build_norm
from llm.model.moe import MoE, Experts, moe_layers, router_loss
from llm.model.position import build_position

if TYPE_CHECKING:  # only a type: the model does not depend on the generation package
    from llm.generate.cache import KVCache, LayerCache


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = build_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rotary: Optional[tuple[Tensor, Tensor]],
        bias: Optional[Tensor],
        cache: Optional[LayerCache] = None,
    ) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), rotary, bias, cache))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, rotary, bias, cache)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.position = build_position(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases; residual output projections scaled down by
        sqrt(2 n_layers) so the residual stream's variance does not grow with depth."""
        if self.cfg.tie_embeddings and self.lm_head is not None:  # again: to_empty() after a meta-device build unties them
            self.lm_head.weight = self.embed.weight
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scaled_residual_init else std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("attn.o", "mlp.down", "mlp.shared.down"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_output else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):  # routed experts: as the dense MLP, per expert
                module.init_weights(std, out_std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for module in self.modules():  # position buffers (not saved) after a meta-device build
            if module is not self and hasattr(module, "reset_parameters") and not isinstance(
                module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)
            ):
                module.reset_parameters()

    def router_loss(self) -> Tensor | float:
        """The coefficient-weighted router losses (load balance, z-loss) of the last forward,
        summed over the MoE layers: what training adds to its loss (0.0 for a dense model)."""
        return router_loss(self)

    def moe_stats(self) -> list[dict]:
        """Per MoE layer, what the last forward saw: `layer` (block index), `aux_loss` and
        `z_loss` (unweighted, with grad), `load` (E,) fraction of the token-assignments per expert,
        `dropped` assignments over capacity of `assignments` (tokens x top_k)."""
        return [{"layer": i, "aux_loss": m.aux_loss, "z_loss": m.z_loss, "load": m.load, "dropped": m.dropped,
                 "assignments": m.assignments}
                for i, block in enumerate(self.blocks) for m in moe_layers(block)]  # (blocks may be wrapped)

    def forward(
        self,
        tokens: Tensor,
        positions: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        mask: Optional[Tensor] = None,
        documents: Optional[Tensor] = None,
        hidden: bool = False,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, padded vocab), or with `hidden` the final hidden states
        (B, T, d_model) that a value head reads (`llm.stages.value.ValueModel`).

        For generation (`llm.generate`): with a `cache`, the tokens follow those of earlier calls,
        whose keys and values it holds; positions then default to continuing from its length.
        `mask` (B, T) is False at padding tokens (left-padded prompts), which no real token sees.
        Without either, this is the training path: one causal mask shared by the batch.
        Packed rows (several documents per row, `llm.data.posttrain`) pass per-row `positions`
        that restart at each document and `documents` (B, T), so attention stays in its document.
        """
        if positions is None:  # (the cache's length only here: a compiled step passes positions, see llm.generate.static)
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.drop(self.position.embed(self.embed(tokens), positions))
        rotary = self.position.rotary(positions)
        k_pos, k_valid = (positions, mask) if cache is None else cache.append(positions, mask)
        window, slopes = self.cfg.attention.window, self.position.slopes()
        if cache is not None and tokens.shape[1] == 1 and not cache.padded and window is None and slopes is None:
            bias = None  # one token after an unpadded prefix sees every cached key: no mask to build
        else:
            bias = attention_bias(positions, k_pos, window, slopes, x.dtype, mask, k_valid, documents)
        if cache is None:
            for block in self.blocks:
                x = block(x, rotary, bias)
        else:
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, rotary, bias, layer_cache)
        return self.norm(x) if hidden else self.lm_head(self.norm(x))
