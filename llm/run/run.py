"""Run: one run directory, from its first file to its last summary.

A Run owns the directory (claimed by `start`; a refused or dry run leaves none), resume and SLURM
requeue, run.json and config.yaml, the loggers and callbacks, the fit with the loss guard's
rollbacks and preemption, the WSD branches, and summary.json's lifecycle (running -> completed |
failed | preempted | interrupted). Whatever is specific to a stage comes from its Recipe
(llm/recipes), the same for the main fit, every rollback and every branch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from llm.config import ConfigError
from llm.parallel.launch import is_rank_zero, launched_externally, spawn_local_ranks, spawned_rank
from llm.recipes import Recipe, StageData
from llm.run.layout import RunDir, branch_checkpoint
from llm.run.plan import Plan, Settings
from llm.run.lock import RunLock
from llm.run.resume import (ConfiguredHyperparameters, check_same_data, command_line_overrides, refuse_spent_budget,
                            resume_config)
from llm.checkpoint import checkpoint_step, last_checkpoint, load_meta, newest_loadable_checkpoint, require_same_model
from llm.checkpoint.save import AtomicCheckpointIO
from llm.files import write_json
from llm.tracking.checkpoints import PeriodicCheckpoint
from llm.tracking.downstream import downstream_callback
from llm.tracking.guard import LossGuard, fit_with_rollbacks
from llm.tracking.loggers import csv_logger, logger_kinds, tensorboard_logger, uses
from llm.tracking.metrics import JsonlLogger, read_metrics
from llm.tracking.preemption import PreemptionHandler, requeued_run
from llm.tracking.progress import progress_callback
from llm.tracking.run import git_state, group_choices, redact_secrets, redact_yaml_files, resolved_config, run_id
from llm.tracking.throughput import ThroughputMonitor, peak_memory_mib
from llm.tracking.tokens import TokenCount

log = logging.getLogger(__name__)

HYDRA_OUTPUT = ".hydra"  # what Hydra writes into a job's directory before the run starts


@dataclass
class RunCallbacks:
    """The callbacks of every run, in the order they must run: the optimizer settings this run
    was given (over a resumed checkpoint's), the token count (D and C, kept in checkpoints), the
    loss guard (a bad step is never checkpointed), checkpoints, throughput, W&B artifacts (after
    the checkpoint they log), progress, and preemption last (after the step's work)."""

    tokens: TokenCount
    guard: LossGuard
    checkpoints: PeriodicCheckpoint
    throughput: ThroughputMonitor
    artifacts: Optional[pl.Callback]
    all: list[pl.Callback]

    @classmethod
    def build(cls, settings: Settings, plan: Plan, run_dir: RunDir, run_id: str, spikes_are_faults: bool,
              branch_starts: tuple[int, ...] = (), optim: Optional[dict] = None) -> RunCallbacks:
        t = settings.trainer
        g = t.guard
        guard = LossGuard(g.enabled, g.warmup_steps, g.window, g.spike_threshold if spikes_are_faults else None,
                          g.max_rollbacks, g.skip_batches)
        checkpoints = PeriodicCheckpoint(run_dir.checkpoints, t.checkpoint_every, branch_starts, t.keep_last,
                                         vet=guard.check_weights)
        throughput = ThroughputMonitor(plan.tokens_per_step, plan.size.flops_per_token, window=t.log_every)
        artifacts = None
        if uses(settings.logger, "wandb") and settings.logger.log_checkpoints:
            from llm.tracking.wandb import CheckpointArtifacts

            artifacts = CheckpointArtifacts(checkpoints, run_id)
        progress = progress_callback(t.progress_bar, t.log_every)
        tokens = TokenCount(plan.tokens_per_step, plan.size.flops_per_token)
        ordered = [ConfiguredHyperparameters(optim or {}), tokens, guard, checkpoints, throughput, artifacts, progress,
                   PreemptionHandler(checkpoints, t.preemption.enabled)]
        return cls(tokens, guard, checkpoints, throughput, artifacts, [c for c in ordered if c is not None])


class Run:
    """The lifecycle of one run directory. Construct it first: for `resume=` (or a requeued SLURM
    job) `cfg` becomes the run's own config from its run.json, with the command line on top."""

    def __init__(self, cfg: DictConfig):
        self.dir = RunDir(cfg.paths.run_dir)
        self.overrides = command_line_overrides()
        self.choices = group_choices(cfg)
        self.rank_zero = is_rank_zero()
        self.started = time.time()
        self.resume_from: Optional[Path] = None
        self.corrupt: list[dict] = []
        if not cfg.resume and requeued_run(self.dir.path, self.dir.run_file.name):
            cfg.resume = str(self.dir.path)  # a requeued SLURM job: same run directory, continue it
        if cfg.resume:
            cfg, saved = resume_config(cfg, self.overrides)
            self.choices = saved["choices"]
            self.resume_from, self.corrupt = newest_loadable_checkpoint(self.dir.path, set_aside=self.rank_zero)
            if self.corrupt and self.resume_from is None:
                raise ConfigError([f"resume={cfg.resume!r}: no checkpoint of the run loads ("
                                   + "; ".join(f"{c['path']}: {c['error']}" for c in self.corrupt)
                                   + "); they are set aside as *.corrupt: resume again to start over from step 0, "
                                   "or start a new run"])
        self.cfg = cfg
        self.id = run_id(self.dir.path, Path(cfg.paths.runs_dir))
        self.lock = RunLock(self.dir)

    # ---- before training --------------------------------------------------------------------

    def start(self, cfg: DictConfig, settings: Settings) -> None:
        """Claim the directory: lock it (refusing one another process runs in, or that holds
        another run's checkpoints), redact what Hydra wrote into it, and seed everything."""
        if not spawned_rank() and self.rank_zero:  # a launcher's ranks run under its lock
            self.lock.acquire()
        if not cfg.resume and not spawned_rank() and last_checkpoint(self.dir.path) is not None:
            raise ConfigError([f"hydra.run.dir={self.dir.path}: already holds a run with checkpoints; continue it with "
                               f"resume={self.dir.path}, or remove it, or choose another directory (nothing was "
                               "overwritten)"])
        if self.rank_zero:
            redact_yaml_files(self.dir.path / HYDRA_OUTPUT)
            redact_yaml_files(self.dir.path.parent)  # a multirun's multirun.yaml, with the sweep's command line
        log.info(f"run {self.id}: {self.dir.path}" + (f" (resuming from {self.resume_from})" if self.resume_from else ""))
        for bad in self.corrupt:
            log.warning(f"checkpoint {bad['path']} does not load ({bad['error']}): set aside as .corrupt, resuming "
                        "from an older one")
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        torch.set_float32_matmul_precision(settings.trainer.matmul_precision)

    def trained(self) -> Optional[dict[str, Any]]:
        """What the checkpoint a resumed run starts from says was trained: {"step", "tokens",
        "flops"} (older checkpoints: None, and their steps are assumed of this run's shape)."""
        if not self.resume_from:
            return None
        meta = load_meta(self.resume_from)
        state = (meta.get("callbacks") or {}).get(TokenCount.__qualname__)
        if not isinstance(state, dict) or not {"step", "tokens", "flops"} <= set(state):
            return None
        return {k: state[k] for k in ("step", "tokens", "flops")}

    def check_resume(self, cfg: DictConfig, data: StageData, plan: Plan) -> None:
        """A resumed run continues the same architecture on its own data and tokenizer, and has
        steps left to train."""
        if not self.resume_from:
            return
        require_same_model(self.resume_from, plan.model)
        check_same_data(self.dir, data.facts, data.tokenizer, bool(cfg.get("resume_new_data", False)))
        refuse_spent_budget(self.dir, checkpoint_step(self.resume_from), plan.steps)

    def record(self, cfg: DictConfig) -> None:
        """run.json (what resume reads: unresolved config, group choices, overrides) and
        config.yaml (resolved, for people), both with credentials redacted."""
        if self.rank_zero:
            if not self.resume_from:
                write_json(self.dir.run_file, redact_secrets({"run_id": self.id, "choices": self.choices,
                                                              "overrides": self.overrides,
                                                              "config": resolved_config(cfg, resolve=False)}))
            self.dir.config_file.write_text(OmegaConf.to_yaml(resolved_config(cfg)))

    def release(self) -> None:
        """Give up the directory's lock (the process ending releases it too, however it ends)."""
        self.lock.release()

    def must_spawn(self, settings: Settings) -> bool:
        """Whether this process starts the ranks (several local devices from a plain llm-train)
        instead of training itself."""
        return settings.world > 1 and not launched_externally()

    def spawn_ranks(self, settings: Settings) -> dict[str, Any]:
        """Run the ranks as fresh processes (they find the data this process cached) and return
        the summary they wrote."""
        log.info(f"starting {settings.world} ranks ({type(settings.parallelism).__name__})")
        try:
            spawn_local_ranks(settings.world, self.overrides, self.dir.path)
        except RuntimeError as e:
            summary = self.read_summary() or {"run_id": self.id}
            if summary.get("status") != "failed":
                summary.update(status="failed", error=str(e))
                write_json(self.dir.summary, summary)
            raise
        return self.read_summary()

    # ---- training ---------------------------------------------------------------------------

    def train(self, recipe: Recipe, cfg: DictConfig, settings: Settings, plan: Plan, data: StageData) -> dict[str, Any]:
        """Fit the recipe's module to the plan's steps (rolling back after bad steps), then the
        WSD branches; summary.json says how it went, also when it fails or is preempted."""
        if self.rank_zero:
            data.tokenizer.save(self.dir.tokenizer)
        facts = {"run_id": self.id, "run_dir": str(self.dir.path), "stage": recipe.stage, "choices": self.choices,
                 "world_size": settings.world, **plan.facts(), "budget_flops": settings.budget.flops,
                 "budget_tokens": settings.budget.tokens, "budget_tokens_per_param": settings.budget.tokens_per_param,
                 **data.facts, **{f"git_{k}": v for k, v in git_state(Path(cfg.paths.root_dir)).items()}}
        log.info(f"model: {plan.size.describe()}, "
                 f"{plan.size.flops_per_token:.3g} FLOPs/token; budget: {plan.budget_line}")
        module = recipe.module(cfg, settings, plan, data, self.dir)
        trainer_cfg = settings.trainer
        resume_step = checkpoint_step(self.resume_from) if self.resume_from else -1
        loggers = [JsonlLogger(self.dir.metrics, resume_step=resume_step if self.rank_zero else None),
                   *self.experiment_loggers(recipe, cfg, settings, plan, facts, module.stage)]
        schedule = module.schedule
        branches = schedule.branch_points(plan.steps) if hasattr(schedule, "branch_points") else []
        kit = RunCallbacks.build(settings, plan, self.dir, self.id, module.loss_spikes_are_faults,
                                 tuple(start for start, _ in branches), OmegaConf.to_container(cfg.optim, resolve=True))
        guard, checkpoints, callbacks = kit.guard, kit.checkpoints, kit.all
        downstream = downstream_callback(settings, OmegaConf.to_container(cfg.data.corpus, resolve=True)
                                         if cfg.data.get("corpus") else None, data.tokenizer, kit.tokens)
        callbacks = callbacks + [downstream] if downstream else callbacks
        trainer = self.trainer(settings, plan.steps, plan.accumulate, loggers, callbacks, self.dir.path)
        pristine = copy.deepcopy(module)  # not yet configured: what a rollback starts again from

        def fit(checkpoint: Optional[Path], attempt: int) -> None:
            nonlocal module, trainer
            if attempt:  # after a rollback: a fresh module and trainer, the metrics file cut back to the checkpoint
                pl.seed_everything(cfg.seed, workers=True, verbose=False)
                module = copy.deepcopy(pristine)
                step = checkpoint_step(checkpoint) if checkpoint else 0
                loggers[0] = JsonlLogger(self.dir.metrics, resume_step=step if self.rank_zero else None)
                trainer = self.trainer(settings, plan.steps, plan.accumulate, loggers, callbacks, self.dir.path)
            trainer.fit(module, datamodule=data.datamodule, ckpt_path=str(checkpoint) if checkpoint else None)

        summary = {**facts, "status": "running"}
        self.write_summary(summary)
        try:
            fit_with_rollbacks(fit, guard, data.datamodule, self.dir.path, self.resume_from, self.rank_zero)
            validate_last_step(trainer, module, data, min(trainer_cfg.val_every, plan.steps))
            checkpoints.save(trainer)
            if kit.artifacts is not None:
                kit.artifacts.log_saved(trainer)
            summary["status"] = "completed"
            for start, end in branches:  # WSD: the shorter runs that share this run's stable phase
                summary.setdefault("branches", []).append(
                    self.branch(recipe, cfg, settings, plan, data, facts, start, end))
        except BaseException as e:
            # An exception may say how the run ended (Preempted: "preempted"); anything else failed it.
            summary.update(status=getattr(e, "run_status", "failed"), error=f"{type(e).__name__}: {e}")
            raise
        finally:
            summary.update(guard.summary(), corrupt_checkpoints=self.corrupt,
                           best_checkpoint=str(self.dir.best_checkpoint)
                           if checkpoints.best_step >= 0 and self.dir.best_checkpoint.exists() else None)
            tokens = kit.tokens.tokens(trainer.global_step)  # as trained, also across resumes with another shape
            summary.update(final_metrics(self.dir.metrics), tokens_seen=tokens, steps_done=trainer.global_step,
                           tokens_per_s=kit.throughput.mean_tokens_per_s,
                           peak_memory_mib=peak_memory_mib(trainer.strategy.root_device),
                           wall_seconds=round(time.time() - self.started, 1), D=tokens,
                           C=kit.tokens.flops(trainer.global_step))
            self.write_summary(summary)
            if uses(settings.logger, "wandb"):
                from llm.tracking.wandb import finish_run

                finish_run(summary["status"] != "completed")  # always closed, so the next job never reuses it
        return summary

    def experiment_loggers(self, recipe: Recipe, cfg: DictConfig, settings: Settings, plan: Plan, facts: dict,
                           stage: str) -> list:
        """W&B (one run, on global rank zero), TensorBoard or CSV, as logger.kind and logger.also say;
        metrics.jsonl always."""
        loggers: list = []
        if uses(settings.logger, "wandb"):
            from llm.tracking.wandb import run_config, use_parent_artifact, wandb_logger

            config = run_config(resolved_config(cfg), self.choices, self.overrides, facts)
            logger = wandb_logger(settings.logger, self.id, self.dir.path, stage, self.choices, config,
                                  Path(cfg.paths.runs_dir), plan.tokens_per_step, plan.size.flops_per_token,
                                  rank_zero=self.rank_zero)
            # This stage's inputs, its parents' checkpoints (init_from's; a distilled student's teacher too).
            for key, (checkpoint, parent_run) in (recipe.inputs() if self.rank_zero else {}).items():
                if parent_run is None:  # a Hugging Face folder, an import, a loose file: no run to link to
                    log.info(f"lineage: {checkpoint} is not in a run directory; recorded as {key}_checkpoint only")
                else:
                    use_parent_artifact(checkpoint, parent_run, key=key)
            loggers.append(logger)
        kinds = logger_kinds(settings.logger)
        loggers += [tensorboard_logger(self.dir.path)] if "tensorboard" in kinds else []
        return loggers + ([csv_logger(self.dir.path)] if "csv" in kinds else [])

    @staticmethod
    def trainer(settings: Settings, steps: int, accumulate: int, loggers: list, callbacks: list,
                root: Path) -> pl.Trainer:
        t = settings.trainer
        return pl.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
            strategy=settings.parallelism.strategy(settings.world), precision=t.precision, max_steps=steps,
            val_check_interval=min(t.val_every, steps) * accumulate, check_val_every_n_epoch=None,
            log_every_n_steps=t.log_every, accumulate_grad_batches=accumulate, logger=loggers, callbacks=callbacks,
            enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
            plugins=[AtomicCheckpointIO()], deterministic=t.deterministic, default_root_dir=root,
            use_distributed_sampler=False,
        )

    def branch(self, recipe: Recipe, cfg: DictConfig, settings: Settings, plan: Plan, data: StageData, facts: dict,
               start: int, end: int) -> dict[str, Any]:
        """Continue from the stable-phase checkpoint at `start` with a decay ending at `end`: one
        more (N, D) point, written as its own run directory under branches/ (sweeps and fits find
        it). The module comes from the same recipe as the main fit."""
        branch_dir = self.dir.branch(end)
        schedule = instantiate(cfg.schedule).for_branch(plan.steps)
        module = recipe.module(cfg, settings, plan, data, branch_dir, schedule=schedule, total_steps=end)
        checkpoints = PeriodicCheckpoint(branch_dir.checkpoints, end)
        counter = TokenCount(plan.tokens_per_step, plan.size.flops_per_token)
        loggers = [JsonlLogger(branch_dir.metrics, resume_step=start if self.rank_zero else None)]
        trainer = self.trainer(settings, end, plan.accumulate, loggers, [counter, checkpoints], branch_dir.path)
        trainer.fit(module, datamodule=data.datamodule, ckpt_path=str(self.dir.checkpoints / branch_checkpoint(start)))
        validate_last_step(trainer, module, data, min(settings.trainer.val_every, end))
        checkpoints.save(trainer)
        tokens = counter.tokens(end)
        summary = {**facts, **final_metrics(branch_dir.metrics), "run_id": f"{self.id}-decay{end}",
                   "run_dir": str(branch_dir.path), "branch_of": self.id, "branch_start": start, "steps": end,
                   "steps_done": trainer.global_step, "status": "completed", "budget": f"WSD branch of {plan.steps} steps",
                   "budget_flops": None, "D": tokens, "tokens_seen": tokens, "C": counter.flops(end)}
        if self.rank_zero:
            write_json(branch_dir.summary, summary)
            log.info(f"branch: decayed at step {end} (left the stable phase at {start}): "
                     f"val/loss {summary.get('val/loss', math.nan):.4f}")
        return {k: summary.get(k) for k in ("run_id", "steps", "D", "C", "val/loss")}

    # ---- after training ---------------------------------------------------------------------

    def finish(self, recipe: Recipe, cfg: DictConfig, data: StageData, summary: dict[str, Any]) -> dict[str, Any]:
        """The stage's own finish (evaluation, exports) on the launching process, added to
        summary.json, then the run's last line."""
        if spawned_rank() or not self.rank_zero:
            return summary  # the process that started the ranks finishes for them
        if summary.get("status") == "completed":
            extra = recipe.finish(cfg, self.dir, data, summary)
            if extra:
                summary.update(extra)
                write_json(self.dir.summary, summary)
        if "val/loss" in summary:
            log.info(f"done: {recipe.done_line(summary)} after {summary['D']:,} tokens, "
                     f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_seconds']:.0f} s -> {self.dir.summary}")
        return summary

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.dir.summary.read_text()) if self.dir.summary.exists() else {}

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.rank_zero:
            write_json(self.dir.summary, summary)


def validate_last_step(trainer: pl.Trainer, module: pl.LightningModule, data: StageData, every: int) -> None:
    """A last validation when the final step did not end on one, so every run ends with val/loss."""
    if trainer.global_step % every:
        trainer.validate(module, datamodule=data.datamodule, verbose=False)


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


def discard_unstarted(run_dir: str | Path) -> None:
    """Remove what Hydra wrote for a job that never started a run (refused by validation, or a
    dry run): its .hydra folder and log file, then the directory if that left it empty. A
    directory that holds a run (run.json) or anything else is left alone."""
    path = RunDir(run_dir)
    if not path.path.is_dir() or path.is_run():
        return
    shutil.rmtree(path.path / HYDRA_OUTPUT, ignore_errors=True)
    for log_file in (path.log, *path.path.glob("rank*.log")):
        log_file.unlink(missing_ok=True)
    if path.lock.is_file() and path.lock.stat().st_size == 0:  # released: no process owns the directory
        path.lock.unlink(missing_ok=True)
    try:
        path.path.rmdir()
    except OSError:
        pass  # not empty: someone else's files, never ours to remove
