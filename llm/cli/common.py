"""What every entry point sets up before Hydra composes: resolvers used by conf/, quiet libraries."""

from __future__ import annotations

import math
import os
import sys
import warnings

from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf


def launch_stamp(stamp: str) -> str:
    """The name of a fresh run directory. Every rank must agree on it, so under torchrun
    (--standalone or --rdzv-id) and SLURM it comes from the launcher's job id, not the clock."""
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic != "none":
        return f"torchrun-{elastic}"
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{os.environ['SLURM_JOB_ID']}" + (f"-{array}" if array else "")
    return stamp


def run_dir(resume: Optional[str], runs_dir: str, stamp: str) -> str:
    """A fresh `<runs_dir>/<stamp>`, or the directory of the run being resumed (a path or a run id)."""
    if not resume:
        return str(Path(runs_dir) / launch_stamp(stamp))
    path = Path(resume).expanduser()
    if not path.is_dir() and (Path(runs_dir) / resume).is_dir():
        path = Path(runs_dir) / resume
    return str(path.resolve())


def ladder_shape(size: float, key: str) -> int:
    """One field of the model shape for `size` non-embedding parameters (llm.scaling.plan's rule)."""
    from llm.config.validate import LadderSizeError
    from llm.scaling.plan import shape_for_params

    try:
        value = float(size)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= MAX_LADDER_SIZE:  # also nan
        raise LadderSizeError(f"model.size={size!r}: must be a number of non-embedding parameters in (0, "
                              f"{MAX_LADDER_SIZE:.0e}], e.g. model.size=3e5")
    return shape_for_params(value)[key]


MAX_LADDER_SIZE = 1e13  # 10 trillion parameters: beyond any model trained so far


def ladder_lr(size: float, *constants: float) -> float:
    """${llm_ladder_lr:SIZE[,BASE,REFERENCE,EXPONENT,CAP]}: llm.scaling.plan.ladder_lr."""
    from llm.scaling.plan import ladder_lr as rule

    return rule(float(size), *map(float, constants))


def ladder_batch(size: float, seq_len: int, *step: int) -> int:
    """${llm_ladder_batch:SIZE,SEQ_LEN,MICRO_BATCH[,DEVICES,NODES]}: global batch in sequences
    (llm.scaling.plan.ladder_batch), a multiple of the product of the step factors, so that every
    data-parallel layout of those ranks divides it."""
    from llm.scaling.plan import ladder_batch as rule

    return rule(float(size), int(seq_len), math.prod(int(k) for k in step))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("llm_run_dir"):
        OmegaConf.register_new_resolver("llm_run_dir", run_dir)
    if not OmegaConf.has_resolver("llm_shape"):
        OmegaConf.register_new_resolver("llm_shape", ladder_shape)
        OmegaConf.register_new_resolver("llm_ladder_lr", ladder_lr)
        OmegaConf.register_new_resolver("llm_ladder_batch", ladder_batch)
    if not OmegaConf.has_resolver("llm_cwd"):
        # The launch directory; unlike ${hydra:runtime.cwd} it also resolves in the multirun launcher.
        OmegaConf.register_new_resolver("llm_cwd", lambda: os.getcwd())


NOISE = (
    ".*treespec, LeafSpec.*",
    ".*does not have many workers.*",
    ".*resuming from a checkpoint that ended before the epoch.*",
    ".*IterableDataset.*has `__len__` defined.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
)


def quiet_libraries() -> None:
    """Keep the terminal for our own messages: libraries log from WARNING up (Lightning's "GPU
    available" and "LOCAL_RANK" lines, its tips), known-harmless warnings about choices we made on
    purpose (no loader workers, endless data stream) are dropped, and in a multi-process run only
    rank zero logs information (llm.tracking.console)."""
    from llm.tracking.console import keep_libraries_at_warning, speak_on_rank_zero

    keep_libraries_at_warning()
    speak_on_rank_zero()
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def setup() -> None:
    register_resolvers()
    quiet_libraries()


# Exit codes of the entry points: 0 done; 1 a failure (a traceback, a run the loss guard stopped,
# or no space left for a checkpoint); 2 a config or input error (the message names the key or
# file and the fix); 75 a preempted run that saved a checkpoint
# (llm.tracking.preemption.PREEMPTED_EXIT_CODE): resume it; 130 stopped by Ctrl-C (with a
# checkpoint after the first press; llm.tracking.preemption.INTERRUPTED_EXIT_CODE).
CONFIG_ERROR_EXIT_CODE = 2


def config_error_in(error: BaseException) -> Optional[BaseException]:
    """The ConfigError or InputError that caused `error`, if any: Hydra's instantiate wraps the
    exceptions of the objects it builds, so an input error raised by a corpus arrives as its cause."""
    from llm.config import ConfigError
    from llm.files import InputError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (ConfigError, InputError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_on_config_error(run: Callable[[Any], Any], cfg: Any) -> Any:
    """Run a command; a ConfigError becomes its message on stderr and exit code 2."""
    try:
        return run(cfg)
    except Exception as e:
        cause = config_error_in(e)
        if cause is None:
            raise
        sys.stderr.write(f"error: {cause}\n")  # the command's answer to a bad input, as argparse's
        sys.exit(CONFIG_ERROR_EXIT_CODE)
