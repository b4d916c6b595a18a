"""Pipeline parallelism (llm.parallel.pipeline) with real torch.distributed.pipelining on gloo: every
schedule's losses and gradients equal the single-process model's on the same batches, the dry-run
plan's bytes equal the built stages', validation refuses bad layouts (exit 2), and whole `llm-train`
runs under pp (and pp x FSDP) reproduce the single-process curve and resume across pipeline degrees."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.model import ModelConfig, PositionConfig, Transformer
from llm.parallel.pipeline import SCHEDULES, bubble_fraction, build_pipeline, split_layers, stage_indices
from llm.stages.pretrain import next_token_loss


def _run_ranks(fn, *args, world: int = 2) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes; re-raise the first rank's failure here."""
    with tempfile.TemporaryDirectory() as tmp:
        errors = Path(tmp) / "errors"
        errors.mkdir()
        try:
            mp.spawn(_rank_main, args=(fn, world, f"file://{tmp}/store", str(errors), args), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            if not any(errors.iterdir()):
                raise e
        failures = sorted(errors.iterdir())
        if failures:
            pytest.fail(failures[0].read_text())


def _rank_main(rank, fn, world, init, errors, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        Path(errors, f"rank{rank}").write_text(traceback.format_exc())
        os._exit(1)  # no teardown: the other ranks may be blocked in a collective
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    _run_ranks(_schedules_equal_one_process, cases)


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
