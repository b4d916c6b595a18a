"""The KV cache: each layer's keys and values, preallocated once, so a decoding step computes
attention for its new token only instead of re-running the whole prefix.

Only the n_kv_heads K/V heads are stored (after RoPE, if any), so GQA and MQA shrink the cache
by n_heads / n_kv_heads. Slots fill left to right; every row of a batch fills the same slots (a
left-padded batch marks its padding slots invalid instead). Beside the tensors, the cache keeps
each slot's position and validity, which the attention mask of later tokens needs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class LayerCache:
    """One layer's keys and values, (B, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v
        self.length = 0  # slots filled

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, n_kv_heads, T, head_dim) keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: {end} tokens do not fit in its {self.k.shape[2]} slots")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's cache, plus each slot's position and validity (shared by the layers)."""

    padded = False  # whether a mask ever came with tokens (then some slots may be invalid)

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = [
            self._layer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)
        ]
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)

    def _layer(self, k: Tensor, v: Tensor) -> LayerCache:
        return LayerCache(k, v)

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int) -> KVCache:
        """A cache shaped for `model` (a `Transformer`), on its device and in its dtype."""
        cfg, weight = model.cfg, model.embed.weight
        return cls(len(model.blocks), batch, cfg.kv_heads, max_len, cfg.head_size, weight.dtype, weight.device)

    @property
    def length(self) -> int:
        """Slots filled so far (the same in every layer)."""
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory of the keys and values (the per-slot bookkeeping, the same for any head count,
        is a few bytes per token and not counted)."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def append(self, positions: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Record the positions ((T,) or (B, T)) and validity ((B, T), None: all real) of the
        tokens about to be added; return those of every key so far, each (B, length + T).
        The layers then append the keys and values themselves."""
        start, end = self.length, self.length + positions.shape[-1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens do not fit in its {self.max_len} slots")
        self.positions[:, start:end] = positions
        self.valid[:, start:end] = True if mask is None else mask
        self.padded = self.padded or mask is not None
        return self.positions[:, :end], self.valid[:, :end]

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding drops rejected tokens)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i] (beam search follows the surviving beams)."""
        for layer in self.layers:
            layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
        self.positions, self.valid = self.positions.index_select(0, index), self.valid.index_select(0, index)
