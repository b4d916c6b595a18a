"""PPO-style RLHF (TRL's PPOTrainer recipe): an actor (the policy), a critic (a value model), a
frozen reference and a reward (a reward model or a function). Each rollout samples one
completion per prompt; per-token rewards are the KL penalty to the reference plus the score on
the last token; GAE gives advantages and returns; then `num_ppo_epochs` x `num_mini_batches`
updates of the clipped policy loss and the clipped value loss, one optimizer step each."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from llm.config.methods import PPOConfig
from llm.config.validate import method_arguments
from llm.model.value import ValueModel
from llm.stages.grpo import OnPolicyModule
from llm.stages.objectives import (AdaptiveKLController, FixedKLController, gae, kl_estimate, kl_penalized_rewards,
                                   ppo_policy_loss, ppo_value_loss, whiten)
from llm.stages.rollout import Rollout


class PPOModule(OnPolicyModule):
    stage = "ppo"
    needs_reference = True

    def __init__(self, *args: Any, num_ppo_epochs: int = 4, num_mini_batches: int = 1, kl_coef: float = 0.05,
                 kl_estimator: str = "k1", adaptive_kl: bool = False, kl_target: float = 6.0, kl_horizon: int = 10000,
                 cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0,
                 lam: float = 0.95, whiten_rewards: bool = False, **kwargs: Any):
        c = method_arguments(PPOConfig, kwargs, num_ppo_epochs=num_ppo_epochs, num_mini_batches=num_mini_batches,
                             kl_coef=kl_coef, kl_estimator=kl_estimator, adaptive_kl=adaptive_kl, kl_target=kl_target,
                             kl_horizon=kl_horizon, cliprange=cliprange, cliprange_value=cliprange_value,
                             vf_coef=vf_coef, gamma=gamma, lam=lam, whiten_rewards=whiten_rewards)
        super().__init__(*args, **kwargs)
        self.num_ppo_epochs, self.num_mini_batches = c.num_ppo_epochs, c.num_mini_batches
        self.kl = (AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
                   else FixedKLController(c.kl_coef))
        self.kl_estimator = c.kl_estimator
        self.cliprange, self.cliprange_value, self.vf_coef = c.cliprange, c.cliprange_value, c.vf_coef
        self.gamma, self.lam, self.whiten_rewards = c.gamma, c.lam, c.whiten_rewards
        self.critic: Optional[nn.Module] = None
        self.critic_init: Any = None  # llm.checkpoint.Parent of a reward model, set by the run

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        # The critic starts from the reward model when there is one (as TRL does), else from the
        # policy's weights with a fresh value head. It is trained whole, also under LoRA.
        source = self.critic_init or self.parent
        critic = source.load(value_head=True) if source is not None else ValueModel(self.model_config)
        self.critic = self.parallelism.parallelize(critic, getattr(self, "device_mesh", None))

    def trained_module(self) -> nn.Module:
        return nn.ModuleList([self.model, self.critic])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        updates = self.num_ppo_epochs * self.num_mini_batches
        if self.rollout is None or self.rollout_uses >= updates:
            self.new_rollout(batch)
        b = self.buffer
        rows = self.minibatch_rows[self.rollout_uses]
        self.rollout_uses += 1
        r = self.rollout
        logps = self.policy_logps(self.model, r)[rows]
        values = self.values(r)[rows]
        mask = r.response_mask[rows]
        policy_loss, policy_metrics = ppo_policy_loss(logps, b["logps"][rows], b["advantages"][rows], mask,
                                                      self.cliprange)
        value_loss, value_metrics = ppo_value_loss(values, b["values"][rows], b["returns"][rows], mask,
                                                   self.cliprange_value)
        loss = policy_loss + self.vf_coef * value_loss
        self.log_progress(loss)
        self.log_metrics("train/", {**policy_metrics, **value_metrics, "loss/policy_avg": policy_loss.detach(),
                                    "loss/value_avg": value_loss.detach(), **self.rollout_metrics})
        return loss + self.router_loss()  # an MoE actor's and critic's router losses

    def values(self, rollout: Rollout) -> Tensor:
        """(N, L): the critic's value of the state before each completion token."""
        return rollout.responses(rollout.forward(self.critic)[:, :-1])

    @torch.no_grad()
    def new_rollout(self, batch: dict[str, Any]) -> None:
        r = self.rollout = self.sample(batch, 1)
        self.rollout_uses = 0
        scores = self.scorer(r)
        mask = r.response_mask
        logps = self.policy_logps(self.model, r)
        ref_logps = self.policy_logps(self.reference, r)
        values = self.values(r)
        kl = kl_estimate(logps, ref_logps, self.kl_estimator) * mask
        rewards = kl_penalized_rewards(scores, kl, mask, self.kl.value)
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        advantages = whiten(advantages, mask)
        self.buffer = {"logps": logps, "values": values, "advantages": advantages, "returns": returns}
        # Each epoch visits every row once, in minibatches of a fresh (seeded) order.
        n, generator = mask.shape[0], torch.Generator().manual_seed(self.global_step)
        self.minibatch_rows = [chunk.to(mask.device) for _ in range(self.num_ppo_epochs)
                               for chunk in torch.randperm(n, generator=generator).chunk(self.num_mini_batches)]
        kl_sum = kl.sum(-1)
        self.rollout_metrics = {
            "objective/kl": kl_sum.mean(),
            "objective/scores": scores.mean(), "objective/rlhf_reward": (scores - self.kl.value * kl_sum).mean(),
            "objective/non_score_reward": (-self.kl.value * kl_sum).mean(), "objective/kl_coef": torch.tensor(self.kl.value),
            "completions/mean_length": r.lengths.mean(),
        }
        self.kl.update(float(kl_sum.mean()), n)
        self.record_samples(r, scores)
