"""Mixture-of-experts MLPs (llm.model.moe): routing on hand-made logits, capacity drops, shared
experts, the router losses against their formulas, the auxiliary-loss-free bias update, the
one-expert MoE against the dense MLP, FLOPs against PyTorch's counter, and whole runs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from torch import nn

from llm.config import ConfigError, validate
from llm.generate import generate
from llm.model import ModelConfig, MoEConfig, Transformer
from llm.model.layers import MLP
from llm.model.moe import MoE, router_loss, update_router_biases
from llm.parallel.apply import apply_activation_checkpointing
from llm.scaling.flops import model_size
from llm.tracking.metrics import read_metrics
from tests.conftest import TINY_RUN, compose_train, llm_cli
from tests.test_flops import measured_flops_per_token

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster on a shared CPU


def moe_cfg(d_model: int = 8, mlp: str = "swiglu", bias: bool = False, **moe) -> ModelConfig:
    return ModelConfig(n_layers=1, d_model=d_model, n_heads=1, vocab_size=64, mlp=mlp, bias=bias, mlp_hidden=16,
                       moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}))


def identity_router(cfg: ModelConfig, seed: int = 0) -> MoE:
    """An MoE with random experts whose router logits are the input itself (d_model = n_experts,
    router weight = I; other widths: a random router)."""
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    if cfg.d_model == cfg.moe.n_experts:
        with torch.no_grad():
            layer.router.weight.copy_(torch.eye(cfg.moe.n_experts))
    return layer


def expert_mlp(layer: MoE, e: int, cfg: ModelConfig) -> MLP:
    """Routed expert e of `layer` as a dense MLP with the same weights."""
    mlp = MLP(cfg)
    mlp.load_state_dict({"gate.weight": layer.experts.gate[e], "up.weight": layer.experts.up[e],
                         "down.weight": layer.experts.down[e]})
    return mlp


# Router logits of 3 tokens over 4 experts (rows), and each token's top 2 by hand.
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.0, 0.5, 3.0, 0.2],
                       [-1.0, 1.0, 1.5, 2.5]])
TOP2 = [[0, 1], [2, 1], [3, 2]]


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
def test_routing_on_hand_made_logits(router):
    layer = MoE(moe_cfg(router=router))
    experts, weights, probs = layer.route(LOGITS)
    assert experts.tolist() == TOP2  # best first
    for t, (row, chosen) in enumerate(zip(LOGITS.tolist(), TOP2)):
        if router == "topk_softmax":  # Mixtral: the softmax of the two chosen logits, summing to 1
            expected = softmax([row[e] for e in chosen])
        else:  # Switch/Qwen2-MoE: the chosen probabilities of the softmax over all four, as they are
            expected = [softmax(row)[e] for e in chosen]
        assert weights[t].tolist() == pytest.approx(expected, abs=1e-6)
    sums = weights.sum(-1)
    if router == "topk_softmax":
        assert torch.allclose(sums, torch.ones(3))
    else:
        assert (sums < 0.99).all()  # not renormalised: e.g. token 0 keeps 0.644 + 0.237


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
def test_forward_is_the_weighted_sum_of_the_chosen_experts(router):
    cfg = moe_cfg(d_model=4, router=router)
    layer = identity_router(cfg).eval()
    x = LOGITS  # the identity router: these are the logits
    y = layer(x)
    _, weights, _ = layer.route(LOGITS)
    for t, chosen in enumerate(TOP2):
        expected = sum(weights[t, i] * expert_mlp(layer, e, cfg)(x[t]) for i, e in enumerate(chosen))
        torch.testing.assert_close(y[t], expected, atol=1e-6, rtol=1e-5)
    assert layer.load.tolist() == pytest.approx([1 / 6, 2 / 6, 2 / 6, 1 / 6])  # of 6 assignments (TOP2)


def test_capacity_drops_the_lowest_scored_assignments_in_training_only():
    # Top-1 of 2 experts, all 4 tokens prefer expert 0 with probabilities rising 0 < 2 < 1 < 3
    # (token 3 most sure); capacity ceil(1.0 x 4 x 1 / 2) = 2: tokens 1 and 3 keep it.
    cfg = moe_cfg(d_model=2, n_experts=2, top_k=1, capacity_factor=1.0)
    layer = identity_router(cfg)
    x = torch.tensor([[0.1, 0.0], [2.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    y = layer(x)
    assert layer.dropped == 2 and layer.assignments == 4
    assert [bool(row.abs().sum() > 0) for row in y] == [False, True, False, True]
    torch.testing.assert_close(y[1], layer.route(x[1:2])[1][0, 0] * expert_mlp(layer, 0, cfg)(x[1]))
    assert layer.load.tolist() == [1.0, 0.0]  # the load is what the router chose, before the capacity
    layer.eval()  # evaluation and generation are dropless
    assert (layer(x).abs().sum(-1) > 0).all() and layer.dropped == 0


def test_capacity_counts_per_expert():
    # 2 of 4 experts per token: 12 assignments, capacity ceil(0.5 x 6 x 2 / 4) = 2 per expert.
    cfg = moe_cfg(d_model=4, capacity_factor=0.5)
    layer = identity_router(cfg)
    x = torch.cat([LOGITS, LOGITS + 0.1])
    layer(x)
    # Loads 2, 4, 4, 2 (see TOP2, twice): experts 1 and 2 drop 2 each.
    assert layer.dropped == 4


def test_shared_experts_are_always_on():
    cfg = moe_cfg(d_model=4, n_shared_experts=2, capacity_factor=0.25)
    layer = identity_router(cfg)
    assert layer.shared.up.weight.shape == (2 * 16, 4)  # one MLP of n_shared x expert_hidden
    with torch.no_grad():
        layer.experts.down.zero_()  # the routed experts add nothing: what is left is the shared MLP
    x = torch.randn(6, 4)
    y = layer(x)
    assert layer.dropped > 0  # some tokens skip the routed experts, never the shared ones
    torch.testing.assert_close(y, layer.shared(x))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
def test_one_expert_top_1_equals_the_dense_mlp_exactly(mlp, bias, router, monkeypatch):
    import llm.model.layers

    monkeypatch.setattr(llm.model.layers, "FUSE_PROJECTIONS", False)  # the experts run gate and up apart
    cfg = moe_cfg(d_model=16, mlp=mlp, bias=bias, n_experts=1, top_k=1, router=router)
    torch.manual_seed(0)
    dense, layer = MLP(cfg), MoE(cfg)
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            if hasattr(dense, name):
                getattr(layer.experts, name)[0] = getattr(dense, name).weight
                if bias:
                    getattr(layer.experts, f"{name}_bias")[0] = getattr(dense, name).bias
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), dense(x))


# --------------------------------------------------------------------------------------------
# Router losses and balancing
# --------------------------------------------------------------------------------------------


def test_aux_loss_and_z_loss_equal_their_formulas():
    layer = identity_router(moe_cfg(d_model=4, aux_loss_coef=0.5, z_loss_coef=0.25))
    layer(LOGITS)
    # f_i: fraction of the 6 assignments (TOP2) routed to expert i; P_i: mean router probability.
    f = [1 / 6, 2 / 6, 2 / 6, 1 / 6]
    probs = [softmax(row) for row in LOGITS.tolist()]
    P = [sum(p[i] for p in probs) / 3 for i in range(4)]
    aux = 4 * sum(fi * Pi for fi, Pi in zip(f, P))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS.tolist()) / 3
    assert layer.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert layer.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert router_loss(layer).item() == pytest.approx(0.5 * aux + 0.25 * z, rel=1e-6)
    uniform = identity_router(moe_cfg(d_model=4, top_k=1))
    uniform(torch.eye(4))  # each expert once, P_i = 1/4 for each: the balanced minimum, 1
    assert uniform.aux_loss.item() == pytest.approx(1.0)


def test_router_losses_reach_the_router():
    layer = identity_router(moe_cfg(d_model=4))
    layer.router.weight.data.add_(0.1 * torch.randn(4, 4))
    layer(torch.randn(8, 4))
    router_loss(layer).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def skewed_router(rate: float) -> tuple[MoE, torch.Tensor]:
    """Expert 0's logit is 2 higher for every token: with top-1 it takes ~70% of them."""
    cfg = moe_cfg(d_model=8, n_experts=4, top_k=1, bias_update_rate=rate)
    layer = identity_router(cfg, seed=1)
    with torch.no_grad():
        layer.router.weight.copy_(0.3 * torch.randn(4, 8))
        layer.router.weight[0, 0] = 2.0
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1.0
    return layer, x


def load_cv(load: torch.Tensor) -> float:
    return float(load.std(correction=0) / load.mean())


def test_bias_update_moves_the_load_toward_balance():
    layer, x = skewed_router(rate=0.02)
    layer(x)
    before = load_cv(layer.load)
    assert layer.load[0] > 0.5
    for _ in range(20):  # training forwards and one balancing step after each "optimizer step"
        layer(x)
        update_router_biases(layer)
    layer(x)
    assert load_cv(layer.load) < 0.25 * before, (before, layer.load)
    assert layer.router_bias[0] < 0 < layer.router_bias[1:].min()  # the overloaded expert is pushed down
    # Selection uses the bias (other experts than the unbiased top-1 for many tokens); the weights
    # do not: they are the bias-free formula of the chosen experts, for both router kinds.
    logits = layer.router(x).float()
    for kind in ("topk_softmax", "softmax_topk"):
        layer.kind, layer.top_k = kind, 2
        experts, weights, probs = layer.route(logits)
        assert (experts[:, 0] != probs.argmax(-1)).float().mean() > 0.2
        unbiased = logits.gather(-1, experts).softmax(-1) if kind == "topk_softmax" else probs.gather(-1, experts)
        assert torch.equal(weights, unbiased)


def test_bias_update_is_off_at_rate_0_and_skips_evaluation_forwards():
    layer, x = skewed_router(rate=0.0)
    layer(x)
    update_router_biases(layer)
    assert layer.router_bias.abs().sum() == 0 and layer.step_counts is None
    layer, x = skewed_router(rate=0.02)
    layer.eval()
    layer(x)  # evaluation: no load recorded, so the step changes nothing
    update_router_biases(layer)
    assert layer.router_bias.abs().sum() == 0


def test_selection_uses_the_bias():
    layer = identity_router(moe_cfg(d_model=4, top_k=1))
    with torch.no_grad():
        layer.router_bias[3] = 10.0
    experts, weights, _ = layer.route(LOGITS)
    assert experts.flatten().tolist() == [3, 3, 3]
    assert weights.flatten().tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# The model: layers, init, accounting, checkpoints, generation
# --------------------------------------------------------------------------------------------


def model_cfg(n_layers: int = 2, **moe) -> ModelConfig:
    return ModelConfig(n_layers=n_layers, d_model=32, n_heads=4, vocab_size=64, max_seq_len=64,
                       moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}))


def test_which_layers_are_moe():
    assert [model_cfg(6).is_moe_layer(i) for i in range(6)] == [True] * 6
    assert [model_cfg(6, every=2).is_moe_layer(i) for i in range(6)] == [False, True] * 3  # Qwen2-MoE's rule
    assert [model_cfg(6, first_dense=2).is_moe_layer(i) for i in range(6)] == [False, False, True, True, True, True]
    assert not any(model_cfg(6, n_experts=0).is_moe_layer(i) for i in range(6))
    model = Transformer(model_cfg(4, every=2))
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE", "MLP", "MoE"]
    assert [s["layer"] for s in (model(torch.zeros(1, 4, dtype=torch.long)), model.moe_stats())[1]] == [1, 3]
    assert Transformer(model_cfg(n_experts=0)).router_loss() == 0.0


def test_experts_are_initialised_as_the_dense_mlp():
    model = Transformer(ModelConfig(n_layers=8, d_model=64, n_heads=4, vocab_size=64, mlp_hidden=128,
                                    moe=MoEConfig(n_experts=8, n_shared_experts=1)))
    std, out_std = 0.02, 0.02 / math.sqrt(16)
    experts = model.blocks[0].mlp.experts
    assert experts.up.std().item() == pytest.approx(std, rel=0.05)
    assert experts.gate.std().item() == pytest.approx(std, rel=0.05)
    assert experts.down.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.blocks[0].mlp.shared.down.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert (model.blocks[0].mlp.router_bias == 0).all()


@pytest.mark.parametrize("moe,mlp", [
    (dict(), "swiglu"),
    (dict(n_shared_experts=2, expert_hidden=24, router="softmax_topk"), "swiglu"),
    (dict(n_experts=8, top_k=1, first_dense=1), "gelu"),
], ids=["top2", "shared", "top1-first-dense-gelu"])
def test_flops_per_token_match_the_counter(moe, mlp):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=256, max_seq_len=128, mlp=mlp,
                      moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}))
    dense = replace(cfg, moe=MoEConfig())
    size = model_size(cfg, 128)
    measured, measured_dense = measured_flops_per_token(cfg), measured_flops_per_token(dense)
    assert measured == pytest.approx(size.flops_per_token, rel=0.05)
    # Attention and the LM head cancel: what MoE changes is counted exactly (top-k routed experts,
    # shared experts, the router's matmul, forward and backward).
    assert measured - measured_dense == pytest.approx(size.flops_per_token - model_size(dense, 128).flops_per_token,
                                                      abs=1e-6)
    model = Transformer(cfg)
    assert size.params == sum(p.numel() for p in model.parameters())
    assert size.active < size.params


def test_active_parameters_by_hand():
    # 2 layers of d=32, 4 heads, vocab 64 (tied); SwiGLU experts of hidden 16; 8 experts, top 2,
    # 1 shared (hidden 16); the first layer dense (hidden 96).
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, mlp_hidden=96,
                      moe=MoEConfig(n_experts=8, top_k=2, n_shared_experts=1, expert_hidden=16, first_dense=1))
    attention, norms, expert = 4 * 32 * 32, 2 * 32, 3 * 32 * 16
    dense_block = attention + norms + 3 * 32 * 96
    moe_common = attention + norms + 32 * 8 + expert  # router and the shared expert
    size = model_size(cfg)
    assert size.non_embedding == dense_block + moe_common + 8 * expert + 32
    assert size.active_non_embedding == dense_block + moe_common + 2 * expert + 32
    assert size.active == size.active_non_embedding + 64 * 32
    assert size.matmul_params == 2 * attention + 3 * 32 * 96 + 32 * 8 + expert + 2 * expert + 64 * 32
    assert "active" in size.describe() and "active" not in model_size(model_cfg(n_experts=0)).describe()


def test_dry_run_memory_counts_every_expert():
    from llm.parallel.memory import activation_estimate, memory_plan

    cfg = model_cfg(n_experts=8, top_k=2)
    dense = replace(cfg, moe=MoEConfig())
    assert memory_plan(cfg, world=1).params == 4 * model_size(cfg).params  # all experts, not the active ones
    assert memory_plan(cfg, world=2, sharded=True).params == 2 * model_size(cfg).params  # halved by FSDP
    # Activations: the routed copies of each token (k of them) come on top of a dense MLP's.
    assert activation_estimate(cfg, 4, 64, 2, 1, "none") > activation_estimate(dense, 4, 64, 2, 1, "none")


def test_config_round_trips_through_checkpoints_and_old_ones_load_dense():
    cfg = model_cfg(n_shared_experts=1, capacity_factor=1.25, router="softmax_topk")
    assert ModelConfig.from_dict(asdict(cfg)) == cfg
    saved = asdict(model_cfg(n_experts=0))
    del saved["moe"]  # a checkpoint from before MoE existed
    assert ModelConfig.from_dict(saved).moe == MoEConfig()
    model = Transformer(cfg)
    assert "blocks.0.mlp.router_bias" in model.state_dict()  # the balancing bias is saved


def test_cached_greedy_decoding_equals_uncached():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_seq_len=64, init_std=0.2,
                      moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, capacity_factor=1.0))
    model = Transformer(cfg).eval()
    prompts = [[1, 5, 9, 2, 7, 3], [4, 4, 8]]
    greedy = generate(model, prompts, 12)
    assert greedy == generate(model, prompts, 12, use_cache=False)
    assert len(set(greedy[0] + greedy[1])) > 3


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_16_bit_training_forward_and_backward(precision):
    torch.manual_seed(0)
    model = Transformer(model_cfg(n_shared_experts=1, capacity_factor=1.0))
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(tokens)
    (logits.float().logsumexp(-1).mean() + model.router_loss()).backward()
    assert logits.dtype == torch.bfloat16 and model.blocks[0].mlp.experts.up.grad.abs().sum() > 0


def test_activation_checkpointing_keeps_losses_and_gradients():
    cfg = model_cfg(capacity_factor=1.0)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing: str) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_activation_checkpointing(model, checkpointing)
        loss = model(tokens).float().logsumexp(-1).mean() + model.router_loss()
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}

    (loss, plain), (loss_ac, ckpt) = grads("none"), grads("full")
    assert loss == loss_ac
    assert all(torch.allclose(plain[n.replace("_checkpoint_wrapped_module.", "")], g) for n, g in ckpt.items())


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_training_steps_add_the_router_losses(stage):
    from llm.parallel import Single
    from llm.stages.posttrain import masked_lm_loss
    from llm.stages.pretrain import PretrainModule, next_token_loss
    from llm.stages.sft import SFTModule

    cfg = model_cfg(aux_loss_coef=0.5, z_loss_coef=0.5)  # large: the router losses are a real share
    args = dict(model_config=cfg, optimizer=None, schedule=None, parallelism=Single(), total_steps=1,
                tokens_per_step=1, flops_per_token=1.0)
    module = PretrainModule(**args) if stage == "pretrain" else SFTModule(**args)
    module.configure_model()
    module.logging_step = lambda: False  # no Trainer here: nothing to log
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    if stage == "pretrain":
        loss = module.training_step(tokens, 0)
        lm = next_token_loss(module.model(tokens[:, :-1]), tokens[:, 1:])
    else:
        batch = {"tokens": tokens, "labels": tokens, "mask": torch.ones_like(tokens, dtype=torch.bool)}
        loss = module.training_step(batch, 0)
        lm = masked_lm_loss(module.model(tokens), tokens)
    extra = module.model.router_loss()
    assert extra > 0.5  # aux >= 1 at coefficient 0.5
    torch.testing.assert_close(loss, lm + extra)


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
def test_ppo_trains_an_moe_actor_and_critic(tmp_path, tmp_path_factory):
    """The on-policy path: rollouts decode with the KV cache through MoE layers, the actor and the
    critic both train (router and experts included), and the router metrics are logged."""
    from llm.model.value import ValueModel
    from llm.tokenizer import build_tokenizer
    from tests.test_posttrain import PARENT_SHAPE, build_stage, changed, fit, logged_names, save_run, snapshot

    tokenizer = build_tokenizer(None, tmp_path_factory.mktemp("cache"), kind="byte")
    cfg = ModelConfig(**PARENT_SHAPE, vocab_size=tokenizer.vocab_size,
                      moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, bias_update_rate=0.01))
    torch.manual_seed(0)
    parent = save_run(tmp_path / "runs" / "base", Transformer(cfg), cfg, tokenizer, "pretrain")
    reward = save_run(tmp_path / "runs" / "reward", ValueModel(cfg), cfg, tokenizer, "reward", value_head=True)
    built = build_stage("ppo", parent, tmp_path / "ppo", (f"posttrain.reward_model={reward}",))
    module = built["module"]
    module.configure_model()
    actor, critic = snapshot(module.model), snapshot(module.critic)
    fit(module, built["datamodule"], tmp_path / "ppo")
    assert changed(actor, module.model) == set(actor) and changed(critic, module.critic) == set(critic)
    assert module.model.blocks[0].mlp.router_bias.abs().sum() > 0  # balanced after each optimizer step
    logged = logged_names(tmp_path / "ppo")
    assert {"train/moe/aux_loss", "train/moe/load_cv", "train/moe/load/layer1/expert3"} <= logged


# --------------------------------------------------------------------------------------------
# Config validation and whole runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key", [
    (["model.moe.n_experts=1"], "model.moe.top_k=2"),  # top_k defaults to 2
    (["model.moe.n_experts=4", "model.moe.capacity_factor=0"], "model.moe.capacity_factor=0"),
    (["model.moe.n_experts=4", "model.moe.every=5"], "model.moe.every=5"),  # no MoE layer in 4
    (["model.moe.n_shared_experts=1"], "model.moe.n_shared_experts=1"),  # n_experts=0: dense
    (["model.moe.n_experts=4", "model.moe.router=sigmoid"], "model.moe.router"),
    (["model.moe.n_experts=4", "parallelism=fsdp_tp", "trainer.devices=2"], "parallelism.tensor_parallel=2"),
])
def test_config_errors_name_the_key(overrides, key, tmp_path):
    try:
        validate(compose_train([*overrides], tmp_path))
    except ConfigError as e:
        assert key in str(e), str(e)
    except Exception as e:  # Hydra refuses a bad choice while composing
        assert key in str(e), str(e)
    else:
        pytest.fail(f"{overrides} validated")


@pytest.mark.parametrize("overrides", [
    ["model.moe.n_experts=8", "model.moe.top_k=1", "model.moe.n_shared_experts=1", "model.moe.expert_hidden=64",
     "model.moe.every=2", "model.moe.router=softmax_topk", "model.moe.bias_update_rate=0.001",
     "model.moe.capacity_factor=1.25", "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0"],
    ["model.moe.n_experts=4", "model.moe.first_dense=1", "parallelism=fsdp", "trainer.devices=2"],
], ids=["every-option", "fsdp"])
def test_moe_options_compose_and_validate(overrides, tmp_path):
    validate(compose_train(overrides, tmp_path))


def test_bad_moe_config_exits_2_naming_the_key(tmp_path, monkeypatch, capsys):
    code, stderr = llm_cli("train", ["model.moe.n_experts=4", "model.moe.top_k=8"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "model.moe.top_k=8" in stderr and "allowed: 1..4" in stderr and "Traceback" not in stderr


def test_moe_run_logs_router_metrics_and_counts_active_parameters(tmp_path, monkeypatch, capsys):
    args = [*TINY_RUN, "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.bias_update_rate=0.01",
            "model.moe.capacity_factor=1.0", "budget.steps=2", "trainer.log_every=1", "trainer.val_every=2",
            "data.val_batches=1", "hydra.run.dir=runs/moe"]
    code, stderr = llm_cli("train", args, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    run = tmp_path / "runs" / "moe"
    records = [r for r in read_metrics(run / "metrics.jsonl") if "train/moe/aux_loss" in r]
    assert len(records) == 2
    for r in records:
        assert r["train/moe/aux_loss"] >= 1.0 - 1e-6  # 1 at perfect balance, never below
        assert r["train/moe/z_loss"] > 0 and r["train/moe/load_cv"] >= 0 and 0 <= r["train/moe/dropped_frac"] < 1
        loads = [r[f"train/moe/load/layer{i}/expert{j}"] for i in range(2) for j in range(4)]
        assert sum(loads) == pytest.approx(2.0)  # each layer's fractions sum to 1
        # load_cv: each layer's std / mean of its experts' loads (population std), averaged
        cvs = [float(np.std(loads[i * 4:(i + 1) * 4]) / np.mean(loads[i * 4:(i + 1) * 4])) for i in range(2)]
        assert r["train/moe/load_cv"] == pytest.approx(sum(cvs) / 2, rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params_active"] < summary["params_total"] == summary["N"]
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, max_seq_len=256, vocab_size=summary["vocab_size"],
                      moe=MoEConfig(n_experts=4, top_k=2))
    assert summary["flops_per_token"] == model_size(cfg, 64).flops_per_token
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["model.blocks.0.mlp.router_bias"].abs().sum() > 0  # balancing moved and saved it


def _fsdp_moe_step(rank):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llm.parallel import FSDP
    from llm.stages.pretrain import next_token_loss

    cfg = model_cfg(n_shared_experts=1, bias_update_rate=0.01, capacity_factor=1.5)
    torch.manual_seed(0)
    reference = Transformer(cfg)
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = FSDP().parallelize(Transformer(cfg), mesh)
    experts = model.blocks[0].mlp.experts.up
    assert experts.to_local().shape == (2, *experts.shape[1:])  # dim 0 (the experts) sharded over the 2 ranks
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(rank))
    loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]) + model.router_loss()
    expected = next_token_loss(reference(tokens[:, :-1]), tokens[:, 1:]) + reference.router_loss()
    torch.testing.assert_close(loss, expected)  # the sharded model computes what the whole one does
    loss.backward()
    optimizer.step()
    update_router_biases(model)
    biases = torch.cat([b.mlp.router_bias for b in model.blocks])
    gathered = [torch.zeros_like(biases) for _ in range(2)]
    dist.all_gather(gathered, biases)
    assert torch.equal(gathered[0], gathered[1]) and biases.abs().sum() > 0  # replicas move their biases alike


@pytest.mark.slow  # ~16 s: two spawned processes
def test_fsdp_shards_the_experts_and_balances_alike_on_every_rank():
    from tests.test_parallel import _run_ranks

    _run_ranks(_fsdp_moe_step)


@pytest.mark.slow  # ~90 s: a single-process run and two 2-process runs
def test_ddp_and_fsdp_runs_reproduce_the_single_process_curve(tmp_path):
    from tests.conftest import run_cli
    from tests.test_parallel import CURVE, val_curve

    moe = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.n_shared_experts=1",
           "model.moe.bias_update_rate=0.01", "model.moe.capacity_factor=1.25", "budget.steps=20"]
    # Micro-batches of 8 rows either way: the router losses, capacities and balancing loads are
    # the same per micro-batch, so the curves agree to float round-off (measured: to 1e-5).
    curves = {}
    for option in ("single", "ddp", "fsdp"):
        devices = [] if option == "single" else ["trainer.devices=2"]
        result = run_cli([*CURVE, *moe, f"parallelism={option}", *devices, f"hydra.run.dir={tmp_path / option}"],
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        curves[option] = val_curve(tmp_path / option)
    assert [s for s, _ in curves["single"]] == [5, 10, 15, 20]
    for option in ("ddp", "fsdp"):
        assert [v for _, v in curves[option]] == pytest.approx([v for _, v in curves["single"]], abs=2e-4)


# --------------------------------------------------------------------------------------------
# Benchmark against transformers' Mixtral (llm-bench bench.against=transformers)
# --------------------------------------------------------------------------------------------


def test_bench_against_transformers_trains_an_moe_model_and_its_mixtral_twin(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    args = ["model=nano", "model.vocab_size=2048", "model.moe.n_experts=4", "model.moe.expert_hidden=32",
            "data.seq_len=16", "data.micro_batch_size=2", "bench.against=transformers", "bench.steps=1",
            "bench.warmup=1", "bench.repeats=1", f"paths.runs_dir={tmp_path}/runs"]
    code, stderr = llm_cli("bench", args, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    (out,) = (tmp_path / "runs" / "bench").glob("*/bench_transformers.json")
    result = json.loads(out.read_text())
    assert result["hf_model"] == "MixtralForCausalLM" and result["family"] == "mixtral"
    # The same weights on both sides: the first language-model losses agree (ln 2048 = 7.6 at init).
    assert result["first_loss_ours"] == pytest.approx(result["first_loss_hf"], abs=1e-4)
    assert result["first_loss_ours"] == pytest.approx(math.log(2048), abs=0.1)
    assert result["params_active"] < result["params"] and result["ratio"] > 0
    # A model transformers has no family for is refused before any work, naming the key and why.
    code, stderr = llm_cli("bench", [*args, "model.moe.router=softmax_topk"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "bench.against=transformers" in stderr and "router=softmax_topk" in stderr
    assert "Traceback" not in stderr


def test_moe_ablation_arms_have_equal_active_flops_and_tokens(tmp_path):
    """experiments/moe_ablation.yaml: dense and each MoE arm train on the same tokens with the same
    FLOPs per token (router included), while the MoE arms hold more parameters."""
    import re

    from llm.config import typed

    cfg = compose_train(["experiment=moe_ablation"], tmp_path)
    arms = re.findall(r"\{[^}]*\}", str(cfg.hydra.sweeper.params["model.moe"]))
    assert cfg.budget.tokens is not None and cfg.budget.flops is None and cfg.budget.steps is None
    sizes = []
    for arm in arms:
        arm_cfg = compose_train(["experiment=moe_ablation", f"model.moe={arm}"], tmp_path)
        validate(arm_cfg)
        model = typed(arm_cfg.model, ModelConfig)
        model.vocab_size = arm_cfg.tokenizer.vocab_size
        sizes.append((model.moe.n_experts, model.moe.top_k, model_size(model, arm_cfg.data.seq_len)))
    (dense_experts, _, dense), *moe = sizes
    assert dense_experts == 0 and {(e, k) for e, k, _ in moe} == {(6, 1), (6, 2)}
    for _, _, size in moe:
        assert size.flops_per_token == dense.flops_per_token and size.active == dense.params < size.params


def test_top_k_may_be_every_expert_but_no_more():
    assert MoEConfig(n_experts=4, top_k=4).problems(n_layers=2) == []  # every token to every expert
    assert MoEConfig(n_experts=4, top_k=5).problems(n_layers=2) == [
        "model.moe.top_k=5: a token cannot go to more than the model.moe.n_experts=4 experts; allowed: 1..4"]
