"""Periodic checkpoints of a run: `<run_dir>/checkpoints/last.ckpt`, replaced atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

LAST = "last.ckpt"


class PeriodicCheckpoint(Callback):
    def __init__(self, dirpath: str | Path, every_n_steps: int):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.saved_step = -1

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self.saved_step:
            trainer.save_checkpoint(self.dirpath / LAST)  # AtomicCheckpointIO: whole or absent
            self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.save(trainer)


def last_checkpoint(run_dir: str | Path) -> Optional[Path]:
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.exists() else None


def checkpoint_step(path: str | Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
