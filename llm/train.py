"""The one path a run takes: validate -> instantiate groups -> LightningModule + Trainer -> fit
-> summary.json. `llm-train` (llm/cli/train.py) composes the config and calls `train`."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llm import posttraining
from llm.config import ConfigError, typed, validate
from llm.config.validate import check_input_files, total_ranks
from llm.config.schema import BudgetSchema, DataSchema, LoggerSchema, TrainerSchema
from llm.model import ModelConfig
from llm.parallel.launch import is_rank_zero, launched_externally, spawn_local_ranks, spawned_rank
from llm.scaling.flops import ModelSize, model_size
from llm.tracking.checkpoint_io import AtomicCheckpointIO
from llm.tracking.checkpoints import (PeriodicCheckpoint, branch_checkpoint, checkpoint_step, last_checkpoint,
                                      newest_loadable_checkpoint, require_same_model)
from llm.tracking.guard import LossGuard, fit_with_rollbacks
from llm.tracking.metrics import JsonlLogger, read_metrics
from llm.tracking.preemption import Preempted, PreemptionHandler, requeued_run
from llm.tracking.progress import StepProgressBar
from llm.tracking.run import git_state, group_choices, resolved_config, run_id, write_json
from llm.tracking.throughput import ThroughputMonitor, peak_memory_mib

RUN_FILE = "run.json"  # the unresolved config and group choices, read back by resume=<run>


def budget_steps(budget: BudgetSchema, size: ModelSize, tokens_per_step: int) -> tuple[int, str]:
    """Optimizer steps for the budget, and a line saying how they were derived."""
    if budget.steps is not None:
        return int(budget.steps), f"{budget.steps} steps"
    if budget.tokens is not None:
        tokens, how = budget.tokens, f"{budget.tokens:.3g} tokens"
    elif budget.flops is not None:
        tokens = budget.flops / size.flops_per_token
        how = f"{budget.flops:.3g} FLOPs / {size.flops_per_token:.3g} FLOPs per token = {tokens:.3g} tokens"
    else:
        tokens = budget.tokens_per_param * size.non_embedding
        how = f"{budget.tokens_per_param:g} tokens/param x {size.non_embedding:,} non-embedding params = {tokens:.3g} tokens"
    steps = max(1, math.ceil(tokens / tokens_per_step))
    return steps, f"{how} -> {steps} steps of {tokens_per_step:,} tokens"


def with_vocab(model: ModelConfig, vocab_size: int) -> ModelConfig:
    if model.vocab_size is None:
        return replace(model, vocab_size=vocab_size)
    if model.vocab_size < vocab_size:
        raise ConfigError([f"model.vocab_size={model.vocab_size}: smaller than the tokenizer's vocabulary "
                           f"({vocab_size}); allowed: >= {vocab_size}, or null to take it from the tokenizer"])
    return model


def resume_config(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """For resume=<run>: the run's own config, with this command line's plain key overrides on
    top (e.g. budget.steps to extend it). Changing a group of an existing run is an error."""
    run_dir = Path(cfg.paths.run_dir)
    saved_file = run_dir / RUN_FILE
    if not saved_file.exists():
        raise ConfigError([f"resume={cfg.resume!r}: {run_dir} is not a run directory (no {RUN_FILE})"])
    try:
        saved = json.loads(saved_file.read_text())
        if not isinstance(saved.get("config"), dict) or not isinstance(saved.get("choices"), dict):
            raise ValueError("no config or choices in it")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError([f"resume={cfg.resume!r}: {saved_file} is damaged ({e}), so the run's config is unknown; "
                           "start a new run"]) from e
    refused = [f"{key}._target_={target!r}" for key, target in _targets(saved["config"])
               if not target.startswith(ALLOWED_TARGETS)]
    if refused:
        raise ConfigError([f"{r}: a config read from a run directory may only build objects from "
                           f"{', '.join(ALLOWED_TARGETS)}; refused" for r in refused])
    merged = OmegaConf.create(saved["config"])
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in _command_line_overrides():
        parsed = parser.parse_override(override)  # typed values, as Hydra parses them: 300000 is an int
        key = parsed.key_or_group
        value = None if parsed.is_delete() else parsed.value()
        if key == "resume" or key.startswith("hydra."):
            continue
        if "." not in key and saved["choices"].get(key) == value:
            continue  # the run's own choice, repeated (a requeued job runs its command line again)
        if "." not in key:
            raise ConfigError([f"{key}={value}: a resumed run keeps its groups (it chose {key}="
                               f"{saved['choices'].get(key)!r}); start a new run to change it"])
        OmegaConf.update(merged, key, value, force_add=False)
    merged.resume = cfg.resume
    merged.paths = cfg.paths
    return merged, saved


# What a config read back from disk may instantiate: a crafted run.json must not run arbitrary code.
ALLOWED_TARGETS = ("llm.", "torch.", "pytorch_lightning.", "lightning.")


def _targets(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        found = [(prefix.rstrip("."), str(node["_target_"]))] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{prefix}{key}.")
        return found
    if isinstance(node, list):
        return [t for i, item in enumerate(node) for t in _targets(item, f"{prefix}{i}.")]
    return []


def _command_line_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the summary also written to <run_dir>/summary.json."""
    started = time.time()
    run_dir = Path(cfg.paths.run_dir)
    choices = group_choices(cfg)
    resume_from, corrupt = None, []
    if not cfg.resume and requeued_run(run_dir, RUN_FILE):  # a requeued SLURM job: same run dir, continue it
        cfg.resume = str(run_dir)
    if cfg.resume:
        cfg, saved = resume_config(cfg)
        choices = saved["choices"]
        resume_from, corrupt = newest_loadable_checkpoint(run_dir, set_aside=is_rank_zero())
        if corrupt and resume_from is None:
            raise ConfigError([f"resume={cfg.resume!r}: no checkpoint of the run loads ("
                               + "; ".join(f"{c['path']}: {c['error']}" for c in corrupt)
                               + "); they are set aside as *.corrupt: resume again to start over from step 0, "
                               "or start a new run"])
    parent = reward_model = None
    if posttraining.is_posttrain(cfg):  # the architecture and tokenizer come from init_from
        cfg, parent, reward_model = posttraining.prepare(cfg, _command_line_overrides())
    world = total_ranks(cfg)
    validate(cfg, world_size=world)  # every config problem, before any work
    check_input_files(cfg)  # and the files it names

    model_cfg: ModelConfig = typed(cfg.model, ModelConfig)
    data: DataSchema = typed(cfg.data, DataSchema, drop=("corpus",))
    trainer_cfg: TrainerSchema = typed(cfg.trainer, TrainerSchema)
    logger_cfg: LoggerSchema = typed(cfg.logger, LoggerSchema)
    budget: BudgetSchema = typed(cfg.budget, BudgetSchema)
    parallelism = instantiate(cfg.parallelism)
    if logger_cfg.kind == "wandb":
        from llm.tracking.wandb import resolve_mode

        resolve_mode(logger_cfg.mode)  # fails now, not after the data work, on missing credentials
    if cfg.get("dry_run"):
        return dry_run(cfg, model_cfg, data, trainer_cfg, parallelism, world)
    rid = run_id(run_dir, Path(cfg.paths.runs_dir))
    rank_zero = is_rank_zero()
    say = print if rank_zero else (lambda *a, **k: None)
    if not cfg.resume and not spawned_rank() and last_checkpoint(run_dir) is not None:
        raise ConfigError([f"hydra.run.dir={run_dir}: already holds a run with checkpoints; continue it with "
                           f"resume={run_dir}, or remove it, or choose another directory (nothing was overwritten)"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero:
        if not resume_from:
            write_json(run_dir / RUN_FILE, {"run_id": rid, "choices": choices, "overrides": _command_line_overrides(),
                                            "config": resolved_config(cfg, resolve=False)})
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved_config(cfg)))
    say(f"run {rid}: {run_dir}" + (f" (resuming from {resume_from})" if resume_from else ""))
    for bad in corrupt:
        say(f"checkpoint {bad['path']} does not load ({bad['error']}): set aside as .corrupt, resuming from an older one")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(trainer_cfg.matmul_precision)

    # Data work starts here: corpus, tokenizer (trained once, cached), token caches.
    from llm.data import LMDataModule, build_token_cache
    cache_dir = Path(cfg.paths.cache_dir)
    if parent is None:
        corpus = instantiate(cfg.data.corpus)
        tokenizer = instantiate(cfg.tokenizer)(corpus=corpus, cache_dir=cache_dir)
        train_tokens = build_token_cache(corpus, tokenizer, "train", cache_dir)
        val_tokens = build_token_cache(corpus, tokenizer, "val", cache_dir)
    else:  # post-training: the method's examples, read (and checked) before any rank starts
        from llm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(parent.tokenizer_path)
        method = posttraining.method_class(cfg)
        datamodule, eval_rows, data_line = posttraining.build_data(
            cfg.posttrain.data, method.data_kind, tokenizer, data.seq_len, data.micro_batch_size, data.val_batches)
        say(data_line)
    if world > 1 and not launched_externally():
        # This process has prepared the data; fresh processes run the ranks (they hit the caches).
        say(f"starting {world} ranks ({type(parallelism).__name__})")
        try:
            spawn_local_ranks(world, _command_line_overrides(), run_dir)
        except RuntimeError as e:
            summary_file = run_dir / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"run_id": rid}
            if summary.get("status") != "failed":
                summary.update(status="failed", error=str(e))
                write_json(summary_file, summary)
            raise
        summary = json.loads((run_dir / "summary.json").read_text())
        return _finish_posttrain(cfg, parent, tokenizer, eval_rows, run_dir, summary) if parent else summary

    if rank_zero:
        tokenizer.save(run_dir / "tokenizer.json")
    model_cfg = with_vocab(model_cfg, tokenizer.vocab_size)
    size = model_size(model_cfg, data.seq_len)
    data_parallel = parallelism.data_parallel_size(world)
    global_batch = data.global_batch_size or data.micro_batch_size * data_parallel
    accumulate = global_batch // (data.micro_batch_size * data_parallel)
    tokens_per_step = global_batch * data.seq_len
    steps, budget_line = budget_steps(budget, size, tokens_per_step)
    if parent is None:
        datamodule = LMDataModule(train_tokens.tokens, val_tokens.tokens, data.seq_len, data.micro_batch_size,
                                  seed=cfg.seed, val_batches=data.val_batches)
        data_facts = {"data_fingerprint": corpus.fingerprint(), "train_tokens": train_tokens.n_tokens,
                      "val_tokens": val_tokens.n_tokens, "bytes_per_token": val_tokens.bytes_per_token,
                      "entropy_floor": getattr(corpus, "entropy_rate", None)}
    else:
        data_facts = {**parent.facts(), "posttrain_data": data_line}
    facts = {
        "run_id": rid, "run_dir": str(run_dir), "stage": posttraining.method_class(cfg).stage, "choices": choices,
        "N": size.params, "N_non_embedding": size.non_embedding, "flops_per_token": size.flops_per_token,
        "vocab_size": model_cfg.vocab_size, "world_size": world, "tokens_per_step": tokens_per_step, "steps": steps,
        "budget": budget_line, "budget_flops": budget.flops, "budget_tokens": budget.tokens,
        "budget_tokens_per_param": budget.tokens_per_param, **data_facts,
        **{f"git_{k}": v for k, v in git_state(Path(cfg.paths.root_dir)).items()},
    }
    say(f"model: {size.params:,} parameters ({size.non_embedding:,} non-embedding), "
        f"{size.flops_per_token:.3g} FLOPs/token; budget: {budget_line}")

    extra = {} if parent is None else {"parent": parent, "tokenizer": tokenizer}
    module = instantiate(cfg.posttrain, _convert_="all")(
        model_config=model_cfg, optimizer=instantiate(cfg.optim, _convert_="all"),
        schedule=instantiate(cfg.schedule), parallelism=parallelism,
        total_steps=steps, tokens_per_step=tokens_per_step, flops_per_token=size.flops_per_token,
        gradient_clip=trainer_cfg.gradient_clip_val, **extra,
    )
    if parent is not None:
        posttraining.attach(module, cfg.posttrain.data, tokenizer, reward_model, run_dir)
    if resume_from:
        require_same_model(resume_from, model_cfg)
    resume_step = checkpoint_step(resume_from) if resume_from else -1
    loggers: list = [JsonlLogger(run_dir / "metrics.jsonl", resume_step=resume_step if rank_zero else None)]
    if logger_cfg.kind == "wandb":
        from llm.tracking.wandb import run_config, wandb_logger

        config = run_config(resolved_config(cfg), choices, _command_line_overrides(), facts)
        loggers.append(wandb_logger(logger_cfg, rid, run_dir, module.stage, choices, config, Path(cfg.paths.runs_dir),
                                    tokens_per_step, size.flops_per_token, rank_zero=rank_zero))
        if parent is not None and rank_zero:  # lineage: this stage's input is its parent's checkpoint
            from llm.tracking.wandb import use_parent_artifact

            use_parent_artifact(parent.ref.path, parent.ref.run_dir)
    elif logger_cfg.kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        loggers.append(CSVLogger(run_dir, name="csv", version=""))

    schedule = module.schedule
    branches = schedule.branch_points(steps) if hasattr(schedule, "branch_points") else []
    throughput = ThroughputMonitor(tokens_per_step, size.flops_per_token, window=trainer_cfg.log_every)
    guard_cfg = trainer_cfg.guard
    spike_threshold = guard_cfg.spike_threshold if module.loss_spikes_are_faults else None
    guard = LossGuard(guard_cfg.enabled, guard_cfg.warmup_steps, guard_cfg.window, spike_threshold,
                      guard_cfg.max_rollbacks, guard_cfg.skip_batches)
    checkpoints = PeriodicCheckpoint(run_dir / "checkpoints", trainer_cfg.checkpoint_every,
                                     tuple(start for start, _ in branches), trainer_cfg.keep_last, vet=guard.check_weights)
    callbacks = [guard, checkpoints, throughput]  # the guard first: a bad step is never checkpointed
    artifacts = None
    if logger_cfg.kind == "wandb" and logger_cfg.log_checkpoints:
        from llm.tracking.wandb import CheckpointArtifacts

        artifacts = CheckpointArtifacts(checkpoints, rid)  # after `checkpoints`: logs what it just saved
        callbacks.append(artifacts)
    if trainer_cfg.progress_bar:
        callbacks.append(StepProgressBar())
    callbacks.append(PreemptionHandler(checkpoints, trainer_cfg.preemption.enabled))  # last: after the step's work
    trainer = make_trainer(trainer_cfg, parallelism, world, steps, accumulate, loggers, callbacks, run_dir)
    pristine = copy.deepcopy(module)  # not yet configured: what a rollback starts again from

    def fit(checkpoint: Optional[Path], attempt: int) -> None:
        nonlocal module, trainer
        if attempt:  # after a rollback: a fresh module and trainer, the metrics file cut back to the checkpoint
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            module = copy.deepcopy(pristine)
            step = checkpoint_step(checkpoint) if checkpoint else 0
            loggers[0] = JsonlLogger(run_dir / "metrics.jsonl", resume_step=step if rank_zero else None)
            trainer = make_trainer(trainer_cfg, parallelism, world, steps, accumulate, loggers, callbacks, run_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)

    summary = {**facts, "status": "running"}
    if rank_zero:
        write_json(run_dir / "summary.json", summary)
    try:
        fit_with_rollbacks(fit, guard, datamodule, run_dir, resume_from, rank_zero)
        if trainer.global_step % min(trainer_cfg.val_every, steps):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        checkpoints.save(trainer)
        if artifacts is not None:
            artifacts.log_saved(trainer)
        summary["status"] = "completed"
        for start, end in branches:  # WSD: the shorter runs that share this run's stable phase
            summary.setdefault("branches", []).append(run_branch(
                cfg, facts, start, end, steps, model_cfg, size, parallelism, world, accumulate, tokens_per_step,
                trainer_cfg, datamodule, run_dir, rank_zero))
    except BaseException as e:
        summary.update(status="preempted" if isinstance(e, Preempted) else "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        summary.update(guard.summary(), corrupt_checkpoints=corrupt,
                       best_checkpoint=str(checkpoints.dirpath / "best.ckpt") if checkpoints.best_step >= 0 else None)
        summary.update(final_metrics(run_dir / "metrics.jsonl"), tokens_seen=trainer.global_step * tokens_per_step,
                       steps_done=trainer.global_step, tokens_per_s=throughput.mean_tokens_per_s,
                       peak_memory_mib=peak_memory_mib(trainer.strategy.root_device),
                       wall_seconds=round(time.time() - started, 1))
        summary["C"] = summary["tokens_seen"] * size.flops_per_token
        summary["D"] = summary["tokens_seen"]
        if rank_zero:
            write_json(run_dir / "summary.json", summary)
        _finish_wandb(summary["status"] != "completed")
    if parent is not None and rank_zero and not spawned_rank():
        summary = _finish_posttrain(cfg, parent, tokenizer, eval_rows, run_dir, summary)
    if "val/loss" in summary:
        ppl = f" (ppl {summary['val/ppl']:.1f})" if summary["stage"] in ("pretrain", "sft") else ""
        say(f"done: val/loss {summary['val/loss']:.4f}{ppl} after {summary['D']:,} tokens, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_seconds']:.0f} s -> {run_dir / 'summary.json'}")
    return summary


def _finish_posttrain(cfg: DictConfig, parent: Any, tokenizer: Any, eval_rows: list, run_dir: Path,
                      summary: dict[str, Any]) -> dict[str, Any]:
    """Merged export and before/after evaluation, added to summary.json (rank zero, one process)."""
    if summary.get("status") != "completed":
        return summary
    summary.update(posttraining.finish(cfg, parent, tokenizer, eval_rows, run_dir))
    summary["last_metrics"] = last_values(run_dir / "metrics.jsonl")
    write_json(run_dir / "summary.json", summary)
    return summary


def last_values(path: Path) -> dict[str, Any]:
    """The last logged value of every metric (post-training's rewards, KL, accuracies...)."""
    out: dict[str, Any] = {}
    for record in read_metrics(path):
        out.update({k: v for k, v in record.items() if k != "step"})
    return out


def make_trainer(trainer_cfg: TrainerSchema, parallelism: Any, world: int, steps: int, accumulate: int,
                 loggers: list, callbacks: list, run_dir: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, num_nodes=trainer_cfg.num_nodes,
        strategy=parallelism.strategy(world), precision=trainer_cfg.precision, max_steps=steps,
        val_check_interval=min(trainer_cfg.val_every, steps) * accumulate, check_val_every_n_epoch=None,
        log_every_n_steps=trainer_cfg.log_every, accumulate_grad_batches=accumulate, logger=loggers, callbacks=callbacks,
        enable_progress_bar=trainer_cfg.progress_bar, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], deterministic=trainer_cfg.deterministic,
        default_root_dir=run_dir, use_distributed_sampler=False,
    )


def run_branch(cfg: DictConfig, facts: dict, start: int, end: int, total: int, model_cfg: ModelConfig,
               size: ModelSize, parallelism: Any, world: int, accumulate: int, tokens_per_step: int,
               trainer_cfg: TrainerSchema, datamodule: Any, run_dir: Path, rank_zero: bool) -> dict[str, Any]:
    """Continue from the stable-phase checkpoint at `start` with a decay ending at `end`: one more
    (N, D) point, written as its own run under <run_dir>/branches/ (sweeps and fits find it)."""
    branch_dir = run_dir / "branches" / f"{end:08d}"
    module = instantiate(cfg.posttrain)(
        model_config=model_cfg, optimizer=instantiate(cfg.optim, _convert_="all"),
        schedule=instantiate(cfg.schedule).for_branch(total), parallelism=instantiate(cfg.parallelism),
        total_steps=end, tokens_per_step=tokens_per_step, flops_per_token=size.flops_per_token,
        gradient_clip=trainer_cfg.gradient_clip_val,
    )
    checkpoints = PeriodicCheckpoint(branch_dir / "checkpoints", end)
    loggers = [JsonlLogger(branch_dir / "metrics.jsonl", resume_step=start if rank_zero else None)]
    trainer = make_trainer(trainer_cfg, parallelism, world, end, accumulate, loggers, [checkpoints], branch_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(run_dir / "checkpoints" / branch_checkpoint(start)))
    if trainer.global_step % min(trainer_cfg.val_every, end):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    checkpoints.save(trainer)
    summary = {**facts, **final_metrics(branch_dir / "metrics.jsonl"), "run_id": f"{facts['run_id']}-decay{end}",
               "run_dir": str(branch_dir), "branch_of": facts["run_id"], "branch_start": start, "steps": end,
               "steps_done": trainer.global_step, "status": "completed", "budget": f"WSD branch of {total} steps",
               "budget_flops": None, "D": end * tokens_per_step, "tokens_seen": end * tokens_per_step,
               "C": end * tokens_per_step * size.flops_per_token}
    if rank_zero:
        write_json(branch_dir / "summary.json", summary)
        print(f"branch: decayed at step {end} (left the stable phase at {start}): val/loss {summary.get('val/loss', 0):.4f}")
    return {k: summary.get(k) for k in ("run_id", "steps", "D", "C", "val/loss")}


def dry_run(cfg: DictConfig, model_cfg: ModelConfig, data: DataSchema, trainer_cfg: TrainerSchema, parallelism: Any,
            world: int) -> dict[str, Any]:
    """Print the layout and its per-rank memory without touching data or devices."""
    from llm.config.validate import tokenizer_vocab_size
    from llm.parallel.memory import memory_plan

    if model_cfg.vocab_size is None:
        model_cfg = with_vocab(model_cfg, tokenizer_vocab_size(cfg.tokenizer, load=True))
    size = model_size(model_cfg, data.seq_len)
    half = "bf16" in trainer_cfg.precision or getattr(parallelism, "param_dtype", "float32") != "float32"
    plan = memory_plan(model_cfg, world, parallelism.tensor_parallel, getattr(parallelism, "replicate", None),
                       parallelism.sharded_checkpoints, data.micro_batch_size, data.seq_len, 2 if half else 4,
                       parallelism.activation_checkpointing)
    print(f"dry run: {type(parallelism).__name__} on {world} rank(s); model {size.params:,} parameters")
    for line in plan.lines():
        print(line)
    return {"dry_run": True, "mesh": plan.mesh, "params_bytes": plan.params, "grads_bytes": plan.grads,
            "optimizer_bytes": plan.optimizer, "activation_bytes": plan.activations}


def final_metrics(path: Path) -> dict[str, Any]:
    """The last train and val losses, and the best val loss. A diverged run's last loss is NaN
    (the metrics file writes it as a string), never an earlier finite value passed off as final."""
    records = read_metrics(path)
    val = [float(r["val/loss"]) for r in records if isinstance(r.get("val/loss"), (float, str))]
    train = [float(r["train/loss"]) for r in records if isinstance(r.get("train/loss"), (float, str))]
    out: dict[str, Any] = {}
    if train:
        out["train/loss"] = train[-1]
    if val:
        finite = [v for v in val if math.isfinite(v)]
        out.update({"val/loss": val[-1], "val/ppl": math.exp(min(val[-1], 50)) if math.isfinite(val[-1]) else math.nan,
                    "best_val/loss": min(finite) if finite else math.nan})
    return out


def _finish_wandb(failed: bool) -> None:
    """Always close the W&B run, also on failure, so the next job never reuses it."""
    from llm.tracking.wandb import finish_run

    finish_run(failed)
