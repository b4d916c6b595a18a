"""The typed view of a validated config (Settings) and the step arithmetic derived from it once
(Plan): model size, batch layout, accumulation and the number of optimizer steps of the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

from hydra.utils import instantiate
from omegaconf import DictConfig

from llm.config import ConfigError, typed
from llm.config.schema import BudgetSchema, DataSchema, LoggerSchema, TrainerSchema
from llm.config.validate import total_ranks
from llm.model import ModelConfig
from llm.scaling.flops import ModelSize, model_size


@dataclass(frozen=True)
class Settings:
    """The groups a run reads, as typed objects (after `validate` accepted them)."""

    model: ModelConfig
    data: DataSchema
    trainer: TrainerSchema
    logger: LoggerSchema
    budget: BudgetSchema
    parallelism: Any  # the built option of the parallelism group (llm.parallel)
    world: int  # processes: trainer.devices x trainer.num_nodes

    @classmethod
    def of(cls, cfg: DictConfig) -> Settings:
        return cls(model=typed(cfg.model, ModelConfig), data=typed(cfg.data, DataSchema, drop=("corpus",)),
                   trainer=typed(cfg.trainer, TrainerSchema), logger=typed(cfg.logger, LoggerSchema),
                   budget=typed(cfg.budget, BudgetSchema), parallelism=instantiate(cfg.parallelism),
                   world=total_ranks(cfg))


@dataclass(frozen=True)
class Plan:
    """How long and in what batches a run trains, derived once from the settings and the vocabulary."""

    model: ModelConfig  # with the vocabulary filled in
    size: ModelSize
    global_batch: int  # sequences per optimizer step
    accumulate: int  # micro-batches per rank per optimizer step
    tokens_per_step: int
    steps: int
    budget_line: str  # how the steps were derived, for people

    def facts(self) -> dict[str, Any]:
        """What summary.json and W&B record about the plan. N counts every parameter; an MoE
        model's compute (flops_per_token, the budgets) counts the active ones (params_active)."""
        return {"N": self.size.params, "N_non_embedding": self.size.non_embedding,
                "params_total": self.size.params, "params_active": self.size.active,
                "flops_per_token": self.size.flops_per_token, "vocab_size": self.model.vocab_size,
                "tokens_per_step": self.tokens_per_step, "steps": self.steps, "budget": self.budget_line}


def plan(settings: Settings, vocab_size: int, trained: Optional[dict[str, Any]] = None) -> Plan:
    """`trained`: what a resumed run's checkpoint says was trained ({"step", "tokens", "flops"},
    llm.tracking.tokens): a budget in tokens or FLOPs counts it, even if it was trained in
    another shape (data.seq_len, batch) than the steps still to come."""
    model = with_vocab(settings.model, vocab_size)
    size = model_size(model, settings.data.seq_len)
    data = settings.data
    data_parallel = settings.parallelism.data_parallel_size(settings.world)
    global_batch = data.global_batch_size or data.micro_batch_size * data_parallel
    tokens_per_step = global_batch * data.seq_len
    steps, line = budget_steps(settings.budget, size, tokens_per_step, trained)
    return Plan(model, size, global_batch, global_batch // (data.micro_batch_size * data_parallel), tokens_per_step,
                steps, line)


def budget_steps(budget: BudgetSchema, size: ModelSize, tokens_per_step: int,
                 trained: Optional[dict[str, Any]] = None) -> tuple[int, str]:
    """Optimizer steps for the budget, and a line saying how they were derived. After `trained`
    (a resumed run), a token or FLOP budget's remainder is trained at this run's tokens per step."""
    if budget.steps is not None:
        return int(budget.steps), f"{budget.steps} steps"
    if budget.tokens is not None:
        tokens, how = budget.tokens, f"{budget.tokens:.3g} tokens"
    elif budget.flops is not None:
        tokens = budget.flops / size.flops_per_token
        how = f"{budget.flops:.3g} FLOPs / {size.flops_per_token:.3g} FLOPs per token = {tokens:.3g} tokens"
    else:  # compute follows the parameters a token uses: an MoE model's active ones
        params = size.active_non_embedding
        kind = "active non-embedding" if size.active != size.params else "non-embedding"
        tokens = budget.tokens_per_param * params
        how = f"{budget.tokens_per_param:g} tokens/param x {params:,} {kind} params = {tokens:.3g} tokens"
    if trained:
        done = int(trained["step"])
        if budget.flops is not None:
            left = max(0.0, budget.flops - float(trained["flops"])) / size.flops_per_token
        else:
            left = max(0.0, tokens - float(trained["tokens"]))
        steps = done + math.ceil(left / tokens_per_step)
        return steps, (f"{how}; {float(trained['tokens']):.3g} trained in {done} steps -> {steps} steps, the rest of "
                       f"{tokens_per_step:,} tokens")
    steps = max(1, math.ceil(tokens / tokens_per_step))
    return steps, f"{how} -> {steps} steps of {tokens_per_step:,} tokens"


def with_vocab(model: ModelConfig, vocab_size: int) -> ModelConfig:
    """The model config with the tokenizer's vocabulary, unless the config fixes a larger one."""
    if model.vocab_size is None:
        return replace(model, vocab_size=vocab_size)
    if model.vocab_size < vocab_size:
        raise ConfigError([f"model.vocab_size={model.vocab_size}: smaller than the tokenizer's vocabulary "
                           f"({vocab_size}); allowed: >= {vocab_size}, or null to take it from the tokenizer"])
    return model


def dry_run(cfg: DictConfig, settings: Settings) -> dict[str, Any]:
    """The layout's device mesh and per-rank memory, without touching data or devices."""
    import logging

    from llm.config.validate import tokenizer_vocab_size
    from llm.parallel.memory import memory_plan

    model = settings.model
    if model.vocab_size is None:
        model = with_vocab(model, tokenizer_vocab_size(cfg.tokenizer, load=True))
    size = model_size(model, settings.data.seq_len)
    parallelism = settings.parallelism
    half = "bf16" in settings.trainer.precision or getattr(parallelism, "param_dtype", "float32") != "float32"
    if getattr(parallelism, "pipelined", False):  # per pipeline rank, with its schedule's micro-batches in flight
        from llm.parallel.pipeline_plan import plan_lines

        lines, facts = plan_lines(parallelism, model, settings.world, settings.data.micro_batch_size,
                                  settings.data.seq_len, 2 if half else 4)
        logging.getLogger(__name__).info(f"dry run: pipeline on {settings.world} rank(s); model {size.describe()}")
        for line in lines:
            logging.getLogger(__name__).info(line)
        return {"dry_run": True, **facts}
    layout = memory_plan(model, settings.world, parallelism.tensor_parallel, getattr(parallelism, "replicate", None),
                         parallelism.sharded_checkpoints, settings.data.micro_batch_size, settings.data.seq_len,
                         2 if half else 4, parallelism.activation_checkpointing,
                         expert_parallel=getattr(parallelism, "expert_parallel", 1))
    log = logging.getLogger(__name__)
    log.info(f"dry run: {type(parallelism).__name__} on {settings.world} rank(s); model {size.describe()}")
    for line in layout.lines():
        log.info(line)
    return {"dry_run": True, "mesh": layout.mesh, "params_bytes": layout.params, "grads_bytes": layout.grads,
            "optimizer_bytes": layout.optimizer, "activation_bytes": layout.activations}
