"""The one path a run takes; `llm-train` (llm/cli/train.py) composes the config and calls `train`.

    compose -> validate -> Run -> Recipe of the stage -> Lightning Trainer.fit -> summary.json

What differs between stages lives in their Recipe (llm/recipes); what every run does with its
directory, loggers, callbacks, rollbacks, preemption and WSD branches lives in Run (llm/run).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from llm.config import validate
from llm.config.validate import check_input_files
from llm.recipes import recipe_for
from llm.run.plan import Settings, dry_run, plan
from llm.run.run import Run, discard_unstarted
from llm.tracking.loggers import uses


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the summary also written to <run_dir>/summary.json."""
    run = Run(cfg)  # resume= brings back the run's own config
    validate(run.cfg)  # every config problem, before any file is read
    recipe = recipe_for(run.cfg)
    cfg = recipe.prepare(run.cfg, run.overrides)  # post-training: the parent's architecture and tokenizer
    run.choices = recipe.labels(run.choices)
    validate(cfg)  # again, now with what will really run
    check_input_files(cfg)  # and the files it names
    settings = Settings.of(cfg)
    if uses(settings.logger, "wandb"):
        from llm.tracking.wandb import resolve_mode

        resolve_mode(settings.logger.mode)  # fails now, not after the data work, on missing credentials
    if cfg.dry_run:
        discard_unstarted(run.dir.path)
        return dry_run(cfg, settings)

    run.start(cfg, settings)  # the directory is this process's until it returns
    try:
        data = recipe.data(cfg, settings, run.dir)  # read and checked once, before any rank starts
        the_plan = plan(settings, data.tokenizer.vocab_size, run.trained())
        run.check_resume(cfg, data, the_plan)  # the same data and tokenizer, steps left to train
        run.record(cfg)
        if run.must_spawn(settings):
            summary = run.spawn_ranks(settings)
        else:
            summary = run.train(recipe, cfg, settings, the_plan, data)
        return run.finish(recipe, cfg, data, summary)
    finally:
        run.release()
