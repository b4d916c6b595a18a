"""Progress of a run against its budget of optimizer steps (the data stream is endless): a bar on a
terminal; plain log lines where stdout is a file or a pipe (SLURM, nohup, CI), where a bar would
write every redraw onto one endless `\\r` line."""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

log = logging.getLogger(__name__)


def progress_callback(enabled: bool, log_every: int) -> Optional[Callback]:
    """The run's progress display (trainer.progress_bar, trainer.log_every): a StepProgressBar when
    stdout is a terminal, else a ProgressLog line every `log_every` steps; None when disabled.
    Give the Trainer `enable_progress_bar=isinstance(cb, ProgressBar)`, and put the callback after
    ThroughputMonitor so that a step's tokens/s is in its line."""
    if not enabled:
        return None
    if sys.stdout.isatty():
        return StepProgressBar()
    return ProgressLog(log_every)


class StepProgressBar(TQDMProgressBar):
    """One bar for training (loss, tokens/s, last val loss) counted in steps of the budget; no bar
    for validation or its sanity check, and none of Lightning's `Training`/`Epoch` leftovers."""

    def _train_total(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.max_steps * trainer.accumulate_grad_batches, trainer.global_step * trainer.accumulate_grad_batches

    def init_train_tqdm(self) -> Tqdm:
        total, done = self._train_total()
        return Tqdm(desc="train", total=total, initial=done, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # Lightning's resets the bar to one epoch named "Epoch N"; an endless stream has one epoch
        # of the whole budget, and the bar already counts it.
        pass

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)  # disabled from the start: nothing drawn, nothing left behind

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ProgressLog(Callback):
    """A plain line every `log_every` optimizer steps (step/total, loss, tokens/s, learning rate,
    time left) and one per validation (its val/* metrics), through logging: the console shows it
    and the run's log file keeps it."""

    def __init__(self, log_every: int):
        self.log_every = max(1, int(log_every))
        self.start_time = 0.0
        self.start_step = 0
        self.last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_time = time.perf_counter()
        self.start_step = self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step == self.last_step:  # a micro-batch inside gradient accumulation
            return
        self.last_step = step
        if step % self.log_every:  # the steps whose metrics the Trainer writes, so the loss is this step's
            return
        metrics = trainer.callback_metrics
        parts = [_step(trainer)]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "perf/tokens_per_s" in metrics:
            parts.append(f"{float(metrics['perf/tokens_per_s']):,.0f} tokens/s")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        if trainer.max_steps > 0:
            parts.append(f"ETA {self._eta(step, trainer.max_steps)}")
        log.info(" | ".join(parts))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            shown = ", ".join(f"{k} {_number(v)}" for k, v in sorted(values.items()))
            log.info(f"{_step(trainer)} | {shown}")

    def _eta(self, step: int, total: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - self.start_time) / done * max(0, total - step)
        return str(timedelta(seconds=math.ceil(seconds)))


def _step(trainer: pl.Trainer) -> str:
    total = f"/{trainer.max_steps:,}" if trainer.max_steps > 0 else ""
    return f"step {trainer.global_step:,}{total}"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
