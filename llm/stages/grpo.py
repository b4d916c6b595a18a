"""Group Relative Policy Optimisation: G sampled completions per prompt, advantages normalised
within each group, a clipped objective aggregated over tokens, optionally a k3 KL penalty to a
frozen reference (TRL's defaults: beta 0, clip 0.2, one iteration per rollout)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from llm.config.methods import GRPOConfig
from llm.config.validate import method_arguments
from llm.stages.objectives import grpo_advantages, grpo_loss, token_logprobs
from llm.stages.posttrain import PostTrainModule
from llm.stages.rollout import Rollout, sample_rollout


class OnPolicyModule(PostTrainModule):
    """What PPO and GRPO share: prompts in, a rollout every `iterations` optimizer steps (all
    ranks roll out at the same steps), scored by `self.scorer` (set by the run: a task checker
    or a reward model)."""

    data_kind = "prompt"

    def __init__(self, *args: Any, max_new_tokens: int = 16, temperature: float = 1.0,
                 reward_model: Optional[str] = None, samples_every_n_steps: int = 50, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.samples_every_n_steps = samples_every_n_steps  # sampled completions to samples.jsonl / a W&B Table
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.reward_model = reward_model  # a reward run; None: the tasks' checker (see llm.posttraining)
        self.scorer: Any = None
        self.samples: Any = None  # llm.tracking.samples log, set by the run
        self.rollout: Optional[Rollout] = None
        self.rollout_uses = 0

    def generator(self) -> torch.Generator:
        """Sampling randomness as a function of (seed, step, rank): reproducible, different per rank."""
        seed = int(self.data_config.get("seed", 0)) * 1_000_003 + self.global_step * 101 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, batch: dict[str, Any], samples_per_prompt: int) -> Rollout:
        sharded = bool(getattr(self.parallelism, "sharded_checkpoints", False))
        return sample_rollout(self.model, batch["prompts"], batch["meta"], samples_per_prompt, self.max_new_tokens,
                              self.temperature, self.tokenizer.eos_id, self.tokenizer.pad_id, self.generator(),
                              lockstep=sharded)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Greedy answers to held-out prompts, scored as in training: `val/reward`."""
        sharded = bool(getattr(self.parallelism, "sharded_checkpoints", False))
        rollout = sample_rollout(self.model, batch["prompts"], batch["meta"], 1, self.max_new_tokens, 0.0,
                                 self.tokenizer.eos_id, self.tokenizer.pad_id, lockstep=sharded)
        reward = self.scorer(rollout).mean()
        self.log("val/reward", reward, prog_bar=True, sync_dist=True, batch_size=len(batch["prompts"]))
        return reward

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.scorer is not None and self.scorer.model is not None:
            self.scorer.model.to(self.device)

    def policy_logps(self, model: torch.nn.Module, rollout: Rollout) -> Tensor:
        """(N, L): log-prob of each completion token under `model`, at the sampling temperature."""
        logps, _ = token_logprobs(rollout.forward(model), rollout.labels, temperature=self.temperature)
        return rollout.responses(logps)

    def record_samples(self, rollout: Rollout, scores: Tensor) -> None:
        if self.samples is not None and self.global_rank == 0 and self.samples.due(self.global_step):
            rows = [{"prompt": self.tokenizer.decode(p), "completion": self.tokenizer.decode(c), "reward": float(s)}
                    for p, c, s in zip(rollout.prompts, rollout.completions, scores.tolist())]
            self.samples.log(self.global_step, rows)


class GRPOModule(OnPolicyModule):
    stage = "grpo"

    def __init__(self, *args: Any, num_generations: int = 8, beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: Optional[float] = None, scale_rewards: str = "group", loss_aggregation: str = "token",
                 num_iterations: int = 1, **kwargs: Any):
        c = method_arguments(GRPOConfig, kwargs, num_generations=num_generations, beta=beta, epsilon=epsilon,
                             epsilon_high=epsilon_high, scale_rewards=scale_rewards, loss_aggregation=loss_aggregation,
                             num_iterations=num_iterations)
        super().__init__(*args, **kwargs)
        self.num_generations, self.beta = c.num_generations, c.beta
        self.epsilon, self.epsilon_high = c.epsilon, c.epsilon_high
        self.scale_rewards, self.loss_aggregation, self.num_iterations = c.scale_rewards, c.loss_aggregation, c.num_iterations
        self.needs_reference = c.beta > 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.rollout is None or self.rollout_uses >= self.num_iterations:
            self.new_rollout(batch)
        self.rollout_uses += 1
        r = self.rollout
        mask = r.response_mask
        logps = self.policy_logps(self.model, r)
        old = logps.detach() if self.num_iterations == 1 else self.old_logps
        loss, metrics = grpo_loss(logps, old, self.advantages, mask, self.epsilon, self.epsilon_high, self.ref_logps,
                                  self.beta, self.loss_aggregation)
        self.log_progress(loss)
        self.log_metrics("train/", {**metrics, **self.rollout_metrics})
        return loss + self.router_loss()  # an MoE policy's router losses

    @torch.no_grad()
    def new_rollout(self, batch: dict[str, Any]) -> None:
        r = self.rollout = self.sample(batch, self.num_generations)
        self.rollout_uses = 0
        rewards = self.scorer(r)
        self.advantages = grpo_advantages(rewards, self.num_generations, self.scale_rewards)
        self.old_logps = self.policy_logps(self.model, r) if self.num_iterations > 1 else None
        self.ref_logps = self.policy_logps(self.reference, r) if self.reference is not None else None
        groups = rewards.view(-1, self.num_generations)
        self.rollout_metrics = {
            "reward": rewards.mean(), "reward_std": groups.std(-1).mean(),
            "frac_reward_zero_std": (groups.std(-1) == 0).float().mean(),
            "completions/mean_length": r.lengths.mean(),
            "completions/clipped_ratio": (r.lengths >= self.max_new_tokens).float().mean(),
        }
        self.record_samples(r, rewards)
