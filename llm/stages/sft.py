"""Supervised fine-tuning: next-token loss on completion tokens only (prompt, template and
padding labels are masked by the data pipeline), optionally over packed rows."""

from __future__ import annotations

from torch import Tensor

from llm.stages.posttrain import SupervisedModule, masked_lm_loss


class SFTModule(SupervisedModule):
    stage = "sft"
    data_kind = "sft"
    loss_spikes_are_faults = True

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return masked_lm_loss(self.logits(self.model, batch), batch["labels"]), {}
