"""Pipeline parallelism (`parallelism=pp`, `pp_fsdp`, `pp_fsdp_tp`), applied to the plain Transformer
from outside, as torchtitan does: each rank keeps the layers of its pipeline stage(s) and
`torch.distributed.pipelining` runs a schedule (GPipe, 1F1B, interleaved 1F1B, zero bubble) over
micro-batches of each batch.

The split: the token embedding (and a learned position table) on the first stage, the blocks
divided evenly by layer (or `layers_per_stage`), the final norm and LM head on the last stage.
A rank's `PipelinedModel` registers its parts under the full model's names (`embed`,
`blocks.<i>`, `norm`, `lm_head`), so its state dict holds the full model's keys for the layers it
holds and distributed checkpoints reshard across pipeline degrees by name. The stages that run
(`StageChunk`, one per virtual stage of this rank) share those modules.

Only the last stage sees the loss: `PipelinedModel.step` broadcasts it from there over the
pipeline group, so every rank logs the same `train/loss`, and the loss guard and preemption decide
alike; gradient clipping sums the squared norms of every stage (`clip_grad_norm_`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llm.model.attention import attention_bias
from llm.parallel.apply import FSDP

# schedule name -> (torch class name, virtual stages per rank: 1, or "many" (>= 2), or 2 in a V)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "one"),
    "1f1b": ("Schedule1F1B", "one"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "many"),
    "looped_bfs": ("ScheduleLoopedBFS", "many"),
    "interleaved_zb": ("ScheduleInterleavedZeroBubble", "many"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
}


def split_layers(n_layers: int, n_stages: int, layers_per_stage: Optional[Sequence[int]] = None) -> list[range]:
    """The blocks of each stage: `layers_per_stage` as given, else an even split."""
    if layers_per_stage:
        counts = list(layers_per_stage)
        if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
            raise ValueError(f"parallelism.pipeline.layers_per_stage={counts}: needs {n_stages} counts summing to "
                             f"model.n_layers={n_layers}")
    else:
        if n_layers % n_stages:
            raise ValueError(f"model.n_layers={n_layers} is not divisible by the {n_stages} pipeline stages")
        counts = [n_layers // n_stages] * n_stages
    starts = [sum(counts[:i]) for i in range(n_stages)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def stage_indices(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    """The (virtual) stages pipeline rank `pp_rank` runs: looped (r, r + p, ...) or a V (r, 2p - 1 - r)."""
    if SCHEDULES[schedule][1] == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def bubble_fraction(schedule: str, pp: int, microbatches: int, per_rank: int = 1) -> float:
    """The idle fraction of a step in the usual cost model (forward = backward/2 = one unit per stage):
    GPipe and 1F1B (p - 1) / (m + p - 1); interleaving divides the fill and drain by the virtual
    stages v, (p - 1) / (v m + p - 1); the zero-bubble schedules split the backward into its input and
    weight halves to fill most of it (ZB-H1's third: (p - 1) / (3 (v m) + p - 1) as an estimate)."""
    p, m, v = pp, microbatches, per_rank
    if p == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (3 * v * m + p - 1)


class StageChunk(nn.Module):
    """One pipeline stage of a Transformer: what `torch.distributed.pipelining` runs. The first
    takes tokens, the others hidden states; the last returns logits."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.cfg = model.cfg
        if first:
            self.embed, self.drop = model.embed, model.drop
        # The position module gives every stage its rotary tables or ALiBi slopes (buffers only);
        # a learned table (parameters) belongs to the first stage alone.
        if first or not any(True for _ in model.position.parameters()):
            self.position = model.position
        else:
            object.__setattr__(self, "position", model.position)
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        if self.first:
            x = self.drop(self.position.embed(self.embed(x), positions))
        rotary = self.position.rotary(positions)
        bias = attention_bias(positions, positions, self.cfg.attention.window, self.position.slopes(), x.dtype,
                              None, None, None)
        for block in self.blocks.values():
            x = block(x, rotary, bias)
        return self.lm_head(self.norm(x)) if self.last else x


class PipelinedModel(nn.Module):
    """This rank's share of a Transformer under the full model's parameter names, with the
    pipeline schedule that trains it. `step` and `evaluate` run a whole batch."""

    def __init__(self, model: nn.Module, chunks: list[StageChunk], pp_group: Optional[Any], owners: list[int],
                 indices: list[int]):
        super().__init__()
        self.cfg = model.cfg
        if any(c.first for c in chunks):
            self.embed, self.drop = model.embed, model.drop
        if any(c.first for c in chunks) or not any(True for _ in model.position.parameters()):
            self.position = model.position
        self.blocks = nn.ModuleDict({k: b for c in chunks for k, b in c.blocks.items()})
        if any(c.last for c in chunks):
            self.norm, self.lm_head = model.norm, model.lm_head
        object.__setattr__(self, "chunks", chunks)  # the same modules: not registered twice
        self.pp_group = pp_group
        self.owners = owners  # the pipeline rank of each stage
        self.by_stage = dict(zip(indices, chunks))
        self.pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
        self.schedule: Any = None
        self._loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None
        self._scale = 1.0

    @property
    def has_first(self) -> bool:
        return any(c.first for c in self.chunks)

    @property
    def has_last(self) -> bool:
        return any(c.last for c in self.chunks)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("a pipeline-parallel model runs through its schedule (step/evaluate), not forward(); "
                           "consolidate its checkpoint (llm-consolidate) to use the whole model")

    def scaled_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The loss function the schedule calls per micro-batch, scaled so that the summed gradients are
        those of the mean loss over the micro-batches (and gradient-accumulation steps)."""
        assert self._loss is not None
        return self._loss(output, target) * self._scale

    def step(self, inputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
             accumulation: int = 1) -> Tensor:
        """Forward and backward of one batch through the pipeline (gradients accumulate into .grad);
        returns the batch's mean loss on every rank (from the last stage)."""
        return self._run(inputs, targets, loss_fn, accumulation, train=True)

    @torch.no_grad()
    def evaluate(self, inputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """The batch's mean loss, forward only, on every rank: the whole batch through the stages in
        order, by point-to-point sends (the zero-bubble schedules have no forward-only mode)."""
        x, last = inputs, len(self.owners) - 1
        for s, owner in enumerate(self.owners):
            if owner != self.pp_rank:
                continue
            if s > 0 and self.owners[s - 1] != owner:
                x = torch.empty(*inputs.shape, self.cfg.d_model, device=inputs.device)
                dist.recv(x, src=self._global(self.owners[s - 1]), group=self.pp_group)
            x = self.by_stage[s](x)
            if s < last and self.owners[s + 1] != owner:
                dist.send(x.float().contiguous(), dst=self._global(self.owners[s + 1]), group=self.pp_group)
        loss = loss_fn(x, targets).detach().float() if self.has_last else torch.zeros((), device=inputs.device)
        return self._from_last(loss)

    def _run(self, inputs: Tensor, targets: Tensor, loss_fn: Callable, accumulation: int, train: bool) -> Tensor:
        n = self.schedule._n_microbatches
        self._loss, self._scale = loss_fn, 1.0 / (n * accumulation)
        losses: list[Tensor] = []
        args = (inputs,) if self.has_first else ()
        target = targets if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        if self.has_last:
            loss = torch.stack([x.detach().float() for x in losses]).sum() * accumulation
        else:
            loss = torch.zeros((), device=inputs.device)
        return self._from_last(loss)

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.pp_group, pp_rank) if self.pp_group is not None else 0

    def _from_last(self, loss: Tensor) -> Tensor:
        """The last stage's value on every rank of the pipeline."""
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            dist.broadcast(loss, src=self._global(self.owners[-1]), group=self.pp_group)
        return loss

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip to the total L2 norm of every stage's gradients (each rank holds some)."""
        from torch.distributed.tensor import DTensor

        squares = torch.zeros((), dtype=torch.float64)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        for g in grads:
            norm = torch.linalg.vector_norm(g.float())
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares = squares + norm.double().cpu() ** 2
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            squares = squares.to(grads[0].device if grads else "cpu")
            dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt().float()
        scale = max_norm / (float(total) + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return total


def rank_chunks(model: nn.Module, pp_rank: int, pp: int, schedule: str, per_rank: int = 1,
                layers_per_stage: Optional[Sequence[int]] = None) -> tuple[list[int], list[StageChunk]]:
    """The stage indices pipeline rank `pp_rank` runs, and their modules (sharing `model`'s)."""
    per_rank = 2 if SCHEDULES[schedule][1] == "v" else (1 if SCHEDULES[schedule][1] == "one" else per_rank)
    n_stages = pp * per_rank
    ranges = split_layers(model.cfg.n_layers, n_stages, layers_per_stage)
    indices = stage_indices(pp_rank, pp, per_rank, schedule)
    return indices, [StageChunk(model, ranges[i], first=i == 0, last=i == n_stages - 1) for i in indices]


def build_pipeline(model: nn.Module, pp_mesh: Any, schedule: str, microbatches: int, stages_per_rank: int = 1,
                   layers_per_stage: Optional[Sequence[int]] = None,
                   shard: Optional[Callable[[StageChunk], None]] = None) -> PipelinedModel:
    """Split `model` (TP and activation checkpointing already applied) into this rank's stages, shard
    each with `shard` (FSDP), and make the schedule."""
    from torch.distributed import pipelining

    pp = pp_mesh.size() if pp_mesh is not None else 1
    pp_rank = pp_mesh.get_local_rank() if pp_mesh is not None else 0
    group = pp_mesh.get_group() if pp_mesh is not None else None
    per_rank = 2 if SCHEDULES[schedule][1] == "v" else stages_per_rank
    n_stages = pp * per_rank
    indices, chunks = rank_chunks(model, pp_rank, pp, schedule, per_rank, layers_per_stage)
    for chunk in chunks:
        if shard is not None:
            shard(chunk)
    owners = [next(r for r in range(pp) if s in stage_indices(r, pp, per_rank, schedule)) for s in range(n_stages)]
    pipelined = PipelinedModel(model, chunks, group, owners, indices)
    device = next(iter(pipelined.parameters())).device
    if device.type == "meta":
        device = torch.device("cpu")
    stages = [pipelining.PipelineStage(chunk, i, n_stages, device, group=group) for chunk, i in zip(chunks, indices)]
    cls = getattr(pipelining, SCHEDULES[schedule][0])
    # The loss is scaled by the micro-batches in scaled_loss (and the accumulation), not by torch.
    pipelined.schedule = cls(stages if SCHEDULES[schedule][1] != "one" else stages[0], microbatches,
                             loss_fn=pipelined.scaled_loss, scale_grads=False)
    return pipelined


class Pipeline(FSDP):
    """Pipeline stages over a `pipeline` mesh axis, composed with FSDP2 (over `data_parallel`) and
    tensor parallelism (`tensor_parallel`) inside each stage: a pp x dp x tp mesh."""

    sharded_checkpoints = True
    pipelined = True

    def __init__(self, pipeline: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        pipeline = dict(pipeline or {})
        self.stages = int(pipeline.get("stages", 2))
        self.microbatches = int(pipeline.get("microbatches", 4))
        self.schedule = str(pipeline.get("schedule", "1f1b"))
        self.stages_per_rank = int(pipeline.get("stages_per_rank", 1))
        layers = pipeline.get("layers_per_stage")
        self.layers_per_stage = list(layers) if layers else None
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallelism.pipeline.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")

    @property
    def virtual_stages(self) -> int:
        kind = SCHEDULES[self.schedule][1]
        return 1 if kind == "one" else 2 if kind == "v" else self.stages_per_rank

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.stages)

    def strategy(self, world_size: int = 1) -> Any:
        from llm.parallel.pipeline_strategy import PipelineParallelStrategy

        return PipelineParallelStrategy(pipeline_parallel_size=self.stages,
                                        data_parallel_size=self.data_parallel_size(world_size),
                                        tensor_parallel_size=self.tensor_parallel, save_distributed_checkpoint=True)

    def parallelize(self, model: nn.Module, device_mesh: Optional[Any] = None) -> nn.Module:
        from llm.parallel.tensor_parallel import apply_tensor_parallel

        if self.tensor_parallel > 1:
            apply_tensor_parallel(model, device_mesh["tensor_parallel"])
        self.wrap(model)
        dp_mesh = device_mesh["data_parallel"] if device_mesh is not None else None
        shard = self.shard_stage if dp_mesh is not None and dp_mesh.size() > 1 else None
        self._dp_mesh = dp_mesh
        pp_mesh = device_mesh["pipeline"] if device_mesh is not None else None
        return build_pipeline(model, pp_mesh, self.schedule, self.microbatches, self.virtual_stages,
                              self.layers_per_stage, shard)


    def shard_stage(self, chunk: StageChunk) -> None:
        """FSDP2 over the data-parallel ranks: each block, then the stage (its embedding or head)."""
        from torch.distributed.fsdp import fully_shard

        from llm.parallel.fsdp import _policies

        kwargs = {"mesh": self._dp_mesh, **_policies(self.param_dtype, self.reduce_dtype, self.cpu_offload)}
        for block in chunk.blocks.values():
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **kwargs)
        fully_shard(chunk, reshard_after_forward=self.reshard_after_forward, **kwargs)


__all__ = ["Pipeline", "PipelinedModel", "StageChunk", "SCHEDULES", "build_pipeline", "split_layers",
           "stage_indices", "bubble_fraction", "rank_chunks"]
