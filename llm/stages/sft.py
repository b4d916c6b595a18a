"""Supervised fine-tuning: next-token loss on completion tokens only (prompt, template and padding
labels are masked by the data pipeline), optionally over packed rows.

Logged as TRL's SFTTrainer logs them: `mean_token_accuracy` and `entropy` (llm.stages.objectives)
and `num_tokens`, the non-padding tokens trained on so far over all ranks (`train/` and `val/`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llm.config.methods import SFTConfig
from llm.config.validate import method_arguments
from llm.stages.objectives import Metrics, mean_entropy, token_accuracy
from llm.stages.posttrain import SupervisedModule, masked_lm_loss


class SFTModule(SupervisedModule):
    stage = "sft"
    data_kind = "sft"
    loss_spikes_are_faults = True
    counts_tokens = True

    def __init__(self, *args: Any, **kwargs: Any):
        method_arguments(SFTConfig, kwargs)  # its data and LoRA sections, checked
        super().__init__(*args, **kwargs)

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logits = self.logits(self.model, batch)
        loss = masked_lm_loss(logits, batch["labels"])
        if not self.wants_metrics():
            return loss, {}
        return loss, {"mean_token_accuracy": token_accuracy(logits, batch["labels"]),
                      "entropy": mean_entropy(logits, batch["mask"])}
