"""Starting the ranks of a multi-process run.

Under torchrun or SLURM the ranks already exist and Lightning reads their environment. When a
user asks for several local devices from a plain `llm-train`, the job's own process prepares the
data once, then starts one fresh process per rank with the job's overrides and run directory, and
waits for them. Fresh processes give every multirun job its own process group, and Hydra writes no
output folders for the extra ranks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def launched_externally() -> bool:
    """True inside a rank started by torchrun, SLURM (srun) or by `spawn_local_ranks`."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def spawned_rank() -> bool:
    """Whether this process is one of the ranks `spawn_local_ranks` started (its launcher then
    does the single-process work after training)."""
    return "LLM_LAUNCHER_PID" in os.environ


def global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank_zero() -> bool:
    return global_rank() == 0


def _die_with_parent() -> None:
    """Linux: a rank is killed when the process that started it dies, so none is left behind.
    Where libc cannot be loaded the ranks are still stopped by spawn_local_ranks' `finally`,
    just not when the launcher itself is SIGKILLed."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank of a local multi-process run failed; its own error is printed above (and in the
    run's train.log or its rankN.log), so llm-train reports this in one line."""


def spawn_local_ranks(n: int, overrides: list[str], run_dir: Path, poll_seconds: float = 0.2) -> None:
    """Run `llm-train <overrides>` as n local ranks in `run_dir`; raise if any rank fails (the
    others are then stopped, so a crashed rank never leaves the rest waiting in a collective).

    SIGTERM and SIGUSR1 sent to this process are forwarded to the ranks (preemption: they save and
    stop, and this raises Preempted). Ctrl-C is not forwarded: the terminal sends SIGINT to its
    whole foreground process group, the ranks included, and a forwarded copy would be their second
    Ctrl-C (stop at once, without a checkpoint). This process waits for them to save and stop, then
    raises Interrupted; after a second Ctrl-C it stops waiting once one rank has stopped, after a
    third at once, and the ranks still running are ended."""
    from llm.tracking.preemption import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, SIGNALS, Interrupted, Preempted,
                                         ctrl_c_ignored)

    port = _free_port()
    procs: list[subprocess.Popen] = []
    ctrl_c = 0

    def forward(signum: int, _: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def count_ctrl_c(signum: int, _: object) -> None:
        nonlocal ctrl_c
        ctrl_c += 1

    previous = {}
    if threading.current_thread() is threading.main_thread():  # where signal handlers may be set
        previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
        if not ctrl_c_ignored():  # (ignored: the ranks inherit that)
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, count_ctrl_c)
    # Share the cores between the ranks instead of oversubscribing them (as torchrun does).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    try:
        for rank in range(n):
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "LOCAL_RANK": str(rank), "NODE_RANK": "0", "RANK": str(rank), "WORLD_SIZE": str(n),
                   "LLM_LAUNCHER_PID": str(os.getpid())}
            # Rank 0 appends to the run's train.log (what the console shows); the others keep a
            # rankN.log of their own, which holds only their warnings and errors.
            command = [sys.executable, "-m", "llm.cli.train", *overrides, f"hydra.run.dir={run_dir}",
                       "hydra.output_subdir=null", f"hydra.job.name={'train' if rank == 0 else f'rank{rank}'}"]
            procs.append(subprocess.Popen(command, env=env,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        # A list, not a generator: poll() records every rank's exit, and any() would stop at the first
        # rank still running, leaving a dead rank after it unseen (and the others waiting for it).
        while any([p.poll() is None for p in procs]):
            codes = [p.returncode for p in procs]
            if ctrl_c >= 3 or (ctrl_c >= 2 and any(code is not None for code in codes)):
                break  # the user will not wait: the ranks still running are ended below
            failed = [r for r, code in enumerate(codes)
                      if code not in (None, 0, PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE)]
            if failed:
                raise RankFailed(f"rank {failed[0]} exited with code {codes[failed[0]]}")
            time.sleep(poll_seconds)
        codes = [p.returncode for p in procs]
        if ctrl_c or INTERRUPTED_EXIT_CODE in codes:
            raise Interrupted()
        if all(code == PREEMPTED_EXIT_CODE for code in codes):
            raise Preempted(None, "a preemption signal")
        if any(codes):
            raise RankFailed(f"ranks exited with codes {codes}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for p in procs:
            if p.poll() is None and ctrl_c >= 3:
                p.kill()
            elif p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:  # stuck in a collective with a dead peer
                p.kill()
                p.wait()
