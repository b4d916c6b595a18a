"""Fault injection on CPU: runs killed (-9) at random steps, during a checkpoint write,
preempted (SIGTERM/SIGUSR1), interrupted (Ctrl-C) or out of room for a checkpoint resume to the
uninterrupted loss curve; a signal to the launcher of two ranks reaches both, and a rank that dies
stops the launcher and the other rank; NaN and spike batches are rolled back and skipped; corrupt
checkpoints are set aside; the last K and the best are kept."""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from llm.checkpoint import checkpoint_step, newest_loadable_checkpoint
from llm.checkpoint.save import AtomicCheckpointIO, NoSpace, atomic_torch_save, no_space
from llm.data.blocks import BlockStream
from llm.run.layout import BEST, LAST
from llm.stages.pretrain import PretrainModule
from llm.tracking.checkpoints import PeriodicCheckpoint
from llm.tracking.guard import GuardGaveUp
from llm.tracking.metrics import read_metrics
from llm.tracking.preemption import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, SIGNALS, Interrupted,
                                     PreemptionHandler, ctrl_c_stops_at_once)
from llm.train import train
from tests.conftest import REPO, TINY_RUN, compose_train, llm_cli, llm_cli_output, run_cli

# 40 steps, a checkpoint every 10: a kill anywhere after step 10 loses at most 9 steps of work.
RUN = [*TINY_RUN, "budget.steps=40", "trainer.val_every=10", "trainer.checkpoint_every=10", "trainer.log_every=1"]
# Two ranks with the same global batch as one process (test_parallel's convention).
PARALLEL = [*RUN, "data.global_batch_size=16", "schedule=constant", "trainer.log_every=2"]
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # subprocesses import this file's fault-injecting modules


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def assert_same_curves(run: Path, reference: Path, abs_tol: float = 1e-5) -> None:
    for key in ("train/loss", "val/loss"):
        a, b = curve(reference, key), curve(run, key)
        assert [s for s, _ in b] == [s for s, _ in a], key  # one curve: no step lost, none duplicated
        assert [v for _, v in b] == pytest.approx([v for _, v in a], abs=abs_tol), key


def start(args: list[str], run_dir: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", **ENV, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "llm.cli.train", *args, f"hydra.run.dir={run_dir}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, done, what: str, timeout: float = 240, poll: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def reached(run_dir: Path, step: int):
    return lambda: any(s >= step for s, _ in curve(run_dir, "train/loss"))


def kill_at(args: list[str], run_dir: Path, cwd: Path, step: int) -> None:
    """Start a run and SIGKILL it (its whole process group: launcher and ranks) at `step`."""
    proc = start(args, run_dir, cwd)
    wait_for(proc, reached(run_dir, step), f"step {step}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def train_here(monkeypatch, capsys, single_thread):
    """train_here(args, cwd, env) runs `llm-train args` in this process, as from a shell in `cwd`
    with `env` added (tests.conftest.llm_cli_output; one interpreter fewer to start than a
    subprocess, seconds of CI a run): (exit code, stdout, stderr)."""

    def train_here(args: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
        for name, value in {**ENV, **(env or {})}.items():
            monkeypatch.setenv(name, value)
        return llm_cli_output("train", args, cwd, monkeypatch, capsys)

    return train_here


@pytest.fixture
def resume(train_here):
    """resume(run_dir, cwd, *extra) resumes a run to completion in this process: its stdout."""

    def resume(run_dir: Path, cwd: Path, *extra: str) -> str:
        code, stdout, stderr = train_here([f"resume={run_dir}", *extra], cwd)
        assert code == 0, stderr[-3000:]
        assert "resuming from" in stdout
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        return stdout

    return resume


@pytest.fixture(autouse=True, scope="module")
def ctrl_c_not_ignored():
    """Ctrl-C as a terminal delivers it, whatever pytest was started with: a job put in the
    background by a shell without job control (`cmd &` in a script) starts with SIGINT ignored,
    which llm-train rightly keeps (and passes to its ranks), so the Ctrl-C tests would see nothing.
    The runs these tests start inherit the default disposition from here."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    """The uninterrupted one-process run (RUN) to compare with; `ddp_reference` adds the two-rank one."""
    root = tmp_path_factory.mktemp("references")
    proc = start(RUN, root / "single", root)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def ddp_reference(references) -> Path:
    """The uninterrupted two-rank DDP run (PARALLEL), beside `references`' (only the slow tests need it)."""
    proc = start([*PARALLEL, "parallelism=ddp", "trainer.devices=2"], references / "ddp", references)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return references


# ---- kill -9 at a random step, then resume ----

def kill_step(seed: int) -> int:
    return random.Random(seed).randint(12, 37)  # after the first checkpoint, before the end


# CI: test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint (kill -9 at step 20, then resume to the same curve).
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_run_resumes_to_the_uninterrupted_curve(seed, references, resume):
    run = references / f"killed-{seed}"
    kill_at(RUN, run, references, kill_step(seed))
    assert 10 <= checkpoint_step(newest_loadable_checkpoint(run, set_aside=False)[0]) < 40
    resume(run, references)
    assert_same_curves(run, references / "single")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_ddp_run_resumes_to_the_uninterrupted_curve(seed, ddp_reference, resume):
    run = ddp_reference / f"ddp-killed-{seed}"
    kill_at([*PARALLEL, "parallelism=ddp", "trainer.devices=2"], run, ddp_reference, kill_step(seed))
    resume(run, ddp_reference)
    assert_same_curves(run, ddp_reference / "ddp")


# In CI, sharded checkpoints resume in test_parallel (world size 2 -> 1) and a kill is resumed above.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_fsdp_run_resumes_to_the_uninterrupted_curve(seed, ddp_reference, resume):
    run = ddp_reference / f"fsdp-killed-{seed}"
    args = [*PARALLEL, "parallelism=fsdp", "trainer.devices=2"]
    kill_at(args, run, ddp_reference, kill_step(seed))
    shards = newest_loadable_checkpoint(run, set_aside=False)[0]
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2  # a whole sharded checkpoint
    resume(run, ddp_reference)
    # FSDP reduces in another order than DDP: the same curve to float round-off (test_parallel's bound).
    assert_same_curves(run, ddp_reference / "ddp", abs_tol=2e-4)


# ---- kill during a checkpoint write ----

class CheckpointBallast(PretrainModule):
    """Pretraining whose checkpoint at step 20 carries 400 MB of zeros: a write long enough to be
    killed in the middle of (plain tensors, so it still loads with weights_only=True)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.global_step == 20:
            checkpoint["ballast"] = torch.zeros(100_000_000)


def writing_ballast(checkpoints: Path) -> bool:
    """The step-20 checkpoint is being written: its temporary file holds part of the ballast."""
    for path in checkpoints.glob(f".{LAST}.tmp-*"):
        try:
            if path.stat().st_size > 20_000_000:
                return True
        except FileNotFoundError:  # renamed in between: look at the next one
            continue
    return False


def plain_module(run: Path) -> None:
    """Make a run that trained with a test module resume with the ordinary one."""
    saved = json.loads((run / "run.json").read_text())
    saved["config"]["posttrain"]["_target_"] = "llm.stages.pretrain.PretrainModule"
    (run / "run.json").write_text(json.dumps(saved))


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(references, resume):
    run = references / "killed-writing"
    checkpoints = run / "checkpoints"
    proc = start([*RUN, "posttrain._target_=tests.test_reliability.CheckpointBallast"], run, references)
    wait_for(proc, lambda: writing_ballast(checkpoints), "the step-20 checkpoint write", poll=0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (checkpoints / LAST).exists()  # the new one never replaced anything ...
    previous = checkpoints / "step-00000010.ckpt"
    assert checkpoint_step(previous) == 10  # ... and the previous one is whole

    # The resumed run (the plain module: the ballast class is not on the resume allowlist) uses it.
    plain_module(run)
    assert f"resuming from {previous}" in resume(run, references)
    assert not list(checkpoints.glob(".*.tmp*"))  # the torn temporary file was cleared away
    assert_same_curves(run, references / "single")


# ---- no space for a checkpoint, then Ctrl-C ----

class SmallBallast(CheckpointBallast):
    """Pretraining whose step-20 checkpoint carries 4 MB of zeros: 5.7 MB against step 10's 1.7 MB."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        PretrainModule.on_save_checkpoint(self, checkpoint)
        if self.global_step == 20:
            checkpoint["ballast"] = torch.zeros(1_000_000)


FILE_SIZE_LIMIT = 3 * 2**20  # `ulimit -f`: the step-10 checkpoint fits, step 20's does not


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))


def test_no_space_then_ctrl_c_each_stop_cleanly_and_the_run_resumes_to_the_same_curve(references, resume):
    """One run, three processes (CI time): a checkpoint past `ulimit -f`, then Ctrl-C, then the end."""
    run = references / "no-space-then-ctrl-c"
    last = run / "checkpoints" / LAST
    result = run_cli([*RUN, "posttrain._target_=tests.test_reliability.SmallBallast", f"hydra.run.dir={run}"],
                     cwd=references, env=ENV, preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr[-3000:]  # not killed by SIGXFSZ (-25): llm-train ignores it
    assert (f"error: no space left to write checkpoint {last} (disk full or file-size limit: File too large): "
            f"the previous checkpoint {last} is kept; free space, then llm-train resume={run}\n") in result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoint_step(last) == 10  # put back where it was, whole
    assert newest_loadable_checkpoint(run, set_aside=False) == (last, [])
    assert sorted(p.name for p in last.parent.iterdir()) == [BEST, LAST]  # no temporary file, no step file
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("NoSpace: no space left")
    assert summary["steps_done"] == 20
    assert Path(summary["best_checkpoint"]).resolve() == last  # best.ckpt (step 10) followed it there and back

    # Resumed without the limit (and with the plain module), then Ctrl-C.
    plain_module(run)
    proc = start([f"resume={run}"], run, references)
    wait_for(proc, reached(run, 27), "step 27")
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["steps_done"]
    assert summary["status"] == "interrupted" and 27 <= stopped < 40
    assert checkpoint_step(last) == stopped  # saved where it stopped, not at step 20
    assert (f"interrupted at step {stopped}; checkpoint saved to {last}; continue with llm-train resume={run}\n"
            ) in stderr
    assert "Traceback" not in stderr

    resume(run, references)
    assert_same_curves(run, references / "single")


def test_no_space_is_told_apart_from_other_write_errors(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    path = tmp_path / "model.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))
    try:
        with pytest.raises(NoSpace, match=f"no space left to write checkpoint {path} .*File too large"):
            atomic_torch_save({"w": torch.zeros(100_000)}, path)
        # torch.distributed.checkpoint collects each rank's failure; torch's C++ writer drops the errno.
        shards = CheckpointException("write", {1: (RuntimeError("unexpected pos 704 vs 598"), [])})
        assert "ulimit -f" in no_space(shards, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert torch.load(path, weights_only=True)["w"].tolist() == [1, 1, 1]  # the old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no temporary file left
    assert no_space(RuntimeError("unexpected pos 704 vs 598"), tmp_path) is None  # no limit, room on disk
    assert no_space(PermissionError(13, "Permission denied"), tmp_path) is None


def test_a_sharded_checkpoint_out_of_room_leaves_the_previous_one(tmp_path):
    from types import SimpleNamespace

    (tmp_path / LAST).mkdir()
    (tmp_path / LAST / "meta.pt").write_bytes(b"the step-10 shards")

    def save_checkpoint(path: Path) -> None:  # what the ranks' shard writers leave when the disk fills up
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"part of a shard")
        raise OSError(28, "No space left on device")

    trainer = SimpleNamespace(global_step=20, is_global_zero=True, save_checkpoint=save_checkpoint,
                              lightning_module=SimpleNamespace(parallelism=SimpleNamespace(sharded_checkpoints=True)),
                              strategy=SimpleNamespace(barrier=lambda name: None))
    checkpoints = PeriodicCheckpoint(tmp_path, every_n_steps=10)
    checkpoints.saved_step = 10
    with pytest.raises(NoSpace, match=f"{tmp_path / LAST} .*No space left on device"):
        checkpoints.save(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # the partial shards are gone
    assert (tmp_path / LAST / "meta.pt").read_bytes() == b"the step-10 shards"


# ---- preemption ----

def test_sigterm_checkpoints_exits_75_requeues_under_slurm_and_the_requeued_job_resumes(references, tmp_path,
                                                                                        train_here):
    run = references / "preempted"
    fake_bin = tmp_path / "bin"  # stands in for SLURM's scontrol: records what it was asked
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (fake_bin / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242"}
    proc = start(RUN, run, references, env={**slurm, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    wait_for(proc, reached(run, 17), "step 17")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["steps_done"]
    assert summary["status"] == "preempted" and 17 <= stopped < 40
    assert checkpoint_step(run / "checkpoints" / LAST) == stopped  # saved where it stopped, not at step 10
    assert f"resume={run}" in stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    # SLURM restarts the job: the same command line, in the same run directory, with a restart count.
    code, stdout, stderr = train_here([*RUN, f"hydra.run.dir={run}"], references, {**slurm, "SLURM_RESTART_COUNT": "1"})
    assert code == 0, stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / LAST}" in stdout
    assert_same_curves(run, references / "single")


@pytest.mark.slow  # CI: test_sigusr1_to_the_launcher_reaches_both_ranks_and_they_stop_at_one_step (no resume)
def test_sigusr1_to_a_ddp_launcher_stops_every_rank_at_one_step(ddp_reference, resume):
    run = ddp_reference / "ddp-preempted"
    proc = start([*PARALLEL, "parallelism=ddp", "trainer.devices=2"], run, ddp_reference)
    wait_for(proc, reached(run, 14), "step 14")
    proc.send_signal(signal.SIGUSR1)  # to the launcher only: it forwards the signal to the ranks
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    resume(run, ddp_reference)
    assert_same_curves(run, ddp_reference / "ddp")


# ---- two quick ranks (CI): a forwarded signal reaches both; a dying rank stops the run ----

# Two gloo ranks of the smallest model on the synthetic corpus (no tokenizer to train). Most of the
# time is each rank's interpreter importing torch and Lightning.
TWO_RANKS = ["model=nano", "tokenizer=byte", "data=synthetic", "data.corpus.n_documents=40", "data.corpus.val_documents=4",
             "data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=4", "logger=none",
             "trainer.progress_bar=false", "budget.steps=20", "trainer.val_every=20", "trainer.checkpoint_every=20",
             "parallelism=ddp", "trainer.devices=2", "hydra.run.dir=run"]
MARKERS = "LLM_TEST_MARKERS"  # the folder where the ranks of the modules below leave their files
RANK_WAIT = 30.0  # how long a rank of these modules waits for a signal


def rank_file(name: str, rank: int | None = None) -> Path:
    """<LLM_TEST_MARKERS>/rank<R>.<name>, R this process's rank unless given."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    return Path(os.environ[MARKERS]) / f"rank{rank}.{name}"


def preemption_signal(trainer: pl.Trainer) -> str | None:
    """The name of the preemption signal this rank's PreemptionHandler has received, or None."""
    handler = next(c for c in trainer.callbacks if isinstance(c, PreemptionHandler))
    return None if handler.received is None else signal.Signals(handler.received).name


def wait_for_a_signal(trainer: pl.Trainer) -> None:
    deadline = time.time() + RANK_WAIT
    while preemption_signal(trainer) is None and time.time() < deadline:
        time.sleep(0.01)  # the signal handler runs between these sleeps


class WaitsForASignalAfterStep2(PretrainModule):
    """Pretraining whose ranks, after step 2, say they are there (rankR.ready) and wait (up to
    RANK_WAIT) until a preemption signal has reached them; from step 2 on each records the step it
    has finished and the signal its PreemptionHandler holds (rankR.json). Waiting makes the stop
    step certain: the ranks' all-reduce at the end of step 3 sees the flag, so they save there."""

    def on_train_batch_end(self, *args) -> None:  # after the callbacks': the handler judged this step
        step = self.trainer.global_step
        if step == 2:
            rank_file("ready").write_text("")
            wait_for_a_signal(self.trainer)
        if step >= 2:
            rank_file("json").write_text(json.dumps({"step": step, "signal": preemption_signal(self.trainer)}))


class Rank1DiesAfterStep2(PretrainModule):
    """Pretraining whose rank 1 SIGKILLs itself after step 2 (no cleanup, no error of its own),
    while rank 0 is busy (up to RANK_WAIT) outside any collective, as in a long checkpoint write or
    an NCCL collective that never notices the dead peer, until a signal tells it to stop (the
    launcher's SIGTERM). Each rank leaves its process id (rankR.pid); rank 1 the time it died."""

    def on_train_start(self) -> None:
        rank_file("pid").write_text(str(os.getpid()))

    def on_train_batch_end(self, *args) -> None:
        if self.trainer.global_step != 2:
            return
        if self.trainer.global_rank == 1:
            rank_file("died").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        wait_for_a_signal(self.trainer)
        rank_file("json").write_text(json.dumps({"signal": preemption_signal(self.trainer)}))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited


def on_a_thread_when(ready, action, timeout: float = 240) -> threading.Thread:
    """Call `action` from a thread as soon as `ready()` (polled), or give up after `timeout`."""

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                action()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def launcher_here(tmp_path, monkeypatch):
    """This test process is the `llm-train` that starts the ranks (one interpreter less to start:
    seconds of CI): the ranks find the modules above and leave their files in tmp_path. A no-op
    SIGUSR1 handler stands in for the default (which ends the process) outside the launcher's."""
    monkeypatch.setenv(MARKERS, str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    yield tmp_path
    signal.signal(signal.SIGUSR1, previous)


def test_sigusr1_to_the_launcher_reaches_both_ranks_and_they_stop_at_one_step(launcher_here, monkeypatch, capsys):
    """SIGUSR1 to the launcher only: it forwards it, each rank's own handler holds SIGUSR1 (not
    just the other rank's flag through the all-reduce), both save and stop after step 3, exit 75."""
    tmp_path = launcher_here
    on_a_thread_when(lambda: all(rank_file("ready", r).exists() for r in (0, 1)),
                     lambda: os.kill(os.getpid(), signal.SIGUSR1))  # to this process, the launcher, only
    code, stderr = llm_cli("train", [*TWO_RANKS, "posttrain._target_=tests.test_reliability.WaitsForASignalAfterStep2"],
                           tmp_path, monkeypatch, capsys)
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert [json.loads(rank_file("json", r).read_text()) for r in (0, 1)] == [{"step": 3, "signal": "SIGUSR1"}] * 2
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("preempted", 3)
    assert checkpoint_step(run / "checkpoints" / LAST) == 3  # one checkpoint, of the step both stopped at
    assert f"continue with: llm-train resume={run}" in stderr


def test_a_rank_killed_stops_the_launcher_and_the_other_rank_promptly(launcher_here, monkeypatch, capsys):
    """Rank 1 is SIGKILLed while rank 0 is busy: the launcher notices at once (not once rank 0
    ends by itself), stops rank 0 (SIGTERM), exits 1 naming the dead rank, and no rank is left."""
    tmp_path = launcher_here
    code, stderr = llm_cli("train", [*TWO_RANKS, "posttrain._target_=tests.test_reliability.Rank1DiesAfterStep2"],
                           tmp_path, monkeypatch, capsys)
    stopped_after = time.time() - float(rank_file("died", 1).read_text())
    assert code == 1, stderr[-3000:]
    assert "error: rank 1 exited with code -9\n" in stderr
    assert stopped_after < RANK_WAIT / 2, f"the launcher returned {stopped_after:.0f} s after rank 1 died"
    assert [r for r in (0, 1) if alive(int(rank_file("pid", r).read_text()))] == []
    assert json.loads(rank_file("json", 0).read_text()) == {"signal": "SIGTERM"}  # the launcher stopped rank 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_done"] == 2


# ---- Ctrl-C ----

@pytest.mark.slow
def test_ctrl_c_to_a_ddp_run_stops_every_rank_at_one_step(ddp_reference, resume):
    run = ddp_reference / "ddp-interrupted"
    proc = start([*PARALLEL, "parallelism=ddp", "trainer.devices=2"], run, ddp_reference)
    wait_for(proc, reached(run, 14), "step 14")
    os.killpg(proc.pid, signal.SIGINT)  # the launcher and both ranks, as from a terminal
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert f"interrupted at step {summary['steps_done']}; checkpoint saved to {run / 'checkpoints' / LAST}" in stderr
    assert "Traceback" not in stderr
    resume(run, ddp_reference)
    assert_same_curves(run, ddp_reference / "ddp")


class CtrlC(pl.Callback):
    """Presses Ctrl-C `presses` times (SIGINT to this process) after optimizer step `at`."""

    def __init__(self, at: int, presses: int):
        self.at, self.presses, self.pressed = at, presses, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.at and not self.pressed:
            self.pressed = True
            for _ in range(self.presses):
                signal.raise_signal(signal.SIGINT)  # its handler has run when this returns


def ctrl_c_trainer(checkpoints: PeriodicCheckpoint, *callbacks: pl.Callback) -> pl.Trainer:
    # Preemption off: Ctrl-C is handled all the same.
    return pl.Trainer(max_steps=50, val_check_interval=100, check_val_every_n_epoch=None,
                      callbacks=[checkpoints, PreemptionHandler(checkpoints, enabled=False), *callbacks],
                      plugins=[AtomicCheckpointIO()], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint_or_at_once_on_the_second(tmp_path, presses):
    checkpoints = PeriodicCheckpoint(tmp_path, every_n_steps=5)
    trainer = ctrl_c_trainer(checkpoints, CtrlC(at=7, presses=presses))
    outside = signal.getsignal(signal.SIGINT)
    with ctrl_c_stops_at_once():
        with pytest.raises(Interrupted) as stopped:
            trainer.fit(ScriptedValidation({}))
        again = ctrl_c_trainer(PeriodicCheckpoint(tmp_path / "again", every_n_steps=5))
        again.fit(ScriptedValidation({}))  # the next fit in this process is not stopped by those presses
        assert again.global_step == 50
    assert signal.getsignal(signal.SIGINT) is outside  # every handler put back
    if presses == 1:  # the flag is judged at the end of step 8: saved there, stopped before step 9
        assert (stopped.value.step, stopped.value.checkpoint) == (8, tmp_path / LAST)
        assert checkpoint_step(tmp_path / LAST) == 8 and trainer.global_step == 8
    else:  # the second press raised at once, in step 7: no checkpoint of it
        assert (stopped.value.step, stopped.value.checkpoint) == (None, None)
        assert checkpoint_step(tmp_path / LAST) == 5 and trainer.global_step == 7


class PressesCtrlCWhenCollected:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # Python prints the exception raised in a __del__, and drops it


def test_a_ctrl_c_whose_exception_python_dropped_still_stops_the_fit(tmp_path):
    checkpoints = PeriodicCheckpoint(tmp_path, every_n_steps=5)
    trainer = ctrl_c_trainer(checkpoints)
    with ctrl_c_stops_at_once(), pytest.raises(Interrupted) as stopped:
        PressesCtrlCWhenCollected()  # collected at once: its Interrupted is dropped
        trainer.fit(ScriptedValidation({}))
    assert (stopped.value.step, stopped.value.checkpoint) == (1, tmp_path / LAST)  # stopped at the first step
    assert checkpoint_step(tmp_path / LAST) == 1


# ---- NaN and spike batches ----

NAN_TOKEN, SPIKE_TOKEN = 1, 2  # byte tokenizer ids of "\x01" and "\x02", absent from normal text


class PoisonedBatches(PretrainModule):
    """Pretraining whose loss is NaN on a batch holding byte 0x01 and 5x on one holding 0x02:
    bad data as the guard sees it (a NaN poisons the weights; a spike is a large bad update)."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if (batch == NAN_TOKEN).any():
            return loss * float("nan")
        if (batch == SPIKE_TOKEN).any():
            return loss * 5
        return loss


POISONED = {14: "\x01", 32: "\x02"}  # micro-batch index -> the poison in one of its blocks


@pytest.fixture(scope="module")
def poisoned_text(tmp_path_factory) -> Path:
    """~120 kB of Python source (ASCII: one byte, one token) with a poison byte in one block of
    micro-batches 14 (NaN) and 32 (spike, after the guard's 20 warm-up steps) of the seed-1337 stream."""
    import argparse
    import collections
    import dataclasses
    import pathlib
    import typing

    text = "".join(inspect.getsource(m) for m in (argparse, typing, collections, pathlib, dataclasses))
    text = text.encode("ascii", "ignore").decode()[:120_000]
    train_part = text[: len(text) - math.ceil(len(text) * 0.05)]  # TextCorpus: the last 5% of one file is val
    tokens = np.frombuffer(train_part.encode(), dtype=np.uint8).astype(np.int64)
    stream = BlockStream(np.append(tokens, 257), seq_len=64, micro_batch_size=8, seed=1337)  # + EOS
    chars = list(text)
    for index, poison in POISONED.items():
        block = stream.permutation(0)[index * 8 + 3]
        chars[block * 64 + 20] = poison
    path = tmp_path_factory.mktemp("poisoned") / "poisoned.txt"
    path.write_text("".join(chars))
    return path


def poisoned_run(text: Path, root: Path, *extra: str) -> dict:
    cfg = compose_train(["model=nano", "tokenizer=byte", "data=text", f"data.corpus.paths={text}", "data.seq_len=64",
                         "data.micro_batch_size=8", "logger=none", "trainer.progress_bar=false", "budget.steps=40",
                         "trainer.val_every=10", "trainer.log_every=5", "trainer.checkpoint_every=10",
                         "posttrain._target_=tests.test_reliability.PoisonedBatches", *extra], root)
    return train(cfg)


def test_guard_rolls_back_and_skips_nan_and_spike_batches(poisoned_text, tmp_path, single_thread):
    guarded = poisoned_run(poisoned_text, tmp_path / "guarded")
    events = guarded["guard_events"]
    assert [(e["kind"], e["batches_skipped"], e["rolled_back_to"]) for e in events] == [
        ("nonfinite", [14], 10), ("spike", [32], 30)]
    assert events[0]["step"] == 15 and events[1]["step"] == 32  # batch 32 came a step early, once 14 was skipped
    assert events[1]["loss"] > events[1]["threshold"]
    assert guarded["status"] == "completed" and guarded["guard_rollbacks"] == 2 and guarded["steps_done"] == 40
    records = read_metrics(tmp_path / "guarded" / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "val/loss" in r] == [10, 20, 30, 40]  # no replayed step left twice
    guard_metrics = [(r["step"], r["guard/rollbacks"], r["guard/skipped_batches"]) for r in records if "guard/rollbacks" in r]
    assert guard_metrics[0] == (5, 0, 0) and guard_metrics[-1] == (40, 2, 2)

    # The same as a run told to skip those batches from the start, which never saw them.
    clean = poisoned_run(poisoned_text, tmp_path / "clean", f"trainer.guard.skip_batches={list(POISONED)}")
    assert clean["guard_rollbacks"] == 0
    assert_same_curves(tmp_path / "guarded" / "run", tmp_path / "clean" / "run")

    # Without the guard the NaN batch ruins the run.
    unguarded = poisoned_run(poisoned_text, tmp_path / "unguarded", "trainer.guard.enabled=false")
    assert math.isnan(unguarded["val/loss"])


def test_guard_gives_up_after_max_rollbacks_with_a_clear_error(poisoned_text, tmp_path, single_thread):
    with pytest.raises(GuardGaveUp) as e:
        poisoned_run(poisoned_text, tmp_path, "trainer.guard.max_rollbacks=1")
    message = str(e.value)
    assert "2 bad steps" in message and "non-finite loss nan at step 15" in message and "loss spike" in message
    assert "trainer.guard.max_rollbacks=1" in message
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["guard_rollbacks"] == 2
    assert checkpoint_step(tmp_path / "run" / "checkpoints" / LAST) == 30  # the last good one, untouched


@pytest.mark.slow  # ~25 s: two ranks and a rollback
def test_guard_under_ddp_rolls_back_every_rank_together(poisoned_text, references):
    # The poisoned block is in one rank's half of the batch: the mean over ranks decides for both.
    run = references / "ddp-guard"
    result = run_cli(["model=nano", "tokenizer=byte", "data=text", f"data.corpus.paths={poisoned_text}", "data.seq_len=64",
                      "data.micro_batch_size=4", "data.global_batch_size=8", "logger=none", "trainer.progress_bar=false",
                      "budget.steps=20", "trainer.val_every=10", "trainer.checkpoint_every=10", "parallelism=ddp",
                      "trainer.devices=2", "posttrain._target_=tests.test_reliability.PoisonedBatches",
                      f"hydra.run.dir={run}"], cwd=references, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    # Micro-batches of 4 on 2 ranks: global sample k is in micro-batch k // 8, as with one rank of 8.
    assert [(e["kind"], e["batches_skipped"]) for e in summary["guard_events"]] == [("nonfinite", [14])]
    assert summary["status"] == "completed" and math.isfinite(summary["val/loss"])


# ---- corrupt checkpoints, retention, best ----

def test_resume_sets_aside_a_corrupt_checkpoint_and_uses_the_previous_one(tmp_path, single_thread):
    args = [*TINY_RUN, "budget.steps=30", "trainer.val_every=10", "trainer.checkpoint_every=10", "trainer.log_every=5"]
    train(compose_train(args, tmp_path))
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    assert sorted(p.name for p in checkpoints.iterdir()) == [BEST, LAST, "step-00000020.ckpt"]  # keep_last=2
    last = checkpoints / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn write

    again = train(compose_train([*args, "resume=run"], tmp_path))
    assert again["status"] == "completed" and again["steps_done"] == 30
    assert [c["path"] for c in again["corrupt_checkpoints"]] == [str(last)]
    assert "cut short" in again["corrupt_checkpoints"][0]["error"]
    assert (checkpoints / f"{LAST}.corrupt").exists()  # kept for inspection, never tried again
    assert checkpoint_step(last) == 30  # steps 21..30 were trained again, from step-00000020.ckpt ...
    assert_same_curves(run, reference)  # ... to the same curve


class ScriptedValidation(pl.LightningModule):
    """A one-parameter model whose validation loss at step s is `losses[s]`: enough to drive
    checkpoint retention through a real Trainer."""

    parallelism = None

    def __init__(self, losses: dict[int, float]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.losses = losses

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses[self.global_step])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return [torch.zeros(1)] * 100

    def val_dataloader(self):
        return [torch.zeros(1)]


def test_keeps_the_last_k_checkpoints_and_the_best(tmp_path):
    checkpoints = PeriodicCheckpoint(tmp_path, every_n_steps=10, keep_last=2)
    trainer = pl.Trainer(max_steps=50, val_check_interval=10, check_val_every_n_epoch=None, callbacks=[checkpoints],
                         plugins=[AtomicCheckpointIO()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ScriptedValidation({10: 5.0, 20: 3.0, 30: 4.0, 40: 6.0, 50: 7.0}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST, LAST, "step-00000020.ckpt", "step-00000040.ckpt"]
    assert (tmp_path / BEST).resolve().name == "step-00000020.ckpt"
    assert checkpoint_step(tmp_path / BEST) == 20 and checkpoint_step(tmp_path / LAST) == 50
    assert torch.load(tmp_path / LAST, weights_only=True)["callbacks"]["PeriodicCheckpoint"]["best_step"] == 20


class InfiniteUpdateAtStep20(PretrainModule):
    """Pretraining whose 20th update makes a weight infinite once, while that step's loss is
    still finite: only the check of the weights before a checkpoint can catch it."""

    fired = False  # on the class: a rollback's fresh copy of the module must not fire again

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.global_step == 19 and not InfiniteUpdateAtStep20.fired:  # the step counter moves on after this
            InfiniteUpdateAtStep20.fired = True
            with torch.no_grad():
                next(self.parameters()).fill_(float("inf"))


def test_a_non_finite_update_is_never_checkpointed(tmp_path, single_thread):
    summary = train(compose_train([*TINY_RUN, "budget.steps=30", "trainer.val_every=10", "trainer.checkpoint_every=10",
                                   "posttrain._target_=tests.test_reliability.InfiniteUpdateAtStep20"], tmp_path))
    assert [(e["kind"], e["step"], e["batches_skipped"], e["rolled_back_to"]) for e in summary["guard_events"]] == [
        ("nonfinite_weights", 20, [19], 10)]
    assert summary["status"] == "completed" and math.isfinite(summary["val/loss"])
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        weights = torch.load(path, weights_only=True)["state_dict"].values()
        assert all(torch.isfinite(w).all() for w in weights), path


def test_slurm_launcher_asks_for_the_preemption_signal_and_requeueing(tmp_path):
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    launcher = compose_train(["hydra/launcher=slurm", "hydra.launcher.signal_delay_s=90"], tmp_path).hydra.launcher
    extra = OmegaConf.to_container(launcher.additional_parameters, resolve=True)
    script = _make_sbatch_string(command="llm-train", folder=tmp_path, signal_delay_s=launcher.signal_delay_s,
                                 additional_parameters=extra).splitlines()
    assert "#SBATCH --signal=USR1@90" in script  # our handler's signal, not submitit's USR2
    assert "#SBATCH --requeue" in script
    assert signal.SIGUSR1 in SIGNALS
