"""Preemption and Ctrl-C: a signal saves a checkpoint at the next step boundary and stops the run.

SIGTERM or SIGUSR1 (preemption) stops it with exit code 75; under SLURM the job is requeued and
resumes by itself. SIGINT (Ctrl-C) stops it with `Interrupted`, exit code 130 and status
"interrupted", and is never requeued: the user asked for the stop.

A signal only sets a flag (a handler must not run collectives or write files). At the end of the
next optimizer step all ranks agree on the flag (one all-reduce) and save `last.ckpt`; before the
step after it they raise `Preempted` or `Interrupted`. `llm-train` then requeues a preempted SLURM
job (`scontrol requeue`) and exits with PREEMPTED_EXIT_CODE. When SLURM restarts the job
(SLURM_RESTART_COUNT > 0) in the same, deterministic run directory, `requeued_run` tells
llm.train to resume it.

A second Ctrl-C, and any Ctrl-C outside the training steps (`ctrl_c_stops_at_once`, which
`llm-train` puts around the whole run), raises `Interrupted` at once, without a checkpoint: the
run keeps the checkpoints it has. It is not a KeyboardInterrupt, which Lightning turns into a
bare `exit(1)` that would record the run as failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from llm.run.layout import LAST

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Not 0 (the run is
# not done) and not 1 (nothing is wrong): schedulers and scripts can requeue on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before the time limit (--signal)
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: the shell's code for a command stopped by Ctrl-C


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a preemption signal; resume it to continue."""

    run_status = "preempted"  # summary.json's status for a run that ends with this exception

    def __init__(self, step: Optional[int], signal_name: str):
        self.step = step  # None: not known here (the ranks of a multi-process run stopped)
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name}" + (f" after step {step}" if step is not None else "")
                         + "; checkpoint saved")


class Interrupted(BaseException):
    """The user stopped the run (Ctrl-C). Not a Preempted, so a SLURM job is not requeued; a
    BaseException like the KeyboardInterrupt it stands for, so no `except Exception` swallows it.
    `checkpoint` is the checkpoint saved at `step` on the way out (None: none was, or not known
    here, as in the process that launched the ranks)."""

    run_status = "interrupted"  # summary.json's status for a run that ends with this exception

    def __init__(self, step: Optional[int] = None, checkpoint: Optional[Path] = None):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__("interrupted" + (f" at step {step}" if step is not None else "")
                         + (f"; checkpoint saved to {checkpoint}" if checkpoint is not None else ""))


# interrupt_now ran and no fit has seen its Interrupted (which Python drops when it is raised in a
# __del__): the next fit stops at its first step instead of losing the Ctrl-C.
_ctrl_c_pending = False


def interrupt_now(signum: int, frame: Any) -> None:
    """SIGINT handler: stop at once, like Python's default handler, but with `Interrupted`."""
    global _ctrl_c_pending
    _ctrl_c_pending = True
    raise Interrupted()


def ctrl_c_ignored() -> bool:
    """Whether this process was started with SIGINT ignored (`llm-train ... &` in a script, or a
    launcher that was): it then stays ignored, as Python itself leaves it, and so in its ranks."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@contextmanager
def ctrl_c_stops_at_once() -> Iterator[None]:
    """Within: Ctrl-C raises `Interrupted` wherever the run is (the training steps put the
    graceful handler of PreemptionHandler in its place while they run)."""
    if threading.current_thread() is not threading.main_thread() or ctrl_c_ignored():
        yield
        return
    global _ctrl_c_pending
    _ctrl_c_pending = False
    previous = signal.signal(signal.SIGINT, interrupt_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _ctrl_c_pending = False


class PreemptionHandler(Callback):
    """Turns SIGTERM/SIGUSR1 into a checkpoint and `Preempted` at the next step boundary, and the
    first Ctrl-C into a checkpoint and `Interrupted` (always on: `enabled` is for preemption).

    The handlers are installed when training starts, after Lightning has installed its own (so
    they replace Lightning's: its SIGTERM handler broadcasts from inside the handler, and its SLURM
    SIGUSR1 handler writes a checkpoint of its own), and Lightning puts back the previous handlers
    when the fit ends. Put this callback after the loss guard and the checkpoint callback.
    """

    def __init__(self, checkpoints: Any, enabled: bool = True):
        self.checkpoints = checkpoints  # a PeriodicCheckpoint: saves last.ckpt
        self.enabled = enabled
        self.received: Optional[int] = None  # the preemption signal's number, once one arrived
        self.ctrl_c = False  # a first Ctrl-C arrived (on this rank)
        self.interrupting = False  # all ranks agreed to stop for a Ctrl-C (on one of them)
        self.stopping = False  # the checkpoint is saved: stop before the next step
        self._judged_step = -1
        self._rank_zero = True  # the rank that tells the user what a Ctrl-C does

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def _handle_ctrl_c(self, signum: int, frame: Any) -> None:
        self.ctrl_c = True
        signal.signal(signal.SIGINT, interrupt_now)  # a second Ctrl-C does not wait for the step
        if self._rank_zero:
            # os.write, not logging: a handler may run in the middle of a logging call.
            os.write(2, b"\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C again: stop at once, "
                        b"without one)\n")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._judged_step = -1  # a fit after a rollback counts the same steps again

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning puts back the handler it found (llm-train's interrupt_now) when the fit ends.
        self._rank_zero = trainer.is_global_zero
        self.ctrl_c = self.ctrl_c or _ctrl_c_pending  # a Ctrl-C whose Interrupted was dropped: stop at step 1
        if not ctrl_c_ignored():
            signal.signal(signal.SIGINT, interrupt_now if self.ctrl_c else self._handle_ctrl_c)  # (a fit after a rollback)
        if not self.enabled:
            return
        if getattr(trainer, "received_sigterm", False):  # arrived before our handler: Lightning noted it
            self.received = signal.SIGTERM
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.stopping or trainer.global_step == self._judged_step:
            return  # mid-accumulation, or this step was judged already
        self._judged_step = trainer.global_step
        # Every rank must stop at the same step: one rank's signal stops them all.
        if trainer.strategy.reduce_boolean_decision(self.ctrl_c or self.received is not None, all=False):
            # Which stop (a second all-reduce, only now): a Ctrl-C anywhere wins over preemption,
            # as a stop the user asked for must not be requeued.
            self.interrupting = trainer.strategy.reduce_boolean_decision(self.ctrl_c, all=False)
            self.checkpoints.save(trainer)
            self.stopping = True

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # Stop here, not right after the save: Lightning has now finished the saved step (its
        # metrics are written, as the resumed run will not log that step again).
        if self.stopping:
            self._stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A Ctrl-C in the last step: the run stops here rather than go on to its finish.
        if self.stopping and self.interrupting:
            self._stop(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        global _ctrl_c_pending
        if isinstance(exception, Interrupted):
            _ctrl_c_pending = False  # seen: it ends this fit, and must not stop the next one

    def _stop(self, trainer: pl.Trainer) -> None:
        if self.interrupting:
            raise Interrupted(trainer.global_step, self.checkpoints.dirpath / LAST)
        name = signal.Signals(self.received).name if self.received is not None else "a signal to another rank"
        raise Preempted(trainer.global_step, name)


def requeue_slurm_job() -> Optional[str]:
    """Under SLURM (rank zero only), put this job back in the queue: it restarts with the same job
    id, so in the same run directory, and resumes. Returns what happened, or None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job}: {e}"
    if done.returncode:
        return f"could not requeue SLURM job {job}: {done.stderr.strip() or done.returncode}"
    return f"requeued SLURM job {job}; it resumes from the checkpoint when it restarts"


def requeued_run(run_dir: Path, run_file: str) -> bool:
    """Whether this is a SLURM job restarted after a requeue (or a node failure) whose run
    directory already holds the run: it is then resumed rather than started over."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and (Path(run_dir) / run_file).is_file()
