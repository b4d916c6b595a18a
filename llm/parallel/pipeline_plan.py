"""The dry run of a pipeline layout (`parallelism=pp... dry_run=true`): the pp x dp x tp mesh, the
layers of each stage, each pipeline rank's parameter, gradient and optimizer bytes (exact: the
stages are built on the meta device and their parameters counted as FSDP/TP shard them), its
activations with the micro-batches its schedule keeps in flight, and the schedule's bubble."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from llm.model import ModelConfig, Transformer
from llm.parallel.memory import activation_estimate, local_numel
from llm.parallel.pipeline import SCHEDULES, bubble_fraction, rank_chunks, split_layers, stage_indices


def virtual_stages(schedule: str, stages_per_rank: int) -> int:
    kind = SCHEDULES[schedule][1]
    return 1 if kind == "one" else 2 if kind == "v" else stages_per_rank


def in_flight(schedule: str, pp: int, microbatches: int, per_rank: int, pp_rank: int) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak, in units of one
    micro-batch through all of the rank's layers. GPipe (and looped BFS) run every forward first: m.
    1F1B: the warm-up, min(m, p - r). Interleaved and zero bubble (torchtitan's count): a warm-up of
    (p - r - 1) * 2 + (v - 1) * p + 1 chunk forwards, each 1/v of the rank's layers. ZBV: a V's two
    chunks, min(m, p - r) as 1F1B."""
    p, m, v, r = pp, microbatches, per_rank, pp_rank
    if schedule in ("gpipe", "looped_bfs"):
        return float(m)
    if schedule == "1f1b":
        return float(min(m, p - r))
    if schedule == "zbv":
        return float(min(m, p - r))
    return min(v * m, (p - r - 1) * 2 + (v - 1) * p + 1) / v


@dataclass
class RankPlan:
    pp_rank: int
    stages: list[int]
    layers: int  # blocks this rank holds
    params: int  # bytes (on its data-parallel and tensor-parallel rank 0)
    activations: int
    in_flight: float

    @property
    def total(self) -> int:
        return 4 * self.params + self.activations  # parameters, gradients, two AdamW moments


def rank_parameters(cfg: ModelConfig, pp: int, pp_rank: int, schedule: str, per_rank: int = 1,
                    layers_per_stage: Optional[Sequence[int]] = None) -> dict[str, torch.Size]:
    """Names and shapes of the parameters pipeline rank `pp_rank` holds (meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    _, chunks = rank_chunks(model, pp_rank, pp, schedule, per_rank, layers_per_stage)
    from llm.parallel.pipeline import PipelinedModel

    held = PipelinedModel(model, chunks, None, [0], [])
    return {name: p.shape for name, p in held.named_parameters()}


def pipeline_plan(cfg: ModelConfig, pp: int, dp: int, tp: int, schedule: str, microbatches: int,
                  stages_per_rank: int = 1, layers_per_stage: Optional[Sequence[int]] = None, sharded: bool = True,
                  micro_batch: int = 1, seq_len: int = 128, activation_bytes: int = 4,
                  checkpointing: str = "none") -> list[RankPlan]:
    v = virtual_stages(schedule, stages_per_rank)
    n_stages = pp * v
    ranges = split_layers(cfg.n_layers, n_stages, layers_per_stage)
    b = max(1, micro_batch // microbatches)  # one micro-batch
    logits = b * seq_len * cfg.padded_vocab_size * 4 * 2
    per_layer = (activation_estimate(cfg, b, seq_len, activation_bytes, tp, checkpointing) - logits) / cfg.n_layers
    plans = []
    for r in range(pp):
        stages = stage_indices(r, pp, v, schedule)
        shapes = rank_parameters(cfg, pp, r, schedule, v, layers_per_stage)
        params = 4 * sum(local_numel(name, shape, tp, dp if sharded else 1, False) for name, shape in shapes.items())
        layers = sum(len(ranges[i]) for i in stages)
        flying = in_flight(schedule, pp, microbatches, v, r)
        activations = flying * layers * per_layer + (logits if n_stages - 1 in stages else 0)
        plans.append(RankPlan(r, stages, layers, params, int(activations), flying))
    return plans


def plan_lines(option: Any, cfg: ModelConfig, world: int, micro_batch: int, seq_len: int,
               activation_bytes: int = 4) -> tuple[list[str], dict[str, Any]]:
    """The dry run's lines for a Pipeline option, and what it returns (mesh, bytes per rank)."""
    pp, tp = option.stages, option.tensor_parallel
    dp = world // (pp * tp)
    v = virtual_stages(option.schedule, option.stages_per_rank)
    plans = pipeline_plan(cfg, pp, dp, tp, option.schedule, option.microbatches, v, option.layers_per_stage,
                          True, micro_batch, seq_len, activation_bytes, option.activation_checkpointing)
    ranges = split_layers(cfg.n_layers, pp * v, option.layers_per_stage)
    mesh = {"pipeline": pp, "shard (data parallel)": dp, "tensor parallel": tp}
    bubble = bubble_fraction(option.schedule, pp, option.microbatches, v)
    lines = [f"mesh: {' x '.join(f'{k} {n}' for k, n in mesh.items())}",
             f"pipeline: {pp} ranks x {v} stage(s) each, schedule {option.schedule}, {option.microbatches} micro-batches "
             f"of {max(1, micro_batch // option.microbatches)}, bubble {bubble:.1%} ((p-1)/(m+p-1) = "
             f"{bubble_fraction('1f1b', pp, option.microbatches):.1%} without interleaving)"]
    for plan in plans:
        held = []
        for i in plan.stages:
            parts = (["embedding"] if i == 0 else []) + [f"blocks {ranges[i].start}-{ranges[i].stop - 1}"] + \
                (["norm + head"] if i == pp * v - 1 else [])
            held.append(f"stage {i}: {' + '.join(parts)}")
        mib = 2**20
        lines.append(f"pipeline rank {plan.pp_rank} ({'; '.join(held)}): parameters {plan.params / mib:.3f} MiB, "
                     f"gradients {plan.params / mib:.3f} MiB, optimizer state {2 * plan.params / mib:.3f} MiB, "
                     f"activations ~{plan.activations / mib:.3f} MiB ({plan.in_flight:g} micro-batch{'' if plan.in_flight == 1 else 'es'} in flight) "
                     f"(total ~{plan.total / mib:.3f} MiB)")
    return lines, {"mesh": mesh, "bubble": bubble, "params_bytes_per_stage": [p.params for p in plans],
                   "activation_bytes_per_stage": [p.activations for p in plans]}
