"""Typed schemas of the config groups, registered in Hydra's ConfigStore.

Every group option starts from its schema (train.yaml's defaults list for the plain groups, the
option's own defaults list for the `_target_` groups), so Hydra refuses unknown keys, values of
the wrong type and choices outside an enumeration while it composes, naming the allowed values.
Numeric fields declare their ranges (llm.fields); `llm.config.validate` checks them, and the rules
that span groups, in one pass. `_target_` schemas keep their `_target_` (and `_partial_`), so
`hydra.utils.instantiate` builds the same objects as before.

ConfigStore names: `schema/<group>` for groups with one schema (model, data, trainer, budget,
logger, paths, tokenizer) and `schema/<group>/<option>` for the others (optim, schedule,
parallelism, corpus, posttrain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from llm.config.methods import METHODS, PostTrainDataSchema  # noqa: F401  (PostTrainDataSchema: for callers)
from llm.fields import Choice, at_least, choices, positive, unit_interval
from llm.model.config import MAX_LAYERS, MAX_SEQ_LEN, MAX_VOCAB, ModelConfig

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are 32-bit
MAX_BATCH = 2**20
MAX_RANKS = 2**16

# Lightning's precision names (its integer aliases such as 32 are left out: a Choice is a string).
Precision = choices("Precision", ("32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "64-true"), __name__)
PRECISIONS = Precision.values()


class Accelerator(Choice):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"
    tpu = "tpu"


class MatmulPrecision(Choice):  # torch.set_float32_matmul_precision
    highest = "highest"
    high = "high"  # TF32 on Ampere+
    medium = "medium"


class LoggerKind(Choice):
    wandb = "wandb"
    csv = "csv"
    tensorboard = "tensorboard"
    none = "none"


class WandbMode(Choice):
    auto = "auto"  # online when credentials exist, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


LOGGERS, WANDB_MODES = LoggerKind.values(), WandbMode.values()


class TokenizerKind(Choice):
    bpe = "bpe"
    unigram = "unigram"
    wordpiece = "wordpiece"
    byte = "byte"
    pretrained = "pretrained"


class DecayShape(Choice):
    linear = "linear"
    sqrt = "sqrt"
    cosine = "cosine"


class CheckpointMode(Choice):  # activation checkpointing
    none = "none"
    full = "full"
    every_n = "every_n"


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# --- plain groups -------------------------------------------------------------------------------


@dataclass
class SourceSchema:
    """One source of `data.sources` (data=mixture): a corpus node, as `data.corpus`, and its share."""

    weight: float = 1.0  # relative share of training tokens (finite, >= 0; normalised over the sources)
    corpus: Any = None  # a `_target_` node, typed by its corpus schema (below)


@dataclass
class TokenizeSchema:
    """`data.tokenize`: how text becomes the token cache (llm.data.token_shards). Neither key changes
    the tokens, so neither is part of the cache key: a cache built one way is reused by the other."""

    workers: int = at_least(1, 1, high=256)  # processes encoding shards at once (1: this process)
    shard_mb: float = positive(16.0, high=4096)  # MiB of text per shard file: one worker's unit of work


@dataclass
class DataSchema:
    corpus: Any = None  # a `_target_` node, typed by its option's corpus schema (below)
    # data=mixture: named sources trained on by weight, each validated on its own (val/loss/<name>);
    # with sources, data.corpus is null
    sources: dict[str, SourceSchema] = field(default_factory=dict)
    seq_len: int = at_least(1, 128, high=MAX_SEQ_LEN)
    micro_batch_size: int = at_least(1, 16, high=MAX_BATCH)
    global_batch_size: Optional[int] = at_least(1, None, high=2**30, null="for micro_batch_size x data-parallel ranks")
    val_batches: Optional[int] = at_least(0, 8, null="for the whole val split")  # 0: no validation
    tokenize: TokenizeSchema = field(default_factory=TokenizeSchema)


@dataclass
class GuardSchema:
    """`trainer.guard`: the loss-spike and NaN guard (llm.tracking.guard)."""

    enabled: bool = True
    # steps observed before spikes are judged (a non-finite loss always is); with none observed
    # there is no mean to spike above, and every loss would be a spike
    warmup_steps: int = at_least(1, 20)
    window: int = at_least(1, 50)  # span, in steps, of the moving mean and deviation of the loss
    # a spike: loss > mean + this x deviation
    spike_threshold: Optional[float] = positive(6.0, null="to judge only non-finite losses")
    max_rollbacks: int = at_least(0, 3)  # more bad steps than this stop the run
    skip_batches: list[int] = at_least(0, factory=list)  # micro-batch indices left out from the start


@dataclass
class PreemptionSchema:
    """`trainer.preemption`: SIGTERM/SIGUSR1 -> checkpoint, exit code 75 (llm.tracking.preemption)."""

    enabled: bool = True
    requeue: bool = True  # under SLURM: `scontrol requeue` the job, which then resumes by itself


@dataclass
class DownstreamSchema:
    """`trainer.downstream`: downstream evaluation during training (llm.tracking.downstream)."""

    every: int = at_least(0, 0)  # steps between evaluations (and one before the first step); 0: none
    # built-in multiple-choice tasks (llm.data.tasks: addition, sorting, copying, counting), scored
    # by log-likelihood: eval/<task>/acc and acc_norm; with data=tasks, on the corpus's held-out prompts
    tasks: list[str] = field(default_factory=list)
    questions: int = at_least(1, 64)  # per built-in task
    choices: int = at_least(2, 4)  # per question: the answer and choices - 1 corruptions of it
    harness: list[str] = field(default_factory=list)  # lm-evaluation-harness task names (the `eval` extra)
    harness_include: Optional[str] = None  # a folder of harness task YAMLs beside the harness's own
    harness_limit: Optional[int] = at_least(1, None, null="for every document of each harness task")
    batch_size: int = at_least(1, 16)  # sequences per forward


@dataclass
class TrainerSchema:
    accelerator: Accelerator = Accelerator.auto
    devices: int = at_least(1, 1, high=MAX_RANKS)  # processes (devices) per node
    num_nodes: int = at_least(1, 1, high=MAX_RANKS)
    precision: Precision = Precision["32-true"]  # type: ignore[valid-type]
    # gradients clipped to this total norm; a negative one would train by gradient ascent
    gradient_clip_val: Optional[float] = at_least(0, 1.0, null="for no clipping (as does 0)")
    val_every: int = at_least(1, 100)  # steps between validations
    log_every: int = at_least(1, 10)  # steps between train metric records
    checkpoint_every: int = at_least(1, 100)  # steps between checkpoints (last.ckpt)
    keep_last: int = at_least(1, 2)  # checkpoints kept (last.ckpt and step-N.ckpt), plus the best by val/loss
    guard: GuardSchema = field(default_factory=GuardSchema)
    preemption: PreemptionSchema = field(default_factory=PreemptionSchema)
    downstream: DownstreamSchema = field(default_factory=DownstreamSchema)
    progress_bar: bool = True
    matmul_precision: MatmulPrecision = MatmulPrecision.high
    deterministic: bool = False


@dataclass
class BudgetSchema:
    """How long to train: exactly one of steps, tokens, flops, tokens_per_param."""

    steps: Optional[int] = at_least(1, None, null="when another budget key is set")
    tokens: Optional[float] = positive(None, null="when another budget key is set")
    flops: Optional[float] = positive(None, null="when another budget key is set")
    tokens_per_param: Optional[float] = positive(None, null="when another budget key is set")


@dataclass
class LoggerSchema:
    kind: LoggerKind = LoggerKind.wandb
    project: str = "llm"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None
    log_checkpoints: bool = False
    also: list[LoggerKind] = field(default_factory=list)  # more loggers beside `kind`: logger.also=[tensorboard,csv]


@dataclass
class PathsSchema:
    root_dir: str = "."
    runs_dir: str = "runs"
    cache_dir: str = ".cache"
    run_dir: str = "."


@dataclass
class RunSchema:
    """The top-level keys of conf/train.yaml besides the groups (checked in validate)."""

    seed: int = at_least(0, 1337, high=MAX_SEED)
    resume: Optional[str] = None
    resume_new_data: bool = False  # continue a resumed run although its corpus or tokenizer changed
    dry_run: bool = False
    init_from: Optional[str] = None
    experiment_name: Optional[str] = None


# --- `_target_` groups --------------------------------------------------------------------------


@dataclass
class TokenizerSchema:
    _target_: str = "llm.tokenizer.build_tokenizer"
    _partial_: bool = True
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: Optional[int] = at_least(1, None, high=MAX_VOCAB, null="for the kinds not trained (byte, pretrained)")
    min_frequency: int = at_least(0, 2)  # pairs seen fewer times are not merged
    path: Optional[str] = None  # kind=pretrained: a tokenizer.json or the folder holding one
    max_training_bytes: Optional[int] = at_least(1, None, null="for the whole training split")


@dataclass
class AdamWSchema:
    """AdamW (torch.optim.AdamW); weight decay applies to matrices only (llm.stages.optim)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = positive(3e-3, high=1.0)  # Adam moves each weight by about lr per step
    betas: list[float] = unit_interval(high_open=True, factory=lambda: [0.9, 0.95])
    eps: float = positive(1e-8, high=1.0)  # a floor under sqrt(v): above 1 it swamps every update
    weight_decay: float = at_least(0, 0.1)
    fused: Optional[bool] = None  # null: fused where the device supports it


@dataclass
class ConstantSchema:
    _target_: str = "llm.stages.schedule.Constant"
    # warmup: a fraction of the run (< 1) or a number of steps (>= 1; no run here takes 10^9 steps)
    warmup: float = at_least(0, 0.05, high=1e9)


@dataclass
class CosineSchema(ConstantSchema):
    _target_: str = "llm.stages.schedule.Cosine"
    min_lr_ratio: float = unit_interval(0.1)  # the last step's lr / lr


@dataclass
class WSDSchema(ConstantSchema):
    _target_: str = "llm.stages.schedule.WSD"
    decay_fraction: float = unit_interval(0.2)
    min_lr_ratio: float = unit_interval(0.0)
    decay_shape: DecayShape = DecayShape.linear
    # extra decays ending at these fractions of the run (one (N, D) point each)
    branches: list[float] = unit_interval(low_open=True, high_open=True, factory=list)


@dataclass
class SingleSchema:
    _target_: str = "llm.parallel.Single"
    activation_checkpointing: CheckpointMode = CheckpointMode.none
    checkpoint_every_n: int = at_least(1, 2, high=MAX_LAYERS)  # every_n: every n-th block
    compile: bool = False


@dataclass
class DDPSchema(SingleSchema):
    _target_: str = "llm.parallel.DDP"
    find_unused_parameters: bool = False
    expert_parallel: int = at_least(1, 1, high=MAX_RANKS)  # ranks the MoE experts are split over (1: off)


@dataclass
class FSDPSchema(SingleSchema):
    """fsdp, fsdp_tp and hsdp: FSDP2 over the data-parallel ranks, optionally TP and replicas."""

    _target_: str = "llm.parallel.FSDP"
    tensor_parallel: int = at_least(1, 1, high=MAX_RANKS)
    replicate: Optional[int] = at_least(1, None, high=MAX_RANKS, null="for no replicas (plain FSDP)")
    reshard_after_forward: bool = True
    param_dtype: DType = DType.float32
    reduce_dtype: DType = DType.float32
    cpu_offload: bool = False
    expert_parallel: int = at_least(1, 1, high=MAX_RANKS)  # ranks the MoE experts are split over (1: off)


# torch.distributed.pipelining's schedules, by the names `parallelism.pipeline.schedule` takes
PipelineScheduleName = choices("PipelineScheduleName", ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs",
                                                        "interleaved_zb", "zbv"), __name__)


@dataclass
class PipelineStagesSchema:
    """`parallelism.pipeline`: stages (pipeline ranks), micro-batches per batch, the schedule,
    virtual stages per rank (interleaved schedules) and an optional uneven split of the layers."""

    stages: int = at_least(1, 2, high=MAX_RANKS)
    microbatches: int = at_least(1, 4, high=MAX_BATCH)
    schedule: PipelineScheduleName = PipelineScheduleName("1f1b")
    stages_per_rank: int = at_least(1, 1, high=MAX_LAYERS)  # interleaved_1f1b, looped_bfs, interleaved_zb: >= 2
    # blocks of each stage (pp x stages_per_rank counts); null: an even split
    layers_per_stage: Optional[list[int]] = at_least(1, None, high=MAX_LAYERS, null="for an even split")


@dataclass
class PipelineSchema(FSDPSchema):
    """pp, pp_fsdp, pp_fsdp_tp: pipeline stages x FSDP2 x tensor parallelism (llm.parallel.pipeline)."""

    _target_: str = "llm.parallel.pipeline.Pipeline"
    pipeline: PipelineStagesSchema = field(default_factory=PipelineStagesSchema)


# `data.corpus` options.
@dataclass
class StdlibCorpusSchema:
    _target_: str = "llm.data.StdlibCorpus"
    val_fraction: float = unit_interval(0.05, low_open=True, high_open=True)
    max_bytes: Optional[int] = at_least(1, 8_000_000, null="for all of it")
    root: Optional[str] = None  # null: this Python's standard library


@dataclass
class TextCorpusSchema:
    _target_: str = "llm.data.TextCorpus"
    paths: Any = "???"  # a glob or a list of them (??? : required)
    val_fraction: float = unit_interval(0.05, low_open=True, high_open=True)
    max_bytes: Optional[int] = at_least(1, None, null="for all of it")


@dataclass
class HFCorpusSchema:
    _target_: str = "llm.data.HFCorpus"
    name: str = "???"  # required
    column: str = "text"
    split: str = "train"
    config_name: Optional[str] = None
    val_fraction: float = unit_interval(0.05, low_open=True, high_open=True)
    streaming: bool = False
    max_documents: Optional[int] = at_least(1, 100_000, null="for all of them")


@dataclass
class SyntheticCorpusSchema:
    _target_: str = "llm.data.SyntheticCorpus"
    n_symbols: int = at_least(2, 16, high=62)  # letters and digits
    branching: int = at_least(2, 3, high=62)  # successors per symbol (<= n_symbols)
    n_documents: int = at_least(1, 200, high=2**24)
    doc_length: int = at_least(1, 2048, high=2**24)
    val_documents: int = at_least(1, 20, high=2**24)
    seed: int = at_least(0, 0, high=MAX_SEED)


@dataclass
class TaskCorpusSchema:
    _target_: str = "llm.data.tasks.TaskCorpus"
    tasks: dict[str, Any] = field(default_factory=dict)  # task -> its knobs (checked by building the task)
    seed: int = at_least(0, 0, high=MAX_SEED)
    val_fraction: float = unit_interval(0.1, low_open=True, high_open=True)
    weights: dict[str, float] = field(default_factory=dict)  # task -> relative frequency; {}: uniform
    n_documents: int = at_least(1, 200, high=2**24)
    val_documents: int = at_least(1, 20, high=2**24)
    samples_per_document: int = at_least(1, 64, high=2**20)


@dataclass
class TokenFilesSchema:
    _target_: str = "llm.data.token_files.TokenFiles"
    train: str = "???"  # a flat file of token ids: raw (nanoGPT, OLMo), llm.c .bin or .npy (required)
    val: str = "???"
    dtype: Optional[str] = None  # uint16 | uint32 for raw ids (null: from the file's header or <file>.json)


# Plain (non-`_target_`) nodes and their schemas.
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataSchema,
    "trainer": TrainerSchema,
    "budget": BudgetSchema,
    "logger": LoggerSchema,
    "paths": PathsSchema,
}

# `_target_` nodes: the schema of each target our options build (llm.config.validate types a node
# by its `_target_`; an unknown target is checked against its signature instead).
TARGET_GROUPS: dict[str, dict[str, type]] = {
    "tokenizer": {"tokenizer": TokenizerSchema},
    "optim": {"adamw": AdamWSchema},
    "schedule": {"constant": ConstantSchema, "cosine": CosineSchema, "wsd": WSDSchema},
    "parallelism": {"single": SingleSchema, "ddp": DDPSchema, "fsdp": FSDPSchema, "pp": PipelineSchema},
    "data.corpus": {"stdlib": StdlibCorpusSchema, "text": TextCorpusSchema, "hf": HFCorpusSchema,
                    "synthetic": SyntheticCorpusSchema, "tasks": TaskCorpusSchema,
                    "tokens": TokenFilesSchema},
    "posttrain": METHODS,
}
TARGET_NODES = tuple(TARGET_GROUPS)
TARGET_SCHEMAS: dict[str, type] = {s._target_: s for group in TARGET_GROUPS.values() for s in group.values()}

TOP_LEVEL_KEYS = (*SCHEMAS, "sweep", *(k for k in TARGET_NODES if "." not in k), "seed", "resume", "experiment_name",
                  "dry_run", "init_from", "resume_new_data")


def register() -> None:
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)
    store.store(group="schema", name="tokenizer", node=TokenizerSchema)
    for group, options in TARGET_GROUPS.items():
        if group != "tokenizer":
            for name, schema in options.items():  # e.g. schema/corpus/stdlib, schema/posttrain/ppo
                store.store(group=f"schema/{group.split('.')[-1]}", name=name, node=schema)


register()
