"""Expert parallelism (llm.parallel.expert) on gloo processes: the experts split over the ranks
with token all-to-all train exactly as the single-process model on the same micro-batches (losses,
gradients, every weight, the optimizer's moments), under DDP and FSDP2, with one EP group (2 ranks)
or two (4 ranks: the experts' replicas average their gradients); checkpoints hold the
single-process layout; the dry run shows the expert axis; validation refuses what EP cannot do,
naming the keys. Whole runs through llm-train (Lightning's strategies, resume, consolidation):
the slow test at the end."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

from llm.config import ConfigError, validate
from llm.model import ModelConfig, MoEConfig, Transformer
from llm.model.moe import update_router_biases
from llm.parallel.memory import memory_plan
from llm.stages.optim import build_optimizer, clip_grad_norm_
from llm.stages.pretrain import next_token_loss
from tests.conftest import compose_train
from tests.distributed import run_ranks

STEPS = 3
EP = 2


def ep_cfg() -> ModelConfig:
    # 4 experts, 2 per rank; the first layer dense; top-2 with a shared expert, a capacity (drops),
    # the router losses and the bias update: everything that could differ between ranks.
    return ModelConfig(n_layers=3, d_model=16, n_heads=2, vocab_size=64, mlp_hidden=32, init_std=0.2,
                       moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, expert_hidden=16, first_dense=1,
                                     capacity_factor=1.25, bias_update_rate=0.01, aux_loss_coef=0.01,
                                     z_loss_coef=0.001))


def micro_batches(world: int) -> list[torch.Tensor]:
    """One micro-batch per rank and step, the same on every process."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (3, 13), generator=g) for _ in range(STEPS * world)]


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(partial(torch.optim.AdamW, lr=3e-2, weight_decay=0.1, fused=None), model)


def single_process(world: int) -> tuple[list[list[float]], dict, dict, dict]:
    """The reference: one process, the ranks' micro-batches accumulated (each loss / world, as
    data parallelism averages), clipped, stepped, biases balanced on the summed loads. Returns the
    losses, the first step's gradients, the final weights and the optimizer's first moments."""
    torch.manual_seed(0)
    model = Transformer(ep_cfg())
    optimizer, batches, losses, grads = adamw(model), micro_batches(world), [], {}
    for step in range(STEPS):
        row = []
        for rank in range(world):
            tokens = batches[step * world + rank]
            loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]) + model.router_loss()
            (loss / world).backward()
            row.append(loss.item())
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        clip_grad_norm_(list(model.parameters()), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model)  # no process group here: the loads of all micro-batches
        losses.append(row)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: s["exp_avg"] for p, s in optimizer.state.items()}
    return losses, grads, model.state_dict(), moments


def _ep_trains_as_one_process(rank: int, world: int, option: str, expected: list[list[float]], grads: dict,
                              final: dict, moments: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from llm.parallel import DDP, FSDP
    from llm.parallel.expert import ExpertParallelExperts, gather_optimizer_state, hide_experts_from_ddp, \
        shard_optimizer_state

    if option == "ddp" and world == 2:  # a dense model (an init_from parent's, which validation has not seen)
        with pytest.raises(ConfigError, match="parallelism.expert_parallel=2: splits the experts of an MoE model"):
            DDP(expert_parallel=EP).parallelize(Transformer(replace(ep_cfg(), moe=MoEConfig())))
    torch.manual_seed(0)
    sharded = Transformer(ep_cfg())  # the reference's initial weights
    if option == "ddp":
        model = DDP(expert_parallel=EP).parallelize(sharded).to("cpu")  # moved, as Lightning does
        hide_experts_from_ddp(model)
        wrapped = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        model = wrapped = FSDP(expert_parallel=EP).parallelize(sharded, mesh).to("cpu")
    experts = model.blocks[1].mlp.experts
    assert isinstance(experts, ExpertParallelExperts) and (experts.ep, experts.n_local) == (EP, 2)
    assert experts.up.shape == final["blocks.1.mlp.experts.up"].shape  # the whole (E, ...) tensor, sharded
    # The dry-run plan's bytes are the bytes this rank holds (its experts only).
    plan = memory_plan(ep_cfg(), world, sharded=option == "fsdp", rank=rank, expert_parallel=EP)
    held = {id(p): p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()}
    assert plan.params == sum(t.numel() * 4 for t in held.values())
    assert plan.expert_params == sum(p.to_local().numel() * 4 for name, p in model.named_parameters()
                                     if ".experts." in name)

    optimizer, batches = adamw(model), micro_batches(world)
    for step in range(STEPS):
        tokens = batches[step * world + rank]
        loss = next_token_loss(wrapped(tokens[:, :-1]), tokens[:, 1:]) + model.router_loss()
        loss.backward()
        # Each rank's loss is the reference's on the same micro-batch: routing, capacity drops and
        # router losses are per micro-batch, wherever the experts compute.
        assert loss.item() == pytest.approx(expected[step][rank], abs=1e-5), (step, rank)
        for name, p in model.named_parameters() if step == 0 else ():
            # Averaged as the reference's: the experts' over the tokens of every rank, not per rank.
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)
        clip_grad_norm_(list(model.parameters()), 0.5)  # the total norm counts the other ranks' experts
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model)

    # Every weight equals the reference's: the experts gathered whole, in the single-process layout.
    state = model.state_dict()
    for name, value in final.items():
        got = state[name]
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, value, atol=2e-5, rtol=1e-4, msg=name)
    if option == "ddp":
        assert not isinstance(state["blocks.1.mlp.experts.up"], DTensor)  # the state-dict hook gathered it
        # The optimizer's moments, gathered whole, equal the reference's; and shard back.
        full = gather_optimizer_state(optimizer, optimizer.state_dict())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        for i, p in enumerate(params):
            torch.testing.assert_close(full["state"][i]["exp_avg"], moments[names[id(p)]], atol=1e-5, rtol=1e-4,
                                       msg=names[id(p)])
        # A fresh EP model resumes from the whole tensors: this rank's experts and moments.
        torch.manual_seed(1)
        fresh = DDP(expert_parallel=EP).parallelize(Transformer(ep_cfg()))
        fresh.load_state_dict(state)
        fresh_optimizer = adamw(fresh)
        fresh_optimizer.load_state_dict(shard_optimizer_state(fresh_optimizer, full))
        up = fresh.blocks[1].mlp.experts.up
        torch.testing.assert_close(up.to_local(), experts.up.to_local())
        i = next(i for i, p in enumerate(p for g in fresh_optimizer.param_groups for p in g["params"]) if p is up)
        torch.testing.assert_close(fresh_optimizer.state[up]["exp_avg"].to_local(),
                                   optimizer.state[params[i]]["exp_avg"].to_local())


@pytest.mark.parametrize("option,world", [("ddp", 2), pytest.param("fsdp", 2, marks=pytest.mark.slow),
                                          pytest.param("ddp", 4, marks=pytest.mark.slow),
                                          pytest.param("fsdp", 4, marks=pytest.mark.slow)],
                         ids=["ddp", "fsdp", "ddp-2-groups", "fsdp-2-groups"])
def test_expert_parallel_trains_as_one_process(option, world):
    run_ranks(_ep_trains_as_one_process, option, *single_process(world), world=world)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

MOE = ["model.moe.n_experts=4", "model.moe.top_k=2"]


@pytest.mark.parametrize("overrides", [
    [*MOE, "parallelism=ddp", "trainer.devices=2", "parallelism.expert_parallel=2"],
    [*MOE, "parallelism=fsdp", "trainer.devices=4", "parallelism.expert_parallel=2"],  # 2 groups of 2
    [*MOE, "parallelism=hsdp", "trainer.devices=4", "parallelism.expert_parallel=4"],
], ids=["ddp", "fsdp-2-groups", "hsdp"])
def test_expert_parallel_options_validate(overrides, tmp_path):
    validate(compose_train(overrides, tmp_path))


@pytest.mark.parametrize("overrides,messages", [
    (["parallelism=ddp", "trainer.devices=2", "parallelism.expert_parallel=2"],
     ["parallelism.expert_parallel=2: splits the experts of an MoE model", "model.moe.n_experts=0"]),
    ([*MOE, "parallelism=ddp", "trainer.devices=6", "parallelism.expert_parallel=3"],
     ["parallelism.expert_parallel=3: must divide model.moe.n_experts=4", "allowed: 1, 2, 4"]),
    ([*MOE, "parallelism=fsdp", "trainer.devices=2", "parallelism.expert_parallel=4"],
     ["parallelism.expert_parallel=4: must divide the 2 data-parallel ranks"]),
    ([*MOE, "parallelism=fsdp_tp", "trainer.devices=4", "parallelism.expert_parallel=2"],
     ["parallelism.expert_parallel=2 with parallelism.tensor_parallel=2", "no plan for MoE layers"]),
    ([*MOE, "parallelism=single", "parallelism.expert_parallel=2"], ["expert_parallel"]),
    ([*MOE, "posttrain=grpo", "init_from=parent", "parallelism=ddp", "trainer.devices=2",
      "parallelism.expert_parallel=2"],
     ["posttrain=grpo with parallelism=ddp and parallelism.expert_parallel=2", "decode in lockstep",
      "allowed: parallelism=fsdp with expert_parallel"]),
], ids=["dense-model", "experts-not-divisible", "ranks-not-divisible", "tensor-parallel", "single", "grpo-ddp"])
def test_expert_parallel_refusals_name_the_keys(overrides, messages, tmp_path):
    try:
        validate(compose_train(overrides, tmp_path))
    except ConfigError as e:
        for message in messages:
            assert message in str(e), str(e)
    except Exception as e:  # parallelism=single has no such key: refused while composing
        assert all(m in str(e) for m in messages), str(e)
    else:
        pytest.fail(f"{overrides} validated")


def test_a_post_training_run_is_checked_against_its_parent_model(tmp_path):
    # The first validation pass sees the composed (dense) model, not yet the init_from parent's:
    # EP is not refused for it then; the second pass (the parent's MoE merged in) checks the experts.
    args = ["posttrain=sft", "init_from=parent", "parallelism=fsdp", "trainer.devices=2"]
    validate(compose_train([*args, "parallelism.expert_parallel=2"], tmp_path))
    with pytest.raises(ConfigError, match="parallelism.expert_parallel=2: must divide model.moe.n_experts=3"):
        validate(compose_train([*args, "parallelism.expert_parallel=2", "model.moe.n_experts=3"], tmp_path))


def test_dry_run_shows_the_expert_axis_and_the_experts_per_rank(tmp_path, caplog):
    import logging

    from llm.run.plan import Settings, dry_run

    cfg = compose_train(["model=nano", "model.moe.n_experts=8", "model.moe.top_k=2", "parallelism=fsdp",
                         "trainer.devices=8", "parallelism.expert_parallel=4", "tokenizer=byte", "dry_run=true"],
                        tmp_path)
    validate(cfg)
    caplog.set_level(logging.INFO)
    result = dry_run(cfg, Settings.of(cfg))
    assert result["mesh"] == {"shard (data parallel)": 8, "expert parallel": 4}
    assert "mesh: shard (data parallel) 8 x expert parallel 4" in caplog.text
    # By hand: every layer of nano is MoE, of 8 SwiGLU experts (3 matrices of d x hidden); a rank
    # holds 2 of them, which FSDP halves again over the 2 ranks holding the same experts.
    model = Settings.of(cfg).model
    expert_bytes = 4 * model.n_layers * (2 * 3 * model.d_model * model.expert_hidden_size) // 2
    assert f"routed experts per rank: 2 of 8 experts per MoE layer, parameters {expert_bytes / 2**20:.3f} MiB" \
        in caplog.text


# --------------------------------------------------------------------------------------------
# Whole runs: Lightning's strategies, checkpoints, resume
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~2 min: a single-process run and four 2-process runs
def test_expert_parallel_runs_reproduce_the_single_process_run_and_resume(tmp_path):
    from llm.checkpoint import load_network
    from tests.conftest import run_cli
    from tests.test_parallel import CURVE, val_curve

    moe = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.n_shared_experts=1",
           "model.moe.bias_update_rate=0.01", "model.moe.capacity_factor=1.25"]
    single = tmp_path / "single"
    result = run_cli([*CURVE, *moe, "budget.steps=20", f"hydra.run.dir={single}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = load_network(single / "checkpoints" / "step-00000010.ckpt")
    for option in ("ddp", "fsdp"):
        run = tmp_path / option
        result = run_cli([*CURVE, *moe, f"parallelism={option}", "parallelism.expert_parallel=2", "trainer.devices=2",
                          "budget.steps=10", f"hydra.run.dir={run}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        last = run / "checkpoints" / "last.ckpt"
        if option == "fsdp":  # shards, one file per rank; consolidated into the single-process layout
            assert len(list(last.glob("*.distcp"))) == 2
            done = run_cli([str(last), "-o", str(tmp_path / "fsdp.ckpt")], cwd=tmp_path, command="checkpoint")
            assert done.returncode == 0, done.stderr[-3000:]
            last = tmp_path / "fsdp.ckpt"
        else:  # one file, every expert whole: what llm-generate, llm-eval and llm-hf read
            state = torch.load(last, weights_only=True)["state_dict"]
            assert state["model.blocks.0.mlp.experts.up"].shape[0] == 4
            moments = torch.load(last, weights_only=True)["optimizer_states"][0]["state"]
            assert {v["exp_avg"].shape[0] for v in moments.values() if v["exp_avg"].dim() == 3} == {4}
        trained = load_network(last)
        for (name, p), q in zip(reference.named_parameters(), trained.parameters()):
            torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=f"{option}: {name}")
        torch.testing.assert_close(trained(tokens), reference(tokens), atol=1e-5, rtol=1e-4)
        # Resumed at the same expert-parallel degree, it continues the single-process curve.
        resumed = run_cli([f"resume={run}", "budget.steps=20"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [s for s, _ in val_curve(run)] == [5, 10, 15, 20]
        # (measured: equal to 1e-6)
        assert [v for _, v in val_curve(run)] == pytest.approx([v for _, v in val_curve(single)], abs=1e-4)
