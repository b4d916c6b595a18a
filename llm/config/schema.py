"""Typed schemas of the config groups, registered in Hydra's ConfigStore under `schema/<group>`.

Groups whose options build an object through `_target_` (tokenizer, data.corpus, optim,
schedule, parallelism, posttrain) are checked against the signature of that target instead:
the callable is the schema. Everything here is plain data; `llm.config.validate` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from llm.model.config import ModelConfig

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class DataSchema:
    corpus: Any = None  # a `_target_` node: checked against its constructor's signature
    seq_len: int = 128
    micro_batch_size: int = 16
    global_batch_size: Optional[int] = None  # None: micro_batch_size x data-parallel ranks
    val_batches: Optional[int] = 8


@dataclass
class GuardSchema:
    """`trainer.guard`: the loss-spike and NaN guard (llm.tracking.guard)."""

    enabled: bool = True
    warmup_steps: int = 20  # steps observed before spikes are judged (a non-finite loss always is)
    window: int = 50  # span, in steps, of the moving mean and deviation of the loss
    spike_threshold: Optional[float] = 6.0  # a spike: loss > mean + this x deviation; null: NaN/inf only
    max_rollbacks: int = 3  # more bad steps than this stop the run
    skip_batches: list[int] = field(default_factory=list)  # micro-batch indices left out from the start


@dataclass
class PreemptionSchema:
    """`trainer.preemption`: SIGTERM/SIGUSR1 -> checkpoint, exit code 75 (llm.tracking.preemption)."""

    enabled: bool = True
    requeue: bool = True  # under SLURM: `scontrol requeue` the job, which then resumes by itself


@dataclass
class TrainerSchema:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = 1.0
    val_every: int = 100  # steps between validations
    log_every: int = 10  # steps between train metric records
    checkpoint_every: int = 100  # steps between checkpoints (last.ckpt)
    keep_last: int = 2  # checkpoints kept (last.ckpt and step-N.ckpt), plus the best by val/loss
    guard: GuardSchema = field(default_factory=GuardSchema)
    preemption: PreemptionSchema = field(default_factory=PreemptionSchema)
    progress_bar: bool = True
    matmul_precision: str = "high"  # torch.set_float32_matmul_precision (TF32 on Ampere+)
    deterministic: bool = False


@dataclass
class BudgetSchema:
    """How long to train: exactly one of steps, tokens, flops, tokens_per_param."""

    steps: Optional[int] = None
    tokens: Optional[float] = None
    flops: Optional[float] = None
    tokens_per_param: Optional[float] = None


@dataclass
class LoggerSchema:
    kind: str = "wandb"
    project: str = "llm"
    entity: Optional[str] = None
    mode: str = "auto"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None
    log_checkpoints: bool = False


@dataclass
class PathsSchema:
    root_dir: str = "."
    runs_dir: str = "runs"
    cache_dir: str = ".cache"
    run_dir: Optional[str] = "."  # None only under `--cfg job --resolve` (no run has started)


def _default_tasks() -> dict[str, Any]:
    return {"addition": {"max_digits": 2}, "sorting": {"max_length": 4}, "copying": {"max_length": 5},
            "counting": {"max_length": 6}}


@dataclass
class PostTrainDataSchema:
    """`posttrain.data`: the examples of a post-training method (TRL's formats, or the tasks)."""

    source: str = "tasks"  # tasks (the embedded synthetic tasks) | path/to/rows.jsonl | hf:NAME
    val_source: Optional[str] = None  # held-out rows; null: the val split of the tasks / val_fraction of source
    format: Optional[str] = None  # null: detected from the keys of the rows
    hf_split: str = "train"
    val_fraction: float = 0.1
    tasks: dict[str, Any] = field(default_factory=_default_tasks)  # task -> difficulty knobs
    n_train: int = 4096  # task rows drawn for training
    n_val: int = 256  # held-out task rows
    seed: int = 0
    packing: bool = False  # SFT: several examples per row, attention kept inside each
    chat_turn: str = "{role}: {content}\n"  # how one message of a `messages` row is rendered
    generation_prompt: Optional[str] = None  # appended after a chat prompt, e.g. "assistant: "
    max_prompt_length: int = 64  # prompt-only rows (PPO/GRPO): longer prompts are dropped
    partial_reward: bool = False  # the tasks' checker gives partial credit instead of 0/1
    eval_prompts: int = 256  # held-out prompts answered greedily before and after training
    eval_max_new_tokens: int = 16


# Plain (non-`_target_`) nodes and their schemas; `llm.config.validate` merges each into its schema.
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataSchema,
    "trainer": TrainerSchema,
    "budget": BudgetSchema,
    "logger": LoggerSchema,
    "paths": PathsSchema,
}

# `_target_` nodes, checked against the target's signature.
TARGET_NODES = ("tokenizer", "data.corpus", "optim", "schedule", "parallelism", "posttrain")

TOP_LEVEL_KEYS = (*SCHEMAS, "sweep", *(k for k in TARGET_NODES if "." not in k), "seed", "resume", "experiment_name", "dry_run",
                  "init_from")


def register() -> None:
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)
    from llm.model.lora import LoRAConfig

    # Sections of the posttrain options (which are `_target_` nodes, checked by signature).
    store.store(group="schema", name="posttrain_data", node=PostTrainDataSchema)
    store.store(group="schema", name="posttrain_lora", node=LoRAConfig)


register()
