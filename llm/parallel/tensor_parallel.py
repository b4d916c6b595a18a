"""Tensor parallelism (Megatron-style) for the plain Transformer, applied from outside.

Attention: q/k/v column-wise (each rank gets whole heads; GQA needs n_kv_heads % tp == 0), output
row-wise. MLP: gate/up column-wise, down row-wise. Embeddings and norms stay replicated; an untied
LM head is column-wise with gathered logits. The attention module reads head counts from tensor
shapes, so it runs unchanged on its local heads.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch import nn


def block_plan(gated_mlp: bool) -> dict:
    plan = {
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.o": RowwiseParallel(),
        "mlp.up": ColwiseParallel(),
        "mlp.down": RowwiseParallel(),
    }
    if gated_mlp:
        plan["mlp.gate"] = ColwiseParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a Transformer, or a ValueModel (reward model, critic: its transformer is `backbone`,
    its scalar head stays replicated), over `tp_mesh`."""
    tp = tp_mesh.size()
    transformer = getattr(model, "backbone", model)
    cfg = transformer.cfg
    if cfg.n_heads % tp or cfg.kv_heads % tp:
        raise ValueError(f"tensor_parallel={tp} must divide model.n_heads={cfg.n_heads} and "
                         f"n_kv_heads={cfg.kv_heads}")
    for block in transformer.blocks:
        inner = getattr(block, "_checkpoint_wrapped_module", block)  # through an activation-checkpoint wrapper
        parallelize_module(inner, tp_mesh, block_plan(cfg.mlp == "swiglu"))
    # A tied head shares the replicated embedding's weight; a value model has no LM head.
    if transformer.lm_head is not None and not cfg.tie_embeddings:
        parallelize_module(transformer, tp_mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    slopes = transformer.position.slopes()
    if slopes is not None:  # ALiBi: each rank keeps the slopes of its own heads
        rank = tp_mesh.get_local_rank()
        transformer.position.head_slopes = torch.chunk(slopes, tp)[rank].clone()
