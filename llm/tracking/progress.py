"""A progress bar that counts optimizer steps against the budget (the data stream is endless)."""

from __future__ import annotations

from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """One bar for training (loss, tokens/s, last val loss); validation runs without its own bar."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = trainer.max_steps * trainer.accumulate_grad_batches
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = trainer.global_step * trainer.accumulate_grad_batches
        self.train_progress_bar.set_description("train")

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
