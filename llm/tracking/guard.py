"""The loss guard: a non-finite loss or a loss spike rolls the run back to its last good
checkpoint and leaves out the batches of the bad step.

`LossGuard` watches every optimizer step's loss (averaged over micro-batches and ranks, so all
ranks decide alike). A step is bad when its loss is not finite, or, after `warmup_steps`, when it
exceeds an exponential moving mean by `spike_threshold` moving standard deviations. A bad step
raises `GuardTripped` before any callback after the guard can checkpoint it; `fit_with_rollbacks`
catches it, tells the datamodule to skip the step's micro-batches, and fits again from the newest
checkpoint that loads (restoring the data position, as a resume does). Every event is kept in the
guard's state (saved in checkpoints), logged as `guard/rollbacks` and `guard/skipped_batches`, and
listed in summary.json; after `max_rollbacks` the run stops with `GuardGaveUp`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from llm.checkpoint import checkpoint_step, newest_loadable_checkpoint


class GuardTripped(Exception):
    """A bad step, raised inside `trainer.fit`; `event` says which step, why, and its batches."""

    def __init__(self, event: dict[str, Any]):
        self.event = event
        super().__init__(f"{event['kind']} loss {event['loss']} at step {event['step']}")


class GuardGaveUp(RuntimeError):
    """More bad steps than `trainer.guard.max_rollbacks`: the run cannot be saved by skipping data."""


class LossGuard(Callback):
    """Detects bad steps (see the module docstring) and keeps the record of every rollback.

    `skip_batches` are micro-batch indices left out from the start (e.g. the ones an earlier run's
    guard found, listed in its summary.json); they apply also when `enabled` is false.
    """

    def __init__(self, enabled: bool = True, warmup_steps: int = 20, window: int = 50,
                 spike_threshold: Optional[float] = 6.0, max_rollbacks: int = 3, skip_batches: Iterable[int] = ()):
        self.enabled = enabled
        self.warmup_steps = warmup_steps
        self.alpha = 2.0 / (window + 1)  # EMA weight of the newest step, span `window`
        self.spike_threshold = spike_threshold
        self.max_rollbacks = max_rollbacks
        self.skip_batches = [int(i) for i in skip_batches]
        self.mean, self.var, self.seen = 0.0, 0.0, 0  # the moving statistics of good steps
        self.events: list[dict[str, Any]] = []
        self._step_loss: Optional[torch.Tensor] = None
        self._judged_step = -1

    # ---- inside fit ----

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.skip_batches and hasattr(trainer.datamodule, "skip"):
            trainer.datamodule.skip(self.skip_batches)
        self._step_loss, self._judged_step = None, -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The step count the first micro-batches see until the optimizer steps (0, or a resumed
        # run's step): judging then would split the first step's accumulated loss in two.
        self._step_loss, self._judged_step = None, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divides each micro-batch's loss by the accumulation: their sum is the step's mean.
            loss = loss.detach().float()
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        if trainer.global_step == self._judged_step or self._step_loss is None:
            return  # mid-accumulation: the optimizer has not stepped yet
        self._judged_step = trainer.global_step
        value = float(trainer.strategy.reduce(self._step_loss, reduce_op="mean"))  # the same on every rank
        self._step_loss = None
        kind, threshold = self._judge(value)
        if kind:
            raise GuardTripped(self._event(trainer, kind, value, threshold))
        self._observe(value)
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the steps whose metrics are written
            pl_module.log("guard/rollbacks", float(len(self.events)))
            pl_module.log("guard/skipped_batches", float(sum(len(e["batches_skipped"]) for e in self.events)))

    def check_weights(self, trainer: pl.Trainer) -> None:
        """Refuse to checkpoint non-finite weights (a finite loss can still come with a bad update)."""
        if not self.enabled:
            return
        local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.lightning_module.parameters()]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in local]).all()) if local else True
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise GuardTripped(self._event(trainer, "nonfinite_weights", math.nan, None))

    def _judge(self, loss: float) -> tuple[Optional[str], Optional[float]]:
        if not math.isfinite(loss):
            return "nonfinite", None
        if self.spike_threshold is None or self.seen < self.warmup_steps:
            return None, None
        # A floor on the deviation: a loss that barely moves must not turn noise into spikes.
        threshold = self.mean + self.spike_threshold * max(math.sqrt(self.var), 0.01 * abs(self.mean))
        return ("spike", threshold) if loss > threshold else (None, None)

    def _observe(self, loss: float) -> None:
        if self.seen == 0:
            self.mean, self.var = loss, 0.0
        else:
            delta = loss - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.seen += 1

    def _event(self, trainer: pl.Trainer, kind: str, loss: float, threshold: Optional[float]) -> dict[str, Any]:
        """The step just taken (1-based, as checkpoints count) and its micro-batches' stream indices."""
        step, accumulate = trainer.global_step, trainer.accumulate_grad_batches
        datamodule = trainer.datamodule
        positions = range((step - 1) * accumulate, step * accumulate)
        batches = [datamodule.stream_index(p) for p in positions] if hasattr(datamodule, "stream_index") else []
        return {"step": step, "kind": kind, "loss": loss if math.isfinite(loss) else str(loss),
                "threshold": None if threshold is None else round(threshold, 6), "batches_skipped": batches}

    # ---- between fits ----

    def roll_back(self, event: dict[str, Any], datamodule: Any, run_dir: Path, rank_zero: bool) -> Optional[Path]:
        """Record the event, skip its batches, and return the checkpoint to fit again from (None:
        from the start); GuardGaveUp after more than max_rollbacks events."""
        checkpoint, corrupt = newest_loadable_checkpoint(run_dir, set_aside=rank_zero)
        event["rolled_back_to"] = checkpoint_step(checkpoint) if checkpoint else 0
        self.events.append(event)
        say = print if rank_zero else (lambda *a: None)
        for bad in corrupt:
            say(f"guard: checkpoint {bad['path']} does not load ({bad['error']}); set aside as .corrupt")
        if len(self.events) > self.max_rollbacks:
            raise GuardGaveUp(
                f"loss guard: {len(self.events)} bad steps ({', '.join(_describe(e) for e in self.events)}), more than "
                f"trainer.guard.max_rollbacks={self.max_rollbacks}; stopped. The last good checkpoint is "
                f"{checkpoint or 'none (the run never saved one)'}. Lower optim.lr, look at the data of the skipped "
                "batches (guard_events in summary.json), or raise trainer.guard.max_rollbacks")
        if hasattr(datamodule, "skip"):
            datamodule.skip(event["batches_skipped"])
        say(f"guard: {_describe(event)}; rolling back to step {event['rolled_back_to']} and skipping micro-batches "
            f"{event['batches_skipped']} (rollback {len(self.events)} of at most {self.max_rollbacks})")
        return checkpoint

    def summary(self) -> dict[str, Any]:
        return {"guard_rollbacks": len(self.events), "guard_events": list(self.events)}

    # ---- checkpointed state ----

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "seen": self.seen, "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The statistics rewind with the checkpoint; the events only grow (a rollback restores a
        # checkpoint written before the event that caused it).
        self.mean, self.var, self.seen = state["mean"], state["var"], state["seen"]
        known = {(e["step"], e["kind"], tuple(e["batches_skipped"])) for e in self.events}
        self.events = [e for e in state.get("events", [])
                       if (e["step"], e["kind"], tuple(e["batches_skipped"])) not in known] + self.events


def _describe(event: dict[str, Any]) -> str:
    what = {"nonfinite": "non-finite loss", "spike": "loss spike", "nonfinite_weights": "non-finite weights"}
    detail = f" {event['loss']}" + (f" > {event['threshold']:.4g}" if event.get("threshold") is not None else "")
    return f"{what.get(event['kind'], event['kind'])}{detail if event['kind'] != 'nonfinite_weights' else ''} at step {event['step']}"


def fit_with_rollbacks(fit: Callable[[Optional[Path], int], None], guard: LossGuard, datamodule: Any, run_dir: Path,
                       checkpoint: Optional[Path], rank_zero: bool = True) -> None:
    """Call `fit(checkpoint, attempt)` until it finishes; after each bad step, roll back (see
    LossGuard.roll_back) and call it again with the checkpoint to restart from. `fit` must build
    a fresh trainer and module for attempt > 0."""
    attempt = 0
    while True:
        try:
            fit(checkpoint, attempt)
            return
        except GuardTripped as tripped:
            checkpoint = guard.roll_back(tripped.event, datamodule, Path(run_dir), rank_zero)
            attempt += 1
