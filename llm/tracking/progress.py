"""A progress bar that counts optimizer steps against the budget (the data stream is endless)."""

from __future__ import annotations

from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = trainer.max_steps * trainer.accumulate_grad_batches
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = trainer.global_step * trainer.accumulate_grad_batches
        self.train_progress_bar.set_description("train")
