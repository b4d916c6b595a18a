"""One typed config per post-training method (as TRL has one per trainer): the `posttrain` node.

Each keeps the `_target_` of its LightningModule and `_partial_: true` (the run adds the model
config, optimizer, schedule and parent), so `hydra.utils.instantiate(cfg.posttrain)` builds the
module as before. `posttrain=none` is pretraining. The stage constructors check their arguments
against the same dataclasses (llm.config.validate.method_arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from llm.fields import Choice, at_least, bounded, finite, positive, unit_interval
from llm.model.config import MAX_SEQ_LEN
from llm.model.lora import LoRAConfig


class DataFormat(Choice):  # TRL's dataset formats (llm.data.formats)
    text = "text"
    prompt_completion = "prompt_completion"
    messages = "messages"
    preference = "preference"
    implicit_preference = "implicit_preference"
    prompt_only = "prompt_only"


class DPOLoss(Choice):
    sigmoid = "sigmoid"
    ipo = "ipo"
    hinge = "hinge"


class KLEstimator(Choice):  # per-token estimators of KL(policy || reference) (Schulman's k1, k3)
    k1 = "k1"
    k3 = "k3"


class RewardScaling(Choice):  # GRPO: what the advantages are divided by
    group = "group"
    batch = "batch"
    none = "none"


class Divergence(Choice):  # distillation: what the student's distribution is pulled toward the teacher's by
    forward_kl = "forward_kl"  # KL(teacher || student)
    reverse_kl = "reverse_kl"  # KL(student || teacher)
    jsd = "jsd"  # TRL's generalized JSD (beta 0: forward KL, 1: reverse KL)
    tv = "tv"  # total variation


class QATScheme(Choice):  # quantisation-aware training: the weight-only scheme of llm.generate.quantize
    none = "none"
    int8 = "int8"
    int4 = "int4"


class LossAggregation(Choice):  # GRPO: mean over all tokens, or per sequence then over sequences
    token = "token"
    sequence = "sequence"


def _default_tasks() -> dict[str, Any]:
    return {"addition": {"max_digits": 2}, "sorting": {"max_length": 4}, "copying": {"max_length": 5},
            "counting": {"max_length": 6}}


# The largest loss coefficient (beta, KL and value weights, clip ranges) taken: published values are
# below 1, and 1e30 would only turn the loss into overflow.
COEF_MAX = 100.0

@dataclass
class PostTrainDataSchema:
    """`posttrain.data`: the examples of a post-training method (TRL's formats, or the tasks)."""

    source: str = "tasks"  # tasks (the embedded synthetic tasks) | path/to/rows.jsonl | hf:NAME
    val_source: Optional[str] = None  # held-out rows; null: the val split of the tasks / val_fraction of source
    format: Optional[DataFormat] = None  # null: detected from the keys of the rows
    hf_split: str = "train"
    val_fraction: float = unit_interval(0.1, low_open=True, high_open=True)
    tasks: dict[str, Any] = field(default_factory=_default_tasks)  # task -> difficulty knobs
    n_train: int = at_least(1, 4096, high=2**24)  # task rows drawn for training
    n_val: int = at_least(1, 256, high=2**24)  # held-out task rows
    seed: int = at_least(0, 0, high=2**32 - 1)
    packing: bool = False  # SFT: several examples per row, attention kept inside each
    chat_turn: str = "{role}: {content}\n"  # how one message of a conversation is rendered (chat_template: null)
    generation_prompt: Optional[str] = None  # with chat_turn: what opens an assistant turn; null: chat_turn's
    # null: chat_turn | a Jinja chat template (as transformers' apply_chat_template renders it) | a .jinja file
    # or tokenizer folder | tokenizer: the parent tokenizer's (its chat_template.jinja / tokenizer_config.json)
    chat_template: Optional[str] = None
    max_prompt_length: int = at_least(1, 64, high=MAX_SEQ_LEN)  # prompt-only rows (PPO/GRPO): longer ones are dropped
    partial_reward: bool = False  # the tasks' checker gives partial credit instead of 0/1
    eval_prompts: int = at_least(0, 256, high=2**20)  # held-out prompts answered greedily before and after; 0: none
    eval_max_new_tokens: int = at_least(1, 16, high=2**16)


@dataclass
class PretrainConfig:
    """posttrain=none: next-token cross-entropy on the corpus."""

    _target_: str = "llm.stages.pretrain.PretrainModule"
    _partial_: bool = True


@dataclass
class PostTrainConfig:
    """What every post-training method has: its data, its (optional) LoRA adapters and
    quantisation-aware training."""

    _target_: str = ""
    _partial_: bool = True
    data: PostTrainDataSchema = field(default_factory=PostTrainDataSchema)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # int8 | int4: train through fake-quantised Linear layers (straight-through gradient), the scheme
    # llm-eval/llm-generate quantize=... apply; the checkpoint stays a float model with the same keys
    qat: QATScheme = QATScheme.none


@dataclass
class SFTConfig(PostTrainConfig):
    """Supervised fine-tuning: loss on completion tokens only."""

    _target_: str = "llm.stages.sft.SFTModule"


@dataclass
class RewardConfig(PostTrainConfig):
    """Reward model: a scalar head, Bradley-Terry loss on preference pairs."""

    _target_: str = "llm.stages.reward.RewardModule"
    margin: Optional[float] = finite(None, null="for no margin")  # the chosen reward must beat the rejected one by it
    center_rewards_coefficient: Optional[float] = at_least(0, None, high=COEF_MAX, null="to leave rewards uncentred")  # e.g. 0.01


@dataclass
class DPOConfig(PostTrainConfig):
    """Direct Preference Optimisation against a frozen copy of the starting model."""

    _target_: str = "llm.stages.dpo.DPOModule"
    beta: float = positive(0.1, high=COEF_MAX)
    loss_type: DPOLoss = DPOLoss.sigmoid
    label_smoothing: float = bounded(0.0, low=0, high=0.5, high_open=True)  # conservative DPO: the labels' noise rate
    rpo_alpha: Optional[float] = at_least(0, None, high=COEF_MAX, null="for no NLL term")  # e.g. 1.0: RPO's NLL on the chosen answers


@dataclass
class OnPolicyConfig(PostTrainConfig):
    """What PPO and GRPO share: sampled completions, scored by a reward model or the tasks' checker."""

    reward_model: Optional[str] = None  # <reward run>: score with it instead of the tasks' checker
    max_new_tokens: int = at_least(1, 16, high=2**16)
    temperature: float = positive(1.0, high=100)  # sampling temperature (> 0: the policy's log-probs divide by it)
    samples_every_n_steps: int = at_least(1, 50)  # sampled completions -> samples.jsonl and a W&B Table


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO-style RLHF: actor, critic, frozen reference and a reward (TRL's PPOTrainer recipe)."""

    _target_: str = "llm.stages.ppo.PPOModule"
    num_ppo_epochs: int = at_least(1, 4, high=1024)
    num_mini_batches: int = at_least(1, 1, high=2**16)  # <= data.micro_batch_size
    kl_coef: float = at_least(0, 0.05, high=COEF_MAX)
    kl_estimator: KLEstimator = KLEstimator.k1
    adaptive_kl: bool = False
    kl_target: float = positive(6.0, high=1e4)
    kl_horizon: int = at_least(1, 10000)
    cliprange: float = positive(0.2, high=COEF_MAX)
    cliprange_value: float = positive(0.2, high=1e4)
    vf_coef: float = at_least(0, 0.1, high=COEF_MAX)
    gamma: float = unit_interval(1.0)
    lam: float = unit_interval(0.95)
    whiten_rewards: bool = False


@dataclass
class GRPOConfig(OnPolicyConfig):
    """Group Relative Policy Optimisation: num_generations samples per prompt."""

    _target_: str = "llm.stages.grpo.GRPOModule"
    num_generations: int = at_least(2, 8, high=4096)  # a group needs 2 samples for a deviation
    beta: float = at_least(0, 0.0, high=COEF_MAX)  # > 0: k3 KL penalty to a frozen reference
    epsilon: float = positive(0.2, high=1.0)  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = positive(None, high=COEF_MAX, null="for epsilon")  # DAPO suggests 0.28
    scale_rewards: RewardScaling = RewardScaling.group
    loss_aggregation: LossAggregation = LossAggregation.token
    num_iterations: int = at_least(1, 1, high=1024)  # optimizer steps per rollout


@dataclass
class DistillConfig(PostTrainConfig):
    """Distillation from a frozen teacher over SFT rows (TRL's GKDTrainer: on-policy fraction `lmbda`,
    generalized JSD `beta`, one `temperature` for the loss and the sampling), or over the pretraining
    corpus (`corpus`)."""

    _target_: str = "llm.stages.distill.DistillModule"
    teacher: Optional[str] = None  # <run directory | run id | checkpoint | HF folder> sharing the student's tokenizer
    divergence: Divergence = Divergence.jsd
    beta: float = unit_interval(0.5)  # divergence=jsd: 0 = forward KL, 1 = reverse KL, between: generalized JSD
    temperature: float = positive(0.9, high=100)  # divides student and teacher logits (and the sampling's)
    lmbda: float = unit_interval(0.5)  # share of batches whose completions the student samples (on-policy)
    max_new_tokens: int = at_least(1, 16, high=2**16)  # on-policy completions: at most this many tokens
    top_k: Optional[int] = at_least(1, None, high=2**24, null="for the teacher's full distribution")  # teacher's top-k, renormalised
    nll_weight: float = at_least(0, 0.0, high=COEF_MAX)  # adds nll_weight x the next-token loss on the rows' completions
    # true: learn on the `data` group's corpus as pretraining reads it (packed blocks, every token;
    # posttrain.data unused), with val/loss the student's next-token loss on pretraining's validation split
    corpus: bool = False


# posttrain option -> its config.
METHODS: dict[str, type] = {"none": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
                            "ppo": PPOConfig, "grpo": GRPOConfig, "distill": DistillConfig}
