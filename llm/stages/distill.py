"""Distillation: a student learns a frozen teacher's next-token distribution (TRL's GKDTrainer).

Over the same rows as SFT, the loss is a divergence between the student's and the teacher's
distributions at every completion token (forward KL, reverse KL, TRL's generalized JSD with
`beta`, or total variation; both logits divided by `temperature`), plus optionally `nll_weight` x
the ordinary next-token loss. A seeded `lmbda` share of the training batches is on-policy (GKD):
the student samples completions of the batch's prompts (llm.stages.rollout) and the teacher
scores those instead of the rows' own completions.

The teacher stays frozen, in eval mode and whole on every rank (like DPO's reference); it is not
a submodule of the LightningModule, so it is neither in the optimizer nor in the checkpoints.

With `corpus` (pretraining-time distillation) the batches are the pretraining corpus's packed
blocks instead (llm.data.LMDataModule: the same stream as a pretraining run with the same data,
seed and shape): the divergence is the mean over every position of every block, always
off-policy, and `val/loss` is the student's plain next-token loss on pretraining's validation
split, so a distilled student and one trained from scratch compare directly.

Logged: `train/loss`, TRL's SFT metrics (`mean_token_accuracy`, `num_tokens`), `distill_loss`
(the divergence), `nll_loss`, `on_policy_fraction` (share of the optimizer steps so far that were
on-policy, kept across a resume), and under `val/` the divergence on held-out rows as `val/loss`
(with `corpus`: the next-token loss) with `val/nll_loss` and its perplexity `val/ppl` (comparable
with an SFT or pretraining run's)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.config.methods import DistillConfig
from llm.config.validate import method_arguments
from llm.stages.objectives import (IGNORE_INDEX, Metrics, distillation_loss, teacher_log_probs, token_accuracy,
                                   token_divergence)
from llm.stages.posttrain import SupervisedModule, masked_lm_loss
from llm.stages.pretrain import next_token_loss
from llm.stages.rollout import sample_rollout


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether training step `step` samples its completions from the student: a Bernoulli(lmbda)
    draw seeded by (seed, step), so the share of on-policy steps is `lmbda` in expectation, the
    same on every rank (they sample in lockstep) and again on a resume. 0: never, 1: always."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    draw = torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    return bool(draw < lmbda)


def on_policy_count(seed: int, steps: int, lmbda: float) -> int:
    """How many of the optimizer steps 0 .. steps - 1 were on-policy (`on_policy_step`'s draws)."""
    if lmbda <= 0.0 or lmbda >= 1.0:
        return steps if lmbda >= 1.0 else 0
    return sum(on_policy_step(seed, step, lmbda) for step in range(steps))


def prompts_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first trained label (at least one token)."""
    prompts = []
    for tokens, labels in zip(batch["tokens"].tolist(), batch["labels"].tolist()):
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        prompts.append(tokens[:max(first, 1)])
    return prompts


class DistillModule(SupervisedModule):
    stage = "distill"
    data_kind = "sft"
    counts_tokens = True
    # On-policy batches score the student's own samples: their loss swings with what it sampled.
    loss_spikes_are_faults = False

    def __init__(self, *args: Any, teacher: Optional[str] = None, divergence: str = "jsd", beta: float = 0.5,
                 temperature: float = 0.9, lmbda: float = 0.5, max_new_tokens: int = 16, top_k: Optional[int] = None,
                 nll_weight: float = 0.0, corpus: bool = False, **kwargs: Any):
        c = method_arguments(DistillConfig, kwargs, teacher=teacher, divergence=divergence, beta=beta,
                             temperature=temperature, lmbda=lmbda, max_new_tokens=max_new_tokens, top_k=top_k,
                             nll_weight=nll_weight, corpus=corpus)
        if c.corpus and c.lmbda > 0:  # the config's validation says it with the keys; this guards direct use
            raise ValueError(f"lmbda={c.lmbda} with corpus=true: the corpus has no prompts to sample from; use lmbda=0")
        super().__init__(*args, **kwargs)
        self.divergence, self.beta, self.temperature = c.divergence, c.beta, c.temperature
        self.lmbda, self.max_new_tokens, self.top_k, self.nll_weight = c.lmbda, c.max_new_tokens, c.top_k, c.nll_weight
        self.corpus = c.corpus
        self.teacher_source: Any = None  # llm.checkpoint.Parent of posttrain.teacher, set by the run
        # Optimizer steps counted so far and how many of them were on-policy: saved in the
        # checkpoints, so a resumed (or rolled back, or branched) run's fraction goes on from there.
        self.on_policy_steps = 0
        self.steps_seen = 0

    # --- the frozen teacher --------------------------------------------------------------------

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self.__dict__.get("_teacher")

    def set_teacher(self, network: nn.Module) -> None:
        # Held outside nn.Module's registry (which `self.x = module` would use): no optimizer, no
        # checkpoint, no DDP/FSDP wrapping, and Lightning's train() never reaches it (it stays in eval mode).
        self.__dict__["_teacher"] = network.requires_grad_(False).eval()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.teacher is None and self.teacher_source is not None:
            self.set_teacher(self.teacher_source.load(value_head=False))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher is not None:
            self.teacher.to(self.device)

    def teacher_logits(self, tokens: Tensor, positions: Optional[Tensor] = None,
                       mask: Optional[Tensor] = None) -> Tensor:
        if self.teacher is None:
            raise RuntimeError("posttrain=distill: no teacher network (set teacher_source before configure_model)")
        with torch.no_grad():
            return self.teacher(tokens) if positions is None else self.teacher(tokens, positions, mask=mask)

    # --- the loss ------------------------------------------------------------------------------

    def divergence_loss(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Any]:
        return distillation_loss(student_logits, teacher_logits, labels, self.divergence, self.beta, self.temperature,
                                 self.top_k)

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        """The rows' own completions, scored by student and teacher (validation, off-policy steps)."""
        logits = self.logits(self.model, batch)
        divergence, ratio = self.divergence_loss(logits, self.teacher_logits(batch["tokens"]), batch["labels"])
        nll = masked_lm_loss(logits, batch["labels"])
        loss = divergence + self.nll_weight * nll if self.nll_weight else divergence
        metrics: Metrics = {"distill_loss": ratio, "nll_loss": nll.detach()}
        if self.wants_metrics():
            metrics["mean_token_accuracy"] = token_accuracy(logits, batch["labels"])
        return loss, metrics

    def on_policy_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        """GKD's on-policy batch: the student samples completions of the rows' prompts at the
        loss's temperature; the divergence is taken on those. The next-token term (nll_weight)
        still reads the rows' own completions."""
        sharded = bool(getattr(self.parallelism, "sharded_checkpoints", False))
        seed = int(self.data_config.get("seed", 0)) * 1_000_003 + self.global_step * 101 + self.global_rank
        generator = torch.Generator(device=self.device).manual_seed(seed)
        # Prompt + completion fit the model's context (an absolute position table ends there): long
        # prompts keep their last tokens. The same on every rank, so the ranks sample in lockstep.
        budget = min(self.max_new_tokens, self.model_config.max_seq_len - 1)
        prompts = [p[-(self.model_config.max_seq_len - budget):] for p in prompts_of(batch)]
        rollout = sample_rollout(self.model, prompts, [{}] * len(prompts), 1, budget, self.temperature,
                                 self.tokenizer.eos_id, self.tokenizer.pad_id, generator, lockstep=sharded)
        logits = rollout.forward(self.model)
        teacher = self.teacher_logits(rollout.tokens, rollout.positions, rollout.mask)
        loss, ratio = self.divergence_loss(logits, teacher, rollout.labels)
        metrics: Metrics = {"distill_loss": ratio, "completions/mean_length": rollout.lengths.mean()}
        if self.nll_weight:
            nll = masked_lm_loss(self.logits(self.model, batch), batch["labels"])
            loss = loss + self.nll_weight * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics

    def corpus_step(self, batch: Tensor) -> tuple[Tensor, Metrics]:
        """A micro-batch of the corpus's blocks (B, T + 1): the divergence at every one of the B x T
        positions (a mean), and the ordinary next-token loss of the same logits."""
        tokens = batch[:, :-1]
        logits = self.model(tokens)
        student = F.log_softmax(logits.float() / self.temperature, dim=-1)
        with torch.no_grad():
            teacher = teacher_log_probs(self.teacher_logits(tokens), self.temperature, self.top_k)
        divergence = token_divergence(student, teacher, self.divergence, self.beta).mean()
        nll = next_token_loss(logits, batch[:, 1:])
        loss = divergence + self.nll_weight * nll if self.nll_weight else divergence
        metrics: Metrics = {"distill_loss": divergence.detach(), "nll_loss": nll.detach()}
        if self.wants_metrics():
            metrics["mean_token_accuracy"] = (logits.argmax(-1) == batch[:, 1:]).float().mean()
        return loss, metrics

    def count_step(self, on_policy: bool) -> None:
        """Count the optimizer step under way once (its first micro-batch)."""
        step = self.global_step
        if self.steps_seen > step:  # another micro-batch of a step already counted
            return
        if self.steps_seen < step:  # a checkpoint without the counts (an older run): its steps' seeded draws
            self.on_policy_steps = on_policy_count(int(self.data_config.get("seed", 0)), step, self.lmbda)
            self.steps_seen = step
        self.steps_seen += 1
        self.on_policy_steps += int(on_policy)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.corpus:
            loss, metrics = self.corpus_step(batch)
            # Every position of a block is trained: the tokens count whole (TRL's num_tokens).
            self.count_tokens(batch.new_tensor(batch[:, :-1].numel()))
            metrics["num_tokens"] = self.num_tokens
            self.log_progress(loss)
            self.log_metrics("train/", metrics)
            return loss + self.router_loss()
        seed = int(self.data_config.get("seed", 0))
        on_policy = on_policy_step(seed, self.global_step, self.lmbda)
        self.count_step(on_policy)
        loss, metrics = self.on_policy_loss(batch) if on_policy else self.step(batch)
        # The ranks agree on `on_policy` (same seed and step), so they log the same names, as the
        # all-reduce of reduce_over_processes needs.
        metrics["on_policy_fraction"] = torch.tensor(self.on_policy_steps / self.steps_seen)
        self.count_tokens(batch["mask"])
        metrics["num_tokens"] = self.num_tokens
        self.log_progress(loss)
        self.log_metrics("train/", metrics)
        return loss + self.router_loss()

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, metrics = self.corpus_step(batch) if self.corpus else self.step(batch)
        # On the corpus, val/loss is pretraining's: the next-token loss on its validation blocks.
        reported = metrics["nll_loss"] if self.corpus else loss
        self.log("val/loss", reported, prog_bar=True, sync_dist=True)
        self.log_metrics("val/", metrics)
        return loss

    # --- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["llm"]["on_policy"] = {"steps": int(self.steps_seen), "on_policy_steps": int(self.on_policy_steps)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        counts = (checkpoint.get("llm") or {}).get("on_policy")
        if isinstance(counts, dict):
            self.steps_seen, self.on_policy_steps = int(counts["steps"]), int(counts["on_policy_steps"])
        else:  # derived from the step by count_step
            self.steps_seen, self.on_policy_steps = 0, 0

    def on_validation_epoch_end(self) -> None:
        """The student's perplexity on the held-out completions or blocks (its next-token loss),
        comparable with an SFT or pretraining run's `val/ppl`; `val/loss` is the distillation
        objective on rows, the next-token loss on the corpus."""
        nll = self.trainer.callback_metrics.get("val/nll_loss")
        if nll is not None:
            self.log("val/ppl", math.exp(min(float(nll), 50.0)), sync_dist=True)
