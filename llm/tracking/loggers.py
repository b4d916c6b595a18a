"""The experiment loggers a run writes to besides metrics.jsonl: `logger.kind` and `logger.also`.

  logger=wandb                                 W&B (llm.tracking.wandb)
  logger=tensorboard                           event files in <run dir>/tensorboard
  logger=csv                                   Lightning's metrics.csv in <run dir>/csv
  logger=wandb 'logger.also=[tensorboard,csv]' several at once

Every logger gets the same metric names and the same steps as metrics.jsonl (optimizer steps
done), trainer/tokens and trainer/flops among them, so each can plot against tokens and FLOPs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

TENSORBOARD_DIR = "tensorboard"
CSV_DIR = "csv"


def logger_kinds(logger: Any) -> list[str]:
    """The loggers a logger config (typed schema, DictConfig or run.json's dict) selects, in order:
    `kind`, then `also`; `none` and repeats dropped."""
    get = logger.get if isinstance(logger, Mapping) else lambda k, d=None: getattr(logger, k, d)
    kinds = [get("kind") or "none", *(get("also") or [])]
    return [k for k in dict.fromkeys(str(getattr(k, "value", k)) for k in kinds) if k != "none"]


def uses(logger: Any, kind: str) -> bool:
    return kind in logger_kinds(logger)


class StepsTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger at metrics.jsonl's steps: optimizer steps done, not Lightning's
    step counted from 0, so a point sits at the same step in TensorBoard, W&B and the dashboard."""

    def __init__(self, save_dir: str | Path):
        # version="": the event files sit in <run dir>/tensorboard, so `tensorboard --logdir runs` names runs by path.
        super().__init__(save_dir, name=TENSORBOARD_DIR, version="", default_hp_metric=False)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}  # the data stream is endless (as metrics.jsonl)
        super().log_metrics(metrics, None if step is None else step + 1)


def tensorboard_logger(run_dir: Path) -> StepsTensorBoardLogger:
    return StepsTensorBoardLogger(run_dir)


def csv_logger(run_dir: Path) -> CSVLogger:
    return CSVLogger(run_dir, name=CSV_DIR, version="")
