"""The post-training losses (`llm.stages.objectives`) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm.stages.objectives import (
    IGNORE_INDEX,
    AdaptiveKLController,
    FixedKLController,
    Ratio,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    kl_k1,
    kl_k3,
    kl_penalized_rewards,
    masked_mean,
    mean_entropy,
    mean_logits,
    ppo_policy_loss,
    ppo_value_loss,
    reward_loss,
    sequence_logprobs,
    token_accuracy,
    token_logprobs,
    whiten,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def approx(value: torch.Tensor | float, expected: float, tol: float = 1e-6) -> bool:
    value = value.detach() if isinstance(value, torch.Tensor) else value
    return abs(float(value) - expected) <= tol


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------

# Each position's next-token distribution over a 3-token vocabulary.
PROBS = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]])


def test_token_logprobs_score_the_next_token_and_skip_ignored_labels():
    logits = PROBS.log() + 7.0  # a constant shift: log-softmax must remove it
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 0]])  # position 0 (the prompt) is never scored
    logps, valid = token_logprobs(logits, labels)
    # logits[:, t] predicts labels[:, t + 1]: p(1 | pos 0) = 0.25, p(2 | pos 1) = 0.3, p(0 | pos 2) = 0.2.
    assert logps.shape == valid.shape == (1, 3)
    torch.testing.assert_close(logps, torch.log(t(0.25, 0.3, 0.2))[None])
    assert valid.tolist() == [[True, True, True]]

    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX]])  # prompt, answer, padding
    logps, valid = token_logprobs(logits, labels)
    assert valid.tolist() == [[False, True, False]]
    torch.testing.assert_close(logps, torch.tensor([[0.0, math.log(0.3), 0.0]]))


def test_sequence_logprobs_sum_or_average_the_scored_tokens():
    logits = PROBS.log()
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 0]])
    expected = math.log(0.25) + math.log(0.3) + math.log(0.2)
    assert approx(sequence_logprobs(logits, labels)[0], expected, 1e-5)
    assert approx(sequence_logprobs(logits, labels, average=True)[0], expected / 3, 1e-5)
    # A mask drops tokens too: only the last answer token counts.
    mask = torch.tensor([[0, 0, 0, 1]])
    assert approx(sequence_logprobs(logits, labels, mask)[0], math.log(0.2), 1e-5)


def test_token_logprobs_temperature_divides_the_logits():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    logps, _ = token_logprobs(logits, labels, temperature=0.7)
    expected = F.log_softmax(logits[:, :-1] / 0.7, -1).gather(-1, labels[:, 1:, None])[..., 0]
    torch.testing.assert_close(logps, expected)


# --------------------------------------------------------------------------------------------
# TRL's SFT and DPO metrics of the predictions
# --------------------------------------------------------------------------------------------


def one_hot_logits(argmaxes: list[list[int]], vocab: int = 3) -> torch.Tensor:
    """Logits whose argmax at [b, t] is argmaxes[b][t] (5 there, 0 elsewhere)."""
    return 5.0 * F.one_hot(torch.tensor(argmaxes), vocab).float()


def test_token_accuracy_compares_each_prediction_with_the_next_scored_label():
    logits = one_hot_logits([[1, 2, 0, 2], [0, 0, 1, 1]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 1],  # prompt, then 3 answer tokens
                           [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]])  # prompt, 1 answer token, padding
    # By hand: row 0 predicts 1, 2, 0 for labels 1, 2, 1 (2 right); row 1 predicts 0 at t=1 for label 1.
    correct, scored = token_accuracy(logits, labels)
    assert (float(correct), int(scored)) == (2.0, 4)
    assert approx(token_accuracy(logits, labels).value(), 0.5)
    # Nothing scored: 0, as TRL (not a division by zero).
    assert float(token_accuracy(logits, torch.full_like(labels, IGNORE_INDEX)).value()) == 0.0


def entropy_of(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs)


def test_mean_entropy_averages_every_non_padding_position_as_trl():
    # Row 0: the four PROBS positions, all real. Row 1: two real positions, then padding whose
    # (near-certain) distributions must not count.
    padding = [0.98, 0.01, 0.01]
    probs = torch.tensor([PROBS[0].tolist(), [[1 / 3] * 3, [0.5, 0.25, 0.25], padding, padding]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    by_hand = [entropy_of(0.5, 0.25, 0.25), entropy_of(0.1, 0.6, 0.3), entropy_of(0.2, 0.2, 0.6), math.log(3),
               math.log(3), 1.5 * math.log(2)]
    assert approx(mean_entropy(probs.log() + 3.0, mask), sum(by_hand) / 6, 1e-6)
    assert approx(mean_entropy(probs.log(), mask, chunk=1), sum(by_hand) / 6, 1e-6)  # chunking changes nothing


def test_mean_logits_average_the_vocabulary_of_the_logits_predicting_completion_tokens():
    # Vocabulary means 1, 2, 3, 4 at positions 0..3; the completion is tokens 2 and 3, which
    # positions 1 and 2 predict.
    logits = torch.tensor([[[0.0, 2.0], [1.0, 3.0], [4.0, 2.0], [10.0, -2.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 7]])
    total, count = mean_logits(logits, labels)
    assert (float(total), int(count)) == (5.0, 2)
    assert approx(Ratio(total, count).value(), 2.5)


# --------------------------------------------------------------------------------------------
# Reward modelling
# --------------------------------------------------------------------------------------------


def test_reward_loss_is_softplus_of_the_negative_gap_with_its_metrics():
    chosen, rejected = t(2.0, 0.5, -1.0), t(1.0, 1.5, -3.0)
    loss, metrics = reward_loss(chosen, rejected)
    gaps = [1.0, -1.0, 2.0]
    assert approx(loss, sum(math.log1p(math.exp(-g)) for g in gaps) / 3)
    assert approx(metrics["accuracy"], 2 / 3)
    assert approx(metrics["margin"], 2 / 3)
    assert approx(metrics["mean_reward"], (2.0 + 0.5 - 1.0 + 1.0 + 1.5 - 3.0) / 6)
    assert approx(metrics["min_reward"].value, -3.0) and approx(metrics["max_reward"].value, 2.0)
    assert not metrics["min_reward"].largest and metrics["max_reward"].largest


def test_reward_loss_margin_and_centring():
    chosen, rejected = t(2.0, 0.5), t(1.0, 1.5)
    loss, _ = reward_loss(chosen, rejected, margin=t(0.5, 1.0))
    assert approx(loss, (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2.0))) / 2)
    centred, _ = reward_loss(chosen, rejected, center_coefficient=0.01)
    plain, _ = reward_loss(chosen, rejected)
    assert approx(centred - plain, 0.01 * (3.0**2 + 2.0**2) / 2)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def test_dpo_loss_is_ln2_with_zero_rewards_when_policy_equals_reference():
    logps_chosen, logps_rejected = t(-4.0, -7.5, -1.0), t(-6.0, -2.0, -1.0)
    loss, metrics = dpo_loss(logps_chosen, logps_rejected, logps_chosen.clone(), logps_rejected.clone())
    assert approx(loss, math.log(2))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert approx(metrics[key], 0.0), key
    assert approx(metrics["logps/chosen"], -12.5 / 3, 1e-5)
    assert approx(metrics["logps/rejected"], -3.0)


# Policy moved 1 nat towards the chosen answer and 1 nat away from the rejected one: h = 2.
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


@pytest.mark.parametrize(
    "loss_type, beta, smoothing, expected",
    [
        ("sigmoid", 0.1, 0.0, math.log1p(math.exp(-0.2))),
        ("sigmoid", 0.1, 0.1, 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))),
        ("ipo", 0.1, 0.0, (2.0 - 5.0) ** 2),  # (h - 1 / (2 beta))^2
        ("ipo", 0.5, 0.0, (2.0 - 1.0) ** 2),
        ("hinge", 0.1, 0.0, 0.8),  # max(0, 1 - 0.2)
        ("hinge", 1.0, 0.0, 0.0),  # margin already met
    ],
)
def test_dpo_loss_types_on_a_fixed_pair(loss_type, beta, smoothing, expected):
    loss, metrics = dpo_loss(*PAIR, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    assert approx(loss, expected, 1e-5)
    assert approx(metrics["rewards/chosen"], beta * 1.0)
    assert approx(metrics["rewards/rejected"], -beta * 1.0)
    assert approx(metrics["rewards/margins"], 2 * beta)
    assert approx(metrics["rewards/accuracies"], 1.0)
    assert approx(metrics["logps/chosen"], -1.0) and approx(metrics["logps/rejected"], -3.0)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected_answer():
    chosen, rejected = t(-2.0, -3.0).requires_grad_(), t(-2.0, -1.0).requires_grad_()
    loss, metrics = dpo_loss(chosen, rejected, t(-2.0, -2.0), t(-2.0, -2.0))
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    assert approx(metrics["rewards/accuracies"], 0.0)  # row 0 ties, row 1 prefers the rejected answer


def test_dpo_unknown_loss_type_names_the_choices():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        dpo_loss(*PAIR, loss_type="kto")


# --------------------------------------------------------------------------------------------
# KL estimators and controllers
# --------------------------------------------------------------------------------------------


def test_kl_estimators_values_sign_and_small_difference_limit():
    logp, ref = t(-1.0, -2.0, -0.5), t(-1.5, -1.0, -0.5)
    torch.testing.assert_close(kl_k1(logp, ref), t(0.5, -1.0, 0.0))
    torch.testing.assert_close(kl_k3(logp, ref), t(math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0))
    assert torch.equal(kl_estimate(logp, ref, "k3"), kl_k3(logp, ref))

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=generator) * 3, torch.randn(1000, generator=generator) * 3
    assert (kl_k3(a, b) >= 0).all()  # k3 is never negative, k1 often is
    assert (kl_k1(a, b) < 0).any()
    small = 1e-2 * torch.randn(1000, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(kl_k3(small, torch.zeros_like(small)), small**2 / 2, rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="k1, k3"):
        kl_estimate(logp, ref, "k2")


def test_kl_estimators_are_unbiased_on_samples_of_the_policy():
    policy = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    reference = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = float((policy * (policy / reference).log()).sum())
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(policy, 200_000, replacement=True, generator=generator)
    logp, ref = policy.log()[samples], reference.log()[samples]
    assert abs(float(kl_k1(logp, ref).mean()) - exact) < 0.01
    assert abs(float(kl_k3(logp, ref).mean()) - exact) < 0.01


def test_adaptive_kl_controller_moves_towards_the_target():
    controller = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=100)  # far above target: error clipped to +0.2
    assert approx(controller.value, 0.2 * (1 + 0.2 * 100 / 10000), 1e-9)
    controller = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=5.4, n_steps=100)  # 10% below target: error -0.1
    assert approx(controller.value, 0.2 * (1 - 0.1 * 100 / 10000), 1e-9)
    controller.update(current_kl=6.0, n_steps=100)  # on target: unchanged
    assert approx(controller.value, 0.2 * (1 - 0.1 * 100 / 10000), 1e-9)
    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=100)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(target=0.0)


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


def test_kl_penalized_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards = kl_penalized_rewards(t(1.0, -1.0), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.0 - 0.15, 0.0], [-1.0 - 0.2, 0.0, 0.0, 0.0]]))


def gae_by_hand(rewards, values, lengths, gamma, lam):
    """The textbook recursion, one row and one step at a time, in plain Python."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b, n in enumerate(lengths):
        running = 0.0
        for step in reversed(range(n)):
            next_value = values[b][step + 1] if step + 1 < n else 0.0
            delta = rewards[b][step] + gamma * next_value - values[b][step]
            running = delta + gamma * lam * running
            advantages[b][step] = running
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_the_hand_written_recursion(gamma, lam):
    generator = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    lengths = [6, 4, 1]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = torch.tensor(gae_by_hand(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 0.1, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.9, 0.0]]))


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    white = whiten(x, mask)
    values = white[mask.bool()]
    assert abs(float(values.mean())) < 1e-6 and abs(float(values.var()) - 1.0) < 1e-5  # Bessel, as TRL
    assert (white[~mask.bool()] == 0).all()
    assert abs(float(whiten(x, mask, shift_mean=False)[mask.bool()].mean()) - 3.0) < 1e-5
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


# Four scored tokens and one padding token whose huge values must not count.
RATIOS = t(1.5, 0.5, 1.1, 0.7, 50.0)
ADVANTAGES = t(1.0, 1.0, -1.0, -1.0, 10.0)
MASK = t(1, 1, 1, 1, 0)


def test_ppo_policy_loss_clipfrac_and_approxkl_on_a_fixed_batch():
    old = t(-1.0, -2.0, -0.5, -3.0, -1.0)
    logp = (old + RATIOS.log()).requires_grad_()
    loss, metrics = ppo_policy_loss(logp[None], old[None], ADVANTAGES[None], MASK[None], clip=0.2)
    # Per token max(-A r, -A clip(r)):  max(-1.5, -1.2), max(-0.5, -0.8), max(1.1, 1.1), max(0.7, 0.8)
    assert approx(loss, (-1.2 - 0.5 + 1.1 + 0.8) / 4, 1e-6)
    assert approx(metrics["policy/clipfrac_avg"], 2 / 4)  # tokens 1 and 4 are clipped
    log_ratios = [math.log(r) for r in (1.5, 0.5, 1.1, 0.7)]
    assert approx(metrics["policy/approxkl_avg"], 0.5 * sum(x * x for x in log_ratios) / 4, 1e-6)
    assert approx(metrics["val/ratio"], (1.5 + 0.5 + 1.1 + 0.7) / 4, 1e-6)
    loss.backward()  # a clipped token passes no gradient; an unclipped one passes -A r / n
    torch.testing.assert_close(logp.grad, t(0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0))


def test_ppo_value_loss_on_a_fixed_batch():
    values, old_values, returns = t(1.0, 0.5, 0.3, 9.0), t(0.5, 0.0, 0.2, 0.0), t(0.0, 1.0, 0.3, 0.0)
    mask = t(1, 1, 1, 0)
    loss, metrics = ppo_value_loss(values[None], old_values[None], returns[None], mask[None], clip=0.2)
    # token 1: max((1-0)^2, (0.7-0)^2) = 1; token 2: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 3: 0.
    assert approx(loss, 0.5 * (1.0 + 0.64 + 0.0) / 3, 1e-6)
    assert approx(metrics["val/clipfrac_avg"], 1 / 3)


def test_masked_mean_over_everything_or_along_a_dim():
    x, mask = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert approx(masked_mean(x, mask), 3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), t(2.0, 5.0))


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


def test_grpo_advantages_sum_to_zero_per_group_and_zero_std_groups_get_zero():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 4, generator=generator)
    rewards[8:12] = 0.7  # a group whose samples all scored the same
    for scale in ("group", "batch", "none"):
        advantages = grpo_advantages(rewards, group_size=4, scale=scale).view(5, 4)
        torch.testing.assert_close(advantages.sum(-1), torch.zeros(5), atol=1e-5, rtol=0)
        assert torch.equal(advantages[2], torch.zeros(4)), scale
    advantages = grpo_advantages(rewards, group_size=4).view(5, 4)
    torch.testing.assert_close(advantages[0].std(), torch.tensor(1.0), atol=1e-3, rtol=0)  # unit std per group


def test_grpo_advantages_by_hand():
    rewards = t(1.0, 0.0, 0.0, 0.0)  # mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    torch.testing.assert_close(grpo_advantages(rewards, 4), t(0.75, -0.25, -0.25, -0.25) / (0.5 + 1e-4))
    torch.testing.assert_close(grpo_advantages(rewards, 4, scale="none"), t(0.75, -0.25, -0.25, -0.25))
    with pytest.raises(ValueError, match="group_size=3"):
        grpo_advantages(rewards, 3)
    with pytest.raises(ValueError, match="group, batch, none"):
        grpo_advantages(rewards, 4, scale="std")


def test_grpo_loss_token_and_sequence_aggregation_on_policy():
    logp = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    advantages = t(1.0, -1.0)
    loss, metrics = grpo_loss(logp, logp.detach(), advantages, mask)  # on-policy: every ratio is 1
    assert approx(loss, -(3 * 1.0 + 1 * -1.0) / 4)  # every token counts once
    assert approx(metrics["clip_ratio/region_mean"], 0.0) and "kl" not in metrics
    loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, aggregation="sequence")
    assert approx(loss, -(1.0 + -1.0) / 2)  # every completion counts once
    loss, _ = grpo_loss(logp, logp.detach(), advantages, mask, n_tokens=8)  # a global token count
    assert approx(loss, -(3 * 1.0 + 1 * -1.0) / 8)
    with pytest.raises(ValueError, match="token, sequence"):
        grpo_loss(logp, logp, advantages, mask, aggregation="mean")
    # One completion token in the batch: its loss is -A, divided by 1; none at all: 0, not NaN.
    one = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]])
    assert approx(grpo_loss(logp, logp.detach(), advantages, one)[0], 1.0)
    assert approx(grpo_loss(logp, logp.detach(), advantages, torch.zeros_like(mask))[0], 0.0)


def test_grpo_loss_clips_and_penalises_kl_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(t(1.5, 0.5, 1.0))[None]  # ratios 1.5 and 0.5 fall outside [0.8, 1.2]
    mask = torch.ones(1, 3)
    loss, metrics = grpo_loss(logp, old, t(1.0), mask, clip=0.2)
    # -min(r A, clip(r) A) with A = 1: -1.2, -0.5, -1.0
    assert approx(loss, (-1.2 - 0.5 - 1.0) / 3, 1e-6)
    assert approx(metrics["clip_ratio/high_mean"], 1 / 3) and approx(metrics["clip_ratio/low_mean"], 0.0)
    loss, metrics = grpo_loss(logp, old, t(-1.0), mask, clip=0.2, clip_high=0.28)
    # A = -1: -min(-r, -clip(r)) = max(r, clip(r)): 1.5, 0.8, 1.0; ratio 0.5 is clipped below
    assert approx(loss, (1.5 + 0.8 + 1.0) / 3, 1e-6)
    assert approx(metrics["clip_ratio/low_mean"], 1 / 3) and approx(metrics["clip_ratio/high_mean"], 0.0)

    ref = torch.log(t(1.0, 1.0, 2.0))[None]
    k3 = (torch.exp(ref - logp) - (ref - logp) - 1)[0]
    base, _ = grpo_loss(logp, old, t(1.0), mask)
    penalised, metrics = grpo_loss(logp, old, t(1.0), mask, ref_logp=ref, beta=0.04)
    assert approx(penalised - base, 0.04 * float(k3.mean()), 1e-6)
    assert approx(metrics["kl"], float(k3.mean()), 1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, t(1.0), mask, beta=0.04)
