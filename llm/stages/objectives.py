"""The losses of post-training, as plain functions of tensors: no model, no Lightning.

The stages in `llm.stages` (sft, reward, dpo, ppo, grpo) compute log-probs and rewards with the
model and hand them here. Definitions and defaults follow TRL's trainers, so a metric logged
here means what it means there (`rewards/margins`, `policy/clipfrac_avg`, `kl`, ...).

Conventions used throughout:

- Shapes: B rows (sequences), T positions, V vocabulary entries.
- Next-token alignment: `logits[:, t]` predicts `labels[:, t + 1]`, so `token_logprobs` returns
  T - 1 positions; position t of its output scores the token at t + 1.
- Masks are 1 (or True) on the tokens that count (completion/response tokens) and 0 on prompt and
  padding; `IGNORE_INDEX` (-100) in labels means the same as a 0 in a mask.
- Every loss returns `(loss, metrics)`: a scalar to backpropagate and a dict of detached scalars
  named as TRL names them. A metric that TRL averages over the tokens of all processes is a
  `Ratio` (its sum and its count, each summed over processes before the division); a minimum or
  maximum over the batch is an `Extreme`, taken over the batches of all processes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # the label of prompt and padding tokens (PyTorch's cross-entropy default)


class Ratio(NamedTuple):
    """A token-weighted mean kept as its two sums, so that the tokens of every process weigh alike:
    TRL gathers both sums over processes, then divides."""

    total: Tensor
    count: Tensor

    def value(self) -> Tensor:
        """total / count, and 0 where nothing was counted (as TRL)."""
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), 0.0)


class Extreme(NamedTuple):
    """A batch's minimum (`largest=False`) or maximum: over processes, the extreme of theirs
    (TRL gathers the values, then takes it)."""

    value: Tensor
    largest: bool


Metrics = dict[str, Union[Tensor, Ratio, Extreme]]


# --------------------------------------------------------------------------------------------
# Log-probabilities and masked statistics
# --------------------------------------------------------------------------------------------


def token_logprobs(
    logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the next tokens, and which of them count.

    logits (B, T, V) from the model on the whole sequence; labels (B, T), the same tokens with
    `IGNORE_INDEX` where a token is not scored (prompt, padding). Returns `(logps, valid)`, both
    (B, T - 1): `logps[:, t] = log p(labels[:, t + 1] | tokens <= t)`, 0 where not valid, and
    `valid[:, t]` True where `labels[:, t + 1]` is scored (and `mask[:, t + 1]` is set, if a
    mask (B, T) is given). `temperature` divides the logits first, as the sampler did (PPO/GRPO).
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask[:, 1:].bool()
    scores = logits[:, :-1].float()
    if temperature != 1.0:
        scores = scores / temperature
    # cross_entropy gathers one logit per position without materialising a (B, T, V) log-softmax.
    logps = -F.cross_entropy(
        scores.flatten(0, 1), targets.masked_fill(~valid, IGNORE_INDEX).flatten(), reduction="none"
    ).view_as(targets)
    return logps, valid


def sequence_logprobs(
    logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None, average: bool = False
) -> Tensor:
    """Log-probability of each row's scored tokens (the completion): (B, T, V), (B, T) -> (B,).

    The sum over scored tokens, as DPO uses it; `average=True` divides by their number (TRL
    does so for the IPO loss). Alignment and masking are those of `token_logprobs`.
    """
    logps, valid = token_logprobs(logits, labels, mask)
    total = logps.sum(-1)
    return total / valid.sum(-1).clamp(min=1) if average else total


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of x over the positions where mask is set (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the masked positions (Bessel-corrected by default, as TRL)."""
    count = mask.sum()
    if count < 2:
        raise ValueError(f"a masked variance needs at least 2 masked values, got {int(count)}")
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * count / (count - 1) if unbiased else var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise x to zero mean and unit variance over the masked positions; 0 elsewhere.

    `shift_mean=False` keeps the original mean (only rescales), as TRL does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


# --------------------------------------------------------------------------------------------
# What TRL logs of the policy's predictions (SFT's and DPO's metrics)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def token_accuracy(logits: Tensor, labels: Tensor) -> Ratio:
    """TRL's `mean_token_accuracy` (SFTTrainer): (B, T, V), (B, T) -> Ratio(correct, scored).

        correct = #{t : argmax_v logits[:, t, v] = labels[:, t + 1] != IGNORE_INDEX},
        scored = #{t : labels[:, t + 1] != IGNORE_INDEX}

    over the tokens the loss counts; the value is correct / scored (0 when none is scored), both
    sums taken over all processes first.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == targets) & scored
    return Ratio(correct.sum().float(), scored.sum())


@torch.no_grad()
def mean_entropy(logits: Tensor, mask: Tensor, chunk: int = 1024) -> Tensor:
    """TRL's `entropy` (SFTTrainer): (B, T, V), (B, T) -> scalar.

        entropy = sum_t mask_t H_t / sum_t mask_t,   H_t = -sum_v p_tv log p_tv,  p_t = softmax(logits[:, t])

    TRL averages over the attention mask: every non-padding position, prompt and last token
    included, not only the tokens the loss counts (over processes it then averages the per-process
    values). Computed `chunk` positions at a time in float32, so no (B, T, V) copy is made.
    """
    flat = logits.flatten(0, -2)
    entropies = []
    for part in flat.split(chunk):
        logp = F.log_softmax(part.float(), dim=-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
    per_token = torch.cat(entropies).view(mask.shape)
    return masked_mean(per_token, mask.float())


@torch.no_grad()
def mean_logits(logits: Tensor, labels: Tensor) -> Ratio:
    """TRL's `logits/chosen` and `logits/rejected` (DPOTrainer), one call per half of the batch:
    (B, T, V), (B, T) -> Ratio(sum, n).

        sum = sum over t with labels[:, t + 1] != IGNORE_INDEX of mean_v logits[:, t, v],
        n = the number of those t

    i.e. the mean of every vocabulary entry of the logits that predict a completion token. TRL
    1.x divides the sum over all processes by their token count; TRL 0.2x took each process's
    `logits[mask].mean()` (the same on one process) and averaged those.
    """
    scored = labels[:, 1:] != IGNORE_INDEX
    per_position = logits[:, :-1].mean(-1, dtype=torch.float32)
    return Ratio(torch.where(scored, per_position, 0.0).sum(), scored.sum())


# --------------------------------------------------------------------------------------------
# Reward modelling
# --------------------------------------------------------------------------------------------


def reward_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    margin: Optional[Union[Tensor, float]] = None,
    center_coefficient: Optional[float] = None,
) -> tuple[Tensor, Metrics]:
    """Bradley-Terry loss of a reward model on preference pairs: (B,), (B,) -> scalar.

        loss = mean(-log sigmoid(r+ - r- - margin)) [+ c * mean((r+ + r-)^2)]

    `margin` (a float or (B,)) asks for a larger gap on pairs known to differ more; the
    centring term (TRL's `center_rewards_coefficient`, e.g. 0.01) keeps rewards near zero mean,
    which Bradley-Terry alone leaves free. Metrics: `accuracy` (share of pairs with r+ > r-),
    `margin` (mean r+ - r-), and `mean_reward`/`min_reward`/`max_reward` over both answers.
    """
    gap = r_chosen - r_rejected
    loss = F.softplus(-(gap - margin) if margin is not None else -gap).mean()  # softplus(-z) = -log sigmoid(z)
    if center_coefficient:
        loss = loss + center_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    rewards = torch.cat([r_chosen, r_rejected]).detach()
    metrics = {
        "accuracy": (gap > 0).float().mean().detach(),
        "margin": gap.mean().detach(),
        "mean_reward": rewards.mean(),
        "min_reward": Extreme(rewards.min(), largest=False),
        "max_reward": Extreme(rewards.max(), largest=True),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Direct Preference Optimisation on sequence log-probs, each (B,) -> scalar.

    With h = (pi+ - ref+) - (pi- - ref-), the difference of the two log-ratios:

        sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  (eps: label_smoothing)
        ipo:     (h - 1 / (2 beta))^2   (TRL feeds it per-token *average* log-probs)
        hinge:   max(0, 1 - beta h)

    The implicit rewards are beta (pi - ref) per answer. Metrics: `rewards/chosen`,
    `rewards/rejected`, `rewards/margins` (means), `rewards/accuracies` (share of pairs whose
    chosen reward is higher), `logps/chosen`, `logps/rejected` (mean policy log-probs).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo loss_type={loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), metrics


# --------------------------------------------------------------------------------------------
# KL to the reference policy
# --------------------------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL estimate log p - log ref: unbiased for KL(p || ref) on samples of p, but
    negative on some tokens."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL estimate (ref/p) - 1 - log(ref/p) (Schulman's k3): unbiased on samples of p,
    never negative, and ~ k1^2 / 2 when the two policies are close."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """The per-token KL estimator named by config (`k1` or `k3`)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator={estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


class FixedKLController:
    """A constant KL penalty coefficient (TRL's PPO default, 0.05)."""

    def __init__(self, value: float = 0.05):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt: the coefficient stays as configured."""


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019), steered towards a target KL.

    After each rollout of `n_steps` samples: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps
    / horizon, so the penalty grows while the policy drifts further than `target` nats from the
    reference and shrinks while it stays closer.
    """

    def __init__(self, value: float = 0.2, target: float = 6.0, horizon: int = 10000):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.value = value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO's per-token rewards: -kl_coef * kl on every response token, plus the sequence's score
    on its last response token. scores (B,), kl and mask (B, T), responses right-padded -> (B, T).

    Their sum per row is `objective/rlhf_reward` = score - kl_coef * sum(kl).
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses: (B, T) each -> (advantages,
    returns), both (B, T) and 0 on padding.

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

    with V and A taken as 0 after a response's last token (the episode ends there). Whitening
    the advantages (`whiten`) is left to the caller, as in TRL's PPO.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # padding neither earns nor bootstraps
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Metrics]:
    """PPO's clipped surrogate, per token (B, T) -> scalar, averaged over the masked tokens.

        ratio = exp(logp - old_logp),  loss = mean(max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)))

    Metrics: `policy/clipfrac_avg` (share of tokens where the clipped term is the larger),
    `policy/approxkl_avg` (0.5 mean((logp - old_logp)^2)), `val/ratio` (mean ratio).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    metrics = {
        "policy/clipfrac_avg": masked_mean((clipped > unclipped).float(), mask).detach(),
        "policy/approxkl_avg": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "val/ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Metrics]:
    """PPO's clipped value loss, per token (B, T) -> scalar.

        loss = 0.5 mean(max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2))

    The clip keeps the critic from moving further than `clip` from its rollout-time values in one
    update. Metric: `val/clipfrac_avg` (share of tokens where the clipped error is the larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, {"val/clipfrac_avg": masked_mean((clipped > unclipped).float(), mask).detach()}


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

GRPO_SCALES = ("group", "batch", "none")
GRPO_AGGREGATIONS = ("token", "sequence")


def grpo_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages: (B * G,) rewards, G consecutive samples per prompt -> (B * G,).

        A_i = (r_i - mean(group)) / (std + eps)

    with the standard deviation of the group (`scale="group"`, TRL's default), of the whole batch
    (`"batch"`), or no division (`"none"`, Dr. GRPO). Each group's advantages sum to zero; a
    group whose rewards are all equal teaches nothing and gets exactly zero.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo scale_rewards={scale!r} is not one of {', '.join(GRPO_SCALES)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"grpo needs groups of at least 2 samples that divide the batch: group_size={group_size}, "
            f"{rewards.numel()} rewards"
        )
    groups = rewards.float().view(-1, group_size)
    group_std = groups.std(-1, keepdim=True)
    centred = torch.where(group_std > 0, groups - groups.mean(-1, keepdim=True), 0.0)
    if scale == "group":
        centred = centred / (group_std + eps)
    elif scale == "batch":
        centred = centred / (groups.std() + eps)
    return centred.flatten()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    clip_high: Optional[float] = None,
    ref_logp: Optional[Tensor] = None,
    beta: float = 0.0,
    aggregation: str = "token",
    n_tokens: Optional[Union[Tensor, float]] = None,
) -> tuple[Tensor, Metrics]:
    """GRPO's clipped objective: per-token log-probs (B, T), one advantage per sequence (B,).

        ratio = exp(logp - old_logp)
        l_t = -min(ratio A, clip(ratio, 1 - clip, 1 + clip_high) A) + beta k3(logp, ref_logp)

    `aggregation="token"` (TRL's "dapo"/"bnpo") divides the sum over every completion token by
    their number, so long completions weigh by their length; under DDP or gradient accumulation
    pass the whole global batch's token count as `n_tokens` so every rank divides alike.
    `"sequence"` (TRL's original "grpo") averages each completion's tokens first, then the rows.
    `clip_high` defaults to `clip` (DAPO suggests 0.28). `beta` (default 0, TRL's) adds the k3
    KL to the reference, which then must be given.

    Metrics: `kl` (mean k3 over tokens, when `ref_logp` is given), `clip_ratio/low_mean`,
    `clip_ratio/high_mean`, `clip_ratio/region_mean` (shares of tokens whose ratio was clipped
    below / above / either, counting only clips that change the gradient).
    """
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"grpo aggregation={aggregation!r} is not one of {', '.join(GRPO_AGGREGATIONS)}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"grpo beta={beta} penalises the KL to the reference: pass ref_logp")
    clip_high = clip if clip_high is None else clip_high
    mask = mask.to(logp.dtype)
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip_high) * adv)
    metrics: Metrics = {}
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    if aggregation == "token":
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    else:
        loss = masked_mean(per_token, mask, dim=-1).mean()
    low = (ratio < 1 - clip) & (adv < 0)
    high = (ratio > 1 + clip_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(low.float(), mask).detach()
    metrics["clip_ratio/high_mean"] = masked_mean(high.float(), mask).detach()
    metrics["clip_ratio/region_mean"] = masked_mean((low | high).float(), mask).detach()
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Distillation (TRL's GKDTrainer conventions)
# --------------------------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p || q) per position over the last axis, with 0 log 0 = 0 (p may be exactly 0 where a
    top-k teacher dropped a token): sum_v p_v (log p_v - log q_v)."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), 0.0).sum(-1)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(teacher || student) at each position (..., V) -> (...): mass-covering; TRL's beta = 0."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(student || teacher) at each position: mode-seeking; TRL's beta = 1. Infinite where the
    student puts mass on a token the teacher gives probability 0 (hence no top-k teacher)."""
    return _kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """TRL's `generalized_jsd_loss` at each position, log-probs (..., V) -> (...):

        M = beta teacher + (1 - beta) student
        JSD_beta = beta KL(teacher || M) + (1 - beta) KL(student || M)

    beta = 0 and beta = 1 are TRL's special cases, the forward and the reverse KL (the formula
    itself would vanish there); beta = 0.5 is the symmetric Jensen-Shannon divergence."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD beta={beta}: must lie in [0, 1]")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    mixture = torch.logsumexp(torch.stack([student_logp + math.log(1 - beta), teacher_logp + math.log(beta)]), dim=0)
    return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance at each position: 1/2 sum_v |student_v - teacher_v|, in [0, 1]."""
    return 0.5 * (student_logp.exp() - teacher_logp.exp()).abs().sum(-1)


def token_divergence(student_logp: Tensor, teacher_logp: Tensor, divergence: str, beta: float = 0.5) -> Tensor:
    """The chosen divergence (one of DIVERGENCES) at each position."""
    if divergence == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if divergence == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if divergence == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    if divergence == "tv":
        return total_variation(student_logp, teacher_logp)
    raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")


def teacher_log_probs(teacher_logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> Tensor:
    """The teacher's log-probabilities at `temperature`: (..., V) -> (..., V). With `top_k`, only
    its k most likely tokens per position keep their mass, renormalised over those k; every other
    token gets log-probability -inf (probability 0). k >= V is the full distribution."""
    scores = teacher_logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        values, indices = scores.topk(top_k, dim=-1)
        kept = torch.full_like(scores, float("-inf")).scatter(-1, indices, values)
        return F.log_softmax(kept, dim=-1)
    return F.log_softmax(scores, dim=-1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
) -> tuple[Tensor, Ratio]:
    """The mean divergence between student and teacher over the completion tokens, as TRL's
    GKDTrainer computes it: (B, T, V), (B, T, V), (B, T) -> (loss, Ratio(sum, tokens)).

    Both logits are divided by `temperature` before their softmax (TRL divides both). Positions
    follow the next-token alignment: `logits[:, t]` is compared where `labels[:, t + 1]` is not
    IGNORE_INDEX (the prompt, template and padding are not distilled), and the loss is the sum
    over those positions divided by their number (TRL's "batchmean" with labels). The teacher's
    logits carry no gradient. `top_k` keeps the teacher's k most likely tokens per position
    (`teacher_log_probs`). The Ratio is the metric summed over processes as TRL gathers it."""
    scored = labels[:, 1:] != IGNORE_INDEX
    student = F.log_softmax(student_logits[:, :-1][scored].float() / temperature, dim=-1)
    with torch.no_grad():
        teacher = teacher_log_probs(teacher_logits[:, :-1][scored].detach(), temperature, top_k)
    per_token = token_divergence(student, teacher, divergence, beta)
    total, count = per_token.sum(), scored.sum()
    loss = total / count.clamp(min=1)
    return loss, Ratio(total.detach(), count)
