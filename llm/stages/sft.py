"""Supervised fine-tuning: next-token loss on completion tokens only (prompt, template and
padding labels are masked by the data pipeline), optionally over packed rows."""

from __future__ import annotations

from torch import Tensor

from llm.stages.posttrain import PostTrainModule, masked_lm_loss


class SFTModule(PostTrainModule):
    stage = "sft"
    data_kind = "sft"

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = masked_lm_loss(self.logits(self.model, batch), batch["labels"])
        self.log_progress(loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = masked_lm_loss(self.logits(self.model, batch), batch["labels"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss
