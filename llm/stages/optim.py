"""Optimizer parameter groups: weight decay on matrices only."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every >= 2-D weight except embeddings; never decay norms, biases or embeddings.
    Tied parameters appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [part for group in groups for part in _by_tensor_kind(group)]


def _by_tensor_kind(group: dict) -> list[dict]:
    """A group mixing DTensors and plain tensors (expert parallelism under DDP) split in two:
    fused and foreach optimizer kernels refuse lists that mix them."""
    from torch.distributed.tensor import DTensor

    kinds = [[p for p in group["params"] if isinstance(p, DTensor) == dtensor] for dtensor in (False, True)]
    if not all(kinds):
        return [group]
    return [{**group, "params": params} for params in kinds]


def build_optimizer(factory: Callable, model: nn.Module) -> torch.optim.Optimizer:
    """`factory` is the instantiated `optim` group (a partial). `fused: null` means fused where
    the parameters' device supports it (CUDA, and CPU in recent PyTorch)."""
    keywords = dict(getattr(factory, "keywords", {}))
    weight_decay = keywords.get("weight_decay", 0.0)
    if keywords.get("fused", "unset") is None:
        device = next(model.parameters()).device.type
        keywords["fused"] = device in ("cuda", "cpu")
    func = getattr(factory, "func", factory)
    return func(param_groups(model, weight_decay), **keywords)


def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a total L2 norm; returns the norm before clipping.

    With tensor parallelism the gradients are DTensors on different meshes (TP-sharded matrices
    on the 2-D mesh, replicated norms and embeddings on the data-parallel mesh), which torch's
    clip_grad_norm_ cannot stack; each norm is then reduced to a plain tensor first."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norms = [torch.linalg.vector_norm(g) for g in grads]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = max_norm / (float(total) + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total
