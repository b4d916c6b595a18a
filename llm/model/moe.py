"""A sparse mixture-of-experts MLP (Switch, GShard, Mixtral, DeepSeek), in plain PyTorch.

Each token's router logits pick `top_k` of `n_experts` routed expert MLPs; the token's output is
the weighted sum of their outputs, plus the output of the always-on shared experts. The routed
experts' weights are stacked along a leading expert dimension (`experts.up` is (E, hidden, d)),
so compute is grouped per expert (one matmul per expert over the tokens routed to it) and expert
parallelism can later shard dimension 0.

Every forward records what the loss and the metrics need (`aux_loss`, `z_loss`, `load`,
`dropped`, `assignments`); `router_loss(module)` sums the coefficient-weighted losses of every
MoE layer in a module, `update_router_biases` is DeepSeek-V3's auxiliary-loss-free balancing step.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llm.model.config import ModelConfig
from llm.model.layers import MLP, gelu_tanh

ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu}


class Experts(nn.Module):
    """E MLPs of one kind (cfg.mlp, as the dense MLP) with their weights stacked on dim 0:
    `gate`, `up` (E, hidden, d) and `down` (E, d, hidden), as nn.Linear stores weights."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, mlp: str, bias: bool):
        super().__init__()
        self.gated = mlp == "swiglu"
        self.activation = ACTIVATIONS[mlp]

        def stacked(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(n_experts, *shape))

        self.gate = stacked(hidden, d_model) if self.gated else None
        self.up = stacked(hidden, d_model)
        self.down = stacked(d_model, hidden)
        self.gate_bias = stacked(hidden) if self.gated and bias else None
        self.up_bias = stacked(hidden) if bias else None
        self.down_bias = stacked(d_model) if bias else None

    def init_weights(self, std: float, out_std: float) -> None:
        """As the dense MLP: normal weights (the down projection with the residual's `out_std`), zero biases."""
        for weight in (self.gate, self.up):
            if weight is not None:
                nn.init.normal_(weight, mean=0.0, std=std)
        nn.init.normal_(self.down, mean=0.0, std=out_std)
        for bias in (self.gate_bias, self.up_bias, self.down_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """x (N, d): token rows sorted by expert, `counts[e]` of them for expert e -> (N, d)."""

        def per_expert(weight: Optional[Tensor]) -> list[Optional[Tensor]]:
            # unbind, not weight[e]: the backward of E selects would write E zero-filled (E, ...) gradients
            return [None] * len(counts) if weight is None else list(weight.unbind(0))

        gate, up, down = per_expert(self.gate), per_expert(self.up), per_expert(self.down)
        gate_b, up_b, down_b = per_expert(self.gate_bias), per_expert(self.up_bias), per_expert(self.down_bias)
        outputs = []
        for e, rows in enumerate(x.split(counts)):  # a loop over experts, not over tokens
            if self.gated:  # the same ops in the same order as llm.model.layers.MLP (unfused)
                h = self.activation(F.linear(rows, gate[e], gate_b[e])) * F.linear(rows, up[e], up_b[e])
            else:
                h = self.activation(F.linear(rows, up[e], up_b[e]))
            outputs.append(F.linear(h, down[e], down_b[e]))
        return torch.cat(outputs)


class MoE(nn.Module):
    """Router, routed experts and optional shared experts of one block (cfg.moe: `MoEConfig`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        problems = moe.problems(cfg.n_layers)
        if problems:
            raise ValueError("; ".join(problems))
        self.n_experts, self.top_k, self.kind = moe.n_experts, moe.top_k, moe.router
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.capacity_factor, self.bias_update_rate = moe.capacity_factor, moe.bias_update_rate
        hidden = cfg.expert_hidden_size
        self.router = nn.Linear(cfg.d_model, moe.n_experts, bias=False)
        self.experts = Experts(moe.n_experts, cfg.d_model, hidden, cfg.mlp, cfg.bias)
        self.shared = MLP(replace(cfg, mlp_hidden=moe.n_shared_experts * hidden)) if moe.n_shared_experts else None
        # Added to the selection scores only (DeepSeek-V3); saved in checkpoints, moved by `update_bias`.
        self.register_buffer("router_bias", torch.zeros(moe.n_experts), persistent=True)
        # What the last forward saw (see the module docstring), and the training forwards' expert
        # loads since the last bias update (a plain attribute: DDP would broadcast a buffer).
        self.aux_loss: Tensor = torch.zeros(())
        self.z_loss: Tensor = torch.zeros(())
        self.load: Tensor = torch.zeros(moe.n_experts)  # fraction of the token-assignments per expert
        self.dropped = 0  # assignments over capacity
        self.assignments = 0  # tokens x top_k
        self.step_counts: Optional[Tensor] = None

    def reset_parameters(self) -> None:
        """The bias buffer (after a meta-device build); the weights are `Transformer.reset_parameters`'."""
        nn.init.zeros_(self.router_bias)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router logits (N, E) -> (experts (N, k), weights (N, k), probabilities (N, E)).

        Experts are chosen by the softmax probabilities plus `router_bias`; the weights never see
        the bias. topk_softmax: the softmax of the k chosen logits (they sum to 1); softmax_topk:
        the chosen probabilities of the softmax over all experts, not renormalised."""
        probs = logits.softmax(dim=-1)
        experts = torch.topk(probs + self.router_bias, self.top_k, dim=-1).indices
        if self.kind == "topk_softmax":
            weights = logits.gather(-1, experts).softmax(dim=-1)
        else:
            weights = probs.gather(-1, experts)
        return experts, weights, probs

    def capacity(self, n_tokens: int) -> Optional[int]:
        """Assignments each expert takes in this forward: None (all) but in training with a capacity factor."""
        if self.capacity_factor is None or not self.training:
            return None  # evaluation and generation are dropless: cached decoding equals the full forward
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        logits = self.router(x).float()  # routing decisions in fp32 whatever the compute dtype
        experts, weights, probs = self.route(logits)

        # Token-assignments (token, k-th choice) sorted by expert (stable: in token order).
        flat_expert, flat_weight = experts.flatten(), weights.flatten()
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        capacity = self.capacity(n)
        if capacity is None:
            order, kept = torch.argsort(flat_expert, stable=True), counts
        else:  # within an expert by score, best first, so that the capacity keeps the best-scored ones
            score = probs.gather(-1, experts).flatten().detach()
            by_score = torch.argsort(score, descending=True, stable=True)
            order = by_score[torch.argsort(flat_expert[by_score], stable=True)]
            starts = torch.cumsum(counts, 0) - counts  # where each expert's run begins in `order`
            rank = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
            order = order[rank < capacity]
            kept = counts.clamp(max=capacity)
        token = order // self.top_k

        routed = self.experts(x.index_select(0, token), kept.tolist())
        routed = routed * flat_weight[order].unsqueeze(-1).to(routed.dtype)
        # (in the experts' dtype: under autocast they compute in 16 bits from a 32-bit x)
        y = x.new_zeros(x.shape, dtype=routed.dtype).index_add_(0, token, routed)  # a dropped one adds nothing
        if self.shared is not None:
            y = y + self.shared(x)

        self.record(logits, probs, counts, n, order.numel())
        return y.reshape(shape)

    def record(self, logits: Tensor, probs: Tensor, counts: Tensor, n_tokens: int, n_kept: int) -> None:
        """The router losses (with grad) and load statistics (detached) of this forward."""
        assignments = n_tokens * self.top_k
        load = counts.float() / assignments  # f_i: before any capacity drop, as Switch computes it
        self.aux_loss = self.n_experts * (load * probs.mean(dim=0)).sum()  # P_i: mean router probability
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.load = load.detach()
        self.dropped = assignments - n_kept
        self.assignments = assignments
        # Loads for the bias update: training forwards only (not validation, not sampling rollouts).
        if self.bias_update_rate > 0 and self.training and torch.is_grad_enabled():
            c = counts.detach().float()
            self.step_counts = c if self.step_counts is None else self.step_counts + c

    def loss(self) -> Tensor:
        """The coefficient-weighted router losses of the last forward."""
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss

    @torch.no_grad()
    def update_bias(self, counts: Tensor) -> None:
        """DeepSeek-V3: raise the bias of experts below the mean load, lower it above, by the rate."""
        step = self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.router_bias += step.to(self.router_bias.dtype)


def moe_layers(module: nn.Module) -> list[MoE]:
    """Every MoE layer in a module (a Transformer, a value model, a list of them), in order."""
    return [m for m in module.modules() if isinstance(m, MoE)]


def router_loss(module: nn.Module) -> Union[Tensor, float]:
    """The sum of the coefficient-weighted router losses of every MoE layer's last forward (0.0 with none)."""
    return sum((m.loss() for m in moe_layers(module)), 0.0)


def update_router_biases(module: nn.Module) -> None:
    """One auxiliary-loss-free balancing step, after an optimizer step: each layer's expert loads
    of the training forwards since the last step, summed over the data-parallel processes (one
    all-reduce, so every replica moves its biases alike), move its router bias. Every process must
    call it (layers with bias_update_rate 0 take no part)."""
    layers = [m for m in moe_layers(module) if m.bias_update_rate > 0]
    if not layers:
        return
    for m in layers:  # a layer that saw no training forward (none yet) adds zero loads
        if m.step_counts is None:
            m.step_counts = torch.zeros_like(m.router_bias, dtype=torch.float32)
    counts = torch.stack([m.step_counts for m in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    for m, c in zip(layers, counts):
        m.update_bias(c)
        m.step_counts = None
