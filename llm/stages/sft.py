"""Supervised fine-tuning: next-token loss on completion tokens only (prompt, template and
padding labels are masked by the data pipeline), optionally over packed rows."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llm.config.methods import SFTConfig
from llm.config.validate import method_arguments
from llm.stages.posttrain import SupervisedModule, masked_lm_loss


class SFTModule(SupervisedModule):
    stage = "sft"
    data_kind = "sft"
    loss_spikes_are_faults = True

    def __init__(self, *args: Any, **kwargs: Any):
        method_arguments(SFTConfig, kwargs)  # its data and LoRA sections, checked
        super().__init__(*args, **kwargs)

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return masked_lm_loss(self.logits(self.model, batch), batch["labels"]), {}
