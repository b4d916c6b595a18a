"""Compiled decoding: a KV cache whose shapes never change, so one compiled graph serves every step.

Eager decoding of a small model is mostly per-operator overhead on top of reading the weights
(at batch 1 each step reads every weight once). `torch.compile` removes the overhead, but only if
a step is the same graph every time: the ordinary `KVCache` returns keys sliced to the tokens so
far (a new shape each step) and counts them in a Python int (a new constant each step), either of
which recompiles. `StaticKVCache` keeps both out of the graph:

- every layer attends over all `max_len` slots; slots not filled yet are invalid in the mask, so
  they get no attention weight (SDPA's masked softmax gives them exactly 0);
- the number of filled slots is a tensor, and new keys land at it with `index_copy_`.

`compiled_step` compiles one decoding step (`torch.compile`, static shapes, Inductor's C++
wrapper, which also takes the Python out of launching its kernels) once per model, batch and
cache length; `generate(compile=True)` (and `llm-generate compile=true`) uses it. Cache lengths are
rounded up to `LENGTH_BUCKET`, so prompts of similar lengths share a graph.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

LENGTH_BUCKET = 128  # cache lengths are rounded up to a multiple of this: fewer distinct graphs to compile
# Inductor's C++ wrapper launches the step's kernels without Python in between (a decoding step
# is dozens of small kernels: on a CPU the Python wrapper's per-kernel cost is a good part of it).
STEP_OPTIONS = {"cpp_wrapper": True}


class StaticLayerCache:
    """One layer's keys and values, (B, n_kv_heads, max_len, head_dim) each, written at the slots
    the shared `filled` counter says (the model calls `StaticKVCache.append` first, which has
    already counted the new tokens)."""

    def __init__(self, k: Tensor, v: Tensor, filled: Tensor):
        self.k, self.v, self.filled = k, v, filled

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, n_kv_heads, T, head_dim) keys and values; return every slot (filled or not)."""
        slots = self.filled - k.shape[2] + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class StaticKVCache:
    """The `KVCache` interface (what `Transformer.forward` uses) over fixed-shape tensors.

    `positions` and `valid` cover every slot; `valid` is False until a real token fills a slot,
    which keeps queries off the empty slots. `generate` sizes the cache for the prompt plus every
    new token; a write past the last slot raises (index out of bounds, eager and compiled)."""

    padded = True  # the model always builds the mask from `valid` (empty slots must be hidden)

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
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        self.layers = [
            StaticLayerCache(torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device), self.filled)
            for _ in range(n_layers)
        ]
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int) -> StaticKVCache:
        """A cache shaped for `model` (a `Transformer`), on its device and in its dtype."""
        cfg, weight = model.cfg, model.embed.weight
        return cls(len(model.blocks), batch, cfg.kv_heads, max_len, cfg.head_size, weight.dtype, weight.device)

    @property
    def length(self) -> int:
        """Slots filled so far (read outside the compiled step only: it synchronises)."""
        return int(self.filled)

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    def append(self, positions: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Record the positions ((T,) or (B, T)) and validity ((B, T), None: all real) of the
        tokens about to be added; return those of every slot, each (B, max_len)."""
        batch, n = self.positions.shape[0], positions.shape[-1]
        slots = self.filled + torch.arange(n, device=positions.device)
        self.positions.index_copy_(1, slots, positions.expand(batch, n))
        real = torch.ones(batch, n, dtype=torch.bool, device=positions.device) if mask is None else mask
        self.valid.index_copy_(1, slots, real)
        self.filled += n
        return self.positions, self.valid


def bucketed(length: int) -> int:
    """`length` rounded up to a multiple of LENGTH_BUCKET (slots past the last token stay empty:
    a model with learned positions never looks up a position for them)."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def output_weight(model: nn.Module) -> Optional[Tensor]:
    """The output head's weight transposed into (d_model, vocab) rows, or None when the head is not
    a plain bias-free Linear (LoRA-adapted, quantized: the step then calls the head itself).

    Why a copy: a decoding step multiplies one row per sequence by the head, and with the weight
    in its (vocab, d_model) layout that matmul reads it at well under memory speed; with the rows
    laid out along the vocabulary it streams (measured on a 2-core EPYC, 8192 x 256 head read from
    memory: 0.33 ms against 0.83 ms at batch 1, 1.0 against 1.5 ms at batch 8). The copy is made
    once per `generate` call, so a model trained in between (on-policy rollouts) is seen as it is."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None or type(head.weight) not in (nn.Parameter, Tensor):
        return None
    return head.weight.detach().t().contiguous()


def _step(model: nn.Module, tokens: Tensor, positions: Tensor, cache: StaticKVCache,
          head_t: Optional[Tensor]) -> Tensor:
    if head_t is None:
        return model(tokens, positions, cache)[:, -1]
    return model(tokens, positions, cache, hidden=True)[:, -1] @ head_t


_compiled: Optional[Callable[..., Tensor]] = None


def compiled_step() -> Callable[[nn.Module, Tensor, Tensor, StaticKVCache, Optional[Tensor]], Tensor]:
    """step(model, tokens (B, 1), positions (B, 1), cache, output_weight(model)) -> next-token
    logits (B, vocab), compiled on first use for each model, batch and cache length (about 10-20 s
    on a CPU; the same shapes later reuse it, weights may change in between)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_step, dynamic=False, options=dict(STEP_OPTIONS))
    return _compiled
