"""Weight-only int8 and int4 quantisation of a model's Linear layers, the fake-quantised Linear that
quantisation-aware training uses, and how many bytes a model's weights take.

One quantiser serves both, so post-training quantisation (PTQ) and quantisation-aware training
(QAT) are the same scheme and compare directly:

- int8: symmetric, one float32 scale per output channel: q = round(w / s) in [-127, 127],
  s = max|w_row| / 127; w ~ q * s (error <= s / 2).
- int4: affine, groups of GROUP_SIZE consecutive input weights of a row, each with a float32 scale
  and minimum: q = round((w - min) / s) in [0, 15], s = (max - min) / 15; w ~ q * s + min (error
  <= s / 2). Two values per byte: column j in the low nibble, column j + in/2 in the high one.

Activations stay float (weight-only); the weights are dequantised in each forward (int8: the
per-channel scale is applied to the output instead, so only a cast of the int8 matrix is made).
Plain PyTorch, on every device. Neither torchao nor PyTorch's own weight-only CPU kernels
(`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`) are used: on the 2-core CPU
these were measured on, the kernels ran 3-40x slower than this dequantise-then-matmul, torchao's
int8 weight-only was slower too, and its int4 configs need CUDA kernels (mslk) or store one byte
per 4-bit value (docs/quantization.md).

What stays float: embeddings (a lookup, not a matmul), a tied LM head (its weight IS the embedding
table, which the model still needs in float to look tokens up, so a quantised copy would add memory
instead of saving it), MoE routers (routing decisions are discrete; their few weights decide them)
and the experts' stacked weights; for int4 also a layer whose input width is not a multiple of the
group size.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
GROUP_SIZE = 32  # int4: input weights per scale and minimum (32: finer than 64 or 128, as tiny models need)
INT8_MAX = 127  # symmetric: -128 is never used, so -q is always representable
INT4_LEVELS = 15  # q in [0, 15]


# --- the quantiser ------------------------------------------------------------------------------


def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (int8 values (out, in), float32 scales (out,)): per output channel,
    symmetric. An all-zero row gets scale 1 (its values are all 0 either way)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None]


def int4_quantize(w: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """(out, in) float weight -> (values in [0, 15] as uint8 (out, in), scales (out, in / group),
    minima (out, in / group)), float32; w ~ q * scale + minimum. A constant group gets a tiny
    scale, so it comes back exactly (q = 0 at its minimum)."""
    out_features, in_features = w.shape
    if group_size % 2:
        raise ValueError(f"int4: group size {group_size} must be even (two values per byte)")
    if in_features % group_size:
        raise ValueError(f"int4: {in_features} input features are not a multiple of the group size {group_size}")
    groups = w.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = torch.clamp((high - low) / INT4_LEVELS, min=torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, INT4_LEVELS)
    return q.reshape(out_features, in_features).to(torch.uint8), scale, low


def int4_dequantize(q: Tensor, scale: Tensor, low: Tensor) -> Tensor:
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, scale.shape[1], -1)
    return (groups * scale[..., None] + low[..., None]).reshape(out_features, in_features)


def pack_int4(q: Tensor) -> Tensor:
    """(out, in) values in [0, 15] -> (out, in / 2) bytes: column j in the low nibble, column
    j + in / 2 in the high one (halves, not neighbours: unpacking is then two masks and a
    concatenation, with no interleaving copy)."""
    q = q.to(torch.uint8)
    half = q.shape[1] // 2
    return q[:, :half] | (q[:, half:] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def fake_quantize(w: Tensor, scheme: str, group_size: int = GROUP_SIZE) -> Tensor:
    """The weight as the quantised model will see it (quantise, then dequantise), with the
    straight-through estimator: the forward value is dequant(quant(w)), the gradient passes to w
    unchanged (rounding has zero gradient almost everywhere, which would stop training)."""
    if scheme == "int8":
        deq = int8_dequantize(*int8_quantize(w))
    elif scheme == "int4":
        deq = int4_dequantize(*int4_quantize(w, group_size))
    else:
        raise ValueError(f"fake_quantize: scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    return w + (deq.to(w.dtype) - w).detach()


# --- which layers -------------------------------------------------------------------------------


def quantizable(model: nn.Module, scheme: str, group_size: int = GROUP_SIZE) -> list[tuple[str, nn.Linear]]:
    """The (name, Linear) pairs that `scheme` quantises (the same for PTQ and QAT): every Linear
    but a tied LM head and MoE routers; for int4 only those whose input width divides into groups."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    embed = getattr(getattr(model, "embed", None), "weight", None)
    chosen, skipped = [], []
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, FakeQuantLinear):
            continue
        if embed is not None and module.weight is embed or name.rsplit(".", 1)[-1] == "router":
            continue
        if scheme == "int4" and module.in_features % group_size:
            skipped.append(name)
            continue
        chosen.append((name, module))
    if skipped:
        log.warning(f"int4: {len(skipped)} Linear layer(s) stay float: their input width is not a multiple of "
                    f"the group size {group_size} ({', '.join(skipped[:4])}{', ...' * (len(skipped) > 4)})")
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --- post-training: weight-only quantised Linear layers ------------------------------------------


class QuantLinear(nn.Module):
    """A Linear layer with int8 or int4 weights (buffers, so `.to()` and `model_bytes` see them:
    int8 values and per-channel scales, or packed int4 values and per-group scales and minima)
    and a float bias."""

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int = GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme, self.group_size = scheme, group_size
        weight = linear.weight.detach()
        if scheme == "int8":
            q, scale = int8_quantize(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale)
        elif scheme == "int4":
            q, scale, low = int4_quantize(weight, group_size)
            self.register_buffer("qweight", pack_int4(q))
            self.register_buffer("scales", torch.stack([scale, low]))  # (2, out, groups)
        else:
            raise ValueError(f"QuantLinear: scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def dequantized(self) -> Tensor:
        """The float weight this layer computes with."""
        if self.scheme == "int8":
            return int8_dequantize(self.qweight, self.scales)
        return int4_dequantize(unpack_int4(self.qweight), self.scales[0], self.scales[1])

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.scheme == "int8":  # x (q s)^T = (x q^T) s: the scale per output channel goes on the output
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}"


def quantize(model: nn.Module, scheme: str, group_size: int = GROUP_SIZE) -> nn.Module:
    """Replace the Linear layers of `model` (see `quantizable`) by weight-only `scheme` ones, in
    place, on the model's device; returns the model, in eval mode. A model trained with QAT
    (`FakeQuantLinear`) quantises to exactly the weights its training saw."""
    for name, linear in quantizable(model, scheme, group_size):
        _replace(model, name, QuantLinear(linear, scheme, group_size))
    return model.eval()


# --- quantisation-aware training: fake-quantised Linear layers -----------------------------------


class FakeQuantLinear(nn.Linear):
    """A Linear layer whose forward uses the fake-quantised weight (straight-through gradient).
    It IS an nn.Linear with the same `weight` and `bias` parameters, so state_dict keys, the
    checkpoint, LoRA-free exports and everything that reads them are unchanged: the trained
    checkpoint is a float model, meant to be quantised with the same scheme (`quantize`)."""

    scheme: str = "int4"
    group_size: int = GROUP_SIZE

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, fake_quantize(self.weight, self.scheme, self.group_size), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fake {self.scheme}"


def fake_quantize_linears(model: nn.Module, scheme: str, group_size: int = GROUP_SIZE) -> int:
    """Swap the Linear layers that `quantize(model, scheme)` would quantise for FakeQuantLinear
    ones sharing their parameters (before the optimizer is built); returns how many."""
    layers = quantizable(model, scheme, group_size)
    for name, linear in layers:
        fake = FakeQuantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fake.weight, fake.bias = linear.weight, linear.bias  # the same Parameters: nothing copied, nothing renamed
        fake.scheme, fake.group_size = scheme, group_size
        _replace(model, name, fake)
    return len(layers)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters (a tied or shared one once) and buffers
    (quantised values, scales and minima, biases of quantised layers; rotary tables too)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
