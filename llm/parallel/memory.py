"""The memory plan of a layout, before any data is read: the device mesh, per-rank parameter,
gradient and optimizer-state bytes (exact, from the parameter shapes and how each option shards
them, expert parallelism included) and an activation estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from llm.model import ModelConfig, Transformer

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Mirrors llm.parallel.tensor_parallel.block_plan (a test checks the two agree on real shards).
COLWISE = {"attn.q", "attn.k", "attn.v", "mlp.up", "mlp.gate"}
ROWWISE = {"attn.o", "mlp.down"}


@dataclass
class MemoryPlan:
    mesh: dict[str, int]
    params: int  # bytes on the busiest rank
    grads: int
    optimizer: int
    activations: int  # an estimate
    expert_params: int = 0  # of `params`: the routed experts' bytes on this rank (MoE)
    experts_per_rank: Optional[tuple[int, int]] = None  # (held, of) per MoE layer, under expert parallelism

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def lines(self) -> list[str]:
        gib = 2**30
        mesh = " x ".join(f"{name} {size}" for name, size in self.mesh.items())
        return [f"mesh: {mesh}",
                f"per rank: parameters {self.params / gib:.3f} GiB, gradients {self.grads / gib:.3f} GiB, "
                f"optimizer state {self.optimizer / gib:.3f} GiB, activations ~{self.activations / gib:.3f} GiB "
                f"(total ~{self.total / gib:.3f} GiB)"] + self.expert_lines()

    def expert_lines(self) -> list[str]:
        if not self.expert_params:
            return []
        held = "" if self.experts_per_rank is None else \
            f"{self.experts_per_rank[0]} of {self.experts_per_rank[1]} experts per MoE layer, "
        return [f"routed experts per rank: {held}parameters {_size(self.expert_params)} "
                f"(with gradients and optimizer state {_size(4 * self.expert_params)})"]


def _size(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.3f} MiB"


def local_numel(name: str, shape: torch.Size, tp: int, shard: int, tied: bool, rank: int = 0) -> int:
    """Elements of one parameter held by shard-group rank `rank`: tensor-parallel split first (column-wise on dim 0,
    row-wise on dim 1), then FSDP2's dim-0 chunking over the shard group."""
    shape = list(shape)
    module = name.rsplit(".", 1)[0].split(".", 2)[-1]  # blocks.3.attn.q.weight -> attn.q
    if tp > 1 and name.startswith("blocks."):
        if module in COLWISE:
            shape[0] //= tp
        elif module in ROWWISE and name.endswith("weight"):
            shape[1] //= tp
    elif tp > 1 and name == "lm_head.weight" and not tied:
        shape[0] //= tp
    rows = shape[0]
    chunk = math.ceil(rows / shard)
    local_rows = max(0, min(chunk, rows - rank * chunk))
    return local_rows * math.prod(shape[1:])


def memory_plan(model_cfg: ModelConfig, world: int, tensor_parallel: int = 1, replicate: Optional[int] = None,
                sharded: bool = False, micro_batch: int = 1, seq_len: int = 128, activation_bytes: int = 4,
                checkpointing: str = "none", rank: int = 0, expert_parallel: int = 1) -> MemoryPlan:
    """Bytes per rank for AdamW training (fp32 parameters, gradients and two moments).

    With expert parallelism a rank holds n_experts / expert_parallel experts of each MoE layer,
    which FSDP shards further over the dp / expert_parallel ranks holding the same experts
    (`llm.parallel.expert`: EP groups are consecutive ranks)."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    dp = world // tensor_parallel
    shard = (dp // (replicate or 1)) if sharded else 1
    shard_rank = (rank // tensor_parallel) % shard  # tensor parallel is the innermost mesh dimension
    ep = expert_parallel
    seen, elements, expert_elements = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".mlp.experts." in name:  # routed experts, stacked on dim 0
            shape = torch.Size([p.shape[0] // ep, *p.shape[1:]])
            n = local_numel(name, shape, 1, dp // ep, False, rank // ep) if sharded else shape.numel()
            expert_elements += n
        else:
            n = local_numel(name, p.shape, tensor_parallel if sharded else 1, shard, model_cfg.tie_embeddings,
                            shard_rank)
        elements += n
    params = 4 * elements
    mesh = {"data parallel": dp} if not sharded else (
        {"replicate": replicate, "shard": shard} if replicate else {"shard (data parallel)": dp})
    if sharded and tensor_parallel > 1:
        mesh["tensor parallel"] = tensor_parallel
    if ep > 1:
        mesh["expert parallel"] = ep  # an axis of the data-parallel ranks (dp / ep groups of ep)
    n_experts = model_cfg.moe.n_experts
    return MemoryPlan(mesh=mesh, params=params, grads=params, optimizer=2 * params,
                      activations=activation_estimate(model_cfg, micro_batch, seq_len, activation_bytes,
                                                      tensor_parallel, checkpointing),
                      expert_params=4 * expert_elements,
                      experts_per_rank=(n_experts // ep, n_experts) if ep > 1 else None)


def activation_estimate(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype_bytes: int, tp: int,
                        checkpointing: str) -> int:
    """Stored activations for backward, after Korthikanti et al. (2022): per layer about
    s b h (34 + 5 a s / h) bytes in 16-bit (without the 5 a s / h score term for fused kernels), scaled to the dtype and divided by TP (no sequence
    parallelism). With full activation checkpointing only each block's input is kept (plus one
    block recomputed at a time); the logits (b s V, fp32 for the loss) come on top."""
    s, b, h, a, L = seq_len, micro_batch, cfg.d_model, cfg.n_heads, cfg.n_layers
    # The a*s^2 score matrices are stored only when a dense additive mask forces the math kernel.
    dense_scores = cfg.attention.kernel == "sdpa" and (cfg.position.kind == "alibi" or cfg.attention.window)
    per_layer = s * b * h * (10 + 24 / tp + (5 * a * s / (h * tp) if dense_scores else 0)) * dtype_bytes / 2
    n_moe, recomputed = sum(cfg.is_moe_layer(i) for i in range(L)), per_layer
    if n_moe:
        # An MoE layer stores its two hidden-width tensors for the k routed + shared experts instead
        # of the dense MLP's 4h-wide ones, plus each assignment's gathered input and weighted output.
        moe, hidden = cfg.moe, cfg.expert_hidden_size
        elements = 2 * ((moe.top_k + moe.n_shared_experts) * hidden - 4 * h) + 2 * h * moe.top_k
        per_layer_moe = per_layer + s * b * elements * dtype_bytes
        recomputed = max(per_layer, per_layer_moe)  # the largest block, recomputed at a time
        per_layer = (n_moe * per_layer_moe + (L - n_moe) * per_layer) / L  # the mean block
    if checkpointing == "full":
        layers = L * s * b * h * dtype_bytes + recomputed
    elif checkpointing == "every_n":
        layers = L / 2 * per_layer + L / 2 * s * b * h * dtype_bytes
    else:
        layers = L * per_layer
    logits = b * s * cfg.padded_vocab_size * 4 * 2  # logits and their gradient
    return int(layers + logits)
