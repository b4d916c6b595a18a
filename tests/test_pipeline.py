"""Pipeline parallelism (llm.parallel.pipeline) with real torch.distributed.pipelining on gloo: every
schedule's losses and gradients equal the single-process model's on the same batches, the dry-run
plan's bytes equal the built stages', validation refuses bad layouts (exit 2), and whole `llm-train`
runs under pp (and pp x FSDP) reproduce the single-process curve and resume across pipeline degrees."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llm.checkpoint import load_network
from llm.model import AttentionConfig, ModelConfig, PositionConfig, Transformer
from llm.parallel.pipeline import SCHEDULES, Pipeline, bubble_fraction, build_pipeline, split_layers, stage_indices
from llm.parallel.pipeline_plan import pipeline_plan
from llm.stages.pretrain import next_token_loss
from llm.tracking.metrics import read_metrics
from tests.conftest import TINY_RUN, run_cli
from tests.distributed import run_ranks


def tiny(**kw) -> ModelConfig:
    kw = {"n_layers": 4, "d_model": 32, "n_heads": 4, "vocab_size": 64, "max_seq_len": 32, "init_std": 0.2,
          "tie_embeddings": False, **kw}
    return ModelConfig(**kw)


def _schedules_equal_one_process(rank, world, cases):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pipeline",))
    batches = [torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for schedule, per_rank, position, layers in cases:
        case = f"{schedule} x{per_rank} {position} {layers}"
        cfg = tiny(position=PositionConfig(kind=position))
        torch.manual_seed(0)
        reference = Transformer(cfg)
        torch.manual_seed(0)
        pipelined = build_pipeline(Transformer(cfg), mesh, schedule, 4, per_rank, layers)
        names = [n for n, _ in pipelined.named_parameters()]
        assert names and set(names) <= set(dict(reference.named_parameters())), case  # the full model's keys
        plan = pipeline_plan(cfg, world, 1, 1, schedule, 4, per_rank, layers, sharded=False)[rank]
        assert plan.params == sum(p.numel() * p.element_size() for p in pipelined.parameters()), case  # dry run
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, pipelined)]
        for tokens in batches:  # two optimizer steps: the second runs on updated weights
            expected = next_token_loss(reference(tokens[:, :-1]), tokens[:, 1:])
            expected.backward()
            loss = pipelined.step(tokens[:, :-1], tokens[:, 1:], next_token_loss)
            torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5, msg=case)  # on every rank
            full = dict(reference.named_parameters())
            for name, p in pipelined.named_parameters():
                torch.testing.assert_close(p.grad, full[name].grad, atol=1e-5, rtol=1e-4, msg=f"{case}: {name}")
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        evaluated = pipelined.evaluate(batches[0][:, :-1], batches[0][:, 1:], next_token_loss)
        with torch.no_grad():
            expected = next_token_loss(reference(batches[0][:, :-1]), batches[0][:, 1:])
        torch.testing.assert_close(evaluated, expected, atol=1e-5, rtol=1e-5, msg=f"{case}: evaluate")


def test_every_schedule_on_two_ranks_equals_one_process():
    # Every schedule, two steps: the losses (broadcast from the last stage) and every gradient.
    cases = [("gpipe", 1, "rope", None), ("1f1b", 1, "learned", [1, 3]), ("interleaved_1f1b", 2, "alibi", None),
             ("looped_bfs", 2, "rope", None), ("interleaved_zb", 2, "rope", None), ("zbv", 2, "rope", None)]
    run_ranks(_schedules_equal_one_process, cases)


def _pipeline_x_fsdp_equals_one_process(rank, world, schedule, per_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, world // 2, 1), mesh_dim_names=("pipeline", "data_parallel", "tensor_parallel"))
    cfg = tiny()
    torch.manual_seed(0)
    reference = Transformer(cfg)
    torch.manual_seed(0)
    option = Pipeline(pipeline={"stages": 2, "microbatches": 2, "schedule": schedule, "stages_per_rank": per_rank})
    pipelined = option.parallelize(Transformer(cfg), mesh)
    plan = pipeline_plan(cfg, 2, world // 2, 1, schedule, 2, per_rank)[mesh["pipeline"].get_local_rank()]
    held = sum(p.to_local().numel() * 4 for p in pipelined.parameters())
    if mesh["data_parallel"].get_local_rank() == 0:  # FSDP's first shard holds the rounded-up rows
        assert plan.params == held, (plan.params, held)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    expected = next_token_loss(reference(tokens[:, :-1]), tokens[:, 1:])
    expected.backward()
    dp_rank = mesh["data_parallel"].get_local_rank()
    mine = tokens.chunk(world // 2)[dp_rank]  # each data-parallel rank its half of the batch
    loss = pipelined.step(mine[:, :-1], mine[:, 1:], next_token_loss)
    dist.all_reduce(loss, group=mesh["data_parallel"].get_group())
    torch.testing.assert_close(loss / (world // 2), expected.detach(), atol=1e-5, rtol=1e-5)
    full = dict(reference.named_parameters())
    for name, p in pipelined.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(grad, full[name].grad, atol=1e-5, rtol=1e-4, msg=name)  # averaged over dp
    norm = pipelined.clip_grad_norm_(1e9)
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    torch.testing.assert_close(norm, expected_norm, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,per_rank", [("1f1b", 1), ("interleaved_1f1b", 2)])
def test_pipeline_x_fsdp_on_four_ranks_equals_one_process(schedule, per_rank):
    run_ranks(_pipeline_x_fsdp_equals_one_process, schedule, per_rank, world=4)


def _pipeline_x_tensor_parallel_equals_one_process(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pipeline", "data_parallel", "tensor_parallel"))
    cfg = tiny(attention=AttentionConfig(n_kv_heads=2))
    torch.manual_seed(0)
    reference = Transformer(cfg)
    torch.manual_seed(0)
    pipelined = Pipeline(pipeline={"stages": 2, "microbatches": 2}, tensor_parallel=2).parallelize(Transformer(cfg), mesh)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    expected = next_token_loss(reference(tokens[:, :-1]), tokens[:, 1:])
    expected.backward()
    torch.testing.assert_close(pipelined.step(tokens[:, :-1], tokens[:, 1:], next_token_loss), expected.detach(),
                               atol=1e-5, rtol=1e-5)
    full = dict(reference.named_parameters())
    for name, p in pipelined.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(grad, full[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_pipeline_x_tensor_parallel_on_four_ranks_equals_one_process():
    run_ranks(_pipeline_x_tensor_parallel_equals_one_process, world=4)


def test_layer_split_and_stage_placement():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_layers(6, 2, [2, 4]) == [range(0, 2), range(2, 6)]
    with pytest.raises(ValueError, match="not divisible"):
        split_layers(6, 4)
    with pytest.raises(ValueError, match="summing to"):
        split_layers(6, 2, [3, 2])
    assert stage_indices(0, 2, 2, "interleaved_1f1b") == [0, 2] and stage_indices(1, 2, 2, "zbv") == [1, 2]
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 4, 8, 2) == pytest.approx(3 / 19)
    assert set(SCHEDULES) >= {"gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"}


# ---- whole runs: llm-train under parallelism=pp, against one process ----------------------------

# The same global batch (16) and seed as one process: 8 per batch x 2 accumulation steps (pp=2) or
# 8 x 2 data-parallel ranks (pp=2 x fsdp=2); 4 layers, so interleaved schedules have 2 stages per rank.
CURVE = [*TINY_RUN, "model.n_layers=4", "model.tie_embeddings=false", "data.global_batch_size=16",
         "schedule=constant", "trainer.val_every=5", "trainer.log_every=5", "trainer.checkpoint_every=10"]
ENV = {"OMP_NUM_THREADS": "1"}


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("train/loss", "val/loss")}


def assert_same_curves(run: Path, reference: Path, abs_tol: float = 2e-4) -> None:
    ours, theirs = curves(run), curves(reference)
    for key in ours:
        assert [s for s, _ in ours[key]] == [s for s, _ in theirs[key]], key
        assert [v for _, v in ours[key]] == pytest.approx([v for _, v in theirs[key]], abs=abs_tol), key


def train(args: list[str], run_dir: Path, cwd: Path) -> None:
    result = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=cwd, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single")
    for steps in (10, 20):
        train([*CURVE, f"budget.steps={steps}"], root / f"single{steps}", root)
    return root


PP2 = [*CURVE, "parallelism=pp", "trainer.devices=2"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,per_rank", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                               ("interleaved_zb", 2), ("zbv", 2)])
def test_two_stage_run_reproduces_the_single_process_curve(schedule, per_rank, single_runs, tmp_path):
    run = tmp_path / schedule
    train([*PP2, f"parallelism.pipeline.schedule={schedule}", f"parallelism.pipeline.stages_per_rank={per_rank}",
           "budget.steps=20"], run, single_runs)
    assert_same_curves(run, single_runs / "single20")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"


@pytest.mark.slow
def test_pipeline_x_fsdp_on_four_ranks_reproduces_the_single_process_curve(single_runs, tmp_path):
    run = tmp_path / "pp_fsdp"
    train([*CURVE, "parallelism=pp_fsdp", "trainer.devices=4", "budget.steps=20"], run, single_runs)
    # train/loss is each rank's last batch (a data-parallel rank's half, not one process's second half):
    # the validation curve is the comparable one, as in tests/test_parallel.py.
    ours, theirs = curves(run)["val/loss"], curves(single_runs / "single20")["val/loss"]
    assert [s for s, _ in ours] == [5, 10, 15, 20]
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=2e-4)
    assert len(list((run / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 4


@pytest.mark.slow  # about 4 minutes on a loaded 2-core machine (three runs, a resume, a consolidation)
def test_checkpoint_resumes_at_another_pipeline_degree_and_consolidates(single_runs, tmp_path):
    # pp=2 for 10 steps (two ranks, each saving its stage's tensors under the full model's names) ...
    run = tmp_path / "pp2"
    train([*PP2, "budget.steps=10"], run, single_runs)
    shards = run / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2
    # ... consolidated into one file, it is the single-process model ...
    done = run_cli([str(shards), "-o", str(tmp_path / "full.ckpt")], cwd=tmp_path, command="checkpoint")
    assert done.returncode == 0, done.stderr
    tokens = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(load_network(tmp_path / "full.ckpt")(tokens),
                               load_network(single_runs / "single10" / "checkpoints" / "last.ckpt")(tokens),
                               atol=2e-4, rtol=1e-4)
    # ... and resumed at pp=1 (one process, resharded by name on load) it continues the curve.
    resumed = run_cli([f"resume={run}", "parallelism=pp", "parallelism.pipeline.stages=1", "trainer.devices=1",
                       "budget.steps=20"], cwd=single_runs, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_curves(run, single_runs / "single20")


@pytest.mark.slow
def test_one_stage_checkpoint_resumes_on_two_stages(single_runs, tmp_path):
    run = tmp_path / "pp1"
    train([*CURVE, "parallelism=pp", "parallelism.pipeline.stages=1", "budget.steps=10"], run, single_runs)
    resumed = run_cli([f"resume={run}", "parallelism=pp", "parallelism.pipeline.stages=2", "trainer.devices=2",
                       "budget.steps=20"], cwd=single_runs, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_curves(run, single_runs / "single20")


@pytest.mark.slow
def test_killed_pipelined_run_resumes_to_the_uninterrupted_curve(single_runs, tmp_path):
    from tests.test_reliability import kill_at

    run = tmp_path / "killed"
    kill_at([*PP2, "budget.steps=20", "trainer.log_every=1"], run, single_runs, 13)
    resumed = run_cli([f"resume={run}"], cwd=single_runs, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert curves(run)["val/loss"] and [v for _, v in curves(run)["val/loss"]] == pytest.approx(
        [v for _, v in curves(single_runs / "single20")["val/loss"]], abs=2e-4)
    steps = [s for s, _ in curves(run)["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # one curve: no step lost, none duplicated


# ---- validation and the dry run ----------------------------------------------------------------

def test_bad_pipeline_layouts_are_refused_together_before_any_data(tmp_path, monkeypatch, capsys):
    from tests.conftest import llm_cli

    code, err = llm_cli("train", ["model=nano", "parallelism=pp", "trainer.devices=3", "parallelism.pipeline.stages=2",
                                  "parallelism.pipeline.schedule=interleaved_1f1b", "parallelism.pipeline.microbatches=3",
                                  "data.micro_batch_size=8", "model.n_layers=3", "posttrain=sft",
                                  "logger=none"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    for expected in ("parallelism.pipeline.stages=2: the 3 ranks", "stages_per_rank=1 with parallelism.pipeline.schedule="
                     "interleaved_1f1b", "model.n_layers=3 is not divisible", "microbatches=3: must divide "
                     "data.micro_batch_size=8", "model.tie_embeddings=true", "only pretraining"):
        assert expected in err, (expected, err)
    assert "Traceback" not in err and not (tmp_path / ".cache").exists()
    code, err = llm_cli("train", ["model=nano", "model.tie_embeddings=false", "parallelism=pp", "trainer.devices=2",
                                  "parallelism.pipeline.layers_per_stage=[2,1]", "parallelism.pipeline.microbatches=1",
                                  "logger=none"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "layers_per_stage=[2, 1]: needs 2 counts" in err and "microbatches=1 with schedule=1f1b" in err


def test_dry_run_prints_the_mesh_stages_memory_and_bubble(tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)  # llm-train in this process (as tests.conftest.llm_cli), keeping stdout
    monkeypatch.setattr(sys, "argv", ["llm-train", "model=1b", "model.tie_embeddings=false", "parallelism=pp_fsdp",
                                      "trainer.devices=16", "parallelism.pipeline.schedule=interleaved_1f1b",
                                      "parallelism.pipeline.stages_per_rank=2", "parallelism.pipeline.microbatches=8",
                                      "logger=none", "dry_run=true"])
    try:
        importlib.import_module("llm.cli.train").main()
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "mesh: pipeline 2 x shard (data parallel) 8 x tensor parallel 1" in out
    assert "bubble 5.9%" in out  # (p - 1) / (v m + p - 1) = 1 / 17
    assert "pipeline rank 0 (stage 0: embedding + blocks 0-4; stage 2: blocks 10-14)" in out
    assert "stage 3: blocks 15-19 + norm + head" in out and "2.5 micro-batches in flight" in out
    assert not (tmp_path / ".cache").exists()


def test_slurm_preset_composes_a_two_node_pipeline_x_fsdp_job(tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    cfg = compose_train(["experiment=pp_fsdp_slurm", "hydra.launcher.partition=gpu"], tmp_path)
    assert "SlurmLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.nodes == 2
    assert cfg.hydra.launcher.tasks_per_node == 8 and cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    option = instantiate(cfg.parallelism)
    assert isinstance(option, Pipeline) and option.stages == 2 and option.data_parallel_size(16) == 8
    assert option.schedule == "interleaved_1f1b" and option.virtual_stages == 2
