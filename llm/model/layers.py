"""Norms and feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.config import ModelConfig


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


FUSE_PROJECTIONS = True  # False: always run the projections one by one (the reference tests compare with)


def fusable(x: Tensor, *linears: nn.Module) -> bool:
    """Whether these projections of one input can run as one matmul over their concatenated
    weights (`fused_linear`): plain `nn.Linear`s (not LoRA-adapted or quantized subclasses) with
    ordinary tensors (not tensor-parallel DTensors) and no hooks of their own (a per-module
    FSDP or TP wrapper would be skipped). Otherwise the caller runs them one by one.

    Only for inputs of at least `in_features` rows (training, prefill): below that, copying the
    weights costs more than the matmuls it merges (a decoding step's few rows read each weight
    once either way).

    The modules, their parameters and so their checkpoint keys stay separate (attn.q/k/v,
    mlp.gate/up): only the forward is fused."""
    if not FUSE_PROJECTIONS or x.numel() < x.shape[-1] * x.shape[-1]:
        return False
    for m in linears:
        if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks:
            return False
        if type(m.weight) is not nn.Parameter and type(m.weight) is not Tensor:
            return False
    return True


def fused_linear(x: Tensor, *linears: nn.Linear) -> Tensor:
    """x @ [W1; W2; ...]^T (+ biases): one larger matmul instead of several narrow ones (a GQA
    key or value projection is only n_kv_heads x head_dim wide), and in the backward one input
    gradient instead of several plus their sum. Concatenating the weights costs a copy of the
    (small) weights per call, not of the activations."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, weight, bias)


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b over the two halves of the fused gate/up projection h = [a, b]. Its backward
    writes both halves' gradients straight into one (.., 2 hidden) tensor, where autograd over
    `chunk` would build them apart and copy them together (a `cat` of the widest activation)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        a, b = h.chunk(2, dim=-1)
        activated = F.silu(a)
        ctx.save_for_backward(h, activated)
        return activated * b

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        h, activated = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_b)
        torch.mul(grad, b, out=grad_a)
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        return grad_h


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up, h = [gate, up] on its last dimension (`fused_linear(x, gate, up)`)."""
    if h.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():  # (inductor fuses its own)
        return _SwiGLU.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _RMSNorm(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight as one autograd node (PyTorch has no fused RMSNorm
    backward on the CPU: autograd over its decomposition runs about twice the full-size ops of
    this hand-written backward). Saves the normalised input and the per-row scale."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        h = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half precision: in float32
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        normed = h * rstd
        ctx.save_for_backward(normed, rstd, weight)
        ctx.dtype = x.dtype
        return (normed * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        normed, rstd, weight = ctx.saved_tensors
        grad = grad.to(normed.dtype)
        grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = grad * weight
        mean = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_normed, normed, mean, value=-1).mul_(rstd)
        return grad_x.to(ctx.dtype), grad_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same numbers) with a faster backward (`_RMSNorm`) for plain tensors."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (w is not None and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
                and not torch.compiler.is_compiling()  # inductor fuses the decomposition itself
                and type(w) is nn.Parameter and type(x) is Tensor):
            return _RMSNorm.apply(x, w, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)
        return super().forward(x)


def build_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """SwiGLU (down(silu(gate x) * up x)) or a plain two-layer GELU/ReLU MLP. `gelu` is the exact
    (erf) GELU, `gelu_tanh` the tanh approximation GPT-2 was trained with."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.gated = cfg.mlp == "swiglu"
        self.activation = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}[cfg.mlp]
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated and fusable(x, self.gate, self.up):  # one matmul for both (see `fused_linear`)
            return self.down(swiglu(fused_linear(x, self.gate, self.up)))
        if self.gated:
            return self.down(self.activation(self.gate(x)) * self.up(x))
        return self.down(self.activation(self.up(x)))
