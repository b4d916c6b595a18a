"""Expert parallelism (EP), applied from outside as torchtitan does: each MoE layer's routed
experts are split over the `expert` axis of a (expert_replicate x expert) mesh made of the
data-parallel ranks, and tokens travel to the rank that holds their expert by all-to-all.

Rank r of an EP group of `ep` ranks holds experts [r E/ep, (r+1) E/ep) as DTensors sharded on
dim 0 (so checkpoints, gradient clipping and the optimizer see the whole (E, ...) tensor). Its
`forward(x_sorted, counts)` is a drop-in for `llm.model.moe.Experts`': the per-expert counts are
exchanged, each rank's rows go to the owners of their experts, the owner runs `Experts.forward`
on its local experts (grouped, one matmul per expert), and the rows come back in their original
order. The router, shared experts and router bias stay replicated.

Gradients: a rank's expert gradient already sums the contributions of the tokens of every rank
of its EP group (the all-to-all's backward brings them home). Expert weights are therefore
summed only over the ranks holding the same experts (the `expert_replicate` axis) and divided by
all data-parallel ranks, the mean DDP/FSDP give the rest (`average_expert_gradients`): under DDP
the expert parameters are hidden from DDP; under FSDP2 they are sharded over `expert_replicate`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from llm.model.moe import Experts, moe_layers

WEIGHTS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")  # Experts' stacked tensors


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; its backward sends the gradients back the
    way the rows came."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Send rows x[sum(in_splits[:j]) : ...] to rank j of `group`, receive out_splits[i] rows from rank i."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _regroup(x: Tensor, sizes: list[int], rows: int, cols: int) -> Tensor:
    """Rows in blocks laid out as a (rows x cols) grid, row-major -> the same blocks column-major
    (sizes[i * cols + j] is block (i, j)'s row count)."""
    blocks = x.split(sizes)
    return torch.cat([blocks[i * cols + j] for j in range(cols) for i in range(rows)])


class ExpertParallelExperts(nn.Module):
    """The routed experts of one MoE layer, `n_local` of them on this rank (see the module
    docstring); parameter names and global shapes are `Experts`', so state dicts keep their keys."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh  # 1-D: the EP group
        self.group = mesh.get_group()
        self.ep, self.ep_rank = mesh.size(), mesh.get_local_rank()
        self.gated, self.activation = experts.gated, experts.activation
        self.n_experts = experts.up.shape[0]
        self.grad_reduce: Optional[tuple[float, Any]] = None  # (divisor, group): `average_expert_gradients`
        self.n_local = self.n_experts // self.ep
        first = self.ep_rank * self.n_local
        for name in WEIGHTS:
            full = getattr(experts, name)
            if full is None:
                setattr(self, name, None)
                continue
            local = full.detach()[first:first + self.n_local].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                             requires_grad=full.requires_grad))

    def local_experts(self) -> Experts:
        """An `Experts` whose stacked tensors are this rank's expert shards (its forward runs on them)."""
        view = Experts.__new__(Experts)
        nn.Module.__init__(view)
        view.gated, view.activation = self.gated, self.activation
        for name in WEIGHTS:
            p = getattr(self, name)
            local = p.to_local() if isinstance(p, DTensor) else p
            if local is not None and self.grad_reduce is not None:
                local = _ReduceGrad.apply(local, *self.grad_reduce)
            view.__dict__[name] = local
        return view

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """x (N, d): this rank's token rows sorted by expert, `counts[e]` of them for global expert e -> (N, d)."""
        ep, n_local = self.ep, self.n_local
        send = torch.tensor(counts, dtype=torch.int64, device=x.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # n_local counts to and from every rank
        sent = send.view(ep, n_local).tolist()  # [owner][its local expert]
        received = recv.view(ep, n_local).tolist()  # [source][my local expert]
        in_splits, out_splits = [sum(r) for r in sent], [sum(r) for r in received]
        rows = all_to_all(x, out_splits, in_splits, self.group)  # by (source, expert)
        by_source = [c for r in received for c in r]
        grouped = _regroup(rows, by_source, ep, n_local)  # by (expert, source)
        out = self.local_experts()(grouped, [sum(received[s][e] for s in range(ep)) for e in range(n_local)])
        by_expert = [received[s][e] for e in range(n_local) for s in range(ep)]
        out = _regroup(out, by_expert, n_local, ep)  # by (source, expert) again
        return all_to_all(out, in_splits, out_splits, self.group)

    def extra_repr(self) -> str:
        return f"experts {self.ep_rank * self.n_local}..{(self.ep_rank + 1) * self.n_local - 1} of {self.n_experts}"


def expert_mesh(expert_parallel: int, device_type: Optional[str] = None) -> DeviceMesh:
    """(expert_replicate x expert) over all ranks: EP groups of consecutive ranks, as torchtitan lays them out."""
    world = dist.get_world_size()
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // expert_parallel, expert_parallel),
                            mesh_dim_names=("expert_replicate", "expert"))
    # Both axes as one: a norm of an FSDP-sharded expert gradient (gradient clipping) is then
    # reduced by one all-reduce over all ranks, not one per axis.
    mesh["expert_replicate", "expert"]._flatten("expert_all")
    return mesh


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[ExpertParallelExperts]:
    """Replace the routed experts of every MoE layer of `model` by their shard over mesh["expert"]."""
    from llm.config.validate import ConfigError

    ep, sharded = mesh["expert"].size(), []
    for layer in moe_layers(model):
        if layer.n_experts % ep:  # (validation refuses this first, but for an init_from parent's model)
            raise ConfigError([f"parallelism.expert_parallel={ep}: must divide model.moe.n_experts={layer.n_experts}"])
        layer.experts = ExpertParallelExperts(layer.experts, mesh["expert"])
        sharded.append(layer.experts)
    if not sharded:
        raise ConfigError([f"parallelism.expert_parallel={ep}: splits the experts of an MoE model, and this model is "
                           "dense; allowed: 1"])
    return sharded


# --- gradients ----------------------------------------------------------------------------------


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by `divisor` and sums it over `group`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, divisor: float, group: Any) -> Tensor:
        ctx.divisor, ctx.group = divisor, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad / ctx.divisor
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def average_expert_gradients(experts: ExpertParallelExperts, divisor: int,
                             replicas: Optional[DeviceMesh] = None) -> None:
    """Divide each backward's expert gradient by `divisor` and, given `replicas` (the ranks holding
    the same experts), sum it over them. Under DDP: divisor = the data-parallel size, summed over
    the replicas (DDP averages the other parameters over all ranks); under FSDP2: divisor = the EP
    size, and FSDP's reduction averages over the replicas. Done in the forward's autograd graph: a
    tensor hook on a DTensor parameter is lost when Lightning moves the model with `.to(device)`,
    and FSDP2's own gradient divide factor needs NCCL's PREMUL_SUM (gloo has none)."""
    group = replicas.get_group() if replicas is not None and replicas.size() > 1 else None
    experts.grad_reduce = (float(divisor), group)


# --- under DDP: hidden from DDP, whole tensors in state dicts -------------------------------------


def hide_experts_from_ddp(module: nn.Module) -> None:
    """Before DDP wraps `module`: DDP leaves the expert parameters (DTensors) alone; they are
    averaged by `average_expert_gradients`."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in module.named_parameters() if isinstance(p, DTensor)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)


def gather_in_state_dicts(experts: ExpertParallelExperts) -> None:
    """A single-file (DDP) checkpoint holds each expert tensor whole, as a single-process run's:
    state_dict() gathers them (a collective: every rank saves, as Lightning's save does), and
    load_state_dict() takes a whole tensor and keeps this rank's experts."""

    def gather(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name in WEIGHTS:
            value = state.get(prefix + name)
            if isinstance(value, DTensor):
                state[prefix + name] = value.full_tensor()

    def scatter(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in WEIGHTS:
            value, p = state.get(prefix + name), getattr(module, name)
            if p is not None and isinstance(value, Tensor) and not isinstance(value, DTensor) \
                    and value.shape == p.shape:
                state[prefix + name] = shard_like(value, p)

    experts.register_state_dict_post_hook(gather)
    experts.register_load_state_dict_pre_hook(scatter)


def shard_like(full: Tensor, p: DTensor) -> DTensor:
    """This rank's dim-0 chunk of a whole tensor, as a DTensor laid out as `p`."""
    mesh = p.device_mesh
    n = full.shape[0] // mesh.size()
    start = mesh.get_local_rank() * n
    local = full[start:start + n].to(device=p.to_local().device, dtype=p.dtype).clone()
    return DTensor.from_local(local, mesh, list(p.placements), run_check=False)


def _expert_params(optimizer: torch.optim.Optimizer) -> dict[int, DTensor]:
    """Index in the optimizer's state dict -> the expert parameter (a DTensor) it belongs to."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: p for i, p in enumerate(params) if isinstance(p, DTensor)}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` with the experts' moments whole (a collective over the EP groups)."""
    experts = _expert_params(optimizer)
    per_param = {i: ({k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
                     if i in experts else s) for i, s in state["state"].items()}
    return {**state, "state": per_param}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A gathered optimizer state dict with this rank's chunk of each expert moment (for load_state_dict)."""
    experts = _expert_params(optimizer)

    def local(value: Any, p: DTensor) -> Any:
        whole = isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == p.shape
        return shard_like(value, p) if whole else value  # (the step count stays as it is)

    per_param = {i: ({k: local(v, experts[i]) for k, v in s.items()} if i in experts else s)
                 for i, s in state["state"].items()}
    return {**state, "state": per_param}
