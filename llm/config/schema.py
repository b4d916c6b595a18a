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
class TrainerSchema:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = 1.0
    val_every: int = 100  # steps between validations
    log_every: int = 10  # steps between train metric records
    checkpoint_every: int = 100  # steps between checkpoints (last.ckpt)
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
    run_dir: str = "."


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

TOP_LEVEL_KEYS = (*SCHEMAS, "sweep", *(k for k in TARGET_NODES if "." not in k), "seed", "resume", "experiment_name", "dry_run")


def register() -> None:
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)


register()
