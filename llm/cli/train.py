"""`llm-train`: the Hydra app over conf/train.yaml. Thin: compose, then hand over to llm.train."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

# llm.tracking.preemption.INTERRUPTED_EXIT_CODE, not imported here: that module brings Lightning.
_INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT

try:
    import llm.config  # noqa: F401  (registers the schemas in Hydra's ConfigStore; brings torch: seconds)
except KeyboardInterrupt:  # Ctrl-C while the command starts: one line, no traceback
    sys.stderr.write("interrupted before the run started; nothing was saved\n")
    sys.exit(_INTERRUPTED_EXIT_CODE)
from llm.cli.common import CONFIG_ERROR_EXIT_CODE, config_error_in, setup
from llm.resources import CONF_DIR

setup()
log = logging.getLogger("llm.cli.train")
# Set once Hydra hands a composed config to the app: an exit before that is Hydra refusing the
# command line (a bad override, a value its type or Enum refuses), which is a config error (exit 2).
_composed = False


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> float | None:
    """Exit codes: 0 done, 1 failed (also: stopped by the loss guard, or no space left for a
    checkpoint), 2 config or input error, 75 preempted after saving a checkpoint, 130 interrupted
    by Ctrl-C (see llm.cli.common)."""
    global _composed
    _composed = True
    try:
        return _train(cfg)
    except KeyboardInterrupt:  # a Ctrl-C before llm-train's own handler was in place (while importing)
        _exit_interrupted(cfg, None)


def _train(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from llm.parallel.launch import RankFailed
    from llm.tracking.guard import GuardGaveUp
    from llm.tracking.preemption import PREEMPTED_EXIT_CODE, Interrupted, Preempted, ctrl_c_stops_at_once
    from llm.run.run import discard_unstarted
    from llm.train import train

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        with ctrl_c_stops_at_once():  # Interrupted, not a KeyboardInterrupt that Lightning would turn into exit 1
            summary = train(cfg)
    except Preempted as e:
        _preempted(cfg, e)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Interrupted as e:
        _exit_interrupted(cfg, e)  # also in a multirun: Ctrl-C stops the sweep
    except (GuardGaveUp, RankFailed) as e:
        sys.stderr.write(f"error: {e}\n")
        if multirun:
            raise
        sys.exit(1)
    except Exception as e:
        cause = config_error_in(e)
        if cause is None:
            full = _no_space(cfg, e)
            if full is None:
                raise
            sys.stderr.write(f"error: {full}\n")
            if multirun:
                raise
            sys.exit(1)
        sys.stderr.write(f"error: {cause}\n")
        discard_unstarted(cfg.paths.run_dir)  # a refused run leaves no directory behind
        if multirun:
            raise cause  # recorded as a failed job; the sweep goes on and exits non-zero at the end
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    return summary.get("val/loss")


def _preempted(cfg: DictConfig, e: Exception) -> None:
    """Say how to continue; under SLURM the launching process puts the job back in the queue."""
    from omegaconf import OmegaConf

    from llm.parallel.launch import is_rank_zero, spawned_rank
    from llm.tracking.preemption import requeue_slurm_job

    if not is_rank_zero() or spawned_rank():
        return  # the process that started the ranks speaks (and requeues) for them
    log.warning(f"preempted: {e}; continue with: llm-train resume={cfg.paths.run_dir}")
    if OmegaConf.select(cfg, "trainer.preemption.requeue", default=True):
        note = requeue_slurm_job()
        if note:
            log.warning(note)


def _exit_interrupted(cfg: Optional[DictConfig], e: Optional[BaseException]) -> None:
    """Report the interrupted run (`cfg`: None before Hydra composed one; `e`: the Interrupted,
    or None for a KeyboardInterrupt that came before the run started) and exit with 130. Ctrl-C
    is ignored from here: the process is on its way out, and another one would only cut the
    report short or print a traceback from the interpreter's shutdown (torch's exit hooks)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: no handler can be set here
        pass
    if cfg is None:
        sys.stderr.write("interrupted before the run started; nothing was saved\n")
    else:
        _interrupted(cfg, e)
    sys.exit(_INTERRUPTED_EXIT_CODE)


def _interrupted(cfg: DictConfig, e: Optional[BaseException]) -> None:
    """Say in one line where the run stopped, which checkpoint it keeps and how to continue.
    summary.json says "interrupted" (Run.train records the Interrupted that ended it)."""
    from llm.files import write_json
    from llm.parallel.launch import is_rank_zero, spawned_rank
    from llm.run.layout import RunDir

    if not is_rank_zero() or spawned_rank():
        return  # the process that started the ranks speaks for them
    run = RunDir(cfg.paths.run_dir)
    if not run.run_file.is_file():  # stopped before the run started
        if e is not None:  # (llm.run is imported by now)
            from llm.run.run import discard_unstarted

            discard_unstarted(run.path)  # Hydra's files go, as for a refused run
        sys.stderr.write("interrupted before the run started; nothing was saved\n")
        return
    summary = _read_json(run.summary)
    if summary is not None and summary.get("status") == "running":  # left so by a process that was stopped
        summary["status"] = "interrupted"
        write_json(run.summary, summary)
    if e is None:
        line = "interrupted before the run started"
    else:
        step = e.step if getattr(e, "step", None) is not None else (summary or {}).get("steps_done")
        line = "interrupted" + (f" at step {step}" if step is not None else "") + _kept(run.path, step, e)
    sys.stderr.write(f"{line}; continue with llm-train resume={run.path}\n")


def _kept(run_dir: Path, step: Optional[int], e: BaseException) -> str:
    """What the run keeps: the checkpoint saved on the way out, or the newest one before it."""
    from llm.checkpoint import checkpoint_step, last_checkpoint

    if getattr(e, "checkpoint", None) is not None:
        return f"; checkpoint saved to {e.checkpoint}"
    newest = last_checkpoint(run_dir)
    if newest is None:
        return "; no checkpoint was saved"
    try:
        saved = checkpoint_step(newest)
    except Exception:  # whatever torch raises for a checkpoint that does not load: resume sets it aside
        return f"; the newest checkpoint is {newest}"
    if saved == step:  # the ranks of a multi-process run saved it on their way out
        return f"; checkpoint saved to {newest}"
    return f"; no checkpoint at this step, the newest is {newest} (step {saved})"


def _no_space(cfg: DictConfig, e: BaseException) -> Optional[str]:
    """The one-line report of a write that ran out of room (a checkpoint's, raised as NoSpace, or
    any other file's), or None when `e` is something else."""
    from llm.checkpoint import last_checkpoint
    from llm.checkpoint.save import NoSpace, causes, no_space
    from llm.run.layout import RunDir

    run = RunDir(cfg.paths.run_dir)
    chain = list(causes(e))
    checkpoint = next((c for c in chain if isinstance(c, NoSpace)), None)
    if checkpoint is not None:
        what = str(checkpoint)
    else:
        why = no_space(e, run.path)
        if why is None:
            return None
        name = next((c.filename for c in chain if isinstance(c, OSError) and c.filename), None)
        what = f"no space left to write {name or 'a file of the run'} (disk full or file-size limit: {why})"
    newest = last_checkpoint(run.path)
    kept = f"the {'previous' if checkpoint else 'newest'} checkpoint {newest} is kept" if newest else "no checkpoint was saved"
    then = f"llm-train resume={run.path}" if run.run_file.is_file() else "run it again"
    return f"{what}: {kept}; free space, then {then}"


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short
        return None


def main() -> None:
    from llm.tracking.sweep import report_sweep

    global _composed
    _composed = False  # per invocation: tests and other callers may run several in one process
    # A file-size limit (ulimit -f) sends SIGXFSZ, which kills the process: ignored, a write past
    # the limit fails with EFBIG instead, and the run reports it and keeps its last checkpoint.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    try:
        _app()
    except SystemExit as e:
        if e.code == 1 and not _composed:  # Hydra refused the command line before the run started
            sys.exit(CONFIG_ERROR_EXIT_CODE)
        raise
    except KeyboardInterrupt:  # a Ctrl-C while the command line was being composed
        _exit_interrupted(None, None)
    finally:
        report_sweep()  # after a multirun: index.json and a line per failed job


if __name__ == "__main__":
    main()
