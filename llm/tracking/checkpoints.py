"""PeriodicCheckpoint: a run's `checkpoints/last.ckpt` every N steps, the last K, and the best.

A single-process or DDP checkpoint is one file (written by llm.checkpoint.save.AtomicCheckpointIO:
temporary file, fsync, verify, rename). An FSDP/TP checkpoint is a `torch.distributed.checkpoint`
directory of shards, written to a temporary directory by every rank and then swapped in by rank 0.
Either way `last.ckpt` is always a whole checkpoint or absent, never a torn one. A write that
runs out of room raises `llm.checkpoint.save.NoSpace`; the checkpoints already kept stay whole.

Before a new `last.ckpt` is written, the previous one is renamed `step-<its step>.ckpt`; the
newest `trainer.keep_last` checkpoints are kept (last.ckpt counts as one) plus the best by
`val/loss`, which `best.ckpt` (a symlink) names. On resume, `llm.checkpoint.newest_loadable_checkpoint`
tries them newest first and sets aside any that does not load as `<name>.corrupt`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from llm.checkpoint.find import remove_path, step_files
from llm.checkpoint.meta import checkpoint_step
from llm.checkpoint.save import NoSpace, no_space
from llm.run.layout import BEST, CORRUPT, LAST, branch_checkpoint, step_checkpoint

log = logging.getLogger(__name__)


class PeriodicCheckpoint(Callback):
    """Saves `last.ckpt` every `every_n_steps` optimizer steps (and WSD branch starts), keeping
    the newest `keep_last` checkpoints and the best by val/loss.

    `vet(trainer)` runs before each periodic save and may raise to refuse it: the loss guard
    uses it so that no checkpoint ever holds non-finite weights.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, branch_starts: tuple[int, ...] = (),
                 keep_last: int = 2, vet: Optional[Callable[[pl.Trainer], None]] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.branch_starts = set(branch_starts)  # WSD branches leave the stable phase here
        self.keep_last = keep_last
        self.vet = vet
        self.saved_step = -1  # the step of last.ckpt, when this process wrote it
        self.validated: Optional[tuple[int, float]] = None  # (step, val/loss) of the latest validation
        self.best_step, self.best_val = -1, float("inf")

    def save(self, trainer: pl.Trainer, name: str = LAST) -> None:
        if trainer.global_step == self.saved_step and name == LAST:
            return
        final = self.dirpath / name
        rank_zero = trainer.is_global_zero
        if not getattr(trainer.lightning_module.parallelism, "sharded_checkpoints", False):
            kept = self._rotate() if name == LAST and rank_zero else None
            try:
                trainer.save_checkpoint(final)
            except BaseException:  # out of room, interrupted, ...: nothing replaced last.ckpt
                if kept is not None:
                    self._put_back(kept)
                raise
        else:
            tmp, old = self.dirpath / f".{name}.tmp", self.dirpath / f".{name}.old"
            if rank_zero and tmp.exists():
                shutil.rmtree(tmp)
            trainer.strategy.barrier("checkpoint-start")
            try:
                trainer.save_checkpoint(tmp)  # every rank writes its shards; ends with a barrier
            except Exception as e:
                why = no_space(e, self.dirpath)  # asked before the space of the shards is given back
                if rank_zero:
                    shutil.rmtree(tmp, ignore_errors=True)
                if why is not None:
                    raise NoSpace(final, why) from e
                raise
            if rank_zero:
                if name == LAST:
                    self._rotate()
                elif final.exists():
                    final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            trainer.strategy.barrier("checkpoint-swapped")
        if name == LAST:
            self.saved_step = trainer.global_step
            self._consider_best(rank_zero)
            if rank_zero:
                self._prune()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a fit may start from an older checkpoint (a rollback): read last.ckpt's step again
            self.saved_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        periodic = step % self.every_n_steps == 0 and step > 0 and step != self.saved_step
        if periodic and self.vet is not None:
            self.vet(trainer)
        if periodic:
            self.save(trainer)
        if step in self.branch_starts:
            self.save(trainer, branch_checkpoint(step))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None:
            return
        self.validated = (trainer.global_step, float(loss))
        self._consider_best(trainer.is_global_zero)

    def state_dict(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_val": self.best_val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("best_val", float("inf")) < self.best_val:  # a rollback's older state knows less
            self.best_step, self.best_val = state["best_step"], state["best_val"]

    def _consider_best(self, rank_zero: bool) -> None:
        """The checkpoint just saved is the best when its weights were just validated lowest."""
        if self.validated is None or self.validated[0] != self.saved_step or not self.validated[1] < self.best_val:
            return
        self.best_step, self.best_val = self.validated
        if rank_zero:
            _point(self.dirpath / BEST, LAST)

    def _rotate(self) -> Optional[Path]:
        """Rename last.ckpt to step-<its step>.ckpt, so the new last.ckpt replaces nothing.
        Returns the step-<N>.ckpt it became, if it did."""
        last = self.dirpath / LAST
        if not last.exists():
            return None
        step = self.saved_step if self.saved_step >= 0 else _readable_step(last)
        if step is None:  # unreadable: kept for inspection, out of the way
            remove_path(last.with_name(LAST + CORRUPT))
            last.rename(last.with_name(LAST + CORRUPT))
            return None
        kept = self.dirpath / step_checkpoint(step)
        remove_path(kept)
        last.rename(kept)
        if step == self.best_step:
            _point(self.dirpath / BEST, kept.name)
        return kept

    def _put_back(self, kept: Path) -> None:
        """Undo `_rotate` after a write that failed: the previous checkpoint is last.ckpt again.
        best.ckpt is pointed back first; if even that cannot be written (a full disk), both stay
        as they are, which is just as whole: the previous checkpoint is then step-<N>.ckpt."""
        best = self.dirpath / BEST
        try:
            if best.is_symlink() and os.readlink(best) == kept.name:
                _point(best, LAST)
            kept.rename(self.dirpath / LAST)
        except OSError as e:  # still whole, under its step name: a resume finds it there
            log.warning(f"{kept} could not be renamed back to {LAST} ({e.strerror or e}); resume uses it as it is")

    def _prune(self) -> None:
        older = sorted(step_files(self.dirpath), reverse=True)
        for step, path in older[self.keep_last - 1:]:
            if step != self.best_step:
                remove_path(path)


def _point(link: Path, target: str) -> None:
    """Make `link` a relative symlink to `target`, atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    remove_path(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _readable_step(path: Path) -> Optional[int]:
    try:
        return checkpoint_step(path)
    except Exception:  # any unreadable checkpoint: torch raises several kinds
        return None
