"""Cross-group rules of pipeline parallelism (`parallelism=pp|pp_fsdp|pp_fsdp_tp`): the mesh, the
layer split, the schedule's micro-batches, and the combinations the pipeline does not support,
each named with its key, value and what to write instead (`llm.config.validate` collects them)."""

from __future__ import annotations

from typing import Any

from llm.config.methods import PretrainConfig
from llm.fields import plain

# schedule -> how many stages each rank runs ("one", "many": stages_per_rank >= 2, "v": two, in a V)
SCHEDULE_KINDS = {"gpipe": "one", "1f1b": "one", "interleaved_1f1b": "many", "looped_bfs": "many",
                  "interleaved_zb": "many", "zbv": "v"}


def pipeline_degree(parallelism: Any) -> int:
    """Pipeline stages of the parallelism option (1 without a pipeline)."""
    pipeline = getattr(parallelism, "pipeline", None)
    return int(getattr(pipeline, "stages", 1) or 1) if pipeline is not None else 1


def pipeline_problems(t: Any, world: int) -> list[str]:
    pipeline = getattr(t.parallelism, "pipeline", None)
    if pipeline is None:
        return []
    pp, m, v = pipeline.stages, pipeline.microbatches, pipeline.stages_per_rank
    schedule = str(plain(pipeline.schedule))
    tp = getattr(t.parallelism, "tensor_parallel", 1) or 1
    model, data = t.model, t.data
    problems = []
    if world % (pp * tp):
        problems.append(f"parallelism.pipeline.stages={pp}: the {world} ranks (trainer.devices x trainer.num_nodes) "
                        f"must be pipeline stages x data parallel x tensor parallel = {pp} x dp x {tp}; give "
                        f"trainer.devices x trainer.num_nodes a multiple of {pp * tp}, or other stages")
    kind = SCHEDULE_KINDS[schedule]
    if kind == "many" and v < 2:
        problems.append(f"parallelism.pipeline.stages_per_rank={v} with parallelism.pipeline.schedule={schedule}: "
                        "an interleaved schedule runs several virtual stages per rank; allowed: 2 or more "
                        "(or schedule=gpipe or 1f1b)")
    elif kind == "one" and v != 1:
        problems.append(f"parallelism.pipeline.stages_per_rank={v} with parallelism.pipeline.schedule={schedule}: "
                        "this schedule runs one stage per rank; allowed: 1, or schedule=interleaved_1f1b, "
                        "looped_bfs or interleaved_zb")
    n_stages = pp * (1 if kind == "one" else 2 if kind == "v" else max(v, 1))
    layers = pipeline.layers_per_stage
    if layers:
        if len(layers) != n_stages or sum(layers) != model.n_layers or min(layers) < 1:
            problems.append(f"parallelism.pipeline.layers_per_stage={list(layers)}: needs {n_stages} counts (stages "
                            f"{pp} x {n_stages // pp} per rank), each >= 1, summing to model.n_layers="
                            f"{model.n_layers}; or null for an even split")
    elif model.n_layers % n_stages:
        problems.append(f"parallelism.pipeline.stages={pp}: model.n_layers={model.n_layers} is not divisible by the "
                        f"{n_stages} stages ({pp} ranks x {n_stages // pp} per rank); allowed: stages whose product "
                        f"divides it, or give parallelism.pipeline.layers_per_stage (e.g. an uneven split)")
    if data.micro_batch_size % m:
        problems.append(f"parallelism.pipeline.microbatches={m}: must divide data.micro_batch_size="
                        f"{data.micro_batch_size} (each rank's batch is split into micro-batches); allowed: "
                        f"{', '.join(str(d) for d in range(1, data.micro_batch_size + 1) if data.micro_batch_size % d == 0)}")
    if schedule in ("1f1b", "zbv") and m < pp:
        problems.append(f"parallelism.pipeline.microbatches={m} with schedule={schedule}: needs at least as many "
                        f"micro-batches as pipeline stages ({pp}); allowed: >= {pp}")
    if kind == "many" and m % max(1, m // pp):
        problems.append(f"parallelism.pipeline.microbatches={m} with schedule={schedule}: must be a multiple of its "
                        f"rounds (micro-batches // stages = {m // pp}); allowed: a multiple of {pp}, or fewer than {pp}")
    if pp > 1 and model.tie_embeddings:
        problems.append("model.tie_embeddings=true with parallelism.pipeline.stages>1: the embedding (first stage) and "
                        "the LM head (last stage) would share one weight across ranks; set model.tie_embeddings=false")
    if model.moe.enabled:
        problems.append(f"parallelism.pipeline with model.moe.n_experts={model.moe.n_experts}: the router losses and "
                        "balancing of MoE layers are not carried across pipeline stages; allowed: a dense model, or "
                        "parallelism=ddp, fsdp or hsdp for MoE")
    if getattr(t.parallelism, "expert_parallel", 1) > 1:
        problems.append(f"parallelism.expert_parallel={t.parallelism.expert_parallel} with a pipeline: not supported; "
                        "set parallelism.expert_parallel=1")
    if getattr(t.parallelism, "replicate", None) is not None:
        problems.append(f"parallelism.replicate={t.parallelism.replicate} with a pipeline: hybrid sharding is not "
                        "composed with pipeline stages; set parallelism.replicate=null")
    if t.trainer.downstream.every:
        problems.append(f"trainer.downstream.every={t.trainer.downstream.every} with parallelism.pipeline: downstream "
                        "tasks score the whole model in one forward, which no pipeline rank holds; set "
                        "trainer.downstream.every=0 (and score a checkpoint afterwards with llm-eval)")
    if t.method is not None and not isinstance(t.method, PretrainConfig):
        problems.append("posttrain (a post-training method) with parallelism.pipeline: only pretraining (posttrain=none) "
                        "runs under pipeline parallelism; allowed: parallelism=single, ddp, fsdp, fsdp_tp or hsdp")
    return problems
