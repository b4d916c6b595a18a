"""Run a function on several gloo processes in a test (torch.multiprocessing, a file store): each
rank runs fn(rank, world, *args); the first rank's traceback fails the test here."""

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


def run_ranks(fn, *args, world: int = 2) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes; re-raise the first rank's failure here."""
    with tempfile.TemporaryDirectory() as tmp:
        errors = Path(tmp) / "errors"
        errors.mkdir()
        try:
            mp.spawn(_rank_main, args=(fn, world, f"file://{tmp}/store", str(errors), args), nprocs=world, join=True)
        except mp.ProcessExitedException as e:  # a rank died; its traceback, if it wrote one, says why
            if not any(errors.iterdir()):
                raise e
        failures = sorted(errors.iterdir())
        if failures:
            pytest.fail(failures[0].read_text())


def _rank_main(rank, fn, world, init, errors, args):
    torch.set_num_threads(1)  # tiny tensors, ranks sharing the cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        Path(errors, f"rank{rank}").write_text(traceback.format_exc())
        os._exit(1)  # no teardown: the other ranks may be blocked in a collective
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort the process
