"""Direct Preference Optimisation against a frozen reference policy (a copy of the starting
model): sigmoid (default, beta 0.1), IPO or hinge loss on summed completion log-probs, and
optionally RPO's NLL term on the chosen answers (`rpo_alpha`), which keeps DPO from lowering the
likelihood of the answers it prefers.

Logged as TRL's DPOTrainer logs them: `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`, `logps/chosen`, `logps/rejected` (`dpo_loss`), `logits/chosen`,
`logits/rejected` (`mean_logits`) and, with RPO, `nll_loss`."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from llm.config.methods import DPOConfig
from llm.config.validate import method_arguments
from llm.stages.objectives import Metrics, dpo_loss, mean_logits, token_logprobs
from llm.stages.posttrain import SupervisedModule


class DPOModule(SupervisedModule):
    stage = "dpo"
    data_kind = "preference"
    needs_reference = True

    def __init__(self, *args: Any, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: Optional[float] = None, **kwargs: Any):
        config = method_arguments(DPOConfig, kwargs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                  rpo_alpha=rpo_alpha)
        super().__init__(*args, **kwargs)
        self.beta, self.loss_type, self.label_smoothing = config.beta, config.loss_type, config.label_smoothing
        self.rpo_alpha = config.rpo_alpha

    def logps(self, model: torch.nn.Module, batch: dict[str, Tensor],
              metrics: Optional[Metrics] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Summed completion log-probs of the chosen and the rejected rows (in one forward), and
        each row's number of completion tokens. Given `metrics`, adds the logits' `logits/chosen`
        and `logits/rejected` to it."""
        chosen, rejected = batch["chosen"], batch["rejected"]
        both = {k: torch.cat([chosen[k], rejected[k]]) for k in chosen}
        logits = self.logits(model, both)
        if metrics is not None:
            for name, half, labels in zip(("chosen", "rejected"), logits.detach().chunk(2), both["labels"].chunk(2)):
                metrics[f"logits/{name}"] = mean_logits(half, labels)
        logps, valid = token_logprobs(logits, both["labels"])
        total, count = logps.sum(-1), valid.sum(-1).clamp(min=1)
        if self.loss_type == "ipo":  # IPO compares per-token averages (as TRL)
            total = total / count
        return *total.chunk(2), count

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        logit_metrics: Optional[Metrics] = {} if self.wants_metrics() else None
        policy_chosen, policy_rejected, count = self.logps(self.model, batch, logit_metrics)
        with torch.no_grad():
            ref_chosen, ref_rejected, _ = self.logps(self.reference, batch)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                                 self.label_smoothing)
        metrics.update(logit_metrics or {})
        if self.rpo_alpha:  # RPO (TRL's rpo_alpha): also keep the chosen answers likely
            chosen_tokens = count.chunk(2)[0]
            per_token = policy_chosen if self.loss_type == "ipo" else policy_chosen / chosen_tokens
            nll = -per_token.mean()
            loss = loss + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics
