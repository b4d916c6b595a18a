"""Parallelism on CPU with real torch.distributed (gloo, 2 processes): tensor parallelism equals
the unsharded model, FSDP2 shards every parameter, HSDP meshes train, and whole runs under DDP,
FSDP and HSDP reproduce the single-process loss curve."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llm.model import AttentionConfig, ModelConfig, PositionConfig, Transformer
from llm.parallel import FSDP
from llm.parallel.memory import memory_plan
from llm.parallel.tensor_parallel import apply_tensor_parallel
from llm.stages.pretrain import next_token_loss
from llm.checkpoint import load_network
from llm.tracking.metrics import read_metrics
from tests.conftest import TINY_RUN, llm_cli, llm_cli_output, run_cli
from tests.distributed import run_ranks

WORLD = 2


def _run_ranks(fn, *args) -> None:
    """fn(rank, *args) on WORLD gloo processes (tests.distributed.run_ranks, without the world size)."""
    run_ranks(_without_world, fn, *args, world=WORLD)


def _without_world(rank, world, fn, *args):
    fn(rank, *args)


def tiny(n_kv_heads=None, position="rope", **kw) -> ModelConfig:
    return ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=32, init_std=0.2,
                       attention=AttentionConfig(n_kv_heads=n_kv_heads), position=PositionConfig(kind=position), **kw)


def _tp_equals_unsharded(rank, cases):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("data_parallel", "tensor_parallel"))
    for n_kv, position, tie, mlp in cases:
        torch.manual_seed(0)
        cfg = tiny(n_kv, position, tie_embeddings=tie, mlp=mlp)
        reference, sharded = Transformer(cfg), Transformer(cfg)
        sharded.load_state_dict(reference.state_dict())
        apply_tensor_parallel(sharded, mesh["tensor_parallel"])
        plan = memory_plan(cfg, WORLD, tensor_parallel=WORLD, sharded=True, rank=rank)
        assert plan.params == sum(p.to_local().numel() * 4 if isinstance(p, DTensor) else p.numel() * 4
                                  for p in {id(p): p for p in sharded.parameters()}.values()), "TP plan bytes"
        assert sharded.blocks[0].attn.q.weight.to_local().shape[0] == cfg.n_heads * cfg.head_size // WORLD
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
        losses = []
        for model in (reference, sharded):
            logits = model(tokens[:, :-1])
            logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
            losses.append((logits, next_token_loss(logits, tokens[:, 1:])))
            losses[-1][1].backward()
        case = f"n_kv_heads={n_kv} {position} tie={tie} {mlp}"
        torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-4, msg=case)
        for (name, p), q in zip(reference.named_parameters(), sharded.parameters()):
            grad = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
            torch.testing.assert_close(grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{case}: {name}")


def test_tensor_parallel_forward_and_backward_equal_the_unsharded_model(rank_checks):
    # MQA (1 K/V head) cannot be split over 2 ranks; validation refuses it (tests/test_config.py).
    rank_checks("tensor_parallel")


def _tp_value_model_equals_unsharded(rank, cases):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from llm.model.value import ValueModel

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("data_parallel", "tensor_parallel"))
    for position, tie in cases:
        torch.manual_seed(0)
        cfg = tiny(2, position, tie_embeddings=tie)
        reference, sharded = ValueModel(cfg), ValueModel(cfg)
        sharded.load_state_dict(reference.state_dict())
        FSDP(tensor_parallel=WORLD).parallelize(sharded, mesh)  # what parallelism=fsdp_tp applies
        assert sharded.blocks[0].attn.q.weight.to_local().shape[0] == cfg.n_heads * cfg.head_size // WORLD
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        values = [model(tokens) for model in (reference, sharded)]
        case = f"value model, {position} tie={tie}"
        torch.testing.assert_close(values[1], values[0], atol=1e-5, rtol=1e-4, msg=case)
        for v in values:
            v.square().mean().backward()
        for (name, p), q in zip(reference.named_parameters(), sharded.parameters()):
            grad = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
            torch.testing.assert_close(grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{case}: {name}")


def test_tensor_parallel_value_model_equals_the_unsharded_model(rank_checks):
    # The reward model and PPO's critic under parallelism=fsdp_tp (posttrain=reward|ppo).
    rank_checks("tensor_parallel_value_model")


def _fsdp_shards(rank):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    torch.manual_seed(0)
    cfg = tiny(tie_embeddings=False)
    full = {n: p.detach().clone() for n, p in Transformer(cfg).named_parameters()}
    torch.manual_seed(0)
    model = FSDP().parallelize(Transformer(cfg), mesh)
    for name, p in model.named_parameters():
        local = p.to_local()
        rows = full[name].shape[0]
        expected_rows = min(-(-rows // WORLD), max(0, rows - rank * -(-rows // WORLD)))
        assert local.shape[0] == expected_rows, (name, local.shape, rows)
        assert local.numel() <= -(-full[name].numel() // WORLD) + full[name][0].numel()
        torch.testing.assert_close(p.full_tensor(), full[name])  # a shard of the same initialisation
    # The dry-run plan's figures equal the bytes this rank really holds.
    plan = memory_plan(cfg, WORLD, sharded=True, rank=rank)
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    assert plan.params == held
    optimizer = torch.optim.AdamW(model.parameters())
    next_token_loss(model(torch.randint(0, 64, (2, 9))[:, :-1]), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    assert plan.grads == sum(p.grad.to_local().numel() * 4 for p in model.parameters())
    moments = sum(v.to_local().numel() * 4 for st in optimizer.state.values() for k, v in st.items() if k != "step")
    assert plan.optimizer == moments


def test_fsdp_gives_each_rank_about_half_of_every_parameter(rank_checks):
    rank_checks("fsdp_shards")


def _hsdp_trains(rank, replicate):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    option = FSDP(replicate=replicate)
    torch.manual_seed(0)  # replicas start equal, as seed_everything makes them in a run
    model = option.parallelize(Transformer(tiny()), mesh)
    shard_mesh = option.shard_mesh(mesh)
    assert shard_mesh.mesh_dim_names == ("replicate", "shard") and shard_mesh["replicate"].size() == replicate
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(rank))
    losses = []
    for _ in range(8):
        loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    replicas = [torch.zeros(1) for _ in range(WORLD)]
    dist.all_gather(replicas, next(model.parameters()).full_tensor().sum().reshape(1))
    assert torch.allclose(replicas[0], replicas[1])  # every rank sees the same model


@pytest.mark.parametrize("replicate", [1, 2], ids=["1x2 mesh", "2x1 mesh"])
def test_hsdp_meshes_train(replicate, rank_checks):
    rank_checks(f"hsdp_replicate_{replicate}")


# The checks above, in one pair of gloo processes: each pair of processes costs ~10 s of CI to
# start (two interpreters importing torch), the checks themselves well under a second each.
RANK_CHECKS = {
    "tensor_parallel": (_tp_equals_unsharded, [(None, "rope", True, "swiglu"), (2, "rope", False, "swiglu"),
                                               (None, "alibi", True, "gelu"), (2, "alibi", False, "swiglu"),
                                               (2, "learned", True, "relu")]),
    "tensor_parallel_value_model": (_tp_value_model_equals_unsharded, [("rope", True), ("alibi", False)]),
    "fsdp_shards": (_fsdp_shards,),
    "hsdp_replicate_1": (_hsdp_trains, 1),
    "hsdp_replicate_2": (_hsdp_trains, 2),
}


def _every_check(rank, passed):
    for name, (fn, *args) in RANK_CHECKS.items():
        fn(rank, *args)
        Path(passed, f"{name}.rank{rank}").touch()  # this rank's asserts of this check held


@pytest.fixture(scope="module")
def rank_checks(tmp_path_factory):
    """Runs RANK_CHECKS in order on WORLD gloo processes, once; rank_checks(name) fails unless that
    check passed on every rank (a failing check stops the ranks: its traceback names it)."""
    passed = tmp_path_factory.mktemp("rank_checks")
    failure = ""
    try:
        _run_ranks(_every_check, str(passed))
    except (Exception, pytest.fail.Exception) as e:  # the first rank's traceback, or the ranks died
        failure = str(e)

    def check(name: str) -> None:
        assert name in RANK_CHECKS
        missing = [r for r in range(WORLD) if not (passed / f"{name}.rank{r}").exists()]
        assert not missing, f"{name} failed (or an earlier check of {list(RANK_CHECKS)} did) on ranks {missing}:\n{failure}"

    return check


# Whole runs: the same global batch (16 = 8 per rank x 2 ranks = 8 x 2 accumulation steps) and seed.
# A constant learning rate (its 5% warmup is int(0.5) = 0 steps of a 10-step run, int(1) = 1 of a
# 20-step one, which starts at the full rate): the first 10 steps of a 20-step run are a 10-step run.
CURVE = [*TINY_RUN, "data.global_batch_size=16", "schedule=constant", "trainer.val_every=5", "trainer.log_every=5",
         "trainer.checkpoint_every=10"]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The single-process run of CURVE for 20 steps, in single20: its step-10 checkpoint is kept
    (keep_last=2), the weights of a 10-step run."""
    root = tmp_path_factory.mktemp("single")
    result = run_cli([*CURVE, "budget.steps=20", f"hydra.run.dir={root}/single20"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def train_here(args: list[str], cwd: Path, monkeypatch, capsys) -> None:
    """llm-train in this process (tests.conftest.llm_cli): the launcher of the ranks, if any, is
    this process, one interpreter fewer to start than a subprocess."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks'
    code, stderr = llm_cli("train", args, cwd, monkeypatch, capsys)
    assert code == 0, stderr[-3000:]


def assert_reproduces_the_single_process_curve(run: Path, single_runs: Path, *dirs: str) -> None:
    reference, curve = val_curve(single_runs / "single20"), val_curve(run)
    assert [s for s, _ in curve] == [5, 10, 15, 20]
    # Gradients are averaged over ranks (not summed): the curves agree to float round-off.
    assert [v for _, v in curve] == pytest.approx([v for _, v in reference], abs=2e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert not list(run.glob(".hydra*")) or (run / ".hydra").is_dir()  # only the job's own .hydra folder
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) in (sorted(["checkpoints", *dirs]),
                                                                    sorted([".hydra", "checkpoints", *dirs]))


def test_ddp_run_reproduces_the_single_process_curve(ddp_run, single_runs):
    run, _ = ddp_run  # (tests.conftest.ddp_run: logged to W&B offline, which test_wandb_conventions reads)
    assert_reproduces_the_single_process_curve(run, single_runs, "wandb")


@pytest.mark.slow
@pytest.mark.parametrize("option,extra", [
    # CI: test_sharded_checkpoint_resumes_at_world_size_one_and_consolidates
    # (FSDP on two ranks for 10 steps, then one process: the same curve)
    ("fsdp", []),
    ("hsdp", []),  # CI: test_hsdp_meshes_train
    ("fsdp", ["parallelism.activation_checkpointing=full"])], ids=["fsdp", "hsdp", "fsdp+activation-checkpointing"])
def test_two_process_run_reproduces_the_single_process_curve(option, extra, single_runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / option
    train_here([*CURVE, f"parallelism={option}", "trainer.devices=2", "budget.steps=20", *extra, f"hydra.run.dir={run}"],
               single_runs, monkeypatch, capsys)
    assert_reproduces_the_single_process_curve(run, single_runs)


def test_sharded_checkpoint_resumes_at_world_size_one_and_consolidates(fsdp_run, single_runs, tmp_path):
    from llm.cli.checkpoint import main as llm_consolidate

    run = tmp_path / "fsdp"
    shutil.copytree(fsdp_run, run, symlinks=True)  # CURVE under FSDP on 2 ranks, 10 steps (conftest.fsdp_run), kept
    shards = run / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2
    # Two FSDP ranks follow the single-process curve (gradients averaged, reduced in another order).
    assert [s for s, _ in val_curve(run)] == [5, 10]
    assert [v for _, v in val_curve(run)] == pytest.approx([v for _, v in val_curve(single_runs / "single20")[:2]],
                                                            abs=2e-4)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2

    # Consolidated into one file, it loads into a plain model equal to the single-process one at step 10.
    llm_consolidate([str(shards), "-o", str(tmp_path / "full.ckpt")])
    sharded_model = load_network(tmp_path / "full.ckpt")
    single_model = load_network(single_runs / "single20" / "checkpoints" / "step-00000010.ckpt")
    tokens = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(sharded_model(tokens), single_model(tokens), atol=2e-4, rtol=1e-4)

    # Resumed on one process (resharded on load), it continues the single-process curve. (In a
    # subprocess: in this one it would leave a process group that later forked ranks, as
    # test_posttrain_parallel's, inherit and hang in.)
    resumed = run_cli([f"resume={run}", "trainer.devices=1", "budget.steps=20"], cwd=single_runs,
                      env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [v for _, v in val_curve(run)] == pytest.approx([v for _, v in val_curve(single_runs / "single20")], abs=2e-4)


def test_dry_run_plan_equals_counted_bytes_of_a_single_process_model():
    cfg = tiny(tie_embeddings=True, bias=True, norm="layernorm")
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    next_token_loss(model(torch.randint(0, 64, (2, 8))), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    plan = memory_plan(cfg, world=1)
    assert plan.params == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.optimizer == sum(v.numel() * v.element_size() for st in optimizer.state.values()
                                 for k, v in st.items() if k != "step")
    assert plan.activations > 0


def test_dry_run_prints_the_layout_and_reads_no_data(tmp_path, monkeypatch, capsys):
    # llm-train in this process (tests.conftest.llm_cli_output): a subprocess shows nothing more.
    def llm_train(args: list[str]) -> tuple[int, str, str]:
        return llm_cli_output("train", args, tmp_path, monkeypatch, capsys)

    code, out, err = llm_train(["model=1b", "parallelism=fsdp_tp", "trainer.devices=8", "dry_run=true"])
    assert code == 0, err[-2000:]
    assert "shard (data parallel) 4 x tensor parallel 2" in out
    assert "optimizer state" in out and not (tmp_path / ".cache").exists()
    code, _, err = llm_train(["model=1b", "parallelism=fsdp_tp", "trainer.devices=3", "dry_run=true"])
    assert code == 2 and "must divide the 3 ranks" in err


def test_launcher_configs_compose(tmp_path):
    from tests.conftest import compose_train

    slurm = compose_train(["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu"], tmp_path)
    assert "SlurmLauncher" in slurm.hydra.launcher._target_
    assert slurm.hydra.launcher.nodes == 2 and slurm.hydra.launcher.tasks_per_node == 8
    local = compose_train(["hydra/launcher=local"], tmp_path)
    assert "JoblibLauncher" in local.hydra.launcher._target_ and local.hydra.launcher.n_jobs == 2


# The local (joblib) launcher runs a sweep's jobs, each in its own directory, in CI in
# tests/test_train.py::test_multirun_gives_each_job_its_own_run.


def test_torchrun_ranks_share_one_run_directory(tmp_path):
    import subprocess

    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "llm.cli.train", *TINY_RUN, "parallelism=ddp", "trainer.devices=2", "budget.steps=4",
               "trainer.val_every=4"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL (none on this machine)")
def test_fsdp_bf16_with_fp32_reduction_over_nccl(tmp_path):
    result = run_cli([*TINY_RUN, "trainer=gpu", "parallelism=fsdp", "parallelism.param_dtype=bfloat16",
                      "trainer.devices=2", "budget.steps=10", "trainer.val_every=10"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "completed" and summary["val/loss"] < 6.3


@pytest.mark.slow
def test_per_block_compile_composes_with_fsdp_and_checkpointing(single_runs, tmp_path):
    # Slow: torch.compile builds C++ kernels for every block on a CPU (minutes on 2 cores).
    run = tmp_path / "compiled"
    result = run_cli([*CURVE, "parallelism=fsdp", "trainer.devices=2", "budget.steps=20", "parallelism.compile=true",
                      "parallelism.activation_checkpointing=every_n", f"hydra.run.dir={run}"], cwd=single_runs,
                     timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [v for _, v in val_curve(run)] == pytest.approx([v for _, v in val_curve(single_runs / "single20")], abs=1e-3)


def test_spawned_ranks_die_with_their_launcher(tmp_path):
    import subprocess
    import time

    # A launcher that starts a long-sleeping child the way spawn_local_ranks starts ranks.
    pid_file = tmp_path / "child.pid"
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from llm.parallel.launch import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_die_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")])
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    launcher.kill()  # SIGKILL: no cleanup code of the launcher runs
    launcher.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            return  # exited, waiting to be reaped by init
        time.sleep(0.05)
    os.kill(child, 9)
    pytest.fail("the child outlived its SIGKILLed launcher")
