"""The Recipe of a stage: what one kind of training brings to a run.

`llm.train.train` calls, in order: `prepare` (before the config is validated for good: a stage
may fix parts of it, as post-training takes the parent's architecture), `data` (read and checked
once, before any rank starts), `module` (also for every WSD branch and after a rollback, so no
path can build a different module), and `finish` (after training, on one process).

A new stage is a LightningModule in llm/stages, a Recipe here (registered in llm/recipes/__init__.py)
and an option of the `posttrain` config group; train() does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

if TYPE_CHECKING:  # for annotations only: recipes are below the run in the dependency order
    from llm.run.layout import RunDir
    from llm.run.plan import Plan, Settings


@dataclass
class StageData:
    """A stage's data, ready for the Trainer."""

    tokenizer: Any  # llm.tokenizer.Tokenizer
    datamodule: pl.LightningDataModule
    facts: dict[str, Any]  # what summary.json and W&B record about the data
    eval_rows: list[dict] = field(default_factory=list)  # held-out prompts with answers (post-training)


class Recipe(ABC):
    """One stage's config, data, module, evaluation and finish. `module_class` is the
    LightningModule the `posttrain` group's option names."""

    def __init__(self, module_class: type[pl.LightningModule]):
        self.module_class = module_class

    @property
    def stage(self) -> str:
        return self.module_class.stage

    def prepare(self, cfg: DictConfig, overrides: list[str]) -> DictConfig:
        """The config this stage really runs (before the final validation). Default: as composed."""
        return cfg

    def labels(self, choices: dict[str, str]) -> dict[str, str]:
        """The group choices that describe what trains (run names, W&B tags, `choice/*` keys)."""
        return choices

    @abstractmethod
    def data(self, cfg: DictConfig, settings: Settings, run_dir: RunDir) -> StageData:
        """Read, check and tokenise the stage's data."""

    def module(self, cfg: DictConfig, settings: Settings, plan: Plan, data: StageData, run_dir: RunDir,
               schedule: Optional[Any] = None, total_steps: Optional[int] = None) -> pl.LightningModule:
        """The LightningModule: the option of the `posttrain` group built with the run's optimizer,
        schedule (a WSD branch passes its own), parallelism and step arithmetic."""
        return instantiate(cfg.posttrain, _convert_="all")(
            model_config=plan.model, optimizer=instantiate(cfg.optim, _convert_="all"),
            schedule=schedule if schedule is not None else instantiate(cfg.schedule),
            parallelism=settings.parallelism, total_steps=total_steps or plan.steps,
            tokens_per_step=plan.tokens_per_step, flops_per_token=plan.size.flops_per_token,
            gradient_clip=settings.trainer.gradient_clip_val, **self.module_arguments(data))

    def module_arguments(self, data: StageData) -> dict[str, Any]:
        """Stage-specific constructor arguments of the module."""
        return {}

    def lineage(self) -> Optional[tuple[Path, Optional[Path]]]:
        """The checkpoint this stage starts from and its run directory (W&B lineage), if any."""
        return None

    def inputs(self) -> dict[str, tuple[Path, Optional[Path]]]:
        """Every checkpoint the stage reads (W&B input artifacts), by the config key W&B records it
        under: `parent` (lineage()'s), and e.g. distillation's `teacher`."""
        parent = self.lineage()
        return {"parent": parent} if parent is not None else {}

    def finish(self, cfg: DictConfig, run_dir: RunDir, data: StageData, summary: dict[str, Any]) -> dict[str, Any]:
        """After a completed training (one process, rank zero): what to add to summary.json."""
        return {}

    def done_line(self, summary: dict[str, Any]) -> str:
        """The last line a run prints."""
        return f"val/loss {summary['val/loss']:.4f}"
