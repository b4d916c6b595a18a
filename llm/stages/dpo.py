"""Direct Preference Optimisation against a frozen reference policy (a copy of the starting
model): sigmoid (default, beta 0.1), IPO or hinge loss on summed completion log-probs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llm.stages.objectives import DPO_LOSSES, dpo_loss, sequence_logprobs
from llm.stages.posttrain import PostTrainModule


class DPOModule(PostTrainModule):
    stage = "dpo"
    data_kind = "preference"
    needs_reference = True

    def __init__(self, *args: Any, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"posttrain.loss_type={loss_type!r}: choose one of {', '.join(DPO_LOSSES)}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Completion log-probs of the chosen and the rejected rows, in one forward."""
        chosen, rejected = batch["chosen"], batch["rejected"]
        both = {k: torch.cat([chosen[k], rejected[k]]) for k in chosen}
        logps = sequence_logprobs(self.logits(model, both), both["labels"], average=self.loss_type == "ipo")
        return logps.chunk(2)

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        policy_chosen, policy_rejected = self.logps(self.model, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = self.logps(self.reference, batch)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                        self.label_smoothing)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.step(batch)
        self.log_progress(loss)
        self.log_metrics("train/", metrics)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log_metrics("val/", metrics)
        return loss
