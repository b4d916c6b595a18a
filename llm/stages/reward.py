"""Reward modelling: a scalar head on the transformer, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from llm.config.methods import RewardConfig
from llm.config.validate import method_arguments
from llm.model.value import last_token_values
from llm.stages.objectives import reward_loss
from llm.stages.posttrain import SupervisedModule


class RewardModule(SupervisedModule):
    stage = "reward"
    data_kind = "preference"
    value_head = True

    def __init__(self, *args: Any, margin: Optional[float] = None, center_rewards_coefficient: Optional[float] = None,
                 **kwargs: Any):
        config = method_arguments(RewardConfig, kwargs, margin=margin,
                                  center_rewards_coefficient=center_rewards_coefficient)
        super().__init__(*args, **kwargs)
        self.margin = config.margin
        self.center_rewards_coefficient = config.center_rewards_coefficient

    def rewards(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One forward over chosen and rejected rows together: (r_chosen, r_rejected), each (B,)."""
        chosen, rejected = batch["chosen"], batch["rejected"]
        both = {k: torch.cat([chosen[k], rejected[k]]) for k in ("tokens", "positions", "documents", "mask")}
        values = self.logits(self.model, both)  # the value model's per-token values
        rewards = last_token_values(values, both["mask"])
        return rewards.chunk(2)

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        r_chosen, r_rejected = self.rewards(batch)
        return reward_loss(r_chosen, r_rejected, self.margin, self.center_rewards_coefficient)
