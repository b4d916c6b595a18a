"""`llm-train`: the Hydra app over conf/train.yaml. Thin: compose, then hand over to llm.train."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

import llm.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from llm.cli.common import CONFIG_ERROR_EXIT_CODE, config_error_in, setup
from llm.resources import CONF_DIR

setup()
log = logging.getLogger("llm.cli.train")
# Set once Hydra hands a composed config to the app: an exit before that is Hydra refusing the
# command line (a bad override, a value its type or Enum refuses), which is a config error (exit 2).
_composed = False


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> float | None:
    """Exit codes: 0 done, 1 failed (also: stopped by the loss guard), 2 config or input error,
    75 preempted after saving a checkpoint (see llm.cli.common)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from llm.tracking.guard import GuardGaveUp
    from llm.tracking.preemption import PREEMPTED_EXIT_CODE, Preempted
    from llm.run.run import discard_unstarted
    from llm.train import train

    global _composed
    _composed = True
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg)
    except Preempted as e:
        _preempted(cfg, e)
        sys.exit(PREEMPTED_EXIT_CODE)
    except GuardGaveUp as e:
        sys.stderr.write(f"error: {e}\n")
        if multirun:
            raise
        sys.exit(1)
    except Exception as e:
        cause = config_error_in(e)
        if cause is None:
            raise
        sys.stderr.write(f"error: {cause}\n")
        discard_unstarted(cfg.paths.run_dir)  # a refused run leaves no directory behind
        if multirun:
            raise cause  # recorded as a failed job; the sweep goes on and exits non-zero at the end
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    return summary.get("val/loss")


def _preempted(cfg: DictConfig, e: Exception) -> None:
    """Say how to continue; under SLURM the launching process puts the job back in the queue."""
    from omegaconf import OmegaConf

    from llm.parallel.launch import is_rank_zero, spawned_rank
    from llm.tracking.preemption import requeue_slurm_job

    if not is_rank_zero() or spawned_rank():
        return  # the process that started the ranks speaks (and requeues) for them
    log.warning(f"preempted: {e}; continue with: llm-train resume={cfg.paths.run_dir}")
    if OmegaConf.select(cfg, "trainer.preemption.requeue", default=True):
        note = requeue_slurm_job()
        if note:
            log.warning(note)


def main() -> None:
    from llm.tracking.sweep import report_sweep

    global _composed
    _composed = False  # per invocation: tests and other callers may run several in one process

    try:
        _app()
    except SystemExit as e:
        if e.code == 1 and not _composed:  # Hydra refused the command line before the run started
            sys.exit(CONFIG_ERROR_EXIT_CODE)
        raise
    finally:
        report_sweep()  # after a multirun: index.json and a line per failed job


if __name__ == "__main__":
    main()
