"""Compiled decoding: a KV cache whose shapes never change, so one compiled graph serves every step.

An eager decoding step of a small model reads every weight once and pays a few hundred small
operators' overhead (on a CPU, about half of the step each at batch 1). `torch.compile` removes
the overhead, but only if a step is the same graph every time: the ordinary `KVCache` returns keys
sliced to the tokens so far (a new shape each step) and counts them in a Python int (a new
constant each step), either of which recompiles. `StaticKVCache` keeps both out of the graph:

- every layer attends over all `max_len` slots; slots not filled yet are invalid in the mask, so
  they get no attention weight (SDPA's masked softmax gives them exactly 0);
- the number of filled slots is a tensor, and new keys land at it with `index_copy_`.

`compiled_step` compiles one decoding step (`torch.compile`, static shapes, Inductor's C++
wrapper, which also takes the Python out of launching its kernels) once per model, batch and
cache length; `generate(compile=True)` (and `llm-generate compile=true`) uses it. Cache lengths are
rounded up (`bucketed`), so prompts of similar lengths share a graph. On a CPU the step reads
column-major copies of the Linear weights (`decoding_weights`), which MKL streams faster.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from llm.generate.cache import KVCache

log = logging.getLogger(__name__)

# Cache lengths are rounded up so that nearby lengths share a compiled graph: to a multiple of a
# quarter of the largest power of two not above the length (at least MIN_BUCKET), so a cache is at
# most ~25% longer than needed (every step reads all of its slots) and lengths fall into at most
# four graphs per doubling.
MIN_BUCKET = 32
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


class StaticKVCache(KVCache):
    """The `KVCache` interface (what `Transformer.forward` uses) over fixed-shape tensors.

    `positions` and `valid` cover every slot; `valid` is False until a real token fills a slot,
    which keeps queries off the empty slots. `generate` sizes the cache for the prompt plus every
    new token; a write past the last slot raises (index out of bounds, eager and compiled)."""

    padded = True  # the model always builds the mask from `valid` (empty slots must be hidden)

    def _layer(self, k: Tensor, v: Tensor) -> StaticLayerCache:
        if not hasattr(self, "filled"):  # the fill count, one tensor that every layer shares
            self.filled = torch.zeros((), dtype=torch.long, device=k.device)
        return StaticLayerCache(k, v, self.filled)

    @property
    def length(self) -> int:
        """Slots filled so far (read outside the compiled step only: it synchronises)."""
        return int(self.filled)

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on."""
        self.filled.clamp_(max=length)
        self.valid[:, length:] = False

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
    """`length` rounded up to its bucket (see MIN_BUCKET; slots past the last token stay empty:
    a model with learned positions never looks up a position for them)."""
    step = max(MIN_BUCKET, (1 << (length.bit_length() - 1)) // 4)
    return -(-length // step) * step


RELAYOUT_MAX_BYTES = 2 * 2**30  # above this much Linear weight, decode from the weights as they are


def decoding_weights(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the plain Linear layers' weights laid out column-major (the same (out, in) values,
    stored as the transpose of an (in, out) matrix), keyed by parameter name, for the step to use
    through `torch.func.functional_call`. Empty off the CPU, and above RELAYOUT_MAX_BYTES.

    Why: a decoding step multiplies one row per sequence by each weight, and MKL reads a row-major
    (out, in) weight for that well under memory speed; F.linear over the column-major copy hands
    it a contiguous (in, out) matrix, which streams (8192 x 256 head, weights cold, one thread:
    0.33 ms against 0.83 ms at batch 1; the whole step 12% faster at batch 8). The copies cost one
    more copy of those weights while decoding, made once per `generate` call, so a model trained in
    between (on-policy rollouts) is decoded as it is now. LoRA-adapted, quantized and sharded
    layers keep their own weights (they are not plain Linear layers with ordinary tensors)."""
    if model.embed.weight.device.type != "cpu":  # GPU BLAS reads either layout at full speed (not measured here)
        return {}
    linears = {name: m for name, m in model.named_modules()
               if type(m) is nn.Linear and type(m.weight) in (nn.Parameter, Tensor)}
    total = sum(m.weight.nbytes for m in linears.values())
    if total > RELAYOUT_MAX_BYTES:
        log.info(f"compiled decoding reads the Linear weights as they are: a column-major copy of their "
                 f"{total / 2**30:.1f} GiB is above RELAYOUT_MAX_BYTES ({RELAYOUT_MAX_BYTES / 2**30:.0f} GiB)")
        return {}
    return {f"{name}.weight": m.weight.detach().t().contiguous().t() for name, m in linears.items()}


def _step(model: nn.Module, tokens: Tensor, positions: Tensor, cache: StaticKVCache,
          weights: dict[str, Tensor]) -> Tensor:
    # tie_weights=False: with tied embeddings only the head's use of the shared weight is replaced
    return torch.func.functional_call(model, weights, (tokens, positions, cache), tie_weights=False,
                                      strict=False)[:, -1]


_compiled: Optional[Callable[..., Tensor]] = None


def compiled_step() -> Callable[[nn.Module, Tensor, Tensor, StaticKVCache, dict[str, Tensor]], Tensor]:
    """step(model, tokens (B, 1), positions (B, 1), cache, decoding_weights(model)) -> next-token
    logits (B, vocab), compiled on first use for each model, batch and cache length (about 10-20 s
    on a CPU; the same shapes later reuse it, weights may change in between)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_step, dynamic=False, options=dict(STEP_OPTIONS))
    return _compiled
