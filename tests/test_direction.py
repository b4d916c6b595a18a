"""Which way each post-training stage moves the policy, and the values of its loss and options,
on fixed tiny batches: one optimizer step of the stage's own `step`/`training_step` on a 1-layer
model, or its loss function on hand-made numbers, against hand computation. Also the loss
guard's deviation floor and its skipped batches surviving a checkpoint.

The module-level tests call the stage modules without a Trainer: `logging_step` and
`wants_metrics` are stubbed (nothing is logged), sampling is replaced by fixed completions and
the reward by fixed scores, so every number here is a function of the seed alone."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from llm.data.datamodule import LMDataModule
from llm.data.blocks import BlockStream
from llm.data.posttrain import TokenizedExample, TokenizedPreference, collate_preferences, collate_sft
from llm.model import ModelConfig
from llm.parallel import Single
from llm.stages import rollout as rollout_module
from llm.stages.dpo import DPOModule
from llm.stages.grpo import GRPOModule
from llm.stages.objectives import IGNORE_INDEX, grpo_advantages, grpo_loss, ppo_policy_loss
from llm.stages.ppo import PPOModule
from llm.stages.reward import RewardModule
from llm.stages.sft import SFTModule
from llm.tracking.guard import GuardTripped, LossGuard

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")]

VOCAB = 16
# One layer, 16 wide, no padded vocabulary; init_std 0.2 so that token probabilities differ visibly.
CONFIG = ModelConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=VOCAB, pad_vocab_to=1, max_seq_len=32,
                     init_std=0.2)
PAD = 0


def build(cls: type, seed: int = 0, **kwargs: Any) -> Any:
    """A stage module around a fresh tiny network (no parent run), used without a Trainer."""
    torch.manual_seed(seed)
    module = cls(CONFIG, optimizer=None, schedule=None, parallelism=Single(), total_steps=1, tokens_per_step=1,
                 flops_per_token=1.0, **kwargs)
    module.configure_model()
    module.logging_step = lambda: False  # no Trainer: log nothing
    module.wants_metrics = lambda: False
    return module


def sgd_step(module: Any, loss: torch.Tensor, lr: float) -> None:
    """One plain SGD step on every trainable parameter (the stage's own optimizer is Adam, whose
    sign-only first step would hide the size of a gradient)."""
    params = [p for p in module.trained_module().parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


def example(prompt: list[int], completion: list[int]) -> TokenizedExample:
    return TokenizedExample(tuple(prompt + completion), (False,) * len(prompt) + (True,) * len(completion))


# Three preference pairs (prompt, chosen, rejected); completions of different lengths, so that
# padding and per-row sums matter.
PAIRS = [([1, 2, 3], [4, 5, 6], [7, 8]),
         ([2, 9], [10, 11], [12, 13, 14]),
         ([3, 3, 1, 5], [6], [15, 4])]


def preference_batch(swap: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    items = [TokenizedPreference(example(p, r if swap else c), example(p, c if swap else r)) for p, c, r in PAIRS]
    return collate_preferences(items, PAD)


def completion_logps_by_hand(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed log-prob of its completion tokens, in float64 with an explicit shift:
    the logits at position t score the token at t + 1."""
    with torch.no_grad():
        logp = F.log_softmax(model(rows["tokens"]).double(), dim=-1)
    totals = []
    for b in range(rows["tokens"].shape[0]):
        total = 0.0
        for t in range(1, rows["tokens"].shape[1]):
            if rows["labels"][b, t] != IGNORE_INDEX:
                total += float(logp[b, t - 1, rows["labels"][b, t]])
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move a policy away from its reference, so that their log-ratios are not all zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p += scale * torch.randn(p.shape, generator=generator)


# --------------------------------------------------------------------------------------------
# DPO and RPO
# --------------------------------------------------------------------------------------------


def dpo_rewards(module: DPOModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards beta (log pi - log ref) of the chosen and the rejected answers, by
    hand (not through the stage's own bookkeeping, which a bug could keep self-consistent)."""
    rewards = []
    for half in ("chosen", "rejected"):
        policy = completion_logps_by_hand(module.model, batch[half])
        reference = completion_logps_by_hand(module.reference, batch[half])
        rewards.append((module.beta * (policy - reference)).float())
    return rewards[0], rewards[1]


@pytest.mark.parametrize("swap", [False, True], ids=["as-labelled", "labels-swapped"])
def test_one_dpo_step_raises_the_margin_of_the_answers_it_is_told_to_prefer(swap):
    module = build(DPOModule, beta=0.5)
    batch, trained_on = preference_batch(), preference_batch(swap)
    chosen, rejected = dpo_rewards(module, batch)
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))  # policy = reference

    loss, metrics = module.step(trained_on)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)  # -log sigmoid(0)
    assert float(metrics["rewards/accuracies"]) == 0.0  # ties count as wrong
    sgd_step(module, loss, lr=0.03)
    chosen, rejected = dpo_rewards(module, batch)
    margins = chosen - rejected
    if not swap:  # every pair moves towards its chosen answer: margins up, accuracy 0 -> 1
        assert (margins > 0).all(), margins
        assert (rejected < 0).all()  # the rejected answers' likelihood falls below the reference's
    else:  # trained on the swapped labels, the original pairs move the other way
        assert (margins < 0).all(), margins
    accuracy = float(module.step(batch)[1]["rewards/accuracies"])
    assert accuracy == (0.0 if swap else 1.0)
    # And the loss on what was trained on went down.
    assert module.step(trained_on)[0].item() < math.log(2)


def test_dpo_loss_equals_minus_logsigmoid_of_beta_times_hand_summed_log_ratios():
    module = build(DPOModule, beta=0.3)
    perturb(module.model)
    batch = preference_batch()
    pc, pr = (completion_logps_by_hand(module.model, batch[k]) for k in ("chosen", "rejected"))
    rc, rr = (completion_logps_by_hand(module.reference, batch[k]) for k in ("chosen", "rejected"))
    h = (pc - rc) - (pr - rr)
    assert (h.abs() > 1e-3).all()  # the perturbation made every pair's log-ratio count
    expected = -F.logsigmoid(0.3 * h).mean()
    loss, metrics = module.step(batch)
    assert abs(loss.item() - float(expected)) < 1e-5
    assert abs(float(metrics["rewards/margins"]) - float(0.3 * h.mean())) < 1e-5
    assert abs(float(metrics["logps/chosen"]) - float(pc.mean())) < 1e-4
    assert abs(float(metrics["logps/rejected"]) - float(pr.mean())) < 1e-4


def test_rpo_alpha_adds_alpha_times_the_nll_of_the_chosen_answers():
    batch = preference_batch()
    plain = build(DPOModule, beta=0.3)
    perturb(plain.model)
    alpha = 0.7
    rpo = build(DPOModule, beta=0.3, rpo_alpha=alpha)
    rpo.model.load_state_dict(plain.model.state_dict())  # same policy, same (unperturbed) reference
    zero = build(DPOModule, beta=0.3, rpo_alpha=0.0)
    zero.model.load_state_dict(plain.model.state_dict())

    dpo, _ = plain.step(batch)
    # The NLL by hand: each chosen completion's mean token NLL, averaged over the pairs (the RPO
    # paper's length-normalised -log p(y+ | x); TRL's DPOTrainer instead averages over all chosen
    # tokens of the batch, which agrees only when the chosen completions are equally long).
    pc = completion_logps_by_hand(plain.model, batch["chosen"])
    lengths = torch.tensor([len(c) for _, c, _ in PAIRS], dtype=torch.float64)
    nll = float((-pc / lengths).mean())
    loss, metrics = rpo.step(batch)
    assert abs(loss.item() - (dpo.item() + alpha * nll)) < 1e-5
    assert abs(float(metrics["nll_loss"]) - nll) < 1e-5
    # alpha = 0 is plain DPO, to the bit.
    assert torch.equal(zero.step(batch)[0], dpo)


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def reward_gaps(module: RewardModule, batch: dict) -> torch.Tensor:
    """r(chosen) - r(rejected) per pair, by hand: the value model's output at each row's last token."""
    rewards = []
    for half in ("chosen", "rejected"):
        rows = batch[half]
        with torch.no_grad():
            values = module.model(rows["tokens"])
        last = [len(p) + len(c if half == "chosen" else r) - 1 for p, c, r in PAIRS]
        rewards.append(values[torch.arange(len(PAIRS)), torch.tensor(last)])
    return rewards[0] - rewards[1]


@pytest.mark.parametrize("swap", [False, True], ids=["as-labelled", "labels-swapped"])
def test_one_reward_model_step_raises_the_chosen_minus_rejected_gap(swap):
    module = build(RewardModule, seed=2)
    batch = preference_batch()
    before = reward_gaps(module, batch)
    loss, _ = module.step(preference_batch(swap))
    sgd_step(module, loss, lr=0.05)
    after = reward_gaps(module, batch)
    if not swap:
        assert (after > before).all(), (before, after)
        assert (after > 0).float().mean() >= (before > 0).float().mean()  # pair accuracy never falls (here 1/3 -> 1)
    else:
        assert (after < before).all(), (before, after)


def test_reward_head_bias_gradient_is_zero_without_centring_and_4c_mean_reward_with_it():
    """The bias adds the same to both rewards of a pair: Bradley-Terry's gradient on it is exactly
    0 (an optimizer that still moves it has amplified rounding); the centring term c mean((r+ +
    r-)^2) gives it 4 c mean(r+ + r-), which pulls the rewards towards 0."""
    batch = preference_batch()
    module = build(RewardModule, seed=2)
    with torch.no_grad():
        module.model.head.bias.fill_(1.5)  # every reward well above 0
    loss, _ = module.step(batch)
    (grad,) = torch.autograd.grad(loss, [module.model.head.bias])
    assert abs(float(grad)) < 1e-6

    c = 0.05
    centred = build(RewardModule, seed=2, center_rewards_coefficient=c)
    centred.model.load_state_dict(module.model.state_dict())
    loss, _ = centred.step(batch)
    (grad,) = torch.autograd.grad(loss, [centred.model.head.bias])
    with torch.no_grad():
        r_chosen, r_rejected = centred.rewards(batch)
    assert float((r_chosen + r_rejected).min()) > 0
    expected = 4 * c * float((r_chosen + r_rejected).mean())
    assert float(grad) > 0  # descent lowers the bias, towards centred rewards
    assert abs(float(grad) - expected) < 1e-5 * max(1.0, expected)


# --------------------------------------------------------------------------------------------
# GRPO and PPO: fixed completions and rewards through the module's own training step
# --------------------------------------------------------------------------------------------

PROMPTS = [[1, 2, 3], [4, 5]]
# Completions as the sampler would return them, each distinct so a step can move them apart.
COMPLETIONS = [[6, 7, 8], [9, 10], [11, 12, 13], [14], [6, 9], [15, 7, 7], [10], [12, 11]]


def fixed_sampling(monkeypatch, completions: list[list[int]]) -> None:
    """The rollout's sampler returns `completions` (the layout, scoring and loss are the stage's)."""
    monkeypatch.setattr(rollout_module, "generate", lambda policy, rows, *a, **k: [list(c) for c in completions])


def on_policy(cls: type, rewards: list[float], **kwargs: Any) -> Any:
    module = build(cls, tokenizer=SimpleNamespace(eos_id=0, pad_id=PAD), **kwargs)
    module.scorer = lambda rollout: torch.tensor(rewards)
    return module


def completion_logps(module: Any) -> torch.Tensor:
    """Each rollout row's summed log-prob of its completion under the current policy."""
    r = module.rollout
    with torch.no_grad():
        return (module.policy_logps(module.model, r) * r.response_mask).sum(-1)


def test_one_grpo_step_moves_probability_to_the_best_sample_and_away_from_the_worst(monkeypatch):
    # Prompt 0's group: sample 0 is the best, sample 2 the worst. Prompt 1's group all tie: no signal.
    rewards = [2.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    fixed_sampling(monkeypatch, COMPLETIONS)
    module = on_policy(GRPOModule, rewards, num_generations=4)
    batch = {"prompts": PROMPTS, "meta": [{}, {}]}
    loss = module.training_step(batch, 0)
    before = completion_logps(module)
    sgd_step(module, loss, lr=0.05)
    change = completion_logps(module) - before
    assert module.advantages.tolist()[4:] == [0.0] * 4
    assert change[0] > 0 > change[2], change
    assert change[0] == change[:4].max() and change[2] == change[:4].min()


def test_grpo_advantages_by_hand_for_each_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    centred = [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]  # minus each group's mean (0.5, 2.75)
    # Unbiased standard deviations: group 0 sqrt(1 / 3), group 1 sqrt(6.75 / 3) = 1.5; the whole
    # batch (mean 13 / 8): sqrt(17.875 / 7).
    group_std = [math.sqrt(1 / 3)] * 4 + [1.5] * 4
    batch_std = math.sqrt(17.875 / 7)
    expected = {
        "group": [a / (s + 1e-4) for a, s in zip(centred, group_std)],
        "batch": [a / (batch_std + 1e-4) for a in centred],
        "none": centred,
    }
    for scale, values in expected.items():
        torch.testing.assert_close(grpo_advantages(rewards, 4, scale), torch.tensor(values), rtol=1e-6, atol=1e-6,
                                   msg=scale)


def test_grpo_clip_high_bounds_a_positive_advantage_at_one_plus_epsilon_high():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([1.1, 1.25, 1.4, 0.7])  # inside both, between 1.2 and 1.28, above 1.28, below 0.8
    logp = ratios.log()[None].requires_grad_()
    mask = torch.ones(1, 4)
    loss, metrics = grpo_loss(logp, old, torch.tensor([1.0]), mask, clip=0.2, clip_high=0.28)
    # A = 1: -min(r, clip(r, 0.8, 1.28)): the upper clip is at 1.28, not at 1.2; the low clip
    # does not bind a positive advantage (min picks the unclipped 0.7).
    assert abs(loss.item() - -(1.1 + 1.25 + 1.28 + 0.7) / 4) < 1e-6
    assert float(metrics["clip_ratio/high_mean"]) == 0.25 and float(metrics["clip_ratio/low_mean"]) == 0.0
    (grad,) = torch.autograd.grad(loss, [logp])
    # d/dlogp of -r / 4 is -r / 4 where unclipped; the clipped token (1.4) passes none.
    torch.testing.assert_close(grad, torch.tensor([[-1.1 / 4, -1.25 / 4, 0.0, -0.7 / 4]]))
    # Without clip_high, the same ratios are clipped at 1.2.
    loss, metrics = grpo_loss(logp, old, torch.tensor([1.0]), mask, clip=0.2)
    assert abs(loss.item() - -(1.1 + 1.2 + 1.2 + 0.7) / 4) < 1e-6
    assert float(metrics["clip_ratio/high_mean"]) == 0.5


def test_one_ppo_step_moves_probability_to_the_higher_scored_completion(monkeypatch):
    completions = [[6, 7, 8], [9, 10, 11]]
    fixed_sampling(monkeypatch, completions)
    module = on_policy(PPOModule, [1.0, -1.0], num_ppo_epochs=1, num_mini_batches=1)
    loss = module.training_step({"prompts": PROMPTS, "meta": [{}, {}]}, 0)
    before = completion_logps(module)
    advantages = module.buffer["advantages"]
    assert (advantages[0] > 0).all() and (advantages[1] < 0).all()  # GAE + whitening keep the sign of the score
    sgd_step(module, loss, lr=0.05)
    change = completion_logps(module) - before
    assert change[0] > 0 > change[1], change


def test_ppo_policy_loss_gradient_moves_log_probs_with_the_advantage():
    logits = torch.zeros(2, 3, 5, requires_grad=True)  # two rows of three tokens, uniform policy
    tokens = torch.tensor([[1, 2, 3], [4, 0, 1]])
    logp = F.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    loss, _ = ppo_policy_loss(logp, logp.detach(), advantages, torch.ones(2, 3))
    (grad,) = torch.autograd.grad(loss, [logits])
    with torch.no_grad():
        new = F.log_softmax(logits - 1.0 * grad, -1).gather(-1, tokens[..., None])[..., 0]
    assert (new[0] > logp[0]).all() and (new[1] < logp[1]).all()
    # On-policy (ratio 1) the loss is -mean(A) and d loss / d logp = -A / n: by hand.
    (dlogp,) = torch.autograd.grad(ppo_policy_loss(logp, logp.detach(), advantages, torch.ones(2, 3))[0], [logp])
    torch.testing.assert_close(dlogp, -advantages / 6)


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def test_sft_loss_is_the_hand_computed_shifted_masked_cross_entropy():
    module = build(SFTModule)
    rows = [example([1, 2, 3], [4, 5, 6, 7]), example([8, 9], [10]), example([11], [12, 13])]
    batch = collate_sft(rows, PAD)
    with torch.no_grad():
        logp = F.log_softmax(module.model(batch["tokens"]).double(), dim=-1)
    # By hand: the completion token at position t is scored by the logits at t - 1; prompt and
    # padding positions count for nothing. 4 + 1 + 2 completion tokens in all.
    terms = []
    for b, item in enumerate(rows):
        for t in range(1, len(item)):
            if item.trained[t]:
                terms.append(-float(logp[b, t - 1, item.tokens[t]]))
    assert len(terms) == 7
    loss, _ = module.step(batch)
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-5


# --------------------------------------------------------------------------------------------
# The loss guard
# --------------------------------------------------------------------------------------------


class Steps:
    """What the guard reads of a Trainer while one optimizer step per batch is judged."""

    def __init__(self) -> None:
        self.global_step = 0
        self.accumulate_grad_batches = 1
        self.log_every_n_steps = 10**9
        self.strategy = SimpleNamespace(reduce=lambda value, reduce_op: value)
        self.datamodule = SimpleNamespace(stream_index=lambda position: position)

    def step(self, guard: LossGuard, loss: float) -> None:
        self.global_step += 1  # the optimizer has stepped when on_train_batch_end runs
        guard.on_train_batch_end(self, None, torch.tensor(loss), None, self.global_step - 1)


def constant_history(loss: float = 2.0, steps: int = 8) -> tuple[LossGuard, Steps]:
    """A guard past its warm-up that has seen only `loss`: moving mean `loss`, deviation 0."""
    guard, trainer = LossGuard(warmup_steps=5, window=10, spike_threshold=6.0), Steps()
    for _ in range(steps):
        trainer.step(guard, loss)
    assert guard.mean == loss and guard.var == 0.0
    return guard, trainer


def test_guard_moving_mean_and_variance_by_hand():
    # window 3: alpha = 2 / (3 + 1) = 0.5. Losses 1, 3, 2:
    #   1 -> mean 1, var 0;  3 -> delta 2, mean 1 + 0.5 * 2 = 2, var 0.5 * (0 + 0.5 * 4) = 1;
    #   2 -> delta 0, mean 2, var 0.5 * (1 + 0) = 0.5.  Threshold: 2 + 6 sqrt(0.5) = 6.242641.
    guard, trainer = LossGuard(warmup_steps=3, window=3, spike_threshold=6.0), Steps()
    for loss, (mean, var) in zip((1.0, 3.0, 2.0), ((1.0, 0.0), (2.0, 1.0), (2.0, 0.5))):
        trainer.step(guard, loss)
        assert (guard.mean, guard.var) == pytest.approx((mean, var))
    trainer.step(guard, 6.24)  # just under the threshold: observed
    with pytest.raises(GuardTripped) as tripped:
        trainer.step(guard, 100.0)
    mean = 2.0 + 0.5 * (6.24 - 2.0)
    var = 0.5 * (0.5 + 0.5 * (6.24 - 2.0) ** 2)
    assert tripped.value.event["threshold"] == pytest.approx(mean + 6 * math.sqrt(var), abs=1e-5)  # 6.24 in float32


def test_a_rollback_without_a_checkpoint_goes_back_to_step_0_and_skips_the_batches(tmp_path):
    guard, skipped = LossGuard(max_rollbacks=1), []
    datamodule = SimpleNamespace(skip=skipped.extend)
    event = {"step": 3, "kind": "spike", "loss": 9.0, "threshold": 4.0, "batches_skipped": [2]}
    assert guard.roll_back(event, datamodule, tmp_path, rank_zero=False) is None  # fit again from the start
    assert event["rolled_back_to"] == 0 and skipped == [2] and guard.events == [event]


def test_guard_judges_a_whole_accumulated_step_from_the_first():
    # Two micro-batches per step: the optimizer steps (global_step + 1) after the second. The
    # guard must see 1 + 2 = 3, the first step's loss, not 1 and then 2 as two steps.
    guard = LossGuard(warmup_steps=0, window=3, spike_threshold=None)
    trainer = Steps()
    trainer.accumulate_grad_batches = 2
    guard.on_train_start(trainer, None)
    for micro_batch, loss in enumerate((1.0, 2.0, 5.0, 5.0)):
        trainer.global_step += micro_batch % 2  # after each step's second micro-batch
        guard.on_train_batch_end(trainer, None, torch.tensor(loss), None, micro_batch)
    assert guard.seen == 2 and guard.mean == pytest.approx(3.0 + 0.5 * (10.0 - 3.0))


@pytest.mark.parametrize("loss, spike", [(2.0, False), (2.1, False), (2.119, False), (2.121, True), (2.5, True)])
def test_guard_deviation_floor_on_a_constant_loss_by_hand(loss, spike):
    # The deviation is 0, so the floor 0.01 |mean| sets the threshold: 2 + 6 * 0.01 * 2 = 2.12.
    # Without the floor anything above 2.0 would be a spike, 2.1 (5 % up, noise) included.
    guard, trainer = constant_history()
    if not spike:
        trainer.step(guard, loss)
        assert guard.events == [] and guard.seen == 9
        return
    with pytest.raises(GuardTripped) as tripped:
        trainer.step(guard, loss)
    event = tripped.value.event
    assert (event["kind"], event["step"], event["threshold"]) == ("spike", 9, 2.12)
    assert event["loss"] == pytest.approx(loss, abs=1e-6)  # as the float32 step loss holds it
    assert event["batches_skipped"] == [8]  # the 9th step's only micro-batch


class Recorder(pl.LightningModule):
    """Trains one weight and records every training batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.clone())
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_batches_the_guard_skipped_stay_skipped_after_a_resume(tmp_path):
    """A rollback from a bad step 3 restores the step-2 checkpoint and skips micro-batch 2; the
    checkpoint the resumed run then writes and loads keeps both the event and the skip, so a run
    resumed from it trains on batches 3 and 4, never on 2."""
    tokens = np.arange(400, dtype=np.int64)
    data = dict(train_tokens=tokens, val_tokens=tokens[:20], seq_len=8, micro_batch_size=2, seed=3)

    def trainer(steps: int, guard: LossGuard) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, callbacks=[guard],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0)

    first, guard = LMDataModule(**data), LossGuard(enabled=False)
    event = {"step": 3, "kind": "spike", "loss": 9.0, "threshold": 3.0, "batches_skipped": [2], "rolled_back_to": 2}
    guard.events.append(event)
    first.skip([2])  # what LossGuard.roll_back does to the datamodule
    run = trainer(2, guard)
    run.fit(Recorder(), datamodule=first)
    run.save_checkpoint(tmp_path / "step2.ckpt")

    resumed_data, resumed_guard, model = LMDataModule(**data), LossGuard(enabled=False), Recorder()
    trainer(4, resumed_guard).fit(model, datamodule=resumed_data, ckpt_path=tmp_path / "step2.ckpt")
    stream = BlockStream(tokens, 8, 2, seed=3)
    assert len(model.seen) == 2
    for seen, index in zip(model.seen, [3, 4]):
        assert torch.equal(seen, torch.as_tensor(stream.batch(index))), index
    assert resumed_data.skipped == {2}
    assert resumed_guard.events == [event]
