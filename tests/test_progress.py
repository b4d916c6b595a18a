"""Progress and console logging: plain lines where stdout is not a terminal (SLURM, nohup, CI), one
bar where it is, and a run's train.log holding what its console showed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar
from torch.utils.data import DataLoader, TensorDataset

from llm.tracking.console import setup_console_logging
from llm.tracking.progress import ProgressLog, StepProgressBar, progress_callback
from llm.tracking.throughput import ThroughputMonitor
from tests.conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, LOG_EVERY, VAL_EVERY = 6, 2, 3


class Regression(pl.LightningModule):
    """A toy module that logs as our stages do (train/loss, val/loss, shown in the bar)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch[0]).pow(2).mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(progress: pl.Callback | None) -> None:
    """A real Trainer wired as the run's is: throughput first, then the progress callback."""
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    callbacks = [ThroughputMonitor(tokens_per_step=4, flops_per_token=1.0, window=LOG_EVERY)]
    trainer = pl.Trainer(max_steps=STEPS, val_check_interval=VAL_EVERY, check_val_every_n_epoch=None,
                         limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=LOG_EVERY, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[*callbacks, *([progress] if progress else [])],
                         enable_progress_bar=isinstance(progress, ProgressBar))
    trainer.fit(Regression(), data, data)


@pytest.fixture()
def console():
    """The console of a command: plain lines on stdout (restored afterwards by conftest)."""
    setup_console_logging()


def test_plain_lines_when_stdout_is_not_a_terminal(console, capsys):
    progress = progress_callback(True, LOG_EVERY)
    assert isinstance(progress, ProgressLog) and not isinstance(progress, ProgressBar)
    fit(progress)
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = out.splitlines()
    train = [line for line in lines if re.fullmatch(
        r"step [246]/6 \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| lr 0\.1 \| ETA \d+:\d\d:\d\d", line)]
    val = [line for line in lines if re.fullmatch(r"step [36]/6 \| val/loss \d+\.\d{4}", line)]
    # One line per log_every steps and one per validation, and nothing else: no bar, no Lightning chatter.
    assert len(train) == STEPS // LOG_EVERY and len(val) == STEPS // VAL_EVERY, out
    assert len(lines) == len(train) + len(val), out
    assert [line.split(" |")[0] for line in lines] == ["step 2/6", "step 3/6", "step 4/6", "step 6/6", "step 6/6"]


def test_a_bar_on_a_terminal(console, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = progress_callback(True, LOG_EVERY)
    assert isinstance(progress, StepProgressBar)
    fit(progress)
    out = capsys.readouterr().out
    drawn = [part for part in re.split(r"[\r\n]", out) if part.strip()]
    # One bar, counted in steps of the budget; no validation bar and none of Lightning's leftovers.
    assert drawn and all(part.startswith("train:") for part in drawn), drawn
    assert "6/6" in drawn[-1] and "val/loss" in drawn[-1]
    for leftover in ("Training", "Epoch", "Validation", "Sanity"):
        assert leftover not in out
    assert not re.search(r"^step \d", out, re.M)  # no plain lines besides the bar


def test_no_progress_when_disabled():
    assert progress_callback(False, LOG_EVERY) is None


SPEAK = "log = logging.getLogger('llm.example'); log.info('information'); log.warning('careful')"
SETUPS = {  # what the Hydra apps do before Hydra's job logging takes over, and the argparse commands' console
    "llm.cli.common.setup": "from llm.cli.common import setup; setup(); logging.basicConfig(format='%(message)s')",
    "setup_console_logging": "from llm.tracking.console import setup_console_logging; setup_console_logging()",
}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_logs_information(setup, rank, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")}
    result = subprocess.run([sys.executable, "-c", f"import logging; {SETUPS[setup]}; {SPEAK}"], env={**env, "RANK": rank},
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    messages = result.stdout + result.stderr
    assert ("information" in messages) == (rank == "0"), messages  # other ranks keep warnings only
    assert "careful" in messages
    if setup == "setup_console_logging":  # information on stdout, warnings prefixed on stderr
        assert result.stdout == ("information\n" if rank == "0" else "") and result.stderr == "warning: careful\n"


def test_the_run_log_holds_what_the_console_showed(tmp_path):
    args = [a for a in TINY_RUN if not a.startswith("trainer.progress_bar")]
    result = run_cli([*args, "budget.steps=4", "trainer.log_every=2", "trainer.val_every=2", "trainer.progress_bar=true"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout  # stdout is a pipe: plain lines, no bar
    (log_file,) = (tmp_path / "runs").glob("*/train.log")
    logged = [line.split(" ", 2)[2] for line in log_file.read_text().splitlines()]  # less the date and time
    shown = result.stdout.splitlines()
    assert shown == logged
    run_dir = log_file.parent
    assert shown[0] == f"run {run_dir.name}: {run_dir}"
    expected = [r"trained bpe tokenizer on stdlib \(512 tokens", r"token cache: stdlib/train: ",
                r"model: [\d,]+ parameters", r"step 2/4 \| loss \d", r"step 2/4 \| val/loss \d", r"step 4/4 \| loss \d",
                r"done: val/loss \d"]
    for pattern in expected:
        assert any(re.match(pattern, line) for line in shown), (pattern, shown)
    # Libraries speak only from WARNING up: none of Lightning's INFO lines.
    for noise in ("GPU available", "TPU available", "LOCAL_RANK", "Tip:", "`Trainer.fit` stopped"):
        assert noise not in result.stdout + result.stderr


@pytest.mark.slow  # CI: test_wandb_conventions::test_ddp_run_creates_exactly_one_wandb_run_and_each_progress_line_appears_once
def test_two_ranks_speak_once(tmp_path):
    """DDP on 2 gloo processes: rank 0 appends to train.log what the console shows; rank 1 logs no
    information, so each progress line appears once."""
    args = [a for a in TINY_RUN if not a.startswith("trainer.progress_bar")]
    result = run_cli([*args, "parallelism=ddp", "trainer.devices=2", "data.global_batch_size=16", "budget.steps=4",
                      "trainer.log_every=2", "trainer.val_every=2", "trainer.progress_bar=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = (run_dir / "train.log").read_text()
    for pattern in (r"step 2/4 \| loss", r"step 2/4 \| val/loss", r"step 4/4 \| loss", r"step 4/4 \| val/loss", r"done: "):
        assert len(re.findall(f"^{pattern}", result.stdout, re.M)) == 1, (pattern, result.stdout)
        assert len(re.findall(pattern, logged)) == 1, (pattern, logged)
    assert "step" not in "".join(p.read_text() for p in run_dir.glob("rank*.log"))  # other ranks: warnings at most
